"""4-bit blockwise quantization: NF4 and FP4 (bitsandbytes ``quantize_4bit``).

Packing: element ``2j`` goes in the HIGH nibble of byte ``j``; an odd element count is padded
with the code of 0.0 (NF4 7, FP4 0). ``q`` has bitsandbytes' shape ``(nbytes // itemsize, 1)``
in the ``quant_storage`` dtype, which only reinterprets the same bytes.
Non-finite values follow the policy of :mod:`jaxbnb.functional.blockwise`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb.functional import _checks
from jaxbnb.functional.blockwise import (block_absmax, nest_absmax, normalize, to_blocks,
                                         unnest_absmax)
from jaxbnb.functional.codebooks import get_4bit_type
from jaxbnb.functional.state import QuantState

# Decision thresholds of bitsandbytes' CUDA kernels (dQuantizeNF4 / dQuantizeFP4), as the float
# literals written there: x above threshold k picks the next level. They are the midpoints of
# the tables except where bnb's literal is shorter (0.583333f); using them keeps every byte equal.
_NF4_THRESHOLDS = np.array([
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011], np.float32)
_FP4_THRESHOLDS = np.array([0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667,
                            0.583333, 0.8333333], np.float32)
# FP4 magnitude rank (0 = 0.0 ... 7 = 1.0) -> code without sign bit.
_FP4_RANK_TO_CODE = np.array([0, 1, 6, 7, 4, 5, 2, 3], np.uint8)


def encode_4bit(v: jax.Array, quant_type: str) -> jax.Array:
  """uint8 4-bit codes (0..15) of normalized values ``v`` in [-1, 1]; NaN gives code 0."""
  if quant_type == "nf4":
    # Ties go to the lower code (strict >), as bnb's decision tree does.
    return sum((v > t).astype(jnp.uint8) for t in _NF4_THRESHOLDS)
  mag = jnp.abs(v)
  rank = sum((mag > t).astype(jnp.int32) for t in _FP4_THRESHOLDS)
  sign = jnp.where(v < 0, jnp.uint8(8), jnp.uint8(0))  # tiny negatives become -0 (code 8)
  return jnp.asarray(_FP4_RANK_TO_CODE)[rank] | sign


def pack_nibbles(codes: jax.Array) -> jax.Array:
  """uint8 ``(ceil(n/2),)`` bytes from ``(n,)`` 4-bit codes, first code in the high nibble."""
  pairs = codes.reshape(-1, 2)
  return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: jax.Array) -> jax.Array:
  """uint8 ``(2 * nbytes,)`` codes from packed bytes (inverse of :func:`pack_nibbles`)."""
  return jnp.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)


def storage_bytes(q: jax.Array) -> jax.Array:
  """The bytes of ``q`` (any ``quant_storage`` dtype) as uint8 ``(nbytes,)``."""
  if q.dtype == jnp.uint8:
    return q.reshape(-1)
  return jax.lax.bitcast_convert_type(q, jnp.uint8).reshape(-1)


def _to_storage(packed: jax.Array, storage: np.dtype) -> jax.Array:
  itemsize = storage.itemsize
  if itemsize == 1:
    return jax.lax.bitcast_convert_type(packed, storage).reshape(-1, 1)
  # Pad to whole storage words (bnb would truncate; we never drop a code).
  packed = jnp.pad(packed, (0, -packed.size % itemsize))
  return jax.lax.bitcast_convert_type(packed.reshape(-1, itemsize), storage).reshape(-1, 1)


def _quantize_4bit(x, blocksize, quant_type, compress_statistics, quant_storage):
  blocks = to_blocks(x, blocksize)
  absmax = block_absmax(blocks)
  codes = encode_4bit(normalize(blocks, absmax), quant_type).reshape(-1)
  # Codes past x.size come from zero padding, i.e. they are already the code of 0.0.
  codes = codes[: x.size + x.size % 2]
  q = _to_storage(pack_nibbles(codes), np.dtype(quant_storage))
  common = dict(code=get_4bit_type(quant_type), blocksize=blocksize, quant_type=quant_type,
                shape=x.shape, dtype=np.dtype(x.dtype))
  if compress_statistics:
    qabsmax, offset, state2 = nest_absmax(absmax, 256)
    return q, QuantState(absmax=qabsmax, offset=offset, state2=state2, **common)
  return q, QuantState(absmax=absmax, **common)


def decode_4bit(packed: jax.Array, code: jax.Array, quant_type: str) -> jax.Array:
  """float32 ``(2 * nbytes,)`` table values of packed uint8 bytes, as bnb's decoder gives them."""
  codes = unpack_nibbles(packed).astype(jnp.int32)
  values = code.astype(jnp.float32)[codes]
  if quant_type == "fp4":  # bnb's FP4 decoder applies bit 3 as a sign: code 8 is -0.0
    values = jnp.where(codes >= 8, -jnp.abs(values), values)
  return values


def _dequantize_4bit(q, state):
  n = int(np.prod(state.shape, dtype=np.int64))
  absmax = unnest_absmax(state)
  values = decode_4bit(storage_bytes(q), state.code, state.quant_type)[:n]
  values = jnp.pad(values, (0, absmax.size * state.blocksize - n))
  out = values.reshape(absmax.size, state.blocksize) * absmax[:, None]
  return out.reshape(-1)[:n].reshape(state.shape).astype(state.dtype)


_quantize_4bit_jit = jax.jit(
    _quantize_4bit,
    static_argnames=("blocksize", "quant_type", "compress_statistics", "quant_storage"))
_dequantize_4bit_jit = jax.jit(_dequantize_4bit)


def quantize_4bit(x: jax.Array, blocksize: int = 64, quant_type: str = "fp4",
                  compress_statistics: bool = False,
                  quant_storage=jnp.uint8) -> tuple[jax.Array, QuantState]:
  """Blockwise 4-bit quantization (bitsandbytes ``quantize_4bit``).

  Args:
    x: floating array of any shape (float32, bfloat16, float16).
    blocksize: one of 32, 64, ..., 4096.
    quant_type: ``"nf4"`` or ``"fp4"``.
    compress_statistics: double quantization: absmax becomes 8-bit dynamic codes of
      ``absmax - mean(absmax)`` in blocks of 256 (QLoRA's 4.127 bits/param at blocksize 64).
    quant_storage: dtype of ``q`` (uint8, or a wider dtype over the same bytes).

  Returns:
    ``(q, state)``: packed ``(ceil(ceil(n/2) / itemsize), 1)`` array and its ``QuantState``.
  """
  _checks.check_float_input(x, "quantize_4bit")
  blocksize = _checks.check_blocksize(blocksize, _checks.BLOCKSIZES_4BIT, "quantize_4bit")
  quant_type = _checks.check_quant_type(quant_type)
  x = jnp.asarray(x)
  if x.size == 0:
    raise ValueError("quantize_4bit: x is empty")
  return _quantize_4bit_jit(x, blocksize, quant_type, bool(compress_statistics),
                            np.dtype(quant_storage))


def dequantize_4bit(q: jax.Array, state: QuantState) -> jax.Array:
  """Inverse of :func:`quantize_4bit`: array of ``state.shape`` and ``state.dtype``."""
  if not isinstance(state, QuantState):
    raise TypeError("dequantize_4bit needs the QuantState returned by quantize_4bit")
  _checks.check_quant_type(state.quant_type)
  q = jnp.asarray(q)
  n = int(np.prod(state.shape, dtype=np.int64))
  if q.size * q.dtype.itemsize * 2 < n:
    raise ValueError(
        f"dequantize_4bit: q holds {q.size * q.dtype.itemsize * 2} codes, the state's shape "
        f"{state.shape} needs {n}")
  return _dequantize_4bit_jit(q, state)
