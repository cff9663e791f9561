"""jaxbnb: bitsandbytes in pure JAX/XLA.

k-bit quantization (8-bit dynamic blockwise, NF4/FP4 with double quantization, LLM.int8()),
bit-compatible with bitsandbytes 0.50.2.
"""

from jaxbnb import functional
from jaxbnb.functional import QuantState

__version__ = "0.1.0"

__all__ = ["QuantState", "functional"]
