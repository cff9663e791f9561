"""Products with stacked quantized weights (scanned layers, MoE experts), slice by slice.

A stacked leaf (``leaf.stack_shape != ()``) holds one packed weight per slice. The products here
never unpack the stack: they loop over slices (``lax.map``/``lax.scan``, one slice's weight
decoded at a time) and run each slice through the ordinary packed matmuls
(:func:`jaxbnb.qdot_general`: the fused 4-bit path, LLM.int8()).

* :func:`dot_general`: the weight's stack axes are batch axes (a dense MoE
  ``einsum("ecd,edf->ecf")``, a vmapped dot) or free axes (every token through every expert);
* :func:`ragged_dot`: ``jax.lax.ragged_dot`` with stacked right-hand side (MoE grouped matmul).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb.qtensor import QuantizedArray

# Rows of x per step of the ragged product: a step multiplies one row tile by one expert's weight.
_RAGGED_TILE = 128


def _flat_stack(w: QuantizedArray) -> QuantizedArray:
  """``w`` with its stack axes merged into one leading axis."""
  ns = len(w.stack_shape)
  return jax.tree.map(lambda a: a.reshape(-1, *a.shape[ns:]), w)


def dot_general(x, w: QuantizedArray, dims, w_is_lhs: bool, out_dtype, per_slice):
  """``lax.dot_general`` of ``x`` with a stacked weight's logical array (stack axes first).

  ``per_slice(x_s, w_s, dims_s)``: the product with one slice. The stack axes must all be batch
  axes or all free axes of the product; None when they are not (the caller falls back).
  """
  ns = len(w.stack_shape)
  stack = tuple(range(ns))
  (lc, rc), (lb, rb) = dims
  wc, wb, xc, xb = (lc, lb, rc, rb) if w_is_lhs else (rc, rb, lc, lb)
  nx, nw = x.ndim, ns + w.ndim
  if all(a in wb for a in stack):
    k = [wb.index(a) for a in stack]  # positions of the stack axes in the batch list
    x_axes = [xb[i] for i in k]
    xs = jnp.moveaxis(x, x_axes, list(range(ns))).reshape(-1, *[
        x.shape[a] for a in range(nx) if a not in x_axes])
    x_left = [a for a in range(nx) if a not in x_axes]
    xmap = {a: i for i, a in enumerate(x_left)}
    rest = [i for i in range(len(wb)) if i not in k]
    sc = (tuple(w_ - ns for w_ in wc), tuple(xmap[a] for a in xc))
    sb = (tuple(wb[i] - ns for i in rest), tuple(xmap[xb[i]] for i in rest))
    d = ((sc[0], sc[1]), (sb[0], sb[1])) if w_is_lhs else ((sc[1], sc[0]), (sb[1], sb[0]))
    y = jax.lax.map(lambda a: per_slice(a[0], a[1], d).astype(out_dtype),
                    (xs, _flat_stack(w)))
    y = y.reshape(*w.stack_shape, *y.shape[1:])
    # y's batch axes are the stack ones, then the rest; dot_general's follow the batch list.
    cur = k + rest
    return jnp.transpose(y, [cur.index(j) for j in range(len(wb))] + list(range(len(wb), y.ndim)))
  if not any(a in wb or a in wc for a in stack):
    d = (((tuple(a - ns for a in wc), tuple(xc)), (tuple(a - ns for a in wb), tuple(xb)))
         if w_is_lhs else ((tuple(xc), tuple(a - ns for a in wc)),
                           (tuple(xb), tuple(a - ns for a in wb))))
    y = jax.lax.map(lambda ws: per_slice(x, ws, d).astype(out_dtype), _flat_stack(w))
    y = y.reshape(*w.stack_shape, *y.shape[1:])
    # The weight's free axes start after the batch axes (lhs) or after x's free ones (rhs);
    # the stack axes are the first of them.
    n_xfree = nx - len(xc) - len(xb)
    start = len(wb) if w_is_lhs else len(wb) + n_xfree
    return jnp.moveaxis(y, list(range(ns)), list(range(start, start + ns)))
  return None


def ragged_dot(x, w: QuantizedArray, group_sizes, n_out: int, out_dtype, per_slice,
               tile: int = _RAGGED_TILE):
  """``jax.lax.ragged_dot(x, W, group_sizes)`` with ``W`` a stacked leaf ``(groups, ...)``.

  ``x`` ``(m, k)``: rows sorted by group, ``group_sizes`` int ``(groups,)``; row ``r`` of group
  ``g`` is ``per_slice(x[r], W[g])`` (``(n_out,)``) (rows past ``sum(group_sizes)`` give 0). The rows are
  walked in tiles of ``tile``; one step multiplies one tile by one group's packed weight, for
  the ``ceil(m / tile) + groups - 1`` (tile, group) pairs that can meet (groups are
  contiguous), so the work is about one dense product plus one tile per group, and one
  group's weight is decoded per step. Differentiable w.r.t. ``x``.
  """
  m = x.shape[0]
  g = w.stack_shape[0]
  tile = max(1, min(tile, m))
  n_tiles = -(-m // tile)
  steps = n_tiles + g - 1
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  first = starts // tile
  count = jnp.where(sizes > 0, (ends - 1) // tile - first + 1, 0)
  offsets = jnp.cumsum(count) - count  # first step of each group
  s = jnp.arange(steps, dtype=jnp.int32)
  grp = jnp.clip(jnp.searchsorted(offsets + count, s, side="right"), 0, g - 1).astype(
      jnp.int32)
  valid = s < jnp.sum(count)
  tiles = jnp.where(valid, first[grp] + s - offsets[grp], 0)
  xp = jnp.pad(x, ((0, n_tiles * tile - m), (0, 0)))
  flat = _flat_stack(w)

  def body(y, step):
    t, gi, ok = step
    rows = t * tile + jnp.arange(tile)
    xt = jax.lax.dynamic_slice_in_dim(xp, t * tile, tile)
    wg = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, gi, keepdims=False), flat)
    keep = ok & (rows >= starts[gi]) & (rows < ends[gi])
    yt = jnp.where(keep[:, None], per_slice(xt, wg).astype(jnp.float32), 0)
    return jax.lax.dynamic_update_slice_in_dim(
        y, jax.lax.dynamic_slice_in_dim(y, t * tile, tile) + yt, t * tile, 0), None

  y0 = jnp.zeros((n_tiles * tile, n_out), jnp.float32)
  y, _ = jax.lax.scan(body, y0, (tiles, grp, valid))
  return y[:m].astype(np.dtype(out_dtype))
