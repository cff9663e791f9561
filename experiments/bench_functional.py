"""Quantize/dequantize throughput of jaxbnb's functional core (XLA path), vs bitsandbytes.

Prints one table: median device time per call, GB/s of the bytes each op must move, % of the
device's memory bandwidth (GPUs with a known peak), and ratios to a bf16 cast of the same tensor
and to bitsandbytes in the same run (when torch + bitsandbytes import and share the device).

Each timing runs the op `--iters` times inside one jit (lax.fori_loop, the input perturbed each
step so nothing is hoisted), so Python dispatch is not measured (~0.08 ms per call on an H100).

  python experiments/bench_functional.py [--size 4096] [--iters 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchlib import device_name, peak_gbps
from jaxbnb import functional as F
from jaxbnb.functional import blockwise, fourbit



def _loop(fn, x, iters):
  """jit: run fn on a perturbed x `iters` times, carrying the last output."""
  def perturb(v, i):
    if jnp.issubdtype(v.dtype, jnp.floating):
      return v * (1 + i.astype(v.dtype) * jnp.asarray(1e-3, v.dtype))
    return v ^ (i & 1).astype(v.dtype)

  @jax.jit
  def run(x):
    out0 = fn(x)
    return jax.lax.fori_loop(0, iters, lambda i, _: fn(perturb(x, i)), out0)
  return run


def time_jax(fn, x, iters, repeats):
  run = _loop(fn, x, iters)
  jax.block_until_ready(run(x))  # compile + warm up
  samples = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(run(x))
    samples.append((time.perf_counter() - t) / (iters + 1))
  return statistics.median(samples)


def time_bnb(size, iters, repeats):
  """bitsandbytes timings (seconds) of the same ops, or {} if it is not usable here."""
  try:
    import torch
    import bitsandbytes.functional as bF
  except Exception:  # noqa: BLE001 - any import failure means "no peer in this run"
    return {}
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  x = torch.randn(size, size, device=dev, dtype=torch.bfloat16)

  def t(fn):
    fn()
    if dev == "cuda":
      torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
      if dev == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
          fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / iters)
      else:
        s = time.perf_counter()
        for _ in range(iters):
          fn()
        samples.append((time.perf_counter() - s) / iters)
    return statistics.median(samples)

  x32 = x.float()
  q4, s4 = bF.quantize_4bit(x, blocksize=64, quant_type="nf4")
  q8, s8 = bF.quantize_blockwise(x, blocksize=256)
  return {
      "quantize_4bit nf4": t(lambda: bF.quantize_4bit(x, blocksize=64, quant_type="nf4")),
      "dequantize_4bit nf4": t(lambda: bF.dequantize_4bit(q4, s4)),
      "quantize_blockwise": t(lambda: bF.quantize_blockwise(x, blocksize=256)),
      "dequantize_blockwise": t(lambda: bF.dequantize_blockwise(q8, s8)),
      "bf16 cast (fp32->bf16)": t(lambda: x32.to(torch.bfloat16)),
  }, f"bitsandbytes on {dev}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", type=int, default=4096, help="square tensor side")
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  n = args.size * args.size
  dev = jax.devices()[0]
  x = jax.random.normal(jax.random.key(0), (args.size, args.size), jnp.bfloat16)
  x32 = x.astype(jnp.float32)
  q4, s4 = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
  q4d, s4d = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
  q8, s8 = F.quantize_blockwise(x, blocksize=256)

  # name -> (fn, input, bytes that must move: read + write)
  cases = {
      "bf16 cast (fp32->bf16)": (lambda v: v.astype(jnp.bfloat16), x32, n * 4 + n * 2),
      "quantize_4bit nf4": (
          lambda v: fourbit._quantize_4bit(v, 64, "nf4", False, np.dtype(np.uint8)), x,
          n * 2 + n // 2 + n // 64 * 4),
      "quantize_4bit nf4+dq": (
          lambda v: fourbit._quantize_4bit(v, 64, "nf4", True, np.dtype(np.uint8)), x,
          n * 2 + n // 2 + n // 64),
      "dequantize_4bit nf4": (lambda q: fourbit._dequantize_4bit(q, s4), q4,
                              n // 2 + n // 64 * 4 + n * 2),
      "dequantize_4bit nf4+dq": (lambda q: fourbit._dequantize_4bit(q, s4d), q4d,
                                 n // 2 + n // 64 + n * 2),
      "quantize_blockwise": (
          lambda v: blockwise._quantize(v, F.create_dynamic_map(), 256, False), x,
          n * 2 + n + n // 256 * 4),
      "dequantize_blockwise": (lambda q: blockwise._dequantize(q, s8), q8,
                               n + n // 256 * 4 + n * 2),
  }
  times = {name: time_jax(fn, inp, args.iters, args.repeats)
           for name, (fn, inp, _) in cases.items()}
  bnb = time_bnb(args.size, args.iters, args.repeats)
  bnb_times, bnb_where = bnb if bnb else ({}, "bitsandbytes not importable")
  peak = peak_gbps(dev)

  print(f"jaxbnb functional (XLA), {args.size}x{args.size} bf16 input, "
        f"device: {device_name(dev)}, jax {jax.__version__}, "
        f"{datetime.date.today()}; {bnb_where}")
  print(f"{'op':<26}{'ms':>9}{'GB/s':>9}{'% peak':>8}{'x bf16 cast':>13}{'x bnb':>8}")
  base = times["bf16 cast (fp32->bf16)"]
  for name, (_, _, nbytes) in cases.items():
    t = times[name]
    gbps = nbytes / t / 1e9
    pct = f"{100 * gbps / peak:.0f}%" if peak else "-"
    vs_bnb = f"{t / bnb_times[name]:.2f}" if name in bnb_times else "-"
    print(f"{name:<26}{t * 1e3:>9.3f}{gbps:>9.1f}{pct:>8}{t / base:>13.2f}{vs_bnb:>8}")


if __name__ == "__main__":
  main()
