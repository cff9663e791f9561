"""8-bit optimizer state: blockwise-quantized moments (bitsandbytes' layout).

A moment of a large leaf is a :class:`QuantizedMoment`: uint8 codes of the leaf's shape on the
signed dynamic map (first moments) or the unsigned one (second moments), and one float32
absmax per block of ``block_size`` elements (flattened row-major). Small leaves (fewer than
``min_8bit_size`` elements) and leaves masked to full precision keep a float32 array.
Moments are read in float32, updated in float32 and written back re-quantized to the nearest
code, as bitsandbytes' blockwise kernels do.

Rounding is pinned down so that every backend computes the same bits (the fused Pallas kernel,
pallas_kernels/optim_8bit.py, equals this path bit for bit): a product that feeds an add is
written ``a * b + z`` with ``z = runtime_zero()``, a 0.0 the compiler cannot constant-fold.
Whether or not a compiler contracts it into ``fma(a, b, z)``, it is the product rounded once;
without it XLA:CPU picks which of two products to fuse by operand order and use counts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb.functional import _checks
from jaxbnb.functional.blockwise import nearest_code, normalize, to_blocks
from jaxbnb.functional.codebooks import create_dynamic_map

_F32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class QuantizedMoment:
  """One optimizer moment in 8 bits.

  Attributes:
    q: uint8 codes, the parameter's shape.
    absmax: float32 ``(ceil(size / block_size),)`` per-block scale.
    signed: signed dynamic map (may be negative) or unsigned (static).
    block_size: elements per block (static).
  """

  q: jax.Array
  absmax: jax.Array
  signed: bool = True
  block_size: int = 256

  @property
  def nbytes(self) -> int:
    return int(self.q.nbytes + self.absmax.nbytes)


jax.tree_util.register_dataclass(QuantizedMoment, data_fields=["q", "absmax"],
                                 meta_fields=["signed", "block_size"])

Moment = Union[QuantizedMoment, jax.Array]


def runtime_zero() -> jax.Array:
  """float32 0.0 hidden from constant folding (see the module docstring)."""
  return jax.lax.optimization_barrier(jnp.zeros((), jnp.float32))


def _code(signed: bool) -> jax.Array:
  return create_dynamic_map(signed=signed)


def init_moment(param: jax.Array, *, signed: bool, block_size: int, use_8bit: bool,
                fill: float = 0.0) -> Moment:
  """A moment of zeros (or ``fill``) for ``param``: 8-bit or float32."""
  if not use_8bit:
    return jnp.full_like(param, fill, dtype=jnp.float32)
  nblocks = -(-param.size // block_size)
  if fill == 0.0:
    # absmax 0 makes every code dequantize to exactly 0.
    return QuantizedMoment(jnp.zeros_like(param, dtype=jnp.uint8),
                           jnp.zeros((nblocks,), jnp.float32), signed, block_size)
  return write_moment(QuantizedMoment(jnp.zeros_like(param, dtype=jnp.uint8),
                                      jnp.zeros((nblocks,), jnp.float32), signed, block_size),
                      jnp.full(param.shape, fill, jnp.float32))


def read_moment(m: Moment) -> jax.Array:
  """float32 values of a moment (dequantized when 8-bit)."""
  if not isinstance(m, QuantizedMoment):
    return m
  values = _code(m.signed)[m.q.reshape(-1).astype(jnp.int32)]
  pad = m.absmax.size * m.block_size - values.size
  blocks = jnp.pad(values, (0, pad)).reshape(m.absmax.size, m.block_size)
  return (blocks * m.absmax[:, None]).reshape(-1)[: m.q.size].reshape(m.q.shape)


def write_moment(old: Moment, new: jax.Array) -> Moment:
  """``new`` (float32) stored like ``old``: re-quantized to the nearest code when 8-bit."""
  if not isinstance(old, QuantizedMoment):
    return new.astype(jnp.float32)
  # Saturate instead of overflowing: an inf in a block would turn its whole scale into NaN,
  # where a float32 optimizer would still be finite.
  new = jnp.clip(jnp.nan_to_num(new, nan=0.0), -_F32_MAX, _F32_MAX)
  blocks = to_blocks(new, old.block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  # + 0: the normalized value is rounded before nearest_code subtracts codes from it.
  q = nearest_code(normalize(blocks, absmax) + runtime_zero(), _code(old.signed))
  return QuantizedMoment(q.reshape(-1)[: new.size].reshape(new.shape), absmax, old.signed,
                         old.block_size)


MaskOrFn = Optional[Union[Any, Callable[[Any], Any]]]


def use_8bit_tree(params: Any, min_8bit_size: int, fp32_mask: MaskOrFn) -> Any:
  """Bool per leaf: 8-bit state when the leaf is large enough and not masked to 32-bit."""
  if isinstance(min_8bit_size, (jax.Array, np.ndarray)):
    raise TypeError(f"8-bit optimizer min_8bit_size: {_STATIC_HINT}")
  if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
    raise ValueError(f"min_8bit_size must be an int >= 0; got {min_8bit_size!r}")
  big = jax.tree.map(lambda p: p.size >= min_8bit_size, params)
  if fp32_mask is None:
    return big
  mask = fp32_mask(params) if callable(fp32_mask) else fp32_mask
  try:
    # The mask may be a prefix of the params (one bool per NNX Variable, an optax mask).
    return jax.tree.map(lambda m, b: jax.tree.map(lambda x: bool(x and not m), b), mask, big)
  except ValueError as e:
    raise ValueError("fp32_mask must be a pytree of bools with the params' structure or a "
                     "prefix of it (True: keep 32-bit state), or a function params -> such a "
                     "tree") from e


_STATIC_HINT = ("it must be a Python int; with optax.inject_hyperparams pass "
                "static_args=('block_size', 'min_8bit_size')")


def check_block_size(block_size: int) -> int:
  if isinstance(block_size, (jax.Array, np.ndarray)):
    raise TypeError(f"8-bit optimizer block_size: {_STATIC_HINT}")
  return _checks.check_blocksize(block_size, _checks.BLOCKSIZES_8BIT, "8-bit optimizer")


def state_bytes(state: Any) -> int:
  """Bytes held by an optimizer state (every array leaf)."""
  return sum(int(x.nbytes) for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
