"""Paged optimizer state: kept in host memory, streamed through the device each step.

``paged(tx)`` wraps any optax transformation: its state lives in pinned host memory
(``memory_kind="pinned_host"``), so it no longer counts against device memory; each update
moves it to the device, runs ``tx``, and moves the new state back, inside the caller's jit.
This is bitsandbytes' paged optimizers (unified memory) in JAX's explicit form.
"""

from __future__ import annotations

import warnings

import jax
import optax

from jaxbnb.host import HOST_KIND, host_memory_supported

def _to_host(tree):
  def put(x):
    sharding = getattr(x, "sharding", None)
    if sharding is None:
      return x
    return jax.device_put(x, sharding.with_memory_kind(HOST_KIND))
  return jax.tree.map(put, tree)


def paged(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` with its state in pinned host memory (see module docstring).

  ``init`` must run outside ``jit`` (it places the state). On a backend without host memory
  kinds this warns once and returns ``tx`` unchanged (state stays on the device).
  """
  if not host_memory_supported():
    warnings.warn(f"jaxbnb.optim.paged: {jax.devices()[0].platform} has no '{HOST_KIND}' "
                  "memory; the optimizer state stays in device memory", stacklevel=2)
    return tx

  def init_fn(params):
    return _to_host(tx.init(params))

  def update_fn(updates, state, params=None):
    on_device = jax.device_put(state, jax.memory.Space.Device)
    updates, new_state = tx.update(updates, on_device, params)
    return updates, jax.device_put(new_state, jax.memory.Space.Host)

  return optax.GradientTransformation(init_fn, update_fn)


def paged_adamw8bit(*args, **kwargs) -> optax.GradientTransformation:
  """:func:`jaxbnb.optim.adamw8bit` with paged state (bnb ``PagedAdamW8bit``)."""
  from jaxbnb.optim.alias import adamw8bit
  return paged(adamw8bit(*args, **kwargs))


def paged_adam8bit(*args, **kwargs) -> optax.GradientTransformation:
  """:func:`jaxbnb.optim.adam8bit` with paged state (bnb ``PagedAdam8bit``)."""
  from jaxbnb.optim.alias import adam8bit
  return paged(adam8bit(*args, **kwargs))


def paged_lion8bit(*args, **kwargs) -> optax.GradientTransformation:
  """:func:`jaxbnb.optim.lion8bit` with paged state (bnb ``PagedLion8bit``)."""
  from jaxbnb.optim.alias import lion8bit
  return paged(lion8bit(*args, **kwargs))
