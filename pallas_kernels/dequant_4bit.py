"""Pallas kernel: packed NF4/FP4 codes + float32 per-block absmax -> dense values.

Layout (bitsandbytes ``dequantize_4bit``): byte ``j`` holds element ``2j`` in its HIGH nibble and
``2j+1`` in its low nibble; block ``b`` is elements ``[b*bs, (b+1)*bs)`` scaled by ``absmax[b]``.
Nested (double-quantized) absmax must be decoded to float32 by the caller first (it is
``nblocks`` floats, 1/bs of the traffic; the XLA decode is exact and cheap).

Kernel: the bytes are viewed as ``(nblocks, bs/2)`` and the absmax as ``(nblocks, 1)``; each
program takes ``TB`` whole blocks (``TB*bs/2`` bytes, read once), splits the nibbles, decodes each
with the select tree, multiplies by its block's absmax in float32 (the same single rounding as
the functional core), interleaves hi/lo (``stack`` + ``reshape`` = Triton ``join``) and writes a
``(TB, bs)`` tile in the output dtype. Grid: ``(cdiv(nblocks, TB),)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import common


def _dequant_kernel(q_ref, a_ref, o_ref, *, quant_type):
  hi, lo = common.split_nibbles(q_ref[...])          # (TB, bs/2) int32 each
  absmax = a_ref[...]                                # (TB, 1) float32
  v_hi = common.decode_4bit(hi, quant_type) * absmax
  v_lo = common.decode_4bit(lo, quant_type) * absmax
  out = jnp.stack([v_hi, v_lo], axis=-1).reshape(o_ref.shape)  # interleave: 2j hi, 2j+1 lo
  o_ref[...] = out.astype(o_ref.dtype)


def _block_bytes(packed: jax.Array, nblocks: int, blocksize: int) -> jax.Array:
  """uint8 ``(nblocks, bs/2)``: the packed bytes, padded with zero codes or trimmed."""
  need = nblocks * blocksize // 2
  packed = packed.reshape(-1)
  packed = packed[:need] if packed.size >= need else jnp.pad(packed, (0, need - packed.size))
  return packed.reshape(nblocks, blocksize // 2)


@functools.partial(jax.jit, static_argnames=("n", "blocksize", "quant_type", "out_dtype",
                                             "tile_bytes", "interpret", "num_warps"))
def dequantize_4bit(packed: jax.Array, absmax: jax.Array, *, n: int, blocksize: int,
                    quant_type: str, out_dtype=jnp.float32, tile_bytes: int = 8192,
                    interpret: bool = False, num_warps: int = 4) -> jax.Array:
  """Dense ``(n,)`` values in ``out_dtype`` from 4-bit codes (Pallas kernel).

  Args:
    packed: uint8 ``(>= ceil(n/2),)`` packed codes (any shape; flattened).
    absmax: float32 ``(nblocks,)`` with ``nblocks = ceil(n / blocksize)``.
    n: number of elements; blocksize: power of two in 32..4096; quant_type: "nf4" | "fp4".
    tile_bytes: packed bytes per program (rounded to whole blocks, a power of two).
    interpret: run in Pallas interpret mode (CPU).
  """
  nblocks = absmax.size
  half = blocksize // 2
  q = _block_bytes(packed, nblocks, blocksize)
  tb = common.pow2_at_most(nblocks, max(1, tile_bytes // half))
  out = pl.pallas_call(
      functools.partial(_dequant_kernel, quant_type=quant_type),
      out_shape=jax.ShapeDtypeStruct((nblocks, blocksize), np.dtype(out_dtype)),
      grid=(pl.cdiv(nblocks, tb),),
      in_specs=[pl.BlockSpec((tb, half), lambda i: (i, 0)),
                pl.BlockSpec((tb, 1), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((tb, blocksize), lambda i: (i, 0)),
      compiler_params=None if interpret else common.triton_params(num_warps, 2),
      interpret=interpret,
      name=f"dequant_{quant_type}_bs{blocksize}",
  )(q, absmax.reshape(nblocks, 1).astype(jnp.float32))
  return out.reshape(-1)[:n]


@functools.partial(jax.jit, static_argnames=("n", "blocksize", "quant_type", "out_dtype"))
def dequantize_4bit_reference(packed: jax.Array, absmax: jax.Array, *, n: int, blocksize: int,
                              quant_type: str, out_dtype=jnp.float32) -> jax.Array:
  """XLA reference of :func:`dequantize_4bit` (same arguments, same bits)."""
  nblocks = absmax.size
  hi, lo = common.split_nibbles(_block_bytes(packed, nblocks, blocksize))
  a = absmax.reshape(nblocks, 1).astype(jnp.float32)
  v = jnp.stack([common.decode_4bit(hi, quant_type) * a,
                 common.decode_4bit(lo, quant_type) * a], axis=-1)
  return v.reshape(-1)[:n].astype(out_dtype)
