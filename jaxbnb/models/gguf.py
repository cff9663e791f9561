"""GGUF files (llama.cpp) as Llama checkpoints: config from the metadata, tensors dequantized one
at a time under Hugging Face names, the tokenizer from the vocabulary and merges.

Reading uses the ``gguf`` package (``GGUFReader`` for the header, ``gguf.quants.dequantize`` for
F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_x, the k-quants and more). llama.cpp's converter permutes the
rows of each head of the q/k projections of ``llama`` models (its rotary pairs adjacent
elements, transformers rotates halves); :func:`unpermute_qk` undoes it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import Any, Optional

import numpy as np

from jaxbnb.interop.load import TensorSource
from jaxbnb.models.llama import LlamaConfig
from jaxbnb.models.tokenizer import Tokenizer

# Architectures whose q/k rows llama.cpp permuted (its LlamaModel converter); qwen2 uses
# llama.cpp's NeoX rotary (halves), so its tensors are stored as transformers has them.
_PERMUTED = ("llama",)
_ARCHS = {"llama": "llama", "qwen2": "qwen2"}

_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
          "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_name(name: str) -> Optional[str]:
  """transformers' name of a GGUF tensor (``blk.3.attn_q.weight`` ->
  ``model.layers.3.self_attn.q_proj.weight``), or None when it has none."""
  if name in _GLOBAL:
    return _GLOBAL[name]
  m = _BLK.match(name)
  if m and m.group(2) in _LAYER:
    return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
  return None


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's row permutation of a q/k weight ``(n_head * head_dim, ...)`` or bias: within
  each head, rows ``[x_0..x_{d/2-1}, y_0..y_{d/2-1}]`` become ``[x_0, y_0, x_1, y_1, ...]``."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """The inverse of :func:`permute_qk`: a GGUF q/k tensor back in transformers' row order."""
  return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _reader(path):
  try:
    import gguf
  except ImportError as e:
    raise ImportError("reading .gguf files needs the gguf package: pip install gguf") from e
  return gguf.GGUFReader(os.fspath(path))


def _fields(reader) -> dict[str, Any]:
  """Metadata values (the big tokenizer arrays are left to :func:`tokenizer`)."""
  out = {}
  for key, field in reader.fields.items():
    if key.startswith("tokenizer.ggml.") and key.split(".")[-1] in (
        "tokens", "merges", "token_type", "scores"):
      continue
    out[key] = field.contents()
  return out


def _f32(v) -> float:
  """A float32 metadata value as the decimal it was written from (1e-05, not
  9.999999747378752e-06): numpy's shortest float32 repr."""
  return float(str(np.float32(v)))


def config_from_gguf(reader) -> LlamaConfig:
  """A :class:`LlamaConfig` from a GGUF header (``general.architecture`` llama or qwen2)."""
  meta = _fields(reader)
  arch = meta.get("general.architecture")
  if arch not in _ARCHS:
    raise NotImplementedError(f"GGUF architecture {arch!r} is not supported (llama, qwen2 are)")
  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise NotImplementedError("this GGUF stores Llama-3.1 rope factors (rope_freqs.weight); "
                              "load the Hugging Face folder instead")
  g = lambda k, default=None: meta.get(f"{arch}.{k}", default)
  heads = int(g("attention.head_count"))
  kv = g("attention.head_count_kv", heads)
  if isinstance(kv, list):
    raise NotImplementedError("per-layer head_count_kv is not supported")
  embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
  scaling = None
  kind = g("rope.scaling.type")
  if kind == "linear":
    scaling = {"rope_type": "linear", "factor": _f32(g("rope.scaling.factor"))}
  elif kind not in (None, "none"):
    raise NotImplementedError(f"GGUF rope scaling {kind!r} is not supported")
  hidden = int(g("embedding_length"))
  head_dim = g("attention.key_length")
  return LlamaConfig(
      vocab_size=int(g("vocab_size", int(embd.shape[1]))), hidden_size=hidden,
      intermediate_size=int(g("feed_forward_length")), num_hidden_layers=int(g("block_count")),
      num_attention_heads=heads, num_key_value_heads=int(kv),
      head_dim=None if head_dim is None else int(head_dim),
      rms_norm_eps=_f32(g("attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=_f32(g("rope.freq_base", 10000.0)), rope_scaling=scaling,
      max_position_embeddings=int(g("context_length", 2048)),
      tie_word_embeddings="output.weight" not in names,
      qkv_bias="blk.0.attn_q.bias" in names, o_bias="blk.0.attn_output.bias" in names,
      mlp_bias="blk.0.ffn_up.bias" in names,
      sliding_window=None if g("attention.sliding_window") is None
      else int(g("attention.sliding_window")),
      model_type=_ARCHS[arch],
      bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
      eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
      pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """Where one tensor's bytes are, and how to view and dequantize them."""
  name: str
  qtype: Any
  shape: tuple  # numpy (out, in) order of the dequantized tensor
  raw_dtype: np.dtype
  raw_shape: tuple
  offset: int
  n_bytes: int


class GGUFSource(TensorSource):
  """A GGUF file's tensors under transformers' names, dequantized to float32 ``(out, in)`` one
  at a time with plain file reads (the mapped file does not stay resident), q/k rows in
  transformers' order. Keeps only the tensors' offsets, not the reader (whose parsed
  vocabulary is ~150 MB of Python objects for a 49k-token model)."""

  def __init__(self, path, reader=None, config: Optional[LlamaConfig] = None):
    self.path = os.fspath(path)
    reader = reader if reader is not None else _reader(path)
    self.config = config if config is not None else config_from_gguf(reader)
    self.tensors = {}
    for t in reader.tensors:
      name = hf_name(t.name)
      if name is None:
        warnings.warn(f"{self.path}: GGUF tensor {t.name!r} has no Llama counterpart; skipped",
                      stacklevel=2)
        continue
      self.tensors[name] = _Tensor(t.name, t.tensor_type,
                                   tuple(int(s) for s in reversed(t.shape)),
                                   t.data.dtype, tuple(t.data.shape), int(t.data_offset),
                                   int(t.n_bytes))

  def keys(self):
    return list(self.tensors)

  def info(self, name):
    return self.tensors[name].shape, np.dtype(np.float32)

  def read(self, name):
    import gguf
    t = self.tensors[name]
    raw = np.fromfile(self.path, np.uint8, count=t.n_bytes, offset=t.offset)
    if raw.size != t.n_bytes:
      raise ValueError(f"{self.path}: truncated: tensor {t.name!r} could not be read in full")
    raw = raw.view(t.raw_dtype).reshape(t.raw_shape)
    w = np.asarray(gguf.quants.dequantize(raw, t.qtype), np.float32).reshape(t.shape)
    c = self.config
    if c.model_type in _PERMUTED and ".self_attn.q_proj." in name:
      w = unpermute_qk(w, c.num_attention_heads)
    elif c.model_type in _PERMUTED and ".self_attn.k_proj." in name:
      w = unpermute_qk(w, c.num_key_value_heads)
    return np.ascontiguousarray(w)


# --- tokenizer ---------------------------------------------------------------------------------

_GPT2_SPLIT = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                 r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?"
                r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTROL, _USER_DEFINED = 3, 4


def _pre_tokenizer(pre: Optional[str]):
  """transformers' pre-tokenizer for llama.cpp's ``tokenizer.ggml.pre`` name."""
  from tokenizers import Regex, pre_tokenizers as pt
  byte_level = pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)
  split = lambda rx: pt.Split(Regex(rx), behavior="isolated", invert=False)
  if pre in ("smollm", "starcoder", "refact"):
    return pt.Sequence([pt.Digits(individual_digits=True),
                        pt.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                     use_regex=True)])
  if pre in ("llama-bpe", "llama3", "falcon3", "smaug-bpe"):
    return pt.Sequence([split(_LLAMA3_SPLIT), byte_level])
  if pre in ("qwen2", "deepseek-r1-qwen"):
    return pt.Sequence([split(_QWEN2_SPLIT), byte_level])
  if pre not in (None, "default", "gpt2", "gpt-2"):
    warnings.warn(f"GGUF tokenizer pre-tokenizer {pre!r} is not known here; using GPT-2's "
                  "byte-level split (ids may differ from llama.cpp's on digits and spaces)",
                  stacklevel=3)
  return pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


def tokenizer_from_gguf(reader) -> Optional[Tokenizer]:
  """A :class:`Tokenizer` from a GGUF's BPE vocabulary and merges (``tokenizer.ggml.model``
  ``gpt2``), with its special tokens and chat template; None (with a warning) when the file
  has no vocabulary or another tokenizer model (e.g. SentencePiece ``llama``), or when the
  ``tokenizers`` package is missing: the model still runs on ids."""
  fields = reader.fields
  model = fields["tokenizer.ggml.model"].contents() if "tokenizer.ggml.model" in fields else None
  if model is None or "tokenizer.ggml.tokens" not in fields:
    return None
  if model != "gpt2":
    warnings.warn(f"GGUF tokenizer model {model!r} is not supported (only BPE 'gpt2'); the "
                  "model runs on token ids", stacklevel=2)
    return None
  try:
    from tokenizers import AddedToken, Tokenizer as _Tok, decoders, models, processors
  except ImportError:
    warnings.warn("the tokenizers package is missing; the model runs on token ids",
                  stacklevel=2)
    return None
  get = lambda k: fields[k].contents() if k in fields else None
  tokens = get("tokenizer.ggml.tokens")
  types = get("tokenizer.ggml.token_type") or [1] * len(tokens)
  merges = [tuple(m.split(" ", 1)) for m in (get("tokenizer.ggml.merges") or [])]
  pre = get("tokenizer.ggml.pre")
  bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                   ignore_merges=pre in ("llama-bpe", "llama3"))
  tok = _Tok(bpe)
  tok.pre_tokenizer = _pre_tokenizer(pre)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, ty in zip(tokens, types) if ty == _CONTROL])
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
  name = lambda k: None if get(k) is None or int(get(k)) >= len(tokens) else tokens[int(get(k))]
  bos = name("tokenizer.ggml.bos_token_id")
  if get("tokenizer.ggml.add_bos_token") and bos is not None:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, int(get("tokenizer.ggml.bos_token_id")))])
  else:
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  return Tokenizer(tok, chat_template=get("tokenizer.chat_template"), bos_token=bos,
                   eos_token=name("tokenizer.ggml.eos_token_id"),
                   pad_token=name("tokenizer.ggml.padding_token_id"),
                   unk_token=name("tokenizer.ggml.unknown_token_id"))


def open_gguf(path) -> tuple[LlamaConfig, GGUFSource, Optional[Tokenizer]]:
  """(config, tensor source, tokenizer or None) of a ``.gguf`` file."""
  reader = _reader(path)
  config = config_from_gguf(reader)
  source, tokenizer = GGUFSource(path, reader, config), tokenizer_from_gguf(reader)
  del reader  # its parsed metadata is large; the source keeps offsets only
  return config, source, tokenizer
