"""Argument validation shared by the functional primitives; errors name the fix."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

BLOCKSIZES_8BIT = (64, 128, 256, 512, 1024, 2048, 4096)
BLOCKSIZES_4BIT = (32,) + BLOCKSIZES_8BIT
QUANT_TYPES_4BIT = ("nf4", "fp4")


def check_blocksize(blocksize, allowed: tuple[int, ...], what: str) -> int:
  if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) or (
      int(blocksize) not in allowed):
    raise ValueError(
        f"{what}: blocksize must be one of {', '.join(map(str, allowed))}; got {blocksize!r}")
  return int(blocksize)


def check_float_input(x, what: str) -> None:
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"{what} quantizes floating-point arrays (float32, bfloat16, float16); got {dtype}. "
        "Cast first, e.g. x.astype(jnp.float32)." if not jnp.issubdtype(dtype, jnp.complexfloating)
        else f"{what} does not quantize complex arrays ({dtype}); quantize the real and "
        "imaginary parts separately.")


def check_quant_type(quant_type) -> str:
  if quant_type not in QUANT_TYPES_4BIT:
    raise ValueError(f"quant_type must be one of {QUANT_TYPES_4BIT}; got {quant_type!r}")
  return quant_type


def check_uint8(q, what: str) -> None:
  if jnp.result_type(q) != jnp.uint8:
    raise TypeError(f"{what} expects uint8 codes; got {jnp.result_type(q)}")
