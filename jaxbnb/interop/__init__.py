"""Hugging Face / bitsandbytes checkpoint interop: bnb's safetensors layout, both ways;
streaming quantize-on-load of float checkpoints; host offload."""

from jaxbnb.interop.bnb_safetensors import (as_bnb_weight, as_flax_kernel, bnb_tensors,
                                            from_flax, load_bnb_state_dict, parse_quant_state,
                                            quant_state_blob, save_bnb_state_dict, to_flax)
from jaxbnb.interop.load import HostOffloaded, TensorSource, is_offloaded, load_quantized, offload

__all__ = [
    "HostOffloaded", "TensorSource", "is_offloaded", "load_quantized", "offload", "as_bnb_weight", "as_flax_kernel", "bnb_tensors", "from_flax", "load_bnb_state_dict",
    "parse_quant_state", "quant_state_blob", "save_bnb_state_dict", "to_flax",
]
