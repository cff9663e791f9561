"""jaxbnb in a two-process ``jax.distributed`` run on this machine's CPU, against one process.

Two worker processes (``tests/multiprocess_worker.py``, 2 CPU devices each) join one job over
localhost and build one (fsdp=2, data=2) mesh, fsdp across the processes: NF4 quantization
into shards, the packed forward pass, a QLoRA step with 8-bit AdamW, and a
:mod:`jaxbnb.checkpoint` saved by both processes and restored by both. A third process runs
the same program alone on 4 devices (the reference), and two more the example of
docs/guide/multihost.md, all at the same time; the test process then restores the two-process
checkpoint by itself.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxbnb import checkpoint
from tests import multiprocess_worker as worker
from tests.test_docs_examples import examples

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).parents[1]
TIMEOUT_S = 420  # all five processes, ~15-30 s of CPU each; generous for loaded machines
_NOISE = ("[Gloo]", "Involuntary full rematerialization")  # left out of failure reports


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _log(path: pathlib.Path, n: int = 4000) -> str:
  lines = path.read_text(errors="replace").splitlines() if path.exists() else ["<no output>"]
  return "\n".join(line for line in lines if not any(k in line for k in _NOISE))[-n:]


def _launch(jobs: dict, tmp: pathlib.Path) -> dict[pathlib.Path, int | None]:
  """Start every process of ``jobs`` (``{name: (process count, command)}``, ``command(i, n,
  address, workdir) -> (argv, extra env)``; a directory ``tmp/name`` each), wait for all of
  them or the deadline, kill what is left. Exit codes by log file (None: killed)."""
  base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  base["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
  procs = {}
  try:
    for name, (n, command) in jobs.items():
      workdir = tmp / name
      workdir.mkdir(exist_ok=True)
      address = f"localhost:{_free_port()}"
      for i in range(n):
        argv, env = command(i, n, address, workdir)
        with open(workdir / f"log{i}", "wb") as log:  # a file, not a pipe: never blocks
          procs[workdir / f"log{i}"] = subprocess.Popen(
              [sys.executable, *map(str, argv)], cwd=workdir, env={**base, **env},
              stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
      if any(p.poll() not in (None, 0) for p in procs.values()):  # the others would hang
        break
      time.sleep(0.2)
    return {log: p.poll() for log, p in procs.items()}
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
      p.wait()


def _worker(i, n, address, workdir):
  return [ROOT / "tests" / "multiprocess_worker.py", i, n, address, workdir], {}


def _guide(i, n, address, workdir):
  """The example of docs/guide/multihost.md, started as that page says."""
  return [workdir / "train.py"], {
      "JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": str(n), "JAX_PROCESS_ID": str(i),
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {worker.FAST_COMPILE}"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
  """``{"multi": [out of process 0, out of process 1], "single": [out], "dir": tmp}``, once
  every process (the guide's example included) has finished."""
  code = [c for f, _, c in examples() if f == "docs/guide/multihost.md"]
  assert len(code) == 1, "docs/guide/multihost.md: expected one python example"
  jobs = {"multi": (2, _worker), "single": (1, _worker), "guide": (2, _guide)}
  for attempt in range(2):  # twice only if a free port was taken before its coordinator bound it
    tmp = tmp_path_factory.mktemp("multiprocess")
    (tmp / "guide").mkdir()
    (tmp / "guide" / "train.py").write_text(code[0])
    codes = _launch(jobs, tmp)
    if not any(codes.values()) or not any("Address already in use" in _log(f) for f in codes):
      break
  if any(c != 0 for c in codes.values()):
    what = ", ".join(f"{f.parent.name} process {f.name[3:]}: "
                     + ("killed at the deadline" if c is None else f"exit {c}")
                     for f, c in codes.items())
    logs = "\n".join(f"--- {f.parent.name} process {f.name[3:]} (stdout + stderr) ---\n{_log(f)}"
                     for f in codes)
    pytest.fail(f"the worker processes failed ({what}; limit {TIMEOUT_S} s)\n{logs}",
                pytrace=False)
  out = {name: [dict(np.load(tmp / name / f"out{i}.npz")) for i in range(n)]
         for name, (n, command) in jobs.items() if command is _worker}
  out["dir"] = tmp
  return out


def _items(out, prefix):
  return {k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)}


def test_processes_agree_and_restore_what_they_saved(runs):
  out0, out1 = runs["multi"]
  assert sorted(out0) == sorted(out1)
  for k in out0:
    np.testing.assert_array_equal(out0[k], out1[k], err_msg=k)
  saved = _items(out0, "saved:")
  assert any(k.endswith(".packed") for k in saved) and any(".mu." in k for k in saved)
  arrays = runs["dir"] / "multi" / "ckpt" / "arrays"
  for i in range(2):  # each process wrote its own shards (fsdp splits packed weights)
    assert any((arrays / f"ocdbt.process_{i}" / "d").iterdir()), f"process {i} wrote no data"
  for prefix in ("restored:", "local:"):  # sharded as saved; whole on one device per process
    got = _items(out0, prefix)
    assert sorted(got) == sorted([*saved, *["step"] * (prefix == "local:")]), prefix
    for k, v in saved.items():
      np.testing.assert_array_equal(got[k], v, err_msg=f"{prefix}{k}")


def test_two_processes_compute_what_one_does(runs):
  (multi, _), (single,) = runs["multi"], runs["single"]
  assert sorted(multi) == sorted(single)
  np.testing.assert_allclose(multi["y"], single["y"], rtol=1e-5, atol=1e-6)  # the forward
  np.testing.assert_allclose(multi["loss"], single["loss"], rtol=1e-6)
  for k, v in _items(single, "grads:").items():
    np.testing.assert_allclose(multi["grads:" + k], v, rtol=1e-4, atol=1e-9, err_msg=k)
  for k, v in _items(single, "saved:").items():
    got = multi["saved:" + k]
    if k.startswith("params."):  # quantized into shards: the same bits
      np.testing.assert_array_equal(got, v, err_msg=k)
    elif k.startswith("adapters."):  # Adam's first step is ~lr * sign(grad): to 1% of it
      np.testing.assert_allclose(got, v, rtol=0, atol=0.01 * worker.LEARNING_RATE, err_msg=k)
    elif got.dtype == np.uint8:  # 8-bit moments: a last-ulp gradient may move a code by one
      assert np.mean(got != v) < 0.05 and np.abs(got.astype(int) - v).max() <= 1, k
    else:
      np.testing.assert_allclose(got, v, rtol=1e-4, err_msg=k)


def test_one_process_restores_the_two_process_checkpoint(runs):
  saved = _items(runs["multi"][0], "saved:")
  restored = checkpoint.restore(runs["dir"] / "multi" / "ckpt")  # digests checked
  flat = worker.flat(restored)
  assert flat.pop("step") == 1
  assert sorted(flat) == sorted(saved)
  for k, v in saved.items():
    np.testing.assert_array_equal(np.asarray(flat[k]), v, err_msg=k)
  # Into this process's own mesh (8 devices, not the 4 it was saved from).
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))
  resharded = worker.flat(checkpoint.restore(runs["dir"] / "multi" / "ckpt",
                                             sharding=NamedSharding(mesh, P("fsdp"))))
  packed = [x for k, x in resharded.items() if k.endswith(".packed")]
  assert packed and all(len(x.sharding.device_set) == len(jax.devices()) for x in packed)
  for k, v in saved.items():
    np.testing.assert_array_equal(np.asarray(resharded[k]), v, err_msg=k)


def test_guide_example_runs_in_two_processes(runs):
  losses = []
  for i in range(2):
    lines = [line for line in (runs["dir"] / "guide" / f"log{i}").read_text().splitlines()
             if line.startswith(f"process {i}: loss ")]
    assert len(lines) == 1, _log(runs["dir"] / "guide" / f"log{i}")
    losses.append(lines[0].split()[-1])
  assert losses[0] == losses[1]
  assert (runs["dir"] / "guide" / "qlora_ckpt" / "jaxbnb").is_dir()
