"""NF4 GEMV (y = x @ W.T, W 4-bit (N, K), x (M, K) bf16): Pallas kernel vs the XLA path vs bf16.

Prints one table: device time per call (ms), GB/s of the bytes each op must move (packed W +
absmax + x + y; bf16: the bf16 W), % of the GPU's HBM peak (3.35 TB/s on an H100), and ratios to
the bf16 matmul and to the XLA NF4 path measured in the same run.

Each timing runs the op `--iters` times inside one jit (lax.fori_loop, x perturbed each step so
nothing is hoisted) and divides: a single jit call costs ~0.08 ms of host dispatch (DESIGN.md),
more than the whole kernel. On CPU use `--interpret` (small shape, Pallas interpret mode): it
only exercises the code, its timings mean nothing.

  python experiments/bench_4bit.py [--n 8192] [--k 8192] [--m 1 16] [--iters 200]
  python experiments/bench_4bit.py --interpret
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jaxbnb import ops
from jaxbnb.functional import fourbit
from jaxbnb.functional.blockwise import unnest_absmax
from jaxbnb.qtensor import Quantized4bit
from pallas_kernels import gemv_4bit as gv

PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}  # HBM, vendor figures


def _timed(fn, x, iters, repeats):
  """Median ms per call of ``fn(x)`` over ``repeats`` runs of an ``iters``-step fori_loop."""
  def perturb(i):
    return x * (1 + i.astype(x.dtype) * jnp.asarray(1e-3, x.dtype))

  @jax.jit
  def run(x0):
    del x0
    return jax.lax.fori_loop(0, iters, lambda i, _: fn(perturb(i)), fn(x))

  jax.block_until_ready(run(x))  # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(run(x))
    times.append((time.perf_counter() - t0) * 1e3 / (iters + 1))
  return statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=8192)
  p.add_argument("--k", type=int, default=8192)
  p.add_argument("--m", type=int, nargs="+", default=[1, 16])
  p.add_argument("--blocksize", type=int, default=64)
  p.add_argument("--iters", type=int, default=200)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--block-n", type=int, default=64)
  p.add_argument("--block-k", type=int, default=512)
  p.add_argument("--k-per-program", type=int, default=2048)
  p.add_argument("--num-warps", type=int, default=4)
  p.add_argument("--num-stages", type=int, default=2)
  p.add_argument("--interpret", action="store_true",
                 help="CPU: Pallas interpret mode on a small shape (exercises the code only)")
  args = p.parse_args()
  if args.interpret:
    args.n, args.k, args.iters, args.repeats = 256, 512, 2, 1
  n, k, bs = args.n, args.k, args.blocksize

  dev = jax.devices()[0]
  peak = next((v for key, v in PEAK_GBPS.items() if key in dev.device_kind), None)
  if dev.platform != "gpu" and not args.interpret:
    raise SystemExit("no GPU: run with --interpret to exercise the code on CPU")
  w = jax.random.normal(jax.random.key(0), (n, k), jnp.bfloat16) * 0.02
  q, state = fourbit.quantize_4bit(w, bs, "nf4")
  packed, absmax = fourbit.storage_bytes(q), unnest_absmax(state)
  qw = Quantized4bit(packed=q, state=state, shape=(k, n), dtype=jnp.dtype(jnp.bfloat16),
                     transposed=True, n_in=1, compute_dtype=jnp.dtype(jnp.bfloat16))
  wd = fourbit.dequantize_4bit(q, state)  # bf16 (N, K): the dense baseline

  pallas = lambda x: gv.gemv_4bit(
      x, packed, absmax, n_out=n, blocksize=bs, quant_type="nf4", block_n=args.block_n,
      block_k=args.block_k, k_per_program=args.k_per_program, interpret=args.interpret,
      num_warps=args.num_warps, num_stages=args.num_stages)
  xla = lambda x: ops.matmul_4bit(x, qw, backend="xla")
  bf16 = lambda x: jax.lax.dot_general(x, wd, (((1,), (1,)), ((), ())),
                                       preferred_element_type=jnp.float32).astype(x.dtype)

  print(f"device: {dev.device_kind}  W: ({n}, {k}) NF4 bs {bs}  iters {args.iters}"
        f"{'  [interpret mode: timings meaningless]' if args.interpret else ''}")
  print(f"tiling (BN, KB, steps, splits): {gv.tiling(n, k, bs, block_n=args.block_n,
                                                     block_k=args.block_k,
                                                     k_per_program=args.k_per_program)}")
  hdr = f"{'op':<14}{'M':>4}{'ms':>10}{'GB/s':>10}{'% peak':>9}{'vs bf16':>9}{'vs xla':>9}"
  print(hdr + "\n" + "-" * len(hdr))
  w4_bytes = n * k // 2 + absmax.size * 4
  for m in args.m:
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
    io = (m * k + m * n) * 2
    want = bf16(x).astype(jnp.float32)
    err = float(jnp.max(jnp.abs(pallas(x).astype(jnp.float32) - want)))
    rows = {name: _timed(fn, x, args.iters, args.repeats)
            for name, fn in (("bf16 matmul", bf16), ("xla nf4", xla), ("pallas nf4", pallas))}
    for name, ms in rows.items():
      nbytes = (n * k * 2 if name == "bf16 matmul" else w4_bytes) + io
      gbps = nbytes / ms / 1e6
      pct = f"{100 * gbps / peak:.1f}" if peak else "-"
      print(f"{name:<14}{m:>4}{ms:>10.4f}{gbps:>10.1f}{pct:>9}"
            f"{ms / rows['bf16 matmul']:>9.2f}{ms / rows['xla nf4']:>9.2f}")
    print(f"  max |pallas - bf16(dequantized W)| at M={m}: {err:.3g}")


if __name__ == "__main__":
  main()
