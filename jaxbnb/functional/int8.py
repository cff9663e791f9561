"""LLM.int8() vector-wise int8 quantization with outlier columns (bnb ``int8_vectorwise_quant``).

Rows are all leading axes flattened; columns the last axis. Each row is scaled by 127 / its
absmax, rounded half to even. With ``threshold > 0`` every column holding some ``|x| >=
threshold`` is an outlier column: its values are left out of the row absmax and its codes are
zero (LLM.int8() computes those columns in 16-bit instead).

Non-finite policy: a row holding NaN gets a NaN absmax and zero codes, so only that row
dequantizes to NaN. +-Inf is an outlier when ``threshold > 0``; otherwise it behaves like NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb.functional import _checks

_INV_127 = jnp.float32(7.874015718698502e-3)  # bnb multiplies by this float32 1/127


@functools.partial(jax.jit, static_argnames="sparse")
def _quant(x, threshold, sparse=True):
  rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
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
  scale = jnp.float32(127) * (jnp.float32(1) / row_absmax)  # bnb: 127 * rcp(absmax)
  q = jnp.round(kept * scale[:, None])
  q = jnp.where(jnp.isfinite(scale)[:, None], jnp.clip(q, -127, 127), 0).astype(jnp.int8)
  return q.reshape(x.shape), row_absmax, outlier_cols


def int8_vectorwise_quant(x: jax.Array, threshold: float = 0.0):
  """Row-wise (vector-wise) absmax int8 quantization.

  Args:
    x: floating ``(..., cols)`` array (bnb takes float16; any float dtype works here).
    threshold: outlier threshold; 0 disables the decomposition. May be a traced scalar.

  Returns:
    ``(q, row_absmax, outlier_cols)``: int8 ``x.shape``; float32 ``(rows,)``; bool ``(cols,)``
    (bitsandbytes returns the indices ``np.nonzero(outlier_cols)[0]``).
  """
  _checks.check_float_input(x, "int8_vectorwise_quant")
  x = jnp.asarray(x)
  if x.ndim == 0:
    raise ValueError("int8_vectorwise_quant needs at least one axis (the columns)")
  # A concrete threshold <= 0 selects the dense path at trace time.
  sparse = not (isinstance(threshold, (int, float, np.number)) and threshold <= 0)
  return _quant(x, jnp.asarray(threshold, jnp.float32), sparse=sparse)


@jax.jit
def _dequant(q, row_absmax):
  rows = q.reshape(-1, q.shape[-1]).astype(jnp.float32)
  return ((rows * row_absmax.reshape(-1, 1)) * _INV_127).reshape(q.shape)


def int8_vectorwise_dequant(q: jax.Array, row_absmax: jax.Array) -> jax.Array:
  """float32 ``q * row_absmax / 127`` (bitsandbytes ``int8_vectorwise_dequant``)."""
  q = jnp.asarray(q)
  if q.dtype != jnp.int8:
    raise TypeError(f"int8_vectorwise_dequant expects int8 codes; got {q.dtype}")
  return _dequant(q, jnp.asarray(row_absmax, jnp.float32))
