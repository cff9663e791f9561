"""Step time and device memory of 8-bit AdamW: jaxbnb (XLA path, fused Pallas kernel, in-place
fused step, paged state) vs optax.adamw, and vs bitsandbytes' AdamW8bit and torch's fused AdamW
when torch is importable — one table, same run.

Each timing runs `--steps` optimizer steps inside one jit (lax.fori_loop carrying params and
state, donated; the gradient is perturbed per step), so Python dispatch is not measured.

Rows:
  adamw8bit (xla|pallas)         optax path: `tx.update` then `optax.apply_updates`
  adamw8bit_fused (xla|pallas)   `optim.adamw8bit_fused(...).step`: params written in place
  paged adamw8bit (xla)          `optim.paged_adamw8bit`: state in pinned host memory
  optax adamw (fp32 state)       the 32-bit baseline

`B/param` is the traffic each design moves per fp32 parameter at least (state: 2 x 2.03 B for
8-bit moments with absmax, read and written): the optax path's kernel reads g and the moments and
writes the update and the moments, then XLA's epilogue reads update and param and writes the
param (20 B + state = 24.06 B); the fused step reads g and p and writes p once (12 B + state =
16.06 B, the minimum); optax.adamw fused by XLA: 12 B + 2 x 8 B. The paged state also crosses
PCIe twice per step (2 x 2.03 B/param). `GB/s` = B/param x params / time. `device MiB`
is the compiled program's device memory (arguments + outputs + temporaries - aliased, from
`Compiled.memory_analysis()`: params, grads, state and scratch; host-memory state excluded).

  python experiments/bench_optim.py                  # 4 x 8192x8192 fp32 (268M params; GPU)
  python experiments/bench_optim.py --side 2048      # 4 x 2048x2048 (CPU-sized, XLA rows)
  python experiments/bench_optim.py --quick          # seconds on CPU; Pallas rows interpreted
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from benchlib import attempt, device_name, peak_gbps
from jaxbnb import optim



def _run_fn(update, steps):
  """jit(fori_loop) of ``steps`` calls ``update(g, state, params) -> (params, state)``."""

  def run(params, state, grads):
    def body(i, carry):
      p, s = carry
      g = jax.tree.map(lambda x: x * (1 + i.astype(jnp.float32) * 1e-3), grads)
      return update(g, s, p)
    return jax.lax.fori_loop(0, steps, body, (params, state))

  return jax.jit(run, donate_argnums=(0, 1))


def _optax_update(tx):
  def update(g, s, p):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  return update


def _host_bytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree)
             if getattr(getattr(x, "sharding", None), "memory_kind", None) == "pinned_host")


def device_bytes(compiled, args) -> int:
  """Device memory of a compiled program: arguments + outputs + temporaries - aliased, without
  the arguments in pinned host memory (donated, so their outputs alias them)."""
  m = compiled.memory_analysis()
  if m is None:
    return 0
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  if not m.host_argument_size_in_bytes:  # backends that count host arguments as arguments
    total -= _host_bytes(args)
  return int(max(total, 0))


def time_steps(init, update, params, steps, repeats):
  """``(median seconds per step, state bytes, device bytes of the compiled loop)``."""
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
  params = jax.tree.map(jnp.copy, params)  # donated below: keep the caller's arrays
  state = init(params)
  state_bytes = optim.state_bytes(state)
  compiled = _run_fn(update, steps).lower(params, state, grads).compile()
  mem = device_bytes(compiled, state)
  params, state = jax.block_until_ready(compiled(params, state, grads))  # warm up
  samples = []
  for _ in range(repeats):
    t = time.perf_counter()
    params, state = jax.block_until_ready(compiled(params, state, grads))
    samples.append((time.perf_counter() - t) / steps)
  return statistics.median(samples), state_bytes, mem


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
    if dev == "cuda":
      torch.cuda.reset_peak_memory_stats()
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
    mem = torch.cuda.max_memory_allocated() if dev == "cuda" else 0
    out[name] = (statistics.median(samples), mem)
    del opt, ps
  return out


def rows_to_run(on_gpu: bool, quick: bool, skip_pallas: bool):
  """``[(name, init, update, bytes per param excluding state)]``."""
  lr = 1e-3
  rows = [("jaxbnb adamw8bit (xla)", optim.adamw8bit(lr, backend="xla"), "optax", 20)]
  pallas = not skip_pallas and (on_gpu or quick)  # interpret mode is only for tiny sizes
  if pallas:
    rows.append(("jaxbnb adamw8bit (pallas)", optim.adamw8bit(lr, backend="pallas"), "optax",
                 20))
  rows.append(("jaxbnb adamw8bit_fused (xla)", optim.adamw8bit_fused(lr, backend="xla"),
               "fused", 12))
  if pallas:
    rows.append(("jaxbnb adamw8bit_fused (pallas)",
                 optim.adamw8bit_fused(lr, backend="pallas"), "fused", 12))
  if optim.host_memory_supported():
    rows.append(("jaxbnb paged adamw8bit (xla)", optim.paged_adamw8bit(lr, backend="xla"),
                 "optax", 20))
  rows.append(("optax adamw (fp32 state)", optax.adamw(lr), "optax", 12))
  out = []
  for name, tx, kind, bpp in rows:
    update = tx.step if kind == "fused" else _optax_update(tx)
    out.append((name, tx.init, update, bpp))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--side", type=int, default=8192)
  parser.add_argument("--tensors", type=int, default=4)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--quick", action="store_true",
                      help="4 x 256x256, 2 steps, 1 repeat: runs in seconds on CPU, Pallas "
                           "rows in interpret mode (their times mean nothing there)")
  parser.add_argument("--no-pallas", action="store_true", help="skip the Pallas rows")
  parser.add_argument("--no-torch", action="store_true", help="skip bitsandbytes and torch")
  args = parser.parse_args()
  if args.quick:
    args.side, args.steps, args.repeats = 256, 2, 1
  dev = jax.devices()[0]
  on_gpu = dev.platform in ("gpu", "cuda")
  params = {f"w{i}": jax.random.normal(jax.random.key(i), (args.side, args.side))
            for i in range(args.tensors)}
  n = args.tensors * args.side * args.side
  rows = {}
  for name, init, update, bpp in rows_to_run(on_gpu, args.quick, args.no_pallas):
    res = attempt(name, time_steps, init, update, params, args.steps, args.repeats)
    if res is not None:
      t, sb, mem = res
      rows[name] = (t, sb, n * bpp + 2 * sb, mem)
  torch_rows = {} if args.no_torch else (
      attempt("torch rows", time_torch, args.tensors, args.side, args.steps, args.repeats) or {})
  peak = peak_gbps(dev)
  base = rows["optax adamw (fp32 state)"][0]
  interp = "" if on_gpu or not any("pallas" in k for k in rows) else (
      " (Pallas rows: interpret mode)")
  print(f"AdamW step, {args.tensors} x {args.side}x{args.side} fp32 ({n / 1e6:.1f}M params), "
        f"device: {device_name(dev)}, jax {jax.__version__}, "
        f"{datetime.date.today()}{interp}")
  print(f"{'optimizer':<34}{'ms/step':>10}{'state MB':>10}{'B/param':>9}{'GB/s':>8}"
        f"{'% peak':>8}{'x optax':>9}{'device MiB':>12}")
  for name, (t, sb, nbytes, mem) in rows.items():
    gbps = nbytes / t / 1e9
    pct = f"{100 * gbps / peak:.0f}%" if peak else "-"
    print(f"{name:<34}{t * 1e3:>10.3f}{sb / 1e6:>10.1f}{nbytes / n:>9.2f}{gbps:>8.1f}{pct:>8}"
          f"{t / base:>9.2f}{mem / 2**20:>12.1f}")
  for name, (t, mem) in torch_rows.items():
    mem_s = f"{mem / 2**20:.1f}" if mem else "-"
    print(f"{name:<34}{t * 1e3:>10.3f}{'-':>10}{'-':>9}{'-':>8}{'-':>8}{t / base:>9.2f}"
          f"{mem_s:>12}")
  if on_gpu:
    stats = dev.memory_stats() or {}
    print(f"process peak device memory (all rows): "
          f"{stats.get('peak_bytes_in_use', 0) / 2**30:.2f} GiB")


if __name__ == "__main__":
  main()
