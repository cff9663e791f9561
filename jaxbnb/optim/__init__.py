"""8-bit optimizers for optax: blockwise-quantized state (bitsandbytes' 8-bit optimizers)."""

from jaxbnb.optim.alias import (adagrad8bit, adam8bit, adamw8bit, ademamix8bit, lamb8bit,
                                lars8bit, lion8bit, rmsprop8bit, sgd8bit)
from jaxbnb.optim.clipping import percentile_clipping
from jaxbnb.optim.fused import FusedOptimizer, adamw8bit_fused
from jaxbnb.optim.paged import (host_memory_supported, paged, paged_adam8bit, paged_adamw8bit,
                                paged_lion8bit)
from jaxbnb.optim.state import QuantizedMoment, read_moment, state_bytes
from jaxbnb.optim.transforms import (scale_by_adam_8bit, scale_by_ademamix_8bit,
                                     scale_by_lion_8bit, scale_by_rms_8bit, scale_by_rss_8bit,
                                     trace_8bit)

__all__ = [
    "FusedOptimizer", "QuantizedMoment", "adagrad8bit", "adam8bit", "adamw8bit",
    "adamw8bit_fused", "ademamix8bit",
    "host_memory_supported", "lamb8bit", "lars8bit", "lion8bit", "paged", "paged_adam8bit",
    "paged_adamw8bit", "paged_lion8bit", "percentile_clipping", "read_moment", "rmsprop8bit",
    "scale_by_adam_8bit", "scale_by_ademamix_8bit", "scale_by_lion_8bit", "scale_by_rms_8bit",
    "scale_by_rss_8bit", "sgd8bit", "state_bytes", "trace_8bit",
]
