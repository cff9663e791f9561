"""Models bigger than the device: quantize-on-load from float checkpoints, and host offload.

``load_quantized`` reads a float (fp32/fp16/bf16) safetensors checkpoint — one file or the
shards of a ``model.safetensors.index.json`` — one tensor at a time from the memory-mapped
files, and quantizes each eligible tensor on the device as it arrives (one jitted quantizer per
distinct shape/dtype, reused across layers), optionally straight into shards. Only the packed
model plus one float tensor is ever on the device, and one tensor beyond the mapped files on
the host:

  params = load_quantized("model_dir", cfg, mapping="minilm", target=abstract_pure_dict)
  nnx.replace_by_pure_dict(abstract_state, params)

``offload(params, ["lm_head"])`` puts leaves in pinned host memory (bnb's
``llm_int8_enable_fp32_cpu_offload``): they keep their precision, and :func:`jaxbnb.intercept`
brings each to the device where the traced program first uses it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from jaxbnb.config import BitsAndBytesConfig
from jaxbnb.functional.blockwise import nest_absmax
from jaxbnb.host import HOST_KIND, HostOffloaded, host_memory_supported, is_offloaded
from jaxbnb.interop.bnb_safetensors import PathLike, _Reader
from jaxbnb.qtensor import is_quantized
from jaxbnb.tree import _layout, _marked_stacks, _matches, _quantize_leaf, path_str, stack_axes_of

# mapping(checkpoint name) -> (params path: tuple or dotted str, transpose) | path | None (drop)
Mapping = Union[str, Callable[[str], Any], None]
ShardingSpec = Union[Sharding, Callable[[str, tuple], Optional[Sharding]], None]

# Number of times a quantizer was traced (= compiled: each jitted quantizer sees one shape).
_stats = {"traces": 0}


# --- name mappings ---------------------------------------------------------------------------


def _minilm_mapping(names: Sequence[str]) -> Callable[[str], Any]:
  from jaxbnb.models.bert import hf_to_nnx_names  # flax model code, only when asked for
  layers = [int(m.group(1)) for n in names for m in [re.match(r"encoder\.layer\.(\d+)\.", n)]
            if m]
  table = hf_to_nnx_names(max(layers) + 1 if layers else 0)
  return table.get  # pooler.*, embeddings.position_ids: no counterpart, dropped


def _builtin(mapping: Mapping, names: Sequence[str]) -> Callable[[str], Any]:
  if mapping is None or mapping == "gpt":  # the params' own dotted names (path_str)
    return lambda name: (name, False)
  if mapping == "minilm":
    return _minilm_mapping(names)
  if callable(mapping):
    return mapping
  raise ValueError(f"mapping must be 'minilm', 'gpt', None or a callable; got {mapping!r}")


def _split(path) -> tuple:
  """A params path as a key tuple; digit components of a dotted name are list indices (NNX)."""
  if isinstance(path, str):
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))
  return tuple(path)


def _resolve(fn: Callable[[str], Any], name: str) -> Optional[tuple[tuple, bool]]:
  r = fn(name)
  if r is None:
    return None
  if isinstance(r, (str, list)) or (isinstance(r, tuple) and (len(r) != 2 or not isinstance(
      r[1], bool))):
    return _split(r), False
  if isinstance(r, tuple) and isinstance(r[0], (str, tuple, list)):
    return _split(r[0]), r[1]
  raise TypeError(f"mapping({name!r}) must return (path, transpose), a path or None; got {r!r}")


def _dotted(keys: tuple) -> str:
  return ".".join(str(k) for k in keys)


# --- target validation ----------------------------------------------------------------------


def _raw_key(k):
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return k


def _target_leaves(target) -> dict[str, tuple[tuple, tuple, Any]]:
  """dotted name -> (key tuple, shape, dtype) of every array leaf of ``target``."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(target, is_leaf=is_quantized)[0]:
    keys = tuple(_raw_key(k) for k in path)
    if keys and keys[-1] in ("value", "raw_value"):
      keys = keys[:-1]
    out[path_str(path)] = (keys, tuple(leaf.shape), np.dtype(leaf.dtype))
  return out


def _castable(src, dst) -> bool:
  """Whether a checkpoint tensor of ``src`` may fill a target leaf of ``dst``: float into float
  (cast, as the target asks), else a lossless widening (int8 -> int32, bool -> int8)."""
  src, dst = np.dtype(src), np.dtype(dst)
  floating = jnp.issubdtype(src, jnp.floating), jnp.issubdtype(dst, jnp.floating)
  if any(floating):
    return all(floating)
  return np.can_cast(src, dst, "safe")


def _check_target(entries: dict, target) -> dict:
  want = _target_leaves(target)
  missing = sorted(set(want) - set(entries))
  extra = sorted(set(entries) - set(want))
  problems = []
  if missing:
    problems.append(f"{len(missing)} target params have no tensor in the checkpoint, e.g. "
                    f"{missing[:3]}")
  if extra:
    problems.append(f"{len(extra)} mapped tensors are not in the target, e.g. "
                    + ", ".join(f"{entries[n]['name']!r} -> {n}" for n in extra[:3])
                    + " (map them to None to drop them)")
  for n in sorted(set(want) & set(entries)):
    e = entries[n]
    if e["shape"] != want[n][1]:
      problems.append(f"{e['name']!r} -> {n}: shape {e['shape']}"
                      f"{' (transposed)' if e['transpose'] else ''} != target {want[n][1]}")
    if not _castable(e["dtype"], want[n][2]):
      problems.append(f"{e['name']!r} -> {n}: a {e['dtype']} tensor cannot fill a "
                      f"{want[n][2]} leaf (floats are cast to the target's float dtype; other "
                      "dtypes must widen losslessly): fix the mapping or the target's dtype")
  if problems:
    raise ValueError("load_quantized: the checkpoint does not match the target:\n  "
                     + "\n  ".join(problems))
  return want


# --- sharding ---------------------------------------------------------------------------------


def _fit(sharding: Optional[Sharding], shape) -> Optional[Sharding]:
  """``sharding`` if it can lay out ``shape``, else replication on the same mesh."""
  if not isinstance(sharding, NamedSharding):
    return sharding
  spec = tuple(sharding.spec)
  ok = len(spec) <= len(shape) and all(
      axes is None or dim % math.prod(sharding.mesh.shape[a] for a in (
          axes if isinstance(axes, tuple) else (axes,))) == 0
      for dim, axes in zip(shape, spec))
  return sharding if ok else NamedSharding(sharding.mesh, PartitionSpec(),
                                           memory_kind=sharding.memory_kind)


def _axis0(sharding: Optional[Sharding], shape) -> Optional[Sharding]:
  """The axis-0 part of ``sharding`` for one of a quantized leaf's arrays (packed bytes run
  along the (out, in) matrix's rows, so axis-0 shards are whole output rows)."""
  if not isinstance(sharding, NamedSharding):
    return sharding
  spec = tuple(sharding.spec)[:1]
  return _fit(NamedSharding(sharding.mesh, PartitionSpec(*spec),
                            memory_kind=sharding.memory_kind), shape)


def _slice_sharding(sharding: Optional[Sharding], n_stack: int) -> Optional[Sharding]:
  """The part of a stacked leaf's ``sharding`` that lays out one slice (its trailing axes)."""
  if not isinstance(sharding, NamedSharding) or not n_stack:
    return sharding
  return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[n_stack:]),
                       memory_kind=sharding.memory_kind)


def _stacked_axis0(sharding: Optional[Sharding], n_stack: int, shape) -> Optional[Sharding]:
  """For one array of a stacked quantized leaf (``shape``: stack axes first): the stack axes
  keep their mesh axes, the next axis gets the slice's axis-0 part (as :func:`_axis0`); parts
  that do not divide are replicated."""
  if not isinstance(sharding, NamedSharding):
    return sharding
  spec = tuple(sharding.spec) + (None,) * (n_stack + 1)
  for keep in (n_stack + 1, n_stack):
    s = NamedSharding(sharding.mesh, PartitionSpec(*spec[:keep]),
                      memory_kind=sharding.memory_kind)
    if _fit(s, shape) is s:
      return s
  return NamedSharding(sharding.mesh, PartitionSpec(), memory_kind=sharding.memory_kind)


@functools.lru_cache(maxsize=None)
def _stacker(stack: tuple, treedef, avals: tuple, shardings: Optional[tuple]
             ) -> tuple[Callable, Callable]:
  """Jitted ``() -> zero stack`` and ``(stack, slice, index) -> stack`` for slices of
  ``treedef`` with arrays ``avals`` ((shape, dtype) each). ``put`` writes one quantized slice
  into its place; the stack is donated, so each device keeps only its part of it."""
  out = None if shardings is None else jax.tree.unflatten(treedef, shardings)

  def zeros():
    return jax.tree.unflatten(treedef, [jnp.zeros(stack + shape, dtype)
                                        for shape, dtype in avals])

  def put(acc, part, idx):
    return jax.tree.map(lambda a, p: jax.lax.dynamic_update_slice(
        a, p.reshape((1,) * len(stack) + p.shape), (*idx, *([0] * p.ndim))), acc, part)
  return (jax.jit(zeros, out_shardings=out),
          jax.jit(put, donate_argnums=0, out_shardings=out))


def _quantize_stacked(host: np.ndarray, e: dict, n_stack: int, layout: tuple, config,
                      sharding: Optional[Sharding], out_dtype):
  """A stacked quantized leaf, quantized one slice at a time by the lone weight's quantizer
  (so each slice has the bits ``jaxbnb.quantize`` gives it, by construction) and written into
  a stack laid out as ``sharding`` asks (stack axes keep their mesh axes): one float slice on
  the device at a time."""
  stack, raw = e["raw_shape"][:n_stack], e["raw_shape"][n_stack:]
  if not math.prod(stack):
    raise ValueError(f"{e['name']!r}: an empty stack {stack} (shape {e['raw_shape']}) has no "
                     "slice to quantize; drop it with the mapping or keep it in float with "
                     "llm_int8_skip_modules")
  s1 = _slice_sharding(sharding, n_stack)
  quantize = _quantizer(raw, e["dtype"], e["transpose"], out_dtype, layout, config, s1)
  acc = put = None
  for idx in np.ndindex(*stack):
    x = jax.device_put(host[idx], _axis0(s1, raw))
    part = quantize(x)
    if acc is None:
      leaves, treedef = jax.tree.flatten(part)
      shardings = None if sharding is None else tuple(
          _stacked_axis0(sharding, n_stack, stack + a.shape) for a in leaves)
      zeros, put = _stacker(stack, treedef,
                            tuple((a.shape, np.dtype(a.dtype)) for a in leaves), shardings)
      acc = zeros()
    acc = put(acc, part, np.asarray(idx, np.int32))
    jax.block_until_ready(acc)  # one float slice in flight, not a queue of them
    x.delete()
  return acc


# --- the on-device quantizer -----------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _quantizer(shape: tuple, dtype, transpose: bool, out_dtype, layout: tuple,
               config: BitsAndBytesConfig, sharding: Optional[Sharding]) -> Callable:
  """A jitted ``raw tensor -> quantized leaf`` for one (shape, dtype, layout, sharding)."""

  nested = (sharding is not None and config.load_in_4bit
            and config.bnb_4bit_use_double_quant)

  def fn(x):
    _stats["traces"] += 1
    x = (x.T if transpose else x).astype(out_dtype)
    if not nested:
      return _quantize_leaf(x, *layout, config)
    # The double-quant offset is a mean over all blocks: a sharded reduction sums in another
    # order (1 ulp off). Blocks quantize sharded; the small absmax (1/16 of an fp32 tensor) is
    # replicated so its mean, and so every bit, equals the unsharded jaxbnb.quantize.
    leaf = _quantize_leaf(x, *layout,
                          dataclasses.replace(config, bnb_4bit_use_double_quant=False))
    absmax = leaf.state.absmax
    if isinstance(sharding, NamedSharding):
      absmax = jax.lax.with_sharding_constraint(
          absmax, NamedSharding(sharding.mesh, PartitionSpec()))
    qabsmax, offset, state2 = nest_absmax(absmax, 256)
    return dataclasses.replace(leaf, state=dataclasses.replace(
        leaf.state, absmax=qabsmax, offset=offset, state2=state2))

  if sharding is None:
    return jax.jit(fn)
  out = jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, dtype))
  _stats["traces"] -= 1  # eval_shape traced it; that was not a compilation
  return jax.jit(fn, out_shardings=jax.tree.map(lambda a: _axis0(sharding, a.shape), out))


# --- load_quantized ----------------------------------------------------------------------------


def _bytes(shape, dtype) -> int:
  return math.prod(shape) * np.dtype(dtype).itemsize


class TensorSource:
  """Tensors read one at a time, for :func:`jaxbnb.load_quantized` (e.g. a GGUF file's, dequantized).

  Subclasses give ``keys()`` (names), ``info(name) -> (shape, numpy dtype)`` from headers alone,
  and ``read(name) -> np.ndarray`` (a fresh host array of that shape and dtype).
  """

  def keys(self) -> list[str]:  # pragma: no cover - interface
    raise NotImplementedError

  def info(self, name: str) -> tuple[tuple, np.dtype]:  # pragma: no cover - interface
    raise NotImplementedError

  def read(self, name: str) -> np.ndarray:  # pragma: no cover - interface
    raise NotImplementedError


class _SafetensorsSource(TensorSource):
  """A safetensors file or index, read with plain file reads (see :func:`_read_tensor`)."""

  def __init__(self, path: PathLike):
    self.path, self.reader, self.headers = path, _Reader(path), {}

  def keys(self):
    return self.reader.keys()

  def info(self, name):
    view = self.reader.handles[self.reader.where[name]].get_slice(name)
    return tuple(view.get_shape()), _np_dtype(view.get_dtype())

  def read(self, name):
    return _read_tensor(self.reader.where[name] or self.path, name, self.headers)


def load_quantized(path: Union[PathLike, TensorSource], config: Optional[BitsAndBytesConfig],
                   *, mapping: Mapping = None, target: Any = None, sharding: ShardingSpec = None,
                   progress: bool = True) -> dict:
  """Load a float safetensors checkpoint, quantizing tensor by tensor on the device.

  Args:
    path: a ``.safetensors`` file, a ``*.index.json``, or a directory holding
      ``model.safetensors`` or ``model.safetensors.index.json`` (shards). fp32/fp16/bf16.
      Or any :class:`~jaxbnb.interop.TensorSource` (e.g. a GGUF file's tensors, dequantized one by one).
    config: a :class:`BitsAndBytesConfig`; leaves are chosen as :func:`jaxbnb.quantize` does
      (last path component ``kernel``/``weight``/``embedding``, ``llm_int8_skip_modules``).
      ``None`` quantizes nothing: every tensor is read (cast to the target's dtype) as it is.
      Stacks (``config.stacked_axes``, or the stack axes the ``target``'s metadata marks) are
      quantized slice by slice, one float slice on the device at a time, each slice with the
      bits ``jaxbnb.quantize`` gives it.
    mapping: checkpoint name -> ``(params path, transpose)`` (path: a key tuple or a dotted
      name whose digit parts become list indices), a path alone (no transpose), or ``None`` to
      drop the tensor; ``transpose`` of a stacked tensor keeps its stack axes first and
      transposes each slice (``(E, out, in)`` -> ``(E, in, out)``). Built in: ``"minilm"``
      (Hugging Face BertModel names -> :class:`jaxbnb.models.bert.MiniLM`, torch ``(out, in)``
      weights transposed to kernels) and ``"gpt"`` / ``None`` (the file holds the params' own
      dotted names, as ``path_str`` gives).
    target: optional abstract params (e.g. ``jax.eval_shape(lambda: nnx.state(model))`` or its
      pure dict): every target leaf must get a tensor, every tensor a target leaf, with equal
      shapes and compatible dtypes (``ValueError`` listing what differs, raised before any data
      is read). Floats are cast to the target's float dtypes, other tensors widened losslessly
      (an int64 or bool tensor for a float32 leaf is refused); the result uses the target's
      keys.
    sharding: a ``Sharding`` for every leaf, or ``(dotted path, shape) -> Sharding | None``.
      Float leaves get it (replicated on its mesh where the shape does not divide); a quantized
      leaf's arrays get its axis-0 part (when it divides, else replicated). The float tensor
      goes onto the devices with that axis-0 sharding, so quantization runs sharded. A stacked
      leaf's arrays keep the mesh axes of the stack axes, then take the slice's axis-0 part;
      each device keeps only its part of the stack.
    progress: show a tqdm bar of bytes read (with the bytes kept on the device).

  Returns:
    Nested dicts of arrays and :class:`Quantized4bit`/:class:`Quantized8bit` leaves, equal bit
    for bit to ``jaxbnb.quantize`` of the float params; feed it to ``nnx.replace_by_pure_dict``
    or use it as Linen's ``{'params': ...}``.
  """
  if config is not None and not isinstance(config, BitsAndBytesConfig):
    raise TypeError("load_quantized(path, config) needs a jaxbnb.BitsAndBytesConfig or None")
  source = path if isinstance(path, TensorSource) else _SafetensorsSource(path)
  names = source.keys()
  fn = _builtin(mapping, names)

  # Plan from the headers alone: names, shapes, dtypes; nothing is read yet.
  marked = ({} if config is None or target is None else _marked_stacks(target, config))
  entries: dict[str, dict] = {}
  for name in names:
    r = _resolve(fn, name)
    if r is None:
      continue
    keys, transpose = r
    shape, dtype = source.info(name)
    shape = tuple(shape)
    dotted = _dotted(keys)
    if dotted in entries:
      raise ValueError(f"{entries[dotted]['name']!r} and {name!r} both map to {dotted}")
    n = _stack_count(dotted, len(shape), config, marked)
    entries[dotted] = dict(name=name, keys=keys, transpose=transpose, raw_shape=shape,
                           dtype=dtype, n_stack=n,
                           shape=tuple(shape[i] for i in _t_axes(len(shape), n))
                           if transpose else shape)
  if target is not None:
    want = _check_target(entries, target)
    for dotted, e in entries.items():
      e["keys"] = want[dotted][0]
      e["out_dtype"] = want[dotted][2]

  tree: dict = {}
  used: set = set()
  total = sum(_bytes(e["raw_shape"], e["dtype"]) for e in entries.values())
  kept = 0
  bar = _bar(total, progress)
  try:
    for dotted, e in entries.items():
      s = sharding(dotted, e["shape"]) if callable(sharding) else sharding
      dtype, out_dtype = e["dtype"], np.dtype(e.get("out_dtype", e["dtype"]))
      layout = None if config is None else _layout(
          dotted.rsplit(".", 1)[-1], jax.ShapeDtypeStruct(e["shape"], out_dtype), config)
      if layout is not None:
        hit = [p for p in config.llm_int8_skip_modules if _matches(p, dotted)]
        used.update(hit)
        layout = None if hit else layout
      n_stack = 0 if layout is None else stack_axes_of(
          dotted, jax.ShapeDtypeStruct(e["shape"], out_dtype), config, marked)
      host = source.read(e["name"])
      if layout is None:
        x = host.transpose(_t_axes(host.ndim, e["n_stack"])) if e["transpose"] else host
        leaf = jax.device_put(x.astype(out_dtype, copy=False), _fit(s, e["shape"]))
      elif n_stack:
        leaf = _quantize_stacked(host, e, n_stack, layout, config, s, out_dtype)
      else:
        x = jax.device_put(host, _axis0(s, e["raw_shape"]))
        del host  # the device copy is all we need; free the host copy before the quantizer runs
        host = None
        leaf = _quantizer(e["raw_shape"], dtype, e["transpose"], out_dtype, layout, config,
                          s)(x)
        jax.block_until_ready(leaf)  # one float tensor in flight, not a queue of them
        x.delete()
        del x
      del host
      kept += sum(a.nbytes for a in jax.tree.leaves(leaf))
      _insert(tree, e["keys"], leaf)
      if bar is not None:
        bar.update(_bytes(e["raw_shape"], dtype))
        bar.set_postfix_str(f"kept {_human(kept)}", refresh=False)
  finally:
    if bar is not None:
      bar.close()
  unused = [p for p in (config.llm_int8_skip_modules if config is not None else ())
            if p not in used and p != "lm_head"]
  if unused:
    warnings.warn(f"llm_int8_skip_modules patterns matched no quantizable leaf: {unused}",
                  stacklevel=2)
  return tree


def _stack_count(dotted: str, ndim: int, config, marked: dict) -> int:
  """Leading stack axes of the tensor at ``dotted`` (as :func:`jaxbnb.tree.stack_axes_of`;
  0 where a slice would not be a matrix): a stacked tensor is transposed slice by slice."""
  if config is None:
    return 0
  n = next((n for p, n in config.stacked_axes.items() if _matches(p, dotted)),
           marked.get(dotted, 0))
  return n if ndim - n >= 2 else 0


def _t_axes(ndim: int, n_stack: int) -> tuple[int, ...]:
  """Axes of a transpose that keeps ``n_stack`` leading stack axes and reverses the rest (a
  torch ``(out, in)`` weight per slice becomes a ``(in, out)`` kernel per slice)."""
  return tuple(range(n_stack)) + tuple(range(ndim - 1, n_stack - 1, -1))


def _header(file) -> tuple[int, dict]:
  """(byte offset of the data, {name: header entry}) of one safetensors file."""
  with open(file, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  return 8 + n, header


def _read_tensor(file, name: str, headers: dict) -> np.ndarray:
  """One tensor read with plain file reads (not through the memory map).

  Pages of a memory-mapped file stay in the process's resident set while the map is open, so
  mmap reads would grow RSS to the whole checkpoint; a read into a fresh buffer keeps the host
  at one tensor beyond the page cache.
  """
  file = os.fspath(file)
  if file not in headers:
    headers[file] = _header(file)
  start, header = headers[file]
  info = header[name]
  begin, end = info["data_offsets"]
  dtype = _np_dtype(info["dtype"])
  count = (end - begin) // dtype.itemsize
  if os.path.getsize(file) < start + end:
    raise ValueError(f"{file}: truncated: tensor {name!r} needs bytes up to {start + end}, the "
                     f"file has {os.path.getsize(file)}")
  data = np.fromfile(file, dtype=dtype, count=count, offset=start + begin)
  if data.size != count:
    raise ValueError(f"{file}: tensor {name!r} could not be read in full (truncated file?)")
  return data.reshape(info["shape"])


def _np_dtype(st: str) -> np.dtype:
  table = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
  if st not in table:
    raise ValueError(f"unsupported safetensors dtype {st}")
  return np.dtype(table[st])


def _insert(tree: dict, keys: tuple, leaf) -> None:
  node = tree
  for k in keys[:-1]:
    node = node.setdefault(k, {})
    if not isinstance(node, dict):
      raise ValueError(f"{_dotted(keys)}: {k} is both a leaf and a subtree")
  if keys[-1] in node:
    raise ValueError(f"{_dotted(keys)}: two tensors map to it")
  node[keys[-1]] = leaf


def _human(n: float) -> str:
  for unit in ("B", "kB", "MB", "GB"):
    if n < 1000:
      return f"{n:.1f} {unit}"
    n /= 1000
  return f"{n:.1f} TB"


def _bar(total: int, progress: bool):
  if not progress:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, unit="B", unit_scale=True, desc="load_quantized")


# --- host offload ------------------------------------------------------------------------------


def offload(params: Any, patterns: Sequence[str]) -> Any:
  """``params`` with the float leaves whose path matches ``patterns`` in pinned host memory.

  Patterns match as ``llm_int8_skip_modules`` does (a name matches any path component,
  ``"lm_head"``; a glob matches the dotted path). Matched leaves become :class:`~jaxbnb.interop.HostOffloaded`
  (same values and dtype); run the model through :func:`jaxbnb.intercept`. Quantized leaves
  cannot be offloaded (``ValueError``: keep them out of quantization with
  ``llm_int8_skip_modules``). Without host memory kinds on the backend this warns and returns
  ``params`` unchanged.
  """
  if isinstance(patterns, str):
    patterns = [patterns]
  if not host_memory_supported():
    warnings.warn(f"jaxbnb.interop.offload: {jax.devices()[0].platform} has no '{HOST_KIND}' "
                  f"memory; {list(patterns)} stay in device memory", stacklevel=2)
    return params
  used = set()

  def one(path, leaf):
    name = path_str(path)
    hit = [p for p in patterns if _matches(p, name)]
    if not hit or is_offloaded(leaf):
      return leaf
    used.update(hit)
    if is_quantized(leaf):
      raise ValueError(f"{name} is quantized; only float leaves are offloaded (add "
                       f"{hit[0]!r} to llm_int8_skip_modules to keep it in full precision)")
    if not isinstance(leaf, jax.Array):
      return leaf
    return HostOffloaded(jax.device_put(leaf, leaf.sharding.with_memory_kind(HOST_KIND)))

  out = jax.tree_util.tree_map_with_path(
      one, params, is_leaf=lambda x: is_quantized(x) or is_offloaded(x))
  unused = [p for p in patterns if p not in used]
  if unused:
    warnings.warn(f"offload patterns matched no leaf: {unused}", stacklevel=2)
  return out
