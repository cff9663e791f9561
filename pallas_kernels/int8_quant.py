"""Pallas kernel: LLM.int8() vector-wise activation quantization, with its XLA reference.

Semantics (bitsandbytes ``int8_vectorwise_quant``, as ``jaxbnb.functional.int8``): ``x`` is
``(M, K)`` rows; with ``threshold > 0`` an element with ``|x| >= threshold`` is an outlier, left
out of its row's absmax, and every column holding one is an outlier column whose codes are 0.
``codes = clip(round_half_even(x * (127 * (1 / absmax))), -127, 127)``; a row whose absmax is
0, NaN or makes the scale non-finite gets zero codes (a NaN in a row's inliers makes its absmax
NaN: only that row dequantizes to NaN).

Kernel (one pass over ``x``): grid ``(cdiv(M, BM),)``; program ``i`` owns ``BM`` whole rows,
padded to ``KP = next_pow2(K)`` columns by masked loads (Triton blocks are powers of two and
``K`` need not be). It walks its rows ``BR`` at a time (``BR * KP`` values in registers), and for
each finds the inlier absmax, writes the codes, and ORs the rows' outlier elements into a
``(KP,)`` column mask carried in registers; at the end it writes that partial mask, one row of
a ``(cdiv(M, BM), KP)`` int8 array that XLA ORs (tiny: ``K`` bytes per ``BM`` rows).

Where the outlier columns get zeroed: the kernel cannot, since a column's status depends on
rows other programs own. The codes it writes are therefore *raw* (outlier columns not yet
zeroed). :func:`int8_vectorwise_quant` zeroes them with one fused XLA select (bit-equal to the
functional core); the int8 GEMM (``int8_matmul.py``) instead takes the raw codes and the column
mask and zeroes the columns of each A tile as it loads it, which costs a select per tile and no
extra pass over the codes in HBM.

Rounding: Triton lowering has no ``round``, and the ``v + 1.5 * 2**23 - 1.5 * 2**23`` trick is
folded away by XLA's simplifier (seen on CPU), so round half to even is done in integers:
truncate, take the exact fraction, bump away from zero past one half or at a tie from an odd
value. Values are clipped to +-127 first (commutes with rounding: +-127 are integers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import common

DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


def supported(m: int, k: int, dtype) -> bool:
  """Whether :func:`int8_vectorwise_quant` runs the kernel for ``(m, k)`` rows of ``dtype``."""
  return m >= 1 and 1 <= k <= 32768 and np.dtype(dtype) in DTYPES


def round_codes(v: jax.Array) -> jax.Array:
  """int8 ``clip(round_half_even(v), -127, 127)`` of float32 ``v`` (finite or +-Inf; no NaN)."""
  v = jnp.clip(v, -127.0, 127.0)
  t = v.astype(jnp.int32)                     # truncates toward 0
  frac = v - t.astype(jnp.float32)            # exact: |frac| < 1 and shares v's ulp
  half = common.fabs(frac)
  up = (half > 0.5) | ((half == 0.5) & ((t & 1) != 0))  # ties to even
  return (t + jnp.where(up, jnp.where(frac > 0, 1, -1), 0)).astype(jnp.int8)


def _row_stats(rows, threshold, sparse, interpret=True):
  """float32 ``(R, C)`` rows -> (scale (R, 1), absmax (R,), outlier elements (R, C) or None).

  ``interpret`` False (the GPU kernel): ``1 / absmax`` is PTX ``div.rn.f32``; Triton's own
  float32 ``/`` is the approximate ``div.full.f32`` (up to 2 ulp), which would move codes."""
  mag = common.fabs(rows)
  outliers = (mag >= jnp.float32(threshold)) if sparse else None
  inliers = jnp.where(outliers, 0.0, mag) if sparse else mag
  # NaN is tested explicitly: max does not propagate it on every backend.
  bad = jnp.max(jnp.where(common.isfinite(inliers), 0.0, 1.0), axis=1)
  absmax = jnp.where(bad > 0, jnp.float32(jnp.nan), jnp.max(inliers, axis=1))
  scale = jnp.float32(127) * common.recip_rn(absmax, interpret=interpret)
  return scale, absmax, outliers


def _codes(rows, scale):
  ok = common.isfinite(scale)  # (R, 1): absmax 0 / NaN / denormal rows quantize to 0
  return jnp.where(ok, round_codes(jnp.where(ok, rows * scale, 0.0)), jnp.int8(0))


def _quant_kernel(x_ref, q_ref, a_ref, m_ref, *, m, k, br, steps, threshold, sparse,
                  interpret):
  # x: (BM, KP) x.dtype; q: (BM, KP) int8 (raw codes); a: (BM,) f32; m: (1, KP) int8.
  kp = x_ref.shape[1]
  base = pl.program_id(0) * x_ref.shape[0]
  col_ok = jax.lax.broadcasted_iota(jnp.int32, (br, kp), 1) < k

  def body(s, colmask):
    r0 = pl.multiple_of(s * br, br)
    row_ok = (base + r0 + jax.lax.broadcasted_iota(jnp.int32, (br, kp), 0)) < m
    ok = row_ok & col_ok
    rows = plt.load(x_ref.at[pl.ds(r0, br), :], mask=ok, other=0).astype(jnp.float32)
    scale, absmax, outliers = _row_stats(rows, threshold, sparse, interpret)
    plt.store(q_ref.at[pl.ds(r0, br), :], _codes(rows, scale[:, None]), mask=ok)
    rows_ok = (base + r0 + jax.lax.broadcasted_iota(jnp.int32, (br,), 0)) < m  # no slice op
    plt.store(a_ref.at[pl.ds(r0, br)], absmax, mask=rows_ok)
    if sparse:  # padded rows/cols loaded as 0: never outliers (threshold > 0)
      colmask = jnp.maximum(colmask, jnp.max(outliers.astype(jnp.int32), axis=0))
    return colmask

  colmask = jax.lax.fori_loop(0, steps, body, jnp.zeros((kp,), jnp.int32))
  m_ref[0, :] = colmask.astype(jnp.int8)


def tiling(m: int, k: int, *, max_tile: int = 8192, block_m: int = 32,
           programs: int = 512) -> tuple[int, int]:
  """``(BM, BR)``: rows per program and rows per step (``BR * next_pow2(K) <= max_tile``).

  ``BM`` aims at ``programs`` programs (a few per SM keep enough loads in flight for a
  memory-bound pass) and at most ``block_m`` rows; the partial masks are ``K`` bytes per
  program, <= 1/16 of x's bytes for M >= 8 * programs.
  """
  kp = common.next_pow2(k)
  br = common.pow2_at_most(common.next_pow2(m), max(1, max_tile // kp))
  bm = common.pow2_at_most(max(1, m // programs), block_m)
  return max(br, bm), br


def warps_for(tile: int) -> int:
  """Warps for a ``tile``-element step: 32 elements a thread, 4..16 warps.

  Each thread holds its share of the float32 rows, the codes and (threshold > 0) the int32
  column mask carried across steps: at 4 warps a 16384-wide row (K = 14336 pads to it) would be
  128 + 128 values a thread, past the 255 registers a thread has.
  """
  return int(min(16, max(4, tile // 1024)))


@functools.partial(jax.jit, static_argnames=("threshold", "block_m", "max_tile", "programs",
                                             "interpret", "num_warps", "num_stages"))
def int8_vectorwise_quant_raw(x: jax.Array, *, threshold: float = 0.0, block_m: int = 32,
                              max_tile: int = 8192, programs: int = 512,
                              interpret: bool = False, num_warps: int | None = None,
                              num_stages: int = 2):
  """Raw kernel outputs for ``(M, K)`` ``x``: ``(codes, row_absmax, outlier_cols)``.

  ``codes`` int8 ``(M, K)`` are NOT zeroed in the outlier columns (see the module docstring);
  ``row_absmax`` float32 ``(M,)``; ``outlier_cols`` bool ``(K,)``. ``threshold`` is static.
  ``num_warps`` None: :func:`warps_for`.
  """
  mm, k = x.shape
  if not supported(mm, k, x.dtype):
    raise ValueError(f"int8 quant kernel: unsupported ({mm}, {k}) {x.dtype}; use the XLA path")
  sparse = threshold > 0
  kp = common.next_pow2(k)
  bm, br = tiling(mm, k, max_tile=max_tile, block_m=block_m, programs=programs)
  grid = pl.cdiv(mm, bm)
  codes, absmax, partial = pl.pallas_call(
      functools.partial(_quant_kernel, m=mm, k=k, br=br, steps=bm // br,
                        threshold=float(threshold), sparse=sparse, interpret=interpret),
      out_shape=(jax.ShapeDtypeStruct((mm, k), jnp.int8),
                 jax.ShapeDtypeStruct((mm,), jnp.float32),
                 jax.ShapeDtypeStruct((grid, kp), jnp.int8)),
      grid=(grid,),
      in_specs=[pl.BlockSpec((bm, kp), lambda i: (i, 0))],
      out_specs=(pl.BlockSpec((bm, kp), lambda i: (i, 0)),
                 pl.BlockSpec((bm,), lambda i: (i,)),
                 pl.BlockSpec((1, kp), lambda i: (i, 0))),
      compiler_params=None if interpret else common.triton_params(
          num_warps or warps_for(br * kp), num_stages),
      interpret=interpret,
      name="int8_vectorwise_quant",
  )(x)
  cols = jnp.any(partial[:, :k] != 0, axis=0) if sparse else jnp.zeros((k,), jnp.bool_)
  return codes, absmax, cols


def int8_vectorwise_quant(x: jax.Array, *, threshold: float = 0.0, interpret: bool = False,
                          **tiles):
  """``(codes, row_absmax, outlier_cols)`` of ``(M, K)`` ``x``, bit-equal to the functional core.

  The kernel's raw codes with the outlier columns zeroed by one XLA select.
  """
  codes, absmax, cols = int8_vectorwise_quant_raw(x, threshold=threshold, interpret=interpret,
                                                  **tiles)
  if threshold > 0:
    codes = jnp.where(cols[None, :], jnp.int8(0), codes)
  return codes, absmax, cols


@functools.partial(jax.jit, static_argnames="threshold")
def int8_vectorwise_quant_reference(x: jax.Array, *, threshold: float = 0.0):
  """Plain-jnp reference of :func:`int8_vectorwise_quant` (same outputs, same bits)."""
  rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  sparse = threshold > 0
  scale, absmax, outliers = _row_stats(rows, threshold, sparse)
  cols = jnp.any(outliers, axis=0) if sparse else jnp.zeros((rows.shape[1],), jnp.bool_)
  codes = _codes(jnp.where(cols[None, :], 0.0, rows), scale[:, None])
  return codes.reshape(x.shape), absmax, cols
