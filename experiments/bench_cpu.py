"""CPU benchmark of jaxbnb's default (XLA) path against its float baselines and bitsandbytes.

One run prints one table (and ``--json OUT`` writes it):
  * optimizer: ``jaxbnb.optim.adamw8bit`` vs ``optax.adamw`` (weight decay 1e-2 both, bnb's
    default), one step on 12 fp32 leaves of 2048^2 and on 1 leaf;
  * matmul at 4096^2: NF4 (bf16 compute, bf16 x) and LLM.int8() (threshold 6, fp16 x with 0.1% of
    its columns x20, so outliers exist) at M = 1, 16, 512, vs jax's dense ``x @ W`` in float32
    and in bfloat16;
  * quantize_4bit / dequantize_4bit (NF4, blocksize 64, bf16) and quantize_blockwise /
    dequantize_blockwise (blocksize 256, float32) at 4096^2 and 8192^2;
  * bitsandbytes' CPU backend on the same cases when ``--bnb-python`` names an interpreter that
    has it (``make bench-bnb`` builds ``.venv-bnb``): AdamW8bit, Linear4bit / Linear8bitLt in
    eval mode, the functional ops; timed by experiments/_bnb_cpu_timer.py in a subprocess.

Method: per call. Each call returns a fresh output (no fori_loop reusing its output), is
waited for (``block_until_ready``), and is timed alone; the variants of one row run
interleaved (in a fresh order each round) so that load from other processes hits them alike;
the median over the repeats. Columns: median ms; ratios to optax.adamw (optimizer rows), to dense f32 and bf16
``x @ W`` (matmul rows) and to bitsandbytes; GB/s of the bytes the op must move (read + write,
e.g. NF4 matmul: packed W + absmax + x + y) and that as a share of a memcpy measured in the same
run (the faster of a numpy and a jax copy of 256 MiB, read + write counted); the compiled
program's temporaries (``memory_analysis().temp_size_in_bytes``) per parameter/element.

  python experiments/bench_cpu.py [--quick] [--json OUT] [--bnb-python .venv-bnb/bin/python]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jaxbnb  # noqa: E402
from jaxbnb import functional as F  # noqa: E402
from jaxbnb import ops  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
INT8_THRESHOLD = 6.0


def cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def time_calls(fns: dict, min_reps: int, max_reps: int, budget_s: float) -> dict:
  """Median ms per call of each ``name: (fn, args)``, interleaved, ``block_until_ready`` each."""
  for fn, args in fns.values():
    jax.block_until_ready(fn(*args))  # compile + warm up
  times = {k: [] for k in fns}
  # Each round runs the cases in a fresh order: on this VM a call that frees a large buffer
  # (dense bf16 M=1 frees a 64 MiB f32 copy of W) slows the next one or two calls by up to
  # 2x, whichever they are (2026-11-27: dense f32 M=1 2.4 -> 3.7 ms right after it). A fixed
  # round-robin would charge that to one case every time.
  order = np.random.default_rng(0)
  t_end = time.perf_counter() + budget_s
  while (len(times[next(iter(fns))]) < min_reps
         or (len(times[next(iter(fns))]) < max_reps and time.perf_counter() < t_end)):
    for k in order.permutation(list(fns)):
      fn, args = fns[k]
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[k].append((time.perf_counter() - t0) * 1e3)
  return {k: statistics.median(v) for k, v in times.items()}


def temp_bytes(fn, *args) -> int:
  return int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)


def memcpy_gbps(nbytes: int, reps: int) -> dict:
  """Copy bandwidth (read + write counted) of numpy and of a jitted jax copy."""
  src = np.random.default_rng(0).random(nbytes // 8)
  dst = np.empty_like(src)
  xs = jnp.asarray(src.view(np.float32))
  jcopy = jax.jit(lambda a: a + 0)  # an elementwise pass: XLA writes a fresh buffer
  out = {}
  for name, fn in (("numpy", lambda: np.copyto(dst, src)),
                   ("jax", lambda: jax.block_until_ready(jcopy(xs)))):
    fn()
    ts = []
    for _ in range(reps):
      t0 = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - t0)
    out[name] = 2 * nbytes / statistics.median(ts) / 1e9
  return out


# --- cases --------------------------------------------------------------------------------------


def optimizer_rows(cfg, timing):
  rows = []
  for n_leaves in cfg["leaves"]:
    side = cfg["side"]
    key = f"adamw8bit {n_leaves}x{side}^2"
    rng = np.random.default_rng(n_leaves)
    params = [jnp.asarray(rng.standard_normal((side, side)), jnp.float32)
              for _ in range(n_leaves)]
    grads = [jnp.asarray(rng.standard_normal((side, side)), jnp.float32)
             for _ in range(n_leaves)]
    n = n_leaves * side * side
    fns, temps = {}, {}
    for name, tx in (("jaxbnb", jaxbnb.optim.adamw8bit(1e-3, weight_decay=1e-2)),
                     ("optax", optax.adamw(1e-3, weight_decay=1e-2))):
      state = tx.init(params)

      def step(p, g, s, tx=tx):
        upd, s = tx.update(g, s, p)
        return optax.apply_updates(p, upd), s
      jstep = jax.jit(step)
      fns[name] = (jstep, (params, grads, state))
      temps[name] = temp_bytes(jstep, params, grads, state)
    t = time_calls(fns, **timing)
    # Bytes a step must move per parameter: p r/w + g + moments r/w (8-bit: 1 byte each).
    rows.append(dict(group="optimizer", name=f"jaxbnb {key}", key=key, ms=t["jaxbnb"],
                     ref={"optax": t["optax"]}, bytes=n * 16, temp=temps["jaxbnb"], n=n))
    rows.append(dict(group="optimizer", name=f"optax.adamw {n_leaves}x{side}^2", key=None,
                     ms=t["optax"], ref={"optax": t["optax"]}, bytes=n * 28,
                     temp=temps["optax"], n=n))
    del params, grads, fns
  return rows


def matmul_rows(cfg, timing):
  rows = []
  n = k = cfg["side"]
  rng = np.random.default_rng(1)
  kernel = jnp.asarray(rng.standard_normal((k, n)) * 0.05, jnp.float32)  # Flax (in, out)
  quant = lambda c: jaxbnb.quantize({"dense": {"kernel": kernel}}, c)["dense"]["kernel"]  # noqa: E731
  q4 = quant(jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=jnp.bfloat16))
  q8 = quant(jaxbnb.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD))
  dense = jax.jit(lambda x, w: x @ w)
  qmat = jax.jit(lambda x, w: jaxbnb.matmul(x, w))
  weights = {"nf4": (q4, n * k // 2 + (n * k // 64) * 4),  # packed codes + float32 absmax
             "int8": (q8, n * k + n * 4),                   # CB + SCB
             "f32": (kernel, n * k * 4), "bf16": (kernel.astype(jnp.bfloat16), n * k * 2)}
  for m in cfg["ms"]:
    x = rng.standard_normal((m, k)).astype(np.float32)
    x8 = x.copy()
    x8[:, rng.choice(k, max(1, k // 1000), replace=False)] *= 20  # 0.1% outlier columns
    xs = {"nf4": jnp.asarray(x, jnp.bfloat16), "int8": jnp.asarray(x8, jnp.float16),
          "f32": jnp.asarray(x, jnp.float32), "bf16": jnp.asarray(x, jnp.bfloat16)}
    fns = {c: (qmat if c in ("nf4", "int8") else dense, (xs[c], weights[c][0])) for c in xs}
    t = time_calls(fns, **timing)
    labels = {"nf4": "NF4 (bf16)", "int8": f"LLM.int8() thr {INT8_THRESHOLD:g} (fp16)",
              "f32": "dense f32 x@W", "bf16": "dense bf16 x@W"}
    for c, (fn, args) in fns.items():
      io = m * (k + n) * xs[c].dtype.itemsize
      rows.append(dict(group="matmul", name=f"{labels[c]} M={m}",
                       key=f"{c} M={m}" if c in ("nf4", "int8") else None, ms=t[c],
                       ref={"f32": t["f32"], "bf16": t["bf16"]}, bytes=weights[c][1] + io,
                       temp=temp_bytes(fn, *args), n=n * k))
  return rows


def functional_rows(cfg, timing):
  rows = []
  rng = np.random.default_rng(2)
  for side in cfg["sides"]:
    n = side * side
    x4 = jnp.asarray(rng.standard_normal((side, side)), jnp.bfloat16)
    x8 = jnp.asarray(rng.standard_normal((side, side)), jnp.float32)
    bs4, bs8 = cfg["blocksize4"], cfg["blocksize8"]
    quant4 = jax.jit(lambda x: F.quantize_4bit(x, blocksize=bs4, quant_type="nf4"))
    quant8 = jax.jit(lambda x: F.quantize_blockwise(x, blocksize=bs8))
    deq4, deq8 = jax.jit(F.dequantize_4bit), jax.jit(F.dequantize_blockwise)
    p4, s4 = quant4(x4)
    p8, s8 = quant8(x8)
    a4, a8 = n // bs4 * 4, n // bs8 * 4
    cases = {"quantize_4bit": (quant4, (x4,), n * 2 + n // 2 + a4),
             "dequantize_4bit": (deq4, (p4, s4), n // 2 + a4 + n * 2),
             "quantize_blockwise": (quant8, (x8,), n * 4 + n + a8),
             "dequantize_blockwise": (deq8, (p8, s8), n + a8 + n * 4)}
    for op, (fn, args, nbytes) in cases.items():
      t = time_calls({"op": (fn, args)}, **timing)
      key = f"{op} {side}^2"
      rows.append(dict(group="functional", name=key, key=key, ms=t["op"], ref={},
                       bytes=nbytes, temp=temp_bytes(fn, *args), n=n))
  return rows


def bnb_timings(python: str, cfg: dict, groups, timing: dict) -> dict:
  """``{case key: ms}`` from bitsandbytes' CPU backend in ``python``, or {} (with a note)."""
  o, mm, fn = cfg["optim"], cfg["matmul"], cfg["functional"]
  ops4 = ("quantize_4bit", "dequantize_4bit")
  bcfg = {
      "threads": sorted({os.cpu_count() or 1, 1}, reverse=True),
      "repeats": timing["max_reps"], "budget_s": timing["budget_s"],
      "int8_threshold": INT8_THRESHOLD,
      "optim": {f"adamw8bit {n}x{o['side']}^2": [[o["side"]] * 2] * n for n in o["leaves"]
                if "optimizer" in groups},
      "matmul": {f"{kind} M={m}": [mm["side"], mm["side"], m, kind]
                 for kind in ("nf4", "int8") for m in mm["ms"] if "matmul" in groups},
      "functional": {f"{op} {s}^2": [op, s, fn["blocksize4" if op in ops4 else "blocksize8"]]
                     for s in fn["sides"] if "functional" in groups
                     for op in (*ops4, "quantize_blockwise", "dequantize_blockwise")},
  }
  try:
    res = subprocess.run([python, str(HERE / "_bnb_cpu_timer.py"), json.dumps(bcfg)],
                         capture_output=True, text=True, timeout=3600, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])
  except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
    err = getattr(e, "stderr", "") or ""
    print(f"# bitsandbytes: not timed ({type(e).__name__}: {str(e)[:200]} {err[-500:]})")
    return {}


# --- report -------------------------------------------------------------------------------------


def _fmt(v, spec="8.2f", width=8):
  return format(v, spec) if v is not None else "-".rjust(width)


def table(rows, bnb: dict, floor_gbps: float) -> str:
  head = (f"{'case':34s} {'ms':>9s} {'x optax':>8s} {'x f32':>8s} {'x bf16':>8s} "
          f"{'bnb ms':>9s} {'x bnb':>8s} {'GB/s':>7s} {'%copy':>6s} {'tmp B/el':>9s}")
  lines = [head, "-" * len(head)]
  group = None
  for r in rows:
    if r["group"] != group and group is not None:
      lines.append("")
    group = r["group"]
    ref = r["ref"]
    b = bnb.get(r["key"]) if r["key"] else None
    gbps = r["bytes"] / (r["ms"] * 1e-3) / 1e9
    lines.append(
        f"{r['name']:34s} {r['ms']:9.3f} "
        f"{_fmt(r['ms'] / ref['optax'] if 'optax' in ref else None)} "
        f"{_fmt(r['ms'] / ref['f32'] if 'f32' in ref else None)} "
        f"{_fmt(r['ms'] / ref['bf16'] if 'bf16' in ref else None)} "
        f"{_fmt(b, '9.3f', 9)} {_fmt(r['ms'] / b if b else None)} "
        f"{gbps:7.2f} {100 * gbps / floor_gbps:6.1f} {r['temp'] / r['n']:9.3f}")
  return "\n".join(lines)


# Fresh outputs of tens of MiB are mmapped by glibc (above its 32 MiB dynamic threshold) and
# page-faulted on every call; on this VM that costs as much as the op (dequantize_4bit 4096^2,
# 2026-11-27: 16.5 ms fresh, 5.3 ms reused; bnb 13.3 / 1.1 ms). --reuse-memory shows the ops'
# own cost: no mmap for large blocks and no trimming, so freed outputs are reused.
_REUSE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 40), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (CI smoke)")
  ap.add_argument("--json", type=pathlib.Path, help="write rows + environment here")
  ap.add_argument("--bnb-python", help="interpreter with torch + bitsandbytes (.venv-bnb)")
  ap.add_argument("--only", nargs="*", choices=("optimizer", "matmul", "functional"),
                  help="run only these groups")
  ap.add_argument("--reuse-memory", action="store_true",
                  help="rerun with glibc's malloc keeping freed memory (both libraries): times "
                       "without the page faults of fresh outputs")
  args = ap.parse_args(argv)
  if args.reuse_memory and _REUSE_ENV.items() - os.environ.items():
    # glibc reads these at start-up only; the bnb subprocess inherits them.
    os.execve(sys.executable, [sys.executable, __file__, *(argv or sys.argv[1:])],
              {**os.environ, **_REUSE_ENV})
  if args.quick:
    cfg = {"optim": {"leaves": [2], "side": 128},
           "matmul": {"side": 256, "ms": [1]},
           "functional": {"sides": [256], "blocksize4": 64, "blocksize8": 256}}
    timing = {"min_reps": 2, "max_reps": 3, "budget_s": 0.2}
  else:
    cfg = {"optim": {"leaves": [12, 1], "side": 2048},
           "matmul": {"side": 4096, "ms": [1, 16, 512]},
           "functional": {"sides": [4096, 8192], "blocksize4": 64, "blocksize8": 256}}
    timing = {"min_reps": 5, "max_reps": 60, "budget_s": 8.0}
  groups = args.only or ["optimizer", "matmul", "functional"]

  env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(),
         "cores": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
         "python": platform.python_version(), "reuse_memory": bool(args.reuse_memory)}
  floor = memcpy_gbps((4 << 20) if args.quick else (256 << 20), 3 if args.quick else 10)
  env["memcpy_gbps"] = floor
  print(f"# {env['date']}  {env['cpu']}, {env['cores']} cores  jax {env['jax']} "
        f"({env['backend']})  python {env['python']}"
        + ("  (--reuse-memory: freed outputs reused)" if args.reuse_memory else ""))
  print(f"# memcpy floor (read + write): numpy into a reused buffer {floor['numpy']:.1f} GB/s, "
        f"jax into a fresh buffer {floor['jax']:.1f} GB/s; %copy uses the faster",
        flush=True)

  rows = []
  makers = {"optimizer": optimizer_rows, "matmul": matmul_rows, "functional": functional_rows}
  sections = {"optimizer": "optim", "matmul": "matmul", "functional": "functional"}
  for g in groups:
    rows += makers[g](cfg[sections[g]], timing)
    print(f"# {g}: done", flush=True)
  bnb = {}
  if args.bnb_python:
    bnb = bnb_timings(args.bnb_python, cfg, groups, timing)
    if bnb:
      packed = any(v for k, v in bnb.items() if k.endswith("/packed"))
      print(f"# bitsandbytes {bnb.get('bitsandbytes')} (torch {bnb.get('torch')}), CPU "
            f"backend, best median of {bnb.get('threads')} torch threads; NF4 Linear4bit "
            f"repacked for the AVX512-BF16 kernel: {packed}")
  print(table(rows, bnb, max(floor.values())))
  if args.json:
    args.json.write_text(json.dumps({"env": env, "rows": rows, "bnb": bnb}, indent=1))


if __name__ == "__main__":
  main()
