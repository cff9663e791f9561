"""experiments/bench_cpu.py --quick runs in seconds and reports every row of the CPU table;
without a bitsandbytes interpreter it says so and still prints the table."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]


def test_bench_cpu_quick(tmp_path):
  out = tmp_path / "cpu.json"
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  res = subprocess.run(
      [sys.executable, str(ROOT / "experiments" / "bench_cpu.py"), "--quick", "--json", str(out),
       "--bnb-python", str(tmp_path / "no-such-python"), "--reuse-memory"],
      capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "# bitsandbytes: not timed" in res.stdout
  assert "memcpy floor" in res.stdout and "x f32" in res.stdout
  report = json.loads(out.read_text())
  assert report["env"]["cpu"] and report["env"]["jax"]
  assert report["env"]["reuse_memory"]  # re-executed with glibc's reuse settings
  names = [r["name"] for r in report["rows"]]
  for want in ("jaxbnb adamw8bit", "optax.adamw", "NF4 (bf16) M=1", "LLM.int8() thr 6",
               "dense f32 x@W", "dense bf16 x@W", "quantize_4bit", "dequantize_4bit",
               "quantize_blockwise", "dequantize_blockwise"):
    assert any(n.startswith(want) for n in names), want
  for r in report["rows"]:
    assert r["ms"] > 0 and r["bytes"] > 0 and r["temp"] >= 0 and r["n"] > 0
  assert report["bnb"] == {}
