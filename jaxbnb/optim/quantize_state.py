"""``quantize_state(tx)``: any optax optimizer with its moments stored in 8 or 4 bits.

Between steps, every floating-point leaf of ``tx``'s state that has the shape of a parameter leaf
(and at least ``min_size`` elements) is a :class:`QuantizedLeaf`: blocks of ``block_size``
elements of the flattened leaf, one float32 absmax per block, codes of ``bits`` bits (two per byte
at 4 bits). Counters, scalars, factored statistics and small leaves stay as they are. ``update``
dequantizes them, runs ``tx.update`` on float32 values, and quantizes the new state, all inside
the caller's jit.

The map is chosen per block, from its contents at each write: a block holding a negative value
uses the signed map (8 bits: bitsandbytes' signed dynamic map; 4 bits: the dynamic-exponent map
of Li et al. 2023), a non-negative block the unsigned one (8 bits: bitsandbytes' unsigned dynamic
map; 4 bits: the linear map without zero, ``(k + 1) / 16``). So second moments (Adam's ``nu``,
Adafactor's unfactored ``v``, AdaGrad's sums) never round to 0, the zero-point problem that makes
``m / sqrt(v)`` explode at 4 bits, and sign-carrying moments keep an exact zero, with no need to
know which leaf is which.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxbnb import _explicit
from jaxbnb.functional import _checks
from jaxbnb.functional import blockwise as _bw
from jaxbnb.functional.codebooks import _dynamic_map_np
from jaxbnb.optim import _blocks
from jaxbnb.optim import fourbit_state as _fb
from jaxbnb.optim.transforms import _auto_context

_F32_MAX = float(np.finfo(np.float32).max)
_BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass(frozen=True)
class QuantizedLeaf:
  """One optimizer-state leaf stored in ``bits`` bits by :func:`quantize_state`.

  Attributes:
    q: uint8 ``(*blocks, block_size * bits // 8)``: codes (two per byte at 4 bits, high nibble
      first).
    absmax: float32 ``blocks``: ``(nblocks,)``, or for a stack of matrices whose slices are
      whole blocks ``(*shape[:k], blocks per slice)`` (``jaxbnb.optim._blocks.blocks_shape``).
    signed: bool ``blocks``: the block uses the signed map (it held a negative value).
    bits: 8 or 4 (static). block_size: elements per block (static).
    shape, dtype: the original leaf's (static).
  """

  q: jax.Array
  absmax: jax.Array
  signed: jax.Array
  bits: int = 8
  block_size: int = 256
  shape: tuple = ()
  dtype: Any = np.dtype(np.float32)

  @property
  def nbytes(self) -> int:
    return int(self.q.nbytes + self.absmax.nbytes + self.signed.nbytes)


jax.tree_util.register_dataclass(QuantizedLeaf, data_fields=["q", "absmax", "signed"],
                                 meta_fields=["bits", "block_size", "shape", "dtype"])


def _table(bits: int) -> jax.Array:
  """float32 codes: the unsigned map at ``[0, 2**bits)``, the signed one after it."""
  if bits == 8:
    return jnp.asarray(np.concatenate([_dynamic_map_np(False, 7, 8), _dynamic_map_np(True, 7, 8)]))
  return jnp.asarray(np.concatenate([_fb.LINEAR_4BIT, _fb.SIGNED_4BIT]))


def _decode_blocks(q: jax.Array, absmax: jax.Array, signed: jax.Array, bits: int) -> jax.Array:
  """float32 ``(*rows, block_size)`` of codes ``q`` (*rows, ...) and per-row absmax and map."""
  codes = (_fb.unpack(q) if bits == 4 else q).astype(jnp.int32)
  idx = codes + jnp.where(signed, 1 << bits, 0)[..., None]
  return _table(bits).at[idx].get(mode="promise_in_bounds") * absmax[..., None]


def _encode_blocks(new: jax.Array, bits: int, valid) -> tuple[jax.Array, ...]:
  """``(q, absmax, signed)`` of float32 blocks ``(rows, block_size)``."""
  new = jnp.clip(jnp.nan_to_num(new, nan=0.0), -_F32_MAX, _F32_MAX)
  if valid is not None:
    new = jnp.where(valid, new, 0.0)
  absmax = jnp.max(jnp.abs(new), axis=1)
  signed = jnp.any(new < 0, axis=1)
  x = _fb.scaled(new, absmax[:, None])
  if bits == 8:
    q = jnp.where(signed[:, None], _bw.nearest_dynamic(x, True), _bw.nearest_dynamic(x, False))
  else:
    q = _fb.pack(jnp.where(signed[:, None], _fb.encode(x, True), _fb.encode(x, False)))
  return q, absmax, signed


def dequantize_leaf(x: QuantizedLeaf) -> jax.Array:
  """The leaf's values (its original dtype and shape): elementwise, fuses into consumers."""
  n = math.prod(x.shape)
  values = _decode_blocks(x.q, x.absmax, x.signed, x.bits)
  if values.size != n:  # a padded last block (else a reshape keeps the carried leading axes)
    values = values.reshape(-1)[:n]
  return values.reshape(x.shape).astype(x.dtype)


def quantize_leaf(value: jax.Array, like: Optional[QuantizedLeaf] = None, *, bits: int = 8,
                  block_size: int = 256) -> QuantizedLeaf:
  """``value`` stored as a :class:`QuantizedLeaf` (into ``like``'s buffers, in place, when
  given), chunk by chunk (``map_blocks``): temporaries stay a few MiB whatever the size."""
  if like is not None:
    bits, block_size = like.bits, like.block_size
  if like is None:  # placed like a concrete sharded value (jaxbnb.optim._blocks.place)
    zeros = functools.partial(_blocks.zeros_blocks, value, block_size)
    like = QuantizedLeaf(zeros((block_size * bits // 8,), jnp.uint8), zeros(),
                         zeros(dtype=jnp.bool_), bits, block_size, tuple(value.shape),
                         np.dtype(value.dtype))

  def chunk(valid, xb, *_):
    return [], list(_encode_blocks(xb.astype(jnp.float32), bits, valid))

  _, (q, absmax, signed) = _blocks.map_grouped(chunk, [value.reshape(-1)], [],
                                               _flat_blocks(like), block_size)
  return _unflat_blocks(like, q, absmax, signed)


def _flat_blocks(x: QuantizedLeaf) -> list[jax.Array]:
  """``[q (nblocks, bytes), absmax (nblocks,), signed (nblocks,)]``: the loop's view."""
  return [x.q.reshape(-1, x.q.shape[-1]), x.absmax.reshape(-1), x.signed.reshape(-1)]


def _unflat_blocks(like: QuantizedLeaf, q, absmax, signed) -> QuantizedLeaf:
  return QuantizedLeaf(q.reshape(like.q.shape), absmax.reshape(like.absmax.shape),
                       signed.reshape(like.signed.shape), like.bits, like.block_size,
                       like.shape, like.dtype)


def _is_q(x) -> bool:
  return isinstance(x, QuantizedLeaf)


def quantize_state(tx: optax.GradientTransformation, bits: int = 8,
                   block_size: Optional[int] = None, *, min_size: int = 4096,
                   should_quantize: Optional[Callable[[Any, jax.Array], bool]] = None,
                   lean: bool = True) -> optax.GradientTransformation:
  """``tx`` with its moment leaves stored in ``bits`` bits between steps (module docstring).

  Args:
    tx: any optax ``GradientTransformation`` (a chain, a contrib optimizer, ...).
    bits: 8 or 4.
    block_size: elements per block (default 256 at 8 bits, 128 at 4 bits).
    min_size: leaves with fewer elements stay as they are.
    should_quantize: optional ``(path, leaf) -> bool`` to narrow the choice further (e.g. keep
      ``optax.contrib.prodigy``'s ``params0`` exact); called on the candidate leaves only.
    lean: when ``tx`` is elementwise leaf by leaf (checked on its jaxpr: Adam, Lion, SGD with
      momentum, RMSProp, ...), compute the new quantized leaves chunk by chunk, one parameter
      leaf at a time, so the step's temporaries stay a few MiB; otherwise (Adafactor, Muon,
      Prodigy, clipping by global norm, ...) or with ``lean=False`` the new state exists in
      float32 during the step.

  Returns:
    A ``GradientTransformation`` whose state is ``tx``'s with :class:`QuantizedLeaf` in place of
    the chosen leaves; ``update`` gives ``tx``'s updates computed from the dequantized state.
  """
  if bits not in (8, 4):
    raise ValueError(f"quantize_state: bits must be 8 or 4; got {bits!r}")
  if block_size is None:
    block_size = 256 if bits == 8 else 128
  block_size = _checks.check_blocksize(block_size, _BLOCKS, f"quantize_state({bits}-bit)")
  if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
    raise ValueError(f"quantize_state: min_size must be an int >= 0; got {min_size!r}")

  def init_fn(params):
    state = tx.init(params)
    shapes = {tuple(jnp.shape(p)) for p in jax.tree.leaves(params)}

    def pick(path, x):
      if (isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating)
          and tuple(x.shape) in shapes and x.size >= max(min_size, 1)
          and (should_quantize is None or should_quantize(path, x))):
        x = jnp.asarray(x)
        # Under an Explicit mesh: blocks formed with Auto axes, then sharded like the leaf.
        return _explicit.call(
            _auto_context(functools.partial(quantize_leaf, bits=bits, block_size=block_size)),
            (x,), lambda mesh, out: _leaf_spec(mesh, x, out))
      return x
    return jax.tree_util.tree_map_with_path(pick, state)

  def update_fn(updates, state, params=None):
    # Under an Explicit mesh the step runs with Auto axes and every output keeps its input's
    # sharding (the state's structure and shapes do not change from step to step).
    def specs(mesh, out):
      del mesh, out
      spec = lambda x: P(*_explicit.spec_of(x, np.ndim(x)))
      return jax.tree.map(spec, updates), jax.tree.map(spec, state)
    return _explicit.call(_auto_context(raw_update), (updates, state, params), specs)

  def raw_update(updates, state, params=None):
    inner = jax.tree.map(lambda x: dequantize_leaf(x) if _is_q(x) else x, state, is_leaf=_is_q)
    # The updates come from the whole-tree call on the dequantized state: elementwise, they fuse
    # into their consumer. Its new state is used where no chunked update replaces it (XLA drops
    # the rest).
    new_updates, new_inner = tx.update(updates, inner, params)
    flat_old, treedef = jax.tree.flatten(state, is_leaf=_is_q)
    flat_new = treedef.flatten_up_to(new_inner)
    plan = _lean_plan(tx, updates, state, inner, params) if lean else None
    if plan is not None:
      flat_new = _chunked_update(tx, plan, updates, state, inner, params, flat_new)
    out = []
    for old, new in zip(flat_old, flat_new):
      out.append(quantize_leaf(new, old) if _is_q(old) and not _is_q(new) else new)
    return new_updates, treedef.unflatten(out)

  return optax.GradientTransformation(init_fn, update_fn)


def _leaf_spec(mesh, x: jax.Array, like: QuantizedLeaf, spec=None) -> QuantizedLeaf:
  """PartitionSpecs of the quantized ``x``: its blocks follow ``x``'s shards (``spec``, default
  ``x``'s type's; ``jaxbnb.optim._blocks.block_spec``)."""
  spec = _explicit.spec_of(x, x.ndim) if spec is None else spec
  blocks = _blocks.block_spec(mesh, x.shape, spec, like.block_size)
  return dataclasses.replace(like, q=P(*blocks, None), absmax=P(*blocks), signed=P(*blocks))


# --- the lean path: elementwise optimizers updated leaf by leaf, chunk by chunk ---------------

# Primitives that act elementwise (lax's, as jnp lowers to them).
_ELEMENTWISE = frozenset("""
abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp convert_element_type copy
copy_p cos cosh div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag integer_pow is_finite le
log log1p logistic lt max min mul ne neg nextafter not or pow real reduce_precision rem round
rsqrt select_n sign sin sinh sqrt square stop_gradient sub tan tanh xor
""".split())
_CALLS = frozenset(["pjit", "jit", "closed_call", "core_call", "custom_jvp_call",
                    "custom_vjp_call", "custom_vjp_call_jaxpr", "remat", "checkpoint"])


def _shape(v):
  return tuple(getattr(getattr(v, "aval", None), "shape", ()))


def _propagate(jaxpr, labels):
  """Leaf labels of ``jaxpr``'s outputs given its inputs' (frozensets of leaf indices), or None
  when it is not elementwise leaf by leaf (a non-elementwise op on an array, or two leaves
  mixed)."""
  env = {}
  read = lambda v: env.get(v, frozenset()) if hasattr(v, "aval") and not hasattr(v, "val") \
      else frozenset()
  for v, lab in zip(jaxpr.invars, labels):
    env[v] = lab
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    sub = next((eqn.params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr")
                if k in eqn.params), None)
    if name in _CALLS and sub is not None:  # e.g. a jitted tree_map over every leaf
      outs = _propagate(getattr(sub, "jaxpr", sub), ins)
      if outs is None:
        return None
      env.update(zip(eqn.outvars, outs))
      continue
    lab = frozenset().union(*ins)
    if len(lab) > 1:
      return None
    arrays = any(_shape(v) for v in list(eqn.invars) + list(eqn.outvars))
    from_scalar = name == "broadcast_in_dim" and not _shape(eqn.invars[0])
    if arrays and name not in _ELEMENTWISE and not from_scalar:
      return None
    for v in eqn.outvars:
      env[v] = lab
  return [read(v) for v in jaxpr.outvars]


def _owner(path, shape, p_paths, p_shapes):
  """Index of the parameter leaf whose path ends ``path`` (the longest such), or None."""
  best = None
  for i, (pp, ps) in enumerate(zip(p_paths, p_shapes)):
    if ps == shape and len(pp) <= len(path) and tuple(path[len(path) - len(pp):]) == pp:
      if best is None or len(pp) > len(p_paths[best]):
        best = i
  return best


def _lean_plan(tx, updates, state, inner, params):
  """``{param leaf index: [state positions]}`` when ``tx`` is elementwise leaf by leaf and every
  quantized state leaf belongs to one parameter leaf; else None (the whole-tree path)."""
  like = params if params is not None else updates
  p_flat = jax.tree_util.tree_flatten_with_path(like)[0]
  g_leaves = jax.tree.leaves(updates)
  if len(p_flat) != len(g_leaves):
    return None
  p_paths = [tuple(path) for path, _ in p_flat]
  p_shapes = [tuple(jnp.shape(x)) for _, x in p_flat]
  s_flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_q)[0]
  owners, plan = [], {}
  for k, (path, x) in enumerate(s_flat):
    shape = tuple(x.shape) if _is_q(x) else tuple(jnp.shape(x))
    owner = _owner(tuple(path), shape, p_paths, p_shapes) if shape else None
    if _is_q(x):
      if owner is None:
        return None
      plan.setdefault(owner, []).append(k)
    owners.append(owner)
  if not plan:
    return None
  # Trace tx.update once on abstract values and follow every leaf through it.
  abstract = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), a.dtype), t)
  try:
    closed = jax.make_jaxpr(tx.update)(abstract(updates), abstract(inner), abstract(params))
  except Exception:  # noqa: BLE001 - any failure means: not the lean path
    return None
  labels = [frozenset([i]) for i in range(len(g_leaves))]
  inner_leaves = jax.tree.leaves(inner)
  if len(inner_leaves) != len(s_flat):
    return None
  other = len(g_leaves)
  for o, leaf in zip(owners, inner_leaves):
    if o is not None:
      labels.append(frozenset([o]))
    elif jnp.shape(leaf):
      labels.append(frozenset([other]))  # an array of no parameter: must mix with none
      other += 1
    else:
      labels.append(frozenset())
  if params is not None:
    labels += [frozenset([i]) for i in range(len(p_flat))]
  outs = _propagate(closed.jaxpr, labels)
  if outs is None:
    return None
  n_u = len(g_leaves)
  for k, lab in enumerate(outs[n_u:n_u + len(s_flat)]):
    if lab and (owners[k] is None or lab != frozenset([owners[k]])):
      return None
  return {"plan": plan, "owners": owners}


def _chunked_update(tx, plan, updates, state, inner, params, flat_new):
  """New values of the quantized state leaves (and the other state leaves of their parameter),
  computed by ``tx.update`` on chunks of one parameter leaf at a time (``map_blocks``)."""
  owners = plan["owners"]
  g_leaves, g_def = jax.tree.flatten(updates)
  p_leaves = g_def.flatten_up_to(params) if params is not None else None
  s_old, s_def = jax.tree.flatten(state, is_leaf=_is_q)
  s_inner = s_def.flatten_up_to(inner)
  flat_new = list(flat_new)
  done = None
  for i, qpos in plan["plan"].items():
    mine = [k for k, o in enumerate(owners) if o == i]
    fpos = [k for k in mine if not _is_q(s_old[k])]
    block_size = s_old[qpos[0]].block_size
    if any(s_old[k].block_size != block_size for k in qpos):
      continue  # (one block size per quantize_state: cannot happen)
    empty = lambda a: jnp.zeros((0,), jnp.asarray(a).dtype)

    def chunk(valid, *xs, i=i, qpos=qpos, fpos=fpos, mine=mine):
      g_c = xs[0]
      rest = xs[1:]
      p_c = None
      if p_leaves is not None:
        p_c, rest = rest[0], rest[1:]
      f_c, q_c = rest[:len(fpos)], rest[len(fpos):]
      g_t = g_def.unflatten([g_c if j == i else empty(x) for j, x in enumerate(g_leaves)])
      p_t = None if p_leaves is None else g_def.unflatten(
          [p_c if j == i else empty(x) for j, x in enumerate(p_leaves)])
      s_vals = []
      for k, (old, val) in enumerate(zip(s_old, s_inner)):
        if k in qpos:
          j = qpos.index(k)
          dec = _decode_blocks(q_c[3 * j], q_c[3 * j + 1], q_c[3 * j + 2], old.bits)
          s_vals.append(dec.astype(old.dtype))
        elif k in fpos:
          s_vals.append(f_c[fpos.index(k)])
        elif owners[k] is not None:
          s_vals.append(empty(val))
        else:
          s_vals.append(val)
      _, s2 = tx.update(g_t, s_def.unflatten(s_vals), p_t)
      s2 = s_def.flatten_up_to(s2)
      new_f = [s2[k].astype(s_old[k].dtype) for k in fpos]
      new_q = []
      for k in qpos:
        new_q += list(_encode_blocks(s2[k].astype(jnp.float32), s_old[k].bits, valid))
      return new_f, new_q

    elems = [g_leaves[i].reshape(-1)] + ([] if p_leaves is None else [p_leaves[i].reshape(-1)])
    if done is not None:  # one leaf after the other (see jaxbnb.optim.transforms._map)
      elems, _ = jax.lax.optimization_barrier((elems, done))
    out_e = [jnp.asarray(s_inner[k]).reshape(-1) for k in fpos]
    out_b = [a for k in qpos for a in _flat_blocks(s_old[k])]
    new_e, new_b = _blocks.map_grouped(chunk, elems, out_e, out_b, block_size)
    for k, e in zip(fpos, new_e):
      flat_new[k] = e.reshape(jnp.shape(s_inner[k]))
    for j, k in enumerate(qpos):
      flat_new[k] = _unflat_blocks(s_old[k], *new_b[3 * j:3 * j + 3])
    done = new_b[0]
  return flat_new
