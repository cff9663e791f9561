"""The bitsandbytes 8-bit optimizer family as optax optimizers (optax's argument names).

Each adds ``block_size`` (256), ``min_8bit_size`` (4096: smaller leaves keep 32-bit state) and
``fp32_mask`` (a pytree of bools, or params -> bools: True keeps that leaf's state in 32 bits,
e.g. embeddings; :func:`jaxbnb.nn.stable_embedding_mask` gives StableEmbedding's).
Adam/AdamW/LAMB, Lion, SGD and LARS also take ``backend`` ("auto" | "xla" | "pallas": the fused
Pallas update kernel for 8-bit leaves; same bits either way, see :mod:`jaxbnb.optim.transforms`).
"""

from __future__ import annotations

from typing import Any, Optional

import optax

from jaxbnb.optim import transforms as T
from jaxbnb.optim.state import MaskOrFn


def _kw(block_size, min_8bit_size, fp32_mask):
  return dict(block_size=block_size, min_8bit_size=min_8bit_size, fp32_mask=fp32_mask)


def adamw8bit(learning_rate: T.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8, eps_root: float = 0.0, weight_decay: float = 1e-2,
              mask: Optional[Any] = None, *, block_size: int = 256, min_8bit_size: int = 4096,
              fp32_mask: MaskOrFn = None, backend: str = "auto") -> optax.GradientTransformation:
  """AdamW with 8-bit moments (bitsandbytes ``AdamW8bit``; defaults as bnb: wd 1e-2)."""
  return optax.chain(
      T.scale_by_adam_8bit(b1, b2, eps, eps_root, backend=backend,
                           **_kw(block_size, min_8bit_size, fp32_mask)),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate))


def adam8bit(learning_rate: T.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
             eps: float = 1e-8, eps_root: float = 0.0, weight_decay: float = 0.0,
             mask: Optional[Any] = None, *, block_size: int = 256, min_8bit_size: int = 4096,
             fp32_mask: MaskOrFn = None, backend: str = "auto") -> optax.GradientTransformation:
  """Adam with 8-bit moments (bitsandbytes ``Adam8bit``; its weight decay is decoupled)."""
  return adamw8bit(learning_rate, b1, b2, eps, eps_root, weight_decay, mask,
                   block_size=block_size, min_8bit_size=min_8bit_size, fp32_mask=fp32_mask,
                   backend=backend)


def lion8bit(learning_rate: T.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.99,
             weight_decay: float = 0.0, mask: Optional[Any] = None, *, block_size: int = 256,
             min_8bit_size: int = 4096, fp32_mask: MaskOrFn = None,
             backend: str = "auto") -> optax.GradientTransformation:
  """Lion with an 8-bit momentum (bitsandbytes ``Lion8bit``; defaults as bnb: wd 0)."""
  return optax.chain(
      T.scale_by_lion_8bit(b1, b2, backend=backend, **_kw(block_size, min_8bit_size, fp32_mask)),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate))


def sgd8bit(learning_rate: T.ScalarOrSchedule, momentum: Optional[float] = 0.9,
            nesterov: bool = False, weight_decay: float = 0.0, *, block_size: int = 256,
            min_8bit_size: int = 4096, fp32_mask: MaskOrFn = None,
            backend: str = "auto") -> optax.GradientTransformation:
  """SGD with an 8-bit momentum buffer (bitsandbytes ``SGD8bit``; L2 weight decay added to the
  gradient as bnb does). ``momentum=None`` or 0 has no state: plain ``optax.sgd``."""
  parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
  if momentum:
    parts.append(T.trace_8bit(momentum, nesterov, backend=backend,
                              **_kw(block_size, min_8bit_size, fp32_mask)))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


def rmsprop8bit(learning_rate: T.ScalarOrSchedule, decay: float = 0.9, eps: float = 1e-8,
                initial_scale: float = 0.0, eps_in_sqrt: bool = True,
                momentum: Optional[float] = None, nesterov: bool = False, *,
                block_size: int = 256, min_8bit_size: int = 4096,
                fp32_mask: MaskOrFn = None) -> optax.GradientTransformation:
  """RMSProp (``optax.rmsprop``, non-centered) with 8-bit state (bnb ``RMSprop8bit``)."""
  kw = _kw(block_size, min_8bit_size, fp32_mask)
  parts = [T.scale_by_rms_8bit(decay, eps, initial_scale, eps_in_sqrt, **kw),
           optax.scale_by_learning_rate(learning_rate)]
  if momentum:
    parts.append(T.trace_8bit(momentum, nesterov, **kw))
  return optax.chain(*parts)


def adagrad8bit(learning_rate: T.ScalarOrSchedule, initial_accumulator_value: float = 0.1,
                eps: float = 1e-7, *, block_size: int = 256, min_8bit_size: int = 4096,
                fp32_mask: MaskOrFn = None) -> optax.GradientTransformation:
  """Adagrad (``optax.adagrad``) with an 8-bit sum of squares (bnb ``Adagrad8bit``)."""
  return optax.chain(
      T.scale_by_rss_8bit(initial_accumulator_value, eps,
                          **_kw(block_size, min_8bit_size, fp32_mask)),
      optax.scale_by_learning_rate(learning_rate))


def lamb8bit(learning_rate: T.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
             eps: float = 1e-6, eps_root: float = 0.0, weight_decay: float = 0.0,
             mask: Optional[Any] = None, *, block_size: int = 256, min_8bit_size: int = 4096,
             fp32_mask: MaskOrFn = None, backend: str = "auto") -> optax.GradientTransformation:
  """LAMB (``optax.lamb``): Adam direction with 8-bit moments, decay, per-leaf trust ratio."""
  return optax.chain(
      T.scale_by_adam_8bit(b1, b2, eps, eps_root, backend=backend,
                           **_kw(block_size, min_8bit_size, fp32_mask)),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_trust_ratio(),
      optax.scale_by_learning_rate(learning_rate))


def lars8bit(learning_rate: T.ScalarOrSchedule, weight_decay: float = 0.0,
             weight_decay_mask: Any = True, trust_coefficient: float = 0.001, eps: float = 0.0,
             trust_ratio_mask: Any = True, momentum: float = 0.9, nesterov: bool = False, *,
             block_size: int = 256, min_8bit_size: int = 4096,
             fp32_mask: MaskOrFn = None, backend: str = "auto") -> optax.GradientTransformation:
  """LARS (``optax.lars``) with an 8-bit momentum buffer (bnb ``LARS8bit``)."""
  decay = optax.add_decayed_weights(weight_decay, weight_decay_mask)
  lr = optax.scale_by_learning_rate(learning_rate)
  chain = optax.chain(
      decay,
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps),
                   trust_ratio_mask),
      lr,
      T.trace_8bit(momentum, nesterov, backend=backend,
                   **_kw(block_size, min_8bit_size, fp32_mask)))
  if backend == "pallas":
    return chain  # the fused kernel reads a materialized momentum input anyway
  # Same state and results, without a float32 copy of every leaf (see T.lars_8bit).
  return T.lars_8bit(chain, decay, lr, weight_decay, weight_decay_mask, trust_coefficient, eps,
                     trust_ratio_mask, momentum, nesterov)


def ademamix8bit(learning_rate: T.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
                 b3: T.ScalarOrSchedule = 0.9999, alpha: T.ScalarOrSchedule = 5.0,
                 eps: float = 1e-8, eps_root: float = 0.0, weight_decay: float = 0.0,
                 mask: Optional[Any] = None, *, block_size: int = 256,
                 min_8bit_size: int = 4096,
                 fp32_mask: MaskOrFn = None) -> optax.GradientTransformation:
  """AdEMAMix (``optax.contrib.ademamix``) with all three moments in 8 bits (bnb
  ``AdEMAMix8bit``)."""
  return optax.chain(
      T.scale_by_ademamix_8bit(b1, b2, b3, alpha, eps, eps_root,
                               **_kw(block_size, min_8bit_size, fp32_mask)),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate))
