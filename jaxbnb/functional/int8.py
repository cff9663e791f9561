"""LLM.int8() vector-wise int8 quantization with outlier columns (bnb ``int8_vectorwise_quant``).

Rows are all leading axes flattened; columns the last axis. Each row is scaled by 127 / its
absmax, rounded half to even. With ``threshold > 0`` every column holding some ``|x| >=
threshold`` is an outlier column: its values are left out of the row absmax and its codes are
zero (LLM.int8() computes those columns in 16-bit instead).

Non-finite policy: a row holding NaN gets a NaN absmax and zero codes, so only that row
dequantizes to NaN. +-Inf is an outlier when ``threshold > 0``; otherwise it behaves like NaN.
Extreme finite values stay finite and within bound (a row absmax above 2**126, whose reciprocal
bnb flushes to zero; below 2**-120, where bnb's ``127 / absmax`` overflows; above float32's max
/ 127, where bnb's ``q * absmax`` does); everywhere else the bits are bitsandbytes'.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb.functional import _checks
from jaxbnb.functional.blockwise import reciprocal

_INV_127 = jnp.float32(7.874015718698502e-3)  # bnb multiplies by this float32 1/127
_SMALL = np.float32(2.0**-120)  # below this row absmax, 127 / absmax overflows float32
_SCALE_UP = np.float32(2.0**64)


def _rows(x: jax.Array) -> jax.Array:
  """float32 ``(rows, cols)`` view: every leading axis is a row (also when ``cols == 0``)."""
  return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).astype(jnp.float32)


def _quant_rows(rows, threshold, sparse):
  mag = jnp.abs(rows)
  if sparse:
    outliers = (threshold > 0) & (mag >= threshold)
  else:  # threshold known to be 0: no outlier mask to build (and none for XLA to fold)
    outliers = jnp.zeros(mag.shape, jnp.bool_)
  outlier_cols = jnp.any(outliers, axis=0)
  kept = jnp.where(outlier_cols[None, :], 0.0, rows)
  inliers = jnp.where(outliers, 0.0, mag)
  row_absmax = jnp.max(inliers, axis=1)
  # Explicit test: XLA's vectorized CPU max does not always propagate NaN.
  row_absmax = jnp.where(jnp.any(~jnp.isfinite(inliers), axis=1), jnp.nan, row_absmax)
  # bnb: x * (127 * rcp(absmax)); `post` is 1 except past absmax 2**126 (see reciprocal)
  # and below 2**-120, where 127 * rcp overflows (bnb's codes are garbage there): the absmax
  # is scaled by 2**64 first and the codes by 2**-64 after, powers of two that round alike.
  small = row_absmax < _SMALL
  rcp, post = reciprocal(jnp.where(small, row_absmax * _SCALE_UP, row_absmax))
  post = jnp.where(small, _SCALE_UP, post)
  scale = jnp.float32(127) * rcp
  q = jnp.round(kept * scale[:, None] * post[:, None])
  q = jnp.where(jnp.isfinite(scale)[:, None], jnp.clip(q, -127, 127), 0).astype(jnp.int8)
  return q, row_absmax, outlier_cols


@functools.partial(jax.jit, static_argnames="sparse")
def _quant(x, threshold, sparse=True):
  q, row_absmax, outlier_cols = _quant_rows(_rows(x), threshold, sparse)
  return q.reshape(x.shape), row_absmax, outlier_cols


def _check_input(x, what: str) -> jax.Array:
  _checks.check_float_input(x, what)
  x = jnp.asarray(x)
  if x.ndim == 0:
    raise ValueError(f"{what} needs at least one axis (the columns)")
  return x


def _empty(x):
  """The result for zero columns: no codes, zero row absmax, no outlier columns."""
  return (jnp.zeros(x.shape, jnp.int8), jnp.zeros((math.prod(x.shape[:-1]),), jnp.float32),
          jnp.zeros((0,), jnp.bool_))


def int8_vectorwise_quant(x: jax.Array, threshold: float = 0.0):
  """Row-wise (vector-wise) absmax int8 quantization.

  Args:
    x: floating ``(..., cols)`` array (bnb takes float16; any float dtype works here).
    threshold: outlier threshold; 0 disables the decomposition. May be a traced scalar.

  Returns:
    ``(q, row_absmax, outlier_cols)``: int8 ``x.shape``; float32 ``(rows,)``; bool ``(cols,)``
    (bitsandbytes returns the indices ``np.nonzero(outlier_cols)[0]``). With zero columns the
    codes are empty and every row absmax is 0.
  """
  x = _check_input(x, "int8_vectorwise_quant")
  if x.shape[-1] == 0:
    return _empty(x)
  # A concrete threshold <= 0 selects the dense path at trace time.
  sparse = not (isinstance(threshold, (int, float, np.number)) and threshold <= 0)
  return _quant(x, jnp.asarray(threshold, jnp.float32), sparse=sparse)


def float16_rounded(w: jax.Array) -> jax.Array:
  """float32 ``w`` rounded to float16, except values float16 cannot hold, which stay as they are.

  bnb's ``Int8Params`` quantizes a weight from its float16 copy; a finite float32 value past
  65504 would become inf there, and its whole row NaN. Elsewhere the values are exactly the
  float16 ones, so the codes and scales are bnb's.
  """
  w = jnp.asarray(w)
  w16 = w.astype(jnp.float16).astype(jnp.float32)
  w32 = w.astype(jnp.float32)
  return jnp.where(jnp.isinf(w16) & jnp.isfinite(w32), w32, w16)


@jax.jit
def _quant_weight(w):
  q, row_absmax, _ = _quant_rows(_rows(float16_rounded(w)), jnp.float32(0), False)
  return q.reshape(w.shape), row_absmax


def int8_weight_quant(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """LLM.int8() weight quantization as bnb's ``Int8Params``: ``(CB int8 w.shape, SCB float32)``.

  A float32/float16 weight is rounded to float16 first (:func:`float16_rounded`: values past
  float16's range keep their float32 value instead of overflowing); a bfloat16 weight is
  quantized from its own values. Rows are all leading axes (the ``(out, in)`` matrix's output
  features), with no outlier threshold.
  """
  w = _check_input(w, "int8_weight_quant")
  if w.shape[-1] == 0:
    return _empty(w)[:2]
  if w.dtype == jnp.bfloat16:
    return _quant(w, jnp.float32(0), sparse=False)[:2]
  return _quant_weight(w)


@jax.jit
def _dequant(q, row_absmax):
  rows = _rows(q)
  a = row_absmax.reshape(-1, 1)
  # bnb: (q * absmax) * (1/127). Where 127 * absmax overflows (absmax > ~2.7e36) that is inf
  # for the row's largest codes: scale the absmax first there (the multiply by 1 is exact).
  big = jnp.isinf(jnp.float32(127) * a) & jnp.isfinite(a)
  out = (rows * jnp.where(big, a * _INV_127, a)) * jnp.where(big, jnp.float32(1), _INV_127)
  return out.reshape(q.shape)


def int8_vectorwise_dequant(q: jax.Array, row_absmax: jax.Array) -> jax.Array:
  """float32 ``q * row_absmax / 127`` (bitsandbytes ``int8_vectorwise_dequant``)."""
  q = jnp.asarray(q)
  if q.dtype != jnp.int8:
    raise TypeError(f"int8_vectorwise_dequant expects int8 codes; got {q.dtype}")
  if q.ndim == 0:
    raise ValueError("int8_vectorwise_dequant needs at least one axis (the columns)")
  row_absmax = jnp.asarray(row_absmax, jnp.float32)
  rows = math.prod(q.shape[:-1])
  if row_absmax.size != rows:
    raise ValueError(f"int8_vectorwise_dequant: {rows} rows of codes {q.shape} need {rows} "
                     f"row_absmax values; got {row_absmax.shape}")
  return _dequant(q, row_absmax)
