"""The functional core: bit-compatible with bitsandbytes 0.50.2's ``bitsandbytes.functional``."""

from jaxbnb.functional._checks import BLOCKSIZES_4BIT, BLOCKSIZES_8BIT
from jaxbnb.functional.blockwise import dequantize_blockwise, quantize_blockwise
from jaxbnb.functional.codebooks import (create_dynamic_map, create_linear_map,
                                         create_normal_map, get_4bit_type)
from jaxbnb.functional.fourbit import dequantize_4bit, quantize_4bit
from jaxbnb.functional.int8 import int8_vectorwise_dequant, int8_vectorwise_quant
from jaxbnb.functional.state import QuantState

__all__ = [
    "BLOCKSIZES_4BIT", "BLOCKSIZES_8BIT", "QuantState", "create_dynamic_map",
    "create_linear_map", "create_normal_map", "dequantize_4bit", "dequantize_blockwise",
    "get_4bit_type", "int8_vectorwise_dequant", "int8_vectorwise_quant", "quantize_4bit",
    "quantize_blockwise",
]
