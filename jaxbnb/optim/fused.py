"""Fused 8-bit AdamW step: parameters updated in place, one pass over memory.

An optax ``GradientTransformation`` returns updates, so ``adamw8bit`` + ``optax.apply_updates``
moves, per float32 parameter with 8-bit moments, at least: kernel (or XLA fusion) reading the
gradient (4 B) and the moments (2 B) and writing the direction (4 B) and the moments (2 B), then
the epilogue fusion reading direction and parameter (8 B) and writing the parameter (4 B):
24 B. :func:`adamw8bit_fused` takes the parameters too and writes them (in place, aliased), with
no update array in between: gradient 4 B + parameter 8 B + moments 4 B = 16 B per parameter
(plus 2 x 4/256 B of absmax). Same optimizer, same state (``adamw8bit(...).init`` layout), so a
run may switch between the two.

On the XLA path both read the gradient and the codes twice instead (the chunked moment update,
then the direction recomputed in the parameter's elementwise pass: see jaxbnb.optim.state), and
neither writes a direction array. What the fused step adds there is order: the parameter pass
reads the old codes before the update loop overwrites them, so with donated state and
parameters (``donate_argnums``) the step runs in place; an optax step returns a direction that is
consumed after the loop, and XLA keeps a copy of the old codes for it (up to 2 B/param).

``step`` computes ``p + (-lr) * (u + wd * p)`` in float32 (``u``: the Adam direction) and
rounds once to the parameter's dtype. Against ``optax.apply_updates`` of ``adamw8bit``'s updates
it can differ in the last bit (optax leaves ``u + wd * p`` to the compiler, which may fuse it
into an FMA; 16-bit parameters are rounded once here, at every chain step there). Its two
backends, XLA and the Pallas kernel, agree bit for bit.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxbnb import _backend
from jaxbnb.optim import transforms as T
from jaxbnb.optim.alias import adamw8bit
from jaxbnb.optim.state import (MaskOrFn, QuantizedMoment, _code, read_moment, runtime_zero,
                                update_moments)
from pallas_kernels import optim_8bit as _kernel


class FusedOptimizer(NamedTuple):
  """``init(params) -> state``; ``step(grads, state, params) -> (new_params, new_state)``."""

  init: Callable[[Any], Any]
  step: Callable[[Any, Any, Any], tuple[Any, Any]]


def param_update(p, u, wd, nlr, z):
  """``p + nlr * (u + wd * p)`` in float32 (products rounded explicitly), rounded to p.dtype."""
  p32 = p.astype(jnp.float32)
  return (p32 + (nlr * (u + (wd * p32 + z)) + z)).astype(p.dtype)


def adamw8bit_fused(learning_rate: T.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
                    eps: float = 1e-8, eps_root: float = 0.0, weight_decay: float = 1e-2,
                    mask: Optional[Any] = None, *, block_size: int = 256,
                    min_8bit_size: int = 4096, fp32_mask: MaskOrFn = None,
                    backend: str = "auto") -> FusedOptimizer:
  """:func:`jaxbnb.optim.adamw8bit` as a fused in-place step (see the module docstring).

  Same arguments (``mask``: a bool tree or ``params -> bools``, True where weight decay
  applies); ``weight_decay`` must not be a schedule. ``backend``: "xla" | "pallas" | "auto"
  (XLA until the kernel is timed on a GPU); leaves with 32-bit state always take XLA. Donate
  params and state to ``jit`` (``donate_argnums``) for a true in-place update.
  """
  if callable(weight_decay):
    raise TypeError("adamw8bit_fused: weight_decay must be a number or array, not a schedule")
  interpret = _backend.pallas_interpret(backend)
  tx = adamw8bit(learning_rate, b1, b2, eps, eps_root, weight_decay, mask,
                 block_size=block_size, min_8bit_size=min_8bit_size, fp32_mask=fp32_mask,
                 backend="xla")

  def step(grads, state, params):
    adam_state, wd_state, lr_state = state
    count = optax.safe_increment(adam_state.count)
    z = runtime_zero()
    scalars = T.adam_scalars(b1, b2, eps, eps_root, count, z)
    if callable(learning_rate):
      lr = learning_rate(lr_state.count)
      lr_state = lr_state._replace(count=optax.safe_increment(lr_state.count))
    else:
      lr = learning_rate
    nlr = -1 * lr  # as optax.scale_by_learning_rate
    g_leaves, treedef = jax.tree.flatten(grads)
    p_leaves = treedef.flatten_up_to(params)
    if mask is None:
      decay = [True] * len(g_leaves)
    else:
      decay = treedef.flatten_up_to(mask(params) if callable(mask) else mask)
    is_moment = lambda x: isinstance(x, QuantizedMoment)
    mu, mu_def = jax.tree.flatten(adam_state.mu, is_leaf=is_moment)
    nu, nu_def = jax.tree.flatten(adam_state.nu, is_leaf=is_moment)
    if not len(mu) == len(nu) == len(g_leaves):
      raise ValueError(f"optimizer state holds {len(mu)} moments for {len(g_leaves)} "
                       "gradient leaves: was it initialized with these params?")
    new_p, new_m, new_v = [], [], []
    for g, p, m, v, d in zip(g_leaves, p_leaves, mu, nu, decay):
      wd = weight_decay if d else 0.0
      if interpret is not None and is_moment(m) and is_moment(v):
        p2, ((mq, ma), (vq, va)) = _kernel.update_8bit(
            g, [(m.q, m.absmax.reshape(-1)), (v.q, v.absmax.reshape(-1))],
            [_code(True), _code(False)],
            _kernel.scalar_vector((*scalars, wd, nlr)), param=p, kind="adam",
            block_size=m.block_size, interpret=interpret)
        m2 = QuantizedMoment(mq, ma.reshape(m.absmax.shape), m.signed, m.block_size)
        v2 = QuantizedMoment(vq, va.reshape(v.absmax.shape), v.signed, v.block_size)
      else:
        moments = T.adam_moments(scalars, z)
        u = T.adam_direction(g, *moments(g, read_moment(m), read_moment(v)), scalars)
        p2 = param_update(p, u, wd, nlr, z)
        if is_moment(m):
          # The update loop rewrites the state in place once p2 has read it: with donated
          # state, XLA needs no copy of the old codes.
          (m, v), _ = jax.lax.optimization_barrier(((m, v), p2))
        m2, v2 = update_moments(moments, (g,), (m, v))
      new_p.append(p2)
      new_m.append(m2)
      new_v.append(v2)
    adam_state = adam_state._replace(count=count, mu=mu_def.unflatten(new_m),
                                     nu=nu_def.unflatten(new_v))
    return treedef.unflatten(new_p), (adam_state, wd_state, lr_state)

  return FusedOptimizer(tx.init, step)
