"""Shared pieces of the 4-bit kernels: codebooks, nibble decode as a select tree, tiling helpers.

Triton lowering has no gather, so the 16-entry NF4/FP4 lookup is a binary tree of selects on
the nibble's bits (15 selects for NF4; 7 plus a sign flip for FP4). The same code runs in the
kernels and in their XLA references, so both decode identically bit for bit.
"""

from __future__ import annotations

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
    return jnp.where(bits[3], -mag, mag)  # -0.0 for code 8, like bnb
  raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def split_nibbles(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """int32 ``(hi, lo)`` codes of uint8 bytes: ``hi`` is element ``2j``, ``lo`` element ``2j+1``."""
  b = packed.astype(jnp.int32)
  return b >> 4, b & 15


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
