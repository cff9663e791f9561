"""The GPU end-to-end benchmarks run in their --quick mode on CPU (seconds) and report sane
figures: the QLoRA step on a base built leaf by leaf into NF4, and quantize-on-load of a sharded
bf16 checkpoint followed by generation."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]


def _run(script, *args):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
  out = subprocess.run([sys.executable, str(ROOT / "experiments" / script), *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_bench_qlora_step_quick(tmp_path):
  out = tmp_path / "qlora.json"
  _run("bench_qlora_step.py", "--quick", "--out", out)
  res = json.loads(out.read_text())
  # The packed base is much smaller than the float weights it replaced; adapters are a small
  # fraction of the model; the step ran and produced a finite loss.
  assert 0 < res["base_bytes"] < res["params"] * 2
  assert 0 < res["adapter_params"] < res["params"] // 2
  assert res["step_ms_median"] > 0 and 0 < res["final_loss"] < 10


def test_bench_load_quick(tmp_path):
  out = tmp_path / "load.json"
  _run("bench_load.py", "--quick", "--dir", tmp_path / "ckpt", "--out", out)
  res = json.loads(out.read_text())
  assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
  assert res["packed_bytes"] < res["float_bf16_bytes"]
  gen = res["generated"]
  assert gen[:4] == [1, 2, 3, 4] and len(gen) == 8 and all(0 <= t < 256 for t in gen)
