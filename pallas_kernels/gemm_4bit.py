"""Pallas kernel: ``y = x @ W.T`` for any batch ``x (M, K)`` and a packed NF4/FP4 ``W (N, K)``.

``W`` is bitsandbytes' layout (as in ``gemv_4bit``): row-major ``(N, K)``, element ``2j`` in the
HIGH nibble of byte ``j``, blocks of ``bs`` along ``K`` (``K % bs == 0``), absmax float32 or
double-quantized (:class:`common.NestedAbsmax`, decoded in-kernel). The dequantized ``W`` never
exists in HBM: each program decodes its ``(BN, BK)`` tiles in registers and feeds them to the
tensor cores.

Kernel design:
  * grid ``(cdiv(M, BM), cdiv(N, BN))``; program ``(i, j)`` owns the output tile
    ``y[i*BM:(i+1)*BM, j*BN:(j+1)*BN]`` and loops over ``K`` in tiles of ``BK`` elements
    (``fori_loop``); a ``K`` that is not a multiple of ``BK`` (it is always a multiple of
    ``bs``) ends with at most ``log2(BK/bs)`` static power-of-two tail steps, never a padded
    copy of ``W``.
  * per step: load the packed bytes ``(BN, BK/2)`` and the absmax ``(BN, max(1, BK/bs))``,
    split the nibbles, decode both with the select tree, multiply by the block's absmax in
    float32 (one rounding: the same value as ``dequantize_4bit``), interleave hi/lo (Triton
    ``join``), round to the compute dtype and ``dot`` with the ``(BM, BK)`` tile of ``x``,
    accumulating float32 ``(BM, BN)``.
  * compute dtype = ``x.dtype``: bfloat16/float16 run on the tensor cores; float32 inputs use an
    IEEE float32 dot (``Precision.HIGHEST``: exact products, no TF32 — correct but several times
    slower; callers that want speed cast ``x`` to 16 bits, as ``jaxbnb`` does with
    ``compute_dtype``).
  * edges: Pallas' Triton lowering does not mask blocks that overhang the array, so rows
    ``>= M`` of ``x``, rows ``>= N`` of ``W`` and the store are masked explicitly.
Tiles come from :func:`tiling`, a small table per ``M`` bucket (not yet tuned on a GPU); every
``(M, N, K)`` compiles once per shape under ``jit`` and is then cached.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import common
from pallas_kernels.dequant_4bit import dequantize_4bit_reference

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16))

# (largest M of the bucket, BM, BN, BK, num_warps, num_stages). Untuned first guesses: small M
# is bandwidth-bound on W (wide BN*BK tiles, few rows); large M is compute-bound and decodes
# every W tile once per BM rows, so BM is as large as registers allow. Register budget: the
# decoded W tile (BN*BK float32 before the rounding to x.dtype, plus the int32 nibbles) is at
# most 64 values a thread (BN*BK <= 2048 * num_warps); at 128+ a thread, next to the float32
# accumulator (BM*BN / (32 * num_warps)), a thread would need more than its 255 registers.
TILE_TABLE = (
    (32, 16, 64, 128, 4, 3),
    (64, 32, 64, 128, 4, 3),
    (256, 64, 128, 64, 4, 3),
    (None, 128, 128, 64, 8, 3),
)
# float32 x: an IEEE float32 dot has no tensor-core path; Triton's FMA dot converts both
# operand tiles to registers, each thread holding the whole BK extent of the rows and columns of
# its accumulator fragment (a few hundred registers at 128x128x64), so the float32 tiles are
# capped (BM, BN <= 64, BK <= 16: about 32 accumulators and ~200 operand values a thread at 4
# warps; an estimate, not measured on a GPU).
F32_MAX_TILE = (64, 64, 16)


def supported(m: int, n: int, k: int, blocksize: int, quant_type: str, dtype) -> bool:
  """Whether :func:`gemm_4bit` handles this problem (else use the XLA path)."""
  return (m >= 1 and n >= 1 and k >= blocksize and k % blocksize == 0
          and blocksize in BLOCKSIZES and quant_type in common.QUANT_TYPES
          and np.dtype(dtype) in DTYPES)


def tiling(m: int, n: int, k: int, blocksize: int,
           dtype=jnp.bfloat16) -> tuple[int, int, int, int, int]:
  """``(BM, BN, BK, num_warps, num_stages)`` for a problem, from :data:`TILE_TABLE`.

  Block dims are powers of two >= 16 (Triton's dot minimum); they shrink toward small ``M``/
  ``N``/``K`` so tests and tiny layers do not pay for padding. ``dtype``: x's (float32 caps
  the tiles at :data:`F32_MAX_TILE`).
  """
  for max_m, bm, bn, bk, warps, stages in TILE_TABLE:
    if max_m is None or m <= max_m:
      break
  if np.dtype(dtype) == np.dtype(jnp.float32):
    bm, bn, bk = (min(a, b) for a, b in zip((bm, bn, bk), F32_MAX_TILE))
    warps = 4
  bm = max(16, min(bm, common.next_pow2(m)))
  bn = max(16, min(bn, common.next_pow2(n)))
  bk = min(bk, common.next_pow2(k))
  return bm, bn, bk, warps, stages


def _pow2_pieces(n: int) -> list[int]:
  """Powers of two summing to ``n``, largest first."""
  return [1 << b for b in reversed(range(n.bit_length())) if n >> b & 1]


def _gemm_kernel(x_ref, q_ref, a_ref, *rest, quant_type, m, n, bs, bk, nfull, tail, group,
                 interpret):
  # x: (BM, K); q: (BN, K/2) u8; a: (BN, K/bs) f32 or u8 codes (then rest starts with the
  # absmax2, offset, code whole-array refs); o: (BM, BN).
  *nested_refs, o_ref = rest
  bm, bn = o_ref.shape
  nb = a_ref.shape[1]
  cdt = x_ref.dtype
  rows = pl.program_id(0) * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
  cols = pl.program_id(1) * bn + jax.lax.broadcasted_iota(jnp.int32, (bn, 1), 0)
  row_ok, col_ok = rows < m, cols < n
  precision = jax.lax.Precision.HIGHEST if cdt == jnp.float32 else None

  def step(acc, k0, w):
    """acc + x[:, k0:k0+w] @ W[:, k0:k0+w].T; ``k0`` a multiple of ``w`` (traced or static)."""
    x = plt.load(x_ref.at[:, pl.ds(k0, w)], mask=jnp.broadcast_to(row_ok, (bm, w)), other=0)
    hi, lo = common.split_nibbles(
        plt.load(q_ref.at[:, pl.ds(k0 // 2, w // 2)], mask=jnp.broadcast_to(col_ok, (bn, w // 2)),
                 other=0))
    v_hi = common.decode_4bit(hi, quant_type)       # (BN, w/2) f32
    v_lo = common.decode_4bit(lo, quant_type)
    nblk = max(1, w // bs)
    a = plt.load(a_ref.at[:, pl.ds(k0 // bs, nblk)], mask=jnp.broadcast_to(col_ok, (bn, nblk)),
                 other=0)  # (BN, nblk)
    if nested_refs:
      blk = cols * nb + k0 // bs + jax.lax.broadcasted_iota(jnp.int32, (bn, nblk), 1)
      a = common.decode_nested(a, blk, *nested_refs, group=group, interpret=interpret)
    if nblk == 1:
      v_hi, v_lo = v_hi * a, v_lo * a
    else:
      per = w // 2 // nblk
      v_hi = (v_hi.reshape(bn, nblk, per) * a[:, :, None]).reshape(bn, w // 2)
      v_lo = (v_lo.reshape(bn, nblk, per) * a[:, :, None]).reshape(bn, w // 2)
    wt = jnp.stack([v_hi, v_lo], axis=-1).reshape(bn, w).astype(cdt)  # element 2j = hi
    return acc + jax.lax.dot_general(x.astype(cdt), wt, (((1,), (1,)), ((), ())),
                                     precision=precision, preferred_element_type=jnp.float32)

  acc = jnp.zeros((bm, bn), jnp.float32)
  if nfull:
    acc = jax.lax.fori_loop(
        0, nfull, lambda t, acc: step(acc, pl.multiple_of(t * bk, bk), bk), acc)
  k0 = nfull * bk
  for w in tail:  # static: K % BK leftovers, as power-of-two tiles of whole blocks
    acc = step(acc, k0, w)
    k0 += w
  plt.store(o_ref, acc.astype(o_ref.dtype), mask=row_ok & col_ok.reshape(1, bn))


@functools.partial(jax.jit, static_argnames=(
    "n_out", "blocksize", "quant_type", "tiles", "out_dtype", "interpret", "absmax_group"))
def gemm_4bit(x: jax.Array, packed: jax.Array, absmax, *, n_out: int, blocksize: int,
              quant_type: str, tiles: tuple[int, int, int, int, int] | None = None,
              out_dtype=None, interpret: bool = False,
              absmax_group: int = common.NESTED_GROUP) -> jax.Array:
  """``x @ W.T`` with 4-bit ``W`` (Pallas kernel; see the module docstring).

  Args:
    x: ``(M, K)`` bfloat16/float16 (tensor cores) or float32 (IEEE float32 dot).
    packed: uint8, at least ``N*K/2`` bytes (flattened; bnb's ``(nbytes, 1)`` is fine).
    absmax: float32 ``(N*K/bs,)``, or a :class:`common.NestedAbsmax` with ``(N*K/bs,)`` codes.
    n_out: ``N``. blocksize: ``bs`` (``K % bs == 0``). quant_type: "nf4" | "fp4".
    tiles: ``(BM, BN, BK, num_warps, num_stages)``, powers of two (BM, BN >= 16); default
      :func:`tiling`.
    out_dtype: output dtype (default ``x.dtype``).
    absmax_group: first-level blocks per ``absmax2`` entry of a nested absmax.

  Returns:
    ``(M, N)`` in ``out_dtype``: float32 accumulation of ``x * round_{x.dtype}(code * absmax)``.
  """
  m, k = x.shape
  if not supported(m, n_out, k, blocksize, quant_type, x.dtype):
    raise ValueError(f"gemm_4bit: unsupported problem M={m} N={n_out} K={k} bs={blocksize} "
                     f"{quant_type} {x.dtype}; use the XLA path")
  bm, bn, bk, warps, stages = tiles or tiling(m, n_out, k, blocksize, x.dtype)
  nb = k // blocksize
  if bk >= blocksize:  # whole blocks per tile; leftover blocks become power-of-two tail tiles
    kb = bk // blocksize
    nfull, tail = nb // kb, [w * blocksize for w in _pow2_pieces(nb % kb)]
  else:  # a block spans several tiles: K is a multiple of BK
    nfull, tail = k // bk, []
  q = packed.reshape(-1)[: n_out * k // 2].reshape(n_out, k // 2)
  a, extra = common.matrix_absmax_operands(absmax, n_out, nb)
  out = pl.pallas_call(
      functools.partial(_gemm_kernel, quant_type=quant_type, m=m, n=n_out, bs=blocksize, bk=bk,
                        nfull=nfull, tail=tuple(tail), group=absmax_group, interpret=interpret),
      out_shape=jax.ShapeDtypeStruct((m, n_out), np.dtype(out_dtype or x.dtype)),
      grid=(pl.cdiv(m, bm), pl.cdiv(n_out, bn)),
      in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                pl.BlockSpec((bn, k // 2), lambda i, j: (j, 0)),
                pl.BlockSpec((bn, nb), lambda i, j: (j, 0)),
                *(pl.BlockSpec(e.shape, lambda i, j: (0,)) for e in extra)],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      compiler_params=None if interpret else common.triton_params(warps, stages),
      interpret=interpret,
      name=f"gemm_{quant_type}_bs{blocksize}{'_dq' if extra else ''}",
  )(x, q, a, *extra)
  return out


@functools.partial(jax.jit, static_argnames=("n_out", "blocksize", "quant_type", "out_dtype",
                                             "absmax_group"))
def gemm_4bit_reference(x: jax.Array, packed: jax.Array, absmax, *, n_out: int, blocksize: int,
                        quant_type: str, out_dtype=None,
                        absmax_group: int = common.NESTED_GROUP) -> jax.Array:
  """XLA reference of :func:`gemm_4bit`: ``W`` dequantized to ``x.dtype``, exact-f32 dot."""
  m, k = x.shape
  w = dequantize_4bit_reference(packed, absmax, n=n_out * k, blocksize=blocksize,
                                quant_type=quant_type, out_dtype=x.dtype,
                                absmax_group=absmax_group).reshape(n_out, k)
  y = jax.lax.dot_general(x.astype(jnp.float32), w.astype(jnp.float32),
                          (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32)
  return y.astype(out_dtype or x.dtype)
