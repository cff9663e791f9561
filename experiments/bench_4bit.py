"""NF4 matmul / dequantize / quantize: jaxbnb-pallas vs jaxbnb-xla vs bitsandbytes vs bf16.

One table per (N, K) weight: for each M, NF4 and NF4 + double quantization (DQ), the median
device ms of
  * ``pallas``: the Pallas kernel ``jaxbnb`` would run (GEMV for M <= 16, fused GEMM above);
  * ``pallas-2st``: M > 16 only: the Pallas dequantize kernel into bf16, then XLA's bf16 dot (the
    bitsandbytes strategy; shows whether the fused GEMM beats it);
  * ``xla``: ``jaxbnb.matmul_4bit(backend="xla")``;
  * ``bnb``: ``bitsandbytes.matmul_4bit`` (torch, CUDA events, in a subprocess writing JSON;
    only when torch + bitsandbytes + CUDA import);
  * ``bf16``: a dense bf16 matmul of the same shape (XLA, and torch's in the bnb subprocess),
with ratios to bnb and to bf16 (both measured in this run), the achieved bandwidth of the bytes
each op must move and its % of the HBM bandwidth measured here by a large copy. Then
dequantize_4bit and quantize_4bit (from bf16) at 8192^2, bs 64.

JAX timings run the op ``--iters`` times inside one jit (``lax.fori_loop``, the input perturbed
each step so nothing is hoisted) and divide: one jit dispatch costs ~0.08 ms (measured on an H100).

  python experiments/bench_4bit.py                       # GPU: the full grid
  python experiments/bench_4bit.py --m 1 16 512 --shapes 8192x8192
  python experiments/bench_4bit.py --quick               # CPU, interpret mode (= --interpret)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import attempt, device_time_ms

M_GRID = (1, 4, 16, 64, 512, 4096)
SHAPES = ("4096x4096", "8192x8192", "14336x4096", "4096x14336")  # N x K of W (out, in)
GEMV_MAX_M = 16


# --- JAX side ------------------------------------------------------------------------------------



def measured_bandwidth(iters, repeats, nbytes=1 << 30):
  """GB/s of a streaming read + write (``y = x * c``) of ``nbytes`` bf16 each way."""
  import jax.numpy as jnp
  x = jnp.ones((nbytes // 2,), jnp.bfloat16)
  ms = device_time_ms(lambda v: v * jnp.asarray(1.0001, v.dtype), x, iters, repeats)
  return 2 * nbytes / ms / 1e6


def jax_rows(args):
  """{(n, k, m, dq, op): ms} plus {"dequant"/"quant": ms} and the measured GB/s."""
  import jax
  import jax.numpy as jnp

  from jaxbnb import ops
  from jaxbnb.functional import fourbit
  from jaxbnb.qtensor import Quantized4bit
  from pallas_kernels import common
  from pallas_kernels import dequant_4bit as dq_kernel
  from pallas_kernels import gemm_4bit as gm
  from pallas_kernels import gemv_4bit as gv
  from pallas_kernels import quant_4bit as qk

  interp = args.interpret
  bs = args.blocksize
  out, errs = {}, {}
  for shape in args.shapes:
    n, k = map(int, shape.split("x"))
    w = jax.random.normal(jax.random.key(0), (n, k), jnp.bfloat16) * 0.02
    wd = None
    for dq in (False, True):
      q, state = fourbit.quantize_4bit(w, bs, "nf4", compress_statistics=dq)
      packed = fourbit.storage_bytes(q)
      absmax = (common.NestedAbsmax(state.absmax, state.state2.absmax, state.offset,
                                    state.state2.code) if dq else state.absmax)
      qw = Quantized4bit(packed=q, state=state, shape=(k, n), dtype=jnp.dtype(jnp.bfloat16),
                         transposed=True, n_in=1, compute_dtype=jnp.dtype(jnp.bfloat16))
      if wd is None:
        wd = fourbit.dequantize_4bit(q, state)  # bf16 (N, K): the dense baseline
      kw = dict(n_out=n, blocksize=bs, quant_type="nf4", interpret=interp)
      gemv = lambda x: gv.gemv_4bit(x, packed, absmax, **kw)
      gemm = lambda x: gm.gemm_4bit(x, packed, absmax, **kw)
      two_stage = lambda x: jax.lax.dot_general(
          x, dq_kernel.dequantize_4bit(packed, absmax, n=n * k, blocksize=bs, quant_type="nf4",
                                       out_dtype=jnp.bfloat16, interpret=interp).reshape(n, k),
          (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(x.dtype)
      xla = lambda x: ops.matmul_4bit(x, qw, backend="xla")
      bf16 = lambda x: jax.lax.dot_general(x, wd, (((1,), (1,)), ((), ())),
                                           preferred_element_type=jnp.float32).astype(x.dtype)
      for m in args.m:
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
        pallas = gemv if m <= GEMV_MAX_M else gemm
        fns = {"pallas": pallas, "xla": xla}
        if m > GEMV_MAX_M:
          fns["pallas-2st"] = two_stage
        if not dq:
          fns["bf16"] = bf16
        wall = {}
        for name, fn in fns.items():
          t0 = time.perf_counter()  # compile + warm-up + timed loops: tells a slow compile apart
          out[(n, k, m, dq, name)] = attempt(f"{name} {n}x{k} M={m} dq={dq}", device_time_ms,
                                             fn, x, args.iters, args.repeats)
          wall[name] = time.perf_counter() - t0
        want = bf16(x).astype(jnp.float32)
        errs[(n, k, m, dq)] = attempt(
            f"pallas check {n}x{k} M={m}", lambda: float(jnp.max(jnp.abs(
                pallas(x).astype(jnp.float32) - want))))
        # a line per cell as it is measured: a run cut short still leaves its numbers
        print(f"[{n}x{k} M={m} dq={int(dq)}: ms (wall s) " + ", ".join(
            f"{name} {out[(n, k, m, dq, name)]} ({wall[name]:.1f})" for name in fns) + "]",
              flush=True)
  # dequantize / quantize at the first shape (8192^2 in the full grid)
  n, k = map(int, args.shapes[min(1, len(args.shapes) - 1)].split("x"))
  w = jax.random.normal(jax.random.key(1), (n, k), jnp.bfloat16)
  q, state = fourbit.quantize_4bit(w, bs, "nf4")
  packed = fourbit.storage_bytes(q)
  out["dequant"] = attempt("pallas dequant", device_time_ms,
      lambda a: dq_kernel.dequantize_4bit(packed, a, n=n * k, blocksize=bs, quant_type="nf4",
                                          out_dtype=jnp.bfloat16, interpret=interp),
      state.absmax, args.iters, args.repeats)
  # Both outputs are returned (the loop carry), so neither op can be trimmed to its absmax.
  out["quant"] = attempt("pallas quant", device_time_ms,
      lambda x: qk.quantize_4bit(x, blocksize=bs, quant_type="nf4", interpret=interp),
      w, args.iters, args.repeats)
  out["dequant_xla"] = attempt("xla dequant", device_time_ms,
      lambda a: fourbit.dequantize_4bit(q, dataclasses.replace(state, absmax=a)),
      state.absmax, args.iters, args.repeats)
  out["quant_xla"] = attempt("xla quant", device_time_ms,
      lambda x: (lambda q, st: (q, st.absmax))(*fourbit.quantize_4bit(x, bs, "nf4")), w,
      args.iters, args.repeats)
  out["dq_shape"] = (n, k)
  return out, errs


# --- torch / bitsandbytes side (a subprocess: CUDA events, JSON out) -----------------------------


def torch_worker(args, path):
  import torch
  import bitsandbytes as bnb
  import bitsandbytes.functional as F

  def timed(fn):
    for _ in range(3):
      fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.repeats):
      start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      start.record()
      for _ in range(args.iters):
        fn()
      end.record()
      torch.cuda.synchronize()
      times.append(start.elapsed_time(end) / args.iters)
    return statistics.median(times)

  res = {}
  dev = "cuda"
  with torch.inference_mode():
    for shape in args.shapes:
      n, k = map(int, shape.split("x"))
      w = torch.randn(n, k, dtype=torch.bfloat16, device=dev) * 0.02
      for dq in (False, True):
        qw, st = F.quantize_4bit(w, blocksize=args.blocksize, quant_type="nf4",
                                 compress_statistics=dq)
        for m in args.m:
          x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
          res[f"{n},{k},{m},{int(dq)},bnb"] = timed(lambda: bnb.matmul_4bit(x, qw.t(), st))
          if not dq:
            res[f"{n},{k},{m},0,bf16-torch"] = timed(lambda: torch.matmul(x, w.t()))
    n, k = map(int, args.shapes[min(1, len(args.shapes) - 1)].split("x"))
    w = torch.randn(n, k, dtype=torch.bfloat16, device=dev)
    qw, st = F.quantize_4bit(w, blocksize=args.blocksize, quant_type="nf4")
    res["dequant"] = timed(lambda: F.dequantize_4bit(qw, st))
    res["quant"] = timed(lambda: F.quantize_4bit(w, blocksize=args.blocksize, quant_type="nf4"))
    res["device"] = torch.cuda.get_device_name()
  with open(path, "w") as f:
    json.dump(res, f)


def bnb_rows(args):
  """bitsandbytes/torch timings from a subprocess, or {} when torch+bnb+CUDA are not there."""
  if args.interpret or not all(importlib.util.find_spec(p) for p in ("torch", "bitsandbytes")):
    return {}
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "bnb.json")
    cmd = [sys.executable, __file__, "--torch-worker", path, "--blocksize", str(args.blocksize),
           "--iters", str(args.iters), "--repeats", str(args.repeats), "--m",
           *map(str, args.m), "--shapes", *args.shapes]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not os.path.exists(path):
      print(f"[bnb subprocess failed: {proc.stderr.strip().splitlines()[-1:]}]")
      return {}
    with open(path) as f:
      return json.load(f)


# --- report --------------------------------------------------------------------------------------


def _nbytes(op, n, k, m, dq, bs):
  io = (m * k + m * n) * 2
  if op.startswith("bf16"):
    return n * k * 2 + io
  nb = n * k // bs
  absmax = nb + (nb // 256) * 4 if dq else nb * 4
  extra = 2 * n * k * 2 if op == "pallas-2st" else 0  # bf16 W written then read
  return n * k // 2 + absmax + io + extra


def report(args, jx, errs, tb, gbps):
  bs = args.blocksize
  fmt = lambda v, w=8, p=4: f"{v:>{w}.{p}f}" if isinstance(v, float) else f"{'-':>{w}}"
  for shape in args.shapes:
    n, k = map(int, shape.split("x"))
    print(f"\nW (N, K) = ({n}, {k}), NF4 bs {bs}")
    hdr = (f"{'M':>5} {'dq':>3} {'op':<11}{'ms':>9}{'GB/s':>9}{'%HBM':>7}{'TFLOP/s':>9}"
           f"{'vs bnb':>8}{'vs bf16':>8}")
    print(hdr + "\n" + "-" * len(hdr))
    for m in args.m:
      bf = jx.get((n, k, m, False, "bf16"))
      for dq in (False, True):
        bnb_ms = tb.get(f"{n},{k},{m},{int(dq)},bnb")
        rows = [(op, jx.get((n, k, m, dq, op))) for op in ("pallas", "pallas-2st", "xla", "bf16")]
        rows += [("bnb", bnb_ms), ("bf16-torch", tb.get(f"{n},{k},{m},{int(dq)},bf16-torch"))]
        for op, ms in rows:
          if ms is None:
            continue
          gb = _nbytes(op, n, k, m, dq, bs) / ms / 1e6
          tf = 2 * m * n * k / ms / 1e9
          print(f"{m:>5} {'y' if dq else 'n':>3} {op:<11}{ms:>9.4f}{gb:>9.1f}"
                f"{100 * gb / gbps:>7.1f}{tf:>9.1f}{fmt(ms / bnb_ms if bnb_ms else None, 8, 2)}"
                f"{fmt(ms / bf if bf else None, 8, 2)}")
        err = errs.get((n, k, m, dq))
        print(f"{'':>10}max |pallas - bf16(dequantized W)| = "
              f"{'failed' if err is None else f'{err:.3g}'}")
  n, k = jx["dq_shape"]
  print(f"\n({n}, {k}) bs {bs}: ms    (targets on an H100 8192^2: dequant <= 0.075, "
        f"quant <= 0.10)")
  for name in ("dequant", "quant"):
    b = tb.get(name)
    pl = jx[name]
    print(f"  {name:<8} pallas {fmt(pl, 6)}   xla {fmt(jx[name + '_xla'], 6)}   bnb "
          f"{fmt(b, 6)}   pallas/bnb {fmt(pl / b if b and pl else None, 5, 2)}")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--m", type=int, nargs="+", help=f"batch sizes (default {M_GRID})")
  p.add_argument("--shapes", nargs="+", help=f"NxK of W (default {SHAPES})")
  p.add_argument("--blocksize", type=int, default=64)
  p.add_argument("--iters", type=int, default=100)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--interpret", "--quick", action="store_true",
                 help="CPU smoke run: Pallas interpret mode, tiny shapes unless --m/--shapes "
                 "are given, 1 iteration (exercises the code; timings meaningless)")
  p.add_argument("--torch-worker", metavar="JSON", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.interpret:
    args.iters, args.repeats = 1, 1
  args.m = args.m or ([1, 20] if args.interpret else list(M_GRID))
  args.shapes = args.shapes or (["64x256"] if args.interpret else list(SHAPES))
  if args.torch_worker:
    return torch_worker(args, args.torch_worker)

  # torch/bnb first: before JAX takes the GPU (it preallocates most of its memory), and so
  # the two processes never share the GPU while timing.
  tb = bnb_rows(args)
  if tb:  # now, not only in the final table: a run cut short keeps bitsandbytes' side
    print("bnb side (ms): " + ", ".join(
        f"{k} {v:.4f}" for k, v in tb.items() if isinstance(v, float)), flush=True)
  import jax
  dev = jax.devices()[0]
  if dev.platform != "gpu" and not args.interpret:
    raise SystemExit("no GPU: run with --quick (or --interpret) to exercise the code on CPU")
  gbps = measured_bandwidth(args.iters, args.repeats,
                            nbytes=(1 << 16) if args.interpret else (1 << 30))
  jx, errs = jax_rows(args)
  print(f"device: {dev.device_kind}  (bnb side: {tb.get('device', 'not run')})  "
        f"measured copy bandwidth {gbps:.0f} GB/s  iters {args.iters}"
        f"{'  [interpret mode: timings meaningless]' if args.interpret else ''}")
  report(args, jx, errs, tb, gbps)


if __name__ == "__main__":
  main()
