"""``from_pretrained`` / ``save_pretrained`` for Llama-family causal LMs: Hugging Face folders
(config.json + model.safetensors or a sharded index, float or already quantized by
bitsandbytes/transformers) and ``.gguf`` files, into a :class:`CausalLM` whose weights may be
packed (NF4/FP4/LLM.int8()) and run packed through :func:`jaxbnb.intercept`.

  lm = jaxbnb.models.from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf",
                                     quantization_config=jaxbnb.BitsAndBytesConfig(
                                         load_in_4bit=True, bnb_4bit_quant_type="nf4"))
  logits = lm(tokens)                       # int32 (B, T) -> float32 (B, T, vocab)
  print(lm.chat([{"role": "user", "content": "What is the capital of France?"}]))
  lm.save_pretrained("out")                 # transformers' bnb layout + quantization_config

Float checkpoints stream through :func:`jaxbnb.load_quantized`: one float tensor at a time is
read (from GGUF: dequantized), cast, quantized on the device and dropped, so the peak is about
the packed model plus one tensor.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import warnings
from typing import Any, Optional, Union

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbnb.config import BitsAndBytesConfig
from jaxbnb.interop.bnb_safetensors import (as_bnb_weight, as_flax_kernel, load_bnb_state_dict,
                                            save_bnb_state_dict)
from jaxbnb.interop.load import load_quantized
from jaxbnb.models.causal_lm import CausalLM, stack_layers
from jaxbnb.models.llama import Llama, LlamaConfig
from jaxbnb.models.tokenizer import Tokenizer
from jaxbnb.qtensor import Quantized4bit, Quantized8bit, is_quantized

PathLike = Union[str, os.PathLike]

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM"}
_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


# --- config.json ---------------------------------------------------------------------------------


def _dtype_name(dtype) -> str:
  return np.dtype(jnp.dtype(dtype)).name


def _as_dtype(value) -> Optional[np.dtype]:
  if value is None:
    return None
  if isinstance(value, str):
    value = value.removeprefix("torch.")
    value = {"float": "float32", "half": "float16", "bf16": "bfloat16"}.get(value, value)
  return np.dtype(jnp.dtype(value))


def config_from_hf(d: dict) -> LlamaConfig:
  """A :class:`LlamaConfig` from a transformers config.json dict (llama, mistral, qwen2;
  transformers 4's ``rope_theta``/``rope_scaling`` or 5's ``rope_parameters``)."""
  model_type = d.get("model_type", "llama")
  if model_type not in _ARCHITECTURES:
    raise NotImplementedError(f"model_type {model_type!r} is not supported "
                              f"({', '.join(_ARCHITECTURES)} are)")
  act = d.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise NotImplementedError(f"hidden_act {act!r} is not supported (silu is)")
  rope = dict(d.get("rope_parameters") or {})
  theta = d.get("rope_theta", rope.pop("rope_theta", 10000.0))
  rope.pop("rope_theta", None)
  scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default"
                                      else None)
  if model_type == "qwen2" and d.get("use_sliding_window"):
    raise NotImplementedError("Qwen2 use_sliding_window=True (per-layer windows) is not "
                              "supported")
  bias = bool(d.get("attention_bias", False))
  return LlamaConfig(
      vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
      intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
      num_attention_heads=d["num_attention_heads"],
      num_key_value_heads=d.get("num_key_value_heads"), head_dim=d.get("head_dim"),
      rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
      rope_scaling=dict(scaling) if scaling else None,
      max_position_embeddings=d.get("max_position_embeddings", 2048),
      tie_word_embeddings=d.get("tie_word_embeddings", False),
      qkv_bias=True if model_type == "qwen2" else bias,
      o_bias=bias if model_type == "llama" else False,
      mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
      sliding_window=d.get("sliding_window") if model_type == "mistral" else None,
      model_type=model_type, bos_token_id=d.get("bos_token_id"),
      eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"))


def config_to_hf(c: LlamaConfig, dtype) -> dict:
  """transformers' config.json dict for ``c`` (legacy ``rope_theta``/``rope_scaling`` keys,
  which transformers 4 and 5 both read)."""
  model_type = c.model_type
  if model_type == "llama" and c.qkv_bias != c.o_bias:
    if c.qkv_bias and not c.o_bias and not c.mlp_bias:
      model_type = "qwen2"  # q/k/v bias without o_proj bias is Qwen2's layout
    else:
      raise ValueError("transformers' Llama has one attention_bias for q/k/v and o_proj; this "
                       f"model has qkv_bias={c.qkv_bias}, o_bias={c.o_bias}")
  if model_type == "qwen2" and (not c.qkv_bias or c.o_bias or c.mlp_bias):
    raise ValueError("transformers' Qwen2 has q/k/v biases only")
  d = {"architectures": [_ARCHITECTURES[model_type]], "model_type": model_type,
       "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
       "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
       "num_attention_heads": c.num_attention_heads,
       "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
       "hidden_act": "silu", "max_position_embeddings": c.max_position_embeddings,
       "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
       "rope_scaling": c.rope_scaling_dict, "tie_word_embeddings": c.tie_word_embeddings,
       "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True,
       "bos_token_id": c.bos_token_id, "pad_token_id": c.pad_token_id,
       "eos_token_id": list(c.eos_token_id) if isinstance(c.eos_token_id, tuple)
       else c.eos_token_id,
       "torch_dtype": _dtype_name(dtype), "dtype": _dtype_name(dtype)}
  if model_type == "llama":
    d.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
  if model_type in ("mistral", "qwen2"):
    d["sliding_window"] = c.sliding_window
  if model_type == "qwen2":
    d["use_sliding_window"] = False
  return d


def quantization_config_to_hf(q: BitsAndBytesConfig) -> dict:
  """``q`` as transformers' ``BitsAndBytesConfig.to_dict()`` writes it into config.json."""
  skip = list(q.llm_int8_skip_modules)
  return {"quant_method": "bitsandbytes", "_load_in_8bit": q.load_in_8bit,
          "_load_in_4bit": q.load_in_4bit, "llm_int8_threshold": float(q.llm_int8_threshold),
          # jaxbnb's default (None) means ["lm_head"]; transformers' None means the same.
          "llm_int8_skip_modules": None if skip == ["lm_head"] else skip,
          "llm_int8_enable_fp32_cpu_offload": q.llm_int8_enable_fp32_cpu_offload,
          "llm_int8_has_fp16_weight": q.llm_int8_has_fp16_weight,
          "bnb_4bit_quant_type": q.bnb_4bit_quant_type,
          "bnb_4bit_use_double_quant": q.bnb_4bit_use_double_quant,
          "bnb_4bit_compute_dtype": _dtype_name(q.bnb_4bit_compute_dtype),
          "bnb_4bit_quant_storage": _dtype_name(q.bnb_4bit_quant_storage),
          "load_in_4bit": q.load_in_4bit, "load_in_8bit": q.load_in_8bit}


def quantization_config_from_hf(d: dict) -> BitsAndBytesConfig:
  """A :class:`BitsAndBytesConfig` from config.json's ``quantization_config`` (bitsandbytes)."""
  if d.get("quant_method", "bitsandbytes") != "bitsandbytes":
    raise NotImplementedError(f"quant_method {d.get('quant_method')!r} is not supported "
                              "(bitsandbytes is)")
  get = lambda k, default=None: d.get(k, d.get("_" + k, default))
  return BitsAndBytesConfig(
      load_in_4bit=bool(get("load_in_4bit", False)), load_in_8bit=bool(get("load_in_8bit", False)),
      llm_int8_threshold=float(d.get("llm_int8_threshold", 6.0)),
      llm_int8_skip_modules=d.get("llm_int8_skip_modules"),
      bnb_4bit_quant_type=d.get("bnb_4bit_quant_type", "fp4"),
      bnb_4bit_use_double_quant=bool(d.get("bnb_4bit_use_double_quant", False)),
      bnb_4bit_compute_dtype=_as_dtype(d.get("bnb_4bit_compute_dtype")) or np.float32,
      bnb_4bit_quant_storage=_as_dtype(d.get("bnb_4bit_quant_storage")) or np.uint8)


# --- names -------------------------------------------------------------------------------------


def hf_to_path(name: str, config: LlamaConfig) -> Optional[tuple[tuple, bool]]:
  """transformers tensor name -> (path in :class:`Llama`'s params, transpose?), None to drop.

  ``model.layers.3.self_attn.q_proj.weight`` -> ``(("layers", 3, "self_attn", "q_proj",
  "kernel"), True)``; norms' ``weight`` -> ``scale``; ``lm_head.weight`` is dropped when the
  head is tied (transformers may or may not store it).
  """
  if name == "model.embed_tokens.weight":
    return ("embed_tokens", "embedding"), False
  if name == "model.norm.weight":
    return ("norm", "scale"), False
  if name == "lm_head.weight":
    return None if config.tie_word_embeddings else (("lm_head", "kernel"), True)
  if name.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints saved; recomputed
    return None
  m = _LAYER_RE.match(name)
  if m:
    i, module, kind = int(m.group(1)), m.group(2), m.group(3)
    if module in _NORMS and kind == "weight":
      return ("layers", i, module, "scale"), False
    if module in _PROJ:
      return ("layers", i, *module.split("."), "kernel" if kind == "weight" else "bias"), (
          kind == "weight")
  raise ValueError(f"tensor {name!r} has no counterpart in a {config.model_type} model")


def path_to_hf(path: tuple) -> tuple[str, bool]:
  """The inverse of :func:`hf_to_path`: (transformers name, transpose?)."""
  dotted = ".".join(str(p) for p in path)
  if path == ("embed_tokens", "embedding"):
    return "model.embed_tokens.weight", False
  if path == ("norm", "scale"):
    return "model.norm.weight", False
  if path == ("lm_head", "kernel"):
    return "lm_head.weight", True
  if path[0] == "layers":
    last = path[-1]
    module = ".".join(str(p) for p in path[2:-1])
    name = {"scale": "weight", "kernel": "weight", "bias": "bias"}[last]
    return f"model.layers.{path[1]}.{module}.{name}", last == "kernel"
  raise ValueError(f"no transformers name for {dotted}")


def _flat(tree) -> list[tuple[tuple, Any]]:
  out = []

  def walk(node, prefix):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, prefix + (k,))
    else:
      out.append((prefix, node))
  walk(tree, ())
  return out


def _insert(tree: dict, keys: tuple, leaf) -> None:
  node = tree
  for k in keys[:-1]:
    node = node.setdefault(k, {})
  node[keys[-1]] = leaf


# --- save_pretrained -----------------------------------------------------------------------------


def state_dict(lm: CausalLM) -> dict[str, Any]:
  """``{transformers name: leaf}`` of ``lm``: packed leaves as their bnb ``(out, in)`` matrices
  (same bits), float weights transposed to ``(out, in)``."""
  out = {}
  for path, leaf in _flat(lm.unstacked_params()):
    name, transpose = path_to_hf(path)
    if is_quantized(leaf) and path == ("embed_tokens", "embedding"):
      raise ValueError("the embedding table is quantized (quantize_embeddings=True); "
                       "transformers keeps embeddings in 16-bit and cannot load it")
    out[name] = as_bnb_weight(leaf) if (transpose or is_quantized(leaf)) else leaf
  return out


def save_pretrained(lm: CausalLM, path: PathLike, *, max_shard_size: Optional[int] = None):
  """Write ``lm`` as a Hugging Face folder: config.json (with transformers' bitsandbytes
  ``quantization_config`` when packed), model.safetensors in bnb's layout under transformers'
  tensor names (or shards + index with ``max_shard_size`` bytes), generation_config.json, and
  the tokenizer files when there is a tokenizer. :func:`from_pretrained` reads it back bit for
  bit; ``transformers.AutoModelForCausalLM.from_pretrained`` loads it."""
  d = pathlib.Path(path)
  d.mkdir(parents=True, exist_ok=True)
  tensors = state_dict(lm)
  cfg = config_to_hf(lm.config, lm.dtype)
  if any(is_quantized(v) for v in tensors.values()):
    q = lm.quantization_config or _infer_quantization_config(tensors)
    cfg["quantization_config"] = quantization_config_to_hf(q)
  save_bnb_state_dict(tensors, d, max_shard_size=max_shard_size)
  (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
  gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
         if cfg.get(k) is not None}
  (d / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
  if lm.tokenizer is not None:
    lm.tokenizer.save(d)


def _infer_quantization_config(tensors: dict) -> BitsAndBytesConfig:
  """A config describing the packed leaves (for params quantized by hand)."""
  leaves = [v for v in tensors.values() if is_quantized(v)]
  if all(isinstance(v, Quantized8bit) for v in leaves):
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=leaves[0].threshold)
  four = [v for v in leaves if isinstance(v, Quantized4bit)]
  if len(four) != len(leaves) or len({(v.quant_type, v.state.nested) for v in four}) != 1:
    raise ValueError("the packed weights mix formats; transformers' quantization_config "
                     "describes one")
  v = four[0]
  return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=v.quant_type,
                            bnb_4bit_use_double_quant=v.state.nested,
                            bnb_4bit_compute_dtype=v.compute_dtype,
                            bnb_4bit_quant_storage=v.packed.dtype)


# --- from_pretrained -----------------------------------------------------------------------------


def _is_prequantized(d: pathlib.Path, cfg: dict) -> bool:
  return isinstance(cfg.get("quantization_config"), dict) and cfg["quantization_config"].get(
      "quant_method", "bitsandbytes") == "bitsandbytes"


def _check_same_format(want: Optional[BitsAndBytesConfig], have: BitsAndBytesConfig, path):
  if want is None:
    return
  same = (want.load_in_4bit == have.load_in_4bit and (
      not want.load_in_4bit or (want.bnb_4bit_quant_type == have.bnb_4bit_quant_type
                                and want.bnb_4bit_use_double_quant
                                == have.bnb_4bit_use_double_quant)))
  if not same:
    raise ValueError(f"{path} is already quantized ({quantization_config_to_hf(have)}); it "
                     "keeps its bits and is not quantized again: pass "
                     "quantization_config=None (or the same format)")


def _load_prequantized(d: pathlib.Path, config: LlamaConfig, q: BitsAndBytesConfig, dtype,
                       target: dict) -> dict:
  """Params from a folder written by bitsandbytes/transformers (or save_pretrained): packed
  leaves keep the file's bits; float tensors are cast to ``dtype``."""
  sd = load_bnb_state_dict(d, compute_dtype=q.bnb_4bit_compute_dtype if q.load_in_4bit
                           else None, int8_dtype=dtype, int8_threshold=q.llm_int8_threshold)
  want = dict(_flat(target))
  tree: dict = {}
  for name, leaf in sd.items():
    r = hf_to_path(name, config)
    if r is None:
      continue
    path, transpose = r
    if path not in want:
      raise ValueError(f"{d}: tensor {name!r} -> {'.'.join(map(str, path))} is not a "
                       "parameter of the model")
    if is_quantized(leaf):
      leaf = as_flax_kernel(leaf) if transpose else leaf
    else:
      leaf = (leaf.T if transpose else leaf).astype(want[path].dtype)
    if tuple(leaf.shape) != tuple(want[path].shape):
      raise ValueError(f"{d}: {name!r} has shape {tuple(leaf.shape)}, the model wants "
                       f"{tuple(want[path].shape)}")
    _insert(tree, path, leaf)
  missing = sorted(".".join(map(str, p)) for p in set(want) - {p for p, _ in _flat(tree)})
  if missing:
    raise ValueError(f"{d}: {len(missing)} params have no tensor, e.g. {missing[:3]}")
  return tree


def from_pretrained(path: PathLike, quantization_config: Optional[BitsAndBytesConfig] = None,
                    *, dtype=None, progress: bool = False, backend: str = "auto",
                    scan_layers: bool = True) -> CausalLM:
  """Load a Llama-family causal LM.

  Args:
    path: a Hugging Face folder (config.json + model.safetensors or
      model.safetensors.index.json; tokenizer.json optional) or a ``.gguf`` file.
    quantization_config: a :class:`BitsAndBytesConfig` to pack the linear weights with
      (quantized on load, tensor by tensor), or None to keep floats. A folder that
      bitsandbytes/transformers (or :meth:`CausalLM.save_pretrained`) already quantized keeps
      its bits; asking for another format then is an error.
    dtype: params and compute dtype (default: config.json's ``torch_dtype``; float32 for GGUF).
    progress: a tqdm bar while loading.
    backend: the quantized matmuls' backend (``"auto"``, ``"xla"``, ``"pallas"``).
    scan_layers: keep the decoder layers' params stacked and run them in a ``lax.scan`` (one
      layer compiled, one layer's temporaries live); layers that differ are run unrolled.

  Returns:
    A :class:`CausalLM`.
  """
  p = pathlib.Path(path)
  tokenizer = None
  file_q = None
  if p.is_file() and p.suffix == ".gguf":
    from jaxbnb.models.gguf import open_gguf
    config, source, tokenizer = open_gguf(p)
    dtype = _as_dtype(dtype) or np.dtype(np.float32)
  elif p.is_dir():
    if not (p / "config.json").is_file():
      raise FileNotFoundError(f"{p}: no config.json (a Hugging Face model folder has one)")
    hf = json.loads((p / "config.json").read_text())
    config = config_from_hf(hf)
    dtype = (_as_dtype(dtype) or _as_dtype(hf.get("dtype") or hf.get("torch_dtype"))
             or np.dtype(np.float32))
    if _is_prequantized(p, hf):
      file_q = quantization_config_from_hf(hf["quantization_config"])
      _check_same_format(quantization_config, file_q, p)
    source = p
    try:
      tokenizer = Tokenizer.from_dir(p)
    except ImportError:
      warnings.warn("the tokenizers package is missing; the model runs on token ids",
                    stacklevel=2)
  else:
    raise FileNotFoundError(f"{p}: not a model folder or a .gguf file")

  target = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda: Llama(config, dtype=dtype, param_dtype=dtype))))
  if file_q is not None:
    tree = _load_prequantized(p, config, file_q, dtype, target)
    quantization_config = file_q
  else:
    tree = load_quantized(source, quantization_config, target=target, progress=progress,
                          mapping=lambda name: hf_to_path(name, config))
  if scan_layers and config.num_hidden_layers:
    stacked = stack_layers(tree["layers"], consume=True)
    if stacked is not None:
      tree["layers"] = stacked
  return CausalLM(config, tree, dtype=dtype, tokenizer=tokenizer,
                  quantization_config=quantization_config, backend=backend)
