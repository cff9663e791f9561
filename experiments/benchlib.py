"""What the benchmark scripts share: device time of a JAX op, and HBM peaks by device kind.

JAX is imported inside the functions: the 4-bit benchmark runs its torch side before JAX starts
(JAX preallocates most of the GPU's memory).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Optional

PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}  # HBM, vendor figures


def peak_gbps(device) -> Optional[float]:
  """The HBM peak of ``device`` (a ``jax.Device``) in GB/s, or None when unknown (CPU)."""
  return next((v for k, v in PEAK_GBPS.items() if k in device.device_kind), None)


def device_name(device) -> str:
  """A readable name for ``device`` (a ``jax.Device``): the GPU kind, or the CPU model."""
  if device.platform != "cpu":
    return device.device_kind
  try:
    with open("/proc/cpuinfo") as f:
      model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                   None)
  except OSError:
    model = None
  return f"CPU {model or device.device_kind}, {os.cpu_count()} cores"


def attempt(label: str, fn: Callable, *args):
  """``fn(*args)``, or None after printing one line naming ``label`` and the error: one variant
  that fails to compile or run (a kernel's first GPU run, say) must not lose a whole table."""
  try:
    return fn(*args)
  except Exception as e:  # noqa: BLE001 - reported, and the table goes on without this cell
    first = (str(e).strip().splitlines() or [""])[0][:300]
    print(f"[{label} failed: {type(e).__name__}: {first}]", flush=True)
    return None


def device_time_ms(fn: Callable, x, iters: int, repeats: int) -> float:
  """Median ms per call of ``fn(x)`` over ``repeats`` runs of an ``iters``-step fori_loop.

  All calls run inside one jit, ``x`` perturbed each step so nothing is hoisted: a single jit
  call costs ~0.08 ms of host dispatch on a GPU, more than the kernels being timed.
  """
  import jax
  import jax.numpy as jnp

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
