"""A Llama-family causal LM in Flax NNX, built only from stock Flax layers (no jaxbnb imports).

Covers Llama 1/2/3 (RoPE scaling "linear" and "llama3"), Mistral (sliding window) and Qwen2
(q/k/v bias): RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP, tied or untied
head. Module and parameter names follow transformers' ``LlamaForCausalLM`` so that a checkpoint
maps one to one (``model.layers.3.self_attn.q_proj.weight`` -> ``layers.3.self_attn.q_proj
.kernel``, transposed; norms' ``weight`` -> ``scale``; ``model.embed_tokens.weight`` ->
``embed_tokens.embedding``)::

  embed_tokens: Embed(vocab, d)
  layers[i]: input_layernorm -> self_attn (q/k/v/o_proj) -> +residual,
             post_attention_layernorm -> mlp (down(silu(gate(x)) * up(x))) -> +residual
  norm -> lm_head: Linear(d, vocab, use_bias=False)   (or embed_tokens.attend when tied)

Every projection is an ``nnx.Linear`` with an ``(in, out)`` kernel, so ``jaxbnb.quantize`` and
``jaxbnb.intercept`` run the model on packed weights unchanged. Decoding keeps a key/value
cache as a plain pytree (one ``(k, v)`` pair of ``(batch, slots, kv_heads, head_dim)`` per
layer) that :meth:`Llama.decode` takes and returns, so a whole generate loop fits in one jit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Cache = tuple  # ((k, v), ...) per layer, each (batch, slots, kv_heads, head_dim)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters, with transformers' ``LlamaConfig`` names.

  ``rope_scaling`` is kept as a sorted tuple of ``(key, value)`` pairs so the config stays
  hashable (it is static data of the NNX graph); pass a dict, read it back with
  :attr:`rope_scaling_dict`. ``qkv_bias``/``o_bias`` are transformers' ``attention_bias`` for
  Llama (both) and ``(True, False)`` for Qwen2.
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: Optional[int] = None
  head_dim: Optional[int] = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Any = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  sliding_window: Optional[int] = None
  model_type: str = "llama"
  bos_token_id: Optional[int] = None
  eos_token_id: Any = None  # int or tuple of ints
  pad_token_id: Optional[int] = None

  def __post_init__(self):
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                         f"num_attention_heads {self.num_attention_heads}; set head_dim")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                       f"num_key_value_heads {self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ValueError(f"rotary embeddings need an even head_dim; got {self.head_dim}")
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", tuple(sorted(
          (k, tuple(v) if isinstance(v, list) else v) for k, v in self.rope_scaling.items())))
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    _ = rope_inv_freq(self)  # unsupported scaling types fail here, not at the first call

  @property
  def rope_scaling_dict(self) -> Optional[dict]:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    e = self.eos_token_id
    return () if e is None else (e,) if isinstance(e, int) else tuple(e)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Rotary inverse frequencies, float32 ``(head_dim // 2,)``, as transformers computes them
  (``default``, ``linear`` and ``llama3`` rope types)."""
  d = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
  inv = inv.astype(np.float32)
  scaling = config.rope_scaling_dict
  kind = None if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
  if kind in (None, "default"):
    return inv
  if kind == "linear":
    return (inv / np.float32(scaling["factor"])).astype(np.float32)
  if kind == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  raise NotImplementedError(f"rope_scaling type {kind!r} is not supported (default, linear, "
                            "llama3 are)")


def rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotary embedding, transformers' rotate-half layout. x ``(B, T, heads, head_dim)``,
  positions int ``(B, T)``; angles in float32, the rotation in x's dtype."""
  freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Grouped-query softmax attention.

  q ``(B, T, H, D)``; k, v ``(B, S, KV, D)`` with ``H % KV == 0``; mask bool ``(B, T, S)``
  (True: attend). Scores and softmax in float32; returns ``(B, T, H, D)`` in q's dtype. A row
  with no key allowed (a left-padding query) gets a uniform mix instead of NaN.
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, h // kv, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores * np.float32(d ** -0.5)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, d)


class RMSNorm(nnx.Module):
  """transformers' ``LlamaRMSNorm``: normalize in float32, cast back, then scale."""

  def __init__(self, dim: int, eps: float, *, dtype=None, param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps, self.dtype = eps, dtype

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(dtype) * h.astype(dtype)


def _linear(n_in, n_out, bias, kw):
  return nnx.Linear(n_in, n_out, use_bias=bias, **kw)


class Attention(nnx.Module):
  """Self-attention with rotary embeddings and a key/value cache."""

  def __init__(self, c: LlamaConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs,
              kernel_init=nnx.initializers.normal(0.02))
    self.n_head, self.n_kv, self.head_dim = (c.num_attention_heads, c.num_key_value_heads,
                                             c.head_dim)
    self.q_proj = _linear(c.hidden_size, c.num_attention_heads * c.head_dim, c.qkv_bias, kw)
    self.k_proj = _linear(c.hidden_size, c.num_key_value_heads * c.head_dim, c.qkv_bias, kw)
    self.v_proj = _linear(c.hidden_size, c.num_key_value_heads * c.head_dim, c.qkv_bias, kw)
    self.o_proj = _linear(c.num_attention_heads * c.head_dim, c.hidden_size, c.o_bias, kw)

  def __call__(self, x, positions, mask, inv_freq, cache=None, index=None):
    """x ``(B, T, d)``; mask bool ``(B, T, S)``; cache ``(k, v)`` of S slots written at
    ``index`` (without a cache, S == T). Returns ``(y, new cache or None)``."""
    b, t, _ = x.shape
    q = rope(self.q_proj(x).reshape(b, t, self.n_head, self.head_dim), positions, inv_freq)
    k = rope(self.k_proj(x).reshape(b, t, self.n_kv, self.head_dim), positions, inv_freq)
    v = self.v_proj(x).reshape(b, t, self.n_kv, self.head_dim)
    if cache is not None:
      ck, cv = cache
      k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
      cache = (k, v)
    y = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
    return self.o_proj(y.reshape(b, t, self.n_head * self.head_dim)), cache


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, c: LlamaConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs,
              kernel_init=nnx.initializers.normal(0.02))
    self.gate_proj = _linear(c.hidden_size, c.intermediate_size, c.mlp_bias, kw)
    self.up_proj = _linear(c.hidden_size, c.intermediate_size, c.mlp_bias, kw)
    self.down_proj = _linear(c.intermediate_size, c.hidden_size, c.mlp_bias, kw)

  def __call__(self, x):
    return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  def __init__(self, c: LlamaConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
    self.self_attn = Attention(c, rngs=rngs, **kw)
    self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
    self.mlp = MLP(c, rngs=rngs, **kw)

  def __call__(self, x, positions, mask, inv_freq, cache=None, index=None):
    h, cache = self.self_attn(self.input_layernorm(x), positions, mask, inv_freq, cache, index)
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x)), cache


def causal_mask(key_valid: jax.Array, t: int, index, window: Optional[int] = None) -> jax.Array:
  """bool ``(B, T, S)``: query ``i`` (slot ``index + i``) sees the valid keys in slots up to its
  own (and, with a sliding ``window``, fewer than ``window`` slots back). key_valid bool
  ``(B, S)``."""
  s = key_valid.shape[1]
  q_slot = index + jnp.arange(t)[:, None]
  k_slot = jnp.arange(s)[None, :]
  allowed = k_slot <= q_slot
  if window is not None:
    allowed &= q_slot - k_slot < window
  return key_valid[:, None, :] & allowed[None]


def default_positions(key_valid: jax.Array) -> jax.Array:
  """Position ids for left-padded rows: 0 at each row's first real token (pads get 0)."""
  return jnp.maximum(jnp.cumsum(key_valid.astype(jnp.int32), axis=1) - 1, 0)


class Llama(nnx.Module):
  """A Llama-family decoder-only LM.

  Args:
    config: a :class:`LlamaConfig`.
    dtype: compute dtype of every layer (None: the params'); param_dtype: the params'.
    rngs: initializer randomness (default ``nnx.Rngs(0)``).

  ``model(tokens, attention_mask=None)``: int ``(B, T)`` -> float32 logits ``(B, T, vocab)``;
  ``attention_mask`` (B, T) marks real tokens (left padding: position ids start at each row's
  first real token). :meth:`decode` is the cached step used by generation.
  """

  def __init__(self, config: LlamaConfig, *, dtype=None, param_dtype=jnp.float32,
               rngs: Optional[nnx.Rngs] = None):
    rngs = nnx.Rngs(0) if rngs is None else rngs
    c = self.config = config
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.embed_tokens = nnx.Embed(c.vocab_size, c.hidden_size, rngs=rngs,
                                  embedding_init=nnx.initializers.normal(0.02), **kw)
    self.layers = nnx.List([DecoderLayer(c, rngs=rngs, **kw)
                            for _ in range(c.num_hidden_layers)])
    self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
    if not c.tie_word_embeddings:
      self.lm_head = nnx.Linear(c.hidden_size, c.vocab_size, use_bias=False, rngs=rngs,
                                kernel_init=nnx.initializers.normal(0.02), **kw)
    self.dtype = dtype

  def _hidden(self, tokens, positions, mask, cache=None, index=None):
    inv_freq = rope_inv_freq(self.config)
    x = self.embed_tokens(tokens)
    new_cache = []
    for i, layer in enumerate(self.layers):
      x, c = layer(x, positions, mask, inv_freq, None if cache is None else cache[i], index)
      new_cache.append(c)
    return self.norm(x), (tuple(new_cache) if cache is not None else None)

  def logits(self, h):
    """Head: final hidden states ``(..., d)`` -> float32 logits ``(..., vocab)``."""
    out = (self.embed_tokens.attend(h) if self.config.tie_word_embeddings
           else self.lm_head(h))
    return out.astype(jnp.float32)

  def __call__(self, tokens, attention_mask=None, positions=None):
    b, t = tokens.shape
    valid = (jnp.ones((b, t), bool) if attention_mask is None
             else jnp.asarray(attention_mask).astype(bool))
    if positions is None:
      positions = default_positions(valid)
    mask = causal_mask(valid, t, 0, self.config.sliding_window)
    h, _ = self._hidden(tokens, positions, mask)
    return self.logits(h)

  def init_cache(self, batch: int, slots: int, dtype=None) -> Cache:
    """Zeroed key/value cache: per layer ``(k, v)``, each ``(batch, slots, kv_heads,
    head_dim)`` in ``dtype`` (default: the compute dtype, else float32)."""
    c = self.config
    dtype = dtype or self.dtype or jnp.float32
    shape = (batch, slots, c.num_key_value_heads, c.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                 for _ in range(c.num_hidden_layers))

  def decode(self, tokens, positions, key_valid, cache: Cache, index):
    """One cached step: ``T`` new tokens written to cache slots ``index .. index + T - 1``.

    tokens, positions int ``(B, T)``; key_valid bool ``(B, S)`` (which cache slots hold real
    tokens); index: int scalar (may be traced). Returns (float32 logits of the last new token
    ``(B, vocab)``, the updated cache).
    """
    mask = causal_mask(key_valid, tokens.shape[1], index, self.config.sliding_window)
    h, cache = self._hidden(tokens, positions, mask, cache, index)
    return self.logits(h[:, -1]), cache
