"""Pallas kernel: float array -> packed NF4/FP4 codes + float32 per-block absmax.

Bit-identical to ``jaxbnb.functional.fourbit.quantize_4bit`` (bitsandbytes' ``quantize_4bit``):
  * blocks of ``bs`` consecutive elements of the flattened input, the last one zero-padded;
  * ``absmax`` = max |x| of the block, NaN if the block holds a NaN or an Inf (jaxbnb's
    non-finite policy: only that block is poisoned);
  * ``v = x * (1 / absmax)`` (an all-zero block uses 1), each rounding as XLA does — on GPU
    the reciprocal is PTX ``div.rn.f32`` because Triton's own float32 ``/`` is approximate;
  * codes by bitsandbytes' CUDA decision thresholds (strict ``>``, ties to the lower code), FP4
    as a magnitude rank plus sign bit 3 (``-0.0`` for tiny negatives);
  * element ``2j`` in the HIGH nibble of byte ``j``.

Double quantization (``compress_statistics``) is *not* done here: the caller nests the
``(nblocks,)`` float32 absmax with XLA afterwards (``jaxbnb.functional.blockwise.nest_absmax``;
it needs the mean over all blocks, a grid-wide reduction, and touches 1/bs of the data).

Kernel: the input is read as a flat ``(n,)`` array, ``TB`` blocks (``TB*bs`` elements) per
program, masked past ``n`` (zeros, as the functional padding); each program writes
``TB*bs/2`` bytes and ``TB`` absmax values. Grid ``(cdiv(nblocks, TB),)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import common

# bitsandbytes' CUDA decision thresholds (dQuantizeNF4 / dQuantizeFP4), as float32; equal to
# jaxbnb.functional.fourbit's (kept here because kernels never import jaxbnb; a test compares).
NF4_THRESHOLDS = np.array([
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011], np.float32)
FP4_THRESHOLDS = np.array([0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667,
                           0.583333, 0.8333333], np.float32)
_F32_MAX = float(np.finfo(np.float32).max)


def encode_4bit(v: jax.Array, quant_type: str) -> jax.Array:
  """int32 4-bit codes of normalized float32 ``v`` (NaN -> 0); kernel- and XLA-safe (no gather)."""
  if quant_type == "nf4":
    return sum((v > jnp.float32(t)).astype(jnp.int32) for t in NF4_THRESHOLDS)
  if quant_type == "fp4":
    rank = sum((common.fabs(v) > jnp.float32(t)).astype(jnp.int32) for t in FP4_THRESHOLDS)
    code = rank ^ ((rank & 2) << 1)  # magnitude rank 0..7 -> code 0,1,6,7,4,5,2,3
    return code | jnp.where(v < 0, 8, 0)
  raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def _absmax_and_codes(xf, quant_type, interpret):
  """``(absmax (TB, 1), codes (TB, bs) int32)`` of float32 blocks ``xf (TB, bs)``."""
  mag = common.fabs(xf)
  finite = mag <= jnp.float32(_F32_MAX)  # False for NaN and +-Inf
  absmax = jnp.max(jnp.where(finite, mag, 0), axis=1, keepdims=True)
  bad = jnp.min(finite.astype(jnp.int32), axis=1, keepdims=True) == 0
  absmax = jnp.where(bad, jnp.float32(np.nan), absmax)
  safe = jnp.where(absmax == 0, jnp.float32(1), absmax)
  # 1 / absmax is subnormal (flushed: every code 0) above 2**126; there take the reciprocal of
  # absmax * 2**-64 and scale back after (powers of two: the same rounding), as the XLA path's
  # ``blockwise.reciprocal``. Elsewhere ``post`` is 1: bnb's bits.
  huge = absmax > jnp.float32(2.0**126)
  rcp = common.recip_rn(jnp.where(huge, safe * jnp.float32(2.0**-64), safe), interpret=interpret)
  post = jnp.where(huge, jnp.float32(2.0**-64), jnp.float32(1))
  return absmax, encode_4bit(xf * rcp * post, quant_type)


def _pack(codes):
  """uint8 ``(TB, bs/2)`` bytes of int32 codes ``(TB, bs)``: element 2j in the high nibble."""
  tb, bs = codes.shape
  pairs = codes.reshape(tb, bs // 2, 2)
  weight = 16 - 15 * jax.lax.broadcasted_iota(jnp.int32, (1, 1, 2), 2)  # [16, 1]
  return jnp.sum(pairs * weight, axis=-1).astype(jnp.uint8)


def _quant_kernel(x_ref, q_ref, a_ref, *, quant_type, n, nblocks, interpret):
  tb = a_ref.shape[0]
  bs = x_ref.shape[0] // tb
  b0 = pl.program_id(0) * tb
  # Mask past n (the functional core's zero padding) and past the last block (no masking of
  # overhanging tiles in Pallas' Triton lowering).
  idx = b0 * bs + jax.lax.broadcasted_iota(jnp.int32, (tb * bs,), 0)
  x = common.masked_load(x_ref, None if n % (tb * bs) == 0 else idx < n)
  absmax, codes = _absmax_and_codes(x.astype(jnp.float32).reshape(tb, bs), quant_type,
                                    interpret)
  packed = _pack(codes).reshape(tb * bs // 2)
  ragged = nblocks % tb != 0
  byte_ok = b0 * (bs // 2) + jax.lax.broadcasted_iota(jnp.int32, (tb * bs // 2,), 0)
  plt.store(q_ref, packed, mask=byte_ok < nblocks * (bs // 2) if ragged else None)
  blk = b0 + jax.lax.broadcasted_iota(jnp.int32, (tb,), 0)
  plt.store(a_ref, absmax.reshape(tb), mask=blk < nblocks if ragged else None)


def supported(n: int, blocksize: int, quant_type: str, dtype) -> bool:
  """Whether :func:`quantize_4bit` handles this input (else use the XLA path)."""
  return (n >= 1 and blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096)
          and quant_type in common.QUANT_TYPES
          and np.dtype(dtype) in (np.dtype(jnp.float32), np.dtype(jnp.bfloat16),
                                  np.dtype(jnp.float16)))


@functools.partial(jax.jit, static_argnames=("blocksize", "quant_type", "tile_elems",
                                             "interpret", "num_warps"))
def quantize_4bit(x: jax.Array, *, blocksize: int, quant_type: str, tile_elems: int = 8192,
                  interpret: bool = False, num_warps: int = 4) -> tuple[jax.Array, jax.Array]:
  """Packed 4-bit codes and per-block absmax of ``x`` (Pallas kernel).

  Args:
    x: float32/bfloat16/float16, any shape (flattened row-major).
    blocksize: power of two in 32..4096. quant_type: "nf4" | "fp4".
    tile_elems: elements per program (rounded to whole blocks, a power of two).

  Returns:
    ``(packed, absmax)``: uint8 ``(ceil(n/2),)`` (bnb's bytes; reshape/bitcast to the
    ``quant_storage`` in the caller) and float32 ``(ceil(n/bs),)``.
  """
  n = x.size
  if not supported(n, blocksize, quant_type, x.dtype):
    raise ValueError(f"quantize_4bit kernel: unsupported n={n} bs={blocksize} {quant_type} "
                     f"{x.dtype}; use the XLA path")
  nblocks = -(-n // blocksize)
  tb = common.pow2_at_most(nblocks, max(1, tile_elems // blocksize))
  packed, absmax = pl.pallas_call(
      functools.partial(_quant_kernel, quant_type=quant_type, n=n, nblocks=nblocks,
                        interpret=interpret),
      out_shape=(jax.ShapeDtypeStruct((nblocks * blocksize // 2,), jnp.uint8),
                 jax.ShapeDtypeStruct((nblocks,), jnp.float32)),
      grid=(pl.cdiv(nblocks, tb),),
      in_specs=[pl.BlockSpec((tb * blocksize,), lambda i: (i,))],
      out_specs=(pl.BlockSpec((tb * blocksize // 2,), lambda i: (i,)),
                 pl.BlockSpec((tb,), lambda i: (i,))),
      compiler_params=None if interpret else common.triton_params(num_warps, 2),
      interpret=interpret,
      name=f"quant_{quant_type}_bs{blocksize}",
  )(x.reshape(-1))
  return packed[: (n + 1) // 2], absmax


@functools.partial(jax.jit, static_argnames=("blocksize", "quant_type"))
def quantize_4bit_reference(x: jax.Array, *, blocksize: int,
                            quant_type: str) -> tuple[jax.Array, jax.Array]:
  """XLA reference of :func:`quantize_4bit` (same arguments, same bits)."""
  n = x.size
  nblocks = -(-n // blocksize)
  xf = jnp.pad(x.reshape(-1).astype(jnp.float32), (0, nblocks * blocksize - n))
  absmax, codes = _absmax_and_codes(xf.reshape(nblocks, blocksize), quant_type, True)
  return _pack(codes).reshape(-1)[: (n + 1) // 2], absmax.reshape(-1)
