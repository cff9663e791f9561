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


def check_storage(quant_storage, what: str) -> np.dtype:
  """The ``quant_storage`` dtype, refused unless its items are whole bytes (int4, bool, complex
  cannot hold the packed bytes bit for bit)."""
  try:
    storage = np.dtype(quant_storage)
  except TypeError:
    raise TypeError(f"{what}: quant_storage must be a dtype; got {quant_storage!r}") from None
  if jnp.issubdtype(storage, jnp.integer):
    bits = jnp.iinfo(storage).bits
  elif jnp.issubdtype(storage, jnp.floating):
    bits = jnp.finfo(storage).bits
  else:
    bits = 0  # bool, complex, ...
  if bits != 8 * storage.itemsize:
    raise ValueError(f"{what}: quant_storage must be a whole-byte integer or float dtype "
                     f"(uint8, bnb's default; int8, bfloat16, float16, float32, ...); got "
                     f"{storage}")
  return storage


def _array_spec(a) -> tuple:
  return (tuple(np.shape(a)), np.dtype(jnp.result_type(a)))


def check_state(state, n: int, bits: int, what: str) -> None:
  """Refuse a ``QuantState`` that cannot describe ``n`` codes of a ``bits``-bit format.

  Everything checked is static (shapes, dtypes, aux data), so this costs nothing under jit. A
  state from another array, another format, or edited by hand (blocksize, truncated absmax)
  would otherwise dequantize to wrong numbers without an error.
  """
  from jaxbnb.functional.state import QuantState  # noqa: PLC0415 - state imports nothing here
  fix = ("pass the QuantState that quantize_4bit returned with these codes" if bits == 4 else
         "pass the QuantState that quantize_blockwise returned with these codes")
  if not isinstance(state, QuantState):
    raise TypeError(f"{what} needs a QuantState; got {type(state).__name__}")
  if bits == 4 and state.quant_type not in QUANT_TYPES_4BIT:
    raise ValueError(f"{what}: the state's quant_type is {state.quant_type!r}, not 4-bit "
                     f"{QUANT_TYPES_4BIT}" + ("; it is an 8-bit state: use dequantize_blockwise"
                                             if state.quant_type == "dynamic" else ""))
  if bits == 8 and state.quant_type != "dynamic":
    raise ValueError(f"{what}: the state's quant_type is {state.quant_type!r}, not 8-bit "
                     "'dynamic'" + ("; it is a 4-bit state: use dequantize_4bit"
                                    if state.quant_type in QUANT_TYPES_4BIT else ""))
  check_blocksize(state.blocksize, BLOCKSIZES_4BIT if bits == 4 else BLOCKSIZES_8BIT, what)
  # 4-bit tables are fixed (16 values); an 8-bit table may be any map of at most 256 values
  # (``quantize_blockwise(code=...)`` takes custom maps, e.g. a 15-level int4 grid).
  shape = tuple(np.shape(state.code))
  if (shape != (16,)) if bits == 4 else (len(shape) != 1 or not 2 <= shape[0] <= 256):
    want = "16 entries" if bits == 4 else "2 to 256 entries"
    raise ValueError(f"{what}: a {bits}-bit state's code table has {want}; this one "
                     f"has shape {shape}: {fix}")
  nblocks = -(-n // state.blocksize)
  want = ((nblocks,), np.dtype(np.uint8 if state.nested else np.float32))
  if _array_spec(state.absmax) != want:
    got = _array_spec(state.absmax)
    raise ValueError(f"{what}: {n} values at blocksize {state.blocksize} need absmax "
                     f"{want[1]} {want[0]}; the state has {got[1]} {got[0]}: {fix}")
  size = int(np.prod(state.shape, dtype=np.int64))
  if size != n:
    raise ValueError(f"{what}: the state describes shape {tuple(state.shape)} ({size} values); "
                     f"the codes hold {n}: {fix}")
  if state.nested:
    if _array_spec(state.offset)[0] != ():
      raise ValueError(f"{what}: a nested state's offset is a float32 scalar; got shape "
                       f"{_array_spec(state.offset)[0]}: {fix}")
    check_state(state.state2, nblocks, 8, what + " (nested absmax)")
  elif state.offset is not None:
    raise ValueError(f"{what}: the state has an offset but no nested state2: {fix}")
