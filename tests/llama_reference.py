"""Tiny random Llama-family checkpoints (Hugging Face folder, GGUF) and an independent numpy
reference forward, for tests/test_model_llama.py and tests/test_from_pretrained.py.

Nothing here imports jaxbnb: the reference is written from transformers' modeling_llama /
modeling_qwen2 semantics, and the GGUF writer applies llama.cpp's q/k permutation as its
converter does.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np

TINY = dict(vocab_size=261, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=False,
            model_type="llama", hidden_act="silu", bos_token_id=258, eos_token_id=260,
            pad_token_id=259)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def hf_config(**overrides) -> dict:
  cfg = dict(TINY)
  cfg.update(overrides)
  cfg.setdefault("architectures", [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                    "mistral": "MistralForCausalLM"}.get(cfg["model_type"], "?")])
  return cfg


def _biases(cfg) -> tuple[bool, bool]:
  """(q/k/v bias, o_proj bias) as transformers builds each model type."""
  if cfg["model_type"] == "qwen2":
    return True, False
  b = cfg.get("attention_bias", False) and cfg["model_type"] == "llama"
  return b, b


def random_state_dict(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """transformers-named float32 tensors, torch ``(out, in)`` layout."""
  rng = np.random.default_rng(seed)
  d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  hd = cfg.get("head_dim") or d // h
  w = lambda *s: (rng.standard_normal(s) * 0.08).astype(np.float32)
  norm = lambda: (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
  qkv_bias, o_bias = _biases(cfg)
  sd = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": norm()}
  if not cfg["tie_word_embeddings"]:
    sd["lm_head.weight"] = w(v, d)
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    sd[p + "input_layernorm.weight"] = norm()
    sd[p + "post_attention_layernorm.weight"] = norm()
    for name, shape in (("q_proj", (h * hd, d)), ("k_proj", (kv * hd, d)),
                        ("v_proj", (kv * hd, d))):
      sd[p + f"self_attn.{name}.weight"] = w(*shape)
      if qkv_bias:
        sd[p + f"self_attn.{name}.bias"] = w(shape[0])
    sd[p + "self_attn.o_proj.weight"] = w(d, h * hd)
    if o_bias:
      sd[p + "self_attn.o_proj.bias"] = w(d)
    sd[p + "mlp.gate_proj.weight"] = w(f, d)
    sd[p + "mlp.up_proj.weight"] = w(f, d)
    sd[p + "mlp.down_proj.weight"] = w(d, f)
  return sd


def _inv_freq(cfg, hd):
  inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd)
  s = cfg.get("rope_scaling")
  if s and s["rope_type"] == "llama3":
    # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a linear blend between.
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    blend = np.clip((old / wavelen - s["low_freq_factor"])
                    / (s["high_freq_factor"] - s["low_freq_factor"]), 0, 1)
    inv = (1 - blend) * inv / s["factor"] + blend * inv
  elif s and s["rope_type"] == "linear":
    inv = inv / s["factor"]
  return inv


def reference_logits(sd: dict, cfg: dict, tokens: np.ndarray,
                     attention_mask: np.ndarray | None = None) -> np.ndarray:
  """float64 logits ``(B, T, vocab)``: a plain numpy Llama/Mistral/Qwen2 forward.

  Left padding: positions count real tokens only, pad keys are never attended.
  """
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  tokens = np.asarray(tokens)
  b, t = tokens.shape
  mask = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask, bool)
  d, h, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
  hd = cfg.get("head_dim") or d // h
  eps = cfg["rms_norm_eps"]
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  ang = pos[..., None] * _inv_freq(cfg, hd)  # (B, T, hd/2)
  cos = np.cos(np.concatenate([ang, ang], -1))[:, :, None]
  sin = np.sin(np.concatenate([ang, ang], -1))[:, :, None]

  def rms(x, w):
    return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)

  def rotate(x):  # (B, T, heads, hd): rotate halves
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return x * cos + np.concatenate([-x2, x1], -1) * sin

  def lin(x, name):
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if name + ".bias" in sd else y

  allowed = np.tril(np.ones((t, t), bool))
  window = cfg.get("sliding_window") if cfg["model_type"] == "mistral" else None
  if window:
    allowed &= np.arange(t)[:, None] - np.arange(t)[None, :] < window
  allowed = allowed[None] & mask[:, None, :]
  x = sd["model.embed_tokens.weight"][tokens]
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    a = rms(x, sd[p + "input_layernorm.weight"])
    q = rotate(lin(a, p + "self_attn.q_proj").reshape(b, t, h, hd))
    k = rotate(lin(a, p + "self_attn.k_proj").reshape(b, t, kv, hd))
    v = lin(a, p + "self_attn.v_proj").reshape(b, t, kv, hd)
    k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    s = np.where(allowed[:, None], s, -np.inf)
    s = np.where(np.isneginf(s).all(-1, keepdims=True), 0.0, s)  # all-pad query rows
    pr = np.exp(s - s.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", pr, v).reshape(b, t, h * hd)
    x = x + lin(o, p + "self_attn.o_proj")
    a = rms(x, sd[p + "post_attention_layernorm.weight"])
    g = lin(a, p + "mlp.gate_proj")
    x = x + lin(g / (1 + np.exp(-g)) * lin(a, p + "mlp.up_proj"), p + "mlp.down_proj")
  x = rms(x, sd["model.norm.weight"])
  head = sd["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else sd["lm_head.weight"]
  return x @ head.T


def write_hf(path, sd: dict, cfg: dict, *, shards: int = 1) -> pathlib.Path:
  """A Hugging Face folder: config.json + model.safetensors (or ``shards`` shards + index)."""
  from safetensors.numpy import save_file
  d = pathlib.Path(path)
  d.mkdir(parents=True, exist_ok=True)
  (d / "config.json").write_text(json.dumps(cfg, indent=2))
  if shards == 1:
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d
  names = sorted(sd)
  weight_map = {}
  for s in range(shards):
    file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = names[s::shards]
    save_file({n: sd[n] for n in part}, str(d / file), metadata={"format": "pt"})
    weight_map.update({n: file for n in part})
  (d / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {"total_size": sum(v.nbytes for v in sd.values())},
       "weight_map": weight_map}))
  return d


# --- GGUF ----------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table (byte-level BPE vocabularies use it)."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
  """(tokens, merges, token types): 256 byte tokens, two merges, three control tokens — 261
  tokens, TINY's vocab_size. Ids: 256 'Ġt', 257 'he', 258.. the specials."""
  tokens = [bytes_to_unicode()[b] for b in range(256)] + ["Ġt", "he"] + SPECIAL
  merges = ["Ġ t", "h e"]
  types = [1] * 258 + [3] * len(SPECIAL)
  return tokens, merges, types


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute: interleave each head's two halves.
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf: str) -> str:
  top = {"model.embed_tokens.weight": "token_embd.weight",
         "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
  if hf in top:
    return top[hf]
  _, _, i, rest = hf.split(".", 3)
  module, kind = rest.rsplit(".", 1)
  return f"blk.{i}.{_GGUF_NAMES[module]}.{kind}"


def write_gguf(path, sd: dict, cfg: dict, *, qtype: str = "F32", tokenizer: bool = True) -> dict:
  """A GGUF file as llama.cpp's converter writes it (q/k permuted for ``llama``); 2-D weights
  stored as ``qtype`` (F32, F16, Q8_0, Q4_0, Q4_1, ...; norms stay F32). Returns the
  transformers-named float32 weights the file holds (its quantization undone) for a
  reference."""
  import gguf
  arch = {"llama": "llama", "qwen2": "qwen2"}[cfg["model_type"]]
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg["num_hidden_layers"])
  w.add_context_length(cfg["max_position_embeddings"])
  w.add_embedding_length(cfg["hidden_size"])
  w.add_feed_forward_length(cfg["intermediate_size"])
  w.add_head_count(cfg["num_attention_heads"])
  w.add_head_count_kv(cfg["num_key_value_heads"])
  w.add_rope_freq_base(cfg["rope_theta"])
  w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  w.add_vocab_size(cfg["vocab_size"])
  if tokenizer:
    tokens, merges, types = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_chat_template(CHAT_TEMPLATE)
  q = getattr(gguf.GGMLQuantizationType, qtype)
  held = {}
  h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  for name, value in sd.items():
    x = value
    if arch == "llama" and ".q_proj." in name:
      x = _permute(x, h)
    elif arch == "llama" and ".k_proj." in name:
      x = _permute(x, kv)
    if x.ndim == 2 and q != gguf.GGMLQuantizationType.F32:
      data = gguf.quants.quantize(x, q)
      back = gguf.quants.dequantize(data, q).astype(np.float32)
      w.add_tensor(gguf_name(name), data, raw_dtype=q)
    else:
      back = x
      w.add_tensor(gguf_name(name), x)
    if arch == "llama" and ".q_proj." in name:  # the reference sees transformers' row order
      back = back.reshape(h, -1, 2, *back.shape[1:]).swapaxes(1, 2).reshape(back.shape)
    elif arch == "llama" and ".k_proj." in name:
      back = back.reshape(kv, -1, 2, *back.shape[1:]).swapaxes(1, 2).reshape(back.shape)
    held[name] = np.asarray(back, np.float32)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return held
