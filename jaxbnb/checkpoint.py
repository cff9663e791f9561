"""Orbax checkpoints of pytrees holding quantized leaves: exact bits, static metadata kept.

Orbax saves a pytree's arrays but not its static fields (blocksize, quant_type, shapes, dtypes,
layout), so a checkpoint of packed weights is two Orbax items written as one unit::

  <path>/arrays/            StandardCheckpointHandler item: {flat key: array}, e.g.
                            "blocks.0.mlp.fc1.kernel.state.absmax"
  <path>/jaxbnb/metadata    JsonCheckpointHandler item: the tree skeleton (below)
  <path>/_CHECKPOINT_METADATA, commit_success.txt   Orbax's own

Orbax writes everything into ``<path>.orbax-checkpoint-tmp*`` and renames it to ``<path>`` only
when every item is complete, so a save killed midway never leaves a finished-looking
checkpoint (with ``CheckpointManager``, the step directory is renamed the same way).

Skeleton (JSON, ``{"format": "jaxbnb.checkpoint", "version": 2, "tree": node, "tree_sha256"}``;
``tree_sha256`` is the SHA-256 of the canonical JSON of ``node``, so a damaged skeleton - a
blocksize or a scalar leaf that changed but still parses - is refused on restore), a node is one of
``{"t": "none"}``, ``{"t": "array", "key", "shape", "dtype", "digest"}``, ``{"t": "value",
"value"}`` (a Python scalar leaf), ``{"t": "dict" | "list" | "tuple", "items"}``, ``{"t":
"object", "class", "static", "fields"}`` (a registered dataclass: :class:`~jaxbnb.QuantState`,
:class:`~jaxbnb.Quantized4bit`, :class:`~jaxbnb.Quantized8bit`, or one passed to :func:`register_checkpointable`)
and ``{"t": "node", "type", "items"}`` (any other pytree node: NNX ``State``/``Variable``,
named tuples, ...). ``digest`` is a position-weighted 128-bit sum of each array's elements,
checked on restore, so damaged files give an error, never different weights.

``save(path, tree, force=True)`` over an existing checkpoint writes the new one beside it
(``<path>.jaxbnb-new``), then swaps the two by renames: a save killed at any point leaves the old
checkpoint or the complete new one, and :func:`restore` finds whichever it is.

Multi-process runs (``jax.distributed``): every process calls :func:`save` and :func:`restore`
with the same path, on a filesystem they all see. Each process writes the shards of its devices
(Orbax writes one copy of replicated data), process 0 the skeleton; only process 0 renames or
removes directories, between barriers. A digest is summed over the processes' shards (one
all-gather per save or restore, two 64-bit words per array), so it equals the digest of the same
array saved whole, and a checkpoint written by several processes restores, verified, in one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from jaxbnb.functional import QuantState
from jaxbnb.lora import LoRAArray
from jaxbnb.optim.fourbit_state import Blockwise4bit, Rank1Moment
from jaxbnb.optim.quantize_state import QuantizedLeaf
from jaxbnb.optim.state import QuantizedMoment
from jaxbnb.qtensor import Quantized4bit, Quantized8bit

if TYPE_CHECKING:
  import orbax.checkpoint as ocp


def _ocp():
  """orbax.checkpoint, imported on first use: it adds ~25 MiB of host memory and import time
  to every program that imports jaxbnb, most of which never checkpoint."""
  import orbax.checkpoint  # pylint: disable=import-outside-toplevel
  return orbax.checkpoint

FORMAT = "jaxbnb.checkpoint"
FORMAT_VERSION = 2  # 2: the skeleton carries its own digest (tree_sha256)
ARRAYS, META = "arrays", "jaxbnb"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
# save(force=True) writes <path>.jaxbnb-new, moves the old one to <path>.jaxbnb-old, then swaps.
_NEW_SUFFIX, _OLD_SUFFIX = ".jaxbnb-new", ".jaxbnb-old"


class CheckpointError(ValueError):
  """A checkpoint is absent, unfinished, damaged, or not a jaxbnb checkpoint."""


# --- registry of dataclasses whose static fields are saved -------------------------------------

_BY_NAME: dict[str, type] = {}
_NAME_OF: dict[type, str] = {}


def register_checkpointable(cls: type, name: Optional[str] = None) -> type:
  """Let ``restore`` rebuild ``cls`` without a target (usable as a class decorator).

  ``cls`` must be a dataclass registered as a pytree (``jax.tree_util.register_dataclass``,
  ``flax.struct.dataclass``) whose non-array fields are JSON-able: ints, floats, strs, bools,
  None, tuples/lists of those, and dtypes. ``name`` (default ``module.QualName``) is what
  checkpoints record; keep it stable.
  """
  if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
    raise TypeError(f"register_checkpointable needs a dataclass type; got {cls!r}")
  name = name or f"{cls.__module__}.{cls.__qualname__}"
  if _BY_NAME.get(name, cls) is not cls:
    raise ValueError(f"checkpoint class name {name!r} is already taken by {_BY_NAME[name]!r}")
  _BY_NAME[name] = cls
  _NAME_OF[cls] = name
  return cls


for _cls in (QuantState, Quantized4bit, Quantized8bit, QuantizedMoment, Blockwise4bit,
             Rank1Moment, QuantizedLeaf, LoRAArray):
  register_checkpointable(_cls, _cls.__name__)


def _class_name(cls: type) -> str:
  return _NAME_OF.get(cls, f"{cls.__module__}.{cls.__qualname__}")


# --- static values <-> JSON --------------------------------------------------------------------


def _is_dtype(v) -> bool:
  if isinstance(v, np.dtype):
    return True
  if isinstance(v, type):
    try:
      return np.issubdtype(v, np.generic) or isinstance(jnp.dtype(v), np.dtype)
    except TypeError:
      return False
  return False


def _enc_static(v, where: str):
  if v is None or isinstance(v, (bool, int, float, str)):
    return v
  if _is_dtype(v):
    return {"dtype": jnp.dtype(v).name}
  if isinstance(v, np.generic):
    return _enc_static(v.item(), where)
  if isinstance(v, (tuple, list)):
    return {"tuple" if isinstance(v, tuple) else "list": [_enc_static(x, where) for x in v]}
  raise TypeError(f"{where}: static field value {v!r} ({type(v).__name__}) is not JSON-able; "
                  "checkpointable classes keep ints, floats, strs, bools, None, tuples and "
                  "dtypes as static fields")


def _dec_static(v):
  if isinstance(v, dict):
    if "dtype" in v:
      return jnp.dtype(v["dtype"])
    if "tuple" in v:
      return tuple(_dec_static(x) for x in v["tuple"])
    if "list" in v:
      return [_dec_static(x) for x in v["list"]]
    raise CheckpointError(f"unknown static value encoding {v!r}")
  return v


# --- digests -----------------------------------------------------------------------------------

_M64 = (1 << 64) - 1
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_CHUNK = 1 << 22


def _block_sums(u: np.ndarray, start: tuple[int, ...], gshape: tuple[int, ...]) -> tuple[int, int]:
  """(sum v, sum v * global flat index) over a block of the global array, modulo 2**64."""
  strides = [math.prod(gshape[d + 1:]) for d in range(len(gshape))]
  s0 = s1 = 0
  if u.ndim == 0 or u.shape[1:] == tuple(gshape[1:]):
    # A contiguous run of the global array: one flat pass in chunks.
    flat = u.reshape(-1)
    base = start[0] * strides[0] if u.ndim else 0
    for a in range(0, flat.size, _CHUNK):
      c = flat[a:a + _CHUNK].astype(np.uint64)
      idx = np.arange(base + a, base + a + c.size, dtype=np.uint64)
      s0 += int(c.sum(dtype=np.uint64))
      s1 += int((c * idx).sum(dtype=np.uint64))
    return s0 & _M64, s1 & _M64
  rows = max(1, _CHUNK // max(1, math.prod(u.shape[1:])))
  for r in range(0, u.shape[0], rows):
    c = u[r:r + rows].astype(np.uint64)
    s0 += int(c.sum(dtype=np.uint64))
    for d in range(c.ndim):
      other = tuple(i for i in range(c.ndim) if i != d)
      per = c.sum(axis=other, dtype=np.uint64)
      idx = np.arange(c.shape[d], dtype=np.uint64) + np.uint64(start[d] + (r if d == 0 else 0))
      s1 += int((per * idx).sum(dtype=np.uint64)) * strides[d]
  return s0 & _M64, s1 & _M64


def _local_sums(x) -> tuple[int, int]:
  """``_block_sums`` over the blocks of ``x`` this process holds: replica 0 of each of its
  shards, so that the blocks of all processes together cover the array exactly once."""
  if isinstance(x, jax.Array):
    blocks = [(s.index, s.data) for s in x.addressable_shards if s.replica_id == 0]
  else:
    blocks = [((), x)]
  gshape = tuple(x.shape)
  s0 = s1 = 0
  for index, data in blocks:
    a = np.asarray(data)
    a = a if a.flags.c_contiguous else a.copy()  # (ascontiguousarray would make 0-d 1-d)
    u = a.reshape(-1).view(_UINT[a.dtype.itemsize]).reshape(a.shape)
    start = tuple((sl.start or 0) if isinstance(sl, slice) else int(sl) for sl in index)
    start = start + (0,) * (len(gshape) - len(start))
    b0, b1 = _block_sums(u, start, gshape)
    s0, s1 = (s0 + b0) & _M64, (s1 + b1) & _M64
  return s0, s1


def _digests(arrays: list) -> list[str]:
  """Layout-independent checksums of ``arrays``' elements (any sharding gives the same value).

  An array spread over several processes is summed over all of them, by one collective for
  the whole list: in a multi-process run every process must call this with the same list.
  """
  sums = [_local_sums(x) for x in arrays]
  spread = [i for i, x in enumerate(arrays)
            if isinstance(x, jax.Array) and not x.is_fully_addressable]
  if spread:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    local = np.array([sums[i] for i in spread], np.uint64)
    # uint32 words: JAX without x64 would narrow uint64. (processes, k, 2) after the view.
    every = np.asarray(multihost_utils.process_allgather(local.view(np.uint32)))
    total = every.view(np.uint64).sum(axis=0, dtype=np.uint64)  # wraps: modulo 2**64
    for j, i in enumerate(spread):
      sums[i] = (int(total[j, 0]), int(total[j, 1]))
  return [f"{s0:016x}{s1:016x}" for s0, s1 in sums]


# --- encoding a tree ---------------------------------------------------------------------------


def _key_entry(k) -> tuple[str, Any]:
  if isinstance(k, jax.tree_util.DictKey):
    return "dict", k.key
  if isinstance(k, jax.tree_util.SequenceKey):
    return "seq", k.idx
  if isinstance(k, jax.tree_util.GetAttrKey):
    return "attr", k.name
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return "flat", k.key
  raise TypeError(f"unsupported pytree key {k!r}")


def _children(x) -> list[tuple[Any, Any]]:
  """One level of ``x``'s pytree flattening: [(key entry, child)], in jax's leaf order."""
  return jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)[0]


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _is_abstract_array(x) -> bool:
  return _is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _is_prng_key(x) -> bool:
  return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _is_variable_like(items) -> bool:
  # NNX Variables (Param, ...) flatten to their value alone: drop them from names (as
  # jaxbnb.tree.path_str does) and, without a target, from the rebuilt tree.
  return len(items) == 1 and items[0][0] == ("attr", "value")


def _check_json_key(k, where):
  if isinstance(k, bool) or not isinstance(k, (str, int)):
    raise TypeError(f"{where}: dict key {k!r} is not a str or int; checkpoints keep str/int keys")
  return k


class _Encoder:
  """Builds the skeleton and the flat {key: array} dict of a tree."""

  def __init__(self):
    self.flat: dict[str, Any] = {}
    self.nodes: list[dict] = []  # array nodes, in self.flat's order; digests filled in later

  def name(self, parts: list[str]) -> str:
    base = ".".join(parts) or "_"
    key, i = base, 1
    while key in self.flat:  # e.g. {"a.b": x, "a": {"b": y}}: keep both, deterministically
      key, i = f"{base}~{i}", i + 1
    return key

  def encode(self, x, parts: list[str]) -> dict:
    where = ".".join(parts) or "<root>"
    if x is None:
      return {"t": "none"}
    if _is_array(x):
      if isinstance(x, np.generic):
        x = np.asarray(x)
      extra = {}
      if _is_prng_key(x):  # typed PRNG keys (NNX RngState, dropout rngs): save their raw data
        extra = {"prng_impl": str(jax.random.key_impl(x)), "key_dtype": str(x.dtype),
                 "key_shape": list(x.shape)}
        x = jax.random.key_data(x)
      key = self.name(parts)
      self.flat[key] = x
      node = {"t": "array", "key": key, "shape": list(x.shape), "dtype": jnp.dtype(x.dtype).name,
              "digest": None, **extra}
      self.nodes.append(node)
      return node
    if isinstance(x, (bool, int, float, str)):
      return {"t": "value", "value": x}
    if isinstance(x, jax.ShapeDtypeStruct):
      raise TypeError(f"{where}: cannot save an abstract array (ShapeDtypeStruct)")
    if _is_leaf(x):
      raise TypeError(f"{where}: cannot save a leaf of type {type(x).__name__}")
    items = _children(x)
    entries = [(_key_entry(p[0]), c) for p, c in items]
    if type(x) is dict:
      return {"t": "dict", "items": [[_check_json_key(k, where), self.encode(c, parts + [str(k)])]
                                     for (_, k), c in entries]}
    if type(x) in (list, tuple):
      return {"t": type(x).__name__,
              "items": [self.encode(c, parts + [str(k)]) for (_, k), c in entries]}
    if dataclasses.is_dataclass(x) and all(kind == "attr" for (kind, _), _ in entries):
      data = {k for (_, k), _ in entries}
      static = {f.name: _enc_static(getattr(x, f.name), f"{where}.{f.name}")
                for f in dataclasses.fields(x) if f.init and f.name not in data}
      return {"t": "object", "class": _class_name(type(x)), "static": static,
              "fields": [[k, self.encode(c, parts + [k])] for (_, k), c in entries]}
    variable = _is_variable_like(entries)
    out = []
    for (kind, k), c in entries:
      _check_json_key(k, where)
      out.append([[kind, k], self.encode(c, parts if variable else parts + [str(k)])])
    t = type(x)
    return {"t": "node", "type": f"{t.__module__}.{t.__qualname__}", "items": out}


def _tree_sha256(node: dict) -> str:
  """SHA-256 of the canonical JSON of a skeleton node (exact: JSON floats round-trip)."""
  text = json.dumps(node, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
  return hashlib.sha256(text.encode()).hexdigest()


def _metadata(tree, with_digest=True) -> tuple[dict[str, Any], dict]:
  enc = _Encoder()
  node = enc.encode(tree, [])
  if with_digest:  # all at once: one collective in a multi-process run
    for n, d in zip(enc.nodes, _digests([enc.flat[n["key"]] for n in enc.nodes])):
      n["digest"] = d
  return enc.flat, {"format": FORMAT, "version": FORMAT_VERSION, "tree": node,
                    "tree_sha256": _tree_sha256(node)}


def save_args(tree: Any) -> ocp.args.Composite:
  """Orbax args saving ``tree`` (arrays + JSON skeleton) as one composite checkpoint.

  For ``ocp.CheckpointManager``: ``manager.save(step, args=jaxbnb.checkpoint.save_args(tree))``
  (async saves and ``max_to_keep`` work as usual); read back with
  ``jaxbnb.checkpoint.restore(manager, step=step, target=...)``.
  """
  ocp = _ocp()
  flat, meta = _metadata(tree)
  items = {META: ocp.args.JsonSave(meta)}
  if flat:  # Orbax refuses an empty item
    items[ARRAYS] = ocp.args.StandardSave(flat)
  return ocp.args.Composite(**items)


def _abs(path) -> epath.Path:
  return epath.Path(os.path.abspath(os.fspath(path)))


def _sibling(path: epath.Path, suffix: str) -> epath.Path:
  return path.parent / (path.name + suffix)


def _remove(path: epath.Path) -> None:
  if os.path.lexists(path):
    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def _settle(path: epath.Path) -> None:
  """Finish or undo a ``force=True`` swap that was interrupted, leaving one checkpoint at
  ``path`` (or none, if there was none before) and no siblings."""
  new, old = _sibling(path, _NEW_SUFFIX), _sibling(path, _OLD_SUFFIX)
  if not path.exists():
    if new.exists():  # killed between the two renames: the new one is complete
      os.rename(new, path)
    elif old.exists():  # cannot happen with the order below, but never lose a checkpoint
      os.rename(old, path)
  _remove(new)
  _remove(old)
  for tmp in path.parent.glob(new.name + _TMP_SUFFIX + "*"):  # Orbax's, from a killed save
    _remove(tmp)


def _sync(name: str) -> None:
  """A barrier across the processes of a multi-process run (nothing in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(f"jaxbnb.checkpoint.{name}")


def save(path: Union[str, os.PathLike], tree: Any, *, force: bool = False) -> None:
  """Save ``tree`` (quantized leaves, QuantStates, arrays, registered dataclasses) to ``path``.

  The directory appears only once the save is complete (Orbax's temporary dir + rename).
  ``force=True`` replaces an existing checkpoint atomically: the new one is written beside it
  and swapped in by renames, so a save killed at any moment leaves the old checkpoint or the
  complete new one (never neither).

  In a multi-process run every process calls ``save`` with the same ``path`` (on a filesystem
  they all see) and the same tree of global arrays: each process writes the shards it holds
  (one copy of replicated ones), process 0 the metadata, and only process 0 renames or removes
  directories, between barriers.
  """
  path = _abs(path)
  args = save_args(tree)  # (its digests are a collective in a multi-process run)
  primary = jax.process_index() == 0
  _sync("save:start")  # no process still checks or reads what process 0 may move next
  if primary:
    _settle(path)
  _sync("save:settled")
  if path.exists() and not force:
    raise FileExistsError(f"{path} exists; pass force=True to replace it")
  ocp = _ocp()
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  if not path.exists():  # every process saw the same answer; Orbax's save starts by a barrier
    checkpointer.save(path, args=args)
    return
  new, old = _sibling(path, _NEW_SUFFIX), _sibling(path, _OLD_SUFFIX)
  checkpointer.save(new, args=args)  # complete (Orbax renames its tmp dir) or absent
  if primary:
    os.rename(path, old)
    os.rename(new, path)
    _remove(old)
  _sync("save:swapped")  # on return, every process finds the new checkpoint at path


# --- restoring ---------------------------------------------------------------------------------


def _reader(path, step) -> tuple[Callable[[ocp.args.Composite], Any], str]:
  ocp = _ocp()
  if isinstance(path, ocp.CheckpointManager):
    mngr = path
    steps = list(mngr.all_steps())
    if step is None:
      step = mngr.latest_step()
      if step is None:
        raise CheckpointError(f"{mngr.directory}: no finished checkpoint")
    if step not in steps:
      raise CheckpointError(f"{mngr.directory}: no finished checkpoint for step {step} "
                            f"(finished steps: {sorted(steps)})")
    return (lambda args: mngr.restore(step, args=args)), f"{mngr.directory} step {step}"
  if step is not None:
    raise TypeError("step= is for a CheckpointManager; pass the checkpoint's directory instead")
  p = _abs(path)
  if not p.exists() and _sibling(p, _NEW_SUFFIX).exists():
    p = _sibling(p, _NEW_SUFFIX)  # a replacing save was killed mid-swap: the new one is whole
  if not p.exists():
    tmp = sorted(q.name for q in p.parent.glob(p.name + _TMP_SUFFIX + "*")) if \
        p.parent.exists() else []
    extra = (f"; {tmp[0]} beside it is an unfinished save (interrupted before it was "
             "committed) and cannot be restored") if tmp else ""
    raise CheckpointError(f"{p}: no finished checkpoint{extra}")
  if not (p / META).exists():
    raise CheckpointError(f"{p}: not a jaxbnb checkpoint (no {META}/ metadata item); "
                          "it may be a plain Orbax checkpoint or an unfinished save")
  ck = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  return (lambda args: ck.restore(p, args=args)), str(p)


def read_metadata(path, *, step: Optional[int] = None) -> dict:
  """The JSON skeleton of a checkpoint (a directory, or a CheckpointManager and ``step``)."""
  read, where = _reader(path, step)
  return _read_meta(read, where)


def _read_meta(read, where) -> dict:
  ocp = _ocp()
  try:
    meta = read(ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
  except Exception as e:  # Orbax/JSON errors: the metadata file is missing or damaged
    raise CheckpointError(f"{where}: cannot read the jaxbnb metadata ({type(e).__name__}: "
                          f"{e})") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT or "tree" not in meta:
    raise CheckpointError(f"{where}: the {META} metadata is not a jaxbnb checkpoint skeleton")
  if not isinstance(meta.get("version"), int) or meta["version"] > FORMAT_VERSION:
    raise CheckpointError(f"{where}: checkpoint format version {meta.get('version')!r}; this "
                          f"jaxbnb reads up to {FORMAT_VERSION} (upgrade jaxbnb)")
  if meta["version"] >= 2 and meta.get("tree_sha256") != _tree_sha256(meta["tree"]):
    raise CheckpointError(f"{where}: the {META} metadata is damaged (the skeleton's digest "
                          "differs from the one recorded at save time)")
  return meta


def _build(node: dict, where: str):
  """An abstract tree (ShapeDtypeStruct leaves) from a skeleton node."""
  t = node.get("t")
  if t == "none":
    return None
  if t == "array":
    sds = jax.ShapeDtypeStruct(tuple(node["shape"]), jnp.dtype(node["dtype"]))
    if "prng_impl" in node:
      return jax.eval_shape(lambda d: jax.random.wrap_key_data(d, impl=node["prng_impl"]), sds)
    return sds
  if t == "value":
    return node["value"]
  if t == "dict":
    return {k: _build(c, f"{where}.{k}") for k, c in node["items"]}
  if t in ("list", "tuple"):
    out = [_build(c, f"{where}.{i}") for i, c in enumerate(node["items"])]
    return out if t == "list" else tuple(out)
  if t == "object":
    cls = _BY_NAME.get(node["class"])
    if cls is None:
      raise CheckpointError(
          f"{where}: class {node['class']!r} is not registered; call "
          "jaxbnb.checkpoint.register_checkpointable(cls) before restoring, or pass target=")
    kw = {k: _build(c, f"{where}.{k}") for k, c in node["fields"]}
    kw.update({k: _dec_static(v) for k, v in node["static"].items()})
    return cls(**kw)
  if t == "node":
    items = [((kind, k), c) for (kind, k), c in node["items"]]
    if _is_variable_like(items):
      return _build(items[0][1], where)
    if items and all(kind in ("seq", "flat") for (kind, _), _ in items):
      return [_build(c, f"{where}.{k}") for (_, k), c in items]
    return {k: _build(c, f"{where}.{k}") for (_, k), c in items}
  raise CheckpointError(f"{where}: unknown skeleton node {t!r}")


def _mismatch(where, what, saved, target):
  return ValueError(f"checkpoint does not match the target at {where or '<root>'}: {what} "
                    f"saved {saved!r}, target {target!r}")


def _is_leaf(x) -> bool:
  leaves = jax.tree.leaves(x)
  return len(leaves) == 1 and leaves[0] is x


def _entries(x) -> Optional[list]:
  """[(key entry, child)] of a pytree node; None for a leaf."""
  if x is None:
    return []
  if _is_abstract_array(x) or _is_leaf(x):
    return None
  return [(_key_entry(p[0]), c) for p, c in _children(x)]


def _saved_variable(node: dict) -> bool:
  return node.get("t") == "node" and _is_variable_like([(tuple(e), c) for e, c in node["items"]])


def _match(node: dict, x, where: str, slots: list) -> None:
  """Check ``x`` (target subtree) against the saved ``node``; append one slot per jax leaf."""
  entries = _entries(x)
  saved_var, target_var = _saved_variable(node), entries is not None and _is_variable_like(entries)
  if saved_var and not target_var:  # saved an NNX Variable, the target holds its value
    return _match(node["items"][0][1], x, where, slots)
  if target_var and not saved_var:  # the target is an NNX Variable, the checkpoint its value
    return _match(node, entries[0][1], where, slots)
  t = node.get("t")
  here = where or "<root>"
  if t == "none":
    if x is not None:
      raise _mismatch(here, "leaf", None, type(x).__name__)
    return
  if t == "value":
    if entries is not None or (_is_abstract_array(x) and tuple(x.shape) != ()):
      raise _mismatch(here, "leaf", node["value"], type(x).__name__)
    slots.append(("value", node["value"], x))
    return
  if t == "array":
    if not _is_abstract_array(x):
      raise _mismatch(here, "leaf", "array", type(x).__name__)
    if "prng_impl" in node or _is_prng_key(x):
      shape, dtype = tuple(node.get("key_shape", node["shape"])), node.get("key_dtype",
                                                                             node["dtype"])
      if str(x.dtype) != dtype:
        raise _mismatch(here, "dtype", dtype, str(x.dtype))
    else:
      shape, dtype = tuple(node["shape"]), jnp.dtype(node["dtype"])
      if jnp.dtype(x.dtype) != dtype:
        raise _mismatch(here, "dtype", dtype.name, jnp.dtype(x.dtype).name)
    if tuple(x.shape) != shape:
      raise _mismatch(here, "shape", shape, tuple(x.shape))
    slots.append(("array", node, x))
    return
  if entries is None or x is None:
    raise _mismatch(here, "node", t, type(x).__name__)
  if t == "object":
    name = _class_name(type(x))
    if name != node["class"]:
      raise _mismatch(here, "class", node["class"], name)
    for f, v in node["static"].items():
      have = _enc_static(getattr(x, f, None), f"{here}.{f}")
      if have != v:
        raise _mismatch(here, f, _dec_static(v), _dec_static(have))
    saved = node["fields"]
  elif t == "dict":
    saved = node["items"]
  elif t in ("list", "tuple"):
    saved = list(enumerate(node["items"]))
  elif t == "node":
    saved = [[k, c] for (_, k), c in node["items"]]
  else:
    raise CheckpointError(f"{here}: unknown skeleton node {t!r}")
  keys, have = [k for k, _ in saved], [k for (_, k), _ in entries]
  if keys != have:
    missing, extra = [k for k in keys if k not in have], [k for k in have if k not in keys]
    raise _mismatch(here, "keys", f"{missing} not in the target" if missing else keys,
                    f"{extra} not in the checkpoint" if extra else have)
  for (k, c), (_, child) in zip(saved, entries):
    _match(c, child, f"{where}.{k}" if where else str(k), slots)


def _fit(sharding: Sharding, shape) -> Sharding:
  """``sharding`` if it can lay out ``shape``; a NamedSharding that cannot (rank, divisibility:
  a 0-d offset, a 3-entry nested absmax) is replaced by replication on the same mesh."""
  if not isinstance(sharding, NamedSharding):
    return sharding
  spec = tuple(sharding.spec)
  if len(spec) > len(shape):
    return NamedSharding(sharding.mesh, PartitionSpec())
  for dim, axes in zip(shape, spec):
    if axes is None:
      continue
    axes = axes if isinstance(axes, tuple) else (axes,)
    if dim % math.prod(sharding.mesh.shape[a] for a in axes):
      return NamedSharding(sharding.mesh, PartitionSpec())
  return sharding


def _is_sharding_leaf(x) -> bool:
  return x is None or isinstance(x, Sharding)


def _shardings(sharding, abstract, slots) -> list[Sharding]:
  """One sharding per array slot (slots are in jax leaf order)."""
  # A device of this process: in a multi-process run each process gets the whole array.
  default = SingleDeviceSharding(jax.local_devices()[0])
  if sharding is None:
    per_leaf = [(None, False)] * len(slots)
  elif isinstance(sharding, Sharding):
    per_leaf = [(sharding, True)] * len(slots)
  else:
    prefix = jax.tree.structure(sharding, is_leaf=_is_sharding_leaf)
    try:
      subtrees = prefix.flatten_up_to(abstract)
    except (ValueError, TypeError) as e:
      raise ValueError(f"the sharding tree does not match the restored tree: {e}") from None
    per_leaf = []
    for s, sub in zip(jax.tree.leaves(sharding, is_leaf=_is_sharding_leaf), subtrees):
      n = len(jax.tree.leaves(sub))
      per_leaf += [(s, not _is_abstract_array(sub))] * n  # broadcast over a subtree: fit it
  assert len(per_leaf) == len(slots), (len(per_leaf), len(slots))
  out = []
  for (s, broadcast), (kind, node, x) in zip(per_leaf, slots):
    if kind != "array":
      continue
    if s is None:
      s = getattr(x, "sharding", None)
      out.append(s if isinstance(s, Sharding) else default)
    else:
      out.append(_fit(s, tuple(node["shape"])) if broadcast else s)
  return out


def restore(path, target: Any = None, *, step: Optional[int] = None, sharding: Any = None,
            verify: bool = True) -> Any:
  """Restore a checkpoint written by :func:`save` / :func:`save_args`.

  Args:
    path: the checkpoint directory, or an ``ocp.CheckpointManager`` (``step`` defaults to its
      latest finished step).
    target: optional tree (concrete, or abstract from ``jax.eval_shape``) giving the structure
      to restore into; the checkpoint's metadata (format, quant type, blocksize, shapes, dtypes,
      layout, keys) is validated against it (``ValueError`` naming the path and both values).
      Without it the tree is rebuilt from the metadata alone: dicts/lists/tuples with the
      quantized leaves (NNX ``State``s and other pytree nodes come back as nested dicts, as
      ``nnx.to_pure_dict`` gives; use ``nnx.replace_by_pure_dict`` or pass ``target``).
    sharding: a ``jax.sharding.Sharding`` for every array (a ``NamedSharding`` that does not fit
      an array's rank or divisibility, such as a scalar offset, replicates it on the same mesh),
      or a tree of shardings (a prefix of the restored tree; ``None`` entries use the default).
      Default: each target leaf's own sharding, else this process's first device (in a
      multi-process run, every process gets the whole array). Arrays are read straight into
      their shards (never gathered on one device first).
    verify: check every array against the digest recorded at save time.

  Returns:
    The tree, with ``jax.Array`` leaves (``np.ndarray`` where the target leaf is one).

  In a multi-process run every process calls ``restore`` (Orbax synchronizes them, and the
  digests of arrays spread over processes are summed by a collective).

  Raises:
    CheckpointError: no finished checkpoint, damaged or missing files, digest mismatch.
    ValueError: the target does not match the checkpoint.
  """
  ocp = _ocp()
  read, where = _reader(path, step)
  meta = _read_meta(read, where)
  slots: list = []
  try:
    abstract = _build(meta["tree"], "") if target is None else target
    _match(meta["tree"], abstract, "", slots)
  except (KeyError, TypeError, AttributeError, IndexError) as e:  # a malformed skeleton
    raise CheckpointError(f"{where}: the {META} metadata is malformed ({type(e).__name__}: "
                          f"{e})") from e
  shardings = _shardings(sharding, abstract, slots)
  arrays = [(node, x) for kind, node, x in slots if kind == "array"]
  restored: dict[str, Any] = {}
  if arrays:
    want = {node["key"]: jax.ShapeDtypeStruct(tuple(node["shape"]), jnp.dtype(node["dtype"]),
                                              sharding=s)
            for (node, _), s in zip(arrays, shardings)}
    try:
      restored = read(ocp.args.Composite(**{ARRAYS: ocp.args.StandardRestore(want)}))[ARRAYS]
    except Exception as e:  # tensorstore / Orbax: truncated, missing or unreadable files
      raise CheckpointError(f"{where}: cannot read the arrays ({type(e).__name__}: "
                            f"{str(e)[:500]})") from e
    if set(restored) != set(want):
      raise CheckpointError(f"{where}: arrays {sorted(set(want) - set(restored))} are missing")
    if verify:  # all at once: one collective in a multi-process run
      checked = [node for node, _ in arrays if node.get("digest") is not None]
      for node, d in zip(checked, _digests([restored[node["key"]] for node in checked])):
        if d != node["digest"]:
          raise CheckpointError(f"{where}: array {node['key']!r} is damaged (its digest differs "
                                "from the one recorded at save time)")
  leaves = []
  for kind, node, x in slots:
    if kind == "value":
      leaves.append(node)
    else:
      a = restored[node["key"]]
      if "prng_impl" in node:
        a = jax.random.wrap_key_data(a, impl=node["prng_impl"])
      leaves.append(np.asarray(a) if isinstance(x, np.ndarray) else a)
  return jax.tree.unflatten(jax.tree.structure(abstract), leaves)
