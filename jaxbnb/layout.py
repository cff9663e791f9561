"""Where a quantized leaf's numbers live: its matrix layout, its stack axes and its sharding.

A quantized leaf (:mod:`jaxbnb.qtensor`) holds, for each weight, a 2-D matrix ``W`` in
bitsandbytes' ``(out, in)`` row-major layout, and it describes the *logical* array it stands for:

* a Flax kernel ``(in..., out...)`` is ``W.T`` reshaped (``transposed=True``, ``n_in`` leading
  input axes); a torch-style weight ``(out, in...)`` or an embedding table ``(vocab, dim)`` is
  ``W`` reshaped (``transposed=False``);
* a *stacked* leaf holds one such matrix per slice of ``stack_shape`` leading axes (scanned
  layers, MoE experts): every array of the leaf carries those axes first, so ``lax.scan``,
  ``vmap`` and indexing slice the packed weight like the float array it replaces. The leaf's
  static ``shape`` is one slice's; the logical array is ``stack_shape + shape``.

Sharding (JAX's Explicit mode, see :mod:`jaxbnb._explicit`): a stack axis keeps the mesh axes
of the logical array's stack axis (FSDP or pipeline over layers, experts over devices); inside a
slice, packed streams are split in runs of whole matrix rows (the weight's output features),
block statistics follow when no block straddles a device boundary, and small constants are
replicated. These rules live here and nowhere else.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxbnb import _explicit

AxisSpec = _explicit.AxisSpec


# --- matrix layout of one slice ------------------------------------------------------------------


def matrix_shape(shape: tuple[int, ...], transposed: bool, n_in: int) -> tuple[int, int]:
  """``(out, in)`` of the bnb matrix behind one slice's logical array of ``shape``."""
  if transposed:
    return math.prod(shape[n_in:]), math.prod(shape[:n_in])
  return shape[0], math.prod(shape[1:])


def to_matrix(x: jax.Array, transposed: bool, n_in: int) -> jax.Array:
  """One slice's logical array -> its ``(out, in)`` matrix."""
  rows, cols = matrix_shape(x.shape, transposed, n_in)
  return x.reshape(cols, rows).T if transposed else x.reshape(rows, cols)


def from_matrix(w: jax.Array, shape: tuple[int, ...], transposed: bool) -> jax.Array:
  """The inverse of :func:`to_matrix`."""
  return w.T.reshape(shape) if transposed else w.reshape(shape)


def io_axes(ndim: int, transposed: bool, n_in: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(output axes, input axes) of one slice's logical array of rank ``ndim``."""
  if transposed:
    return tuple(range(n_in, ndim)), tuple(range(n_in))
  return (0,), tuple(range(1, ndim))


# --- stack axes ------------------------------------------------------------------------------------


def stack_shape(leaf) -> tuple[int, ...]:
  """Leading stack axes of a quantized leaf: the axes its main array (``packed`` / ``CB``,
  2-D per slice) has beyond one slice's. ``()`` for a single weight, and for a leaf whose
  arrays are not arrays (a tree of specs or masks shaped like the leaf)."""
  main = leaf.packed if hasattr(leaf, "packed") else leaf.CB
  shape = getattr(main, "shape", None)
  return () if shape is None else tuple(shape[:len(shape) - 2])


def map_slices(fn, n_stack: int, *args, one_by_one: bool = False):
  """``fn`` applied to each slice over ``n_stack`` leading axes of every array of ``args``
  (pytrees); results stacked the same way, by ``vmap``.

  ``one_by_one`` (quantization): concrete arrays are sliced and run one slice at a time, each
  through exactly the computation that quantizes a lone weight, then stacked. A slice's bits
  then cannot depend on how XLA fuses a batched or looped program (a ``lax.map`` body was seen
  to contract the double-quantization offset into an FMA: 1 ulp off the lone weight's absmax).
  """
  if n_stack == 0:
    return fn(*args)
  leaves = jax.tree.leaves(args)
  if one_by_one and not any(isinstance(a, jax.core.Tracer) for a in leaves):
    lead = leaves[0].shape[:n_stack]
    outs = [fn(*jax.tree.map(lambda a, i=i: a[i], args)) for i in np.ndindex(*lead)]
    return jax.tree.map(lambda *s: jnp.stack(s).reshape(*lead, *s[0].shape), *outs)
  for _ in range(n_stack):
    fn = jax.vmap(fn)
  return fn(*args)


# --- sharding rules --------------------------------------------------------------------------------


def slice_matrix_specs(spec: tuple[AxisSpec, ...], shape: tuple[int, ...], transposed: bool,
                       n_in: int, mesh) -> tuple[AxisSpec, AxisSpec]:
  """Mesh axes of the ``(out, in)`` matrix's rows and columns, from the PartitionSpec entries
  ``spec`` of one slice's logical array of ``shape`` (None where a flattening would not keep
  each device's part contiguous)."""
  outs, ins = io_axes(len(shape), transposed, n_in)
  n_rows, n_cols = matrix_shape(shape, transposed, n_in)
  rows, cols = _explicit.leading(spec, outs), _explicit.leading(spec, ins)
  rows = rows if n_rows % _explicit.axes_size(mesh, rows) == 0 else None
  cols = cols if n_cols % _explicit.axes_size(mesh, cols) == 0 else None
  return rows, cols


def quantized_specs(leaf, x_spec: tuple[AxisSpec, ...], mesh) -> Any:
  """PartitionSpec tree for ``leaf`` quantized from a logical array sharded as ``x_spec``
  (stack axes first): stack axes keep their mesh axes, each slice's packed streams are split
  by the slice's output rows."""
  n_stack = len(stack_shape(leaf))
  stack, inner = tuple(x_spec[:n_stack]), tuple(x_spec[n_stack:])
  rows, cols = slice_matrix_specs(inner, leaf.shape, leaf.transposed, leaf.n_in, mesh)
  n_rows, n_cols = leaf.matrix_shape

  def stream(length, per):
    return _explicit.stream(mesh, rows, n_rows, n_cols, length, per)

  def spec(path, a):
    name = jax.tree_util.keystr(path)
    length = a.shape[n_stack] if a.ndim > n_stack else 0
    if name == ".CB":
      tail = (rows, cols)
    elif name == ".SCB":
      tail = (rows,)
    elif name == ".packed":
      tail = (stream(length, 2 * a.dtype.itemsize), None)
    elif name == ".state.absmax":
      tail = (stream(length, leaf.state.blocksize),)
    elif name == ".state.state2.absmax":
      tail = (stream(length, leaf.state.blocksize * leaf.state.state2.blocksize),)
    else:
      tail = (None,) * (a.ndim - n_stack)
    return P(*stack, *tail)
  return jax.tree_util.tree_map_with_path(spec, leaf)


def matrix_specs(leaf) -> tuple[AxisSpec, AxisSpec]:
  """Mesh axes holding one slice's ``(out, in)`` matrix rows and columns (None: replicated)."""
  n_stack = len(stack_shape(leaf))
  if hasattr(leaf, "CB"):
    return _explicit.spec_of(leaf.CB, n_stack + 2)[n_stack:]
  return _explicit.spec_of(leaf.packed, n_stack + 2)[n_stack], None


def stack_spec(leaf) -> tuple[AxisSpec, ...]:
  """Mesh axes of a leaf's stack axes (read from its main array)."""
  n_stack = len(stack_shape(leaf))
  main = leaf.packed if hasattr(leaf, "packed") else leaf.CB
  return _explicit.spec_of(main, n_stack + 2)[:n_stack]


def logical_spec(leaf, mesh) -> P:
  """PartitionSpec of the logical array (stack axes first) that the leaf's shards hold whole:
  what :meth:`~jaxbnb.QuantizedArray.dequantize` gives back."""
  spec = [None] * len(leaf.shape)
  outs, ins = io_axes(len(leaf.shape), leaf.transposed, leaf.n_in)
  for axes, entry in zip((outs, ins), matrix_specs(leaf)):
    if (axes and entry is not None
        and leaf.shape[axes[0]] % _explicit.axes_size(mesh, entry) == 0):
      spec[axes[0]] = entry
  return P(*stack_spec(leaf), *spec)
