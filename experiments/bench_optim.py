"""Step time of 8-bit AdamW (jaxbnb, XLA path) vs optax.adamw, and vs bitsandbytes' AdamW8bit
and torch's fused AdamW when torch is importable — one table, same run.

Each timing runs `--steps` optimizer steps inside one jit (lax.fori_loop carrying params and
state; the gradient is perturbed per step), so Python dispatch is not measured. The byte count
per step is what the update must move at minimum: fp32 param read+write, fp32 grad read, and
the state read+write (2 x 1 byte for 8-bit Adam, 2 x 4 bytes for 32-bit), absmax included.

  python experiments/bench_optim.py                  # 4 x 8192x8192 fp32 (268M params; GPU)
  python experiments/bench_optim.py --side 2048      # 4 x 2048x2048 (CPU-sized)
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from jaxbnb import optim

PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


def time_steps(tx, params, steps, repeats):
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

  @jax.jit
  def run(params, state):
    def body(i, carry):
      p, s = carry
      g = jax.tree.map(lambda x: x * (1 + i.astype(jnp.float32) * 1e-3), grads)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    return jax.lax.fori_loop(0, steps, body, (params, state))

  state = tx.init(params)
  params, state = jax.block_until_ready(run(params, state))  # compile + warm up
  samples = []
  for _ in range(repeats):
    t = time.perf_counter()
    params, state = jax.block_until_ready(run(params, state))
    samples.append((time.perf_counter() - t) / steps)
  return statistics.median(samples), optim.state_bytes(state)


def time_torch(n_tensors, side, steps, repeats):
  try:
    import torch
    import bitsandbytes as bnb
  except Exception:  # noqa: BLE001 - no torch peer in this run
    return {}
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  out = {}
  makers = {"bitsandbytes AdamW8bit": lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3)}
  if dev == "cuda":
    makers["torch AdamW (fused)"] = lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)
  for name, make in makers.items():
    ps = [torch.nn.Parameter(torch.randn(side, side, device=dev)) for _ in range(n_tensors)]
    for p in ps:
      p.grad = torch.full_like(p, 1e-3)
    opt = make(ps)
    opt.step()
    samples = []
    for _ in range(repeats):
      if dev == "cuda":
        torch.cuda.synchronize()
      t = time.perf_counter()
      for _ in range(steps):
        opt.step()
      if dev == "cuda":
        torch.cuda.synchronize()
      samples.append((time.perf_counter() - t) / steps)
    out[name] = statistics.median(samples)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--side", type=int, default=8192)
  parser.add_argument("--tensors", type=int, default=4)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  dev = jax.devices()[0]
  params = {f"w{i}": jax.random.normal(jax.random.key(i), (args.side, args.side))
            for i in range(args.tensors)}
  n = args.tensors * args.side * args.side
  rows = {}
  for name, tx in [("jaxbnb adamw8bit (xla)", optim.adamw8bit(1e-3)),
                   ("optax adamw (fp32 state)", optax.adamw(1e-3))]:
    t, state_bytes = time_steps(tx, params, args.steps, args.repeats)
    rows[name] = (t, state_bytes, n * 12 + 2 * state_bytes)
  torch_rows = time_torch(args.tensors, args.side, args.steps, args.repeats)
  peak = next((v for k, v in PEAK_GBPS.items() if k in dev.device_kind), None)
  base = rows["optax adamw (fp32 state)"][0]
  print(f"AdamW step, {args.tensors} x {args.side}x{args.side} fp32 ({n / 1e6:.0f}M params), "
        f"device: {dev.platform} {dev.device_kind}, jax {jax.__version__}, "
        f"{datetime.date.today()}")
  print(f"{'optimizer':<28}{'ms/step':>10}{'state MB':>10}{'GB/s':>8}{'% peak':>8}"
        f"{'x optax':>9}")
  for name, (t, sb, nbytes) in rows.items():
    gbps = nbytes / t / 1e9
    pct = f"{100 * gbps / peak:.0f}%" if peak else "-"
    print(f"{name:<28}{t * 1e3:>10.3f}{sb / 1e6:>10.1f}{gbps:>8.1f}{pct:>8}{t / base:>9.2f}")
  for name, t in torch_rows.items():
    print(f"{name:<28}{t * 1e3:>10.3f}{'-':>10}{'-':>8}{'-':>8}{t / base:>9.2f}")
  if dev.platform == "gpu" or dev.platform == "cuda":
    stats = dev.memory_stats() or {}
    print(f"peak device memory: {stats.get('peak_bytes_in_use', 0) / 2**30:.2f} GiB")


if __name__ == "__main__":
  main()
