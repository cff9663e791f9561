"""The GPT of ``jaxbnb.models.gpt`` in Flax Linen, built only from stock Linen layers.

Same architecture and ``GPTConfig``; the only layout difference is attention, which uses
``nn.DenseGeneral`` per projection instead of one fused einsum::

  attn.query / key / value: DenseGeneral(features=(n_head, head_dim)), kernel (d, h, k)
  attn.out:                 DenseGeneral(d, axis=(-2, -1)),            kernel (h, k, d)

An NNX ``qkv`` kernel (d, 3, h, k) is the three Linen kernels stacked on axis 1, and the NNX
``out`` kernel (d, d) is the Linen one reshaped, so the two models compute the same function.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from jaxbnb.models.gpt import GPTConfig, causal_attention

_init = nn.initializers.normal(stddev=0.02)  # GPT-2's; see gpt.py


class AttentionLinen(nn.Module):
  """Multi-head causal self-attention: (batch, seq, d_model) -> (batch, seq, d_model)."""
  config: GPTConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = dict(kernel_init=_init, dtype=self.dtype, param_dtype=self.param_dtype)
    proj = lambda name: nn.DenseGeneral((c.n_head, c.head_dim), name=name, **kw)
    y = causal_attention(proj("query")(x), proj("key")(x), proj("value")(x))
    return nn.DenseGeneral(c.d_model, axis=(-2, -1), name="out", **kw)(y)


class MLPLinen(nn.Module):
  """fc1 -> gelu -> fc2: (batch, seq, d_model) -> (batch, seq, d_model)."""
  config: GPTConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(kernel_init=_init, dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.gelu(nn.Dense(self.config.d_ff, name="fc1", **kw)(x))
    return nn.Dense(self.config.d_model, name="fc2", **kw)(h)


class BlockLinen(nn.Module):
  """Pre-LN transformer block: x + attn(ln1(x)), then + mlp(ln2(.))."""
  config: GPTConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = nn.Dropout(c.dropout, deterministic=deterministic)
    x = x + drop(AttentionLinen(c, name="attn", **kw)(nn.LayerNorm(name="ln1", **kw)(x)))
    return x + drop(MLPLinen(c, name="mlp", **kw)(nn.LayerNorm(name="ln2", **kw)(x)))


class GPTLinen(nn.Module):
  """Decoder-only language model (Linen twin of ``gpt.GPT``).

  Attributes:
    config: a ``GPTConfig``.
    dtype: compute dtype passed to every layer (e.g. ``jnp.bfloat16``); None infers it.
    param_dtype: dtype of the parameters (default float32).

  ``apply({'params': p}, tokens)`` with int tokens (batch, seq), seq <= max_len, returns float32
  logits (batch, seq, vocab_size). Pass ``deterministic=False`` and a ``'dropout'`` rng to train
  with dropout.
  """
  config: GPTConfig = GPTConfig()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, deterministic: bool = True):
    c = self.config
    t = tokens.shape[1]
    if t > c.max_len:
      raise ValueError(f"sequence length {t} exceeds max_len {c.max_len}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    embed = nn.Embed(c.vocab_size, c.d_model, embedding_init=_init, name="embed", **kw)
    pos_embed = nn.Embed(c.max_len, c.d_model, embedding_init=_init, name="pos_embed", **kw)
    x = embed(tokens) + pos_embed(jnp.arange(t)[None])
    for i in range(c.n_layer):
      x = BlockLinen(c, name=f"blocks_{i}", **kw)(x, deterministic)
    x = nn.LayerNorm(name="ln_f", **kw)(x)
    if c.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(c.vocab_size, use_bias=False, kernel_init=_init, name="lm_head", **kw)(x)
    return logits.astype(jnp.float32)
