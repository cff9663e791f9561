"""Run unmodified Flax (NNX, Linen) — or any JAX — code on quantized params.

``intercept(fn)`` traces ``fn`` with float stand-ins for the quantized leaves, then evaluates
the traced program with the packed weights: a ``dot_general`` that consumes a quantized weight
becomes :func:`jaxbnb.qdot_general` (4-bit, or LLM.int8() for the usual ``x @ kernel``),
an embedding lookup (``gather`` of rows) dequantizes only the rows it reads, and layout-only ops
on the way (dtype casts, transposes, ``jit`` boundaries, ``jax.checkpoint``) are followed
without touching the data. Stacked weights (scanned layers, MoE experts) run packed too:
``scan`` (``jax.lax.scan``, Linen ``nn.scan``, ``nnx.scan``) hands each step its slice,
``while``/``fori_loop`` and ``cond`` bodies see the packed stack, indexing a stack (static or
dynamic) slices it, a ``dot_general`` whose batch axes are the stack axes (a dense MoE einsum, a
vmapped dot) loops over slices, and ``jax.lax.ragged_dot`` over experts multiplies row tiles by
one expert's packed weight at a time. Any other use of a quantized weight dequantizes it for
that op and warns, so a slow path is never silent.

  forward = jaxbnb.intercept(model.apply)               # Linen
  y = jax.jit(forward)(qvariables, x)

  graphdef, state = nnx.split(model)                     # NNX
  forward = jaxbnb.intercept(lambda s, x: nnx.merge(graphdef, s)(x))
  y = jax.jit(forward)(jaxbnb.quantize(state, cfg), x)
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from jaxbnb.host import is_offloaded
from jaxbnb import _backend, stacked
from jaxbnb.ops import qdot_general
from jaxbnb.qtensor import QuantizedArray, is_quantized


@dataclasses.dataclass(frozen=True)
class _QRef:
  """A quantized weight as the traced program sees it: logical array, then ``perm``, in
  ``dtype``."""

  leaf: QuantizedArray
  perm: Optional[tuple[int, ...]] = None
  dtype: Any = None

  @property
  def view_dtype(self):
    return self.dtype or self.leaf.dtype

  @property
  def n_stack(self) -> int:
    return len(getattr(self.leaf, "stack_shape", ()))

  @property
  def full_ndim(self) -> int:
    return self.n_stack + len(self.leaf.shape)

  @property
  def stack_leading(self) -> bool:
    """The view keeps the stack axes first and in order (so slicing them slices the leaf)."""
    return self.perm is None or tuple(self.perm[:self.n_stack]) == tuple(range(self.n_stack))

  def unstack(self, k: int, leaf) -> "_QRef":
    """This view with its first ``k`` stack axes sliced off (``leaf``: the sliced leaf)."""
    perm = None if self.perm is None else tuple(p - k for p in self.perm[k:])
    return _QRef(leaf, perm, self.dtype)

  def materialize(self, why: str) -> jax.Array:
    shape = (*getattr(self.leaf, "stack_shape", ()), *self.leaf.shape)
    warnings.warn(f"jaxbnb.intercept: a quantized weight of shape {shape} is used by "
                  f"`{why}`, which has no quantized rule; it was dequantized for this op "
                  "(slower, and a float copy lives while the op runs)", stacklevel=2)
    w = self.leaf.dequantize(self.view_dtype)
    return w if self.perm is None else jnp.transpose(w, self.perm)


jax.tree_util.register_dataclass(_QRef, data_fields=["leaf"], meta_fields=["perm", "dtype"])


def _is_special(x) -> bool:
  """Leaves ``intercept`` handles itself: quantized, or offloaded to host memory."""
  return is_quantized(x) or is_offloaded(x)


def intercept(fn: Callable, *, backend: str = "auto") -> Callable:
  """Wrap ``fn`` so that its arguments may hold quantized leaves (from ``jaxbnb.quantize``).

  Returns a function with ``fn``'s signature and outputs. Array leaves of the arguments are
  traced; other leaves (Python scalars, strings, ...) are passed through as constants. Leaves in
  host memory (:func:`jaxbnb.offload`) move to the device where they are first used.
  Jit the result for speed (tracing happens on every un-jitted call).

  ``backend`` (``"auto"|"xla"|"pallas"``) is passed to every quantized matmul
  (:func:`jaxbnb.qdot_general`): it picks the kernels, never the answer.
  """
  _backend.check(backend)

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=_is_special)
    if not any(_is_special(leaf) for leaf in leaves):
      return fn(*args, **kwargs)
    is_arr = [_is_special(x) or isinstance(x, (jax.Array, np.ndarray)) for x in leaves]
    arrays = [x for x, a in zip(leaves, is_arr) if a]

    def flat_fn(*vals):
      it = iter(vals)
      full = [next(it) if a else x for x, a in zip(leaves, is_arr)]
      a, k = jax.tree.unflatten(treedef, full)
      return fn(*a, **k)

    specs = [jax.ShapeDtypeStruct(x.full_shape if is_quantized(x) else x.shape, x.dtype)
             for x in arrays]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*specs)
    inputs = [_QRef(x) if is_quantized(x) else x for x in arrays]
    outs = _eval(closed.jaxpr, closed.consts, inputs, backend)
    outs = [o.materialize("return") if isinstance(o, _QRef) else o for o in outs]
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return wrapped


def _eval(jaxpr, consts, args, backend):
  env: dict = {}

  def read(v):
    if isinstance(v, jex_core.Literal):
      return v.val
    x = env[v]
    if is_offloaded(x):  # a host-offloaded leaf comes to the device at its first use
      x = env[v] = x.dequantize()
    return x

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a in zip(jaxpr.invars, args):
    env[v] = a
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if any(isinstance(x, _QRef) for x in invals):
      outvals = _quantized_rule(eqn, invals, backend)
    else:
      with eqn.ctx.manager:
        outvals = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      if not eqn.primitive.multiple_results:
        outvals = [outvals]
    for v, val in zip(eqn.outvars, outvals):
      env[v] = val
  return [read(v) for v in jaxpr.outvars]


def _quantized_rule(eqn, invals, backend):
  name = eqn.primitive.name
  if name in ("pjit", "jit", "closed_call", "core_call"):
    inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
    if hasattr(inner, "jaxpr"):
      return _eval(inner.jaxpr, inner.consts, invals, backend)
    return _eval(inner, (), invals, backend)
  if name in ("checkpoint", "remat", "remat2"):
    inner = eqn.params["jaxpr"]
    body = lambda *vals: _eval(inner, (), list(vals), backend)
    return jax.checkpoint(body, prevent_cse=eqn.params.get("prevent_cse", True),
                          policy=eqn.params.get("policy"))(*invals)
  if name == "convert_element_type":
    ref = invals[0]
    return [dataclasses.replace(ref, dtype=np.dtype(eqn.params["new_dtype"]))]
  if name in ("copy", "copy_p", "optimization_barrier") and len(invals) == 1:
    return [invals[0]]
  if name == "transpose":
    ref = invals[0]
    perm = tuple(eqn.params["permutation"])
    base = ref.perm or tuple(range(ref.full_ndim))
    return [dataclasses.replace(ref, perm=tuple(base[p] for p in perm))]
  if name == "dot_general" and sum(isinstance(x, _QRef) for x in invals) == 1:
    try:
      return [_dot(*invals, eqn.params["dimension_numbers"], eqn.outvars[0].aval.dtype,
                   backend)]
    except NotImplementedError:  # e.g. a product that contracts a stack axis: the fallback
      pass
  if name in _STACK_RULES and isinstance(invals[0], _QRef) and invals[0].n_stack:
    out = _STACK_RULES[name](eqn, invals, backend)
    if out is not None:
      return out
  if name in _CONTROL_RULES:
    out = _CONTROL_RULES[name](eqn, invals, backend)
    if out is not None:
      return out
  if name == "gather" and isinstance(invals[0], _QRef):
    rows = _row_gather(eqn, *invals)
    if rows is not None:
      return [rows]
  vals = [x.materialize(name) if isinstance(x, _QRef) else x for x in invals]
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*vals, **eqn.primitive.get_bind_params(eqn.params))
  return out if eqn.primitive.multiple_results else [out]


def _dot(lhs, rhs, dimension_numbers, out_dtype, backend):
  """``dot_general(lhs, rhs)`` where one operand is a view (``_QRef``) of a weight."""
  (lc, rc), (lb, rb) = dimension_numbers
  w_is_lhs = isinstance(lhs, _QRef)
  ref, x = (lhs, rhs) if w_is_lhs else (rhs, lhs)
  wc, wb = (lc, lb) if w_is_lhs else (rc, rb)
  perm = ref.perm or tuple(range(ref.full_ndim))
  # Map the contracting/batch axes of the view back onto the logical array's axes.
  wc_log = tuple(perm[i] for i in wc)
  wb_log = tuple(perm[i] for i in wb)
  wfree_view = [i for i in range(len(perm)) if i not in wc and i not in wb]
  want = [perm[i] for i in wfree_view]          # logical axes in the order the view has them
  have = sorted(want)                           # the order a logical-layout dot produces
  if w_is_lhs:
    dims = ((wc_log, tuple(rc)), (wb_log, tuple(rb)))
  else:
    dims = ((tuple(lc), wc_log), (tuple(lb), wb_log))
  y = _logical_dot(x, ref.leaf, dims, w_is_lhs, out_dtype, backend)
  if want != have:
    nb, nw = len(wb), len(want)
    nx = y.ndim - nb - nw
    start = nb if w_is_lhs else nb + nx
    order = [have.index(a) for a in want]
    axes = list(range(y.ndim))
    axes[start:start + nw] = [start + o for o in order]
    y = jnp.transpose(y, axes)
  return y


def _logical_dot(x, leaf, dims, w_is_lhs, out_dtype, backend):
  """dot_general of ``x`` with a weight's logical array; adapters (``lora_dot``) add theirs."""
  if hasattr(leaf, "lora_dot"):
    y = _logical_dot(x, leaf.base, dims, w_is_lhs, jnp.float32, backend)
    return (y + leaf.lora_dot(x, dims, w_is_lhs, out_dtype)).astype(out_dtype)
  if not is_quantized(leaf):  # a frozen float base (16-bit LoRA)
    w = jax.lax.stop_gradient(leaf).astype(x.dtype)
    lhs, rhs = (w, x) if w_is_lhs else (x, w)
    return jax.lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32).astype(
        out_dtype)
  lhs, rhs = (leaf, x) if w_is_lhs else (x, leaf)
  return qdot_general(lhs, rhs, dims, out_dtype=out_dtype, backend=backend)


def _row_gather(eqn, ref: _QRef, indices):
  """``table[ids]`` on a (rows, ...) quantized table: dequantize only the rows read."""
  leaf = ref.leaf
  dn = eqn.params["dimension_numbers"]
  slice_sizes = tuple(eqn.params["slice_sizes"])
  if (ref.perm is not None or ref.n_stack or leaf.transposed or leaf.ndim != 2
      or tuple(dn.collapsed_slice_dims) != (0,) or tuple(dn.start_index_map) != (0,)
      or slice_sizes != (1, leaf.shape[1]) or tuple(dn.offset_dims) != (indices.ndim - 1,)
      or getattr(dn, "operand_batching_dims", ()) or indices.shape[-1] != 1):
    return None
  n_cols = leaf.matrix_shape[1]
  bs = getattr(getattr(leaf, "state", None), "blocksize", 1)
  if n_cols % bs:
    return None
  rows = jnp.clip(indices[..., 0], 0, leaf.shape[0] - 1)
  return leaf.dequantize_rows(rows, ref.view_dtype).astype(eqn.outvars[0].aval.dtype)


# --- stacked weights: slicing the stack, control flow, grouped products ------------------------


def _outputs(vals, why):
  """Values leaving a control-flow body: packed views are dequantized (with the warning)."""
  return [v.materialize(why) if isinstance(v, _QRef) else v for v in vals]


def _sliced_axes(ref: _QRef, shape: tuple, sizes) -> Optional[int]:
  """How many leading stack axes a slice of the view touches, if it touches only stack axes
  (and keeps every other axis whole); else None."""
  if not ref.stack_leading:
    return None
  k = max([i + 1 for i in range(len(shape)) if sizes[i] != shape[i]], default=0)
  return k if k <= ref.n_stack else None


def _stack_dynamic_slice(eqn, invals, backend):
  ref, starts = invals[0], invals[1:]
  sizes = tuple(eqn.params["slice_sizes"])
  k = _sliced_axes(ref, eqn.invars[0].aval.shape, sizes)
  if k is None:
    return None
  def cut(a):
    for i in range(k):
      a = jax.lax.dynamic_slice_in_dim(a, starts[i], sizes[i], axis=i)
    return a
  return [dataclasses.replace(ref, leaf=jax.tree.map(cut, ref.leaf))]


def _stack_slice(eqn, invals, backend):
  ref = invals[0]
  p = eqn.params
  shape = eqn.invars[0].aval.shape
  strides = p["strides"] or (1,) * len(shape)
  sizes = tuple(-(-(hi - lo) // st) for lo, hi, st in zip(p["start_indices"], p["limit_indices"],
                                                          strides))
  k = _sliced_axes(ref, shape, sizes)
  if k is None:
    return None
  cut = lambda a: a[tuple(slice(p["start_indices"][i], p["limit_indices"][i], strides[i])
                          for i in range(k))]
  return [dataclasses.replace(ref, leaf=jax.tree.map(cut, ref.leaf))]


def _stack_squeeze(eqn, invals, backend):
  ref = invals[0]
  dims = tuple(sorted(eqn.params["dimensions"]))
  if not ref.stack_leading or dims != tuple(range(len(dims))) or len(dims) > ref.n_stack:
    return None
  leaf = jax.tree.map(lambda a: a.reshape(a.shape[len(dims):]), ref.leaf)
  return [ref.unstack(len(dims), leaf)]


def _scan(eqn, invals, backend):
  p = eqn.params
  if "ft_in" in p:  # jax >= 0.11: the operands as a (consts, carry, xs) flat tree
    consts, carry, xs = map(list, p["ft_in"].update(list(invals)).unpack())
  else:
    nc, ncar = p["num_consts"], p["num_carry"]
    consts, carry, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]
  ncar = len(carry)
  if len(eqn.outvars) != len(p["jaxpr"].jaxpr.outvars):
    return None
  carry = _outputs(carry, "scan carry")
  # A stacked weight scanned over its first stack axis travels as its packed leaf: scan slices
  # every array of it, and the body sees one slice's view.
  views = [x if isinstance(x, _QRef) and x.n_stack and x.stack_leading else None for x in xs]
  xs = [x.leaf if v is not None else (x.materialize("scan") if isinstance(x, _QRef) else x)
        for x, v in zip(xs, views)]
  body_jaxpr = p["jaxpr"]
  y_views = []  # per output: the view a packed slice leaves the body as (None: an array)

  def body(c, x):
    x = [v.unstack(1, a) if v is not None else a for v, a in zip(views, x)]
    outs = _eval(body_jaxpr.jaxpr, body_jaxpr.consts, list(consts) + list(c) + x, backend)
    carry, ys = _outputs(outs[:ncar], "scan carry"), outs[ncar:]
    # A packed slice passed through as an output (nnx.scan returns its module's state) leaves
    # as its leaf: scan stacks its arrays, and it comes out a packed stack again.
    y_views[:] = [y if isinstance(y, _QRef) else None for y in ys]
    return carry, [y.leaf if isinstance(y, _QRef) else y for y in ys]

  carry, ys = jax.lax.scan(body, carry, xs, length=p["length"], reverse=p["reverse"],
                           unroll=p["unroll"])
  ys = [y if v is None else _QRef(y, None if v.perm is None else
                                  (0,) + tuple(q + 1 for q in v.perm), v.dtype)
        for v, y in zip(y_views, ys)]
  return list(carry) + list(ys)


def _while(eqn, invals, backend):
  p = eqn.params
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
  cj, bj = p["cond_jaxpr"], p["body_jaxpr"]
  cond = lambda c: _eval(cj.jaxpr, cj.consts, list(cconsts) + list(c), backend)[0]
  body = lambda c: _outputs(_eval(bj.jaxpr, bj.consts, list(bconsts) + list(c), backend),
                            "while_loop carry")
  return list(jax.lax.while_loop(cond, body, _outputs(init, "while_loop carry")))


def _cond(eqn, invals, backend):
  index, ops = invals[0], invals[1:]
  branches = [functools.partial(
      lambda br, *o: _outputs(_eval(br.jaxpr, br.consts, list(o), backend), "cond output"), br)
      for br in eqn.params["branches"]]
  return list(jax.lax.switch(index, branches, *ops))


def _ragged_dot(eqn, invals, backend):
  lhs, rhs, group_sizes = invals[:3]
  rdn = eqn.params["ragged_dot_dimension_numbers"]
  (lc, rc), (lb, rb) = rdn.dot_dimension_numbers
  if (isinstance(lhs, _QRef) or not isinstance(rhs, _QRef) or rhs.n_stack != 1
      or not rhs.stack_leading or lb or rb or tuple(rdn.lhs_ragged_dimensions) != (0,)
      or tuple(rdn.rhs_group_dimensions) != (0,) or lhs.ndim != 2 or len(invals) != 3
      or eqn.params.get("group_offset") is not None):
    return None
  out = eqn.outvars[0].aval
  dims = ((tuple(lc), tuple(c - 1 for c in rc)), ((), ()))

  def per_slice(xt, wg):
    return _dot(xt, rhs.unstack(1, wg), dims, jnp.float32, backend)
  return [stacked.ragged_dot(lhs, rhs.leaf, group_sizes, out.shape[-1], out.dtype, per_slice)]


# Rules for an op whose first operand is a packed stack (they slice it), and for ops that may
# carry a packed weight in any operand (control flow, grouped products). A rule that returns
# None leaves the op to the dequantize fallback.
_STACK_RULES = {"dynamic_slice": _stack_dynamic_slice, "slice": _stack_slice,
                "squeeze": _stack_squeeze}
_CONTROL_RULES = {"scan": _scan, "while": _while, "cond": _cond,
                  "ragged_dot_general": _ragged_dot}
