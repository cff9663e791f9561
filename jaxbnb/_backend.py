"""The one dispatch seam: ``backend="auto" | "xla" | "pallas"`` for matmuls and optimizers.

``"xla"`` runs everywhere. ``"pallas"`` runs the Pallas kernels where one covers the problem (the
rest stays on XLA); off a GPU they run in Pallas interpret mode, which is correct but orders of
magnitude slower, so that case warns. ``"auto"`` is XLA until the kernels have been compiled and
timed on a GPU (docs/PERFORMANCE.md). The backend picks speed, never the answer.
"""

from __future__ import annotations

import warnings
from typing import Optional

import jax

BACKENDS = ("auto", "xla", "pallas")


class PallasInterpretWarning(UserWarning):
  """``backend="pallas"`` without a GPU: the kernels run in interpret mode (slow; for tests)."""


def check(backend: str) -> None:
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")


def pallas_interpret(backend: str) -> Optional[bool]:
  """None: take the XLA path. Else whether the Pallas kernels run in interpret mode."""
  check(backend)
  if backend != "pallas":
    return None
  if jax.default_backend() == "gpu":
    return False
  warnings.warn(f"backend='pallas' on {jax.default_backend()}: the Pallas kernels run in "
                "interpret mode (correct, very slow; meant for tests). Use backend='xla' or "
                "'auto' off a GPU.", PallasInterpretWarning, stacklevel=3)
  return True
