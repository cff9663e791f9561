"""bitsandbytes / transformers ``.safetensors`` checkpoints, read and written bit for bit.

The layout bnb 0.50.2 writes (``module.state_dict()`` of its layers, as transformers saves it):

``Linear4bit`` / ``Params4bit`` (4-bit NF4/FP4), for a parameter ``P`` (e.g. ``0.weight``)::

  P                                   packed codes, quant_storage dtype (n, 1) (uint8 by default)
  P.absmax                            float32 (nblocks,), or uint8 (nblocks,) when nested
  P.quant_map                         float32 (16,), the 4-bit code table
  P.nested_absmax                     float32 (ceil(nblocks / 256),)          (nested only)
  P.nested_quant_map                  float32 (256,), the signed dynamic map   (nested only)
  P.quant_state.bitsandbytes__nf4     uint8 bytes of a JSON object: quant_type, blocksize, dtype,
                                      shape (+ nested_blocksize, nested_dtype, nested_offset)

``Linear8bitLt`` (LLM.int8()), for a module prefix ``M``: ``M.weight`` int8 ``(out, in)``,
``M.SCB`` float32 ``(out,)``, ``M.weight_format`` uint8 scalar (0 = row-major, the only one).

Everything else is an ordinary tensor. No pickle is ever read: ``.bin``/``.pt`` files are
refused with the one-line conversion to safetensors.

Stacked leaves (scanned layers, MoE experts; ``leaf.stack_shape != ()``) have no bnb form: bnb
quantizes 2-D weights only. They are written as one tensor set per slice, named as Hugging Face
names per-layer modules: the slice index goes after the path component that ``stacked_axes``
names (``layers.mlp.up.kernel`` of a ``(L, in, out)`` stack -> ``layers.{i}.mlp.up.kernel``,
``i < L``), and the same ``stacked_axes`` on load stacks them back (see
:func:`save_bnb_state_dict`).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import tempfile
import warnings
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxbnb.functional import QuantState
from jaxbnb.functional._checks import BLOCKSIZES_4BIT, BLOCKSIZES_8BIT
from jaxbnb.functional.codebooks import _four_bit_np
from jaxbnb.qtensor import Quantized4bit, Quantized8bit, QuantizedArray, is_quantized
from jaxbnb.tree import _matches, path_str

PathLike = Union[str, os.PathLike]
# mapping(name) -> new name | (new name, transpose) | (new name, transpose, shape) | None (drop);
# or a dict {name: new name} (names it lacks keep their name).
NameMap = Union[Callable[[str], Any], Mapping[str, Any]]
# {path pattern: number of leading stack axes}, as BitsAndBytesConfig.stacked_axes.
StackedAxes = Optional[Mapping[str, int]]

_QS_PREFIX = "quant_state.bitsandbytes__"
_QS_RE = re.compile(r"^(?P<param>.+)\.quant_state\.bitsandbytes__(?P<qt>[^.]*)$")
_COMPANIONS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_FLOAT_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                 "bfloat16": np.dtype(jnp.bfloat16)}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
# safetensors metadata key for what bnb's format does not hold (compute dtype, int8 dtype and
# threshold); transformers and bnb ignore it.
_HINTS_KEY = "jaxbnb"


# --- Flax views of bnb-layout leaves -------------------------------------------------------------


def as_flax_kernel(leaf, shape: Optional[tuple[int, ...]] = None):
  """The Flax kernel view ``(in..., out...)`` of a bnb ``(out, in)`` weight: the same bits.

  For a quantized leaf this only changes static metadata (``transposed=True``), never the packed
  data, so ``jaxbnb.matmul(x, as_flax_kernel(L)) == x @ W.T``. A float array ``(out, in)`` is
  transposed. ``shape`` (default ``(in, out)``) may split the axes, e.g. an ``nnx.Einsum`` kernel
  ``(d, 3, heads, head_dim)``: its leading axes whose product is ``in`` are the input axes.
  """
  if is_quantized(leaf):
    n_out, n_in = leaf.matrix_shape
    shape = (n_in, n_out) if shape is None else tuple(int(s) for s in shape)
    k = _split_point(shape, n_in, n_out)
    if k is None:
      raise ValueError(f"kernel shape {shape} does not hold the (out, in) = {(n_out, n_in)} "
                       "matrix as (in..., out...)")
    return _replace(leaf, shape=shape, transposed=True, n_in=k)
  w = jnp.asarray(leaf)
  kernel = w.reshape(w.shape[0], -1).T
  return kernel if shape is None else kernel.reshape(shape)


def as_bnb_weight(leaf):
  """The bnb ``(out, in)`` weight view of a Flax kernel (inverse of :func:`as_flax_kernel`).

  Quantized leaves keep their bits (``transposed=False``, 2-D matrix shape); a float kernel
  ``(in, out...)`` becomes ``kernel.reshape(in, -1).T``.
  """
  if is_quantized(leaf):
    return _replace(leaf, shape=leaf.matrix_shape, transposed=False, n_in=1)
  k = jnp.asarray(leaf)
  return k.reshape(k.shape[0], -1).T


def _split_point(shape, n_in, n_out) -> Optional[int]:
  for k in range(1, len(shape)):
    if math.prod(shape[:k]) == n_in and math.prod(shape[k:]) == n_out:
      return k
  return None


def _replace(leaf, **kw):
  fields = {f: getattr(leaf, f) for f in leaf.__dataclass_fields__}
  fields.update(kw)
  return type(leaf)(**fields)


# --- the quant_state JSON blob -----------------------------------------------------------------


def parse_quant_state(blob, key: str = "quant_state") -> dict[str, Any]:
  """Parse and validate a ``...quant_state.bitsandbytes__<type>`` blob (uint8 bytes of JSON).

  Returns ``{quant_type, blocksize, dtype, shape}`` and, when nested,
  ``{nested_blocksize, nested_dtype, nested_offset}`` with Python/numpy types. Unknown extra
  fields are ignored. Anything malformed raises ``ValueError`` naming ``key``.
  """
  arr = np.asarray(blob)
  if arr.dtype != np.uint8 or arr.ndim != 1:
    raise ValueError(f"{key}: a quant_state blob is a 1-D uint8 tensor of JSON bytes; got "
                     f"{arr.dtype} {arr.shape}")
  try:
    obj = json.loads(arr.tobytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise ValueError(f"{key}: the quant_state blob is not UTF-8 JSON ({e})") from None
  if not isinstance(obj, dict):
    raise ValueError(f"{key}: the quant_state blob must be a JSON object; got "
                     f"{type(obj).__name__}")
  missing = [f for f in ("quant_type", "blocksize", "dtype", "shape") if f not in obj]
  if missing:
    raise ValueError(f"{key}: the quant_state blob lacks {missing}; it has {sorted(obj)}")
  out: dict[str, Any] = {}
  qt = obj["quant_type"]
  if qt not in ("nf4", "fp4"):
    raise ValueError(f"{key}: quant_type must be 'nf4' or 'fp4'; got {qt!r}")
  out["quant_type"] = qt
  out["blocksize"] = _json_int(obj["blocksize"], BLOCKSIZES_4BIT, key, "blocksize")
  out["dtype"] = _json_dtype(obj["dtype"], key, "dtype")
  shape = obj["shape"]
  if (not isinstance(shape, list) or not shape or
      not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s < 2**48 for s in shape)):
    raise ValueError(f"{key}: shape must be a non-empty list of positive ints; got {shape!r}")
  out["shape"] = tuple(shape)
  nested = [f for f in ("nested_blocksize", "nested_dtype", "nested_offset") if f in obj]
  if nested and len(nested) != 3:
    raise ValueError(f"{key}: nested statistics need nested_blocksize, nested_dtype and "
                     f"nested_offset; the blob has only {nested}")
  if nested:
    out["nested_blocksize"] = _json_int(obj["nested_blocksize"], BLOCKSIZES_8BIT, key,
                                        "nested_blocksize")
    if obj["nested_dtype"] != "float32":
      raise ValueError(f"{key}: nested_dtype must be 'float32'; got {obj['nested_dtype']!r}")
    out["nested_dtype"] = np.dtype(np.float32)
    off = obj["nested_offset"]
    if isinstance(off, bool) or not isinstance(off, (int, float)):
      raise ValueError(f"{key}: nested_offset must be a number; got {off!r}")
    # JSON from Python may hold NaN/Infinity, and 1e39 becomes inf in float32: every block
    # would dequantize to NaN/inf. bnb writes offset.item() of a finite mean.
    with np.errstate(over="ignore"):
      off32 = np.float32(off)
    if not np.isfinite(off32):
      raise ValueError(f"{key}: nested_offset must be a finite float32 number; got {off!r}")
    out["nested_offset"] = off32
  return out


def _json_int(v, allowed, key, field) -> int:
  if isinstance(v, bool) or not isinstance(v, int) or v not in allowed:
    raise ValueError(f"{key}: {field} must be one of {list(allowed)}; got {v!r}")
  return v


def _json_dtype(v, key, field) -> np.dtype:
  if not isinstance(v, str) or v not in _FLOAT_DTYPES:
    raise ValueError(f"{key}: {field} must be one of {list(_FLOAT_DTYPES)}; got {v!r}")
  return _FLOAT_DTYPES[v]


def quant_state_blob(state: QuantState) -> np.ndarray:
  """The uint8 JSON blob bnb 0.50.2 writes for ``state`` (same fields, order and formatting)."""
  d: dict[str, Any] = {"quant_type": state.quant_type, "blocksize": int(state.blocksize),
                       "dtype": np.dtype(state.dtype).name,
                       "shape": [int(s) for s in state.shape]}
  if state.nested:
    d.update(nested_blocksize=int(state.state2.blocksize),
             nested_dtype=np.dtype(state.state2.dtype).name,
             # bnb: offset.item(), a Python float of the float32 value.
             nested_offset=float(np.asarray(state.offset, np.float32)))
  return np.frombuffer(json.dumps(d).encode("utf-8"), np.uint8).copy()


# --- reading -----------------------------------------------------------------------------------


def _pickle_refusal(path: pathlib.Path) -> ValueError:
  return ValueError(
      f"{path}: refusing to read a PyTorch pickle (.bin/.pt/.pth): unpickling can run arbitrary "
      "code, and jaxbnb never does it. Convert it once, where you trust the file, to "
      "safetensors: `import torch, safetensors.torch; safetensors.torch.save_file("
      "torch.load(path, weights_only=True), 'model.safetensors')`, or in transformers "
      "`model.save_pretrained(out_dir, safe_serialization=True)`; then load that.")


class _Reader:
  """Tensor name -> numpy array over one file or the shards of an index (memory-mapped)."""

  def __init__(self, path: PathLike):
    path = pathlib.Path(path)
    if path.is_dir():
      if (path / _INDEX).is_file():
        files = self._from_index(path / _INDEX)
      elif (path / _SINGLE).is_file():
        files = {None: path / _SINGLE}
      else:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
          raise _pickle_refusal(path / pickles[0])
        raise FileNotFoundError(f"{path}: no {_SINGLE} or {_INDEX} in this directory")
    elif path.name.endswith(".index.json"):
      files = self._from_index(path)
    elif path.suffix in _PICKLE_SUFFIXES:
      raise _pickle_refusal(path)
    elif path.is_file():
      with open(path, "rb") as f:
        head = f.read(9)
      # safetensors: a u64 header length, then '{'. Only without that '{' can a leading 'PK'
      # (torch zip archive) or 0x80 (raw pickle) mean a pickle: a length byte may be 0x80.
      if head[8:9] != b"{" and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise _pickle_refusal(path)
      files = {None: path}
    else:
      raise FileNotFoundError(f"{path}: no such file or directory")
    self.handles, self.where, self.metadata = {}, {}, {}
    for name, file in files.items():
      if file not in self.handles:
        try:
          self.handles[file] = safe_open(str(file), framework="numpy")
        except Exception as e:  # safetensors raises its own error type
          raise ValueError(f"{file}: not a valid safetensors file ({e})") from None
        self.metadata.update(self.handles[file].metadata() or {})
      if name is None:
        for k in self.handles[file].keys():
          self.where[k] = file
    for name, file in files.items():
      if name is not None:
        if name not in set(self.handles[file].keys()):
          raise ValueError(f"{_INDEX} maps {name!r} to {file.name}, which does not hold it")
        self.where[name] = file

  @staticmethod
  def _from_index(index: pathlib.Path) -> dict:
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
      if not isinstance(weight_map, dict):
        raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from None
    out = {}
    for name, file in weight_map.items():
      # Shards live in the index's folder (or below it): an absolute or ../ path would read
      # a file the checkpoint does not own. Symlinks inside the folder (the Hugging Face
      # cache's) are followed as usual.
      rel = pathlib.PurePath(file) if isinstance(file, str) else None
      if rel is None or rel.is_absolute() or rel.drive or ".." in rel.parts or not rel.parts:
        raise ValueError(f"{index}: shard {file!r} (holding {name!r}) must be a file name "
                         "relative to the index's folder, without '..'")
      shard = index.parent / rel
      if shard.suffix in _PICKLE_SUFFIXES:
        raise _pickle_refusal(shard)
      if not shard.is_file():
        raise FileNotFoundError(f"{index}: shard {file} (holding {name!r}) is missing")
      out[name] = shard
    return out

  def keys(self):
    return list(self.where)

  def __contains__(self, k):
    return k in self.where

  def get(self, k) -> np.ndarray:
    return self.handles[self.where[k]].get_tensor(k)


def _load_hints(metadata: dict) -> dict:
  raw = metadata.get(_HINTS_KEY)
  if raw is None:
    return {}
  try:
    hints = json.loads(raw)
    if isinstance(hints, dict) and all(isinstance(v, dict) for v in hints.values()):
      return hints
  except (ValueError, RecursionError):
    pass
  warnings.warn(f"ignoring malformed '{_HINTS_KEY}' safetensors metadata", stacklevel=3)
  return {}


def _hint_dtype(hint: dict, field: str, default):
  v = hint.get(field)
  return _FLOAT_DTYPES[v] if v in _FLOAT_DTYPES else default


def _need(reader: _Reader, key: str, what: str) -> np.ndarray:
  if key not in reader:
    raise ValueError(f"{what}: the companion tensor {key!r} is missing from the checkpoint")
  return reader.get(key)


def _check_array(arr, key, dtype, shape) -> None:
  if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != tuple(shape):
    raise ValueError(f"{key}: expected {np.dtype(dtype)} {tuple(shape)}; got {arr.dtype} "
                     f"{tuple(arr.shape)}")


def _load_4bit(reader: _Reader, param: str, blob_key: str, compute_dtype) -> Quantized4bit:
  qs = parse_quant_state(reader.get(blob_key), blob_key)
  suffix = blob_key.rsplit("__", 1)[1]
  if qs["quant_type"] != suffix:
    raise ValueError(f"{blob_key}: the key says {suffix!r} but the blob says {qs['quant_type']!r}")
  packed = _need(reader, param, blob_key)
  n = math.prod(qs["shape"])
  nblocks = -(-n // qs["blocksize"])
  if packed.ndim != 2 or packed.shape[1] != 1 or packed.nbytes * 2 < n:
    raise ValueError(f"{param}: packed 4-bit data must be (n, 1) holding {n} codes; got "
                     f"{packed.dtype} {packed.shape}")
  code = _need(reader, param + ".quant_map", param)
  _check_array(code, param + ".quant_map", np.float32, (16,))
  want = _four_bit_np(qs["quant_type"])
  if not np.array_equal(code.view(np.uint32), want.view(np.uint32)):
    raise ValueError(f"{param}.quant_map differs from bitsandbytes' {qs['quant_type']} table "
                     f"(stored {code.tolist()}, expected {want.tolist()}); bnb's kernels decode "
                     "with the built-in table, so this checkpoint cannot be read consistently")
  absmax = _need(reader, param + ".absmax", param)
  nested = "nested_blocksize" in qs
  has_nested = [k for k in ("nested_absmax", "nested_quant_map") if f"{param}.{k}" in reader]
  if nested and len(has_nested) != 2:
    raise ValueError(f"{blob_key}: the blob describes nested statistics, but "
                     f"{param}.nested_absmax / .nested_quant_map are missing")
  if not nested and has_nested:
    raise ValueError(f"{param}: nested tensors {has_nested} are present but the quant_state "
                     "blob has no nested_blocksize/nested_dtype/nested_offset")
  common = dict(code=jnp.asarray(code), blocksize=qs["blocksize"],
                quant_type=qs["quant_type"], shape=qs["shape"], dtype=qs["dtype"])
  if nested:
    _check_array(absmax, param + ".absmax", np.uint8, (nblocks,))
    absmax2 = reader.get(param + ".nested_absmax")
    _check_array(absmax2, param + ".nested_absmax", np.float32,
                 (-(-nblocks // qs["nested_blocksize"]),))
    code2 = reader.get(param + ".nested_quant_map")
    _check_array(code2, param + ".nested_quant_map", np.float32, (256,))
    state2 = QuantState(absmax=jnp.asarray(absmax2), code=jnp.asarray(code2),
                        blocksize=qs["nested_blocksize"], quant_type="dynamic",
                        shape=(nblocks,), dtype=qs["nested_dtype"])
    state = QuantState(absmax=jnp.asarray(absmax), offset=jnp.asarray(qs["nested_offset"]),
                       state2=state2, **common)
  else:
    _check_array(absmax, param + ".absmax", np.float32, (nblocks,))
    state = QuantState(absmax=jnp.asarray(absmax), **common)
  return Quantized4bit(packed=jnp.asarray(packed), state=state, shape=qs["shape"],
                       dtype=qs["dtype"], transposed=False, n_in=1,
                       compute_dtype=np.dtype(compute_dtype or qs["dtype"]))


def _load_8bit(reader: _Reader, prefix: str, dtype, threshold) -> Quantized8bit:
  wkey, skey, fkey = prefix + "weight", prefix + "SCB", prefix + "weight_format"
  cb = _need(reader, wkey, skey)
  scb = reader.get(skey)
  if cb.dtype != np.int8 or cb.ndim != 2:
    raise ValueError(f"{wkey}: an LLM.int8() weight (beside {skey}) must be int8 (out, in); "
                     f"got {cb.dtype} {cb.shape}")
  _check_array(scb, skey, np.float32, (cb.shape[0],))
  if fkey in reader:
    fmt = reader.get(fkey)
    if fmt.size != 1 or int(fmt.reshape(-1)[0]) != 0:
      raise ValueError(f"{fkey}: only the row-major int8 format (0) is supported (as in bnb "
                       f"0.50.2); got {fmt.tolist()}")
  return Quantized8bit(CB=jnp.asarray(cb), SCB=jnp.asarray(scb), shape=tuple(cb.shape),
                       dtype=np.dtype(dtype), transposed=False, n_in=1,
                       threshold=float(threshold))


def load_bnb_state_dict(path: PathLike, *, compute_dtype=None, int8_dtype=None,
                        int8_threshold=None, stacked_axes: StackedAxes = None
                        ) -> dict[str, Any]:
  """Read a bitsandbytes / transformers safetensors checkpoint.

  Args:
    path: a ``.safetensors`` file, a ``model.safetensors.index.json``, or a directory holding
      ``model.safetensors`` or a sharded ``model.safetensors.index.json``.
    compute_dtype: matmul dtype of 4-bit leaves (bnb does not store it; default the weight's
      dtype, or what jaxbnb recorded when it wrote the file).
    int8_dtype, int8_threshold: dequantization dtype (default float16) and outlier threshold
      (default 6.0) of LLM.int8() leaves (not stored by bnb either).
    stacked_axes: ``{pattern: n}`` (as ``BitsAndBytesConfig.stacked_axes``, matched against
      the file's names): per-slice tensors (``layers.3.mlp.weight`` for ``{"layers": 1}``)
      come back as one stacked leaf (``layers.mlp.weight``; see :func:`to_flax`, which does the
      same on Flax names after a mapping).

  Returns:
    ``{name: leaf}`` with names as in the torch module (``"0.weight"``, ``"0.bias"``; the
    quant-state companions are folded in). 4-bit weights are :class:`~jaxbnb.Quantized4bit` and 8-bit
    weights :class:`~jaxbnb.Quantized8bit` in bnb's ``(out, in)`` layout (``transposed=False``) holding
    the file's bits; other tensors are ``jnp`` arrays.

  Raises:
    ValueError: pickles (``.bin``/``.pt``), malformed quant-state blobs, missing or
      inconsistent companion tensors, a quant_map that is not bnb's table.
  """
  reader = _Reader(path)
  hints = _load_hints(reader.metadata)
  keys = reader.keys()
  used: set[str] = set()
  out: dict[str, Any] = {}
  params4: dict[str, str] = {}
  for k in keys:
    m = _QS_RE.match(k)
    if m:
      p = m.group("param")
      if p in params4:
        raise ValueError(f"{p}: two quant_state blobs ({params4[p]!r} and {k!r})")
      params4[p] = k
  for p, blob_key in sorted(params4.items()):
    h = hints.get(p, {})
    out[p] = _load_4bit(reader, p, blob_key,
                        compute_dtype or _hint_dtype(h, "compute_dtype", None))
    used.update([p, blob_key] + [f"{p}.{c}" for c in _COMPANIONS])
  for k in keys:
    if k.endswith("SCB") and (k == "SCB" or k.endswith(".SCB")) and k not in used:
      prefix = k[:-3]
      h = hints.get(prefix + "weight", {})
      out[prefix + "weight"] = _load_8bit(
          reader, prefix, int8_dtype or _hint_dtype(h, "dtype", np.dtype(np.float16)),
          int8_threshold if int8_threshold is not None else h.get("threshold", 6.0))
      used.update([prefix + "weight", k, prefix + "weight_format"])
  for k in keys:
    if k not in used:
      out[k] = jnp.asarray(reader.get(k))
  return dict(sorted(_restack(out, stacked_axes).items()))


# --- stacked leaves: one tensor set per slice ---------------------------------------------------
#
# Naming rule. A leaf with stack axes (a quantized leaf's ``stack_shape``; for a float leaf with
# more than ``n`` axes, the ``n`` leading axes that the first matching ``stacked_axes`` pattern
# names) is written as one tensor per slice. Its dotted name gets the slice index (one
# component per stack axis, outermost first) right after the path component(s) of that
# pattern's first occurrence: ``{"layers": 1}``: ``layers.mlp.up.kernel`` ->
# ``layers.{i}.mlp.up.kernel``; ``{"moe.experts": 1}``: ``blocks.0.moe.experts.w1.kernel`` ->
# ``blocks.0.moe.experts.{e}.w1.kernel``.
# A glob pattern names no component, and a stack the model's metadata marked has no pattern:
# the index then goes after the first component (``params.{i}.layers...``; first for a
# one-component name). Loading with the same ``stacked_axes`` stacks the slices back.


def _plain(pattern: str) -> bool:
  return not any(c in pattern for c in "*?[")


def _first_pattern(name: str, stacked_axes: StackedAxes) -> tuple[Optional[str], int]:
  """The first ``stacked_axes`` pattern matching ``name`` and its count, or (None, 0)."""
  for pattern, n in (stacked_axes or {}).items():
    if _matches(pattern, name):
      return pattern, int(n)
  return None, 0


def _site(pattern: Optional[str], parts: list[str]) -> int:
  """Position in ``parts`` (a name's components, without slice indexes) of the slice indexes."""
  if pattern is not None and _plain(pattern):
    want = pattern.split(".")
    for i in range(len(parts) - len(want) + 1):
      if parts[i:i + len(want)] == want:
        return i + len(want)
  return 1 if len(parts) > 1 else 0


def _unstack(name: str, leaf, stacked_axes: StackedAxes) -> list[tuple[str, Any]]:
  """``[(slice name, slice)]`` of a stacked leaf in row-major order (``[(name, leaf)]`` else)."""
  pattern, n = _first_pattern(name, stacked_axes)
  if is_quantized(leaf):
    stack = leaf.stack_shape
    if pattern is not None and len(stack) != n:
      raise ValueError(f"{name}: a quantized leaf with {len(stack)} stack axes {stack}, but "
                       f"stacked_axes[{pattern!r}] = {n}: pass the stacked_axes it was "
                       "quantized with")
  else:
    shape = getattr(leaf, "shape", ())
    # Only leaves with axes beyond the stack's: a (layers, d) norm under a 2-axis pattern
    # stays whole rather than becoming layers * d scalars.
    stack = tuple(shape[:n]) if pattern is not None and len(shape) > n else ()
  if not stack:
    return [(name, leaf)]
  parts = name.split(".")
  k = _site(pattern, parts)
  return [(".".join(parts[:k] + [str(i) for i in idx] + parts[k:]), leaf[idx])
          for idx in np.ndindex(*stack)]


def _slice_of(name: str, stacked_axes: StackedAxes) -> Optional[tuple[str, tuple[int, ...]]]:
  """(stacked name, slice index) when ``name`` is a slice name :func:`_unstack` writes."""
  parts = name.split(".")
  for pattern, n in (stacked_axes or {}).items():
    n = int(n)
    if _plain(pattern):
      if not _matches(pattern, name):
        continue
      k = _site(pattern, parts)
    else:
      k = 1 if len(parts) - n > 1 else 0
    idx = parts[k:k + n]
    if len(idx) == n and all(p.isascii() and p.isdigit() and p == str(int(p)) for p in idx):
      base = ".".join(parts[:k] + parts[k + n:])
      if _first_pattern(base, stacked_axes)[0] == pattern:
        return base, tuple(int(p) for p in idx)
  return None


def _describe(leaf) -> str:
  if is_quantized(leaf):
    return f"{type(leaf).__name__} {jax.tree.structure(leaf)}"
  return f"{np.dtype(leaf.dtype)} {tuple(leaf.shape)}"


def _stack(base: str, slices: dict[tuple[int, ...], Any]):
  """One stacked leaf from ``{slice index: slice}`` (every index below the stack's size)."""
  shape = tuple(max(i[a] for i in slices) + 1 for a in range(len(next(iter(slices)))))
  order = list(np.ndindex(*shape))
  missing = [i for i in order if i not in slices]
  if missing:
    raise ValueError(f"{base}: slices {missing[:3]} of the stack {shape} are missing (found "
                     f"{len(slices)} of {len(order)}); a stack needs every slice")
  leaves = [slices[i] for i in order]
  first = leaves[0]
  for i, leaf in zip(order, leaves):
    same = (jax.tree.structure(leaf) == jax.tree.structure(first) if is_quantized(first)
            else not is_quantized(leaf) and leaf.shape == first.shape
            and leaf.dtype == first.dtype)
    if not same:
      raise ValueError(f"{base}: slice {i} ({_describe(leaf)}) differs from slice "
                       f"{order[0]} ({_describe(first)}); every slice of a stack needs the "
                       "same format, shape and dtype")
  return jax.tree.map(lambda *a: jnp.stack(a).reshape(*shape, *a[0].shape), *leaves)


def _restack(flat: dict[str, Any], stacked_axes: StackedAxes) -> dict[str, Any]:
  """``flat`` with the slices of each stack (named as :func:`_unstack` names them) stacked
  back under the stacked name; other entries unchanged."""
  if not stacked_axes:
    return dict(flat)
  out: dict[str, Any] = {}
  stacks: dict[str, dict] = {}
  for name, leaf in flat.items():
    hit = _slice_of(name, stacked_axes)
    if hit is None:
      out[name] = leaf
    else:
      stacks.setdefault(hit[0], {})[hit[1]] = leaf
  for base, slices in stacks.items():
    if base in out:
      raise ValueError(f"{base}: the checkpoint holds both this tensor and slices of it")
    out[base] = _stack(base, slices)
  return out


# --- name mapping between bnb state dicts and Flax trees ---------------------------------------


def _map_name(mapping: Optional[NameMap], name: str):
  """(new name, transpose or None, shape or None), or None to drop."""
  if mapping is None:
    return name, False, None
  r = mapping.get(name, name) if isinstance(mapping, Mapping) else mapping(name)
  if r is None:
    return None
  if isinstance(r, str):
    return r, None, None
  if isinstance(r, tuple) and 1 <= len(r) <= 3 and isinstance(r[0], str):
    r = tuple(r) + (None,) * (3 - len(r))
    return r[0], r[1], None if r[2] is None else tuple(r[2])
  raise TypeError(f"mapping({name!r}) must return a name, (name, transpose[, shape]) or None; "
                  f"got {r!r}")


def _is_kernel(name: str) -> bool:
  return name.rsplit(".", 1)[-1] == "kernel"


def to_flax(state_dict: Mapping[str, Any], mapping: Optional[NameMap] = None, *,
            stacked_axes: StackedAxes = None) -> dict:
  """A nested dict of Flax-layout leaves from a bnb ``{name: leaf}`` state dict.

  ``mapping(bnb_name)`` gives the dotted Flax path (``"layers.0.mlp.fc1.kernel"``), or
  ``(path, transpose)``, or ``(path, transpose, shape)``, or ``None`` to drop the tensor; a dict
  maps the names it holds and keeps the others. ``transpose`` defaults to "the Flax name ends in
  ``kernel``": weights become kernel views (:func:`as_flax_kernel`: same bits for quantized
  leaves; float ``(out, in)`` arrays are transposed), reshaped to ``shape`` when given. The result
  feeds ``nnx.replace_by_pure_dict(state, tree)`` or a Linen ``params`` dict.

  ``stacked_axes`` (``{pattern: n}``, as ``BitsAndBytesConfig.stacked_axes``): per-slice
  tensors whose mapped Flax paths carry slice indexes where :func:`save_bnb_state_dict` puts
  them (``layers.3.mlp.kernel`` for ``{"layers": 1}``) are stacked into one leaf
  (``layers.mlp.kernel``, stack axes first; quantized slices keep their bits). Every slice
  must be present and alike (``ValueError`` naming the stack otherwise).
  """
  flat: dict[str, Any] = {}
  for name, leaf in state_dict.items():
    r = _map_name(mapping, name) if mapping is not None else (name, None, None)
    if r is None:
      continue
    path, transpose, shape = r
    if transpose is None:
      transpose = _is_kernel(path)
    if transpose:
      leaf = as_flax_kernel(leaf, shape)
    elif shape is not None:
      leaf = _reshape(leaf, shape, path)
    if path in flat:
      raise ValueError(f"two tensors map to {path}")
    flat[path] = leaf
  tree: dict = {}
  for path, leaf in _restack(flat, stacked_axes).items():
    node = tree
    *parents, last = path.split(".")
    for p in parents:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ValueError(f"{path}: {p} is both a leaf and a subtree")
    if last in node:
      raise ValueError(f"two tensors map to {path}")
    node[last] = leaf
  return tree


def _reshape(leaf, shape, name):
  if not is_quantized(leaf):
    return jnp.reshape(leaf, shape)
  if leaf.transposed:
    return as_flax_kernel(leaf, shape)
  n_out, n_in = leaf.matrix_shape
  if shape[0] != n_out or math.prod(shape[1:]) != n_in:
    raise ValueError(f"{name}: shape {shape} does not hold the (out, in) = {(n_out, n_in)} "
                     "matrix as (out, in...)")
  return _replace(leaf, shape=shape)


def from_flax(tree: Any, mapping: Optional[NameMap] = None, *,
              stacked_axes: StackedAxes = None) -> dict[str, Any]:
  """A bnb ``{name: leaf}`` state dict from any params tree (inverse of :func:`to_flax`).

  Leaves are named by their dotted path (NNX ``.value`` dropped) and renamed by ``mapping``
  (``flax_name -> bnb name | (name, transpose) | None``; see :func:`to_flax`). With a mapping,
  ``transpose`` defaults to "the Flax name ends in ``kernel``" (float kernels become ``(out,
  in)``); quantized leaves always hold bnb's ``(out, in)`` matrix and become that view.

  Stacked leaves become one entry per slice, the slice index inserted into the dotted name
  before ``mapping`` sees it: after the component(s) of the first ``stacked_axes`` pattern
  that matches (``{"layers": 1}``: ``layers.mlp.kernel`` -> ``layers.0.mlp.kernel``, ...),
  else after the first component. Quantized leaves with ``stack_shape`` are always split; float
  leaves when a pattern names ``n`` stack axes and they have more than ``n`` axes.
  """
  out: dict[str, Any] = {}
  flat = [(n, x) for path, leaf in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]
          for n, x in _unstack(path_str(path), leaf, stacked_axes)]
  for name, leaf in flat:
    r = _map_name(mapping, name)
    if r is None:
      continue
    new, transpose, _ = r
    if transpose is None:
      transpose = _is_kernel(name)
    if is_quantized(leaf):
      leaf = as_bnb_weight(leaf)
    elif transpose:
      leaf = as_bnb_weight(leaf)
    if new in out:
      raise ValueError(f"two leaves map to the bnb name {new!r}")
    out[new] = leaf
  return out


# --- writing -----------------------------------------------------------------------------------


def _np(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x))


def _tensors_4bit(name: str, leaf: Quantized4bit) -> dict[str, np.ndarray]:
  st = leaf.state
  if tuple(st.shape) != tuple(leaf.matrix_shape):
    raise ValueError(f"{name}: the QuantState shape {st.shape} is not the leaf's (out, in) "
                     f"matrix {leaf.matrix_shape}")
  t = {name: _np(leaf.packed), f"{name}.absmax": _np(st.absmax),
       f"{name}.quant_map": _np(st.code).astype(np.float32)}
  if st.nested:
    t[f"{name}.nested_absmax"] = _np(st.state2.absmax)
    t[f"{name}.nested_quant_map"] = _np(st.state2.code)
  t[f"{name}.{_QS_PREFIX}{st.quant_type}"] = quant_state_blob(st)
  return t


def _tensors_8bit(name: str, leaf: Quantized8bit) -> dict[str, np.ndarray]:
  if name != "weight" and not name.endswith(".weight"):
    raise ValueError(f"{name}: bnb's Linear8bitLt stores SCB beside its 'weight'; name the "
                     "int8 leaf '<module>.weight'")
  prefix = name[: -len("weight")]
  return {name: _np(leaf.CB), prefix + "SCB": _np(leaf.SCB),
          prefix + "weight_format": np.zeros((), np.uint8)}


def _groups(state_dict: Mapping[str, Any]) -> tuple[list[dict[str, np.ndarray]], dict]:
  """One ``{key: array}`` group per entry (a weight with its companions), and jaxbnb hints."""
  groups, hints, seen = [], {}, set()
  for name, leaf in state_dict.items():
    if isinstance(leaf, QuantizedArray) and leaf.stack_shape:
      raise ValueError(f"{name}: a stacked leaf (stack {leaf.stack_shape}) has no bnb layout; "
                       "write it with save_bnb_state_dict or from_flax, which split it into one "
                       "tensor set per slice")
    if isinstance(leaf, Quantized4bit):
      t = _tensors_4bit(name, leaf)
      hints[name] = {"compute_dtype": np.dtype(leaf.compute_dtype).name}
    elif isinstance(leaf, Quantized8bit):
      t = _tensors_8bit(name, leaf)
      hints[name] = {"dtype": np.dtype(leaf.dtype).name, "threshold": float(leaf.threshold)}
    elif isinstance(leaf, QuantizedArray):
      raise TypeError(f"{name}: no bnb layout for {type(leaf).__name__}")
    elif leaf is None:
      continue
    else:
      t = {name: _np(leaf)}
    clash = seen & set(t)
    if clash:
      raise ValueError(f"{name}: keys {sorted(clash)} are written twice")
    seen.update(t)
    groups.append(t)
  return groups, hints


def bnb_tensors(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """``{key: numpy array}`` in bnb's exact key layout for a ``{name: leaf}`` state dict."""
  return {k: v for g in _groups(state_dict)[0] for k, v in g.items()}


def _atomic_save(tensors: dict, file: pathlib.Path, metadata: dict) -> None:
  # Write beside the target and rename: a crash never leaves a half-written file under its name.
  fd, tmp = tempfile.mkstemp(prefix=file.name + ".", suffix=".tmp", dir=file.parent)
  os.close(fd)
  try:
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, file)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def save_bnb_state_dict(tree: Any, path: PathLike, *, mapping: Optional[NameMap] = None,
                        stacked_axes: StackedAxes = None,
                        max_shard_size: Optional[int] = None,
                        metadata: Optional[dict[str, str]] = None) -> None:
  """Write ``tree`` in bnb 0.50.2's state-dict layout, loadable by transformers + bitsandbytes.

  Args:
    tree: ``{bnb name: leaf}`` (e.g. from :func:`load_bnb_state_dict`), or any params tree
      (Flax) whose leaf paths ``mapping`` renames (see :func:`from_flax`). Quantized leaves are
      written as their ``(out, in)`` bnb matrix with the same bits, whatever their view.
    stacked_axes: ``{pattern: n}`` (pass ``config.stacked_axes``): where the slice index of a
      stacked leaf goes. A stacked leaf (scanned layers, MoE experts) is written as one bnb
      tensor set per slice, named as Hugging Face names per-layer modules: the index goes after
      the first matching pattern's component(s) (``{"layers": 1}``: ``layers.mlp.up.kernel``
      -> ``layers.0.mlp.up.kernel``, ``layers.1...``), else after the first component; float
      leaves a pattern covers (with more axes than it names) are split the same way.
      ``mapping`` then renames each slice.
      Read it back with :func:`to_flax` (or :func:`load_bnb_state_dict`) and the same
      ``stacked_axes``.
    path: a ``.safetensors`` file, or a directory: ``model.safetensors`` in it, or with
      ``max_shard_size`` (bytes) ``model-0000i-of-0000n.safetensors`` shards and
      ``model.safetensors.index.json`` (a parameter's companions stay in one shard).
    metadata: extra safetensors metadata strings (``format: pt`` is always written).
  """
  groups, hints = _groups(from_flax(tree, mapping, stacked_axes=stacked_axes))
  tensors = {k: v for g in groups for k, v in g.items()}
  meta = {"format": "pt", **(metadata or {}), _HINTS_KEY: json.dumps(hints, sort_keys=True)}
  path = pathlib.Path(path)
  if path.suffix == ".safetensors":
    if max_shard_size is not None:
      raise ValueError("max_shard_size needs a directory path (shards + index.json)")
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(tensors, path, meta)
    return
  path.mkdir(parents=True, exist_ok=True)
  if max_shard_size is None:
    _atomic_save(tensors, path / _SINGLE, meta)
    return
  # A parameter and its companions stay in one shard; shards fill in order.
  shards: list[list[str]] = [[]]
  size = 0
  for g in groups:
    keys, n = list(g), sum(v.nbytes for v in g.values())
    if shards[-1] and size + n > max_shard_size:
      shards.append([])
      size = 0
    shards[-1].extend(keys)
    size += n
  weight_map = {}
  for i, keys in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    _atomic_save({k: tensors[k] for k in keys}, path / fname, meta)
    weight_map.update({k: fname for k in keys})
  index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
           "weight_map": dict(sorted(weight_map.items()))}
  tmp = path / (_INDEX + ".tmp")
  tmp.write_text(json.dumps(index, indent=2))
  os.replace(tmp, path / _INDEX)
