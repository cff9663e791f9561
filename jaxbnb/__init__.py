"""jaxbnb: bitsandbytes in pure JAX/XLA.

k-bit quantization (8-bit dynamic blockwise, NF4/FP4 with double quantization, LLM.int8()),
bit-compatible with bitsandbytes 0.50.2; quantized matmuls with autodiff; ``quantize(params)``
for any Flax model and ``intercept`` to run unmodified models on the packed weights; Optax
8-bit optimizers (``jaxbnb.optim``), QLoRA (``jaxbnb.lora``), Orbax checkpoints and Hugging Face
bitsandbytes interop.

Example::

  import jax, jax.numpy as jnp, jaxbnb

  params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (256, 128))}}
  cfg = jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=jnp.bfloat16)
  q = jaxbnb.quantize(params, cfg)                  # NF4, bnb's packed layout
  y = jaxbnb.matmul(jnp.ones((4, 256)), q["dense"]["kernel"])   # (4, 128), from the packed form
  print(jaxbnb.memory_footprint(q), "bytes")

Guide and API reference: the documentation site in docs/ of the source repository
(``make docs`` builds it).
"""

from jaxbnb import checkpoint, functional, interop, lora, models, nn, optim
from jaxbnb.config import BitsAndBytesConfig
from jaxbnb.functional import QuantState
from jaxbnb.intercept import intercept
from jaxbnb.interop.load import load_quantized, offload
from jaxbnb.ops import int8_matmul, matmul, matmul_4bit, qdot_general
from jaxbnb.qtensor import Quantized4bit, Quantized8bit, QuantizedArray, is_quantized
from jaxbnb.tree import dequantize, memory_footprint, quantize

__version__ = "0.1.0"

__all__ = [
    "BitsAndBytesConfig", "checkpoint", "interop", "QuantState", "Quantized4bit", "Quantized8bit", "QuantizedArray",
    "dequantize", "functional", "lora", "models", "nn", "optim", "int8_matmul", "intercept", "is_quantized", "load_quantized", "matmul",
    "matmul_4bit", "memory_footprint", "offload", "qdot_general", "quantize",
]
