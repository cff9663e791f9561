"""Pallas kernel: packed NF4/FP4 codes + per-block absmax -> dense values.

Layout (bitsandbytes ``dequantize_4bit``): byte ``j`` holds element ``2j`` in its HIGH nibble and
``2j+1`` in its low nibble; block ``b`` is elements ``[b*bs, (b+1)*bs)`` scaled by ``absmax[b]``.
The absmax is float32 ``(nblocks,)`` or a :class:`common.NestedAbsmax` (double quantization),
decoded in-kernel bit-identically to jaxbnb's ``unnest_absmax`` (see ``common``).

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
from jax.experimental.pallas import triton as plt

from pallas_kernels import common


def _dequant_kernel(q_ref, a_ref, *rest, quant_type, nblocks, group, interpret):
  *nested_refs, o_ref = rest
  tb, half = q_ref.shape
  block = pl.program_id(0) * tb + jax.lax.broadcasted_iota(jnp.int32, (tb, 1), 0)
  # Pallas' Triton lowering does not mask a tile that overhangs the array: do it here.
  ok = None if nblocks % tb == 0 else block < nblocks
  q = common.masked_load(q_ref, None if ok is None else jnp.broadcast_to(ok, (tb, half)))
  hi, lo = common.split_nibbles(q)                   # (TB, bs/2) int32 each
  absmax = common.masked_load(a_ref, ok)             # (TB, 1) float32, or uint8 codes if nested
  if nested_refs:
    absmax = common.decode_nested(absmax, block, *nested_refs, group=group, interpret=interpret)
  v_hi = common.decode_4bit(hi, quant_type) * absmax
  v_lo = common.decode_4bit(lo, quant_type) * absmax
  out = jnp.stack([v_hi, v_lo], axis=-1).reshape(o_ref.shape)  # interleave: 2j hi, 2j+1 lo
  plt.store(o_ref, out.astype(o_ref.dtype),
            mask=None if ok is None else jnp.broadcast_to(ok, o_ref.shape))


def _block_bytes(packed: jax.Array, nblocks: int, blocksize: int) -> jax.Array:
  """uint8 ``(nblocks, bs/2)``: the packed bytes, padded with zero codes or trimmed."""
  need = nblocks * blocksize // 2
  packed = packed.reshape(-1)
  packed = packed[:need] if packed.size >= need else jnp.pad(packed, (0, need - packed.size))
  return packed.reshape(nblocks, blocksize // 2)


def _absmax_operands(absmax, nblocks):
  """``(first-level (nblocks, 1) operand, extra whole-array operands)`` of f32 or nested absmax."""
  if isinstance(absmax, common.NestedAbsmax):
    return absmax.codes.reshape(nblocks, 1).astype(jnp.uint8), common.nested_operands(absmax)
  return absmax.reshape(nblocks, 1).astype(jnp.float32), ()


def _whole(a):
  return pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)


@functools.partial(jax.jit, static_argnames=("n", "blocksize", "quant_type", "out_dtype",
                                             "tile_bytes", "interpret", "num_warps",
                                             "absmax_group"))
def dequantize_4bit(packed: jax.Array, absmax, *, n: int, blocksize: int,
                    quant_type: str, out_dtype=jnp.float32, tile_bytes: int = 8192,
                    interpret: bool = False, num_warps: int = 8,
                    absmax_group: int = common.NESTED_GROUP) -> jax.Array:
  """Dense ``(n,)`` values in ``out_dtype`` from 4-bit codes (Pallas kernel).

  Args:
    packed: uint8 ``(>= ceil(n/2),)`` packed codes (any shape; flattened).
    absmax: float32 ``(nblocks,)`` with ``nblocks = ceil(n / blocksize)``, or a
      :class:`common.NestedAbsmax` whose ``codes`` are ``(nblocks,)``.
    n: number of elements; blocksize: power of two in 32..4096; quant_type: "nf4" | "fp4".
    tile_bytes: packed bytes per program (rounded to whole blocks, a power of two).
    num_warps: 8 keeps the default tile at 64 output values a thread (their int32 codes and
      float32 values live at once would exceed a thread's 255 registers at 128).
    interpret: run in Pallas interpret mode (CPU).
    absmax_group: first-level blocks per ``absmax2`` entry of a nested absmax.
  """
  nblocks = (absmax.codes if isinstance(absmax, common.NestedAbsmax) else absmax).size
  half = blocksize // 2
  q = _block_bytes(packed, nblocks, blocksize)
  tb = common.pow2_at_most(nblocks, max(1, tile_bytes // half))
  a, extra = _absmax_operands(absmax, nblocks)
  out = pl.pallas_call(
      functools.partial(_dequant_kernel, quant_type=quant_type, nblocks=nblocks,
                        group=absmax_group,
                        interpret=interpret),
      out_shape=jax.ShapeDtypeStruct((nblocks, blocksize), np.dtype(out_dtype)),
      grid=(pl.cdiv(nblocks, tb),),
      in_specs=[pl.BlockSpec((tb, half), lambda i: (i, 0)),
                pl.BlockSpec((tb, 1), lambda i: (i, 0)), *map(_whole, extra)],
      out_specs=pl.BlockSpec((tb, blocksize), lambda i: (i, 0)),
      compiler_params=None if interpret else common.triton_params(num_warps, 2),
      interpret=interpret,
      name=f"dequant_{quant_type}_bs{blocksize}{'_dq' if extra else ''}",
  )(q, a, *extra)
  return out.reshape(-1)[:n]


def absmax_reference(absmax, group: int = common.NESTED_GROUP) -> jax.Array:
  """float32 ``(nblocks,)`` of a float or nested absmax (XLA; what the kernels decode)."""
  if isinstance(absmax, common.NestedAbsmax):
    return common.decode_nested_reference(absmax, group=group)
  return absmax.reshape(-1).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("n", "blocksize", "quant_type", "out_dtype",
                                             "absmax_group"))
def dequantize_4bit_reference(packed: jax.Array, absmax, *, n: int, blocksize: int,
                              quant_type: str, out_dtype=jnp.float32,
                              absmax_group: int = common.NESTED_GROUP) -> jax.Array:
  """XLA reference of :func:`dequantize_4bit` (same arguments, same bits)."""
  absmax = absmax_reference(absmax, absmax_group)
  nblocks = absmax.size
  hi, lo = common.split_nibbles(_block_bytes(packed, nblocks, blocksize))
  a = absmax.reshape(nblocks, 1).astype(jnp.float32)
  v = jnp.stack([common.decode_4bit(hi, quant_type) * a,
                 common.decode_4bit(lo, quant_type) * a], axis=-1)
  return v.reshape(-1)[:n].astype(out_dtype)
