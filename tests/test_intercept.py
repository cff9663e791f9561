"""Unmodified Flax models (NNX GPT, Linen GPT, the MiniLM BERT) run on quantized params."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbnb
from jaxbnb.models import bert
from jaxbnb.models.gpt import GPT, GPTConfig, next_token_loss
from jaxbnb.models.gpt_linen import GPTLinen

NF4_DQ = jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True)
FP4 = jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4")
INT8 = jaxbnb.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
CONFIGS = {"nf4+dq": NF4_DQ, "fp4": FP4, "int8": INT8}
# Relative L2 error of the logits against the float model: a format-appropriate budget.
REL_TOL = {"nf4+dq": 0.25, "fp4": 0.35, "int8": 0.03}

TOKENS = jnp.asarray(np.frombuffer(b"the quick brown fox jumps over the lazy dog" * 2, np.uint8)
                     [None, :48].astype(np.int32))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@functools.cache
def _nnx_gpt(tie: bool, dtype):
  model = GPT(GPTConfig(tie_embeddings=tie), dtype=dtype)
  return nnx.split(model)


@pytest.mark.filterwarnings("error")  # no weight may fall back to a dequantized copy
@pytest.mark.parametrize("fmt", sorted(CONFIGS))
@pytest.mark.parametrize("tie,dtype", [(False, None), (True, None), (False, jnp.bfloat16)])
def test_nnx_gpt(fmt, tie, dtype):
  graphdef, state = _nnx_gpt(tie, dtype)
  forward = lambda s, t: nnx.merge(graphdef, s)(t)
  ref = forward(state, TOKENS)
  cfg = CONFIGS[fmt]
  if tie:  # the tied head is the embedding: quantize it too (lookup rows + attend)
    cfg = jaxbnb.BitsAndBytesConfig(**{**cfg.__dict__, "quantize_embeddings": True})
  q = jaxbnb.quantize(state, cfg)
  n_quantized = sum(jaxbnb.is_quantized(x) for x in jax.tree.leaves(q, is_leaf=jaxbnb.is_quantized))
  assert n_quantized >= 2 * 3 + (2 if tie else 1)
  out = jax.jit(jaxbnb.intercept(forward))(q, TOKENS)
  assert out.shape == ref.shape and out.dtype == ref.dtype
  # Same function as the float model run on the dequantized weights (LLM.int8() also
  # quantizes activations; bf16 models compute the 4-bit matmuls in the config's float32) ...
  deq = forward(jaxbnb.dequantize(q), TOKENS)
  if fmt == "int8" or dtype == jnp.bfloat16:
    assert _rel(out, deq) < 0.02
  else:
    np.testing.assert_allclose(np.asarray(out), np.asarray(deq), atol=1e-4, rtol=1e-4)
  # ... and close to the original float model.
  assert _rel(out, ref) < REL_TOL[fmt] * (2 if dtype == jnp.bfloat16 else 1)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("fmt", ["nf4+dq", "fp4"])
def test_linen_gpt(fmt):
  model = GPTLinen(GPTConfig())
  variables = model.init(jax.random.key(0), TOKENS)
  ref = model.apply(variables, TOKENS)
  q = jaxbnb.quantize(variables, CONFIGS[fmt])
  assert jaxbnb.is_quantized(q["params"]["blocks_0"]["attn"]["out"]["kernel"])
  out = jax.jit(jaxbnb.intercept(model.apply))(q, TOKENS)
  np.testing.assert_allclose(np.asarray(out), np.asarray(model.apply(jaxbnb.dequantize(q),
                                                                     TOKENS)),
                             atol=1e-4, rtol=1e-4)
  assert _rel(out, ref) < REL_TOL[fmt]


def test_linen_gpt_int8_warns_on_multi_axis_kernels():
  """DenseGeneral(axis=(-2, -1)) contracts two kernel axes: LLM.int8() cannot take that
  product (its rows are per first-axis split); it runs dequantized, with a warning."""
  model = GPTLinen(GPTConfig())
  variables = model.init(jax.random.key(0), TOKENS)
  q = jaxbnb.quantize(variables, INT8)
  with pytest.warns(UserWarning, match="16-bit"):
    out = jaxbnb.intercept(model.apply)(q, TOKENS)
  assert _rel(out, model.apply(variables, TOKENS)) < REL_TOL["int8"]


def test_gradients_flow_to_float_params_only():
  """QLoRA's pattern: differentiate w.r.t. the float leaves, the packed ones are closed over."""
  graphdef, state = _nnx_gpt(False, None)
  q = jaxbnb.quantize(state, NF4_DQ)
  is_q = lambda x: jaxbnb.is_quantized(x)
  mask = jax.tree.map(is_q, q, is_leaf=is_q)
  floats = jax.tree.map(lambda x, m: None if m else x, q, mask, is_leaf=is_q)
  packed = jax.tree.map(lambda x, m: x if m else None, q, mask, is_leaf=is_q)

  def merge(a, b):
    return jax.tree.map(lambda x, y: y if x is None else x, a, b,
                        is_leaf=lambda x: x is None or is_q(x))

  def loss(floats, packed):
    return next_token_loss(nnx.merge(graphdef, merge(packed, floats))(TOKENS), TOKENS)

  g = jax.jit(jax.grad(jaxbnb.intercept(loss)))(floats, packed)
  g_ref = jax.grad(loss)(floats, jaxbnb.dequantize(packed))
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_footprint_of_quantized_gpt():
  graphdef, state = _nnx_gpt(False, None)
  q = jaxbnb.quantize(state, NF4_DQ)
  is_q = jaxbnb.is_quantized
  packed = [x for x in jax.tree.leaves(q, is_leaf=is_q) if is_q(x)]
  bf16 = [jnp.zeros(x.shape, jnp.bfloat16) for x in packed]
  assert len(packed) == 2 * 4  # qkv, out, fc1, fc2 per block (lm_head is skipped by default)
  assert jaxbnb.memory_footprint(packed) <= 0.29 * jaxbnb.memory_footprint(bf16)
  assert jaxbnb.memory_footprint(q) < 0.5 * jaxbnb.memory_footprint(state)


@pytest.fixture(scope="module")
def minilm():
  model, tokenizer = bert.load_minilm()
  return nnx.split(model), tokenizer


SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.",
             "The girl is carrying a baby.", "A man is riding a horse.",
             "A woman is playing violin.", "Two men pushed carts through the woods."]


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("fmt", ["nf4+dq", "int8"])
def test_minilm_sentence_embeddings(minilm, fmt):
  (graphdef, state), tokenizer = minilm
  enc = tokenizer.encode_batch(SENTENCES)
  ids = jnp.asarray([e.ids for e in enc], jnp.int32)
  mask = jnp.asarray([e.attention_mask for e in enc], jnp.int32)

  def embed(s, ids, mask):
    return bert.sentence_embedding(nnx.merge(graphdef, s)(ids, mask), mask)

  ref = embed(state, ids, mask)
  out = jax.jit(jaxbnb.intercept(embed))(jaxbnb.quantize(state, CONFIGS[fmt]), ids, mask)
  cos = np.sum(np.asarray(out) * np.asarray(ref), axis=-1)
  # Measured (2026-11-23): NF4+DQ min 0.969 / mean 0.975 (bit-identical weights to bnb's, so
  # bnb gets the same); LLM.int8() min 0.9991. A 384-wide 6-layer model is sensitive to 4 bits.
  assert cos.min() >= {"nf4+dq": 0.96, "int8": 0.998}[fmt], cos


@pytest.mark.parametrize("fmt", ["nf4+dq", "int8"])
def test_intercept_backend_pallas_runs_the_kernels(fmt):
  """intercept(fn, backend="pallas") sends the model's matmuls to the Pallas kernels (interpret
  mode here) with the XLA path's answer; a bad backend name fails when wrapping."""
  graphdef, state = _nnx_gpt(False, None)
  forward = lambda s, t: nnx.merge(graphdef, s)(t)
  q = jaxbnb.quantize(state, CONFIGS[fmt])
  tokens = TOKENS[:, :24]
  pallas = jaxbnb.intercept(forward, backend="pallas")
  assert "pallas_call" in str(jax.make_jaxpr(pallas)(q, tokens))
  want = jax.jit(jaxbnb.intercept(forward, backend="xla"))(q, tokens)
  got = jax.jit(pallas)(q, tokens)
  assert _rel(got, want) < 1e-4
  with pytest.raises(ValueError, match="backend"):
    jaxbnb.intercept(forward, backend="cuda")
