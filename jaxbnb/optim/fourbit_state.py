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

from jaxbnb.functional import blockwise as _bw
from jaxbnb.functional.codebooks import _dynamic_map_np

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
    q: uint8 ``(nblocks, block_size // 2)``, two codes per byte (high nibble first).
    absmax: float32 ``(nblocks,)``.
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
    return Rank1Moment(jnp.zeros((shape[0], -(-rest // 2)), jnp.uint8),
                       tuple(jnp.zeros((d,), jnp.float32) for d in shape), shape)
  nblocks = -(-param.size // block_size)
  return Blockwise4bit(jnp.zeros((nblocks, block_size // 2), jnp.uint8),
                       jnp.zeros((nblocks,), jnp.float32), signed, block_size, shape)


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
    values = decode(unpack(m.q), m.signed) * m.absmax[:, None]
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

  _, (q, absmax) = _bw.map_blocks(chunk, [x.reshape(-1) for x in inputs], [], [],
                                  [m.q, m.absmax], m.block_size)
  return Blockwise4bit(q, absmax, m.signed, m.block_size, m.shape)


def _row_loop(body, d0: int, rows: int, carry):
  """``body(start, r, carry)`` over row chunks ``[start, start + r)``: a tail, then a loop."""
  full, tail = divmod(d0, rows)
  if tail:
    carry = body(full * rows, tail, carry)
  if full == 1:
    carry = body(0, rows, carry)
  elif full:
    carry = jax.lax.fori_loop(0, full, lambda i, c: body(i * rows, rows, c), carry)
  return carry


def update_rank1(fn: Callable[..., jax.Array], inputs: Sequence[jax.Array],
                 m: Rank1Moment) -> Rank1Moment:
  """Like :func:`update_blockwise4` for a rank-1 moment: one pass over row chunks computes the
  new maxima, a second recomputes the new values and writes their codes in place."""
  shape = m.shape
  d0, rest = shape[0], math.prod(shape[1:])
  rows = max(1, min(d0, _bw.CHUNK // max(rest, 1)))
  ins = [x.reshape(d0, rest) for x in inputs]
  old_scale_all = m.maxes

  def new_values(start, r, ins, q):
    sl = lambda x: jax.lax.dynamic_slice_in_dim(x, start, r)
    chunk_shape = (r,) + shape[1:]
    old = decode(unpack(sl(q)), False)[:, :rest].reshape(chunk_shape)
    old = old * _rank1_scale(old_scale_all, sl(old_scale_all[0]), chunk_shape)
    xs = [sl(x).reshape(chunk_shape) for x in ins]
    return jnp.abs(_sanitize(fn(*xs, old))), chunk_shape

  def stats(start, r, carry):
    ins, q, maxes = carry
    new, chunk_shape = new_values(start, r, ins, q)
    new = jax.lax.optimization_barrier(new)
    nd = len(chunk_shape)
    row = jnp.max(new, axis=tuple(range(1, nd)))
    out = [jax.lax.dynamic_update_slice_in_dim(maxes[0], row, start, 0)]
    for k in range(1, nd):
      out.append(jnp.maximum(maxes[k], jnp.max(new, axis=tuple(a for a in range(nd) if a != k))))
    return ins, q, tuple(out)

  zeros = tuple(jnp.zeros((d,), jnp.float32) for d in shape)
  _, _, maxes = _row_loop(stats, d0, rows, (ins, m.q, zeros))

  def codes(start, r, carry):
    ins, q = carry
    new, chunk_shape = new_values(start, r, ins, q)
    new = jax.lax.optimization_barrier(new)
    scale = _rank1_scale(maxes, jax.lax.dynamic_slice_in_dim(maxes[0], start, r), chunk_shape)
    x = scaled(new, scale).reshape(r, rest)
    c = encode(x, False)
    if rest % 2:
      c = jnp.pad(c, ((0, 0), (0, 1)))
    return ins, jax.lax.dynamic_update_slice_in_dim(q, pack(c), start, 0)

  _, q = _row_loop(codes, d0, rows, (ins, m.q))
  return Rank1Moment(q, maxes, shape)


def update_moment4(fn: Callable[..., jax.Array], inputs: Sequence[jax.Array],
                   m: Moment4bit) -> Moment4bit:
  """New 4-bit moment ``fn(*inputs, old)`` (see :func:`update_blockwise4`)."""
  if isinstance(m, Rank1Moment):
    return update_rank1(fn, inputs, m)
  return update_blockwise4(fn, inputs, m)
