"""Percentile clipping (8-bit Optimizers paper, Sec. 2.3; dropped from bitsandbytes 0.50)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

HISTORY = 100


class PercentileClippingState(NamedTuple):
  count: jax.Array
  gnorm_vec: jax.Array  # float32 (100,): squared global norms of the last 100 steps


def percentile_clipping(percentile: int = 5) -> optax.GradientTransformation:
  """Clip the global gradient norm to the ``percentile``-th of the last 100 steps' norms.

  As bitsandbytes did: the squared norm of each step is stored in a ring of 100 (all 100 slots
  take the first step's norm), and when the current norm exceeds the ``percentile``-th
  smallest stored one the gradients are scaled down to it. Adapts to the training dynamics
  instead of a fixed threshold; the paper uses percentile 5 for stability.
  """
  if isinstance(percentile, bool) or not isinstance(percentile, int) or not 0 <= percentile < HISTORY:
    raise ValueError(f"percentile must be an int in [0, {HISTORY}); got {percentile!r}")

  def init_fn(params):
    del params
    return PercentileClippingState(jnp.zeros([], jnp.int32), jnp.zeros((HISTORY,), jnp.float32))

  def update_fn(updates, state, params=None):
    del params
    sq = sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(updates))
    count = optax.safe_increment(state.count)
    vec = jnp.where(count == 1, jnp.full((HISTORY,), sq),
                    state.gnorm_vec.at[count % HISTORY].set(sq))
    current = jnp.sqrt(sq)
    clip_value = jnp.sqrt(jnp.sort(vec)[percentile])
    scale = jnp.where(current > clip_value, clip_value / current, 1.0)
    updates = jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates)
    return updates, PercentileClippingState(count, vec)

  return optax.GradientTransformation(init_fn, update_fn)
