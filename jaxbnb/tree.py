"""``quantize`` / ``dequantize`` / ``memory_footprint`` over any params pytree.

Which leaves are quantized (transformers' rule, by leaf name):
  * ``kernel`` (Flax ``Dense``/``DenseGeneral``/``Einsum``/NNX ``Linear``, ``(in..., out...)``):
    quantized as a linear weight, blocks along its input axis (bnb's ``(out, in)`` order);
  * ``weight`` of rank >= 2 (torch-style ``(out, in)`` dicts): quantized as is;
  * ``embedding`` (``nn.Embed``/``nnx.Embed`` tables): only with ``quantize_embeddings=True``;
  * everything else (biases, norms, scalars, integer leaves) is left alone, as are paths
    matching ``llm_int8_skip_modules``.

Stacked weights (scanned layers, MoE experts): a leaf with ``n`` leading stack axes, named by
``stacked_axes`` or marked by the model's own axis metadata, is quantized slice by slice and its
rule (above) applies to each slice.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb.config import STACK_AXIS_NAMES, BitsAndBytesConfig
from jaxbnb.qtensor import (Quantized4bit, Quantized8bit, QuantizedArray, is_quantized,
                            quantize_4bit_array, quantize_8bit_array)


def path_str(path) -> str:
  """Dotted name of a pytree key path, e.g. ``layers.0.attn.kernel`` (NNX ``.value`` dropped)."""
  parts = []
  for k in path:
    name = getattr(k, "key", None)
    if name is None:
      name = getattr(k, "name", None)
    if name is None:
      name = getattr(k, "idx", k)
    parts.append(str(name))
  if parts and parts[-1] in ("value", "raw_value"):
    parts.pop()
  return ".".join(parts)


def _matches(pattern: str, path: str) -> bool:
  if any(c in pattern for c in "*?["):
    return fnmatch.fnmatchcase(path, pattern)
  parts = path.split(".")
  want = pattern.split(".")
  return any(parts[i:i + len(want)] == want for i in range(len(parts) - len(want) + 1))


def _layout(name: str, leaf, cfg: BitsAndBytesConfig) -> Optional[tuple[bool, int]]:
  """(transposed, n_in) for a quantizable leaf, or None."""
  if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
    return None
  if leaf.ndim < 2:
    return None
  if name == "kernel":
    return True, 1
  if name == "weight":
    return False, 1
  if name == "embedding" and cfg.quantize_embeddings:
    return False, 1
  return None


def _quantize_leaf(leaf, transposed: bool, n_in: int, cfg: BitsAndBytesConfig,
                   n_stack: int = 0):
  if cfg.load_in_4bit:
    return quantize_4bit_array(
        leaf, transposed=transposed, n_in=n_in, blocksize=cfg.blocksize,
        quant_type=cfg.bnb_4bit_quant_type, compress_statistics=cfg.bnb_4bit_use_double_quant,
        quant_storage=cfg.bnb_4bit_quant_storage, compute_dtype=cfg.bnb_4bit_compute_dtype,
        n_stack=n_stack)
  return quantize_8bit_array(leaf, transposed=transposed, n_in=n_in,
                             threshold=cfg.llm_int8_threshold, n_stack=n_stack)


def _axis_names(box) -> Optional[tuple]:
  """Logical axis names a Flax box carries: Linen ``nn.Partitioned``/``LogicallyPartitioned``
  ``names``, NNX ``Variable`` sharding metadata; None for anything else."""
  names = getattr(box, "names", None)
  if names is None and hasattr(box, "get_metadata"):
    meta = box.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
      if isinstance(meta.get(key), (tuple, list)):
        names = meta[key]
        break
  return tuple(names) if isinstance(names, (tuple, list)) else None


def _marked_stacks(params, config: BitsAndBytesConfig) -> dict:
  """``{path: n}`` for boxes whose first ``n`` logical axis names mark stack axes."""
  stack_names = set(STACK_AXIS_NAMES) | {p for p in config.stacked_axes
                                         if not any(c in p for c in "*?[.")}
  out = {}
  boxes = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: _axis_names(x) is not None or is_quantized(x))[0]
  for path, box in boxes:
    names = _axis_names(box)
    n = 0
    while names and n < len(names) and names[n] in stack_names:
      n += 1
    if n:
      out[path_str(path)] = n
  return out


def stack_axes_of(name: str, leaf, config: BitsAndBytesConfig, marked: dict) -> int:
  """Leading stack axes of the leaf at dotted path ``name``: ``config.stacked_axes`` (first
  matching pattern), else what the model's metadata marks, else 0."""
  for pattern, n in config.stacked_axes.items():
    if _matches(pattern, name):
      if leaf.ndim - n < 2:
        raise ValueError(f"{name}: stacked_axes[{pattern!r}] = {n} leaves a weight of rank "
                         f"{leaf.ndim - n} (shape {leaf.shape}); each slice must be a matrix")
      return n
  n = marked.get(name, 0)
  return n if leaf.ndim - n >= 2 else 0


def _check_already(leaf: QuantizedArray, path: str, cfg: BitsAndBytesConfig) -> None:
  want = "4bit" if cfg.load_in_4bit else "8bit"
  have = "4bit" if isinstance(leaf, Quantized4bit) else "8bit"
  if want != have or (have == "4bit" and leaf.quant_type != cfg.bnb_4bit_quant_type):
    raise ValueError(f"{path} is already quantized ({type(leaf).__name__}"
                     f"{', ' + leaf.quant_type if have == '4bit' else ''}); it will not be "
                     f"quantized twice. Call jaxbnb.dequantize(tree) first to change format.")


def quantize(params: Any, config: BitsAndBytesConfig, *,
             predicate: Optional[Callable[[str, Any], bool]] = None) -> Any:
  """Replace the linear-layer weights of ``params`` by quantized leaves.

  Args:
    params: any pytree (Flax NNX ``State``, Linen variables, plain dicts of arrays).
    config: a :class:`BitsAndBytesConfig`.
    predicate: optional ``(path, leaf) -> bool`` that further restricts which eligible leaves
      are quantized (``path`` is the dotted name, e.g. ``"encoder.layer.0.kernel"``).

  Returns:
    A tree of the same structure; quantized leaves are :class:`Quantized4bit` /
    :class:`Quantized8bit`. Already quantized leaves are kept as they are (never quantized
    twice). Works under ``jax.jit`` (quantization then runs on the device).
  """
  if not isinstance(config, BitsAndBytesConfig):
    raise TypeError("quantize(params, config) needs a jaxbnb.BitsAndBytesConfig")
  out, used = quantize_parts(params, config, predicate=predicate)
  warn_unused_skip_patterns(config, used)
  return out


def warn_unused_skip_patterns(config: BitsAndBytesConfig, used: set) -> None:
  """Warn about ``llm_int8_skip_modules`` patterns that matched no quantizable leaf."""
  unused = [p for p in config.llm_int8_skip_modules if p not in used and p != "lm_head"]
  if unused:
    warnings.warn(f"llm_int8_skip_modules patterns matched no quantizable leaf: {unused}",
                  stacklevel=3)


def quantize_parts(params: Any, config: BitsAndBytesConfig, *,
                   predicate: Optional[Callable[[str, Any], bool]] = None) -> tuple[Any, set]:
  """:func:`quantize` without the unused-pattern warning: ``(tree, skip patterns that
  matched)``, for callers that quantize a model in parts (one layer at a time) and warn once."""
  used = set()
  marked = _marked_stacks(params, config)

  def one(path, leaf):
    name = path_str(path)
    if is_quantized(leaf):
      _check_already(leaf, name, config)
      return leaf
    last = name.rsplit(".", 1)[-1]
    layout = _layout(last, leaf, config)
    if layout is None:
      return leaf
    hit = [p for p in config.llm_int8_skip_modules if _matches(p, name)]
    if hit:
      used.update(hit)
      return leaf
    if predicate is not None and not predicate(name, leaf):
      return leaf
    return _quantize_leaf(leaf, *layout, config, stack_axes_of(name, leaf, config, marked))

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_quantized), used


def dequantize(tree: Any) -> Any:
  """Float arrays back in place of every quantized leaf (original shape and dtype; a stacked
  leaf gives its whole stack, ``stack_shape + shape``)."""
  return jax.tree.map(lambda x: x.dequantize() if is_quantized(x) else x, tree,
                      is_leaf=is_quantized)


def memory_footprint(tree: Any) -> int:
  """Bytes actually held by the arrays of ``tree`` (packed data, absmax, codebooks, ...)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    if hasattr(leaf, "nbytes"):
      total += int(leaf.nbytes)
    elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
  return total
