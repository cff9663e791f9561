"""Flax NNX layers with quantized weights (bitsandbytes' ``bnb.nn``).

Each layer initializes a float weight exactly as its Flax counterpart does, then stores it
packed at once, so the float copy never persists. The packed weight lives in a
:class:`QuantizedParam`, *not* an ``nnx.Param``: ``nnx.state(model, nnx.Param)`` and
``nnx.Optimizer(model, tx, wrt=nnx.Param)`` see only the trainable float parameters (biases,
norms, LoRA adapters), never the frozen packed data::

  model = Linear4bit(1024, 1024, quant_type="nf4", rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)          # {'bias'}: what an optimizer trains
  packed = nnx.state(model, QuantizedParam)     # {'kernel': Quantized4bit}
  graphdef, params, packed = nnx.split(model, nnx.Param, QuantizedParam)

Gradients flow to the input and to every ``nnx.Param``; the packed weight gets none.
"""

from __future__ import annotations

import numbers
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.typing import Dtype, Initializer

from jaxbnb import _backend, ops
from jaxbnb.functional import _checks
from jaxbnb.qtensor import quantize_4bit_array, quantize_8bit_array

Array = jax.Array

default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()
default_embed_init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)


class QuantizedParam(nnx.Variable):
  """A frozen, packed weight: holds a :class:`~jaxbnb.Quantized4bit` or
  :class:`~jaxbnb.Quantized8bit` leaf. Not an ``nnx.Param``, so optimizers never see it.

  Read it with ``variable.get_value()``; its arrays are ordinary pytree leaves, so it passes
  through ``nnx.split``/``nnx.merge``, ``jax.jit`` and checkpointing like any variable.
  """


class StableEmbeddingParam(nnx.Param):
  """The table of a :class:`StableEmbedding`: trainable (an ``nnx.Param``), tagged with
  metadata ``optim_bits=32`` so that 8-bit optimizers keep 32-bit state for it, as
  bitsandbytes' ``GlobalOptimManager`` override does. Select it with
  ``nnx.state(model, StableEmbeddingParam)`` or :func:`stable_embedding_mask`.
  """


def stable_embedding_mask(state: nnx.State) -> tp.Any:
  """Bool pytree, a prefix of ``state``: True for variables tagged ``optim_bits=32``.

  ``state`` is an ``nnx.State`` (e.g. ``nnx.state(model, nnx.Param)``); the result works as an
  ``optax.masked`` / ``optax.multi_transform`` mask over it.
  """
  is_var = lambda x: isinstance(x, nnx.Variable)
  return jax.tree.map(
      lambda v: is_var(v) and v.get_metadata("optim_bits", None) == 32, state, is_leaf=is_var)


# --- argument checks (errors name the layer and the fix) ----------------------------------------


def _check_features(what: str, **sizes) -> None:
  for name, n in sizes.items():
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
      raise ValueError(f"{what}: {name} must be a positive int; got {n!r}")


def _check_4bit(what: str, quant_type, blocksize, compute_dtype) -> None:
  if quant_type not in _checks.QUANT_TYPES_4BIT:
    raise ValueError(f"{what}: quant_type must be one of {_checks.QUANT_TYPES_4BIT}; "
                     f"got {quant_type!r}")
  _checks.check_blocksize(blocksize, _checks.BLOCKSIZES_4BIT, what)
  if not jnp.issubdtype(compute_dtype, jnp.floating):
    raise ValueError(f"{what}: compute_dtype must be a float dtype; got {compute_dtype!r}")


def _check_float_input(what: str, x) -> None:
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise TypeError(f"{what} expects a float input; got {jnp.result_type(x)}. Cast it first "
                    "or pass dtype=...")


def _check_ids(what: str, ids) -> None:
  if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
    raise TypeError(f"{what} expects integer ids; got {jnp.result_type(ids)}")


def _attend(query: Array, table, out_dtype) -> Array:
  """``query @ table.T`` for a packed ``(num, features)`` table: ``(..., features) ->
  (..., num)``, straight from the packed form."""
  dims = (((query.ndim - 1,), (1,)), ((), ()))
  return ops.qdot_general(query, table, dims, out_dtype=out_dtype)


# --- linear layers ------------------------------------------------------------------------------


class _FromWeights:
  """``from_kernel`` / ``from_linear`` constructors shared by the linear layers."""

  @classmethod
  def from_kernel(cls, kernel: Array, bias: tp.Optional[Array] = None, **kwargs):
    """Quantize existing float weights: ``kernel`` ``(in, out)``, optional ``bias`` ``(out,)``.

    ``kwargs`` are the constructor's (``quant_type``, ``blocksize``, ``dtype``, ...); the
    kernel keeps its own dtype as the dequantized dtype.
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2:
      raise ValueError(f"{cls.__name__}.from_kernel expects a 2-D (in, out) kernel; got "
                       f"shape {kernel.shape}")
    if bias is not None and jnp.shape(bias) != kernel.shape[1:]:
      raise ValueError(f"{cls.__name__}.from_kernel: bias shape {jnp.shape(bias)} does not "
                       f"match the kernel's out_features {kernel.shape[1]}")
    for k in ("kernel_init", "bias_init", "use_bias", "param_dtype", "rngs"):
      if k in kwargs:
        raise TypeError(f"{cls.__name__}.from_kernel: {k!r} is set by the given weights")
    # Reuse __init__ with initializers that return the given weights (no random draw used).
    return cls(*kernel.shape, use_bias=bias is not None, param_dtype=kernel.dtype,
               kernel_init=lambda *_: kernel,
               bias_init=lambda *_: jnp.asarray(bias), rngs=nnx.Rngs(0), **kwargs)

  @classmethod
  def from_linear(cls, linear: nnx.Linear, **kwargs):
    """Quantize an ``nnx.Linear`` (its kernel, bias and ``dtype``); ``kwargs`` as
    :meth:`from_kernel`."""
    if not isinstance(linear, nnx.Linear):
      raise TypeError(f"{cls.__name__}.from_linear expects an nnx.Linear; got "
                      f"{type(linear).__name__}")
    kwargs.setdefault("dtype", linear.dtype)
    bias = linear.bias[...] if linear.bias is not None else None
    return cls.from_kernel(linear.kernel[...], bias, **kwargs)


class Linear4bit(_FromWeights, nnx.Module):
  """A linear layer with an NF4/FP4 weight (bitsandbytes' ``Linear4bit``; QLoRA's base layer).

  Example usage::

    >>> layer = Linear4bit(64, 32, quant_type="nf4", rngs=nnx.Rngs(0))
    >>> layer.kernel.get_value().shape, layer.kernel.get_value().quant_type
    ((64, 32), 'nf4')
    >>> layer(jnp.ones((2, 64))).shape
    (2, 32)

  The kernel is drawn by ``kernel_init`` as ``(in_features, out_features)`` in
  ``param_dtype``, like ``nnx.Linear``'s, then quantized in bitsandbytes' ``(out, in)`` layout
  (blocks run along the input axis). Only the packed form is kept.

  Args:
    in_features: number of input features.
    out_features: number of output features.
    use_bias: whether to add a (float, trainable) bias.
    quant_type: ``"fp4"`` (bitsandbytes' default) or ``"nf4"``.
    compress_statistics: double quantization of the absmax (QLoRA's 4.127 bits/param).
    blocksize: elements per absmax block: 32, 64, ..., 4096.
    compute_dtype: dtype the matmul runs in (float32 accumulation either way).
    quant_storage: dtype holding the packed bytes (uint8, or e.g. bfloat16 for FSDP).
    backend: ``"auto"``, ``"xla"`` or ``"pallas"`` (the Pallas GEMV/GEMM kernels; see
      :func:`jaxbnb.matmul_4bit`): speed, never the answer.
    dtype: dtype of the input and output: the input is cast to it first, as Flax's
      ``promote_dtype`` does (default: the input's dtype).
    param_dtype: dtype of the initial float kernel (the dequantized dtype) and of the bias.
    kernel_init: initializer of the float kernel ``(in, out)``.
    bias_init: initializer of the bias ``(out,)``.
    rngs: rng key.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               quant_type: str = "fp4", compress_statistics: bool = True, blocksize: int = 64,
               compute_dtype: Dtype = jnp.float32, quant_storage: Dtype = jnp.uint8,
               backend: str = "auto",
               dtype: tp.Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
               kernel_init: Initializer = default_kernel_init,
               bias_init: Initializer = default_bias_init, rngs: nnx.Rngs):
    what = type(self).__name__
    _check_features(what, in_features=in_features, out_features=out_features)
    _check_4bit(what, quant_type, blocksize, compute_dtype)
    _backend.check(backend)
    kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
    self.kernel = QuantizedParam(quantize_4bit_array(
        kernel, transposed=True, blocksize=blocksize, quant_type=quant_type,
        compress_statistics=compress_statistics, quant_storage=quant_storage,
        compute_dtype=compute_dtype))
    self.bias: nnx.Param[Array] | None
    if use_bias:
      self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
    else:
      self.bias = nnx.data(None)

    self.in_features = in_features
    self.out_features = out_features
    self.use_bias = use_bias
    self.quant_type = quant_type
    self.compress_statistics = compress_statistics
    self.blocksize = blocksize
    self.compute_dtype = compute_dtype
    self.quant_storage = quant_storage
    self.backend = backend
    self.dtype = dtype
    self.param_dtype = param_dtype

  def __call__(self, inputs: Array) -> Array:
    """``inputs @ kernel + bias``: float ``(..., in_features) -> (..., out_features)``."""
    if self.dtype is not None:
      inputs = inputs.astype(self.dtype)
    _check_float_input(type(self).__name__, inputs)
    bias = self.bias[...] if self.bias is not None else None
    return ops.matmul_4bit(inputs, self.kernel.get_value(), bias, backend=self.backend)


def _fixed_quant_type(base: type, quant_type: str, name: str) -> type:
  """``base`` with ``quant_type`` fixed (bitsandbytes' ``LinearNF4``-style classes)."""

  def __init__(self, *args, **kwargs):
    if "quant_type" in kwargs:
      raise TypeError(f"{name} fixes quant_type; use {base.__name__}(quant_type=...) to choose it")
    base.__init__(self, *args, quant_type=quant_type, **kwargs)

  doc = f":class:`{base.__name__}` with ``quant_type=\"{quant_type}\"`` (bitsandbytes' ``{name}``)."
  return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


LinearNF4 = _fixed_quant_type(Linear4bit, "nf4", "LinearNF4")
LinearFP4 = _fixed_quant_type(Linear4bit, "fp4", "LinearFP4")


class Linear8bitLt(_FromWeights, nnx.Module):
  """A linear layer with an LLM.int8() weight (bitsandbytes' ``Linear8bitLt``, inference).

  The kernel is drawn like ``nnx.Linear``'s and stored as row-wise int8 (``CB``/``SCB``).
  Inputs are quantized per row to int8; with ``threshold > 0`` every input column holding
  some ``|x| >= threshold`` is instead multiplied in 16-bit (the outlier decomposition that
  keeps large models accurate; 6.0 is LLM.int8()'s value).

  Args:
    in_features, out_features, use_bias: as ``nnx.Linear``.
    threshold: outlier threshold; 0 (bitsandbytes' default) disables the decomposition.
    has_fp16_weights: keep 16-bit master weights for int8 training; not supported yet.
    backend: ``"auto"``, ``"xla"`` or ``"pallas"`` (the int8 Pallas GEMM/GEMV; see
      :func:`jaxbnb.int8_matmul`): speed, never the answer.
    dtype: dtype of the input and output (the input is cast to it; default: the input's).
    param_dtype: dtype of the initial float kernel and of the bias.
    kernel_init, bias_init, rngs: as ``nnx.Linear``.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               threshold: float = 0.0, has_fp16_weights: bool = False,
               backend: str = "auto",
               dtype: tp.Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
               kernel_init: Initializer = default_kernel_init,
               bias_init: Initializer = default_bias_init, rngs: nnx.Rngs):
    what = type(self).__name__
    if has_fp16_weights:
      raise NotImplementedError(f"{what}: has_fp16_weights=True (int8 training with 16-bit "
                                "master weights) is not supported yet; use the frozen int8 "
                                "layer (has_fp16_weights=False) and train adapters on it")
    _check_features(what, in_features=in_features, out_features=out_features)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not (
        threshold >= 0):
      raise ValueError(f"{what}: threshold must be a number >= 0; got {threshold!r}")
    _backend.check(backend)
    kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
    self.kernel = QuantizedParam(quantize_8bit_array(kernel, transposed=True,
                                                     threshold=threshold))
    self.bias: nnx.Param[Array] | None
    if use_bias:
      self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
    else:
      self.bias = nnx.data(None)

    self.in_features = in_features
    self.out_features = out_features
    self.use_bias = use_bias
    self.threshold = float(threshold)
    self.has_fp16_weights = False
    self.backend = backend
    self.dtype = dtype
    self.param_dtype = param_dtype

  def __call__(self, inputs: Array) -> Array:
    """LLM.int8() ``inputs @ kernel + bias``: float ``(..., in) -> (..., out)``."""
    if self.dtype is not None:
      inputs = inputs.astype(self.dtype)
    _check_float_input(type(self).__name__, inputs)
    bias = self.bias[...] if self.bias is not None else None
    if bias is not None:
      # int8_matmul adds the bias in float32 anyway; passing it as float32 keeps the bias
      # gradient in the bias's own dtype (the op's backward returns a float32 cotangent).
      bias = bias.astype(jnp.float32)
    return ops.int8_matmul(inputs, self.kernel.get_value(), bias, backend=self.backend)


# --- embeddings ---------------------------------------------------------------------------------


class Embedding4bit(nnx.Module):
  """An embedding table stored in NF4/FP4 (bitsandbytes' ``Embedding4bit``).

  Example usage::

    >>> layer = Embedding4bit(1000, 128, quant_type="nf4", rngs=nnx.Rngs(0))
    >>> layer(jnp.array([[1, 2, 3]])).shape
    (1, 3, 128)

  Lookups dequantize only the rows they read, which needs every row to be whole blocks:
  ``features % blocksize == 0``.

  Args:
    num_embeddings: vocabulary size.
    features: embedding width (a multiple of ``blocksize``).
    quant_type: ``"fp4"`` (bitsandbytes' default) or ``"nf4"``.
    blocksize: elements per absmax block: 32, 64, ..., 4096.
    compress_statistics: double quantization of the absmax (bitsandbytes' embeddings: off).
    compute_dtype: dtype :meth:`attend` runs in.
    quant_storage: dtype holding the packed bytes.
    dtype: dtype of the embedding vectors (default: ``param_dtype``).
    param_dtype: dtype of the initial float table (the dequantized dtype).
    embedding_init: initializer of the float table ``(num_embeddings, features)``.
    rngs: rng key.
  """

  def __init__(self, num_embeddings: int, features: int, *, quant_type: str = "fp4",
               blocksize: int = 64, compress_statistics: bool = False,
               compute_dtype: Dtype = jnp.float32, quant_storage: Dtype = jnp.uint8,
               dtype: tp.Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
               embedding_init: Initializer = default_embed_init, rngs: nnx.Rngs):
    what = type(self).__name__
    _check_features(what, num_embeddings=num_embeddings, features=features)
    _check_4bit(what, quant_type, blocksize, compute_dtype)
    if features % blocksize:
      smaller = [b for b in _checks.BLOCKSIZES_4BIT if features % b == 0]
      raise ValueError(
          f"{what}: features ({features}) must be a multiple of blocksize ({blocksize}) so "
          "that each row is whole blocks and a lookup reads only its rows; "
          + (f"use blocksize={smaller[-1]}" if smaller else
             "pad features to a multiple of 32") + " (or keep this table in 16-bit)")
    table = embedding_init(rngs.params(), (num_embeddings, features), param_dtype)
    self.embedding = QuantizedParam(quantize_4bit_array(
        table, transposed=False, blocksize=blocksize, quant_type=quant_type,
        compress_statistics=compress_statistics, quant_storage=quant_storage,
        compute_dtype=compute_dtype))

    self.num_embeddings = num_embeddings
    self.features = features
    self.quant_type = quant_type
    self.blocksize = blocksize
    self.dtype = param_dtype if dtype is None else dtype
    self.param_dtype = param_dtype

  def __call__(self, inputs: Array) -> Array:
    """Rows of the table: int ``(...) -> (..., features)`` in ``dtype``; ids in
    ``[0, num_embeddings)``."""
    _check_ids(type(self).__name__, inputs)
    return self.embedding.get_value().dequantize_rows(inputs, self.dtype)

  def attend(self, query: Array) -> Array:
    """``query @ table.T`` (a tied output head): ``(..., features) -> (..., num_embeddings)``
    in ``dtype``, computed from the packed table."""
    _check_float_input(f"{type(self).__name__}.attend", query)
    return _attend(query, self.embedding.get_value(), self.dtype)


EmbeddingNF4 = _fixed_quant_type(Embedding4bit, "nf4", "EmbeddingNF4")
EmbeddingFP4 = _fixed_quant_type(Embedding4bit, "fp4", "EmbeddingFP4")


class Embedding8bit(nnx.Module):
  """An embedding table stored as row-wise int8 (bitsandbytes' ``Embedding8bit``): each row
  is scaled by its own absmax, so a lookup reads only its rows and their scales.

  :meth:`attend` runs LLM.int8() on the query (outlier threshold 6.0).

  Args:
    num_embeddings, features: table shape.
    dtype: dtype of the embedding vectors (default: ``param_dtype``).
    param_dtype: dtype of the initial float table (the dequantized dtype).
    embedding_init: initializer of the float table.
    rngs: rng key.
  """

  def __init__(self, num_embeddings: int, features: int, *, dtype: tp.Optional[Dtype] = None,
               param_dtype: Dtype = jnp.float32,
               embedding_init: Initializer = default_embed_init, rngs: nnx.Rngs):
    _check_features(type(self).__name__, num_embeddings=num_embeddings, features=features)
    table = embedding_init(rngs.params(), (num_embeddings, features), param_dtype)
    self.embedding = QuantizedParam(quantize_8bit_array(table, transposed=False))

    self.num_embeddings = num_embeddings
    self.features = features
    self.dtype = param_dtype if dtype is None else dtype
    self.param_dtype = param_dtype

  def __call__(self, inputs: Array) -> Array:
    """Rows of the table: int ``(...) -> (..., features)`` in ``dtype``."""
    _check_ids(type(self).__name__, inputs)
    return self.embedding.get_value().dequantize_rows(inputs, self.dtype)

  def attend(self, query: Array) -> Array:
    """``query @ table.T``: ``(..., features) -> (..., num_embeddings)`` in ``dtype``."""
    _check_float_input(f"{type(self).__name__}.attend", query)
    return _attend(query, self.embedding.get_value(), self.dtype)


class StableEmbedding(nnx.Module):
  """A float embedding made stable for 8-bit optimizers (bitsandbytes' ``StableEmbedding``).

  Xavier-uniform init, then a LayerNorm over the looked-up vectors. The table is a
  :class:`StableEmbeddingParam` (an ``nnx.Param`` tagged ``optim_bits=32``): it trains like
  any parameter, and 8-bit optimizers can keep 32-bit state for it, selected with
  ``nnx.state(model, StableEmbeddingParam)`` or ``stable_embedding_mask(state)``.

  Args:
    num_embeddings, features: table shape.
    dtype: dtype of the output (default: ``param_dtype``, as bitsandbytes casts back to the
      weight's dtype); the LayerNorm statistics run in float32.
    param_dtype: dtype of the table and the LayerNorm scale/bias.
    embedding_init: initializer of the table.
    epsilon: LayerNorm epsilon (torch's default 1e-5).
    rngs: rng key.
  """

  def __init__(self, num_embeddings: int, features: int, *, dtype: tp.Optional[Dtype] = None,
               param_dtype: Dtype = jnp.float32,
               embedding_init: Initializer = nnx.initializers.xavier_uniform(),
               epsilon: float = 1e-5, rngs: nnx.Rngs):
    _check_features(type(self).__name__, num_embeddings=num_embeddings, features=features)
    self.embedding = StableEmbeddingParam(
        embedding_init(rngs.params(), (num_embeddings, features), param_dtype), optim_bits=32)
    self.norm = nnx.LayerNorm(features, epsilon=epsilon, param_dtype=param_dtype, rngs=rngs)

    self.num_embeddings = num_embeddings
    self.features = features
    self.dtype = param_dtype if dtype is None else dtype
    self.param_dtype = param_dtype

  def __call__(self, inputs: Array) -> Array:
    """LayerNorm of the rows: int ``(...) -> (..., features)`` in ``dtype``."""
    _check_ids(type(self).__name__, inputs)
    # bnb normalizes in float32 (torch's default dtype), then casts to the weight's dtype.
    emb = jnp.take(self.embedding[...], inputs, axis=0).astype(jnp.float32)
    return self.norm(emb).astype(self.dtype)
