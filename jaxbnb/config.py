"""``BitsAndBytesConfig``: what to quantize and how (transformers' field names)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from jaxbnb.functional import _checks


# Logical axis names that mark a stack axis (Linen ``nn.Partitioned`` names, NNX sharding
# metadata), besides the plain-name keys of ``stacked_axes``.
STACK_AXIS_NAMES = ("layers", "layer", "experts", "expert")


def _dtype(value, field: str) -> np.dtype:
  if isinstance(value, str):
    value = {"float": "float32", "half": "float16", "bf16": "bfloat16", "fp16": "float16",
             "fp32": "float32"}.get(value.removeprefix("torch."), value.removeprefix("torch."))
  try:
    return np.dtype(jnp.dtype(value))
  except TypeError as e:
    raise ValueError(f"{field}: not a dtype: {value!r}") from e


@dataclasses.dataclass(frozen=True)
class BitsAndBytesConfig:
  """Quantization settings, with ``transformers.BitsAndBytesConfig``'s field names.

  Exactly one of ``load_in_4bit`` / ``load_in_8bit`` must be set.

  Attributes:
    load_in_8bit: LLM.int8(): row-wise int8 weights, vector-wise int8 activations, outlier
      columns (``|x| >= llm_int8_threshold``) computed in 16-bit.
    load_in_4bit: NF4/FP4 blockwise weights (QLoRA).
    llm_int8_threshold: outlier threshold (0 disables the decomposition).
    llm_int8_skip_modules: path patterns left unquantized: a plain name matches any path
      component (``"lm_head"``), a glob matches the dotted path (``"*.proj_out.*"``). ``None``
      means ``["lm_head"]``, as transformers keeps the output head in full precision.
    llm_int8_enable_fp32_cpu_offload: kept for transformers compatibility (saved configs carry
      it); here host offload of chosen modules is :func:`jaxbnb.offload`.
    llm_int8_has_fp16_weight: keep 16-bit master weights next to the int8 ones (training);
      not supported yet (a clear error, not a silent ignore).
    bnb_4bit_quant_type: ``"nf4"`` or ``"fp4"``.
    bnb_4bit_use_double_quant: double quantization of the absmax (4.127 bits/param).
    bnb_4bit_compute_dtype: dtype of the matmul (float32 like bnb's default; bf16 recommended).
    bnb_4bit_quant_storage: dtype the packed 4-bit bytes are stored as (uint8 by default).
    blocksize: 4-bit blocksize (bnb: 64).
    quantize_embeddings: also quantize embedding tables (leaves named ``embedding``); rows are
      dequantized on lookup. transformers leaves them in 16-bit (the default).
    stacked_axes: ``{pattern: n}``: leaves whose path matches ``pattern`` (the rules of
      ``llm_int8_skip_modules``) have ``n`` leading axes that index separate weights (scanned
      layers, MoE experts); each slice is quantized as if it stood alone. Stacks the model
      marks itself are found without it: leading logical axis names (Linen
      ``nn.scan(..., metadata_params={nn.PARTITION_NAME: "layers"})``, NNX
      ``transform_metadata``) that are ``"layers"``, ``"layer"``, ``"experts"``, ``"expert"``
      or a plain-name key of ``stacked_axes``. The shape alone never makes a stack (an
      unmarked 3-D kernel is a ``DenseGeneral`` kernel). See the guide's *Stacked weights*.
  """

  load_in_8bit: bool = False
  load_in_4bit: bool = False
  llm_int8_threshold: float = 6.0
  llm_int8_skip_modules: Optional[Sequence[str]] = None
  llm_int8_enable_fp32_cpu_offload: bool = False
  llm_int8_has_fp16_weight: bool = False
  bnb_4bit_quant_type: str = "fp4"
  bnb_4bit_use_double_quant: bool = False
  bnb_4bit_compute_dtype: Any = jnp.float32
  bnb_4bit_quant_storage: Any = jnp.uint8
  blocksize: int = 64
  quantize_embeddings: bool = False
  stacked_axes: Optional[Mapping[str, int]] = None

  def __hash__(self):  # stacked_axes is a dict: hash its items
    return hash(tuple((f.name, tuple(sorted(v.items())) if isinstance(v, dict) else v)
                      for f in dataclasses.fields(self) for v in (getattr(self, f.name),)))

  def __post_init__(self):
    for f in ("load_in_8bit", "load_in_4bit", "llm_int8_enable_fp32_cpu_offload",
              "llm_int8_has_fp16_weight", "bnb_4bit_use_double_quant", "quantize_embeddings"):
      v = getattr(self, f)
      if not isinstance(v, (bool, np.bool_)):  # "yes" or 0.5 would read as True silently
        raise ValueError(f"BitsAndBytesConfig.{f} must be True or False; got {v!r}")
      object.__setattr__(self, f, bool(v))
    if self.load_in_4bit and self.load_in_8bit:
      raise ValueError("BitsAndBytesConfig: load_in_4bit and load_in_8bit are both set; "
                       "choose one")
    if not (self.load_in_4bit or self.load_in_8bit):
      raise ValueError("BitsAndBytesConfig: set load_in_4bit=True or load_in_8bit=True")
    _checks.check_quant_type(self.bnb_4bit_quant_type)
    _checks.check_blocksize(self.blocksize, _checks.BLOCKSIZES_4BIT, "BitsAndBytesConfig")
    thr = self.llm_int8_threshold
    if (isinstance(thr, (bool, np.bool_)) or not isinstance(thr, numbers.Real)
        or not math.isfinite(float(thr)) or float(thr) < 0):
      raise ValueError(f"llm_int8_threshold must be a finite number >= 0; got {thr!r}")
    object.__setattr__(self, "llm_int8_threshold", float(thr))
    if self.llm_int8_has_fp16_weight:
      raise NotImplementedError("llm_int8_has_fp16_weight=True (int8 training with 16-bit "
                                "master weights) is not supported yet; train adapters on a "
                                "frozen base instead (QLoRA)")
    skip = self.llm_int8_skip_modules
    if isinstance(skip, str) or (skip is not None and not all(isinstance(s, str) for s in skip)):
      raise ValueError("llm_int8_skip_modules must be a list of strings, e.g. ['lm_head']")
    object.__setattr__(self, "llm_int8_skip_modules",
                       ("lm_head",) if skip is None else tuple(skip))
    stacked = {} if self.stacked_axes is None else self.stacked_axes
    if not isinstance(stacked, Mapping) or not all(
        isinstance(k, str) and isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        and v >= 1 for k, v in stacked.items()):
      raise ValueError(f"stacked_axes must map path patterns to a count of leading stack axes "
                       f"(an int >= 1), e.g. {{'layers': 1}}; got {self.stacked_axes!r}")
    object.__setattr__(self, "stacked_axes", {k: int(v) for k, v in stacked.items()})
    object.__setattr__(self, "bnb_4bit_compute_dtype",
                       _dtype(self.bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype"))
    object.__setattr__(self, "bnb_4bit_quant_storage",
                       _dtype(self.bnb_4bit_quant_storage, "bnb_4bit_quant_storage"))
    if not jnp.issubdtype(self.bnb_4bit_compute_dtype, jnp.floating):
      raise ValueError(f"bnb_4bit_compute_dtype must be a float dtype; got "
                       f"{self.bnb_4bit_compute_dtype}")
    # The packed bytes are reinterpreted as whole words: the same rule as quantize_4bit's.
    _checks.check_storage(self.bnb_4bit_quant_storage, "bnb_4bit_quant_storage")

  @property
  def quant_method(self) -> str:
    return "nf4" if self.load_in_4bit and self.bnb_4bit_quant_type == "nf4" else (
        "fp4" if self.load_in_4bit else "llm_int8")
