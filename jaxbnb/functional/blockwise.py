"""8-bit blockwise quantization on the dynamic map (bitsandbytes ``quantize_blockwise``).

The array is flattened row-major and cut into blocks of ``blocksize`` elements (the last one may
be partial). Each block stores its absolute maximum; each element stores the index of the code
nearest to ``x * (1 / absmax)``.

Non-finite policy: a block holding NaN or +-Inf gets a NaN absmax, so that block, and only that
block, dequantizes to NaN. With nested statistics the NaN absmax poisons its second-level block
(``blocksize`` first-level blocks for 8-bit, 256 for 4-bit); the nesting offset is the mean of
the finite absmax values only, so every other block stays exact.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb.functional import _checks
from jaxbnb.functional.codebooks import create_dynamic_map
from jaxbnb.functional.state import QuantState


def to_blocks(x: jax.Array, blocksize: int) -> jax.Array:
  """float32 ``(nblocks, blocksize)`` view of ``x`` flattened row-major, zero-padded."""
  flat = x.reshape(-1).astype(jnp.float32)
  nblocks = -(-flat.size // blocksize)
  return jnp.pad(flat, (0, nblocks * blocksize - flat.size)).reshape(nblocks, blocksize)


def block_absmax(blocks: jax.Array) -> jax.Array:
  """float32 ``(nblocks,)`` max |x| per block; NaN for a block holding any NaN or Inf."""
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  # Explicit test: XLA's vectorized CPU max does not always propagate NaN.
  bad = jnp.any(~jnp.isfinite(blocks), axis=1)
  return jnp.where(bad, jnp.nan, absmax)


def normalize(blocks: jax.Array, absmax: jax.Array) -> jax.Array:
  """``blocks / absmax`` per row, rounded as bitsandbytes does (times the reciprocal).

  An all-zero block maps to zeros (bnb's 0 * inf gives NaN codes there). Subnormal values are
  flushed to zero by XLA on CPU and GPU (as by bnb's fast-math kernels), so a block of only
  subnormals dequantizes to zeros.
  """
  safe = jnp.where(absmax == 0, jnp.float32(1), absmax)[:, None]
  return blocks * (jnp.float32(1) / safe)


def nearest_code(v: jax.Array, code: jax.Array) -> jax.Array:
  """uint8 index of the entry of the ascending 256-entry ``code`` nearest to each ``v``.

  Runs bitsandbytes' 7-step binary search (``dQuantize``), whose midpoint test misses the
  nearest code on ~0.2% of inputs, then corrects it among the pivot's neighbours. So the result
  is always a nearest code, and at exact ties it is the one bitsandbytes picks.
  """
  top = code.shape[0] - 1
  pivot = jnp.full(v.shape, top // 2, jnp.int32)
  lower_pivot = jnp.zeros(v.shape, jnp.int32)
  upper_pivot = jnp.full(v.shape, top, jnp.int32)
  # Scalars broadcast (not code[pivot]): a gather at constant indices from a constant table
  # would be constant-folded into an array the size of the input.
  val = jnp.broadcast_to(code[top // 2], v.shape)
  lower, upper = jnp.broadcast_to(code[0], v.shape), jnp.broadcast_to(code[top], v.shape)
  step = (top + 1) // 4
  while step > 0:
    right = v > val
    lower_pivot, lower = jnp.where(right, pivot, lower_pivot), jnp.where(right, val, lower)
    upper_pivot, upper = jnp.where(right, upper_pivot, pivot), jnp.where(right, upper, val)
    pivot = jnp.where(right, pivot + step, pivot - step)
    val = code[pivot]
    step //= 2
  right = v > val
  bnb = jnp.where(right, jnp.where(v > (upper + val) * 0.5, upper_pivot, pivot),
                  jnp.where(v < (lower + val) * 0.5, lower_pivot, pivot))
  best, best_err = bnb, jnp.abs(v - code[bnb])
  for cand in (pivot - 1, pivot, pivot + 1):
    cand = jnp.clip(cand, 0, top)
    err = jnp.abs(v - code[cand])
    best, best_err = jnp.where(err < best_err, cand, best), jnp.minimum(err, best_err)
  return best.astype(jnp.uint8)


def _nested_offset(absmax: jax.Array) -> jax.Array:
  # torch's mean is sum * (1/n); only finite entries count (the non-finite policy).
  finite = jnp.isfinite(absmax)
  total = jnp.sum(jnp.where(finite, absmax, 0))
  return total * (jnp.float32(1) / jnp.maximum(jnp.sum(finite), 1).astype(jnp.float32))


def nest_absmax(absmax: jax.Array, blocksize: int) -> tuple[jax.Array, jax.Array, QuantState]:
  """Double quantization: ``(uint8 codes of absmax - offset, offset, their QuantState)``."""
  offset = _nested_offset(absmax)
  qabsmax, state2 = _quantize(absmax - offset, create_dynamic_map(), blocksize, False)
  return qabsmax, offset, state2


def unnest_absmax(state: QuantState) -> jax.Array:
  """float32 ``(nblocks,)`` per-block absmax of ``state``, decoding nested statistics."""
  if not state.nested:
    return state.absmax.astype(jnp.float32)
  # The barrier keeps XLA from fusing code * absmax2 + offset into one FMA: bnb rounds twice.
  return jax.lax.optimization_barrier(_dequantize(state.absmax, state.state2)) + state.offset


def _quantize(x, code, blocksize, nested):
  blocks = to_blocks(x, blocksize)
  absmax = block_absmax(blocks)
  q = nearest_code(normalize(blocks, absmax), code)
  q = q.reshape(-1)[: x.size].reshape(x.shape)
  dtype = np.dtype(x.dtype)
  if nested:
    qabsmax, offset, state2 = nest_absmax(absmax, blocksize)
    return q, QuantState(absmax=qabsmax, code=code, offset=offset, state2=state2,
                         blocksize=blocksize, quant_type="dynamic", shape=x.shape, dtype=dtype)
  return q, QuantState(absmax=absmax, code=code, blocksize=blocksize, quant_type="dynamic",
                       shape=x.shape, dtype=dtype)


def _dequantize(q, state):
  absmax = unnest_absmax(state)
  values = state.code.astype(jnp.float32)[q.reshape(-1).astype(jnp.int32)]
  blocks = jnp.pad(values, (0, absmax.size * state.blocksize - values.size))
  out = (blocks.reshape(absmax.size, state.blocksize) * absmax[:, None]).reshape(-1)
  return out[: q.size].reshape(q.shape).astype(state.dtype)


_quantize_jit = jax.jit(_quantize, static_argnames=("blocksize", "nested"))
_dequantize_jit = jax.jit(_dequantize)


def quantize_blockwise(x: jax.Array, code: jax.Array | None = None, blocksize: int = 4096,
                       nested: bool = False) -> tuple[jax.Array, QuantState]:
  """Blockwise 8-bit quantization (bitsandbytes ``quantize_blockwise``).

  Args:
    x: floating array of any shape (float32, bfloat16, float16).
    code: ascending float32 ``(256,)`` table; default the signed dynamic map.
    blocksize: one of 64, 128, ..., 4096.
    nested: also quantize the absmax (offset = mean, 8-bit dynamic, same blocksize).

  Returns:
    ``(q, state)``: uint8 codes of ``x.shape`` and the ``QuantState``.
  """
  _checks.check_float_input(x, "quantize_blockwise")
  blocksize = _checks.check_blocksize(blocksize, _checks.BLOCKSIZES_8BIT, "quantize_blockwise")
  if code is None:
    code = create_dynamic_map(signed=True)
  x = jnp.asarray(x)
  if x.size == 0:
    raise ValueError("quantize_blockwise: x is empty")
  return _quantize_jit(x, jnp.asarray(code, jnp.float32), blocksize, bool(nested))


def dequantize_blockwise(q: jax.Array, state: QuantState | None = None, *,
                         absmax: jax.Array | None = None, code: jax.Array | None = None,
                         blocksize: int = 4096, dtype=jnp.float32) -> jax.Array:
  """Inverse of :func:`quantize_blockwise`: ``code[q] * absmax[block]`` in ``state.dtype``.

  Pass ``state``, or (as bitsandbytes allows) ``absmax`` with optional ``code``/``blocksize``.
  """
  _checks.check_uint8(q, "dequantize_blockwise")
  q = jnp.asarray(q)
  if state is None:
    if absmax is None:
      raise ValueError("dequantize_blockwise needs a QuantState or absmax=")
    blocksize = _checks.check_blocksize(blocksize, _checks.BLOCKSIZES_8BIT,
                                        "dequantize_blockwise")
    state = QuantState(absmax=jnp.asarray(absmax, jnp.float32),
                       code=create_dynamic_map() if code is None else jnp.asarray(code),
                       blocksize=blocksize, shape=q.shape, dtype=np.dtype(dtype))
  if state.absmax.shape[0] != math.ceil(q.size / state.blocksize):
    raise ValueError(
        f"dequantize_blockwise: {q.size} codes need {math.ceil(q.size / state.blocksize)} "
        f"absmax values at blocksize {state.blocksize}; the state has {state.absmax.shape[0]}")
  return _dequantize_jit(q, state)
