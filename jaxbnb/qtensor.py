"""Quantized leaves: the packed weights that replace float arrays in a params pytree.

Each leaf stores a 2-D matrix ``W`` in bitsandbytes' ``(out, in)`` row-major layout (so bnb
checkpoints load without re-quantization) and remembers how to give back the original array
(its *logical* view): a Flax kernel ``(in..., out...)`` is ``W.T`` reshaped
(``transposed=True``, ``n_in`` leading input axes); an embedding table ``(vocab, dim)`` or a
torch-style weight ``(out, in...)`` is ``W`` reshaped (``transposed=False``).

Arrays are pytree leaves; everything else is static aux data, so leaves pass through
``jax.jit``, sharding and Orbax like the arrays they replace.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxbnb import _explicit
from jaxbnb.functional import QuantState
from jaxbnb.functional import fourbit as _fourbit
from jaxbnb.functional import int8 as _int8
from jaxbnb.functional.blockwise import unnest_absmax


def _matrix_shape(shape: tuple[int, ...], transposed: bool, n_in: int) -> tuple[int, int]:
  """(out, in) of the bnb matrix behind a logical array of ``shape``."""
  if transposed:
    return math.prod(shape[n_in:]), math.prod(shape[:n_in])
  return shape[0], math.prod(shape[1:])


def _to_matrix(x: jax.Array, transposed: bool, n_in: int) -> jax.Array:
  rows, cols = _matrix_shape(x.shape, transposed, n_in)
  return x.reshape(cols, rows).T if transposed else x.reshape(rows, cols)


def _from_matrix(w: jax.Array, shape, transposed: bool) -> jax.Array:
  return w.T.reshape(shape) if transposed else w.reshape(shape)


def _axes(ndim: int, transposed: bool, n_in: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(output axes, input axes) of a logical array."""
  if transposed:
    return tuple(range(n_in, ndim)), tuple(range(n_in))
  return (0,), tuple(range(1, ndim))


def _matrix_specs(x, transposed: bool, n_in: int, mesh) -> tuple[Any, Any]:
  """Mesh axes of the ``(out, in)`` matrix's rows and columns, from a logical array ``x``'s
  sharding (None where a flattening would not keep each device's slice contiguous)."""
  spec = _explicit.spec_of(x, x.ndim)
  outs, ins = _axes(x.ndim, transposed, n_in)
  n_rows, n_cols = _matrix_shape(x.shape, transposed, n_in)
  rows, cols = _explicit.leading(spec, outs), _explicit.leading(spec, ins)
  rows = rows if n_rows % _explicit.axes_size(mesh, rows) == 0 else None
  cols = cols if n_cols % _explicit.axes_size(mesh, cols) == 0 else None
  return rows, cols


def _quantized_specs(q: "QuantizedArray", rows, cols, mesh):
  """PartitionSpec tree for a quantized leaf whose matrix rows (columns) live on ``rows``
  (``cols``): packed streams are split in runs of whole rows; block statistics follow when
  their blocks do not straddle a device boundary; small constants are replicated."""
  n_rows, n_cols = q.matrix_shape

  def spec(path, leaf):
    name = jax.tree_util.keystr(path)
    if name == ".CB":
      return P(rows, cols)
    if name == ".SCB":
      return P(rows)
    if name == ".packed":
      per = 2 * leaf.dtype.itemsize
      return P(_explicit.stream(mesh, rows, n_rows, n_cols, leaf.shape[0], per), None)
    if name == ".state.absmax":
      return P(_explicit.stream(mesh, rows, n_rows, n_cols, leaf.shape[0],
                                q.state.blocksize))
    if name == ".state.state2.absmax":
      return P(_explicit.stream(mesh, rows, n_rows, n_cols, leaf.shape[0],
                                q.state.blocksize * q.state.state2.blocksize))
    return P(*(None,) * leaf.ndim)
  return jax.tree_util.tree_map_with_path(spec, q)


class QuantizedArray:
  """Common interface of quantized leaves (array-like metadata, dequantize)."""

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
  def nbytes(self) -> int:
    """Bytes actually held (packed data and every quantization constant)."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(self))

  @property
  def matrix_shape(self) -> tuple[int, int]:
    """``(out, in)`` of the stored bnb-layout matrix."""
    return _matrix_shape(self.shape, self.transposed, self.n_in)

  def dequantize(self, dtype=None) -> jax.Array:
    """The logical array (original shape), in ``dtype`` (default: the original dtype)."""
    run = lambda q: _from_matrix(q.dequantize_matrix(dtype), q.shape, q.transposed)
    return _explicit.call(run, (self,), lambda mesh, _: self.logical_spec(mesh))

  def matrix_specs(self, mesh) -> tuple[Any, Any]:
    """Mesh axes holding the ``(out, in)`` matrix's rows and columns (None: replicated)."""
    if isinstance(self, Quantized8bit):
      return _explicit.spec_of(self.CB, 2)
    return _explicit.spec_of(self.packed, 2)[0], None

  def logical_spec(self, mesh) -> P:
    """The PartitionSpec of the logical array that corresponds to :meth:`matrix_specs`."""
    spec = [None] * self.ndim
    outs, ins = _axes(self.ndim, self.transposed, self.n_in)
    for axes, entry in zip((outs, ins), self.matrix_specs(mesh)):
      if axes and entry is not None and self.shape[axes[0]] % _explicit.axes_size(mesh, entry) == 0:
        spec[axes[0]] = entry
    return P(*spec)

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
                        quant_storage=jnp.uint8, compute_dtype=jnp.float32) -> Quantized4bit:
  """Quantize a logical array (e.g. a Flax kernel) to a :class:`Quantized4bit` leaf."""
  def run(x):
    packed, state = _fourbit.quantize_4bit(
        _to_matrix(x, transposed, n_in), blocksize=blocksize, quant_type=quant_type,
        compress_statistics=compress_statistics, quant_storage=quant_storage)
    return Quantized4bit(packed=packed, state=state, shape=tuple(x.shape),
                         dtype=np.dtype(x.dtype), transposed=transposed, n_in=n_in,
                         compute_dtype=np.dtype(compute_dtype))
  return _quantize_sharded(run, jnp.asarray(x), transposed, n_in)


def _quantize_sharded(run, x, transposed: bool, n_in: int):
  """``run(x)``; under an Explicit mesh, its packed streams sharded by ``x``'s output rows."""
  def specs(mesh, out):
    rows, cols = _matrix_specs(x, transposed, n_in, mesh)
    return _quantized_specs(out, rows, cols, mesh)
  return _explicit.call(run, (x,), specs)


def quantize_8bit_array(x: jax.Array, *, transposed: bool, n_in: int = 1,
                        threshold: float = 6.0) -> Quantized8bit:
  """Quantize a logical array to a :class:`Quantized8bit` leaf (row-wise int8, bnb's CB/SCB).

  Like bnb's ``Int8Params``, a float32/float16 weight is rounded to float16 first; bfloat16
  weights are quantized from their own values (float16 could overflow them).
  """
  def run(x):
    w = _to_matrix(x, transposed, n_in)
    if w.dtype != jnp.bfloat16:
      w = w.astype(jnp.float16)
    cb, scb, _ = _int8.int8_vectorwise_quant(w)
    return Quantized8bit(CB=cb, SCB=scb, shape=tuple(x.shape), dtype=np.dtype(x.dtype),
                         transposed=transposed, n_in=n_in, threshold=float(threshold))
  return _quantize_sharded(run, jnp.asarray(x), transposed, n_in)
