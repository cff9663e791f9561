"""Where the blocks of a blockwise optimizer-state leaf live: which of its parameter's leading
axes the stored state carries, a chunked update loop that no device shard boundary cuts, and the
shardings that follow the parameter's.

Layout. Blocks are runs of ``block_size`` consecutive elements of the parameter flattened
row-major (bitsandbytes' layout). A vector or a matrix keeps bitsandbytes' flat per-block
arrays, ``(nblocks,)``. A leaf with ``ndim >= 3`` (a stack of matrices: scanned layers, MoE
experts) whose slices along its leading axes are whole blocks keeps those axes:
``(*shape[:k], blocks per slice)``, so indexing, ``lax.scan`` and a sharding over the stack axis
apply to its state as to the parameter. The blocks and their values are the same either way
(a reshape); where a slice would split a block the state stays flat.

Loop. An update runs blocks chunk by chunk in a loop (few MiB of temporaries on XLA:CPU, see
``jaxbnb.functional.blockwise.map_blocks``). A loop that walks the flat block axis slices every
device's shard of a sharded leaf, so the SPMD partitioner gathers the whole state first. Here
the blocks are viewed as ``(G, R)``: ``G`` contiguous groups (``gcd(nblocks, chunk //
block_size, 64)``) and the loop walks ``R``, each step taking a chunk of
every group. A leaf sharded over its leading axis into ``n`` runs of whole blocks (``n``
dividing ``G``) then updates locally, shard by shard; a finer sharding makes XLA move blocks.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxbnb import _explicit
from jaxbnb.functional import blockwise as _bw


def lead_axes(shape: Sequence[int], block_size: int) -> int:
  """How many leading axes of a leaf of ``shape`` its blockwise state carries: for
  ``ndim >= 3`` the most, up to ``ndim - 2``, whose slices are whole blocks; else 0."""
  for k in range(len(shape) - 2, 0, -1):
    if math.prod(shape[k:]) % block_size == 0:
      return k
  return 0


def blocks_shape(shape: Sequence[int], block_size: int) -> tuple[int, ...]:
  """Shape of the per-block arrays (absmax) of a leaf: ``(*shape[:k], blocks per slice)``."""
  k = lead_axes(shape, block_size)
  return tuple(shape[:k]) + (-(-math.prod(shape[k:]) // block_size),)


# At most 64 groups: each step then reads runs of >= 8 whole blocks per group (one block per
# group at 512 groups made a 2048^2 adamw8bit step ~20% slower, 2026-11-27), and shardings of
# up to 64 devices over the leading axis stay local.
_MAX_GROUPS = 64


def map_grouped(fn: Callable, elems: Sequence[jax.Array], out_elems: Sequence[jax.Array],
                out_blocks: Sequence[jax.Array], block_size: int,
                chunk: Optional[int] = None) -> tuple[list, list]:
  """``jaxbnb.functional.blockwise.map_blocks(fn, elems, [], out_elems, out_blocks,
  block_size)``, looping so that no shard of a leading-axis sharding is cut (module
  docstring). ``elems``, ``out_elems``: flat ``(n,)``; ``out_blocks``: ``(nblocks, ...)``.
  A size that is not a whole number of blocks takes ``map_blocks``' flat loop."""
  chunk = chunk or _bw.CHUNK
  n = (list(elems) + list(out_elems))[0].shape[0]
  if n % block_size or n <= chunk:
    return _bw.map_blocks(fn, elems, [], out_elems, out_blocks, block_size, chunk)
  nblocks = n // block_size
  groups = math.gcd(nblocks, _MAX_GROUPS, max(1, chunk // block_size))
  per_group = nblocks // groups
  view = lambda x: x.reshape(groups, per_group, *x.shape[1:])
  args = ([view(x.reshape(-1, block_size)) for x in elems],
          ([view(x.reshape(-1, block_size)) for x in out_elems], [view(b) for b in out_blocks]))
  step = max(1, chunk // (groups * block_size))
  loop = functools.partial(_grouped_loop, fn, per_group)
  # As map_blocks: XLA:GPU/TPU fuse each reduction with its producers, one step is best there.
  _, (oe, ob) = jax.lax.platform_dependent(
      *args, cpu=functools.partial(loop, step), default=functools.partial(loop, per_group))
  return [x.reshape(-1) for x in oe], [x.reshape(-1, *x.shape[2:]) for x in ob]


def _grouped_loop(fn, per_group, step, ins, outs):
  """Steps of ``step`` blocks of every group over ``(groups, per_group, ...)`` views."""

  def run(start, length, ins, outs):
    rows = lambda x: jax.lax.dynamic_slice_in_dim(x, start, length, 1).reshape(
        -1, *x.shape[2:])
    res_e, res_b = fn(None, *map(rows, ins), *map(rows, outs[0]), *map(rows, outs[1]))
    put = lambda o, x: jax.lax.dynamic_update_slice_in_dim(
        o, x.reshape(o.shape[0], length, *o.shape[2:]).astype(o.dtype), start, 1)
    return ins, ([put(o, x) for o, x in zip(outs[0], res_e)],
                 [put(o, x) for o, x in zip(outs[1], res_b)])

  full, tail = divmod(per_group, step)
  carry = (ins, outs)
  if tail:  # first, so that the loop then updates the buffers it created, in place
    carry = run(full * step, tail, *carry)
  if full == 1:
    carry = run(0, step, *carry)
  elif full:
    # The inputs ride in the carry, as in map_blocks (typing under an Explicit mesh).
    carry = jax.lax.fori_loop(0, full, lambda i, c: run(i * step, step, *c), carry)
  return carry


# --- shardings -----------------------------------------------------------------------------


def block_spec(mesh, shape: Sequence[int], spec: Sequence[Any],
               block_size: int) -> tuple[Any, ...]:
  """PartitionSpec entries of the per-block axes (:func:`blocks_shape`) of a leaf of ``shape``
  sharded ``spec``: the carried leading axes keep their shards; the block axis follows the
  first remaining axis's shards when every device's run of whole rows is whole blocks (and no
  later axis is sharded), else it is replicated."""
  spec = tuple(spec) + (None,) * (len(shape) - len(spec))
  k = lead_axes(shape, block_size)
  inner, ispec = tuple(shape[k:]), spec[k:]
  size = math.prod(inner)
  n_rows = inner[0] if inner else 1
  rows = _explicit.leading(ispec, tuple(range(len(inner))))
  nblocks = -(-size // block_size)
  block_axis = _explicit.stream(mesh, rows, n_rows, size // n_rows if n_rows else 0, nblocks,
                                block_size) if size else None
  return spec[:k] + (block_axis,)


def concrete_sharding(param) -> Optional[NamedSharding]:
  """``param``'s NamedSharding when it is a concrete array on an Auto-axes mesh (an Explicit
  mesh is handled by ``jaxbnb._explicit``; a tracer's sharding is not known here)."""
  if isinstance(param, jax.core.Tracer):
    return None
  sharding = getattr(param, "sharding", None)
  if not isinstance(sharding, NamedSharding) or getattr(sharding.mesh, "explicit_axes", ()):
    return None
  return sharding


def place(x: jax.Array, param, spec: Callable[[Any, tuple], tuple]) -> jax.Array:
  """``x`` (a state array of ``param``) put on ``param``'s mesh with PartitionSpec
  ``spec(mesh, param's spec padded to its ndim)`` when ``param`` is a concrete array sharded
  on an Auto mesh; else ``x`` as it is."""
  sharding = concrete_sharding(param)
  if sharding is None or sharding.mesh.size == 1:
    return x
  pspec = tuple(sharding.spec) + (None,) * (param.ndim - len(sharding.spec))
  return jax.device_put(x, NamedSharding(sharding.mesh, P(*spec(sharding.mesh, pspec))))


def zeros_blocks(param, block_size: int, tail: tuple = (), dtype=jnp.float32) -> jax.Array:
  """Zeros ``(*blocks_shape, *tail)`` sharded like ``param``'s blocks (see :func:`place`)."""
  shape = blocks_shape(param.shape, block_size)
  return place(jnp.zeros(shape + tuple(tail), dtype), param,
               lambda mesh, s: block_spec(mesh, param.shape, s, block_size)
               + (None,) * len(tail))
