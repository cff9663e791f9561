"""Quantized leaves: the packed weights that replace float arrays in a params pytree.

Each leaf stores a 2-D matrix ``W`` in bitsandbytes' ``(out, in)`` row-major layout (so bnb
checkpoints load without re-quantization) and remembers how to give back the original array
(its *logical* view; :mod:`jaxbnb.layout` holds the layout and sharding rules). A stacked leaf
(scanned layers, MoE experts) holds one such matrix per slice of its leading ``stack_shape``
axes, which every one of its arrays carries.

Arrays are pytree leaves; everything else is static aux data (one slice's description), so
leaves pass through ``jax.jit``, ``lax.scan``, ``vmap``, sharding and Orbax like the arrays they
replace.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxbnb import _explicit, layout
from jaxbnb.functional import QuantState
from jaxbnb.functional import fourbit as _fourbit
from jaxbnb.functional import int8 as _int8
from jaxbnb.functional.blockwise import unnest_absmax


class QuantizedArray:
  """Common interface of quantized leaves (array-like metadata, dequantize).

  ``shape``/``dtype`` describe one weight (one slice of a stacked leaf); ``stack_shape`` is
  the leading axes that every array of a stacked leaf carries (``()`` for a single weight), and
  ``full_shape`` (``stack_shape + shape``) is the logical array's shape.
  """

  shape: tuple[int, ...]
  dtype: Any
  transposed: bool
  n_in: int

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def stack_shape(self) -> tuple[int, ...]:
    """Leading axes indexing separate weights (layers, experts); ``()`` for one weight."""
    return layout.stack_shape(self)

  @property
  def full_shape(self) -> tuple[int, ...]:
    """Shape of the logical array :meth:`dequantize` gives: ``stack_shape + shape``."""
    return self.stack_shape + tuple(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes actually held (packed data and every quantization constant)."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(self))

  @property
  def matrix_shape(self) -> tuple[int, int]:
    """``(out, in)`` of one slice's stored bnb-layout matrix."""
    return layout.matrix_shape(self.shape, self.transposed, self.n_in)

  def __getitem__(self, index) -> "QuantizedArray":
    """A slice over the stack axes (``leaf[l]``, ``leaf[2:4]``), still packed: the same
    indexing applied to every array of the leaf. Indexes only the stack axes; ``leaf[...]``
    is the leaf itself (as NNX's ``variable[...]`` reads a value)."""
    if index is Ellipsis:
      return self
    n_stack = len(self.stack_shape)
    parts = index if isinstance(index, tuple) else (index,)
    if n_stack == 0 or len(parts) > n_stack or any(p is Ellipsis or p is None for p in parts):
      raise IndexError(f"a quantized leaf indexes only its stack axes {self.stack_shape} "
                       f"(layers, experts); got {index!r}. Dequantize it "
                       "(jaxbnb.dequantize) to index the weight itself.")
    return jax.tree.map(lambda a: a[index], self)

  def dequantize(self, dtype=None) -> jax.Array:
    """The logical array (``full_shape``), in ``dtype`` (default: the original dtype)."""
    one = lambda q: layout.from_matrix(q.dequantize_matrix(dtype), q.shape, q.transposed)
    run = lambda q: layout.map_slices(one, len(q.stack_shape), q)
    return _explicit.call(run, (self,), lambda mesh, _: self.logical_spec(mesh))

  def matrix_specs(self, mesh) -> tuple[Any, Any]:
    """Mesh axes holding one slice's ``(out, in)`` matrix rows and columns (None: replicated)."""
    del mesh
    return layout.matrix_specs(self)

  def logical_spec(self, mesh) -> P:
    """The PartitionSpec of the logical array that corresponds to the leaf's shards."""
    return layout.logical_spec(self, mesh)

  def dequantize_matrix(self, dtype=None) -> jax.Array:  # pragma: no cover - abstract
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Quantized4bit(QuantizedArray):
  """An NF4/FP4 weight. ``packed``/``state`` are exactly bitsandbytes' ``Params4bit`` data.

  Attributes:
    packed: ``(nbytes // itemsize, 1)`` packed codes (``quant_storage`` dtype).
    state: ``QuantState`` of the ``(out, in)`` matrix (blocks run along ``in``).
    shape, dtype: the logical array's shape and dtype (static).
    transposed, n_in: how the logical array maps to the matrix (see module docstring).
    compute_dtype: dtype the matmul runs in (static).
  """

  packed: jax.Array
  state: QuantState
  shape: tuple[int, ...] = ()
  dtype: Any = np.dtype(np.float32)
  transposed: bool = True
  n_in: int = 1
  compute_dtype: Any = np.dtype(np.float32)

  @property
  def quant_type(self) -> str:
    return self.state.quant_type

  def dequantize_matrix(self, dtype=None) -> jax.Array:
    w = _fourbit.dequantize_4bit(self.packed, self.state)
    return w.astype(dtype or self.dtype)

  def dequantize_rows(self, rows: jax.Array, dtype=None) -> jax.Array:
    """Rows ``W[rows]`` of the ``(out, in)`` matrix, reading only their blocks.

    Needs ``in % blocksize == 0`` so that every row is whole blocks (true for embeddings of
    any usual width at blocksize <= 64); ``rows``: int ``(...)`` -> ``(..., in)``.
    """
    n_rows, n_cols = self.matrix_shape
    bs = self.state.blocksize
    if n_cols % bs or n_cols % 2:
      raise ValueError(f"row lookup needs the row length {n_cols} to be a multiple of the "
                       f"blocksize {bs}")
    packed = _fourbit.storage_bytes(self.packed)[: n_rows * n_cols // 2]
    packed = packed.reshape(n_rows, n_cols // 2)[rows]
    absmax = unnest_absmax(self.state).reshape(n_rows, n_cols // bs)[rows]
    values = _fourbit.decode_4bit(packed.reshape(-1), self.state.code, self.state.quant_type)
    values = values.reshape(*absmax.shape[:-1], n_cols // bs, bs) * absmax[..., None]
    return values.reshape(*rows.shape, n_cols).astype(self.state.dtype).astype(
        dtype or self.dtype)


@dataclasses.dataclass(frozen=True)
class Quantized8bit(QuantizedArray):
  """An LLM.int8() weight: bitsandbytes' ``Int8Params`` ``CB`` (int8 ``(out, in)``) and ``SCB``
  (float32 ``(out,)``, the absmax of each output feature's row).

  ``threshold`` (static) is the activation outlier threshold used in matmuls.
  """

  CB: jax.Array
  SCB: jax.Array
  shape: tuple[int, ...] = ()
  dtype: Any = np.dtype(np.float32)
  transposed: bool = True
  n_in: int = 1
  threshold: float = 6.0

  def dequantize_matrix(self, dtype=None) -> jax.Array:
    # bnb: CB * (SCB / 127), in float32.
    w = self.CB.astype(jnp.float32) * (self.SCB[:, None] * jnp.float32(1 / 127))
    return w.astype(dtype or self.dtype)

  def dequantize_rows(self, rows: jax.Array, dtype=None) -> jax.Array:
    """Rows ``W[rows]`` of the ``(out, in)`` matrix: int ``(...)`` -> ``(..., in)``."""
    w = self.CB[rows].astype(jnp.float32) * (self.SCB[rows][..., None] * jnp.float32(1 / 127))
    return w.astype(dtype or self.dtype)


for _cls, _data in ((Quantized4bit, ["packed", "state"]), (Quantized8bit, ["CB", "SCB"])):
  jax.tree_util.register_dataclass(
      _cls, data_fields=_data,
      meta_fields=[f.name for f in dataclasses.fields(_cls) if f.name not in _data])


def is_quantized(x) -> bool:
  return isinstance(x, QuantizedArray)


def quantize_4bit_array(x: jax.Array, *, transposed: bool, n_in: int = 1, blocksize: int = 64,
                        quant_type: str = "nf4", compress_statistics: bool = False,
                        quant_storage=jnp.uint8, compute_dtype=jnp.float32,
                        n_stack: int = 0) -> Quantized4bit:
  """Quantize a logical array (e.g. a Flax kernel) to a :class:`Quantized4bit` leaf.

  ``n_stack`` leading axes of ``x`` index separate weights (scanned layers, experts): each
  slice is quantized exactly as if it stood alone, and every array of the leaf carries them.
  """
  def one(x):
    packed, state = _fourbit.quantize_4bit(
        layout.to_matrix(x, transposed, n_in), blocksize=blocksize, quant_type=quant_type,
        compress_statistics=compress_statistics, quant_storage=quant_storage)
    return Quantized4bit(packed=packed, state=state, shape=tuple(x.shape),
                         dtype=np.dtype(x.dtype), transposed=transposed, n_in=n_in,
                         compute_dtype=np.dtype(compute_dtype))
  return _quantize(one, jnp.asarray(x), n_stack)


def _quantize(one, x, n_stack: int):
  """``one`` on each slice of ``x`` (see :func:`jaxbnb.layout.map_slices`); under an Explicit
  mesh, the leaf is sharded as :func:`jaxbnb.layout.quantized_specs` says."""
  _check_stack(x, n_stack)
  run = lambda x: layout.map_slices(one, n_stack, x, one_by_one=True)
  specs = lambda mesh, out: layout.quantized_specs(out, _explicit.spec_of(x, x.ndim), mesh)
  return _explicit.call(run, (x,), specs)


def _check_stack(x, n_stack: int) -> None:
  if not isinstance(n_stack, int) or n_stack < 0 or (n_stack and x.ndim - n_stack < 2):
    raise ValueError(f"n_stack={n_stack!r} leading stack axes leave a weight of rank "
                     f"{x.ndim - n_stack if isinstance(n_stack, int) else '?'} in an array of "
                     f"shape {x.shape}; each slice must be a weight of rank >= 2")


def quantize_8bit_array(x: jax.Array, *, transposed: bool, n_in: int = 1,
                        threshold: float = 6.0, n_stack: int = 0) -> Quantized8bit:
  """Quantize a logical array to a :class:`Quantized8bit` leaf (row-wise int8, bnb's CB/SCB).

  Like bnb's ``Int8Params``, a float32/float16 weight is rounded to float16 first, except
  values past float16's range, which keep their float32 value (bnb's copy would be inf, its row
  NaN); bfloat16 weights are quantized from their own values
  (:func:`jaxbnb.functional.int8.int8_weight_quant`). ``n_stack``: as in
  :func:`quantize_4bit_array`.
  """
  def one(x):
    cb, scb = _int8.int8_weight_quant(layout.to_matrix(x, transposed, n_in))
    return Quantized8bit(CB=cb, SCB=scb, shape=tuple(x.shape), dtype=np.dtype(x.dtype),
                         transposed=transposed, n_in=n_in, threshold=float(threshold))
  return _quantize(one, jnp.asarray(x), n_stack)
