"""4-bit blockwise quantization: NF4 and FP4 (bitsandbytes ``quantize_4bit``).

Packing: element ``2j`` goes in the HIGH nibble of byte ``j``; an odd element count is padded
with the code of 0.0 (NF4 7, FP4 0). ``q`` has bitsandbytes' shape ``(nbytes // itemsize, 1)``
in the ``quant_storage`` dtype, which only reinterprets the same bytes.
Non-finite values follow the policy of :mod:`jaxbnb.functional.blockwise`.

Decoding is a select tree on the nibble's bits over the 16 table values as constants, never a
gather: XLA (CPU and GPU) vectorizes the tree inside any elementwise fusion, whereas a gather
becomes one scalar load per element. The two nibbles of a byte are decoded as two *planes*
(even elements from the high nibbles, odd ones from the low nibbles) so that no kernel has to
interleave them; consumers that need the natural order (``dequantize_4bit``) interleave once.
The fused matmul's row steps select among each block's 16 products ``code * absmax``, already
rounded, as integers (:func:`dequantize_planes_by_block`): the same bits, less work per element.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb.functional import _checks
from jaxbnb.functional.blockwise import nest_absmax, reciprocal, unnest_absmax
from jaxbnb.functional.codebooks import _four_bit_np, get_4bit_type
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


def encode_4bit(v: jax.Array, quant_type: str) -> jax.Array:
  """uint8 4-bit codes (0..15) of normalized values ``v`` in [-1, 1]; NaN gives code 0."""
  if quant_type == "nf4":
    # Ties go to the lower code (strict >), as bnb's decision tree does.
    return sum((v > t).astype(jnp.uint8) for t in _NF4_THRESHOLDS)
  mag = jnp.abs(v)
  rank = sum((mag > t).astype(jnp.uint8) for t in _FP4_THRESHOLDS)
  # FP4 magnitude rank (0 = 0.0 ... 7 = 1.0) -> code without sign bit: [0,1,6,7,4,5,2,3],
  # i.e. bit 2 flips where bit 1 is set (arithmetic, not a gather).
  code = rank ^ ((rank & 2) << 1)
  sign = jnp.where(v < 0, jnp.uint8(8), jnp.uint8(0))  # tiny negatives become -0 (code 8)
  return code | sign


def pack_nibbles(codes: jax.Array) -> jax.Array:
  """uint8 ``(n/2,)`` bytes from ``(n,)`` (n even) 4-bit codes, first code in the high nibble."""
  # A reduction over pairs, not strided slices + shift: XLA:CPU fuses it into the encoder's
  # loop (the strided form cost 2/3 of quantize_4bit). Exact: 16 * hi + lo < 256.
  return jnp.sum(codes.reshape(-1, 2) * jnp.array([16, 1], jnp.uint8), axis=1, dtype=jnp.uint8)


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


def _blocks(x: jax.Array, blocksize: int) -> jax.Array:
  """``(nblocks, blocksize)`` view of ``x`` flattened row-major, zero-padded, in x's dtype
  (converted to float32 inside each consumer: a shared converted copy would be materialized)."""
  flat = x.reshape(-1)
  return jnp.pad(flat, (0, -flat.size % blocksize)).reshape(-1, blocksize)


def block_absmax(blocks: jax.Array) -> jax.Array:
  """float32 ``(nblocks,)`` max |x| per block; NaN for a block holding any NaN or Inf.

  Finiteness rides on a reduction: the sum of ``x * 0`` is NaN exactly when some x is NaN or
  +-Inf. Both reductions read the input directly (no elementwise pass, and for float32 input
  no temporary); the old separate isfinite mask cost a quarter of quantize_4bit. XLA's
  vectorized CPU max alone does not always propagate NaN. (A 16-bit input still gets one
  float32 copy: XLA widens the 16-bit sum through it and shares it with the encoder.)
  """
  absmax = jnp.max(jnp.abs(blocks), axis=1).astype(jnp.float32)
  poison = jnp.sum((blocks * jnp.zeros((), blocks.dtype)).astype(jnp.float32), axis=1)
  return jnp.where(jnp.isnan(poison), jnp.float32(jnp.nan), absmax)


def _normalize(blocks: jax.Array, absmax: jax.Array) -> jax.Array:
  """``blocks / absmax`` as bitsandbytes rounds it (times the reciprocal); an all-zero block
  maps to zeros, a block with absmax > 2**126 is normalized too (:func:`reciprocal`)."""
  rcp, post = reciprocal(absmax)
  return blocks.astype(jnp.float32) * rcp[:, None] * post[:, None]


def _quantize_4bit(x, blocksize, quant_type, compress_statistics, quant_storage):
  blocks = _blocks(x, blocksize)
  absmax = block_absmax(blocks)
  codes = encode_4bit(_normalize(blocks, absmax), quant_type).reshape(-1)
  # Codes past x.size come from zero padding, i.e. they are already the code of 0.0.
  codes = codes[: x.size + x.size % 2]
  q = _to_storage(pack_nibbles(codes), np.dtype(quant_storage))
  common = dict(code=get_4bit_type(quant_type), blocksize=blocksize, quant_type=quant_type,
                shape=x.shape, dtype=np.dtype(x.dtype))
  if compress_statistics:
    qabsmax, offset, state2 = nest_absmax(absmax, 256)
    return q, QuantState(absmax=qabsmax, offset=offset, state2=state2, **common)
  return q, QuantState(absmax=absmax, **common)


@functools.lru_cache(maxsize=None)
def decode_table(quant_type: str) -> np.ndarray:
  """float32 ``(16,)`` values of the 16 codes as bnb's decoder gives them (host NumPy).

  For FP4 bit 3 is a sign applied to the magnitude, so code 8 is -0.0 (the table holds +0.0).
  """
  table = _four_bit_np(quant_type).astype(np.float32)
  if quant_type == "fp4":
    table = np.concatenate([table[:8], -np.abs(table[:8])]).astype(np.float32)
  return table


def _select_tree(bits, leaves):
  """``leaves[code]`` for the code whose bits (least significant first) are ``bits``."""
  level = list(leaves)
  for b in bits:
    level = [jnp.where(b, hi, lo) for lo, hi in zip(level[0::2], level[1::2])]
  return level[0]


def decode_nibbles(packed: jax.Array, quant_type: str, high: bool) -> jax.Array:
  """float32 table values of the high (or low) nibbles of uint8 ``packed``, any shape.

  Tests the byte's bits in place (no shift, no gather); XLA fuses it with what follows.
  """
  table = decode_table(quant_type)
  shift = 4 if high else 0
  bits = [(packed & np.uint8(1 << (shift + i))) != 0 for i in range(4)]
  if quant_type == "fp4":  # 7 selects and a sign instead of 15 selects
    mag = _select_tree(bits[:3], [np.float32(v) for v in np.abs(table[:8])])
    # A multiply, not a negation, so that code 8 gives -0.0 on every backend.
    return mag * jnp.where(bits[3], np.float32(-1), np.float32(1))
  return _select_tree(bits, [np.float32(v) for v in table])


def dequantize_planes(packed: jax.Array, absmax: jax.Array, quant_type: str, blocksize: int,
                      dtype) -> tuple[jax.Array, jax.Array]:
  """Whole blocks of a packed stream, as two planes of ``code * absmax`` rounded to ``dtype``.

  Args:
    packed: uint8 ``(nblocks * blocksize / 2,)`` bytes of whole blocks.
    absmax: float32 ``(nblocks,)``.

  Returns:
    ``(even, odd)``, each ``(nblocks * blocksize / 2,)`` in ``dtype``: the block elements
    ``2j`` (high nibbles) and ``2j + 1`` (low nibbles).
  """
  p = packed.reshape(-1, blocksize // 2)
  a = absmax.astype(jnp.float32)[:, None]
  even = (decode_nibbles(p, quant_type, True) * a).astype(dtype)
  odd = (decode_nibbles(p, quant_type, False) * a).astype(dtype)
  return even.reshape(-1), odd.reshape(-1)


def dequantize_planes_by_block(packed: jax.Array, absmax: jax.Array, quant_type: str,
                               blocksize: int, dtype) -> tuple[jax.Array, jax.Array]:
  """:func:`dequantize_planes`, bit for bit, by selecting among each block's 16 products.

  A ``(nblocks, 16)`` table of ``code * absmax`` rounded to ``dtype`` is built first (as the
  unsigned integers of its bits: 1/4 of the planes' bytes for a 16-bit dtype), then the tree
  selects in those integers: no multiply and no rounding per element, and 16-bit lanes for a
  16-bit dtype (half the vector work of float32 selects). For the fused matmul's row steps,
  whose tables are small; a whole-matrix decode would hold the table as a temporary.
  """
  dt = np.dtype(dtype)
  bits_dt = {2: jnp.uint16, 4: jnp.uint32}[dt.itemsize]
  table = decode_table(quant_type).copy()
  if quant_type == "fp4":
    table[8] = -0.0  # bnb's decoder gives -0.0 for code 8 (a sign on a zero magnitude)
  p = packed.reshape(-1, blocksize // 2)
  a = absmax.astype(jnp.float32)[:, None]
  values = jax.lax.bitcast_convert_type((jnp.asarray(table)[None, :] * a).astype(dt), bits_dt)
  leaves = [values[:, c:c + 1] for c in range(16)]

  def plane(high):
    shift = 4 if high else 0
    bits = [(p & np.uint8(1 << (shift + i))) != 0 for i in range(4)]
    return jax.lax.bitcast_convert_type(_select_tree(bits, leaves), dt).reshape(-1)
  return plane(True), plane(False)


def decode_4bit(packed: jax.Array, code: jax.Array, quant_type: str) -> jax.Array:
  """float32 ``(2 * nbytes,)`` table values of packed uint8 bytes, as bnb's decoder gives them.

  ``code`` is not read: bnb's decoders use the fixed table of ``quant_type``
  (:func:`decode_table`), which is what ``state.code`` holds.
  """
  del code
  return jnp.stack([decode_nibbles(packed, quant_type, True),
                    decode_nibbles(packed, quant_type, False)], axis=-1).reshape(-1)


def _dequantize_4bit(q, state):
  n = int(np.prod(state.shape, dtype=np.int64))
  absmax = unnest_absmax(state)
  nbytes = absmax.size * state.blocksize // 2
  packed = storage_bytes(q)[:nbytes]
  packed = jnp.pad(packed, (0, nbytes - packed.size))  # a partial last block
  even, odd = dequantize_planes(packed, absmax, state.quant_type, state.blocksize, state.dtype)
  # One interleave of the two planes, after the rounding to state.dtype (half the bytes).
  out = jnp.stack([even, odd], axis=-1).reshape(-1)
  return out[:n].reshape(state.shape)


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
    quant_storage: dtype of ``q`` (uint8, or a wider whole-byte int/float dtype over the same
      bytes; sub-byte dtypes such as ``jnp.int4`` raise ``ValueError``).

  Returns:
    ``(q, state)``: packed ``(ceil(ceil(n/2) / itemsize), 1)`` array and its ``QuantState``.
  """
  _checks.check_float_input(x, "quantize_4bit")
  blocksize = _checks.check_blocksize(blocksize, _checks.BLOCKSIZES_4BIT, "quantize_4bit")
  quant_type = _checks.check_quant_type(quant_type)
  storage = _checks.check_storage(quant_storage, "quantize_4bit")
  x = jnp.asarray(x)
  if x.size == 0:
    raise ValueError("quantize_4bit: x is empty")
  return _quantize_4bit_jit(x, blocksize, quant_type, bool(compress_statistics), storage)


def dequantize_4bit(q: jax.Array, state: QuantState) -> jax.Array:
  """Inverse of :func:`quantize_4bit`: array of ``state.shape`` and ``state.dtype``.

  A state that does not fit ``q`` (another array's, an 8-bit one, an edited blocksize, a
  truncated absmax) raises ``ValueError``; so do codes of the wrong size.
  """
  if not isinstance(state, QuantState):
    raise TypeError("dequantize_4bit needs the QuantState returned by quantize_4bit")
  n = int(np.prod(state.shape, dtype=np.int64))
  _checks.check_state(state, n, 4, "dequantize_4bit")
  q = jnp.asarray(q)
  _checks.check_storage(q.dtype, "dequantize_4bit")
  # quantize_4bit writes ceil(n / 2) bytes, padded to whole storage words; bnb's wider
  # storage truncates to whole words instead (codes it drops are refused here too).
  nbytes, need = q.size * q.dtype.itemsize, -(-n // 2)
  if not need <= nbytes < need + q.dtype.itemsize:
    raise ValueError(
        f"dequantize_4bit: the state's shape {tuple(state.shape)} needs {need} bytes of codes "
        f"({n} values); q holds {nbytes} ({q.dtype} {q.shape}): pass the codes and the "
        "QuantState that quantize_4bit returned together")
  return _dequantize_4bit_jit(q, state)
