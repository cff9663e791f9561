"""4-bit optimizer state: the moments of Li et al. 2023, "Memory Efficient Optimizers with 4-bit
States" (NeurIPS 2023; reference code thu-ml/low-bit-optimizers, "lpmm").

Two layouts, both two 4-bit codes per byte (element ``2j`` in the high nibble, as bitsandbytes
packs 4-bit weights):

* :class:`Blockwise4bit`: blocks of ``block_size`` consecutive elements of the flattened leaf
  (128 in the paper), one float32 absmax per block. Signed moments use the 4-bit
  dynamic-exponent map (:data:`SIGNED_4BIT`, bitsandbytes' ``create_dynamic_map(True, 3, 4)``:
  0 and 7 levels each side); non-negative ones the linear map without zero (:data:`LINEAR_4BIT`,
  ``(k + 1) / 16``).
* :class:`Rank1Moment`: a non-negative moment (Adam's ``v``) of a leaf with ``ndim >= 2``, scaled
  per element by ``min_k M_k[i_k]``, where ``M_k`` is the max over every axis but ``k`` (the
  paper's rank-1 normalization: an outlier only coarsens its own row and column), codes on the
  linear map without zero.

Why no zero for ``v``: Adam divides by ``sqrt(v)``; a ``v`` rounded to 0 turns the update into
``m / eps`` (the paper's zero-point problem). ``(k + 1) / 16`` rounds small values up instead.

Bytes per element: 0.5 + 4 / block_size (blockwise) or 0.5 + 4 * sum(shape) / size (rank-1).
Updates run chunk by chunk in loops, like the 8-bit moments (``jaxbnb.optim.state``): the
blockwise layout through ``map_blocks``, the rank-1 layout in two passes over row chunks (the new
maxima first, then the codes), so a step's temporaries do not grow with the leaf.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb import _explicit
from jaxbnb.functional import blockwise as _bw
from jaxbnb.functional.codebooks import _dynamic_map_np
from jaxbnb.optim import _blocks

_F32_MAX = float(np.finfo(np.float32).max)

#: float32 (16,) ascending: the signed 4-bit dynamic-exponent map (0 and +-0.0055 ... 1).
SIGNED_4BIT = np.unique(_dynamic_map_np(True, 3, 4)).astype(np.float32)
#: float32 (16,): the linear map without zero, ``(k + 1) / 16``.
LINEAR_4BIT = ((np.arange(16) + 1) / 16).astype(np.float32)
_SIGNED_MIDS = ((SIGNED_4BIT[1:].astype(np.float64) + SIGNED_4BIT[:-1]) / 2).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Blockwise4bit:
  """One moment in 4 bits, blockwise.

  Attributes:
    q: uint8 ``(*blocks, block_size // 2)``, two codes per byte (high nibble first).
    absmax: float32 ``blocks``: ``(nblocks,)``, or for a stack of matrices whose slices are
      whole blocks ``(*shape[:k], blocks per slice)`` (``jaxbnb.optim._blocks.blocks_shape``).
    signed: dynamic-exponent map (True) or the linear map without zero (static).
    block_size: elements per block (static).
    shape: the leaf's shape (static).
  """

  q: jax.Array
  absmax: jax.Array
  signed: bool = True
  block_size: int = 128
  shape: tuple = ()

  @property
  def nbytes(self) -> int:
    return int(self.q.nbytes + self.absmax.nbytes)


@dataclasses.dataclass(frozen=True)
class Rank1Moment:
  """A non-negative moment in 4 bits with rank-1 normalization.

  Attributes:
    q: uint8 ``(shape[0], ceil(prod(shape[1:]) / 2))``, two codes per byte along each row.
    maxes: tuple of float32 ``(shape[k],)``: max of the moment over every axis but ``k``.
    shape: the leaf's shape (static).
  """

  q: jax.Array
  maxes: tuple
  shape: tuple = ()

  @property
  def nbytes(self) -> int:
    return int(self.q.nbytes + sum(m.nbytes for m in self.maxes))


for _cls, _data, _meta in ((Blockwise4bit, ["q", "absmax"], ["signed", "block_size", "shape"]),
                           (Rank1Moment, ["q", "maxes"], ["shape"])):
  jax.tree_util.register_dataclass(_cls, data_fields=_data, meta_fields=_meta)

Moment4bit = Union[Blockwise4bit, Rank1Moment]


def is_4bit(x) -> bool:
  return isinstance(x, (Blockwise4bit, Rank1Moment))


# --- codes -----------------------------------------------------------------------------------


def encode(x: jax.Array, signed: bool) -> jax.Array:
  """uint8 index (0..15) of the nearest code to normalized float32 ``x`` (|x| <= 1)."""
  if signed:
    # 15 independent compares against the midpoints: fused elementwise, no gather chain.
    return sum((x > m).astype(jnp.uint8) for m in _SIGNED_MIDS)
  return jnp.clip(jnp.round(x * 16) - 1, 0, 15).astype(jnp.uint8)


def decode(codes: jax.Array, signed: bool) -> jax.Array:
  """float32 values of uint8 codes (0..15)."""
  if not signed:
    return (codes.astype(jnp.float32) + 1) * (1 / 16)
  return jnp.asarray(SIGNED_4BIT).at[codes.astype(jnp.int32)].get(mode="promise_in_bounds")


def pack(codes: jax.Array) -> jax.Array:
  """``(..., 2k)`` codes -> ``(..., k)`` bytes, element ``2j`` in the high nibble."""
  pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
  return (pairs[..., 0] << 4) | pairs[..., 1]


def unpack(q: jax.Array) -> jax.Array:
  """``(..., k)`` bytes -> ``(..., 2k)`` codes."""
  return jnp.stack([q >> 4, q & 15], axis=-1).reshape(*q.shape[:-1], 2 * q.shape[-1])


def _sanitize(x: jax.Array) -> jax.Array:
  # Saturate instead of overflowing: an inf would make its block's (or row's) scale inf.
  return jnp.clip(jnp.nan_to_num(x.astype(jnp.float32), nan=0.0), -_F32_MAX, _F32_MAX)


# --- layouts ---------------------------------------------------------------------------------


def use_rank1(shape: tuple, block_size: int) -> bool:
  """Rank-1 when ``ndim >= 2`` and its maxima take no more bytes than blockwise absmax would
  (thin leaves, e.g. (1, n), would need a maximum per element)."""
  size = math.prod(shape)
  return len(shape) >= 2 and size > 0 and sum(shape) * block_size <= size


def init_moment4(param: jax.Array, *, signed: bool, block_size: int,
                 rank1: bool = False) -> Moment4bit:
  """A 4-bit moment of zeros for ``param`` (every layout reads back 0 from zero scales)."""
  shape = tuple(param.shape)
  if rank1 and not signed and use_rank1(shape, block_size):
    rest = math.prod(shape[1:])
    # Placed like a concrete sharded param: rows of codes follow its axis 0 (when no later axis
    # is sharded), each maximum its own axis.
    q = _blocks.place(jnp.zeros((shape[0], -(-rest // 2)), jnp.uint8), param,
                      lambda _, s: (_explicit.leading(s, tuple(range(len(s)))), None))
    maxes = tuple(_blocks.place(jnp.zeros((d,), jnp.float32), param, lambda _, s, k=k: (s[k],))
                  for k, d in enumerate(shape))
    return Rank1Moment(q, maxes, shape)
  return Blockwise4bit(_blocks.zeros_blocks(param, block_size, (block_size // 2,), jnp.uint8),
                       _blocks.zeros_blocks(param, block_size), signed, block_size, shape)


def _rank1_scale(maxes: Sequence[jax.Array], rows: jax.Array, chunk_shape: tuple) -> jax.Array:
  """float32 ``min_k M_k`` over a chunk of rows ``(r, *shape[1:])``; ``rows``: M_0 there."""
  nd = len(chunk_shape)
  scale = rows.reshape((-1,) + (1,) * (nd - 1))
  for k in range(1, nd):
    shape = [1] * nd
    shape[k] = chunk_shape[k]
    scale = jnp.minimum(scale, maxes[k].reshape(shape))
  return scale


def read_moment4(m: Moment4bit) -> jax.Array:
  """float32 values of a 4-bit moment, the leaf's shape (elementwise: fuses into consumers)."""
  n = math.prod(m.shape)
  if isinstance(m, Blockwise4bit):
    values = decode(unpack(m.q), m.signed) * m.absmax[..., None]
    if values.size == n:  # whole blocks: a reshape that keeps the carried leading axes
      return values.reshape(m.shape)
    return values.reshape(-1)[:n].reshape(m.shape)
  rest = n // m.shape[0] if m.shape[0] else 0
  values = decode(unpack(m.q), False)[:, :rest].reshape(m.shape)
  return values * _rank1_scale(m.maxes, m.maxes[0], m.shape)


def scaled(x: jax.Array, scale: jax.Array) -> jax.Array:
  """``x / scale`` (``scale`` >= 0 broadcastable to ``x``; 0 where it is 0), also where
  ``1 / scale`` is subnormal (``scale`` > 2**126): XLA computes a division as a product with the
  reciprocal and flushes subnormals, which would read such blocks back as all zeros. There both
  are scaled by 2**-32 first (a factor hidden from the simplifier, which would cancel it)."""
  tiny = jax.lax.optimization_barrier(jnp.float32(2.0**-32))
  big = scale > 2.0**126
  scale = jnp.where(big, scale * tiny, jnp.where(scale == 0, 1.0, scale))
  return jnp.where(big, x * tiny, x) * (1 / scale)


def _quantize_blocks(new: jax.Array, signed: bool, valid) -> tuple[jax.Array, jax.Array]:
  """``(packed codes (r, bs/2), absmax (r,))`` of float32 blocks ``(r, bs)``."""
  new = _sanitize(new)
  if valid is not None:
    new = jnp.where(valid, new, 0.0)
  absmax = jnp.max(jnp.abs(new), axis=1)
  return pack(encode(scaled(new, absmax[:, None]), signed)), absmax


def update_blockwise4(fn: Callable[..., jax.Array], inputs: Sequence[jax.Array],
                      m: Blockwise4bit) -> Blockwise4bit:
  """``fn(*inputs, old value) -> new value`` (elementwise, float32) stored as ``m`` is, chunk by
  chunk (``map_blocks``), in place in ``m``'s buffers."""
  ni = len(inputs)

  def chunk(valid, *xs):
    ins, q, absmax = xs[:ni], xs[ni], xs[ni + 1]
    old = decode(unpack(q), m.signed) * absmax[:, None]
    # The barrier keeps the new values in one buffer read by the absmax and the codes.
    new = jax.lax.optimization_barrier(fn(*ins, old))
    q2, a2 = _quantize_blocks(new, m.signed, valid)
    return [], [q2, a2]

  _, (q, absmax) = _blocks.map_grouped(chunk, [x.reshape(-1) for x in inputs], [],
                                       [m.q.reshape(-1, m.q.shape[-1]), m.absmax.reshape(-1)],
                                       m.block_size)
  return Blockwise4bit(q.reshape(m.q.shape), absmax.reshape(m.absmax.shape), m.signed,
                       m.block_size, m.shape)


def _rank1_view(shape: tuple) -> tuple[int, int, tuple, bool]:
  """``(A, B, T, stacked)``: the loop of a rank-1 update walks axis ``B`` of the leaf viewed
  as ``(A, B, *T)``, each step taking a chunk of it for every ``A``. A stack (``ndim >= 3``,
  even ``prod(shape[2:])``) walks axis 1 with the whole axis 0 (``A, B = shape[:2]``); other
  leaves walk their rows in ``A`` contiguous groups (``jaxbnb.optim._blocks``). Either way a
  sharding of axis 0 into whole groups keeps the loop local to each device."""
  if len(shape) >= 3 and math.prod(shape[2:]) % 2 == 0:
    return shape[0], shape[1], tuple(shape[2:]), True
  rest = max(math.prod(shape[1:]), 1)
  groups = math.gcd(shape[0], max(1, _bw.CHUNK // rest))
  return groups, shape[0] // groups, tuple(shape[1:]), False


def _rank1_scale_at(maxes: Sequence[jax.Array], start, r: int, view: tuple) -> jax.Array:
  """float32 ``min_k M_k`` over the chunk ``[:, start:start + r]`` of the ``(A, B, *T)`` view,
  broadcastable to ``(A, r, *T)``."""
  a, b, t, stacked = view
  nd = 2 + len(t)
  along = lambda v, axis: v.reshape([v.shape[0] if i == axis else 1 for i in range(nd)])
  if stacked:  # maxes[k] runs along axis k of the view; the chunk cuts maxes[1]
    factors = [along(maxes[0], 0), along(jax.lax.dynamic_slice_in_dim(maxes[1], start, r), 1)]
    factors += [along(m, k) for k, m in enumerate(maxes) if k >= 2]
  else:  # rows are (A, B): maxes[0] viewed so; maxes[k] runs along axis k + 1
    rows = jax.lax.dynamic_slice_in_dim(maxes[0].reshape(a, b), start, r, 1)
    factors = [rows.reshape((a, r) + (1,) * len(t))]
    factors += [along(m, k + 1) for k, m in enumerate(maxes) if k >= 1]
  scale = factors[0]
  for f in factors[1:]:
    scale = jnp.minimum(scale, f)
  return scale


def _chunk_loop(body, b: int, step: int, carry):
  """``body(start, r, carry)`` over chunks ``[start, start + r)`` of ``b``: a tail, then a
  loop."""
  full, tail = divmod(b, step)
  if tail:
    carry = body(full * step, tail, carry)
  if full == 1:
    carry = body(0, step, carry)
  elif full:
    carry = jax.lax.fori_loop(0, full, lambda i, c: body(i * step, step, c), carry)
  return carry


def update_rank1(fn: Callable[..., jax.Array], inputs: Sequence[jax.Array],
                 m: Rank1Moment) -> Rank1Moment:
  """Like :func:`update_blockwise4` for a rank-1 moment: one pass over chunks computes the
  new maxima, a second recomputes the new values and writes their codes in place. The chunks
  follow :func:`_rank1_view`, so a leaf sharded over axis 0 is updated shard by shard."""
  shape = m.shape
  view = a, b, t, stacked = _rank1_view(shape)
  tsize = math.prod(t)
  step = max(1, min(b, _bw.CHUNK // max(a * tsize, 1)))
  ins = [x.reshape(a, b, *t) for x in inputs]
  q_view = m.q.reshape(a, b, -1)
  nd = 2 + len(t)

  def new_values(start, r, ins, q):
    sl = lambda x: jax.lax.dynamic_slice_in_dim(x, start, r, 1)
    old = decode(unpack(sl(q)), False)[..., :tsize].reshape((a, r) + t)
    old = old * _rank1_scale_at(m.maxes, start, r, view)
    return jnp.abs(_sanitize(fn(*map(sl, ins), old)))

  def stats(start, r, carry):
    ins, q, maxes = carry
    new = jax.lax.optimization_barrier(new_values(start, r, ins, q))
    over = lambda *keep: jnp.max(new, axis=tuple(i for i in range(nd) if i not in keep))
    if stacked:
      out = [jnp.maximum(maxes[0], over(0)),
             jax.lax.dynamic_update_slice_in_dim(maxes[1], over(1), start, 0)]
      out += [jnp.maximum(mk, over(k)) for k, mk in enumerate(maxes) if k >= 2]
    else:
      rows = jax.lax.dynamic_update_slice_in_dim(maxes[0].reshape(a, b), over(0, 1), start, 1)
      out = [rows.reshape(-1)]
      out += [jnp.maximum(mk, over(k + 1)) for k, mk in enumerate(maxes) if k >= 1]
    return ins, q, tuple(out)

  zeros = tuple(jnp.zeros((d,), jnp.float32) for d in shape)
  _, _, maxes = _chunk_loop(stats, b, step, (ins, q_view, zeros))

  def codes(start, r, carry):
    ins, q = carry
    new = jax.lax.optimization_barrier(new_values(start, r, ins, q))
    x = scaled(new, _rank1_scale_at(maxes, start, r, view)).reshape(a, r, tsize)
    c = encode(x, False)
    if tsize % 2:
      c = jnp.pad(c, ((0, 0), (0, 0), (0, 1)))
    return ins, jax.lax.dynamic_update_slice_in_dim(q, pack(c), start, 1)

  _, q = _chunk_loop(codes, b, step, (ins, q_view))
  return Rank1Moment(q.reshape(m.q.shape), maxes, shape)


def update_moment4(fn: Callable[..., jax.Array], inputs: Sequence[jax.Array],
                   m: Moment4bit) -> Moment4bit:
  """New 4-bit moment ``fn(*inputs, old)`` (see :func:`update_blockwise4`)."""
  if isinstance(m, Rank1Moment):
    return update_rank1(fn, inputs, m)
  return update_blockwise4(fn, inputs, m)
