"""QLoRA: low-rank adapters on a frozen (4-bit) base, for unmodified Flax models.

Example::

  cfg = jaxbnb.lora.LoRAConfig(rank=8, alpha=16)
  adapters = jaxbnb.lora.init(qparams, cfg, key)           # {path: {"a": (in, r), "b": (r, out)}}
  def loss(adapters, batch):
    params = jaxbnb.lora.attach(qparams, adapters, cfg)    # base leaves wrapped, not copied
    return loss_fn(jaxbnb.intercept(model_fn)(params, batch))
  grads = jax.grad(loss)(adapters, batch)                  # adapters only; the base stays packed

The adapted weight is ``W + (alpha / rank) * A @ B`` (A random, B zero at init, as in LoRA), but
``W`` is never materialized in float. A stacked base (scanned layers, MoE experts) gets stacked
adapters, ``A`` ``(*stack, in, r)`` and ``B`` ``(*stack, r, out)``: one adapter per slice, sliced
with it by ``lax.scan``. Otherwise: the base product goes through the quantized matmul
(whose backward re-dequantizes), the adapter product is ``((x @ A) @ B) * scale``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import warnings
import zlib
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbnb.config import BitsAndBytesConfig
from jaxbnb.qtensor import QuantizedArray, is_quantized
from jaxbnb.tree import _matches, path_str, quantize


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Adapter settings.

  Attributes:
    rank: r. alpha: the scale is ``alpha / rank``. dropout: on the adapter's input (training).
    targets: path patterns of the weights to adapt (a plain name matches a path component, a
      glob the dotted path); default every linear kernel, as QLoRA does.
    exclude: patterns never adapted (default ``("lm_head",)``).
  """

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: Optional[Sequence[str]] = None
  exclude: Sequence[str] = ("lm_head",)

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"LoRAConfig.rank must be a positive int; got {self.rank!r}")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"LoRAConfig.dropout must be in [0, 1); got {self.dropout!r}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _in_out(leaf) -> tuple[tuple[int, ...], tuple[int, ...], bool, int]:
  """(input axes, output axes, transposed, n_in) of a linear weight's logical array."""
  transposed = getattr(leaf, "transposed", True)
  n_in = getattr(leaf, "n_in", 1)
  ndim = len(leaf.shape)
  in_axes = tuple(range(n_in)) if transposed else tuple(range(1, ndim))
  return in_axes, tuple(a for a in range(ndim) if a not in in_axes), transposed, n_in


@dataclasses.dataclass(frozen=True)
class LoRAArray(QuantizedArray):
  """A weight with an adapter: ``base`` (packed or float, frozen) plus ``scale * A @ B``.

  Behaves as a quantized leaf for :func:`jaxbnb.intercept`; ``dequantize`` gives the merged
  float weight.
  """

  base: Any
  a: jax.Array
  b: jax.Array
  rng: Optional[jax.Array] = None
  scale: float = 1.0
  dropout: float = 0.0

  shape = property(lambda self: tuple(self.base.shape))
  dtype = property(lambda self: self.base.dtype)
  # One adapter per slice of a stacked base: A's leading axes are the stack's.
  stack_shape = property(lambda self: tuple(getattr(self.a, "shape", (0, 0))[:-2]))
  transposed = property(lambda self: getattr(self.base, "transposed", True))
  n_in = property(lambda self: getattr(self.base, "n_in", 1))

  def delta(self, dtype=None) -> jax.Array:
    """``scale * A @ B`` as the logical array (a float copy: merge / fallback only)."""
    ab = (self.a @ self.b) * self.scale
    full = (*self.stack_shape, *self.shape)
    d = ab.reshape(full) if self.transposed else jnp.swapaxes(ab, -1, -2).reshape(full)
    return d.astype(dtype or self.dtype)

  def dequantize(self, dtype=None) -> jax.Array:
    base = self.base.dequantize(jnp.float32) if is_quantized(self.base) else self.base
    return (base.astype(jnp.float32) + self.delta(jnp.float32)).astype(dtype or self.dtype)

  def lora_dot(self, x, dims, w_is_lhs, out_dtype) -> jax.Array:
    """The adapter's share of ``dot_general(x, W, dims)`` (logical dims)."""
    if self.stack_shape:  # one adapter per slice, as the base's product runs
      from jaxbnb import stacked  # noqa: PLC0415 - stacked builds on the ops below lora

      y = stacked.dot_general(x, self, dims, w_is_lhs, jnp.float32,
                              lambda xs, ws, d: ws.lora_dot(xs, d, w_is_lhs, out_dtype))
      if y is not None:
        return y
    (xc, wc), (xb, wb) = ((dims[0][1], dims[0][0]), (dims[1][1], dims[1][0])) if w_is_lhs \
        else dims
    in_axes, out_axes, _, _ = _in_out(self)
    k = len(in_axes)
    standard = (not w_is_lhs and not xb and not wb and tuple(wc) == in_axes
                and tuple(xc) == tuple(range(x.ndim - k, x.ndim)))
    if not standard:
      warnings.warn(f"jaxbnb.lora: an adapted weight of shape {self.shape} is contracted over "
                    f"{dims}; the adapter delta is materialized for this product", stacklevel=3)
      d = self.delta(x.dtype)
      lhs, rhs = (d, x) if w_is_lhs else (x, d)
      return jax.lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32)
    lead = x.shape[:x.ndim - k]
    h = x.reshape(-1, self.a.shape[0]).astype(jnp.float32)
    if self.dropout > 0 and self.rng is not None:
      keep = jax.random.bernoulli(self.rng, 1 - self.dropout, h.shape)
      h = jnp.where(keep, h / (1 - self.dropout), 0.0)
    y = (h @ self.a.astype(jnp.float32)) @ self.b.astype(jnp.float32) * self.scale
    return y.reshape(*lead, *[self.shape[a] for a in out_axes])


jax.tree_util.register_dataclass(LoRAArray, data_fields=["base", "a", "b", "rng"],
                                 meta_fields=["scale", "dropout"])


def _is_target(path: str, leaf, cfg: LoRAConfig) -> bool:
  if is_quantized(leaf):
    ok = True
  else:  # a float linear kernel (16-bit LoRA baseline)
    ok = (path.rsplit(".", 1)[-1] == "kernel" and hasattr(leaf, "ndim") and leaf.ndim >= 2
          and jnp.issubdtype(leaf.dtype, jnp.floating))
  if not ok or any(_matches(p, path) for p in cfg.exclude):
    return False
  return cfg.targets is None or any(_matches(p, path) for p in cfg.targets)


def _leaves(params):
  flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)
  return [(path_str(p), x) for p, x in flat]


def init(params: Any, config: LoRAConfig, key: jax.Array,
         dtype=jnp.float32) -> dict[str, dict[str, jax.Array]]:
  """Adapters for every targeted weight of ``params``: ``{path: {"a": A, "b": B}}``.

  ``A`` is ``(in, rank)`` uniform in ``+-1/sqrt(in)`` (PEFT's Kaiming init), ``B`` is
  ``(rank, out)`` zeros, so the adapted model starts equal to the base.
  """
  adapters = {}
  for i, (path, leaf) in enumerate(_leaves(params)):
    if not _is_target(path, leaf, config):
      continue
    in_axes, out_axes, _, _ = _in_out(leaf)
    n_in = math.prod(leaf.shape[a] for a in in_axes)
    n_out = math.prod(leaf.shape[a] for a in out_axes)
    bound = 1 / math.sqrt(n_in)
    stack = tuple(getattr(leaf, "stack_shape", ()))  # a stacked base: one adapter per slice
    adapters[path] = {
        "a": jax.random.uniform(jax.random.fold_in(key, i), (*stack, n_in, config.rank), dtype,
                                -bound, bound),
        "b": jnp.zeros((*stack, config.rank, n_out), dtype)}
  if not adapters:
    raise ValueError("jaxbnb.lora.init: no weight matched the targets; quantize the model "
                     "first or check LoRAConfig.targets")
  return adapters


def attach(params: Any, adapters: dict, config: LoRAConfig,
           rng: Optional[jax.Array] = None) -> Any:
  """``params`` with each adapted leaf wrapped in a :class:`LoRAArray` (no copies).

  ``rng`` enables adapter dropout (``config.dropout > 0``, training steps only).
  """
  missing = set(adapters)

  def wrap(p, leaf):
    path = path_str(p)
    if path not in adapters:
      return leaf
    missing.discard(path)
    ad = adapters[path]
    # crc32, not hash(): Python salts str hashes per process, dropout must be reproducible.
    leaf_rng = None if rng is None else jax.random.fold_in(rng, zlib.crc32(path.encode()) % (2**31))
    stack = tuple(getattr(leaf, "stack_shape", ()))
    if stack != tuple(ad["a"].shape[:-2]):
      raise ValueError(f"{path}: adapters for stack {tuple(ad['a'].shape[:-2])} on a base with "
                       f"stack axes {stack}; make them with jaxbnb.lora.init on these params")
    if leaf_rng is not None and stack:  # a key per slice, sliced with the stack
      leaf_rng = jax.random.split(leaf_rng, stack)
    return LoRAArray(base=leaf, a=ad["a"], b=ad["b"], rng=leaf_rng, scale=config.scale,
                     dropout=config.dropout)

  out = jax.tree_util.tree_map_with_path(wrap, params, is_leaf=is_quantized)
  if missing:
    raise ValueError(f"adapters for paths not in params: {sorted(missing)[:5]}")
  return out


def merge(params: Any, adapters: dict, config: LoRAConfig,
          requantize: Optional[BitsAndBytesConfig] = None) -> Any:
  """Fold the adapters in: a float tree (every leaf dequantized), or re-quantized with
  ``requantize``. (Re-quantizing adds a second rounding; keep the float tree for export.)"""
  attached = attach(params, adapters, config)
  merged = jax.tree.map(lambda x: x.dequantize() if is_quantized(x) else x, attached,
                        is_leaf=is_quantized)
  return quantize(merged, requantize) if requantize is not None else merged


def count_params(tree: Any) -> int:
  """Number of values in ``tree`` (quantized leaves count their logical size)."""
  return sum(x.size * math.prod(x.stack_shape) if is_quantized(x) else int(np.prod(x.shape))
             for x in jax.tree.leaves(tree, is_leaf=is_quantized) if hasattr(x, "shape"))


def split_trainable(params: Any, trainable: Sequence[str] = ()) -> tuple[Any, Any]:
  """``(frozen, trainable)``: float leaves whose path matches a ``trainable`` pattern (e.g.
  ``"norm"``, ``"*.bias"``) go to the second tree (others None), the rest to the first.
  Recombine with :func:`combine`. Packed leaves are always frozen."""
  def pick(p, x):
    return (not is_quantized(x) and any(_matches(t, path_str(p)) for t in trainable))
  mask = jax.tree_util.tree_map_with_path(pick, params, is_leaf=is_quantized)
  frozen = jax.tree.map(lambda x, m: None if m else x, params, mask, is_leaf=is_quantized)
  train = jax.tree.map(lambda x, m: x if m else None, params, mask, is_leaf=is_quantized)
  return frozen, train


def combine(frozen: Any, trainable: Any) -> Any:
  """Inverse of :func:`split_trainable`."""
  return jax.tree.map(lambda a, b: a if b is None else b, frozen, trainable,
                      is_leaf=lambda x: x is None or is_quantized(x))



class LoRALinear(nnx.Module):
  """Explicit NNX layer: ``base(x) + scale * dropout(x) @ A @ B`` around any linear layer
  (``jaxbnb.nn.Linear4bit``/``LinearNF4``/``Linear8bitLt``, or ``nnx.Linear``).

  The adapters are ``nnx.Param`` named ``lora_a`` / ``lora_b``; train only them with
  ``nnx.Optimizer(model, tx, wrt=nnx.All(nnx.Param, nnx.PathContains("lora_a") ...))`` or
  ``adapter_filter``. A packed base weight is a ``jaxbnb.nn.QuantizedParam`` and is never
  trained.
  """

  def __init__(self, base: nnx.Module, rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, *, rngs: nnx.Rngs):
    cfg = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout)
    self.base = base
    n_in, n_out = base.in_features, base.out_features
    bound = 1 / math.sqrt(n_in)
    self.lora_a = nnx.Param(jax.random.uniform(rngs.params(), (n_in, rank), jnp.float32,
                                               -bound, bound))
    self.lora_b = nnx.Param(jnp.zeros((rank, n_out), jnp.float32))
    self.scale = cfg.scale
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x):
    h = self.dropout(x.astype(jnp.float32))
    delta = (h @ self.lora_a[...]) @ self.lora_b[...] * self.scale
    return (self.base(x).astype(jnp.float32) + delta).astype(x.dtype)


adapter_filter = nnx.Any(nnx.PathContains("lora_a"), nnx.PathContains("lora_b"))
