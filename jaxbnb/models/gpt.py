"""A small decoder-only GPT in Flax NNX, built only from stock Flax layers.

jaxbnb runs this model unmodified on quantized parameters, so it must stay plain Flax: every
weight lives in a stock layer (``nnx.Embed``, ``nnx.Linear``, ``nnx.Einsum``, ``nnx.LayerNorm``)
and nothing here imports jaxbnb.

Layout (pre-LN, GPT-2 style)::

  embed: Embed(vocab, d)            pos_embed: Embed(max_len, d)
  blocks[i]: ln1 -> attn -> +residual, ln2 -> mlp -> +residual
    attn.qkv: Einsum('btd,dshk->btshk', kernel (d, 3, n_head, head_dim)): fused q/k/v
    attn.out: Linear(d, d)
    mlp.fc1:  Linear(d, d_ff) -> gelu -> mlp.fc2: Linear(d_ff, d)
  ln_f -> lm_head: Linear(d, vocab, use_bias=False)   (or embed.attend when tied)

The fused q/k/v projection is an ``nnx.Einsum`` whose kernel keeps the contracted ``d`` axis
first, like ``nnx.Linear``'s ``(in, out)`` kernels, so a quantizer can treat every kernel as
``(in, *out)``. All other projections are ``nnx.Linear``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

# GPT-2's initialisation: small weights keep the initial logits near uniform (loss ~ log(vocab)),
# also when the LM head is tied to the embedding. It also gives nnx.Einsum's rank-4 kernel a
# sensible scale (the default lecun_normal would read fan-in from the wrong axes).
_init = nnx.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Hyper-parameters shared by ``GPT`` (NNX) and ``GPTLinen``; defaults are byte-level."""
  vocab_size: int = 256
  n_layer: int = 2
  n_head: int = 4
  d_model: int = 128
  d_ff: int = 512
  max_len: int = 256
  dropout: float = 0.0
  tie_embeddings: bool = False

  def __post_init__(self):
    if self.d_model % self.n_head:
      raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_head


def causal_attention(q, k, v):
  """Causal softmax attention. q, k, v: (batch, seq, n_head, head_dim) in the compute dtype;
  returns the same shape and dtype. Scores and softmax run in float32 for stability."""
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  scores = jnp.einsum("bqhk,bshk->bhqs", q, k).astype(jnp.float32)
  t = q.shape[1]
  mask = jnp.tril(jnp.ones((t, t), dtype=bool))
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqs,bshk->bqhk", probs, v)


def next_token_loss(logits, tokens):
  """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``.

  logits: (batch, seq, vocab), any float dtype; tokens: int (batch, seq). Returns a float32
  scalar.
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  target = tokens[:, 1:, None]
  return -jnp.mean(jnp.take_along_axis(logp, target, axis=-1))


class Attention(nnx.Module):
  """Multi-head causal self-attention: (batch, seq, d_model) -> (batch, seq, d_model)."""

  def __init__(self, config: GPTConfig, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    c = config
    self.n_head, self.head_dim = c.n_head, c.head_dim
    self.qkv = nnx.Einsum("btd,dshk->btshk", (c.d_model, 3, c.n_head, c.head_dim),
                          (3, c.n_head, c.head_dim), dtype=dtype, param_dtype=param_dtype,
                          kernel_init=_init, rngs=rngs)
    self.out = nnx.Linear(c.d_model, c.d_model, dtype=dtype, param_dtype=param_dtype,
                          kernel_init=_init, rngs=rngs)

  def __call__(self, x):
    qkv = self.qkv(x)  # (b, t, 3, h, k)
    y = causal_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    b, t = x.shape[:2]
    return self.out(y.reshape(b, t, self.n_head * self.head_dim))


class MLP(nnx.Module):
  """fc1 -> gelu -> fc2: (batch, seq, d_model) -> (batch, seq, d_model)."""

  def __init__(self, config: GPTConfig, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=_init, rngs=rngs)
    self.fc1 = nnx.Linear(config.d_model, config.d_ff, **kw)
    self.fc2 = nnx.Linear(config.d_ff, config.d_model, **kw)

  def __call__(self, x):
    return self.fc2(nnx.gelu(self.fc1(x)))


class Block(nnx.Module):
  """Pre-LN transformer block: x + attn(ln1(x)), then + mlp(ln2(.))."""

  def __init__(self, config: GPTConfig, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln1 = nnx.LayerNorm(config.d_model, **kw)
    self.attn = Attention(config, **kw)
    self.ln2 = nnx.LayerNorm(config.d_model, **kw)
    self.mlp = MLP(config, **kw)
    # Without a rate there is no rng stream to carry, so the state holds only Params.
    drop_rngs = rngs if config.dropout > 0 else None
    self.drop = nnx.Dropout(config.dropout, rngs=drop_rngs)

  def __call__(self, x):
    x = x + self.drop(self.attn(self.ln1(x)))
    return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nnx.Module):
  """Decoder-only language model.

  Args:
    config: a ``GPTConfig``.
    dtype: compute dtype passed to every layer (e.g. ``jnp.bfloat16``); None infers it from the
      params, as Flax layers do.
    param_dtype: dtype of the parameters (default float32).
    rngs: parameter (and, if ``config.dropout > 0``, dropout) randomness; default
      ``nnx.Rngs(0)``, created per call so two default models are identical.

  Call with int tokens (batch, seq), seq <= max_len; returns float32 logits
  (batch, seq, vocab_size). With ``dropout > 0`` use ``model.train()`` / ``model.eval()``.
  """

  def __init__(self, config: GPTConfig = GPTConfig(), *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None):
    rngs = nnx.Rngs(0) if rngs is None else rngs
    c = self.config = config
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embed = nnx.Embed(c.vocab_size, c.d_model, embedding_init=_init, **kw)
    self.pos_embed = nnx.Embed(c.max_len, c.d_model, embedding_init=_init, **kw)
    self.blocks = nnx.List([Block(c, **kw) for _ in range(c.n_layer)])
    self.ln_f = nnx.LayerNorm(c.d_model, **kw)
    if not c.tie_embeddings:
      self.lm_head = nnx.Linear(c.d_model, c.vocab_size, use_bias=False, kernel_init=_init,
                                **kw)

  def __call__(self, tokens):
    t = tokens.shape[1]
    if t > self.config.max_len:
      raise ValueError(f"sequence length {t} exceeds max_len {self.config.max_len}")
    x = self.embed(tokens) + self.pos_embed(jnp.arange(t)[None])
    for block in self.blocks:
      x = block(x)
    x = self.ln_f(x)
    logits = self.embed.attend(x) if self.config.tie_embeddings else self.lm_head(x)
    return logits.astype(jnp.float32)
