"""JAX's Explicit sharding mode (``jax.make_mesh``'s default axis type).

In Explicit mode every op must know its output sharding from its inputs' types, and the
blockwise formats reshape and flatten ``(out, in)`` matrices into byte and block streams,
which Explicit mode refuses. Each public entry point therefore runs its body with the mesh's
Explicit axes switched to Auto (XLA chooses the intermediate layouts, as under an Auto mesh)
and reshards the results to the spec a dense op would give: the rows of a packed stream stay
where the weight's output-feature shards were, so quantizing an FSDP-sharded model never
gathers it onto one device.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
from jax.sharding import PartitionSpec as P

AxisSpec = Any  # one entry of a PartitionSpec: None, a mesh axis name or a tuple of names


def explicit_mesh(*trees) -> Optional[jax.sharding.AbstractMesh]:
  """The mesh with Explicit axes that an array of ``trees`` (or the context) is typed on."""
  for a in jax.tree.leaves(trees):
    try:
      sharding = jax.typeof(a).sharding
    except TypeError:
      continue
    mesh = getattr(sharding, "mesh", None)
    if mesh is not None and not mesh.empty and mesh.explicit_axes:
      return mesh
  ctx = jax.sharding.get_abstract_mesh()
  if not ctx.empty and ctx.explicit_axes:
    return ctx
  return None


def call(fn: Callable, args: tuple, out_specs: Callable[[Any, Any], Any]) -> Any:
  """``fn(*args)``; under an Explicit mesh, computed with Auto axes and resharded to
  ``out_specs(mesh, out)``: a PartitionSpec tree for ``fn``'s output ``out`` (given as
  ShapeDtypeStructs)."""
  mesh = explicit_mesh(args)
  if mesh is None:
    return fn(*args)
  # Shapes from unsharded stand-ins: tracing fn on the Explicit-typed args is what fails.
  plain = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
                       if hasattr(a, "shape") else a, args)
  specs = out_specs(mesh, jax.eval_shape(fn, *plain))
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.sharding.auto_axes(fn, axes=mesh.explicit_axes, out_sharding=specs)(*args)


def spec_of(x, ndim: int) -> tuple[AxisSpec, ...]:
  """``x``'s PartitionSpec padded to ``ndim`` entries (all None when untyped)."""
  try:
    spec = tuple(jax.typeof(x).sharding.spec)
  except (TypeError, AttributeError):
    spec = ()
  return spec + (None,) * (ndim - len(spec))


def axes_size(mesh, entry: AxisSpec) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[n] for n in names)


def leading(spec: tuple[AxisSpec, ...], axes: tuple[int, ...]) -> AxisSpec:
  """Mesh axes of a row-major flattening of ``axes``: the first axis's, if no later axis is
  sharded (a sharded later axis would make each device's rows non-contiguous)."""
  if not axes or any(spec[a] is not None for a in axes[1:]):
    return None
  return spec[axes[0]]


def stream(mesh, rows: AxisSpec, n_rows: int, n_cols: int, length: int,
           per_entry: int) -> AxisSpec:
  """Spec of axis 0 of a row-major stream over an ``(n_rows, n_cols)`` matrix in which each
  of ``length`` entries covers ``per_entry`` elements: ``rows`` when every device's run of
  whole rows is a whole number of entries, else None (replicated)."""
  k = axes_size(mesh, rows)
  if rows is None or n_rows % k or length * per_entry != n_rows * n_cols:
    return None
  return rows if ((n_rows // k) * n_cols) % per_entry == 0 else None
