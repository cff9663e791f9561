"""quantize_state: any optax optimizer with 8/4-bit moments. One step equals the wrapped
optimizer on the dequantized state (so a trajectory differs by quantization error only);
trajectories of adam, lion, sgd+momentum, adafactor and muon stay close at 8 and 4 bits; which
leaves are quantized; the per-block map; extreme values; checkpoints."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbnb
from jaxbnb import optim
from jaxbnb.optim.fourbit_state import SIGNED_4BIT
from jaxbnb.optim.quantize_state import QuantizedLeaf, dequantize_leaf, quantize_leaf
from tests import helpers

_is_q = lambda x: isinstance(x, QuantizedLeaf)

OPTIMIZERS = {
    "adam": lambda: optax.adam(1e-2),
    "lion": lambda: optax.lion(1e-3),
    "sgd_momentum": lambda: optax.sgd(1e-1, momentum=0.9),
    "adafactor": lambda: optax.adafactor(1e-2),
    "muon": lambda: optax.contrib.muon(1e-2),
}
# Mean |p - p_ref| / mean |p_ref| after 40 steps (measured: 8-bit <= 0.034, 4-bit <= 0.28).
BOUND = {8: 0.08, 4: 0.4}

TARGET = {"w": jax.random.normal(jax.random.key(1), (128, 96)),
          "b": jax.random.normal(jax.random.key(2), (96,))}


def _loss(p):
  return jnp.mean((p["w"] - TARGET["w"]) ** 2) + jnp.mean((p["b"] - TARGET["b"]) ** 2)


def _params():
  return {"w": jnp.zeros((128, 96)), "b": jnp.zeros(96)}


@pytest.mark.slow
def test_one_step_is_the_wrapped_step_on_the_dequantized_state():
  for bits in (8, 4):
    tx = optax.adam(1e-2)
    qtx = optim.quantize_state(tx, bits, min_size=0)
    p = _params()
    s = qtx.init(p)
    for _ in range(3):
      g = jax.grad(_loss)(p)
      u, s2 = jax.jit(qtx.update)(g, s, p)
      inner = jax.tree.map(lambda x: dequantize_leaf(x) if _is_q(x) else x, s, is_leaf=_is_q)
      u_ref, s_ref = jax.jit(tx.update)(g, inner, p)
      for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
      flat, _ = jax.tree.flatten(s2, is_leaf=_is_q)
      for a, b in zip(flat, jax.tree.leaves(s_ref)):
        if _is_q(a):
          # The new state is the wrapped optimizer's, quantized (computed chunk by chunk, it
          # may differ in the last bit where the compiler contracts a multiply-add elsewhere).
          want = quantize_leaf(b, a)
          np.testing.assert_allclose(np.asarray(a.absmax), np.asarray(want.absmax), rtol=1e-6)
          differ = np.asarray(a.q) != np.asarray(want.q)
          assert differ.mean() < 0.01
          np.testing.assert_allclose(np.asarray(dequantize_leaf(a)),
                                     np.asarray(dequantize_leaf(want)),
                                     atol=float(jnp.max(want.absmax)) * 0.15)
        else:
          np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      p, s = optax.apply_updates(p, u), s2


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_trajectory_close_to_the_wrapped_optimizer(name, bits):
  runs = {}
  for q in (False, True):
    tx = OPTIMIZERS[name]()
    tx = optim.quantize_state(tx, bits, min_size=0) if q else tx
    p = _params()
    s = tx.init(p)
    step = jax.jit(lambda p, s, tx=tx: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(jax.grad(_loss)(p), s, p)))
    for _ in range(40):
      p, s = step(p, s)
    runs[q] = (p, s)
  (p_ref, _), (p, s) = runs[False], runs[True]
  assert any(_is_q(x) for x in jax.tree.leaves(s, is_leaf=_is_q))
  dev = float(jnp.abs(p["w"] - p_ref["w"]).mean() / jnp.abs(p_ref["w"]).mean())
  assert dev < BOUND[bits], dev
  assert float(_loss(p)) <= 1.25 * float(_loss(p_ref)) + 1e-3


def test_which_leaves_are_quantized():
  p = {"w": jnp.zeros((128, 96)), "b": jnp.zeros(96)}
  s = optim.quantize_state(optax.adam(1e-3), 8).init(p)[0]   # min_size 4096: "b" stays
  assert s.count.dtype == jnp.int32 and _is_q(s.mu["w"]) and _is_q(s.nu["w"])
  assert not _is_q(s.mu["b"])
  s = optim.quantize_state(optax.adafactor(1e-3), 4, min_size=0).init(
      {"w": jnp.zeros((256, 256)), "v": jnp.zeros((64, 96))})[0]
  assert s.v_row["w"].shape == (256,) and not _is_q(s.v_row["w"])   # factored: left alone
  assert _is_q(s.v["v"]) and not _is_q(s.v["w"])                     # unfactored: quantized
  s = optim.quantize_state(optax.contrib.prodigy(1.0), 8, min_size=0,
                           should_quantize=lambda path, x: "params0" not in str(path)).init(p)
  assert not _is_q(s.params0["w"]) and _is_q(s.exp_avg["w"])
  with pytest.raises(ValueError, match="bits"):
    optim.quantize_state(optax.adam(1e-3), 3)
  with pytest.raises(ValueError, match="128"):
    optim.quantize_state(optax.adam(1e-3), 4, block_size=100)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_round_trip_per_block_map(bits, dtype):
  """Odd size, an all-zero block, a non-negative block (unsigned map: never 0 where the value
  is not 0), a signed block, extremes and NaN/Inf (saturated, finite)."""
  rng = np.random.default_rng(bits)
  n = 4 * 128 + 37
  x = rng.standard_normal(n).astype(np.float32)
  x[:128] = 0
  x[128:256] = np.abs(x[128:256]) * 1e-3
  x[256:260] = [1e38, -3e38, np.nan, np.inf]
  x = jnp.asarray(x).astype(dtype)
  q = quantize_leaf(x, bits=bits, block_size=128)
  r = np.asarray(dequantize_leaf(q)).astype(np.float32)
  assert r.dtype == np.float32 and q.dtype == np.dtype(dtype) and r.shape == (n,)
  assert np.all(np.isfinite(r[:256])) and np.all(r[:128] == 0)
  assert np.all(r[128:256] > 0) and not bool(q.signed[1]) and bool(q.signed[3])
  xf = np.asarray(x, np.float32)
  a = np.abs(xf[128:256]).max()
  tol = a * (2 ** -4 if bits == 4 else 2 ** -6) * (1 + 1e-6)  # 4 bits: (k + 1) / 16
  assert np.all(np.abs(r[128:256] - xf[128:256]) <= tol)
  tail = xf[384:]
  half_gap = np.max(np.diff(SIGNED_4BIT)) / 2 if bits == 4 else 0.01  # signed map's widest
  out_rounding = 2 ** -7 if dtype != "float32" else 1e-6  # the dequantized value in 16 bits
  assert np.all(np.abs(r[384:] - tail) <= np.abs(tail).max() * (half_gap + out_rounding))
  if dtype == "float32":
    assert np.all(np.isfinite(r[256:384]))


def test_checkpoint_restores_exactly(tmp_path):
  tx = optim.quantize_state(optax.adam(1e-3), 4, min_size=0)
  p = _params()
  s = tx.init(p)
  _, s = jax.jit(tx.update)(jax.grad(_loss)(p), s, p)
  path = str(tmp_path / "ckpt")
  jaxbnb.checkpoint.save(path, s)
  r = jaxbnb.checkpoint.restore(path, target=s)
  r2 = jaxbnb.checkpoint.restore(path)  # the skeleton rebuilds optax's named tuples as tuples
  for a, b in zip(jax.tree.leaves(r), jax.tree.leaves(s)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(r) == jax.tree.structure(s)
  leaves2 = jax.tree.leaves(r2, is_leaf=_is_q)
  assert [type(x).__name__ for x in leaves2] == [
      type(x).__name__ for x in jax.tree.leaves(s, is_leaf=_is_q)]
  for a, b in zip(jax.tree.leaves(r2), jax.tree.leaves(s)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


_temporaries = helpers.optimizer_step_temporaries


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_lean_adam_12_leaves_under_1_byte_per_param(bits):
  """Elementwise optimizers are updated chunk by chunk, one leaf at a time: 12 leaves of 2048^2
  (measured 0.05 B/param; the whole-tree path holds the new state in float32, 10.5)."""
  temp, n = _temporaries(optim.quantize_state(optax.adam(1e-3), bits), [(2048, 2048)] * 12)
  assert temp <= n, f"{temp / n:.3f} B/param"
  temp2, _ = _temporaries(optim.quantize_state(optax.adam(1e-3), bits), [(2048, 2048)] * 2)
  assert temp <= temp2 + 2**20


@pytest.mark.slow
@pytest.mark.parametrize("make", [lambda: optax.adam(1e-2), lambda: optax.lion(1e-3),
                                  lambda: optax.sgd(1e-1, momentum=0.9, nesterov=True)])
def test_lean_path_equals_the_whole_tree_path(monkeypatch, make):
  """Chunked (several chunks and a ragged tail) and whole-tree updates agree (to the last bit
  of a multiply-add the compiler contracts in one and not the other)."""
  from jaxbnb.functional import blockwise as B
  monkeypatch.setattr(B, "CHUNK", 2048)
  p = {"w": jax.random.normal(jax.random.key(0), (100, 97)), "b": jnp.zeros(96)}
  outs = []
  for lean in (True, False):
    tx = optim.quantize_state(make(), 4, min_size=0, lean=lean)
    s = tx.init(p)
    q = p
    for i in range(3):
      g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(i), x.shape), q)
      u, s = jax.jit(tx.update)(g, s, q)
      q = optax.apply_updates(q, u)
    outs.append((q, s))
  for a, b in zip(jax.tree.leaves(outs[0][0]), jax.tree.leaves(outs[1][0])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(outs[0][1], is_leaf=_is_q), jax.tree.leaves(outs[1][1], is_leaf=_is_q)):
    if _is_q(a):
      np.testing.assert_allclose(np.asarray(a.absmax), np.asarray(b.absmax), rtol=1e-5)
      assert np.mean(np.asarray(a.q) != np.asarray(b.q)) < 0.01


def test_paged_state_lives_in_host_memory():
  p = {"w": jax.random.normal(jax.random.key(5), (128, 64))}
  g = jax.tree.map(lambda x: x * 0.01, p)
  tx = optim.paged(optim.quantize_state(optax.adam(1e-3), 4, min_size=0))
  ref = optim.quantize_state(optax.adam(1e-3), 4, min_size=0)
  s, s_ref = tx.init(p), ref.init(p)
  assert {x.sharding.memory_kind for x in jax.tree.leaves(s)} == {"pinned_host"}
  for _ in range(2):
    u, s = jax.jit(tx.update)(g, s, p)
    u_ref, s_ref = jax.jit(ref.update)(g, s_ref, p)
    np.testing.assert_array_equal(np.asarray(u["w"]), np.asarray(u_ref["w"]))
  assert {x.sharding.memory_kind for x in jax.tree.leaves(s)} == {"pinned_host"}
