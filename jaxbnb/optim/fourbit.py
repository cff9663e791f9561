"""Adam and AdamW with 4-bit moments (Li et al. 2023, "Memory Efficient Optimizers with 4-bit
States"), as optax transformations.

What is implemented from the paper (its final "4-bit AdamW" configuration, as in lpmm's
default config): the first moment blockwise (``block_size=128``) on the signed 4-bit
dynamic-exponent map; the second moment with rank-1 normalization on the linear map without zero
(blockwise, same map, for 1-D and thin leaves); nearest rounding; leaves with fewer than
``min_4bit_size`` (4096) elements keep float32 moments. Not implemented: the factorized second
moment ("4-bit Factor", Adafactor-style row/column statistics), stochastic rounding, and the
paper's fused CUDA kernels (the update here is XLA, chunked like the 8-bit optimizers).

The update arithmetic is the 8-bit Adam's (bitsandbytes' rule, :mod:`jaxbnb.optim.transforms`):
moments read in float32, updated, and re-quantized; the direction uses the unrounded new values.
Non-finite gradient elements, and elements whose ``(1 - b2) * g * g`` overflows, are skipped.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxbnb.functional import _checks
from jaxbnb.optim import transforms as T
from jaxbnb.optim.fourbit_state import (init_moment4, is_4bit, read_moment4, update_moment4)
from jaxbnb.optim.paged import paged
from jaxbnb.optim.state import MaskOrFn, runtime_zero, use_8bit_tree

BLOCKSIZES_4BIT_STATE = (32, 64, 128, 256, 512, 1024, 2048, 4096)


class ScaleByAdam4bitState(NamedTuple):
  count: jax.Array
  mu: Any  # one moment per parameter leaf (flat tuple, as the 8-bit states)
  nu: Any


def _check(block_size, min_4bit_size):
  if isinstance(block_size, (jax.Array,)) or isinstance(min_4bit_size, (jax.Array,)):
    raise TypeError("4-bit optimizer block_size/min_4bit_size must be Python ints; with "
                    "optax.inject_hyperparams pass static_args=('block_size', 'min_4bit_size')")
  return _checks.check_blocksize(block_size, BLOCKSIZES_4BIT_STATE, "4-bit optimizer")


def _init(params, use4, *, signed: bool, block_size: int, rank1: bool):
  return tuple(init_moment4(p, signed=signed, block_size=block_size, rank1=rank1) if u
               else jnp.zeros_like(p, dtype=jnp.float32)
               for p, u in zip(jax.tree.leaves(params), jax.tree.leaves(use4)))


def _read(m):
  return read_moment4(m) if is_4bit(m) else m


def scale_by_adam_4bit(b1: T.Scalar = 0.9, b2: T.Scalar = 0.999, eps: T.Scalar = 1e-8,
                       eps_root: T.Scalar = 0.0, *, block_size: int = 128,
                       min_4bit_size: int = 4096, fp32_mask: MaskOrFn = None,
                       rank1: bool = True) -> optax.GradientTransformation:
  """Adam's direction ``m_hat / (sqrt(v_hat + eps_root) + eps)`` with 4-bit ``m`` and ``v``.

  Args:
    b1, b2, eps, eps_root: as ``optax.scale_by_adam``.
    block_size: elements per block of the first moment (and of blockwise second moments).
    min_4bit_size: leaves with fewer elements keep float32 moments.
    fp32_mask: bools (a tree, a prefix of one, or ``params -> tree``): True keeps float32.
    rank1: rank-1 normalization for second moments of ``ndim >= 2`` leaves (else blockwise).

  State: ``count`` and, per parameter leaf, ``mu`` a :class:`Blockwise4bit` (or float32) and
  ``nu`` a :class:`Rank1Moment` / :class:`Blockwise4bit` (or float32).
  """
  block_size = _check(block_size, min_4bit_size)

  def init_fn(params):
    use4 = use_8bit_tree(params, min_4bit_size, fp32_mask)
    return ScaleByAdam4bitState(
        jnp.zeros([], jnp.int32),
        _init(params, use4, signed=True, block_size=block_size, rank1=False),
        _init(params, use4, signed=False, block_size=block_size, rank1=rank1))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    z = runtime_zero()
    scalars = T.adam_scalars(b1, b2, eps, eps_root, count, z)
    b1_, c_b1, b2_, c_b2 = scalars[:4]

    def m_fn(g, m_old):
      g0, ok = T._finite(g, c_b2)  # pylint: disable=protected-access
      return jnp.where(ok, (b1_ * m_old + z) + (c_b1 * g0 + z), m_old)

    def v_fn(g, v_old):
      g0, ok = T._finite(g, c_b2)  # pylint: disable=protected-access
      return jnp.where(ok, (b2_ * v_old + z) + (c_b2 * g0 * g0 + z), v_old)

    def leaf(g, m, v):
      # Adam's moments are independent: each is updated in its own loop over its own layout.
      # The direction is recomputed from the old state, elementwise (fuses into its consumer).
      m_new, v_new = m_fn(g, _read(m)), v_fn(g, _read(v))
      u = T.adam_direction(g, m_new, v_new, scalars)
      if is_4bit(m):
        m = update_moment4(m_fn, (g,), m)
        v = update_moment4(v_fn, (g,), v)
      else:
        m, v = m_new, v_new
      return u.astype(g.dtype), m, v

    u, mu, nu = T._map(leaf, updates, state.mu, state.nu)  # pylint: disable=protected-access
    return u, ScaleByAdam4bitState(count, mu, nu)

  return T._explicit_mode(optax.GradientTransformation(init_fn, update_fn))  # pylint: disable=protected-access


def adamw4bit(learning_rate: T.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8, weight_decay: float = 1e-2, mask: Optional[Any] = None, *,
              eps_root: float = 0.0, block_size: int = 128, min_4bit_size: int = 4096,
              fp32_mask: MaskOrFn = None, rank1: bool = True) -> optax.GradientTransformation:
  """AdamW (``optax.adamw``'s argument names) with 4-bit moments: ~1.03 bytes of state per
  parameter on large leaves (optax.adamw: 8). See :func:`scale_by_adam_4bit`.

  Positional order ``(learning_rate, b1, b2, eps, weight_decay, mask)``; ``eps_root`` and the
  4-bit options are keyword-only."""
  return optax.chain(
      scale_by_adam_4bit(b1, b2, eps, eps_root, block_size=block_size,
                         min_4bit_size=min_4bit_size, fp32_mask=fp32_mask, rank1=rank1),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate))


def adam4bit(learning_rate: T.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
             eps: float = 1e-8, weight_decay: float = 0.0, mask: Optional[Any] = None, *,
             eps_root: float = 0.0, block_size: int = 128, min_4bit_size: int = 4096,
             fp32_mask: MaskOrFn = None, rank1: bool = True) -> optax.GradientTransformation:
  """Adam with 4-bit moments (decoupled weight decay, 0 by default; see :func:`adamw4bit`)."""
  return adamw4bit(learning_rate, b1, b2, eps, weight_decay, mask, eps_root=eps_root,
                   block_size=block_size, min_4bit_size=min_4bit_size, fp32_mask=fp32_mask,
                   rank1=rank1)


def paged_adamw4bit(*args, **kwargs) -> optax.GradientTransformation:
  """:func:`adamw4bit` with its state in pinned host memory (:func:`jaxbnb.optim.paged`)."""
  return paged(adamw4bit(*args, **kwargs))


def paged_adam4bit(*args, **kwargs) -> optax.GradientTransformation:
  """:func:`adam4bit` with its state in pinned host memory (:func:`jaxbnb.optim.paged`)."""
  return paged(adam4bit(*args, **kwargs))
