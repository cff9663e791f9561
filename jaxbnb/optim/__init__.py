"""Low-bit optimizer state for optax: bitsandbytes' 8-bit optimizers, 4-bit Adam/AdamW (Li et al.
2023) and ``quantize_state`` for any optax optimizer."""

from jaxbnb.optim.alias import (adagrad8bit, adam8bit, adamw8bit, ademamix8bit, lamb8bit,
                                lars8bit, lion8bit, rmsprop8bit, sgd8bit)
from jaxbnb.optim.clipping import percentile_clipping
from jaxbnb.optim.fourbit import (adam4bit, adamw4bit, paged_adam4bit, paged_adamw4bit,
                                  scale_by_adam_4bit)
from jaxbnb.optim.fourbit_state import Blockwise4bit, Rank1Moment, read_moment4
from jaxbnb.optim.fused import FusedOptimizer, adamw8bit_fused
from jaxbnb.optim.paged import (host_memory_supported, paged, paged_adam8bit, paged_adamw8bit,
                                paged_lion8bit)
from jaxbnb.optim.quantize_state import (QuantizedLeaf, dequantize_leaf, quantize_leaf,
                                         quantize_state)
from jaxbnb.optim.sharding import state_shardings, state_specs
from jaxbnb.optim.state import QuantizedMoment, read_moment, state_bytes
from jaxbnb.optim.transforms import (scale_by_adam_8bit, scale_by_ademamix_8bit,
                                     scale_by_lion_8bit, scale_by_rms_8bit, scale_by_rss_8bit,
                                     trace_8bit)

__all__ = [
    "Blockwise4bit", "QuantizedLeaf", "Rank1Moment", "adam4bit", "adamw4bit", "dequantize_leaf",
    "paged_adam4bit", "paged_adamw4bit", "quantize_leaf", "quantize_state", "read_moment4",
    "scale_by_adam_4bit",
    "FusedOptimizer", "QuantizedMoment", "adagrad8bit", "adam8bit", "adamw8bit",
    "adamw8bit_fused", "ademamix8bit",
    "host_memory_supported", "lamb8bit", "lars8bit", "lion8bit", "paged", "paged_adam8bit",
    "paged_adamw8bit", "paged_lion8bit", "percentile_clipping", "read_moment", "rmsprop8bit",
    "scale_by_adam_8bit", "scale_by_ademamix_8bit", "scale_by_lion_8bit", "scale_by_rms_8bit",
    "scale_by_rss_8bit", "sgd8bit", "state_bytes", "state_shardings", "state_specs",
    "trace_8bit",
]
