"""Flax layers with quantized weights: bitsandbytes' ``bnb.nn``, for models written by hand.

The NNX layers are exported here (``jaxbnb.nn.Linear4bit``, ...); the Linen ones live in
:mod:`jaxbnb.nn.linen` under the same names. Packed weights are never trainable params: in NNX
they are :class:`QuantizedParam` variables (``nnx.state(model, nnx.Param)`` leaves them out),
in Linen they sit in the ``"quantized"`` collection.

To run an existing, unmodified Flax model on quantized weights instead, see
:func:`jaxbnb.quantize` and :func:`jaxbnb.intercept`.
"""

from jaxbnb.nn import linen
from jaxbnb.nn.nnx import (Embedding4bit, Embedding8bit, EmbeddingFP4, EmbeddingNF4, Linear4bit,
                           Linear8bitLt, LinearFP4, LinearNF4, QuantizedParam, StableEmbedding,
                           StableEmbeddingParam, stable_embedding_mask)

__all__ = [
    "Embedding4bit", "Embedding8bit", "EmbeddingFP4", "EmbeddingNF4", "Linear4bit",
    "Linear8bitLt", "LinearFP4", "LinearNF4", "QuantizedParam", "StableEmbedding",
    "StableEmbeddingParam", "linen", "stable_embedding_mask",
]
