"""Quantization codebooks (lookup tables), bit-identical to bitsandbytes 0.50.2.

Every table is built on the host in NumPy, in the same float32 arithmetic bitsandbytes uses
(including torch's ``linspace``, whose CPU kernel rounds ``start + step * i`` once, as an FMA),
and returned as a float32 ``jax.Array``.
"""

from __future__ import annotations

import functools
import statistics

import jax.numpy as jnp
import numpy as np

_F32 = np.float32


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
  """float32 ``torch.linspace`` as torch's CPU kernel computes it.

  The first half counts up from ``start``, the second half down from ``end``; each element
  is one fused multiply-add, i.e. rounded to float32 once.
  """
  start32, end32 = _F32(start), _F32(end)
  if steps == 1:
    return np.array([start32], _F32)
  step = _F32(_F32(end32 - start32) / _F32(steps - 1))
  idx = np.arange(steps, dtype=np.float64)
  half = steps // 2
  up = np.float64(start32) + np.float64(step) * idx
  down = np.float64(end32) - np.float64(step) * (steps - 1 - idx)
  # float32 x small int is exact in float64, and so is the sum here: one rounding, as an FMA.
  return np.where(idx < half, up, down).astype(_F32)


@functools.lru_cache(maxsize=None)
def _dynamic_map_np(signed: bool, max_exponent_bits: int, total_bits: int) -> np.ndarray:
  data: list[np.ndarray] = []
  non_sign_bits = total_bits - 1
  additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
  i = 0
  for i in range(max_exponent_bits):
    n = (2 ** (i + non_sign_bits - max_exponent_bits) + 1) if signed else (
        2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
    data.extend(_scaled_means(n, 10.0 ** (-(max_exponent_bits - 1) + i), signed))
  if additional_items > 0:
    data.extend(_scaled_means(additional_items + 1, 10.0 ** (-(max_exponent_bits - 1) + i), signed))
  data.append(np.array([0.0, 1.0], _F32))
  values = np.concatenate(data).astype(_F32)
  if values.size != 2**total_bits:
    raise ValueError(
        f"max_exponent_bits={max_exponent_bits} does not fit total_bits={total_bits}")
  values = np.concatenate([values, np.zeros(256 - values.size, _F32)])
  values.sort()
  values.flags.writeable = False
  return values


def _scaled_means(n: int, scale: float, signed: bool) -> list[np.ndarray]:
  b = _torch_linspace(0.1, 1.0, n)
  means = (b[:-1] + b[1:]) / _F32(2.0)
  pos = _F32(scale) * means  # torch multiplies a float32 tensor by the scalar in float32
  return [pos, -pos] if signed else [pos]


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7,
                       total_bits: int = 8) -> jnp.ndarray:
  """The dynamic (exponent + fraction) 8-bit map of Dettmers (2016), sorted ascending.

  Returns:
    float32 ``(256,)``, equal to ``bitsandbytes.functional.create_dynamic_map``. For
    ``total_bits < 8`` the unused entries are zeros, as in bitsandbytes.
  """
  return jnp.asarray(_dynamic_map_np(bool(signed), int(max_exponent_bits), int(total_bits)))


@functools.lru_cache(maxsize=None)
def _normal_map_np(offset: float, use_extra_value: bool, total_bits: int) -> np.ndarray:
  ppf = statistics.NormalDist().inv_cdf
  if use_extra_value:  # asymmetric: 8 positive, 7 negative levels and an exact zero
    pos = [ppf(float(p)) for p in _torch_linspace(offset, 0.5, 9)[:-1]]
    neg = [-ppf(float(p)) for p in _torch_linspace(offset, 0.5, 8)[:-1]]
  else:
    pos = [ppf(float(p)) for p in _torch_linspace(offset, 0.5, 8)[:-1]]
    neg = [-ppf(float(p)) for p in _torch_linspace(offset, 0.5, 8)[:-1]]
  zeros = (2**total_bits - len(pos) - len(neg))
  values = np.sort(np.array(pos + [0.0] * zeros + neg, _F32))
  values = values / values.max()
  values.flags.writeable = False
  return values


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True,
                      total_bits: int = 4) -> jnp.ndarray:
  """NormalFloat: levels at N(0, 1) quantiles, normalized to [-1, 1] (QLoRA, Sec. 3).

  With ``use_extra_value`` the map is asymmetric with an exact zero: 8 positive quantiles of
  ``linspace(offset, 0.5, 9)`` and 7 negative ones of ``linspace(offset, 0.5, 8)``.

  Returns:
    float32 ``(2**total_bits,)`` sorted ascending. The default (``total_bits=4``) is the NF4
    table; ``total_bits=8`` is bitsandbytes' 256-entry layout (padded with zeros).
  """
  if total_bits < 4 or total_bits > 8:
    raise ValueError(f"total_bits must be in 4..8, got {total_bits}")
  return jnp.asarray(_normal_map_np(float(offset), bool(use_extra_value), int(total_bits)))


def create_linear_map(signed: bool = True, total_bits: int = 8,
                      add_zero: bool = True) -> jnp.ndarray:
  """Evenly spaced levels in [-1, 1] (or [0, 1]); float32 ``(256,)`` as in bitsandbytes."""
  sign = -1.0 if signed else 0.0
  total = 2**total_bits
  if add_zero or total_bits < 8:
    # Simulating fewer bits centres the levels on zero, which costs one value when signed.
    total = 2**total_bits if not signed else 2**total_bits - 1
  values = _torch_linspace(sign, 1.0, total)
  gap = 256 - values.size
  if gap:
    half = values.size // 2
    values = np.concatenate([values[:half], np.zeros(gap, _F32), values[half:]])
  return jnp.asarray(values)


_FP4_E2M1 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
             0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)  # code 8 is +0.0, as in bnb


@functools.lru_cache(maxsize=None)
def _four_bit_np(quant_type: str) -> np.ndarray:
  if quant_type == "nf4":
    values = np.asarray(_normal_map_np(0.9677083, True, 4))
  elif quant_type == "fp4":
    # bitsandbytes' FP4 (E2M1, no inf/nan) in its index order: bit 3 is the sign.
    raw = np.array(_FP4_E2M1, _F32)
    values = raw / np.abs(raw).max()
  else:
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
  values = values.astype(_F32)
  values.flags.writeable = False
  return values


def get_4bit_type(quant_type: str) -> jnp.ndarray:
  """The 16 values of a 4-bit data type in bitsandbytes' index (code) order.

  Returns:
    float32 ``(16,)``. ``"nf4"`` is sorted ascending (code 7 is 0.0); ``"fp4"`` puts the sign in
    bit 3 (codes 0 and 8 are both +0.0).
  """
  return jnp.asarray(_four_bit_np(quant_type))
