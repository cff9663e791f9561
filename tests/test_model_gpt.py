"""The reference GPT models (NNX and Linen): shapes, dtypes, causality, twin equivalence and
that a few Adam steps learn a repeated byte string."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxbnb.models import GPT, GPTConfig, GPTLinen, next_token_loss

CFG = GPTConfig()


def _tokens(batch=2, seq=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (batch, seq)), jnp.int32)


def _nnx_apply(model):
  """(pure apply(params, tokens), params) for an NNX model."""
  graphdef, params = nnx.split(model)
  return (lambda p, t: nnx.merge(graphdef, p)(t)), params


def _linen_apply(config, dtype=None):
  model = GPTLinen(config, dtype=dtype)
  params = model.init(jax.random.key(0), _tokens(1, 8))["params"]
  return (lambda p, t: model.apply({"params": p}, t)), params


@functools.cache  # building a model is cheap; its first eager ops compile, so share them
def _both(config, dtype=None):
  return {"nnx": _nnx_apply(GPT(config, dtype=dtype)), "linen": _linen_apply(config, dtype)}


def _count(params):
  return sum(x.size for x in jax.tree.leaves(params))


def _expected_count(c):
  d, f, v = c.d_model, c.d_ff, c.vocab_size
  block = 2 * 2 * d + 3 * (d * d + d) + (d * d + d) + (d * f + f) + (f * d + d)
  return v * d + c.max_len * d + c.n_layer * block + 2 * d + (0 if c.tie_embeddings else d * v)


@pytest.mark.parametrize("tie", [False, True])
def test_param_counts(tie):
  c = GPTConfig(tie_embeddings=tie)
  for name, (_, params) in _both(c).items():
    n = _count(params)
    print(f"{name} GPT (tie_embeddings={tie}): {n:,} params")
    assert n == _expected_count(c)
  assert _expected_count(CFG) == 495_104
  # Tied: the LM head is embed.attend, so there is no lm_head kernel.
  assert ("lm_head" in _both(c)["linen"][1]) == (not tie)
  assert ("lm_head" in _both(c)["nnx"][1]) == (not tie)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
@pytest.mark.parametrize("tie", [False, True])
def test_shapes_dtypes_finite(dtype, tie):
  c = GPTConfig(tie_embeddings=tie)
  tokens = _tokens(2, 16)
  for name, (apply, params) in _both(c, dtype).items():
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params)), name  # param_dtype
    logits = jax.jit(apply)(params, tokens)
    assert logits.shape == (2, 16, 256) and logits.dtype == jnp.float32, name
    assert bool(jnp.all(jnp.isfinite(logits))), name
    # Small init: near-uniform predictions, so the loss starts near log(256).
    assert abs(float(next_token_loss(logits, tokens)) - np.log(256)) < 0.1, name


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_causal(kind):
  apply, params = _both(CFG)[kind]
  tokens = _tokens(2, 12)
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 256)
  a, b = jax.jit(apply)(params, tokens), jax.jit(apply)(params, changed)
  np.testing.assert_array_equal(a[:, :7], b[:, :7])
  assert not np.allclose(a[:, 7:], b[:, 7:])


def test_nnx_and_linen_compute_the_same_function():
  """The NNX fused qkv kernel is the Linen q/k/v kernels stacked on axis 1; the NNX out
  kernel (d, d) is the Linen (h, k, d) one reshaped."""
  model = GPT(CFG)
  apply_l, _ = _linen_apply(CFG)
  p = nnx.state(model)
  lin = {"embed": {"embedding": p["embed"]["embedding"][...]},
         "pos_embed": {"embedding": p["pos_embed"]["embedding"][...]},
         "ln_f": {k: v[...] for k, v in p["ln_f"].items()},
         "lm_head": {"kernel": p["lm_head"]["kernel"][...]}}
  for i in range(CFG.n_layer):
    b = p["blocks"][i]
    qkv_k, qkv_b = b["attn"]["qkv"]["kernel"][...], b["attn"]["qkv"]["bias"][...]
    attn = {n: {"kernel": qkv_k[:, j], "bias": qkv_b[j]}
            for j, n in enumerate(("query", "key", "value"))}
    attn["out"] = {"kernel": b["attn"]["out"]["kernel"][...].reshape(CFG.n_head, CFG.head_dim, -1),
                   "bias": b["attn"]["out"]["bias"][...]}
    lin[f"blocks_{i}"] = {
        "attn": attn,
        "ln1": {k: v[...] for k, v in b["ln1"].items()},
        "ln2": {k: v[...] for k, v in b["ln2"].items()},
        "mlp": {f: {k: v[...] for k, v in b["mlp"][f].items()} for f in ("fc1", "fc2")}}
  tokens = _tokens(2, 16)
  np.testing.assert_allclose(apply_l(lin, tokens), model(tokens), rtol=1e-5, atol=1e-5)


def test_max_len_and_config_checks():
  too_long = _tokens(1, CFG.max_len + 1)
  for name, (apply, params) in _both(CFG).items():
    with pytest.raises(ValueError, match="max_len"):
      apply(params, too_long)
  with pytest.raises(ValueError, match="divisible"):
    GPTConfig(d_model=130, n_head=4)


def test_next_token_loss():
  tokens = _tokens(3, 10)
  assert np.isclose(float(next_token_loss(jnp.zeros((3, 10, 256)), tokens)), np.log(256))
  # A one-hot on the next token at every position: loss ~ 0.
  logits = 50.0 * jax.nn.one_hot(jnp.roll(tokens, -1, axis=1), 256)
  assert float(next_token_loss(logits, tokens)) < 1e-6


def test_dropout():
  c = GPTConfig(n_layer=1, dropout=0.5)
  tokens = _tokens(1, 8)
  model = GPT(c)
  model.train()
  assert not np.allclose(model(tokens), model(tokens))
  model.eval()
  np.testing.assert_array_equal(model(tokens), model(tokens))
  lin = GPTLinen(c)
  params = lin.init(jax.random.key(0), tokens)
  a = lin.apply(params, tokens, deterministic=False, rngs={"dropout": jax.random.key(1)})
  b = lin.apply(params, tokens, deterministic=False, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(lin.apply(params, tokens), lin.apply(params, tokens))


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_adam_learns_repeated_bytes(kind):
  apply, params = _both(CFG)[kind]
  text = b"the quick brown fox jumps over the lazy dog. " * 4
  tokens = jnp.asarray(np.frombuffer(text[:2 * 64], np.uint8).reshape(2, 64), jnp.int32)
  opt = optax.adam(3e-3)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(lambda p: next_token_loss(apply(p, tokens), tokens))(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state = opt.init(params)
  losses = []
  for _ in range(30):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  print(f"{kind}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
  assert losses[0] > 5.0 and losses[-1] < 0.5 * losses[0]
