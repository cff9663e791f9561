"""Pallas kernel: ``y = x @ W.T`` for a small batch ``x (M<=16, K)`` and a packed NF4/FP4 ``W (N, K)``.

``W`` is bitsandbytes' layout: row-major ``(N, K)``, two codes per byte (element ``2j`` in the
HIGH nibble), blocks of ``bs`` along ``K`` (``K % bs == 0``) with an absmax each: float32, or
double-quantized (:class:`common.NestedAbsmax`: uint8 codes read in place of the floats, decoded
on the fly, bit-identically to ``unnest_absmax``). Accumulation is float32; the output is
``x.dtype``.

Kernel design:
  * views: bytes ``(N, K/bs, bs/2)``, absmax ``(N, K/bs)``; ``x`` is split (in XLA, it is tiny)
    into its even and odd columns ``(Mp, K/bs, bs/2)`` float32, so the high nibbles multiply
    ``x_even`` and the low ones ``x_odd`` with no interleave in the kernel.
  * grid ``(cdiv(N, BN), S)``: program ``(j, s)`` owns rows ``[j*BN, (j+1)*BN)`` and the ``s``-th
    of ``S`` equal K chunks (split-K); it reads each of its packed bytes exactly once, looping
    over the chunk in steps of ``KB`` blocks (``KB*bs`` elements).
  * per step: split nibbles, decode both with the select tree (no gather), then per row ``m``
    of ``x`` (static unroll, the decoded tile is shared) form per-block partial sums
    ``sum_j w_code * x`` ``(BN, KB)`` and scale them by the absmax once per block (bs/2 fewer
    multiplies than scaling every weight), accumulating ``(BN,)`` in float32.
  * each program writes float32 partials ``(S, Mp, N)``; XLA sums the ``S`` chunks.
Block dims are powers of two (Triton); ragged ``N`` is a masked last row tile.
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

MAX_M = 16


def supported(m: int, n: int, k: int, blocksize: int, quant_type: str, dtype) -> bool:
  """Whether :func:`gemv_4bit` handles this problem (else use the XLA path)."""
  return (1 <= m <= MAX_M and n >= 1 and k >= blocksize and k % blocksize == 0
          and blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096)
          and quant_type in common.QUANT_TYPES
          and np.dtype(dtype) in (np.dtype(jnp.float32), np.dtype(jnp.bfloat16),
                                  np.dtype(jnp.float16)))


def _gemv_kernel(xe_ref, xo_ref, q_ref, a_ref, *rest, quant_type, m, n, kb, steps, nb, group,
                 interpret):
  # xe/xo: (Mp, KB*steps, bs/2) f32; q: (BN, KB*steps, bs/2) u8; a: (BN, KB*steps) f32 (or u8
  # codes, then rest = absmax2, offset, code whole-array refs); o: (1, Mp, BN) f32.
  *nested_refs, o_ref = rest
  bn, _, half = q_ref.shape
  row = pl.program_id(0) * bn + jax.lax.broadcasted_iota(jnp.int32, (bn, kb), 0)
  # Pallas' Triton lowering does not mask a row tile that overhangs N: do it here.
  ok = None if n % bn == 0 else row < n
  if nested_refs:  # global block index of (row, 0) of this program's chunk
    base = row * nb + pl.program_id(1) * (kb * steps) + jax.lax.broadcasted_iota(
        jnp.int32, (bn, kb), 1)

  def body(s, accs):
    sl = pl.ds(pl.multiple_of(s * kb, kb), kb)
    mask = None if ok is None else jnp.broadcast_to(ok[:, :, None], (bn, kb, half))
    q = common.masked_load(q_ref.at[:, sl, :], mask)
    hi, lo = common.split_nibbles(q)                # (BN, KB, bs/2)
    w_hi = common.decode_4bit(hi, quant_type)
    w_lo = common.decode_4bit(lo, quant_type)
    absmax = common.masked_load(a_ref.at[:, sl], ok)  # (BN, KB)
    if nested_refs:
      absmax = common.decode_nested(absmax, base + s * kb, *nested_refs, group=group,
                                    interpret=interpret)
    out = []
    for i in range(m):
      part = jnp.sum(w_hi * xe_ref[i, sl, :][None] + w_lo * xo_ref[i, sl, :][None], axis=-1)
      out.append(accs[i] + jnp.sum(part * absmax, axis=-1))
    return tuple(out)

  zeros = tuple(jnp.zeros((bn,), jnp.float32) for _ in range(m))
  accs = jax.lax.fori_loop(0, steps, body, zeros)
  col_ok = None if ok is None else (
      pl.program_id(0) * bn + jax.lax.broadcasted_iota(jnp.int32, (1, 1, bn), 2) < n)
  for i in range(m):
    plt.store(o_ref.at[pl.ds(0, 1), pl.ds(i, 1), :], accs[i].reshape(1, 1, bn), mask=col_ok)


def tiling(n: int, k: int, blocksize: int, *, block_n: int = 64, block_k: int = 512,
           k_per_program: int = 2048, m: int = 1) -> tuple[int, int, int, int]:
  """``(BN, KB, steps, S)``: row tile, blocks per step, steps per program, K splits.

  The decoded tile (``BN * KB * bs`` float32 weights a step, half from the high nibbles and
  half from the low ones, spread over the program's threads) is capped at half of
  ``block_n * block_k`` for one row of ``x`` and a quarter with ``m > 1`` rows, for which it
  stays live across all of them (static unroll): at the defaults and 4 warps that is 2 x 64
  or 2 x 32 float32 a thread, not the 2 x 128 of the full ``block_n * block_k`` (plus the
  int32 nibbles and products: more than the 255 registers a thread has, i.e. spills).
  """
  nb = k // blocksize
  kb = common.pow2_divisor(nb, max(1, block_k // blocksize))
  tiles = nb // kb
  # Steps need not be a power of two (only the loaded KB-block slices must be).
  cap = max(1, k_per_program // (kb * blocksize))
  steps = max(d for d in range(1, min(cap, tiles) + 1) if tiles % d == 0)
  # Large blocksizes make one block wider than block_k, and several rows of x keep the decoded
  # tile live: shrink BN to keep it (BN * KB * bs values, in registers on GPU) within budget.
  budget = block_n * block_k // (2 if m == 1 else 4)
  bn = common.pow2_at_most(n, max(1, min(block_n, budget // (kb * blocksize))))
  return bn, kb, steps, tiles // steps


@functools.partial(jax.jit, static_argnames=(
    "n_out", "blocksize", "quant_type", "block_n", "block_k", "k_per_program", "out_dtype",
    "interpret", "num_warps", "num_stages", "absmax_group"))
def gemv_4bit(x: jax.Array, packed: jax.Array, absmax, *, n_out: int,
              blocksize: int, quant_type: str, block_n: int = 64, block_k: int = 512,
              k_per_program: int = 2048, out_dtype=None, interpret: bool = False,
              num_warps: int = 4, num_stages: int = 2,
              absmax_group: int = common.NESTED_GROUP) -> jax.Array:
  """``x @ W.T`` with 4-bit ``W`` (Pallas kernel; see the module docstring).

  Args:
    x: ``(M, K)`` float32/bfloat16/float16, ``M <= 16``.
    packed: uint8, at least ``N*K/2`` bytes (flattened; bnb's ``(nbytes, 1)`` is fine).
    absmax: float32 ``(N*K/bs,)``, or a :class:`common.NestedAbsmax` with ``(N*K/bs,)`` codes
      (``absmax_group`` blocks per ``absmax2`` entry).
    n_out: ``N``. blocksize: ``bs`` (``K % bs == 0``). quant_type: "nf4" | "fp4".
    block_n, block_k, k_per_program: tile sizes (rounded down to powers of two that divide).
    out_dtype: output dtype (default ``x.dtype``); float32 skips the final rounding.

  Returns:
    ``(M, N)`` in ``out_dtype`` (float32 accumulation).
  """
  m, k = x.shape
  if not supported(m, n_out, k, blocksize, quant_type, x.dtype):
    raise ValueError(f"gemv_4bit: unsupported problem M={m} N={n_out} K={k} bs={blocksize} "
                     f"{quant_type} {x.dtype}; use the XLA path")
  nb, half = k // blocksize, blocksize // 2
  bn, kb, steps, splits = tiling(n_out, k, blocksize, block_n=block_n, block_k=block_k,
                                 k_per_program=k_per_program, m=m)
  mp = common.next_pow2(m)
  xf = jnp.pad(x.astype(jnp.float32), ((0, mp - m), (0, 0)))
  xe = xf[:, 0::2].reshape(mp, nb, half)
  xo = xf[:, 1::2].reshape(mp, nb, half)
  q = packed.reshape(-1)[: n_out * k // 2].reshape(n_out, nb, half)
  a, extra = common.matrix_absmax_operands(absmax, n_out, nb)
  kc = kb * steps  # blocks per program
  partial = pl.pallas_call(
      functools.partial(_gemv_kernel, quant_type=quant_type, m=m, n=n_out, kb=kb, steps=steps,
                        nb=nb, group=absmax_group, interpret=interpret),
      out_shape=jax.ShapeDtypeStruct((splits, mp, n_out), jnp.float32),
      grid=(pl.cdiv(n_out, bn), splits),
      in_specs=[pl.BlockSpec((mp, kc, half), lambda j, s: (0, s, 0)),
                pl.BlockSpec((mp, kc, half), lambda j, s: (0, s, 0)),
                pl.BlockSpec((bn, kc, half), lambda j, s: (j, s, 0)),
                pl.BlockSpec((bn, kc), lambda j, s: (j, s)),
                *(pl.BlockSpec(e.shape, lambda j, s: (0,)) for e in extra)],
      out_specs=pl.BlockSpec((1, mp, bn), lambda j, s: (s, 0, j)),
      compiler_params=None if interpret else common.triton_params(num_warps, num_stages),
      interpret=interpret,
      name=f"gemv_{quant_type}_bs{blocksize}{'_dq' if extra else ''}",
  )(xe, xo, q, a, *extra)
  y = partial[0] if splits == 1 else jnp.sum(partial, axis=0)
  return y[:m].astype(out_dtype or x.dtype)


@functools.partial(jax.jit, static_argnames=("n_out", "blocksize", "quant_type"))
def gemv_4bit_reference(x: jax.Array, packed: jax.Array, absmax, *, n_out: int,
                        blocksize: int, quant_type: str) -> jax.Array:
  """XLA reference of :func:`gemv_4bit`: dequantize to float32, then an exact-f32 dot."""
  m, k = x.shape
  w = dequantize_4bit_reference(packed, absmax, n=n_out * k, blocksize=blocksize,
                                quant_type=quant_type).reshape(n_out, k)
  y = jax.lax.dot_general(x.astype(jnp.float32), w, (((1,), (1,)), ((), ())),
                          precision=jax.lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32)
  return y.astype(x.dtype)
