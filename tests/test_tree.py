"""BitsAndBytesConfig validation; quantize / dequantize / memory_footprint over pytrees."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbnb
from jaxbnb import BitsAndBytesConfig as Config

NF4_DQ = Config(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype="bfloat16")


def test_config_errors_name_the_fix():
  with pytest.raises(ValueError, match="choose one"):
    Config(load_in_4bit=True, load_in_8bit=True)
  with pytest.raises(ValueError, match="load_in_4bit=True or load_in_8bit=True"):
    Config()
  with pytest.raises(ValueError, match="'nf4', 'fp4'"):
    Config(load_in_4bit=True, bnb_4bit_quant_type="int4")
  with pytest.raises(ValueError, match="32, 64"):
    Config(load_in_4bit=True, blocksize=100)
  with pytest.raises(ValueError, match=">= 0"):
    Config(load_in_8bit=True, llm_int8_threshold=-1)
  with pytest.raises(ValueError, match="list of strings"):
    Config(load_in_8bit=True, llm_int8_skip_modules="lm_head")
  with pytest.raises(ValueError, match="not a dtype"):
    Config(load_in_4bit=True, bnb_4bit_compute_dtype="float99")
  with pytest.raises(NotImplementedError, match="QLoRA"):
    Config(load_in_8bit=True, llm_int8_has_fp16_weight=True)
  cfg = Config(load_in_4bit=True, bnb_4bit_compute_dtype="torch.bfloat16")
  assert cfg.bnb_4bit_compute_dtype == jnp.bfloat16
  assert cfg.llm_int8_skip_modules == ("lm_head",)


def _params():
  k = jax.random.split(jax.random.key(0), 4)
  return {
      "embed": {"embedding": jax.random.normal(k[0], (100, 64))},
      "block": {"dense": {"kernel": jax.random.normal(k[1], (64, 256)) * 0.05,
                          "bias": jnp.zeros(256)},
                "norm": {"scale": jnp.ones(64)}},
      "lm_head": {"kernel": jax.random.normal(k[2], (64, 100))},
      "step": jnp.array(3, jnp.int32),
  }


def test_quantize_picks_linear_weights_and_round_trips():
  params = _params()
  q = jaxbnb.quantize(params, NF4_DQ)
  assert isinstance(q["block"]["dense"]["kernel"], jaxbnb.Quantized4bit)
  for path in (("embed", "embedding"), ("block", "dense", "bias"), ("lm_head", "kernel"),
               ("block", "norm", "scale"), ("step",)):
    leaf = q
    for p in path:
      leaf = leaf[p]
    assert not jaxbnb.is_quantized(leaf), path  # embeddings, norms, lm_head stay float
  back = jaxbnb.dequantize(q)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  k, kb = params["block"]["dense"]["kernel"], back["block"]["dense"]["kernel"]
  assert kb.shape == k.shape and kb.dtype == k.dtype
  assert float(jnp.abs(k - kb).mean()) < 0.08 * float(jnp.abs(k).mean()) + 1e-3
  # bnb layout: blocks run along the input axis of each output feature (kernel.T rows).
  w = q["block"]["dense"]["kernel"]
  assert w.matrix_shape == (256, 64) and w.state.shape == (256, 64)


def test_quantize_embeddings_and_8bit():
  cfg = Config(load_in_8bit=True, quantize_embeddings=True, llm_int8_skip_modules=[])
  q = jaxbnb.quantize(_params(), cfg)
  assert isinstance(q["embed"]["embedding"], jaxbnb.Quantized8bit)
  assert isinstance(q["lm_head"]["kernel"], jaxbnb.Quantized8bit)
  assert q["embed"]["embedding"].CB.shape == (100, 64)  # a table keeps its (rows, dim) layout


def test_skip_patterns_and_warning():
  cfg = Config(load_in_4bit=True, llm_int8_skip_modules=["*.dense.*", "nothing_here"])
  with pytest.warns(UserWarning, match="nothing_here"):
    q = jaxbnb.quantize(_params(), cfg)
  assert not jaxbnb.is_quantized(q["block"]["dense"]["kernel"])
  assert jaxbnb.is_quantized(q["lm_head"]["kernel"])  # the skip list replaced the default


def test_quantize_twice_is_a_no_op_and_never_double_quantizes():
  q = jaxbnb.quantize(_params(), NF4_DQ)
  q2 = jaxbnb.quantize(q, NF4_DQ)
  leaf, leaf2 = q["block"]["dense"]["kernel"], q2["block"]["dense"]["kernel"]
  assert leaf2 is leaf
  with pytest.raises(ValueError, match="already quantized"):
    jaxbnb.quantize(q, Config(load_in_8bit=True))
  with pytest.raises(ValueError, match="already quantized"):
    jaxbnb.quantize(q, Config(load_in_4bit=True, bnb_4bit_quant_type="fp4"))


def test_quantize_under_jit_matches_eager():
  params = _params()
  eager = jaxbnb.quantize(params, NF4_DQ)
  jitted = jax.jit(lambda p: jaxbnb.quantize(p, NF4_DQ))(params)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_memory_footprint_nf4_dq_vs_bf16():
  kernels = {f"l{i}": {"kernel": jax.random.normal(jax.random.key(i), (1024, 1024),
                                                   jnp.bfloat16)} for i in range(2)}
  q = jaxbnb.quantize(kernels, NF4_DQ)
  ratio = jaxbnb.memory_footprint(q) / jaxbnb.memory_footprint(kernels)
  assert ratio <= 0.29, ratio  # 4.127 / 16 = 0.258, plus codebooks
  assert jaxbnb.memory_footprint(kernels) == 2 * 1024 * 1024 * 2


def test_nnx_state_and_linen_variables():
  model = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
  _, state = nnx.split(model)
  q = jaxbnb.quantize(state, NF4_DQ)
  assert jaxbnb.is_quantized(q["kernel"].get_value())
  variables = nn.Dense(32).init(jax.random.key(0), jnp.ones((1, 64)))
  qv = jaxbnb.quantize(variables, NF4_DQ)
  assert jaxbnb.is_quantized(qv["params"]["kernel"])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jaxbnb.dequantize(qv)
