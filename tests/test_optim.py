"""8-bit optimizers: bnb's 10-step trajectories, bnb's test_optimizer8bit limits against optax
32-bit, state memory, masks, non-finite policy, percentile clipping, paging, optax interop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbnb
from jaxbnb import optim
from jaxbnb.optim.state import QuantizedMoment, read_moment
from tests import helpers


def _vectors():
  with np.load(helpers.DATA / "bnb_optim8bit.npz") as f:
    return {k: f[k] for k in f.files}


BNB = {
    "adam8bit": lambda: optim.adam8bit(1e-3, min_8bit_size=0),
    "adamw8bit": lambda: optim.adamw8bit(1e-3, min_8bit_size=0),
    "lion8bit": lambda: optim.lion8bit(1e-3, min_8bit_size=0),
    "momentum8bit": lambda: optim.sgd8bit(1e-2, momentum=0.9, min_8bit_size=0),
}


def _first(state):
  """The 8-bit transform's state inside an optax chain."""
  return state[0] if isinstance(state, tuple) and not hasattr(state, "_fields") else state


@pytest.mark.parametrize("name", sorted(BNB))
def test_matches_bitsandbytes_10_steps(name):
  v = _vectors()
  tx = BNB[name]()
  p = jnp.asarray(v[f"{name}_p0"])
  state = tx.init(p)
  step = jax.jit(tx.update)
  for g in v[f"{name}_grads"]:
    u, state = step(jnp.asarray(g), state, p)
    p = optax.apply_updates(p, u)
  assert np.abs(np.asarray(p) - v[f"{name}_p10"]).mean() < 1e-6
  s = _first(state)
  # One moment per parameter leaf (a flat tuple): here the single (64, 96) leaf.
  moments = ([s.trace[0]] if name == "momentum8bit"
             else [s.mu[0]] + ([s.nu[0]] if hasattr(s, "nu") else []))
  for i, m in enumerate(moments, start=1):
    assert isinstance(m, QuantizedMoment) and m.block_size == 256
    q_ref, absmax_ref = v[f"{name}_state_state{i}"], v[f"{name}_state_absmax{i}"]
    np.testing.assert_allclose(np.asarray(m.absmax), absmax_ref, rtol=1e-4)
    # Codes equal bnb's except where nearest rounding differs (a float32 last-ulp away).
    differ = np.asarray(m.q) != q_ref
    assert differ.mean() < 1e-3
    assert np.all(np.abs(np.asarray(m.q, int)[differ] - q_ref[differ]) == 1)


# bnb tests/test_optim.py::test_optimizer8bit, against optax's 32-bit optimizers.
REFERENCE = {
    "adam": (lambda: optim.adam8bit(1e-3), lambda: optax.adam(1e-3)),
    "adamw": (lambda: optim.adamw8bit(1e-3), lambda: optax.adamw(1e-3, weight_decay=1e-2)),
    "lion": (lambda: optim.lion8bit(1e-4), lambda: optax.lion(1e-4, weight_decay=0.0)),
    "momentum": (lambda: optim.sgd8bit(1e-2, momentum=0.9), lambda: optax.sgd(1e-2, 0.9)),
}


def _resync(ref_state, state8):
  """Set the 32-bit reference's moments to the dequantized 8-bit ones (as bnb's test does)."""
  s8 = _first(state8)
  names = [n for n in ("mu", "nu", "trace") if hasattr(s8, n)]
  values = {n: [read_moment(m) for m in getattr(s8, n)] for n in names}

  def fix(s):
    if hasattr(s, "_fields") and any(n in s._fields for n in names):
      return s._replace(**{n: jax.tree.structure(getattr(s, n)).unflatten(values[n])
                           for n in names if n in s._fields})
    return s
  return jax.tree.map(fix, ref_state, is_leaf=lambda s: hasattr(s, "_fields"))


@pytest.mark.parametrize("name", sorted(REFERENCE))
@pytest.mark.parametrize("shape", [(1024, 32), (4097,), (1024, 1024), (1024, 4097)])
def test_close_to_optax_32bit(name, shape):
  if shape == (1024, 4097) and name != "adam":
    pytest.skip("the 4M-element case runs for adam only (CPU time)")
  if shape == (1024, 1024) and name not in ("adam", "lion"):
    pytest.skip("the 1M-element case runs for adam and lion (CPU time)")
  tx8, tx32 = REFERENCE[name][0](), REFERENCE[name][1]()
  key = jax.random.key(0)
  p8 = p32 = jax.random.normal(key, shape) * 0.1
  s8, s32 = tx8.init(p8), tx32.init(p32)

  @jax.jit
  def step(g, p8, s8, p32, s32):
    u8, s8 = tx8.update(g, s8, p8)
    u32, s32 = tx32.update(g, s32, p32)
    return optax.apply_updates(p8, u8), s8, optax.apply_updates(p32, u32), s32

  errs, rels = [], []
  for i in range(50):
    g = jax.random.normal(jax.random.fold_in(key, i), shape) * 0.01
    p8, s8, p32, s32 = step(g, p8, s8, p32, s32)
    err = jnp.abs(p8 - p32)
    errs.append(float(err.mean()))
    rels.append(float((err / (jnp.abs(p32) + 1e-9)).mean()))
    s32 = _resync(s32, s8)
    if i % 10 == 0 and i > 0:  # bnb keeps the parameters together every 10 steps
      p32 = p8
  assert np.mean(errs) < 6e-5, np.mean(errs)
  assert np.mean(rels) < 6e-4, np.mean(rels)


@pytest.mark.parametrize("make,ref", [
    (lambda: optim.rmsprop8bit(1e-3), lambda: optax.rmsprop(1e-3)),
    (lambda: optim.adagrad8bit(1e-2), lambda: optax.adagrad(1e-2)),
    (lambda: optim.lamb8bit(1e-3, weight_decay=1e-2), lambda: optax.lamb(1e-3, weight_decay=1e-2)),
    (lambda: optim.lars8bit(1e-1), lambda: optax.lars(1e-1)),
    (lambda: optim.ademamix8bit(1e-3), lambda: optax.contrib.ademamix(1e-3)),
    (lambda: optim.sgd8bit(1e-2, momentum=0.9, nesterov=True),
     lambda: optax.sgd(1e-2, 0.9, nesterov=True)),
])
def test_family_tracks_optax(make, ref):
  """The rest of the family follows its optax twin (no resync): 30 steps on a quadratic."""
  tx8, tx32 = make(), ref()
  target = jax.random.normal(jax.random.key(1), (64, 96))
  loss = lambda p: jnp.mean((p - target) ** 2)
  p8 = p32 = jnp.zeros((64, 96))
  s8, s32 = tx8.init(p8), tx32.init(p32)
  for _ in range(30):
    u8, s8 = tx8.update(jax.grad(loss)(p8), s8, p8)
    u32, s32 = tx32.update(jax.grad(loss)(p32), s32, p32)
    p8, p32 = optax.apply_updates(p8, u8), optax.apply_updates(p32, u32)
  moved = float(jnp.abs(p32).mean())
  assert moved > 0
  assert float(jnp.abs(p8 - p32).mean()) < 0.05 * moved
  assert any(isinstance(x, QuantizedMoment)
             for x in jax.tree.leaves(s8, is_leaf=lambda x: isinstance(x, QuantizedMoment)))


def test_state_memory_adam():
  """~100M parameters: 8-bit Adam state vs optax.adam's 8 bytes/param, on the actual arrays."""
  params = {f"w{i}": jax.ShapeDtypeStruct((4096, 6144), jnp.float32) for i in range(4)}
  n = sum(p.size for p in params.values())
  assert n > 100e6
  for block_size, limit in ((256, 2.032), (2048, 2.01)):
    state = jax.eval_shape(optim.adam8bit(1e-3, block_size=block_size).init, params)
    per_param = optim.state_bytes(jax.tree.map(_Bytes, state)) / n
    assert per_param <= limit, (block_size, per_param)
  ref = jax.eval_shape(optax.adam(1e-3).init, params)
  assert optim.state_bytes(jax.tree.map(_Bytes, ref)) / n >= 8


class _Bytes:
  def __init__(self, s):
    self.nbytes = int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize


def test_small_leaves_and_mask_keep_32bit():
  params = {"big": jnp.ones((64, 128)), "small": jnp.ones((10,)), "embed": jnp.ones((128, 64))}
  tx = optim.adamw8bit(1e-3, fp32_mask={"big": False, "small": False, "embed": True})
  s = _first(tx.init(params))
  big, embed, small = s.mu  # one moment per leaf, in flattening (sorted key) order
  assert isinstance(big, QuantizedMoment)
  assert small.dtype == jnp.float32 and embed.dtype == jnp.float32
  tx = optim.adamw8bit(1e-3, fp32_mask=lambda p: jax.tree.map(lambda x: x.shape[0] == 128, p))
  assert not isinstance(_first(tx.init(params)).mu[1], QuantizedMoment)
  with pytest.raises(ValueError, match="fp32_mask"):
    optim.adamw8bit(1e-3, fp32_mask={"big": False}).init(params)
  with pytest.raises(ValueError, match="64, 128"):
    optim.adam8bit(1e-3, block_size=100)


@pytest.mark.parametrize("make", [lambda: optim.adamw8bit(1e-3), lambda: optim.lion8bit(1e-4),
                                  lambda: optim.sgd8bit(1e-2), lambda: optim.ademamix8bit(1e-3)])
def test_nonfinite_gradients_are_skipped(make):
  tx = make()
  p = jax.random.normal(jax.random.key(2), (64, 96))
  state = tx.init(p)
  g = jax.random.normal(jax.random.key(3), (64, 96)) * 0.01
  u, state = tx.update(g, state, p)
  p = optax.apply_updates(p, u)
  bad = g.at[3, 5].set(jnp.nan).at[7, 1].set(jnp.inf)
  u, state2 = tx.update(bad, state, p)
  assert np.all(np.isfinite(np.asarray(u)))
  for leaf in jax.tree.leaves(state2):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert np.all(np.isfinite(np.asarray(leaf)))
  # Huge (but finite) gradients: float32 Adam stays finite, so must we (states saturate).
  u, state3 = tx.update(g * 1e30, state2, p)
  assert np.all(np.isfinite(np.asarray(u)))


def test_skipped_element_keeps_its_state():
  tx = optim.scale_by_adam_8bit(min_8bit_size=0)
  p = jnp.zeros((4, 256))
  state = tx.init(p)
  g = jnp.full((4, 256), 0.5)
  _, state = tx.update(g, state, p)
  before = np.asarray(read_moment(state.mu[0]))
  u, state = tx.update(g.at[0, 0].set(jnp.nan), state, p)
  assert float(u[0, 0]) == 0.0 and np.all(np.asarray(u)[1:] != 0)
  np.testing.assert_allclose(np.asarray(read_moment(state.mu[0]))[0, 0], before[0, 0], rtol=0.01)


def test_percentile_clipping():
  tx = optim.percentile_clipping(percentile=5)
  state = tx.init({"w": jnp.zeros(3)})
  g = {"w": jnp.array([3.0, 4.0, 0.0])}  # norm 5
  u, state = tx.update(g, state)
  np.testing.assert_allclose(u["w"], g["w"])  # the first step fills the history with itself
  for _ in range(10):
    u, state = tx.update(g, state)
  big = {"w": jnp.array([30.0, 40.0, 0.0])}  # norm 50: clipped to the 5th percentile, 5
  u, state = tx.update(big, state)
  np.testing.assert_allclose(float(jnp.linalg.norm(u["w"])), 5.0, rtol=1e-5)
  with pytest.raises(ValueError, match="percentile"):
    optim.percentile_clipping(100)
  chained = optax.chain(optim.percentile_clipping(), optim.adamw8bit(1e-3))
  chained.update(g, chained.init(g), g)


def test_inject_hyperparams_needs_static_sizes():
  with pytest.raises(TypeError, match="static_args"):
    optax.inject_hyperparams(optim.adamw8bit)(learning_rate=1e-3).init({"w": jnp.ones(8)})


def test_chains_with_optax_features():
  params = {"w": jax.random.normal(jax.random.key(4), (128, 64))}
  grads = jax.tree.map(lambda x: x * 0.01, params)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 5, 50)
  for tx in [optax.chain(optax.clip_by_global_norm(1.0), optim.adamw8bit(schedule)),
             optax.MultiSteps(optim.adamw8bit(1e-3), every_k_schedule=2),
             optax.inject_hyperparams(optim.adamw8bit, static_args=("block_size", "min_8bit_size"))(
                 learning_rate=1e-3, weight_decay=0.1),
                      optim.lamb8bit(1e-3)]:
    state = tx.init(params)
    for _ in range(3):
      u, state = jax.jit(tx.update)(grads, state, params)
      params = optax.apply_updates(params, u)
    assert np.all(np.isfinite(np.asarray(params["w"])))


def test_paged_state_lives_in_host_memory():
  params = {"w": jax.random.normal(jax.random.key(5), (128, 64))}
  grads = jax.tree.map(lambda x: x * 0.01, params)
  tx_ref, tx = optim.adamw8bit(1e-3), optim.paged_adamw8bit(1e-3)
  assert optim.host_memory_supported()
  state, state_ref = tx.init(params), tx_ref.init(params)
  kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state)}
  assert kinds == {"pinned_host"}
  step, step_ref = jax.jit(tx.update), jax.jit(tx_ref.update)
  for _ in range(3):
    u, state = step(grads, state, params)
    u_ref, state_ref = step_ref(grads, state_ref, params)
    np.testing.assert_array_equal(np.asarray(u["w"]), np.asarray(u_ref["w"]))
  assert {x.sharding.memory_kind for x in jax.tree.leaves(state)} == {"pinned_host"}


def test_state_shards_like_params():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices")
  mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
  params = {"w": jax.device_put(jnp.ones((1024, 64)), NamedSharding(mesh, P("fsdp")))}
  tx = optim.adamw8bit(1e-3)
  state = tx.init(params)
  mu = _first(state).mu[0]
  assert mu.q.sharding.is_equivalent_to(params["w"].sharding, 2)
  u, state = jax.jit(tx.update)(params, state, params)
  assert u["w"].sharding.is_equivalent_to(params["w"].sharding, 2)


def test_fp32_mask_from_nnx_stable_embedding_is_a_prefix_mask():
  """jaxbnb.nn.stable_embedding_mask gives one bool per NNX Variable (a prefix of the state's
  leaves): the StableEmbedding table keeps 32-bit state, the rest goes 8-bit."""
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.embed = jaxbnb.nn.StableEmbedding(256, 64, rngs=rngs)
      self.dense = nnx.Linear(64, 128, rngs=rngs)

  state = nnx.state(Model(nnx.Rngs(0)), nnx.Param)
  for mask in (jaxbnb.nn.stable_embedding_mask(state), jaxbnb.nn.stable_embedding_mask):
    opt_state = optim.adam8bit(1e-3, fp32_mask=mask, min_8bit_size=0).init(state)
    kinds = {type(m).__name__ for m in opt_state[0].mu}
    assert kinds == {"QuantizedMoment", "ArrayImpl"}, kinds
    full = [m for m in opt_state[0].mu if not isinstance(m, optim.QuantizedMoment)]
    assert [m.shape for m in full] == [(256, 64)]


@pytest.mark.parametrize("spike", [1e21, 3e20])
def test_one_huge_gradient_element_stays_bounded(spike):
  """Issue 19 R6: one finite gradient element of 1e21 for one step drove 8-bit Adam's
  parameters to 1e20 (its v overflowed, saturated the block's scale, and the whole block read
  back as 0). Elements whose (1 - b2) * g * g overflows are now skipped like NaN/Inf, and a block
  scale above 2**126 no longer flushes its codes to 0; optax.adam stays ~1, so must we."""
  key = jax.random.key(0)
  makes = [lambda: optax.adam(1e-3), lambda: optim.adam8bit(1e-3),
           lambda: optim.adamw8bit(1e-3), lambda: optim.rmsprop8bit(1e-3),
           lambda: optim.adagrad8bit(1e-2), lambda: optim.ademamix8bit(1e-3),
           lambda: optim.lamb8bit(1e-3), lambda: optim.lion8bit(1e-4)]
  for make in makes:
    tx = make()
    p = jax.random.normal(key, (64, 128))
    s = tx.init(p)
    step = jax.jit(lambda g, s, p, tx=tx: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(g, s, p)))
    for i in range(30):
      g = jax.random.normal(jax.random.fold_in(key, i), (64, 128)) * 0.01
      p, s = step(g.at[3, 7].set(spike) if i == 5 else g, s, p)
    assert np.all(np.isfinite(np.asarray(p)))
    assert float(jnp.max(jnp.abs(p))) < 10, make


def test_lion8bit_rule_is_optax_lion():
  """Issue 19: lion8bit reached a worse loss than optax.lion on a clean run. The rule is
  Lion's: with 32-bit state (every leaf below min_8bit_size) it follows optax.lion (wd 0) to
  rounding; the gap comes from 8-bit rounding of the b2 = 0.99 EMA (a per-step rounding error
  as large as its (1 - b2) * g increment), which bitsandbytes 0.50.2's Lion8bit shows alike
  (same problem: 7.5x at lr 3e-4 there, 7.6x here). The 8-bit bits are bnb's (the 10-step test)."""
  target = jax.random.normal(jax.random.key(1), (64, 96))
  loss = lambda p: jnp.mean((p - target) ** 2)
  runs = []
  for tx in (optim.lion8bit(1e-3, min_8bit_size=10**9), optax.lion(1e-3, weight_decay=0.0)):
    p = jnp.zeros((64, 96))
    s = tx.init(p)
    for _ in range(30):
      u, s = tx.update(jax.grad(loss)(p), s, p)
      p = optax.apply_updates(p, u)
    runs.append(np.asarray(p))
  np.testing.assert_allclose(runs[0], runs[1], atol=1e-6)
