"""Pallas kernels: LLM.int8() ``y = x @ W.T (+ bias)`` for an int8 weight ``W`` (bnb ``CB``, ``SCB``).

Semantics (``jaxbnb.ops._int8_linear_impl``, bnb's ``Linear8bitLt`` forward):
``codes, row_absmax, cols = int8_vectorwise_quant(x, threshold)``;
``y = f32(codes @ CB.T) * row_absmax[:, None] * SCB[None, :] * f32(1/127^2)``
``  + x[:, cols] @ (CB[:, cols] * (SCB / 127)).T`` (16-bit operands, float32 accumulation, only
when ``threshold > 0``) ``+ bias``, then cast to ``x.dtype``.

Pieces:
  * activation quantization: ``int8_quant.py`` (one pass; raw codes + outlier-column mask).
  * GEMM regime (``M > 16``) outlier operands, in XLA (small): the outlier columns' indices
    (``nonzero`` with a static size ``KO`` = ``max_outlier_cols`` rounded up to a power of two,
    at least 32), the gathered ``x[:, cols]`` ``(M, KO)`` and the dequantized ``W[:, cols]``
    ``(N, KO)``, both in x.dtype, zero past the real count. More outlier columns than
    ``max_outlier_cols`` switches (inside the same jit, ``lax.cond``) to the kernel without
    outlier operands plus a masked 16-bit dense product in XLA: correct, slower, as the XLA
    path does.
  * the GEMM kernel, a 1-D grid over the ``cdiv(M, BM) x cdiv(N, BN)`` output tiles in grouped
    order (:func:`tile_ij`, for L2 reuse): program ``(i, j)`` loops over K in
    ``BK`` steps, loads the int8 A tile (outlier columns zeroed by a select on the column mask:
    the codes in HBM are raw), the int8 W tile, and accumulates ``A @ W.T`` in int32 on the
    tensor cores. The epilogue scales by ``row_absmax x SCB / 127^2`` in float32 (the XLA path's
    operation order, so an exact accumulator gives the same bits), adds the outlier product
    (one or more ``(BM, 64) @ (64, BN)`` 16-bit dots, float32 accumulation) and the bias, and
    writes ``x.dtype``: no int32 or float32 copy of the output goes to HBM.
  * GEMV regime (``M <= 16``): the same kernel with ``BM = 16`` (``tl.dot`` needs 16 rows; the
    extra rows are masked loads of zeros) and one row tile, so the grid runs over N only and
    each W byte is read once; ``BN`` is small so that N/BN programs fill the GPU. No split-K:
    every benchmark shape has N >= 4096, i.e. >= 256 programs (BN 16 below N 8192, else 32);
    a small N with a long K would want it (not done). Outliers here need
    no XLA gather (which would read W's outlier columns a 32-byte sector per element): each K
    step also multiplies ``x``'s tile, masked to the outlier columns, by the W tile it already
    holds, dequantized in registers (``CB * (SCB / 127)`` rounded to x.dtype, the XLA path's
    operand). The extra 16-bit ``tl.dot`` and the dequantization should hide under the loads of
    a memory-bound loop (not yet measured on a GPU), and any number of outlier columns is
    handled (no ``max_outlier_cols`` fallback).
Ragged M and N are masked loads/stores (Triton does not bound-check block loads); K must be a
multiple of 32 (``BK`` divides K, int8 ``tl.dot`` wants K tiles of 32). Block shapes come from a
small table per (M, N, K) bucket (:func:`tiling`), so a steady-state call never recompiles.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import common
from pallas_kernels import int8_quant

GEMV_M = 16
_INV_127 = np.float32(1 / 127)
_INV_127SQ = np.float32(1 / (127 * 127))


def supported(m: int, n: int, k: int, dtype) -> bool:
  """Whether :func:`int8_linear` runs the Pallas kernels for this problem (else: the XLA path)."""
  return (m >= 1 and n >= 1 and k >= 32 and k % 32 == 0 and k <= 32768
          and np.dtype(dtype) in int8_quant.DTYPES)


def tiling(m: int, n: int, k: int) -> dict:
  """Block shapes and launch parameters per problem bucket (static; one compile per bucket)."""
  if m <= GEMV_M:  # memory-bound: read W once, many small N tiles
    bn = 32 if n >= 8192 else 16  # N=4096: 256 programs of 16 rows
    t = dict(bm=16, bn=bn, bk=256, num_warps=4, num_stages=4)
  elif m <= 256:
    t = dict(bm=64, bn=128, bk=128, num_warps=4, num_stages=4)
  else:
    t = dict(bm=128, bn=128, bk=128, num_warps=8, num_stages=3)
  t["bk"] = common.pow2_divisor(k, t["bk"])
  t["bn"] = max(16, min(t["bn"], common.next_pow2(n)))
  return t


def tile_ij(p, gm: int, gn: int, group: int):
  """Row/column tile of program ``p`` in grouped order: ``group`` row tiles sweep the column
  tiles together, so a W column tile is reused from L2 by ``group`` programs in flight (and an
  A row tile by the ``gn`` of them) instead of streaming all of A once per column tile."""
  width = group * gn
  first = (p // width) * group
  size = jnp.minimum(gm - first, group)
  return first + (p % width) % size, (p % width) // size


def _vec_mask(start, size, limit):
  """bool ``(size,)``: index ``start + r`` < ``limit``."""
  return (start + jax.lax.broadcasted_iota(jnp.int32, (size,), 0)) < limit


def _rows_mask(start, size, limit, width):
  """bool ``(size, width)``: row ``start + r`` < ``limit``."""
  return (start + jax.lax.broadcasted_iota(jnp.int32, (size, width), 0)) < limit


def _gemm_kernel(*refs, m, n, bk, steps, grid_mn, sparse, dense_outliers, n_ko, bko, has_bias,
                 return_acc, interpret):
  it = iter(refs)
  a_ref, b_ref = next(it), next(it)                       # (BM, K) i8, (BN, K) i8
  cm_ref = next(it) if sparse else None                   # (1, K) i8: outlier columns
  x_ref = next(it) if dense_outliers else None            # (BM, K) x.dtype
  ra_ref, sc_ref = next(it), next(it)                     # (BM,) f32, (BN,) f32
  xo_ref, wo_ref = (next(it), next(it)) if n_ko else (None, None)  # (BM, KO), (BN, KO)
  bias_ref = next(it) if has_bias else None               # (BN,)
  o_ref = next(it)                                        # (BM, BN)
  bm, bn = a_ref.shape[0], b_ref.shape[0]
  i, j = tile_ij(pl.program_id(0), *grid_mn)
  i0, j0 = i * bm, j * bn
  a_ok, b_ok = _rows_mask(i0, bm, m, bk), _rows_mask(j0, bn, n, bk)
  sc = plt.load(sc_ref, mask=_vec_mask(j0, bn, n), other=0)
  dims = (((1,), (1,)), ((), ()))

  def body(s, carry):  # carry: (int32 acc,) or (int32 acc, f32 outlier acc)
    acc = carry[0]
    ks = pl.ds(pl.multiple_of(s * bk, bk), bk)
    a = plt.load(a_ref.at[:, ks], mask=a_ok, other=0)
    if sparse:  # zero the outlier columns here: the codes in HBM are raw (see int8_quant.py)
      is_out = cm_ref[0, ks][None, :] != 0
      a = jnp.where(is_out, jnp.int8(0), a)
    b = plt.load(b_ref.at[:, ks], mask=b_ok, other=0)
    acc = acc + jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.int32)
    if dense_outliers:  # GEMV: the 16-bit product over the outlier columns of this tile, from
      # the W tile already in registers (the XLA path's masked product, term by term).
      xt = plt.load(x_ref.at[:, ks], mask=a_ok, other=0)
      xt = jnp.where(is_out, xt, jnp.zeros((), xt.dtype))
      wt = (b.astype(jnp.float32) * (sc * _INV_127)[:, None]).astype(xt.dtype)
      if interpret:  # XLA:CPU has no 16x16->f32 dot; widening is exact (products fit f32)
        xt, wt = xt.astype(jnp.float32), wt.astype(jnp.float32)
      return acc, carry[1] + jax.lax.dot_general(xt, wt, dims,
                                                 preferred_element_type=jnp.float32)
    return (acc,)

  init = (jnp.zeros((bm, bn), jnp.int32),)
  if dense_outliers:  # only then: an unused (BM, BN) float32 carry would cost registers
    init += (jnp.zeros((bm, bn), jnp.float32),)
  carry = jax.lax.fori_loop(0, steps, body, init)
  acc = carry[0]
  out_ok = _rows_mask(i0, bm, m, bn) & (
      (j0 + jax.lax.broadcasted_iota(jnp.int32, (bm, bn), 1)) < n)
  if return_acc:
    plt.store(o_ref, acc, mask=out_ok)
    return
  ra = plt.load(ra_ref, mask=_vec_mask(i0, bm, m), other=0)
  # The XLA path's operation order: ((acc * row_absmax) * SCB) * (1/127^2).
  y = acc.astype(jnp.float32) * ra[:, None] * sc[None, :] * _INV_127SQ
  if dense_outliers:
    y = y + carry[1]
  if n_ko:
    xo_ok, wo_ok = _rows_mask(i0, bm, m, bko), _rows_mask(j0, bn, n, bko)
    outl = jnp.zeros((bm, bn), jnp.float32)
    for c in range(n_ko):  # static: KO / BKO chunks keep the shared-memory tiles small
      cs = pl.ds(c * bko, bko)
      xo = plt.load(xo_ref.at[:, cs], mask=xo_ok, other=0)
      wo = plt.load(wo_ref.at[:, cs], mask=wo_ok, other=0)
      if interpret:  # XLA:CPU has no 16x16->f32 dot; widening is exact (products fit f32)
        xo, wo = xo.astype(jnp.float32), wo.astype(jnp.float32)
      outl = outl + jax.lax.dot_general(xo, wo, (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)
    y = y + outl
  if has_bias:
    bias = plt.load(bias_ref, mask=_vec_mask(j0, bn, n), other=0)
    y = y + bias.astype(jnp.float32)[None, :]
  plt.store(o_ref, y.astype(o_ref.dtype), mask=out_ok)


def int8_gemm(codes: jax.Array, CB: jax.Array, row_absmax: jax.Array, SCB: jax.Array, *,
              colmask: Optional[jax.Array] = None, x: Optional[jax.Array] = None,
              xo: Optional[jax.Array] = None, wo: Optional[jax.Array] = None,
              bias: Optional[jax.Array] = None,
              out_dtype=jnp.float32, return_acc: bool = False, interpret: bool = False,
              tiles: Optional[dict] = None) -> jax.Array:
  """The fused int8 GEMM (call inside jit; all options are static).

  Args:
    codes: int8 ``(M, K)`` activation codes (raw: outlier columns need not be zeroed).
    CB: int8 ``(N, K)``. row_absmax: float32 ``(M,)``. SCB: float32 ``(N,)``.
    colmask: optional int8/bool ``(K,)``; nonzero columns of ``codes`` are treated as 0.
    x: optional ``(M, K)`` 16/32-bit input (needs ``colmask``): its outlier columns are
      multiplied in the K loop with the W tile dequantized in registers (GEMV regime).
    xo, wo: optional outlier operands ``(M, KO)`` and ``(N, KO)`` (same 16/32-bit dtype,
      ``KO`` a power of two >= 32): their product is added in float32.
    bias: optional ``(N,)``. out_dtype: output dtype.
    return_acc: return the int32 accumulator ``(M, N)`` instead (for exactness tests).
    tiles: override :func:`tiling` (keys bm, bn, bk, group, num_warps, num_stages).

  Returns:
    ``(M, N)`` ``out_dtype`` (int32 with ``return_acc``).
  """
  m, k = codes.shape
  n = CB.shape[0]
  t = dict(tiling(m, n, k), **(tiles or {}))
  bm, bn, bk = t["bm"], t["bn"], t["bk"]
  if k % bk or bk < 16 or CB.shape[1] != k:
    raise ValueError(f"int8_gemm: K={k} must be a multiple of BK={bk} >= 16 (CB {CB.shape})")
  sparse = colmask is not None
  n_ko = bko = 0
  grid_mn = (pl.cdiv(m, bm), pl.cdiv(n, bn), t.get("group", 8))
  # 1-D grid in grouped order (tile_ij); the index maps select by row tile or column tile.
  rows = lambda *blk: pl.BlockSpec(blk, lambda p: (tile_ij(p, *grid_mn)[0],) + (0,) * (
      len(blk) - 1))
  cols = lambda *blk: pl.BlockSpec(blk, lambda p: (tile_ij(p, *grid_mn)[1],) + (0,) * (
      len(blk) - 1))
  args = [codes, CB]
  specs = [rows(bm, k), cols(bn, k)]
  if sparse:
    args.append(colmask.astype(jnp.int8).reshape(1, k))
    specs.append(pl.BlockSpec((1, k), lambda p: (0, 0)))
  if x is not None:
    if not sparse or x.shape != (m, k):
      raise ValueError("int8_gemm: x needs colmask and the codes' shape")
    args.append(x)
    specs.append(rows(bm, k))
  args += [row_absmax.astype(jnp.float32), SCB.astype(jnp.float32)]
  specs += [rows(bm), cols(bn)]
  if xo is not None:
    ko = xo.shape[1]
    bko = min(ko, 64)
    n_ko = ko // bko
    if ko != common.next_pow2(ko) or ko < 32 or wo.shape != (n, ko) or xo.dtype != wo.dtype:
      raise ValueError(f"int8_gemm: outlier operands {xo.shape} {xo.dtype} / {wo.shape} "
                       f"{wo.dtype}: need (M, KO), (N, KO), one dtype, KO a power of two >= 32")
    args += [xo, wo]
    specs += [rows(bm, ko), cols(bn, ko)]
  if bias is not None:
    args.append(bias)
    specs.append(cols(bn))
  kern = functools.partial(
      _gemm_kernel, m=m, n=n, bk=bk, steps=k // bk, grid_mn=grid_mn, sparse=sparse,
      dense_outliers=x is not None, n_ko=n_ko, bko=bko,
      has_bias=bias is not None, return_acc=return_acc, interpret=interpret)
  return pl.pallas_call(
      kern,
      out_shape=jax.ShapeDtypeStruct((m, n), jnp.int32 if return_acc else np.dtype(out_dtype)),
      grid=(grid_mn[0] * grid_mn[1],),
      in_specs=specs,
      out_specs=pl.BlockSpec((bm, bn), lambda p: tile_ij(p, *grid_mn)),
      compiler_params=(None if interpret
                       else common.triton_params(t["num_warps"], t["num_stages"])),
      interpret=interpret,
      name="int8_gemv" if m <= GEMV_M else "int8_gemm",
  )(*args)


def outlier_width(max_outlier_cols: int, k: int) -> int:
  """``KO``: the static number of gathered outlier columns (a power of two >= 32)."""
  return max(32, common.next_pow2(min(max_outlier_cols, k)))


def outlier_operands(x, CB, SCB, cols, ko):
  """Gathered ``x[:, cols]`` ``(M, KO)`` and ``CB[:, cols] * (SCB / 127)`` ``(N, KO)`` in x.dtype.

  Zero past the real number of outlier columns (the XLA path's ``_add_outlier_product`` operands).
  """
  idx = jnp.nonzero(cols, size=ko, fill_value=0)[0]
  valid = jnp.arange(ko) < jnp.sum(cols)
  xo = jnp.where(valid[None, :], x[:, idx], jnp.zeros((), x.dtype))
  wo = CB[:, idx].astype(jnp.float32) * (SCB[:, None] * _INV_127)
  wo = jnp.where(valid[None, :], wo, 0.0).astype(x.dtype)
  return xo, wo


@functools.partial(jax.jit, static_argnames=("threshold", "max_outlier_cols", "interpret",
                                             "tiles"))
def int8_linear(x: jax.Array, CB: jax.Array, SCB: jax.Array, bias: Optional[jax.Array] = None,
                *, threshold: float = 0.0, max_outlier_cols: int = 256,
                interpret: bool = False, tiles: Optional[tuple] = None) -> jax.Array:
  """LLM.int8() ``x @ W.T + bias`` by the Pallas kernels (see the module docstring).

  Args:
    x: ``(M, K)`` float32/bfloat16/float16 (``supported(M, N, K, x.dtype)``).
    CB: int8 ``(N, K)``; SCB: float32 ``(N,)``; bias: optional ``(N,)``.
    threshold: static outlier threshold (<= 0: no decomposition).
    max_outlier_cols: outlier columns handled by the fused path; more -> masked dense fallback.
    tiles: optional ``tuple(sorted(dict.items()))`` overriding :func:`tiling` (benchmarks).

  Returns:
    ``(M, N)`` in ``x.dtype``.
  """
  m, k = x.shape
  n = CB.shape[0]
  if not supported(m, n, k, x.dtype):
    raise ValueError(f"int8_linear: unsupported problem M={m} N={n} K={k} {x.dtype}; "
                     "use the XLA path")
  tiles = dict(tiles) if tiles else None
  codes, ra, cols = int8_quant.int8_vectorwise_quant_raw(x, threshold=threshold,
                                                         interpret=interpret)
  gemm = functools.partial(int8_gemm, codes, CB, ra, SCB, interpret=interpret, tiles=tiles)
  if threshold <= 0:
    return gemm(bias=bias, out_dtype=x.dtype)
  if m <= GEMV_M:  # every outlier column in-kernel from the W tiles read anyway: no cap
    return gemm(colmask=cols, x=x, bias=bias, out_dtype=x.dtype)
  ko = outlier_width(max_outlier_cols, k)

  def fused(_):
    xo, wo = outlier_operands(x, CB, SCB, cols, ko)
    return gemm(colmask=cols, xo=xo, wo=wo, bias=bias, out_dtype=x.dtype)

  def masked(_):  # > KO outlier columns: the XLA path's masked dense 16-bit product
    y = gemm(colmask=cols, out_dtype=jnp.float32)
    y = y + _dot_f32(jnp.where(cols[None, :], x, jnp.zeros((), x.dtype)),
                     (CB.astype(jnp.float32) * (SCB[:, None] * _INV_127)).astype(x.dtype))
    if bias is not None:
      y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)

  if ko >= k:  # every column fits: never the fallback
    return fused(None)
  return jax.lax.cond(jnp.sum(cols) <= ko, fused, masked, None)


def _dot_f32(a, b):
  """``a @ b.T``, float32 accumulation (16-bit operands widened on CPU, exactly)."""
  if jax.default_backend() == "cpu" and a.dtype.itemsize < 4:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("threshold", "max_outlier_cols"))
def int8_linear_reference(x, CB, SCB, bias=None, *, threshold: float = 0.0,
                          max_outlier_cols: int = 256):
  """Plain-XLA reference of :func:`int8_linear` (the same formula, XLA dots)."""
  codes, ra, cols = int8_quant.int8_vectorwise_quant_reference(x, threshold=threshold)
  acc = jax.lax.dot_general(codes, CB, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
  y = acc.astype(jnp.float32) * ra[:, None] * SCB[None, :] * _INV_127SQ
  if threshold > 0:
    ko = outlier_width(max_outlier_cols, x.shape[1])
    xo, wo = outlier_operands(x, CB, SCB, cols, ko)
    dense = lambda _: _dot_f32(jnp.where(cols[None, :], x, jnp.zeros((), x.dtype)),
                               (CB.astype(jnp.float32) * (SCB[:, None] * _INV_127)).astype(x.dtype))
    y = y + jax.lax.cond(jnp.sum(cols) <= ko, lambda _: _dot_f32(xo, wo), dense, None)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)
