"""Shared pieces of the 4-bit kernels: codebooks, nibble decode as a select tree, nested-absmax
decode, exactly rounded float ops, tiling helpers.

The 16-entry NF4/FP4 lookup is a binary tree of selects on the nibble's bits (15 selects for
NF4; 7 plus a sign flip for FP4): per weight it is cheaper than a memory gather, and the same
code runs in the kernels and in their XLA references, so both decode identically bit for bit.

Nested (double-quantized) absmax is decoded in-kernel from bnb's storage: uint8 code ``c`` of
block ``b``, float32 ``absmax2[b // 256]``, float32 ``offset`` and the 256-entry dynamic map.
There the lookup *is* a gather, ``code_ref[c]``: Pallas lowers a ref indexed by an integer array
to a Triton pointer-tensor load (one 4-byte load per block, i.e. per 32..4096 weights, from a
1 KiB table that stays in L1). The value is ``code[c] * absmax2`` rounded once, *then*
``+ offset``, like bitsandbytes (and jaxbnb's ``unnest_absmax``): :func:`mul_rn` keeps the
compiler from contracting the two into an FMA.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# bitsandbytes' 4-bit tables in code order, as float32 (equal to
# jaxbnb.functional.codebooks.get_4bit_type; kept here because kernels never import jaxbnb).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
# FP4 (E2M1 / 12) magnitudes of codes 0..7; bit 3 is the sign (code 8 decodes to -0.0 as in
# bnb's CUDA dDequantizeFP4Tree).
FP4_MAG = (np.array([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0], np.float32)
           / np.float32(12.0)).astype(np.float32)
QUANT_TYPES = ("nf4", "fp4")
NESTED_GROUP = 256  # first-level blocks per absmax2 entry (bnb's 4-bit double quantization)


class NestedAbsmax(NamedTuple):
  """Double-quantized per-block absmax, as bitsandbytes stores it (a pytree of arrays).

  ``absmax[b] = code[codes[b]] * absmax2[b // group] + offset`` (two roundings, no FMA), with
  ``group`` = :data:`NESTED_GROUP` unless a kernel is told otherwise.

  Attributes:
    codes: uint8 ``(nblocks,)`` 8-bit dynamic-map codes (``state.absmax`` of a nested state).
    absmax2: float32 ``(ceil(nblocks / group),)`` (``state.state2.absmax``).
    offset: float32 scalar (``state.offset``).
    code: float32 ``(256,)`` the second-level table (``state.state2.code``).
  """
  codes: jax.Array
  absmax2: jax.Array
  offset: jax.Array
  code: jax.Array


def nested_operands(nested: NestedAbsmax):
  """The kernel operands of ``nested``: ``(absmax2 f32 (G,), offset f32 (1,), code f32 (256,))``."""
  return (nested.absmax2.reshape(-1).astype(jnp.float32),
          jnp.asarray(nested.offset, jnp.float32).reshape(1),
          nested.code.reshape(-1).astype(jnp.float32))


def matrix_absmax_operands(absmax, n_rows: int, nb: int):
  """``(a, extra)`` for a matmul kernel over an ``(n_rows, nb blocks)`` weight: ``a`` the
  per-block scales as ``(n_rows, nb)`` (float32, or the uint8 nested codes), ``extra`` the
  nested-absmax operands (empty when not nested)."""
  if isinstance(absmax, NestedAbsmax):
    a = absmax.codes.reshape(-1)[: n_rows * nb].reshape(n_rows, nb).astype(jnp.uint8)
    return a, nested_operands(absmax)
  return absmax.reshape(-1)[: n_rows * nb].reshape(n_rows, nb).astype(jnp.float32), ()


def mul_rn(a: jax.Array, b: jax.Array, *, interpret: bool) -> jax.Array:
  """float32 ``a * b`` rounded once and never fused into a following add.

  GPU (Triton): PTX ``mul.rn.f32`` — an explicit rounding mode forbids FMA contraction.
  Interpret mode (XLA): an optimization barrier, as in jaxbnb's ``unnest_absmax``.
  """
  if interpret:
    return jax.lax.optimization_barrier(a * b)
  a, b = jnp.broadcast_arrays(a.astype(jnp.float32), b.astype(jnp.float32))
  from jax.experimental.pallas import triton as plt  # pylint: disable=g-import-not-at-top
  [r] = plt.elementwise_inline_asm("mul.rn.f32 $0, $1, $2;", args=[a, b],
                                   constraints="=f,f,f", pack=1,
                                   result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, a.dtype)])
  return r


def recip_rn(a: jax.Array, *, interpret: bool) -> jax.Array:
  """float32 ``1 / a`` correctly rounded (IEEE), as XLA computes it.

  Triton lowers float32 ``/`` to the approximate ``div.full.f32`` (up to 2 ulp), which would
  change quantization codes; PTX ``div.rn.f32`` is the IEEE division XLA emits.
  """
  a = a.astype(jnp.float32)
  if interpret:
    return jnp.float32(1) / a
  from jax.experimental.pallas import triton as plt  # pylint: disable=g-import-not-at-top
  one = jnp.ones_like(a)
  [r] = plt.elementwise_inline_asm("div.rn.f32 $0, $1, $2;", args=[one, a],
                                   constraints="=f,f,f", pack=1,
                                   result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, a.dtype)])
  return r


def fabs(x: jax.Array) -> jax.Array:
  """float32 ``|x|`` by clearing the sign bit: exact for every input, subnormals included.

  Pallas' Triton lowering calls libdevice ``__nv_fabsf`` for ``jnp.abs``, whose result
  depends on the NVVM reflect flag ``__CUDA_FTZ`` (flush-to-zero: ``|subnormal| = 0``) that the
  GPU compiler, not the kernel, chooses; the bit mask cannot flush and matches XLA's ``abs``.
  """
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jax.lax.bitcast_convert_type(bits & jnp.int32(0x7FFFFFFF), jnp.float32)


def isfinite(x: jax.Array) -> jax.Array:
  """bool ``x`` is neither NaN nor +-Inf, via :func:`fabs` (``jnp.isfinite`` lowers through
  libdevice ``__nv_fabsf`` in Pallas' Triton backend)."""
  return fabs(x) <= jnp.float32(np.finfo(np.float32).max)


def decode_nested(codes: jax.Array, block_index: jax.Array, absmax2_ref, offset_ref, code_ref,
                  *, group: int, interpret: bool) -> jax.Array:
  """float32 absmax of blocks ``block_index`` (int32, global) from their uint8 ``codes``.

  Inside a kernel: ``absmax2_ref`` ``(G,)``, ``offset_ref`` ``(1,)``, ``code_ref`` ``(256,)``
  are whole-array refs; both lookups are gathers (clamped, so masked-out tail lanes never read
  out of bounds). Bit-identical to ``unnest_absmax``: ``code[c] * absmax2`` rounded, then
  ``+ offset`` rounded.
  """
  ngroups = absmax2_ref.shape[0]
  dyn = code_ref[codes.astype(jnp.int32)]
  a2 = absmax2_ref[jnp.minimum(block_index // group, ngroups - 1)]
  return mul_rn(dyn, a2, interpret=interpret) + offset_ref[0]


def decode_nested_reference(nested: NestedAbsmax, *, group: int = NESTED_GROUP) -> jax.Array:
  """XLA reference of :func:`decode_nested` over all blocks: float32 ``(nblocks,)``."""
  codes = nested.codes.reshape(-1).astype(jnp.int32)
  a2, off, code = nested_operands(nested)
  idx = jnp.arange(codes.size, dtype=jnp.int32) // group
  return jax.lax.optimization_barrier(code[codes] * a2[idx]) + off[0]


def _tree(bits, table):
  """Select ``table[code]`` with bits ``bits[0]`` (LSB) ... of the code; ``len(table)`` = 2^k."""
  level = [jnp.float32(v) for v in table]
  for b in bits:
    level = [jnp.where(b, hi, lo) for lo, hi in zip(level[0::2], level[1::2])]
  return level[0]


def decode_4bit(codes: jax.Array, quant_type: str) -> jax.Array:
  """float32 values of 4-bit ``codes`` (any int dtype, values 0..15, any shape)."""
  c = codes.astype(jnp.int32)
  bits = [(c & (1 << i)) != 0 for i in range(4)]
  if quant_type == "nf4":
    return _tree(bits, NF4_CODE)
  if quant_type == "fp4":
    mag = _tree(bits[:3], FP4_MAG)
    # A multiply, not ``-mag``: Pallas' Triton lowering emits negation as ``0 - x``, which
    # turns code 8 into +0.0 on GPU; ``x * -1.0`` flips the sign of zero too (-0.0, like bnb).
    return mag * jnp.where(bits[3], jnp.float32(-1), jnp.float32(1))
  raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def split_nibbles(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """int32 ``(hi, lo)`` codes of uint8 bytes: ``hi`` is element ``2j``, ``lo`` element ``2j+1``."""
  b = packed.astype(jnp.int32)
  return b >> 4, b & 15


def masked_load(ref, mask):
  """``ref[...]``, with lanes where ``mask`` is False read as 0 (``mask`` None: unmasked).

  Pallas' Triton lowering does not mask a block that overhangs its array, so kernels mask
  ragged edges themselves (interpret mode pads instead, which hides a missing mask).
  """
  from jax.experimental.pallas import triton as plt  # pylint: disable=g-import-not-at-top
  if mask is None:
    return plt.load(ref)
  return plt.load(ref, mask=mask, other=0)


def pow2_divisor(n: int, cap: int) -> int:
  """Largest power of two that divides ``n`` and is <= ``cap`` (>= 1)."""
  d = 1
  while d * 2 <= cap and n % (d * 2) == 0:
    d *= 2
  return d


def pow2_at_most(n: int, cap: int) -> int:
  """Largest power of two <= ``min(n, cap)`` (>= 1): a Triton block dim covering up to ``n``."""
  d = 1
  while d * 2 <= min(n, cap):
    d *= 2
  return d


def next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def triton_params(num_warps: int = 4, num_stages: int = 2):
  """Compiler params that select Pallas' Triton backend on GPU (jax 0.11 defaults to Mosaic)."""
  from jax.experimental.pallas import triton as plt  # pylint: disable=g-import-not-at-top
  return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)
