"""Hypothesis properties of every functional primitive: bounds, idempotence, edge cases."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxbnb import functional as F

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
EPS = {jnp.float32: 2.0**-24, jnp.bfloat16: 2.0**-8, jnp.float16: 2.0**-11}  # unit roundoff


@st.composite
def arrays(draw, max_size=700):
  """(x, dtype): any shape (odd sizes, partial blocks), scales from tiny to huge, with
  all-zero stretches; finite in its dtype."""
  dtype = draw(st.sampled_from(DTYPES))
  ndim = draw(st.integers(1, 3))
  shape = tuple(draw(st.lists(st.integers(1, 40), min_size=ndim, max_size=ndim)))
  if int(np.prod(shape)) > max_size:
    shape = (draw(st.integers(1, max_size)),)
  n = int(np.prod(shape))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(n) * rng.choice([1.0, 0.01, 100.0], size=n)
  if dtype == jnp.float32:
    scale = 2.0 ** draw(st.integers(-100, 100))
  elif dtype == jnp.bfloat16:
    scale = 2.0 ** draw(st.integers(-60, 60))
  else:  # float16: up to its overflow, down to where it keeps a few bits
    scale = 2.0 ** draw(st.integers(-10, 12))
  x = x * scale
  if draw(st.booleans()):  # an all-zero stretch (whole blocks for small blocksizes)
    start = draw(st.integers(0, n - 1))
    x[start:start + draw(st.integers(1, 300))] = 0
  if dtype == jnp.float16:
    x = np.clip(x, -65504, 65504)
  return jnp.asarray(x.reshape(shape)).astype(dtype), dtype


def _max_gap(code):
  c = np.sort(np.unique(np.asarray(code, np.float64)))
  return np.max(np.diff(c))


def _check_bound(x, y, absmax, blocksize, code, dtype):
  """|x - y| <= absmax * max_gap / 2 per block, plus the output dtype's rounding, plus (when
  the statistics are nested) the error of the stored absmax itself."""
  x64 = np.asarray(x.astype(jnp.float32), np.float64).reshape(-1)
  y64 = np.asarray(y.astype(jnp.float32), np.float64).reshape(-1)
  nblocks = -(-x64.size // blocksize)
  true = np.abs(np.pad(x64, (0, nblocks * blocksize - x64.size))).reshape(nblocks, -1).max(1)
  stored_err = np.abs(true - np.asarray(absmax, np.float64))
  a = np.repeat(true, blocksize)[: x64.size]
  bound = (a * _max_gap(code) / 2 * (1 + 1e-6) + np.repeat(stored_err, blocksize)[: x64.size]
           + np.abs(y64) * EPS[dtype] + 1e-45)
  assert np.all(np.isfinite(y64))
  assert np.all(np.abs(x64 - y64) <= bound), np.max(np.abs(x64 - y64) - bound)
  assert np.all(y64[x64 == 0] == 0)  # zeros (and all-zero blocks) come back exactly


@given(arrays(), st.sampled_from(F.BLOCKSIZES_8BIT), st.booleans())
def test_blockwise8_round_trip_bound(xd, blocksize, nested):
  x, dtype = xd
  q, state = F.quantize_blockwise(x, blocksize=blocksize, nested=nested)
  y = F.dequantize_blockwise(q, state)
  assert y.dtype == x.dtype and y.shape == x.shape
  absmax = F.blockwise.unnest_absmax(state)
  _check_bound(x, y, absmax, blocksize, state.code, dtype)
  if not nested:  # the stored absmax is the block's true max |x|
    flat = np.abs(np.asarray(x.astype(jnp.float32))).reshape(-1)
    pad = np.pad(flat, (0, absmax.size * blocksize - flat.size))
    np.testing.assert_array_equal(np.asarray(absmax), pad.reshape(-1, blocksize).max(1))


@given(arrays(), st.sampled_from(F.BLOCKSIZES_4BIT), st.sampled_from(["nf4", "fp4"]),
       st.booleans())
def test_4bit_round_trip_bound(xd, blocksize, quant_type, dq):
  x, dtype = xd
  q, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                             compress_statistics=dq)
  assert q.shape == ((x.size + 1) // 2, 1)
  y = F.dequantize_4bit(q, state)
  assert y.dtype == x.dtype and y.shape == x.shape
  _check_bound(x, y, F.blockwise.unnest_absmax(state), blocksize, state.code, dtype)


@given(arrays(), st.sampled_from(F.BLOCKSIZES_4BIT), st.sampled_from(["nf4", "fp4"]))
def test_4bit_idempotent(xd, blocksize, quant_type):
  x, _ = xd
  q, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
  y = F.dequantize_4bit(q, state)
  q2, state2 = F.quantize_4bit(y, blocksize=blocksize, quant_type=quant_type)
  np.testing.assert_array_equal(np.asarray(F.dequantize_4bit(q2, state2)), np.asarray(y))
  codes = lambda q: np.stack([np.asarray(q) >> 4, np.asarray(q) & 15], -1).reshape(-1)
  c1, c2 = codes(q), codes(q2)
  if quant_type == "fp4":  # FP4 has two zeros: a tiny negative is code 8 (-0.0), -0.0 is code 0
    c1, c2 = np.where(c1 == 8, 0, c1), np.where(c2 == 8, 0, c2)
  np.testing.assert_array_equal(c2, c1)


@given(arrays(), st.sampled_from(F.BLOCKSIZES_8BIT))
def test_blockwise8_idempotent(xd, blocksize):
  x, dtype = xd
  q, state = F.quantize_blockwise(x, blocksize=blocksize)
  y = F.dequantize_blockwise(q, state)
  q2, state2 = F.quantize_blockwise(y, blocksize=blocksize)
  q, q2 = np.asarray(q, int).reshape(-1), np.asarray(q2, int).reshape(-1)
  # The signed dynamic map runs from -0.99297 to +1.0: a block whose largest magnitude is
  # negative re-quantizes with absmax * 0.99297, its values scaled up by 1/0.99297, so a code
  # may move by one (e.g. 254 -> 255). So may any code in 16-bit (the output's rounding).
  assert np.max(np.abs(q2 - q)) <= 1
  code = np.asarray(state.code)
  pad = np.pad(q, (0, state.absmax.size * blocksize - q.size), constant_values=127)
  top = code[pad.reshape(-1, blocksize)]
  if dtype == jnp.float32:
    # Blocks whose largest value is +1.0 * absmax keep their absmax, and every code.
    stable = np.repeat(np.abs(top).max(1) == 1.0, blocksize)[: q.size]
    np.testing.assert_array_equal(q2[stable], q[stable])
    expect = np.asarray(state.absmax) * np.abs(top).max(1)  # the largest dequantized |value|
    np.testing.assert_allclose(np.asarray(state2.absmax), expect, rtol=1e-6)


@given(arrays(max_size=400), st.sampled_from([0.0, 0.5, 1.5, 6.0]))
def test_int8_vectorwise_properties(xd, threshold):
  x, dtype = xd
  if x.ndim == 1:
    x = x[None, :]
  q, row_absmax, outlier_cols = F.int8_vectorwise_quant(x, threshold=threshold)
  x32 = np.asarray(x.astype(jnp.float32)).reshape(-1, x.shape[-1])
  mask = (np.abs(x32) >= threshold).any(0) if threshold > 0 else np.zeros(x.shape[-1], bool)
  np.testing.assert_array_equal(np.asarray(outlier_cols), mask)
  kept = np.where(mask[None, :], 0, x32)
  # As in bnb's kernel, the row scale leaves out the outlier values themselves (|x| >=
  # threshold), not whole outlier columns; those columns' codes are zeroed afterwards.
  inliers = np.where(np.abs(x32) >= threshold, 0, x32) if threshold > 0 else x32
  np.testing.assert_array_equal(np.asarray(row_absmax), np.abs(inliers).max(1))
  q = np.asarray(q).reshape(kept.shape)
  assert np.all(q[:, mask] == 0) and np.all(np.abs(q) <= 127)
  y = np.asarray(F.int8_vectorwise_dequant(jnp.asarray(q), row_absmax), np.float64)
  a = np.asarray(row_absmax, np.float64)[:, None]
  assert np.all(np.abs(y - kept) <= a / 127 * (0.5 + 1e-5) + 1e-45)


def test_int8_rounds_half_to_even():
  x = jnp.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 63.5]], jnp.float32)
  q, row_absmax, _ = F.int8_vectorwise_quant(x)
  assert float(row_absmax[0]) == 127.0
  np.testing.assert_array_equal(np.asarray(q)[0], [127, 0, 2, 2, 0, -2, 64])


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zero_input(dtype):
  x = jnp.zeros((3, 100), dtype)
  for q, state in [F.quantize_4bit(x, quant_type="nf4", compress_statistics=True),
                   F.quantize_4bit(x, quant_type="fp4")]:
    np.testing.assert_array_equal(np.asarray(F.dequantize_4bit(q, state), np.float32), 0)
  q, state = F.quantize_blockwise(x, blocksize=64, nested=True)
  np.testing.assert_array_equal(np.asarray(F.dequantize_blockwise(q, state), np.float32), 0)
  q, absmax, cols = F.int8_vectorwise_quant(x, threshold=6.0)
  assert not np.any(np.asarray(q)) and not np.any(np.asarray(cols))
  np.testing.assert_array_equal(np.asarray(F.int8_vectorwise_dequant(q, absmax)), 0)


def test_subnormal_block_stays_finite():
  # XLA flushes float32 subnormals to zero (so do bnb's fast-math kernels): a block of
  # subnormals comes back as zeros, never NaN, and the error stays below the block's absmax.
  x = jnp.array([1e-40, 5e-41, -2.5e-41, 0.0], jnp.float32)
  outs = [F.dequantize_blockwise(*F.quantize_blockwise(x, blocksize=64)),
          F.dequantize_4bit(*F.quantize_4bit(x, quant_type="nf4", compress_statistics=True)),
          F.dequantize_4bit(*F.quantize_4bit(x, quant_type="fp4"))]
  for y in outs:
    y = np.asarray(y)
    assert np.all(np.isfinite(y)) and np.all(np.abs(y - np.asarray(x)) <= 1e-40)


def test_fp16_near_overflow():
  x = jnp.array([65504.0, -65504.0, 60000.0, 1.0] * 20, jnp.float16)
  for q, state in [F.quantize_4bit(x, quant_type="nf4", compress_statistics=True),
                   F.quantize_blockwise(x, blocksize=64, nested=True)]:
    deq = F.dequantize_4bit if state.quant_type == "nf4" else F.dequantize_blockwise
    y = np.asarray(deq(q, state), np.float32)
    # No overflow to inf on the way (scales are computed in float32); the maximum is exact.
    assert np.all(np.isfinite(y)) and y[0] == 65504.0
    assert np.all(np.abs(y - np.asarray(x, np.float32)) <= 65504 * 0.14)
