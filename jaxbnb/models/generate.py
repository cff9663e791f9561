"""Autoregressive generation as one jit-able function: prefill, then a ``lax.while_loop`` of
cached decode steps, greedy or sampled (temperature, top-k, top-p), for a batch of left-padded
prompts. Pure functions over a ``step`` callable; nothing here knows the model."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

# step(tokens (B, T), positions (B, T), key_valid (B, S), cache, index) -> (logits (B, V), cache)
Step = Callable


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Logits with the tokens outside the top-k and the top-p nucleus set to -inf.

  logits float ``(B, V)``. ``top_k`` 0 keeps all; ``top_p`` 1.0 keeps all, else the smallest
  set of most likely tokens whose probabilities sum to at least ``top_p`` (the most likely token
  is always kept), as transformers' ``TopKLogitsWarper``/``TopPLogitsWarper`` do.
  """
  logits = logits.astype(jnp.float32)
  neg = jnp.float32(-jnp.inf)
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    keep = (before < top_p).at[:, 0].set(True)
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, neg, logits)
  return logits


def sample(logits: jax.Array, key: jax.Array, *, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
  """Next tokens int32 ``(B,)`` from logits ``(B, V)``: argmax when ``temperature == 0``, else
  a draw from ``softmax(filter(logits / temperature))``."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits.astype(jnp.float32) / jnp.float32(temperature)
  return jax.random.categorical(key, filter_logits(scaled, top_k=top_k, top_p=top_p),
                                axis=-1).astype(jnp.int32)


def generate(step: Step, cache, tokens: jax.Array, attention_mask: jax.Array, key: jax.Array,
             *, max_new_tokens: int, eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """New tokens int32 ``(B, max_new_tokens)`` for left-padded prompts.

  Args:
    step: the model's cached step (see ``Step``); ``cache`` its empty cache with
      ``T + max_new_tokens`` slots.
    tokens: int ``(B, T)`` prompts, left-padded; attention_mask: ``(B, T)``, 1 on real tokens.
    key: PRNG key (unused when greedy).
    eos_token_ids: a row stops after emitting one of these; later slots hold ``pad_token_id``.
      The loop ends early once every row has stopped.
  """
  b, t = tokens.shape
  valid = jnp.concatenate([attention_mask.astype(bool), jnp.ones((b, max_new_tokens), bool)],
                          axis=1)
  positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
  logits, cache = step(tokens, positions, valid, cache, 0)
  next_pos = jnp.sum(attention_mask.astype(jnp.int32), axis=1)  # each row's next position
  eos = jnp.asarray(tuple(eos_token_ids) or (-1,), jnp.int32)
  out = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32)

  def cond(carry):
    i, _, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, logits, cache, key, out, done = carry
    key, sub = jax.random.split(key)
    tok = sample(logits, sub, temperature=temperature, top_k=top_k, top_p=top_p)
    tok = jnp.where(done, jnp.int32(pad_token_id), tok)
    out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
    done = done | jnp.isin(tok, eos)
    logits, cache = step(tok[:, None], (next_pos + i)[:, None], valid, cache, t + i)
    return i + 1, logits, cache, key, out, done

  carry = (jnp.int32(0), logits, cache, key, out, jnp.zeros((b,), bool))
  return jax.lax.while_loop(cond, body, carry)[4]
