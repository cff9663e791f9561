"""Flax Linen layers with quantized weights (bitsandbytes' ``bnb.nn``).

Packed weights live in their own collection, :data:`QUANTIZED` (``"quantized"``), not in
``"params"``: ``params`` stays a tree of float arrays that ``jax.grad`` and optax handle as
usual (biases, norms, adapters), while the frozen packed leaves
(:class:`~jaxbnb.Quantized4bit` / :class:`~jaxbnb.Quantized8bit`) travel beside them, like
``batch_stats``::

  model = Linear4bit(features=256, quant_type="nf4")
  variables = model.init(key, x)          # {'params': {'bias'}, 'quantized': {'kernel'}}
  y = model.apply(variables, x)
  grads = jax.grad(lambda p: loss(model.apply({**variables, 'params': p}, x)))(
      variables['params'])

``init`` draws the float weight with the layer's initializer and quantizes it at once (also
under ``jax.jit``); the float copy never persists.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from jaxbnb import _backend, ops
from jaxbnb.functional import _checks
from jaxbnb.nn.nnx import _attend, _check_4bit, _check_features, _check_float_input, _check_ids
from jaxbnb.qtensor import quantize_4bit_array, quantize_8bit_array

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

QUANTIZED = "quantized"
"""Collection holding the packed weights."""
OPTIM_BITS = "optim_bits"
"""Collection marking params whose optimizer state should stay 32-bit (see
:func:`stable_embedding_mask`)."""

default_kernel_init = nn.initializers.lecun_normal()
default_bias_init = nn.initializers.zeros_init()
default_embed_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)


def _packed(module: nn.Module, name: str, init: Callable[[], Any]) -> Any:
  """The packed weight ``name`` of the :data:`QUANTIZED` collection, created by ``init`` at
  ``model.init`` time."""
  if not module.is_initializing() and not module.has_variable(QUANTIZED, name):
    raise ValueError(f"{type(module).__name__}: no packed weight {QUANTIZED}/{name}; pass every "
                     f"collection from init, e.g. model.apply({{'params': ..., '{QUANTIZED}': "
                     "...}, x) or model.apply(variables, x)")
  return module.variable(QUANTIZED, name, init).value


def stable_embedding_mask(variables) -> Any:
  """Bool tree shaped like ``variables['params']``: True for the tables of
  :class:`StableEmbedding` layers (8-bit optimizers keep 32-bit state for them).

  ``variables`` is what ``model.init`` returns; the marks come from its :data:`OPTIM_BITS`
  collection. Use the result as an ``optax.masked`` / ``optax.multi_transform`` mask.
  """
  marks = traverse_util.flatten_dict(dict(variables.get(OPTIM_BITS, {})))
  flat = traverse_util.flatten_dict(dict(variables["params"]))
  return traverse_util.unflatten_dict({k: k in marks for k in flat})


class Linear4bit(nn.Module):
  """A dense layer with an NF4/FP4 weight (bitsandbytes' ``Linear4bit``), over the last axis.

  The kernel ``(in, features)`` is drawn by ``kernel_init`` in ``param_dtype`` like
  ``nn.Dense``'s, then stored packed in the :data:`QUANTIZED` collection as ``kernel``; the
  bias is a float param.

  Attributes:
    features: number of output features.
    use_bias: whether to add a (float, trainable) bias.
    quant_type: ``"fp4"`` (bitsandbytes' default) or ``"nf4"``.
    compress_statistics: double quantization of the absmax.
    blocksize: elements per absmax block: 32, 64, ..., 4096.
    compute_dtype: dtype the matmul runs in (float32 accumulation either way).
    quant_storage: dtype holding the packed bytes.
    backend: ``"auto"``, ``"xla"`` or ``"pallas"`` (see :func:`jaxbnb.matmul_4bit`).
    dtype: dtype of the input and output (the input is cast to it; default: the input's).
    param_dtype: dtype of the initial float kernel and of the bias.
    kernel_init, bias_init: initializers.
  """

  features: int
  use_bias: bool = True
  quant_type: str = "fp4"
  compress_statistics: bool = True
  blocksize: int = 64
  compute_dtype: Dtype = jnp.float32
  quant_storage: Dtype = jnp.uint8
  backend: str = "auto"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = default_bias_init

  def __post_init__(self):
    what = type(self).__name__
    _check_features(what, features=self.features)
    _check_4bit(what, self.quant_type, self.blocksize, self.compute_dtype)
    _backend.check(self.backend)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    """``inputs @ kernel + bias``: float ``(..., in) -> (..., features)``."""
    if self.dtype is not None:
      inputs = inputs.astype(self.dtype)
    _check_float_input(type(self).__name__, inputs)
    shape = (inputs.shape[-1], self.features)
    kernel = _packed(self, "kernel", lambda: quantize_4bit_array(
        self.kernel_init(self.make_rng("params"), shape, self.param_dtype), transposed=True,
        blocksize=self.blocksize, quant_type=self.quant_type,
        compress_statistics=self.compress_statistics, quant_storage=self.quant_storage,
        compute_dtype=self.compute_dtype))
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    return ops.matmul_4bit(inputs, kernel, bias, backend=self.backend)


def _fixed_quant_type(base: type, quant_type: str, name: str) -> type:
  """``base`` with its ``quant_type`` field defaulting to, and fixed at, ``quant_type``."""

  def __post_init__(self):
    if self.quant_type != quant_type:
      raise ValueError(f"{name} fixes quant_type={quant_type!r}; use "
                       f"{base.__name__}(quant_type=...)")
    base.__post_init__(self)

  return type(name, (base,), {
      "__annotations__": {"quant_type": str}, "quant_type": quant_type,
      "__post_init__": __post_init__, "__module__": __name__,
      "__doc__": f":class:`{base.__name__}` with ``quant_type=\"{quant_type}\"``."})


LinearNF4 = _fixed_quant_type(Linear4bit, "nf4", "LinearNF4")
LinearFP4 = _fixed_quant_type(Linear4bit, "fp4", "LinearFP4")


class Linear8bitLt(nn.Module):
  """A dense layer with an LLM.int8() weight (bitsandbytes' ``Linear8bitLt``, inference).

  The kernel is stored as row-wise int8 in the :data:`QUANTIZED` collection as ``kernel``.

  Attributes:
    features, use_bias: as ``nn.Dense``.
    threshold: outlier threshold; 0 (bitsandbytes' default) disables the decomposition,
      6.0 is LLM.int8()'s value.
    has_fp16_weights: keep 16-bit master weights for int8 training; not supported yet.
    backend: ``"auto"``, ``"xla"`` or ``"pallas"`` (see :func:`jaxbnb.int8_matmul`).
    dtype: dtype of the input and output (the input is cast to it; default: the input's).
    param_dtype: dtype of the initial float kernel and of the bias.
    kernel_init, bias_init: initializers.
  """

  features: int
  use_bias: bool = True
  threshold: float = 0.0
  has_fp16_weights: bool = False
  backend: str = "auto"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = default_bias_init

  def __post_init__(self):
    what = type(self).__name__
    if self.has_fp16_weights:
      raise NotImplementedError(f"{what}: has_fp16_weights=True (int8 training with 16-bit "
                                "master weights) is not supported yet; use the frozen int8 "
                                "layer (has_fp16_weights=False) and train adapters on it")
    _check_features(what, features=self.features)
    t = self.threshold
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not t >= 0:
      raise ValueError(f"{what}: threshold must be a number >= 0; got {t!r}")
    _backend.check(self.backend)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    """LLM.int8() ``inputs @ kernel + bias``: float ``(..., in) -> (..., features)``."""
    if self.dtype is not None:
      inputs = inputs.astype(self.dtype)
    _check_float_input(type(self).__name__, inputs)
    shape = (inputs.shape[-1], self.features)
    kernel = _packed(self, "kernel", lambda: quantize_8bit_array(
        self.kernel_init(self.make_rng("params"), shape, self.param_dtype), transposed=True,
        threshold=self.threshold))
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    if bias is not None:
      bias = bias.astype(jnp.float32)  # keeps the bias gradient in its dtype (see nnx.py)
    return ops.int8_matmul(inputs, kernel, bias, backend=self.backend)


class Embedding4bit(nn.Module):
  """An embedding table stored in NF4/FP4 (bitsandbytes' ``Embedding4bit``), in the
  :data:`QUANTIZED` collection as ``embedding``.

  Lookups dequantize only the rows they read (``features % blocksize == 0`` is required).

  Attributes:
    num_embeddings, features: table shape.
    quant_type: ``"fp4"`` (bitsandbytes' default) or ``"nf4"``.
    blocksize: elements per absmax block.
    compress_statistics: double quantization of the absmax.
    compute_dtype: dtype :meth:`attend` runs in.
    quant_storage: dtype holding the packed bytes.
    dtype: dtype of the embedding vectors (default: ``param_dtype``).
    param_dtype: dtype of the initial float table (the dequantized dtype).
    embedding_init: initializer of the float table.
  """

  num_embeddings: int
  features: int
  quant_type: str = "fp4"
  blocksize: int = 64
  compress_statistics: bool = False
  compute_dtype: Dtype = jnp.float32
  quant_storage: Dtype = jnp.uint8
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  embedding_init: Initializer = default_embed_init

  def __post_init__(self):
    what = type(self).__name__
    _check_features(what, num_embeddings=self.num_embeddings, features=self.features)
    _check_4bit(what, self.quant_type, self.blocksize, self.compute_dtype)
    if self.features % self.blocksize:
      smaller = [b for b in _checks.BLOCKSIZES_4BIT if self.features % b == 0]
      raise ValueError(
          f"{what}: features ({self.features}) must be a multiple of blocksize "
          f"({self.blocksize}) so that each row is whole blocks and a lookup reads only its "
          "rows; " + (f"use blocksize={smaller[-1]}" if smaller else
                      "pad features to a multiple of 32") + " (or keep this table in 16-bit)")
    super().__post_init__()

  def setup(self):
    shape = (self.num_embeddings, self.features)
    self.table = _packed(self, "embedding", lambda: quantize_4bit_array(
        self.embedding_init(self.make_rng("params"), shape, self.param_dtype),
        transposed=False, blocksize=self.blocksize, quant_type=self.quant_type,
        compress_statistics=self.compress_statistics, quant_storage=self.quant_storage,
        compute_dtype=self.compute_dtype))

  @property
  def _out_dtype(self):
    return self.param_dtype if self.dtype is None else self.dtype

  def __call__(self, inputs: Array) -> Array:
    """Rows of the table: int ``(...) -> (..., features)``."""
    _check_ids(type(self).__name__, inputs)
    return self.table.dequantize_rows(inputs, self._out_dtype)

  def attend(self, query: Array) -> Array:
    """``query @ table.T``: ``(..., features) -> (..., num_embeddings)``, from the packed
    table."""
    _check_float_input(f"{type(self).__name__}.attend", query)
    return _attend(query, self.table, self._out_dtype)


EmbeddingNF4 = _fixed_quant_type(Embedding4bit, "nf4", "EmbeddingNF4")
EmbeddingFP4 = _fixed_quant_type(Embedding4bit, "fp4", "EmbeddingFP4")


class Embedding8bit(nn.Module):
  """An embedding table stored as row-wise int8 (bitsandbytes' ``Embedding8bit``), in the
  :data:`QUANTIZED` collection as ``embedding``. :meth:`attend` runs LLM.int8() on the query
  (outlier threshold 6.0).

  Attributes:
    num_embeddings, features: table shape.
    dtype: dtype of the embedding vectors (default: ``param_dtype``).
    param_dtype: dtype of the initial float table.
    embedding_init: initializer of the float table.
  """

  num_embeddings: int
  features: int
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  embedding_init: Initializer = default_embed_init

  def __post_init__(self):
    _check_features(type(self).__name__, num_embeddings=self.num_embeddings,
                    features=self.features)
    super().__post_init__()

  def setup(self):
    shape = (self.num_embeddings, self.features)
    self.table = _packed(self, "embedding", lambda: quantize_8bit_array(
        self.embedding_init(self.make_rng("params"), shape, self.param_dtype),
        transposed=False))

  @property
  def _out_dtype(self):
    return self.param_dtype if self.dtype is None else self.dtype

  def __call__(self, inputs: Array) -> Array:
    """Rows of the table: int ``(...) -> (..., features)``."""
    _check_ids(type(self).__name__, inputs)
    return self.table.dequantize_rows(inputs, self._out_dtype)

  def attend(self, query: Array) -> Array:
    """``query @ table.T``: ``(..., features) -> (..., num_embeddings)``."""
    _check_float_input(f"{type(self).__name__}.attend", query)
    return _attend(query, self.table, self._out_dtype)


class StableEmbedding(nn.Module):
  """A float embedding made stable for 8-bit optimizers (bitsandbytes' ``StableEmbedding``):
  Xavier-uniform init, then a LayerNorm (submodule ``norm``) over the looked-up vectors.

  The table is the float param ``embedding``; ``init`` also marks it in the
  :data:`OPTIM_BITS` collection (value 32) so that :func:`stable_embedding_mask` finds it.

  Attributes:
    num_embeddings, features: table shape.
    dtype: dtype of the output (default: ``param_dtype``); the LayerNorm runs in float32.
    param_dtype: dtype of the table and the LayerNorm scale/bias.
    embedding_init: initializer of the table.
    epsilon: LayerNorm epsilon (torch's default 1e-5).
  """

  num_embeddings: int
  features: int
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  embedding_init: Initializer = nn.initializers.xavier_uniform()
  epsilon: float = 1e-5

  def __post_init__(self):
    _check_features(type(self).__name__, num_embeddings=self.num_embeddings,
                    features=self.features)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    """LayerNorm of the rows: int ``(...) -> (..., features)``."""
    _check_ids(type(self).__name__, inputs)
    table = self.param("embedding", self.embedding_init,
                       (self.num_embeddings, self.features), self.param_dtype)
    if self.is_initializing():
      self.variable(OPTIM_BITS, "embedding", lambda: jnp.int32(32))
    # bnb normalizes in float32 (torch's default dtype), then casts to the weight's dtype.
    emb = jnp.take(table, inputs, axis=0).astype(jnp.float32)
    y = nn.LayerNorm(epsilon=self.epsilon, param_dtype=self.param_dtype, name="norm")(emb)
    return y.astype(self.param_dtype if self.dtype is None else self.dtype)
