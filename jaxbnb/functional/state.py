"""``QuantState``: the quantization constants that travel with a quantized array."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class QuantState:
  """Constants needed to dequantize a blockwise-quantized array (bitsandbytes' ``QuantState``).

  Arrays are pytree leaves; the rest is static aux data, so a state passes through ``jax.jit``,
  ``jax.tree.map`` and Orbax like any pytree.

  Attributes:
    absmax: float32 ``(nblocks,)`` per-block absolute maximum, or uint8 ``(nblocks,)`` codes
      of ``absmax - offset`` when nested (double quantization).
    code: float32 lookup table: ``(256,)`` for 8-bit, ``(16,)`` for 4-bit.
    offset: float32 scalar, the mean subtracted before nesting; ``None`` when not nested.
    state2: the ``QuantState`` of the nested absmax; ``None`` when not nested.
    blocksize: elements per block (static).
    quant_type: ``"dynamic"`` (8-bit map), ``"nf4"`` or ``"fp4"`` (static).
    shape: shape of the original array (static).
    dtype: dtype of the original array; dequantization returns it (static).
  """

  absmax: jax.Array
  code: jax.Array
  offset: Optional[jax.Array] = None
  state2: Optional["QuantState"] = None
  blocksize: int = 4096
  quant_type: str = "dynamic"
  shape: tuple[int, ...] = ()
  dtype: Any = np.dtype(np.float32)

  @property
  def nested(self) -> bool:
    """Whether ``absmax`` is itself quantized (double quantization)."""
    return self.state2 is not None

  @property
  def nblocks(self) -> int:
    return -(-int(np.prod(self.shape, dtype=np.int64)) // self.blocksize)


jax.tree_util.register_dataclass(
    QuantState,
    data_fields=["absmax", "code", "offset", "state2"],
    meta_fields=["blocksize", "quant_type", "shape", "dtype"],
)
