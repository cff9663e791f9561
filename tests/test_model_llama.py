"""The NNX Llama (jaxbnb.models.llama) and its runner (CausalLM): against an independent numpy
forward, KV-cache decoding, sampling, batched left padding, and packed weights run packed."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, strategies as st

import jaxbnb
from jaxbnb.models import generate as G
from jaxbnb.models.causal_lm import CausalLM, _forward, stack_layers
from jaxbnb.models.hub import config_from_hf, hf_to_path
from jaxbnb.models.llama import Llama
from tests.llama_reference import LLAMA3_ROPE, hf_config, random_state_dict, reference_logits

VARIANTS = {
    "llama-gqa": {},
    "llama3-tied": dict(tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE),
    "llama-bias-linear-rope": dict(attention_bias=True, mlp_bias=False,
                                   rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=1, rope_theta=1e6),
    "mistral-window": dict(model_type="mistral", sliding_window=5),
    "head-dim": dict(head_dim=32, num_attention_heads=4, num_key_value_heads=4),
}
TOKENS = np.array([[5, 17, 250, 3, 99, 42, 7, 1, 0, 200, 31, 64],
                   [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 255, 254]], np.int32)


def _params(sd, config, dtype=jnp.float32):
  """Llama's pure-dict params from a transformers state dict (names mapped as from_pretrained
  maps them)."""
  tree = {}
  for name, value in sd.items():
    r = hf_to_path(name, config)
    if r is None:
      continue
    path, transpose = r
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = jnp.asarray(value.T if transpose else value, dtype)
  return tree


def _lm(sd, cfg, dtype=jnp.float32, quant=None, scan=True):
  config = config_from_hf(cfg)
  params = _params(sd, config, dtype)
  if quant is not None:
    params = jaxbnb.quantize(params, quant)
  if scan:
    params["layers"] = stack_layers(params["layers"])
  return CausalLM(config, params, dtype=dtype)


@functools.partial(jax.jit, static_argnums=0)
def _module_logits(config, params, tokens):
  """The plain NNX Llama (no jaxbnb runner) on float params."""
  return nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Llama(config))), params)(tokens)


@functools.cache
def _variant(name):
  cfg = hf_config(**VARIANTS[name])
  sd = random_state_dict(cfg, seed=len(name))
  return cfg, sd, _lm(sd, cfg)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_module_and_runner_match_the_numpy_reference(name):
  cfg, sd, lm = _variant(name)
  ref = reference_logits(sd, cfg, TOKENS)
  config = config_from_hf(cfg)
  np.testing.assert_allclose(np.asarray(_module_logits(config, _params(sd, config), TOKENS)),
                             ref, rtol=2e-4, atol=2e-4)
  # The scanned runner, with row 0 left-padded: positions and keys skip the pads.
  mask = np.ones_like(TOKENS)
  mask[0, :4] = 0
  padded = np.where(mask == 1, TOKENS, cfg["pad_token_id"])
  out = np.asarray(lm(padded, mask))
  np.testing.assert_allclose(out[1], ref[1], rtol=2e-4, atol=2e-4)
  alone = reference_logits(sd, cfg, TOKENS[:1, 4:])[0]
  np.testing.assert_allclose(out[0, 4:], alone, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(out[0, 4:], reference_logits(sd, cfg, padded, mask)[0, 4:],
                             rtol=2e-4, atol=2e-4)


def test_unrolled_runner_matches_the_scanned_one():
  cfg, sd, lm = _variant("llama-gqa")
  np.testing.assert_allclose(np.asarray(_lm(sd, cfg, scan=False)(TOKENS)), np.asarray(lm(TOKENS)),
                             rtol=1e-5, atol=1e-5)


def _naive_logits(lm, seq, length):
  """Last-position logits of ``seq`` recomputed from scratch (right-padded to ``length``, which
  causal attention never sees: one compilation for every prefix)."""
  row = np.zeros((1, length), np.int32)
  row[0, :len(seq)] = seq
  return np.asarray(lm(row))[0, len(seq) - 1]


def _naive_greedy(lm, prompt, n, length=16):
  seq = list(prompt)
  for _ in range(n):
    seq.append(int(np.argmax(_naive_logits(lm, seq, length))))
  return seq[len(prompt):]


@pytest.mark.parametrize("name", ["llama3-tied", "mistral-window", "qwen2"])
def test_cached_greedy_generation_equals_full_recomputation(name):
  _, _, lm = _variant(name)
  prompt = TOKENS[0, :7]
  got = lm.generate(prompt[None], max_new_tokens=6, eos_token_id=())
  assert got.shape == (1, 6) and got.dtype == np.int32
  assert got[0].tolist() == _naive_greedy(lm, prompt, 6)


def test_batched_left_padded_prompts_generate_as_alone():
  cfg, _, lm = _variant("llama-gqa")
  a, b = [3, 1, 4, 1, 5, 9, 2, 6], [27, 18, 28]
  tokens = np.full((2, 8), cfg["pad_token_id"], np.int32)
  mask = np.zeros((2, 8), np.int32)
  tokens[0], mask[0] = a, 1
  tokens[1, -3:], mask[1, -3:] = b, 1
  both = lm.generate(tokens, mask, max_new_tokens=5, eos_token_id=())
  assert both[0].tolist() == _naive_greedy(lm, a, 5)
  assert both[1].tolist() == _naive_greedy(lm, b, 5)
  # A row stops at EOS; its later slots hold the pad id, the other row goes on.
  stop = int(both[0, 1])
  out = lm.generate(tokens, mask, max_new_tokens=5, eos_token_id=stop)
  first = both[0].tolist().index(stop)
  assert out[0, :first + 1].tolist() == both[0, :first + 1].tolist()
  assert (out[0, first + 1:] == cfg["pad_token_id"]).all()
  if stop not in both[1].tolist():
    assert out[1].tolist() == both[1].tolist()


def test_sampling_is_seeded_and_respects_top_k():
  _, _, lm = _variant("llama-gqa")
  kw = dict(max_new_tokens=8, temperature=1.0, top_k=3, eos_token_id=())
  a = lm.generate(TOKENS, seed=1, **kw)
  np.testing.assert_array_equal(a, lm.generate(TOKENS, seed=1, **kw))
  assert not np.array_equal(a, lm.generate(TOKENS, seed=2, **kw))
  # Each sampled token is among the 3 most likely after its prefix.
  seq = list(TOKENS[0])
  for tok in a[0]:
    assert tok in np.argsort(_naive_logits(lm, seq, 24))[-3:]
    seq.append(int(tok))


def test_sample_greedy_and_top_k_1_agree():
  logits = jax.random.normal(jax.random.key(0), (4, 50))
  greedy = G.sample(logits, jax.random.key(1))
  np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))
  np.testing.assert_array_equal(
      G.sample(logits, jax.random.key(1), temperature=0.7, top_k=1), greedy)
  np.testing.assert_array_equal(
      G.sample(logits, jax.random.key(1), temperature=0.7, top_p=1e-6), greedy)


@given(st.lists(st.floats(-20, 20), min_size=24, max_size=24), st.floats(0.01, 0.99),
       st.integers(0, 30))
def test_filter_logits_keeps_the_top_p_nucleus_and_top_k(values, top_p, top_k):
  logits = np.asarray([values], np.float32)
  out = np.asarray(G.filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p))[0]
  kept = np.isfinite(out)
  assert kept[np.argmax(logits[0])]  # the most likely token always stays
  np.testing.assert_array_equal(out[kept], logits[0][kept])
  after_k = logits[0]
  if 0 < top_k < len(values):
    kth = np.sort(after_k)[-top_k]
    assert not kept[after_k < kth].any()
    after_k = np.where(after_k < kth, -np.inf, after_k)
  # Nucleus: every kept token has less than top_p of the (top-k) mass strictly above it.
  p = np.exp(after_k - after_k.max())
  p /= p.sum()
  above = np.array([p[p > p[i]].sum() for i in range(len(p))])
  assert (above[kept] < top_p + 1e-5).all()
  assert not (kept & (p == 0)).any()


@pytest.mark.filterwarnings("error")  # no weight may fall back to a dequantized float copy
@pytest.mark.parametrize("fmt,quant", [
    ("nf4", jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
    ("fp4-bf16", jaxbnb.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=jnp.bfloat16)),
    ("int8", jaxbnb.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0))])
def test_packed_weights_run_packed(fmt, quant):
  cfg = hf_config(tie_word_embeddings=True, num_hidden_layers=4, hidden_size=256,
                  intermediate_size=512)
  sd = random_state_dict(cfg, 5)
  lm = _lm(sd, cfg, quant=quant)
  assert lm.scanned
  packed = [x for x in jax.tree.leaves(lm.params, is_leaf=jaxbnb.is_quantized)
            if jaxbnb.is_quantized(x)]
  assert len(packed) == 7  # q, k, v, o, gate, up, down, each stacked over the layers

  def compiled(tokens):
    return _forward.lower(lm.runner, lm.params, jnp.asarray(tokens),
                          jnp.ones(tokens.shape, jnp.int32)).compile()

  prefill = compiled(TOKENS)
  out = np.asarray(prefill(lm.params, jnp.asarray(TOKENS), jnp.ones(TOKENS.shape, jnp.int32)))
  # The same function as the float model on the dequantized weights ...
  ref = np.asarray(_module_logits(lm.config, jaxbnb.dequantize(lm.unstacked_params()), TOKENS))
  if fmt == "nf4":
    np.testing.assert_allclose(out, ref, rtol=2e-4, atol=2e-4)
  else:  # bf16 matmuls; LLM.int8() also quantizes the activations (to int8, per row)
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel < {"fp4-bf16": 0.02, "int8": 0.06}[fmt], rel
  if fmt == "nf4":  # ... and generation decodes through the same packed matmuls.
    assert lm.generate(TOKENS, max_new_tokens=3, eos_token_id=()).shape == (2, 3)

  def temporaries(tokens):
    compiled = _forward.lower(lm.runner, lm.params, jnp.asarray(tokens),
                                 jnp.ones(tokens.shape, jnp.int32)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  # Layers run one at a time (a scan): a prefill holds at most about one layer's weights in
  # float32, never all four layers' (an unrolled graph hoists every layer's decode).
  layer_f32 = sum(4 * int(np.prod(x.shape)) for x in packed)
  assert prefill.memory_analysis().temp_size_in_bytes < 1.5 * layer_f32
  if fmt != "int8":  # a decode step (M=1) makes no float copy of any 4-bit weight at all:
    # each one-row product holds float32 partial sums of 1/8 of its weight's float32 bytes,
    # and XLA may keep a few (q, k, v; gate, up) alive together.
    step = compiled(TOKENS[:1, :1]).memory_analysis().temp_size_in_bytes
    assert step < max(4 * int(np.prod(x.shape)) for x in packed) / 2


def test_quantizing_the_stacked_tree_as_one_matrix_is_refused():
  cfg, _, lm = _variant("llama-gqa")
  with pytest.raises(ValueError, match=r"lm.quantize\(config\)"):
    CausalLM(lm.config, jaxbnb.quantize(lm.params, jaxbnb.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4")), dtype=jnp.float32)


def test_layers_that_differ_run_unrolled():
  cfg = hf_config()
  sd = random_state_dict(cfg, 6)
  quant = jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    llm_int8_skip_modules=["lm_head", "layers.1.mlp"])
  config = config_from_hf(cfg)
  params = jaxbnb.quantize(_params(sd, config), quant)
  assert stack_layers(params["layers"]) is None
  lm = CausalLM(config, params, dtype=jnp.float32)
  assert not lm.scanned and not jaxbnb.is_quantized(lm.params["layers"][1]["mlp"]["up_proj"][
      "kernel"])
  np.testing.assert_allclose(np.asarray(lm(TOKENS)),
                             _module_logits(config, jaxbnb.dequantize(params), TOKENS),
                             rtol=2e-4, atol=2e-4)


def test_bf16_model_tracks_the_reference():
  cfg = hf_config()
  sd = random_state_dict(cfg, 7)
  out = np.asarray(_lm(sd, cfg, dtype=jnp.bfloat16)(TOKENS))
  assert out.dtype == np.float32
  ref = reference_logits(sd, cfg, TOKENS)
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.03


def test_lm_quantize_packs_one_layer_at_a_time(monkeypatch):
  """``lm.quantize`` equals ``jaxbnb.quantize`` of the unstacked params, warns about an unused
  skip pattern once, and never holds more than one layer's float slice beyond the params."""
  import warnings  # noqa: PLC0415
  from jaxbnb.models import causal_lm  # noqa: PLC0415
  cfg = hf_config(num_hidden_layers=4)
  lm = _lm(random_state_dict(cfg, 8), cfg)
  f32_live = lambda: sum(a.nbytes for a in jax.live_arrays() if a.dtype == jnp.float32)
  layer_bytes = sum(a.nbytes // 4 for a in jax.tree.leaves(lm.params["layers"]))
  base, peak = f32_live(), [0]
  real = causal_lm.quantize_parts

  def spy(params, config, **kw):
    peak[0] = max(peak[0], f32_live() - base)
    return real(params, config, **kw)
  monkeypatch.setattr(causal_lm, "quantize_parts", spy)
  quant = jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    llm_int8_skip_modules=["lm_head", "layers.1.mlp", "nothing"])
  with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    packed = lm.quantize(quant)
  msgs = [str(w.message) for w in seen if "matched no quantizable leaf" in str(w.message)]
  assert msgs == ["llm_int8_skip_modules patterns matched no quantizable leaf: ['nothing']"]
  # The slice being packed plus what stays float by design (layer 1's MLP): under two layers'
  # worth, where unstacking first held all four.
  assert peak[0] < 2 * layer_bytes, (peak[0], layer_bytes)
  assert not packed.scanned  # layer 1 kept its MLP in float: the layers differ
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ref = jaxbnb.quantize(lm.unstacked_params(), quant)
  for a, b in zip(jax.tree.leaves(packed.params), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
