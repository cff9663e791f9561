"""QLoRA: adapters on a packed base through unmodified Flax models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxbnb
from jaxbnb import lora, optim
from jaxbnb.models.gpt import GPT, GPTConfig, next_token_loss
from jaxbnb.models.gpt_linen import GPTLinen

NF4_DQ = jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True)
CFG = lora.LoRAConfig(rank=4, alpha=8.0)
TOKENS = jnp.asarray((np.arange(128, dtype=np.int32).reshape(4, 32) * 37) % 256)


@functools.cache
def _model():
  graphdef, state = nnx.split(GPT(GPTConfig()))
  return graphdef, state, jaxbnb.quantize(state, NF4_DQ)


def _loss_fn(graphdef, base, cfg=CFG, remat=False):
  model_fn = lambda s, t: nnx.merge(graphdef, s)(t)
  if remat:
    model_fn = jax.checkpoint(model_fn)
  forward = jaxbnb.intercept(model_fn)

  def loss(adapters, tokens, rng=None):
    return next_token_loss(forward(lora.attach(base, adapters, cfg, rng), tokens), tokens)
  return loss


def test_zero_b_equals_base_and_targets():
  graphdef, _, q = _model()
  adapters = lora.init(q, CFG, jax.random.key(0))
  assert sorted(adapters) == sorted(f"blocks.{i}.{n}.kernel" for i in range(2)
                                    for n in ("attn.qkv", "attn.out", "mlp.fc1", "mlp.fc2"))
  forward = jaxbnb.intercept(lambda s, t: nnx.merge(graphdef, s)(t))
  np.testing.assert_array_equal(np.asarray(forward(lora.attach(q, adapters, CFG), TOKENS)),
                                np.asarray(forward(q, TOKENS)))


def test_adapter_gradients_match_dequantized_base():
  graphdef, _, q = _model()
  adapters = jax.tree.map(lambda x: x + 0.01, lora.init(q, CFG, jax.random.key(1)))
  g_q = jax.jit(jax.grad(_loss_fn(graphdef, q)))(adapters, TOKENS)
  g_f = jax.grad(_loss_fn(graphdef, jaxbnb.dequantize(q)))(adapters, TOKENS)
  for a, b in zip(jax.tree.leaves(g_q), jax.tree.leaves(g_f)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-2, atol=1e-5)


def test_remat_gives_the_same_gradients():
  graphdef, _, q = _model()
  adapters = jax.tree.map(lambda x: x + 0.01, lora.init(q, CFG, jax.random.key(2)))
  g = jax.grad(_loss_fn(graphdef, q))(adapters, TOKENS)
  g_remat = jax.grad(_loss_fn(graphdef, q, remat=True))(adapters, TOKENS)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_training_lowers_loss_and_leaves_base_bits_alone():
  graphdef, _, q = _model()
  before = [np.asarray(x).copy() for x in jax.tree.leaves(q)]
  adapters = lora.init(q, lora.LoRAConfig(rank=8, alpha=16, dropout=0.1), jax.random.key(3))
  loss = _loss_fn(graphdef, q, lora.LoRAConfig(rank=8, alpha=16, dropout=0.1))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optim.paged_adamw8bit(3e-3, min_8bit_size=0))
  state = tx.init(adapters)

  @jax.jit
  def step(adapters, state, rng):
    value, grads = jax.value_and_grad(loss)(adapters, TOKENS, rng)
    updates, state = tx.update(grads, state, adapters)
    return optax.apply_updates(adapters, updates), state, value

  losses = []
  for i in range(15):
    adapters, state, value = step(adapters, state, jax.random.key(i))
    losses.append(float(value))
  assert losses[-1] < losses[0] - 0.5, losses
  for a, b in zip(before, jax.tree.leaves(q)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_merge():
  graphdef, _, q = _model()
  adapters = jax.tree.map(lambda x: x + 0.02, lora.init(q, CFG, jax.random.key(4)))
  forward = jaxbnb.intercept(lambda s, t: nnx.merge(graphdef, s)(t))
  adapted = forward(lora.attach(q, adapters, CFG), TOKENS)
  merged = lora.merge(q, adapters, CFG)
  assert not any(jaxbnb.is_quantized(x)
                 for x in jax.tree.leaves(merged, is_leaf=jaxbnb.is_quantized))
  np.testing.assert_allclose(np.asarray(nnx.merge(graphdef, merged)(TOKENS)),
                             np.asarray(adapted), rtol=1e-4, atol=1e-4)
  requant = lora.merge(q, adapters, CFG, requantize=NF4_DQ)
  rel = (np.linalg.norm(np.asarray(forward(requant, TOKENS)) - np.asarray(adapted))
         / np.linalg.norm(np.asarray(adapted)))
  assert rel < 0.25  # a second 4-bit rounding of the merged weights


def test_split_trainable_and_counts():
  _, state, q = _model()
  frozen, train = lora.split_trainable(q, trainable=["ln1", "ln2", "ln_f"])
  n_train = lora.count_params(train)
  assert 0 < n_train < 5000 and lora.count_params(frozen) + n_train == lora.count_params(state)
  back = lora.combine(frozen, train)
  assert jax.tree.structure(back, is_leaf=jaxbnb.is_quantized) == jax.tree.structure(
      q, is_leaf=jaxbnb.is_quantized)


def test_linen_model_with_adapters():
  model = GPTLinen(GPTConfig())
  variables = model.init(jax.random.key(0), TOKENS)
  q = jaxbnb.quantize(variables, NF4_DQ)
  adapters = lora.init(q, lora.LoRAConfig(rank=2, targets=["*.mlp.*"]), jax.random.key(5))
  assert len(adapters) == 4
  out = jaxbnb.intercept(model.apply)(lora.attach(q, adapters, lora.LoRAConfig(rank=2)), TOKENS)
  np.testing.assert_allclose(np.asarray(out), np.asarray(jaxbnb.intercept(model.apply)(q, TOKENS)),
                             atol=1e-6)


def test_bad_config_and_missing_paths():
  with pytest.raises(ValueError, match="rank"):
    lora.LoRAConfig(rank=0)
  _, _, q = _model()
  with pytest.raises(ValueError, match="no weight matched"):
    lora.init(q, lora.LoRAConfig(targets=["nothing"]), jax.random.key(0))
  with pytest.raises(ValueError, match="not in params"):
    lora.attach(q, {"x.kernel": {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}}, CFG)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")
def test_qlora_step_on_a_2x4_mesh_gives_the_single_device_loss():
  graphdef, _, q = _model()
  adapters = jax.tree.map(lambda x: x + 0.01, lora.init(q, CFG, jax.random.key(6)))
  loss = _loss_fn(graphdef, q)
  tx = optim.adamw8bit(1e-3, min_8bit_size=0)

  def step(adapters, state, tokens):
    value, grads = jax.value_and_grad(loss)(adapters, tokens)
    updates, state = tx.update(grads, state, adapters)
    return optax.apply_updates(adapters, updates), state, value

  ref_adapters, _, ref_loss = jax.jit(step)(adapters, tx.init(adapters), TOKENS)

  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
  shard = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  fsdp = lambda x: shard(x, P("fsdp") if x.ndim and x.shape[0] % 4 == 0 else P())
  q_sharded = jax.tree.map(fsdp, q)            # packed base sharded over fsdp
  ad_sharded = jax.tree.map(fsdp, adapters)    # adapters too; 8-bit state follows them
  state = tx.init(ad_sharded)                  # 8-bit moments are created sharded like them
  for m in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optim.QuantizedMoment)):
    if isinstance(m, optim.QuantizedMoment) and m.q.shape[0] % 4 == 0:
      assert not m.q.sharding.is_fully_replicated
  tokens = shard(TOKENS, P("data"))            # batch over data
  loss_s = _loss_fn(graphdef, q_sharded)

  def step_s(adapters, state, tokens):
    value, grads = jax.value_and_grad(loss_s)(adapters, tokens)
    updates, state = tx.update(grads, state, adapters)
    return optax.apply_updates(adapters, updates), state, value

  new_adapters, state, value = jax.jit(step_s)(ad_sharded, state, tokens)
  np.testing.assert_allclose(float(value), float(ref_loss), rtol=1e-5)
  g_ref = jax.grad(loss)(adapters, TOKENS)
  g_s = jax.jit(jax.grad(loss_s))(ad_sharded, tokens)
  for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-7)
  # A second step still gives the single-device loss. (Parameters agree to a fraction of one
  # step: a last-ulp gradient difference from the sharded reductions can move an 8-bit code.)
  _, _, value2 = jax.jit(step_s)(new_adapters, state, tokens)
  _, _, ref2 = jax.jit(step)(ref_adapters, tx.update(g_ref, tx.init(adapters), adapters)[1],
                             TOKENS)
  np.testing.assert_allclose(float(value2), float(ref2), rtol=1e-4)


def test_explicit_nnx_lora_linear():
  base = jaxbnb.nn.LinearNF4(64, 32, rngs=nnx.Rngs(0))
  layer = lora.LoRALinear(base, rank=4, alpha=8, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(0), (3, 64))
  np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(base(x)))  # B = 0
  opt = nnx.Optimizer(layer, optim.adamw8bit(1e-2, min_8bit_size=0), wrt=lora.adapter_filter)
  target = jnp.ones((3, 32))
  packed_before = np.asarray(jax.tree.leaves(nnx.state(layer, jaxbnb.nn.QuantizedParam))[0])

  @nnx.jit
  def step(layer, opt):
    loss = lambda m: jnp.mean((m(x) - target) ** 2)
    value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, lora.adapter_filter))(layer)
    opt.update(layer, grads)
    return value

  losses = [float(step(layer, opt)) for _ in range(10)]
  assert losses[-1] < losses[0]
  np.testing.assert_array_equal(
      np.asarray(jax.tree.leaves(nnx.state(layer, jaxbnb.nn.QuantizedParam))[0]), packed_before)


def test_adapters_saved_alone_and_loaded_onto_the_base(tmp_path):
  from jaxbnb import checkpoint
  graphdef, _, q = _model()
  adapters = jax.tree.map(lambda x: x + 0.03, lora.init(q, CFG, jax.random.key(7)))
  checkpoint.save(tmp_path / "adapters", adapters)
  restored = checkpoint.restore(tmp_path / "adapters")
  assert lora.count_params(restored) == lora.count_params(adapters)  # only the adapters
  forward = jaxbnb.intercept(lambda s, t: nnx.merge(graphdef, s)(t))
  np.testing.assert_array_equal(np.asarray(forward(lora.attach(q, restored, CFG), TOKENS)),
                                np.asarray(forward(lora.attach(q, adapters, CFG), TOKENS)))
