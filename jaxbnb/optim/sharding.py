"""Shardings of low-bit optimizer state that follow the parameters' (for ``jit``'s
``out_shardings`` under an Auto mesh, where a traced ``init`` cannot see its inputs' shardings).

Under an Explicit mesh, or when ``init`` runs eagerly on sharded arrays, the states of
``jaxbnb.optim`` come out sharded like their parameters by themselves; a ``jax.jit(tx.init)``
under an Auto mesh puts its outputs wherever XLA chooses (one device), as for any optax
optimizer. :func:`state_shardings` gives the shardings to ask for instead.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxbnb import _explicit
from jaxbnb.optim.quantize_state import QuantizedLeaf, _leaf_spec, _owner
from jaxbnb.optim import transforms as _t


def _param_spec(x) -> tuple:
  """``x``'s PartitionSpec padded to its ndim: from its NamedSharding (an array or a
  ShapeDtypeStruct), else from its type (Explicit mesh), else replicated."""
  ndim = len(getattr(x, "shape", ()))
  sharding = getattr(x, "sharding", None)
  if isinstance(sharding, NamedSharding):
    spec = tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))
  return _explicit.spec_of(x, ndim)


def _mesh_of(params) -> Optional[Any]:
  for x in jax.tree.leaves(params):
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  return _explicit.explicit_mesh(params)


def state_specs(state: Any, params: Any, mesh) -> Any:
  """PartitionSpecs for ``state`` (an optimizer state of ``params``, arrays or
  ShapeDtypeStructs) that shard every moment like its parameter.

  A flat tuple with one moment per parameter leaf (the states of ``jaxbnb.optim``'s 8-bit and
  4-bit transforms) is matched leaf by leaf in order; any other array, or
  :class:`~jaxbnb.optim.QuantizedLeaf` (``quantize_state``), follows the parameter whose path
  ends its path and whose shape it has (optax's states mirror the params); the rest is
  replicated.
  """
  p_flat = jax.tree_util.tree_flatten_with_path(params)[0]
  p_leaves = [x for _, x in p_flat]
  p_paths = [tuple(path) for path, _ in p_flat]
  p_shapes = [tuple(x.shape) for x in p_leaves]
  p_specs = [_param_spec(x) for x in p_leaves]
  n = len(p_leaves)

  def is_field(x):
    if not (type(x) is tuple and len(x) == n and n):  # noqa: E721 - not a NamedTuple
      return False
    return all(_t._is_moment(m) or (hasattr(m, "shape") and tuple(m.shape) == s)
               for m, s in zip(x, p_shapes))

  is_leaf = lambda x: is_field(x) or _t._is_moment(x) or isinstance(x, QuantizedLeaf)

  def spec(path, x):
    if is_field(x):
      return tuple(_t._moment_spec(mesh, g, m, s) for g, m, s in zip(p_leaves, x, p_specs))
    shape = tuple(x.shape) if hasattr(x, "shape") else ()
    owner = _owner(tuple(path), shape, p_paths, p_shapes) if shape else None
    if isinstance(x, QuantizedLeaf):
      if owner is None:
        return jax.tree.map(lambda a: P(*(None,) * a.ndim), x)
      return _leaf_spec(mesh, p_leaves[owner], x, p_specs[owner])
    if _t._is_moment(x):  # a moment outside a flat field: its parameter by shape and path
      if owner is None:
        return jax.tree.map(lambda a: P(*(None,) * len(a.shape)), x)
      return _t._moment_spec(mesh, p_leaves[owner], x, p_specs[owner])
    if owner is not None:
      return P(*p_specs[owner])
    return P(*(None,) * len(shape))

  return jax.tree_util.tree_map_with_path(spec, state, is_leaf=is_leaf)


def state_shardings(tx, params: Any) -> Any:
  """NamedShardings for ``tx.init(params)`` that shard each moment like its parameter.

  Args:
    tx: an optax ``GradientTransformation`` (``jaxbnb.optim``'s, ``quantize_state(...)``, or
      any optax optimizer).
    params: the parameters, as arrays or ShapeDtypeStructs with NamedShardings.

  Returns:
    A tree of NamedShardings with the structure of ``tx.init(params)``: e.g.
    ``jax.jit(tx.init, out_shardings=state_shardings(tx, params))(params)``.
  """
  mesh = _mesh_of(params)
  if mesh is None:
    raise ValueError("state_shardings: no parameter has a NamedSharding; put them on a mesh "
                     "first (jax.device_put(x, NamedSharding(mesh, spec))) or pass "
                     "ShapeDtypeStructs with sharding=")
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  state = jax.eval_shape(tx.init, abstract)
  specs = state_specs(state, params, mesh)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))
