"""8-bit optimizer state: blockwise-quantized moments (bitsandbytes' layout).

A moment of a large leaf is a :class:`QuantizedMoment`: uint8 codes of the leaf's shape on the
signed dynamic map (first moments) or the unsigned one (second moments), and one float32
absmax per block of ``block_size`` elements (flattened row-major). Small leaves (fewer than
``min_8bit_size`` elements) and leaves masked to full precision keep a float32 array.
Moments are read in float32, updated in float32 and written back re-quantized to the nearest
code, as bitsandbytes' blockwise kernels do.

Memory: :func:`update_moments` runs a leaf's update chunk by chunk in a loop (each chunk's new
moments, their block absmax and codes stay in cache; see ``jaxbnb.functional.blockwise.
map_blocks``), so a step's temporaries are a few MiB whatever the leaf sizes. The update
direction is then recomputed from the old state, elementwise, where XLA fuses it into whatever
consumes it (``optax.apply_updates``): no full-size float32 array is written on the way. (With
donated state the old codes must outlive the loop that rewrites them in place for that
recomputation, so XLA copies them; ``adamw8bit_fused`` orders the two and copies nothing.)

Rounding is pinned down so that every backend computes the same bits (the fused Pallas kernel,
pallas_kernels/optim_8bit.py, equals this path bit for bit): a product that feeds an add is
written ``a * b + z`` with ``z = runtime_zero()``, a 0.0 the compiler cannot constant-fold.
Whether or not a compiler contracts it into ``fma(a, b, z)``, it is the product rounded once;
without it XLA:CPU picks which of two products to fuse by operand order and use counts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb.functional import _checks
from jaxbnb.functional.blockwise import dequantize_blocks, nearest_dynamic, normalize
from jaxbnb.functional.codebooks import create_dynamic_map
from jaxbnb.optim import _blocks
from jaxbnb.optim.fourbit_state import scaled

_F32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class QuantizedMoment:
  """One optimizer moment in 8 bits.

  Attributes:
    q: uint8 codes, the parameter's shape.
    absmax: float32 per-block scale: ``(ceil(size / block_size),)`` (bitsandbytes' layout), or
      for a stack of matrices whose slices are whole blocks ``(*shape[:k], blocks per slice)``
      (the same blocks; ``jaxbnb.optim._blocks.blocks_shape``).
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
  # zeros_like keeps a concrete param's sharding; the block scales are placed to match.
  zeros = QuantizedMoment(jnp.zeros_like(param, dtype=jnp.uint8),
                          _blocks.zeros_blocks(param, block_size), signed, block_size)
  if fill == 0.0:
    return zeros  # absmax 0 makes every code dequantize to exactly 0.
  return write_moment(zeros, jnp.full_like(param, fill, dtype=jnp.float32))


def read_moment(m: Moment) -> jax.Array:
  """float32 values of a moment (dequantized when 8-bit)."""
  if not isinstance(m, QuantizedMoment):
    return m
  return dequantize_blocks(m.q, m.absmax.reshape(-1), _code(m.signed),
                           m.block_size).reshape(m.q.shape)


def _requantize(new: jax.Array, signed: bool, valid=None) -> tuple[jax.Array, jax.Array]:
  """``(uint8 codes, float32 absmax)`` of float32 blocks ``new (rows, block_size)``."""
  # Saturate instead of overflowing: an inf in a block would turn its whole scale into NaN,
  # where a float32 optimizer would still be finite.
  new = jnp.clip(jnp.nan_to_num(new, nan=0.0), -_F32_MAX, _F32_MAX)
  if valid is not None:
    new = jnp.where(valid, new, 0.0)
  absmax = jnp.max(jnp.abs(new), axis=1)
  x = normalize(new, absmax)
  # bitsandbytes multiplies by 1/absmax, which is subnormal (flushed to 0) above 2**126: every
  # code of such a block would read back as 0. Scale those first (elsewhere: bnb's bits).
  big = (absmax > 2.0**126)[:, None]
  x = jnp.where(big, scaled(new, absmax[:, None]), x)
  return nearest_dynamic(x, signed), absmax


def _dequantize_rows(q: jax.Array, absmax: jax.Array, signed: bool) -> jax.Array:
  return _code(signed).at[q].get(mode="promise_in_bounds") * absmax[:, None]


def update_moments(fn: Callable[..., tuple[jax.Array, ...]], inputs: Sequence[jax.Array],
                   moments: tuple[Moment, ...]) -> tuple[Moment, ...]:
  """The new moments ``fn(*inputs, *old values)``, stored like ``moments`` (re-quantized when
  8-bit).

  ``fn`` is elementwise (any shape): the ``inputs`` (arrays of the leaf's shape, e.g. the
  gradient) and the old moment values (float32) in, a tuple of new float32 values out. A leaf's
  moments are all 8-bit (same block size) or all float32. 8-bit moments are updated chunk by
  chunk in a loop (module docstring), in place in the old state's buffers (copied first unless
  donated and read by nothing else).
  """
  if not any(isinstance(m, QuantizedMoment) for m in moments):
    return tuple(x.astype(jnp.float32) for x in fn(*inputs, *moments))
  if not all(isinstance(m, QuantizedMoment) and m.block_size == moments[0].block_size
             for m in moments):
    raise ValueError("update_moments: a leaf's moments must all be 8-bit with one block size")
  k, ni = len(moments), len(inputs)

  def chunk(valid, *xs):  # the inputs, then the moments' codes and absmax, at this chunk
    ins, qs, absmaxes = xs[:ni], xs[ni:ni + k], xs[ni + k:]
    olds = [_dequantize_rows(q, a, m.signed) for q, a, m in zip(qs, absmaxes, moments)]
    # The barrier keeps the chunk's new moments in one buffer that the absmax and the codes
    # both read; XLA would otherwise compute them twice.
    news = jax.lax.optimization_barrier(tuple(fn(*ins, *olds)))
    news = [_requantize(x, m.signed, valid) for x, m in zip(news, moments)]
    return [q for q, _ in news], [a for _, a in news]

  qs, absmaxes = _blocks.map_grouped(chunk, [x.reshape(-1) for x in inputs],
                                     [m.q.reshape(-1) for m in moments],
                                     [m.absmax.reshape(-1) for m in moments],
                                     moments[0].block_size)
  return tuple(QuantizedMoment(q.reshape(m.q.shape), a.reshape(m.absmax.shape), m.signed,
                               m.block_size) for q, a, m in zip(qs, absmaxes, moments))


def write_moment(old: Moment, new: jax.Array) -> Moment:
  """``new`` (float32) stored like ``old``: re-quantized to the nearest code when 8-bit."""
  if not isinstance(old, QuantizedMoment):
    return new.astype(jnp.float32)
  return update_moments(lambda x, _: (x.astype(jnp.float32),), (new,), (old,))[0]


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
