"""LLM.int8() linear (y = x @ W.T, W int8 (N, K), x (M, K) fp16): Pallas vs XLA vs bnb vs bf16.

One table: device time per call (ms) of
  * pallas   : pallas_kernels.int8_matmul.int8_linear (quant kernel + fused int8 GEMM/GEMV),
  * xla      : jaxbnb.int8_matmul(backend="xla"),
  * bnb      : bitsandbytes 0.50.2 Linear8bitLt (fp16, has_fp16_weights=False), timed with CUDA
               events in a subprocess (torch CUDA); "-" when torch + bitsandbytes + CUDA are not
               importable,
  * bf16     : a plain bf16 x bf16 -> f32 -> bf16 XLA matmul of the same shape,
all in the same run, with ratios and the Pallas path's share of the HBM peak (bytes it must
move: int8 W + SCB + x + y; 3.35 TB/s on an H100).

Cases: M in {1, 16, 512, 4096} x (N, K) in {(4096, 4096), (8192, 8192), (14336, 4096),
(4096, 14336)}; threshold 0, and threshold 6 with 0.1% and 1% of x's columns made outliers
(x20, so |x| >= 6 somewhere in each). Targets (H100, 8192x8192, threshold 6): M=1 <= 0.040 ms
(bnb 0.290), M=4096 <= 0.80 ms (bnb 1.141, bf16 0.72).

JAX timings run the op `--iters` times inside one jit (lax.fori_loop, x perturbed each step so
nothing is hoisted) and divide: one jit call costs ~0.08 ms of host dispatch (measured on an H100).
`--quick` runs small shapes in Pallas interpret mode on CPU: it exercises the code in seconds;
its timings mean nothing.

  python experiments/bench_int8.py [--m 1 4096] [--shapes 8192x8192] [--thresholds 6]
  python experiments/bench_int8.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxbnb import ops  # noqa: E402
from jaxbnb.qtensor import Quantized8bit  # noqa: E402
from jaxbnb.functional import int8 as F  # noqa: E402
from pallas_kernels import int8_matmul as im  # noqa: E402
from benchlib import attempt, device_time_ms, peak_gbps  # noqa: E402


# Runs in a subprocess (torch and JAX in one process fight over GPU memory): times bnb's
# Linear8bitLt and a torch bf16 matmul with CUDA events; prints one JSON object.
_BNB_SCRIPT = r"""
import json, statistics, sys
import torch, bitsandbytes as bnb
assert torch.cuda.is_available()
cfg = json.loads(sys.argv[1])
iters, repeats = cfg["iters"], cfg["repeats"]

def timed(fn):
  fn(); torch.cuda.synchronize()
  ts = []
  for _ in range(repeats):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
      fn()
    b.record(); torch.cuda.synchronize()
    ts.append(a.elapsed_time(b) / iters)
  return statistics.median(ts)

out = {}
g = torch.Generator(device="cuda").manual_seed(0)
for m, n, k, thr, frac in cfg["cases"]:
  lin = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=thr)
  w = torch.randn(n, k, dtype=torch.float16) * 0.02
  lin.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
  lin = lin.cuda()
  x = torch.randn(m, k, dtype=torch.float16, device="cuda", generator=g)
  if thr > 0 and frac > 0:
    cols = torch.randperm(k, device="cuda", generator=g)[:max(1, round(frac * k))]
    x[:, cols] *= 20
  with torch.no_grad():
    out[f"{m},{n},{k},{thr},{frac}"] = timed(lambda: lin(x))
    key = f"bf16,{m},{n},{k}"
    if key not in out:
      xb, wb = x.bfloat16(), w.cuda().bfloat16()
      out[key] = timed(lambda: xb @ wb.T)
  del lin
print(json.dumps(out))
"""



def _bnb_times(cases, iters, repeats):
  """{case key: ms} from the bitsandbytes subprocess, or {} when it cannot run here."""
  cfg = json.dumps({"cases": cases, "iters": iters, "repeats": repeats})
  try:
    out = subprocess.run([sys.executable, "-c", _BNB_SCRIPT, cfg], capture_output=True,
                         text=True, timeout=1800)
  except (OSError, subprocess.TimeoutExpired) as e:
    print(f"bnb: not run ({e})")
    return {}
  if out.returncode != 0:
    last = (out.stderr.strip().splitlines() or ["?"])[-1]
    print(f"bnb: not available ({last[:120]})")
    return {}
  return json.loads(out.stdout.strip().splitlines()[-1])


def _activations(m, k, thr, frac, key):
  x = jax.random.normal(key, (m, k), jnp.float32)
  if thr > 0 and frac > 0:
    cols = jax.random.permutation(jax.random.fold_in(key, 1), k)[:max(1, round(frac * k))]
    x = x.at[:, cols].multiply(20.0)
  return x.astype(jnp.float16)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--m", type=int, nargs="+", default=[1, 16, 512, 4096])
  p.add_argument("--shapes", nargs="+", default=["4096x4096", "8192x8192", "14336x4096",
                                                 "4096x14336"], help="NxK")
  p.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 6.0])
  p.add_argument("--fracs", type=float, nargs="+", default=[0.001, 0.01],
                 help="outlier column fractions (threshold > 0)")
  p.add_argument("--iters", type=int, default=100)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--no-bnb", action="store_true")
  p.add_argument("--quick", action="store_true",
                 help="CPU: small shapes in Pallas interpret mode (exercises the code only)")
  args = p.parse_args()
  interpret = args.quick
  if args.quick:
    args.m, args.shapes, args.fracs = [1, 20], ["64x128"], [0.01]
    args.iters, args.repeats, args.no_bnb = 2, 1, True
  dev = jax.devices()[0]
  if dev.platform != "gpu" and not interpret:
    raise SystemExit("no GPU: run with --quick to exercise the code on CPU")
  peak = peak_gbps(dev)
  shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
  cases = [(m, n, k, thr, frac if thr > 0 else 0.0)
           for (n, k) in shapes for m in args.m for thr in args.thresholds
           for frac in (args.fracs if thr > 0 else [0.0])]
  bnb = {} if args.no_bnb else _bnb_times(cases, args.iters, args.repeats)

  print(f"device: {dev.device_kind}  iters {args.iters}  x fp16 (bf16 for the bf16 matmul)"
        f"{'  [interpret mode: timings meaningless]' if interpret else ''}")
  hdr = (f"{'M':>5}{'N':>7}{'K':>7}{'thr':>5}{'outl%':>7}{'pallas':>9}{'xla':>9}{'bnb':>9}"
         f"{'bf16':>9}{'pl/bnb':>8}{'pl/bf16':>8}{'pl/xla':>8}{'%HBM':>6}{'max|pl-xla|':>13}")
  print(hdr + "\n" + "-" * len(hdr))
  weights = {}
  for m, n, k, thr, frac in cases:
    if (n, k) not in weights:
      w16 = (jax.random.normal(jax.random.key(n + k), (n, k), jnp.float32) * 0.02).astype(
          jnp.float16)
      cb, scb, _ = F.int8_vectorwise_quant(w16)
      weights = {(n, k): (cb, scb, w16.astype(jnp.bfloat16))}  # one shape resident at a time
    cb, scb, wb = weights[(n, k)]
    qw = Quantized8bit(CB=cb, SCB=scb, shape=(k, n), dtype=jnp.dtype(jnp.float16),
                       transposed=True, n_in=1, threshold=thr)
    x = _activations(m, k, thr, frac, jax.random.key(m))
    pallas = lambda x: im.int8_linear(x, cb, scb, threshold=thr, interpret=interpret)
    xla = lambda x: ops.int8_matmul(x, qw, threshold=thr, backend="xla")
    bf16 = lambda x: jax.lax.dot_general(x.astype(jnp.bfloat16), wb, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    err = attempt(f"pallas check M={m} {n}x{k}", lambda: float(jnp.max(jnp.abs(
        pallas(x).astype(jnp.float32) - xla(x).astype(jnp.float32)))))
    t = {name: attempt(f"{name} M={m} {n}x{k} thr={thr:g}", device_time_ms, fn, x, args.iters,
                       args.repeats)
         for name, fn in (("pallas", pallas), ("xla", xla), ("bf16", bf16))}
    t_bnb = bnb.get(f"{m},{n},{k},{thr},{frac}")
    nbytes = n * k + 4 * n + 2 * m * k + 2 * m * n
    pct = f"{100 * nbytes / t['pallas'] / 1e6 / peak:.0f}" if peak and t["pallas"] else "-"
    f = lambda v: f"{v:9.4f}" if v is not None else f"{'-':>9}"
    r = lambda a, b: f"{a / b:8.2f}" if a and b else f"{'-':>8}"
    print(f"{m:>5}{n:>7}{k:>7}{thr:>5g}{100 * frac:>7.2g}{f(t['pallas'])}{f(t['xla'])}"
          f"{f(t_bnb)}{f(t['bf16'])}{r(t['pallas'], t_bnb)}{r(t['pallas'], t['bf16'])}"
          f"{r(t['pallas'], t['xla'])}{pct:>6}{err if err is not None else float('nan'):>13.3g}")
  if bnb:
    print("torch bf16 matmul (same subprocess, CUDA events), ms: "
          + ", ".join(f"{k[5:]}: {v:.4f}" for k, v in bnb.items() if k.startswith("bf16,")))


if __name__ == "__main__":
  main()
