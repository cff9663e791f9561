"""LLM.int8() on the XLA path stays lean: the int8 x int8 -> int32 product at every M (no
widened copy of CB), outlier columns gathered a page at a time, and a backward pass that never
holds a full-size float W.

Bounds come from ``memory_analysis()`` of the compiled programs (deterministic; nothing here
is timed). Results are checked against the decomposition written out in numpy.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxbnb
from jaxbnb import functional as F
from jaxbnb import ops, qtensor

N = 4096  # the weight: 4096 x 4096, threshold 6
_EPS = {np.dtype(jnp.float32): 2.0**-24, np.dtype(jnp.bfloat16): 2.0**-8,
        np.dtype(jnp.float16): 2.0**-11}
# A full-size buffer of anything wider than int8: a widened CB or a dequantized W.
_FULL_WIDE = re.compile(rf"\b(?:s32|f32|bf16|f16)\[{N},{N}\]")


def _compiled(fn, *specs):
  return jax.jit(fn).lower(*specs).compile()


def _weight_spec(n_out, n_in):
  """An 8-bit Flax kernel (in, out) as shapes only: compiling needs no data."""
  return jax.eval_shape(lambda k: qtensor.quantize_8bit_array(k, transposed=True, threshold=6.0),
                        jax.ShapeDtypeStruct((n_in, n_out), jnp.float32))


# --- temporaries ------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 16, 512])
def test_forward_holds_no_float_weight(m):
  """Temporaries: activation-sized buffers (int32 product, float32 outlier sum, x's codes)
  plus one page of outlier columns; W (16 MiB of int8) is read in place at every M."""
  w = _weight_spec(N, N)
  x = jax.ShapeDtypeStruct((m, N), jnp.bfloat16)
  compiled = _compiled(lambda x, w: jaxbnb.matmul(x, w), x, w)
  activations = 2 * m * N * 4 + m * N
  # M=1: the int32 partial sums of the one-row product, (out, in / groups).
  partial = N * (N // ops._int8_gemv_groups(N)) * 4 if m == 1 else 0
  assert compiled.memory_analysis().temp_size_in_bytes <= activations + N * N // 16 + partial
  assert not _FULL_WIDE.search(compiled.as_text())


def test_one_row_reads_cb_in_place():
  """M=1 on CPU: no dot over CB (an int8 GEMM repacks all of CB on every call), an int32
  loop over it that writes partial sums of at most 1/16 of CB's bytes as int32."""
  w = _weight_spec(N, N)
  x = jax.ShapeDtypeStruct((1, N), jnp.bfloat16)
  text = _compiled(lambda x, w: jaxbnb.matmul(x, w), x, w).as_text()
  # Neither a plain s32 dot nor one inside a library (YNNPACK) fusion.
  assert not re.search(r"= s32\[[^\]]*\]\{[^}]*\} (dot\(|fusion\(.*kind=kCustom)", text)
  assert ops._int8_gemv_groups(N) == ops._INT8_GEMV_GROUPS


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_backward_dequantizes_block_by_block(dtype):
  """grad_x = g @ W: W dequantized a block of rows at a time (4 MiB float32), never whole."""
  w = _weight_spec(N, N)
  x = jax.ShapeDtypeStruct((16, N), dtype)
  grad = jax.grad(lambda x, w: jnp.sum(jaxbnb.matmul(x, w).astype(jnp.float32)))
  compiled = _compiled(grad, x, w)
  assert compiled.memory_analysis().temp_size_in_bytes <= N * N // 4 + 16 * N * 4 * 4
  assert not _FULL_WIDE.search(compiled.as_text())


# --- results ----------------------------------------------------------------------------------


def _reference(x, wq, bias, threshold):
  """float64 LLM.int8(): exact int8 product scaled like bnb + the 16-bit outlier product."""
  cq, row_absmax, cols = F.int8_vectorwise_quant(x, threshold)
  acc = np.asarray(cq, np.int64) @ np.asarray(wq.CB, np.int64).T
  y = (acc.astype(np.float32) * np.asarray(row_absmax)[:, None] * np.asarray(wq.SCB)[None, :]
       * np.float32(1 / (127 * 127))).astype(np.float64)
  terms = np.zeros_like(y)
  if threshold > 0:
    xo = np.where(np.asarray(cols)[None, :], np.asarray(x, np.float64), 0)
    wd = np.asarray(wq.dequantize_matrix(x.dtype), np.float64)
    y, terms = y + xo @ wd.T, np.abs(xo) @ np.abs(wd).T
  if bias is not None:
    y = y + np.asarray(bias, np.float64)
  return y, terms


@st.composite
def _cases(draw):
  m = draw(st.sampled_from([1, 2, 3, 5, 17]))
  k = draw(st.integers(1, 70))
  n = draw(st.integers(1, 40))
  dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((m, k)).astype(np.float32)
  n_out = draw(st.integers(0, k))  # outlier columns: none, a few, more than a page, all
  x[rng.integers(0, m, n_out), rng.choice(k, n_out, replace=False)] = rng.choice([-9.0, 20.0])
  if draw(st.booleans()):
    x[rng.integers(0, m)] = 0.0  # an all-zero row
  w = rng.standard_normal((k, n)).astype(np.float32)
  if draw(st.booleans()):
    w[:, rng.integers(0, n)] = 0.0  # an all-zero output feature (SCB = 0)
  bias = rng.standard_normal(n).astype(np.float32) if draw(st.booleans()) else None
  threshold = draw(st.sampled_from([0.0, 6.0]))
  page = draw(st.sampled_from([1, 3, 16, 256]))
  return x, w, bias, dtype, threshold, page


@given(_cases())
def test_matches_the_decomposition(case):
  x, w, bias, dtype, threshold, page = case
  x = jnp.asarray(x, dtype)
  bias = None if bias is None else jnp.asarray(bias, dtype)
  wq = qtensor.quantize_8bit_array(jnp.asarray(w), transposed=True, threshold=threshold)
  y = jax.jit(lambda x, w, b: ops.int8_matmul(x, w, b, max_outlier_cols=page))(x, wq, bias)
  assert y.dtype == dtype and y.shape == (x.shape[0], w.shape[1])
  ref, terms = _reference(x, wq, bias, threshold)
  # float32 accumulation of the outlier terms, then one rounding to x's dtype.
  tol = 2 * _EPS[np.dtype(dtype)] * np.abs(ref) + 1e-5 * (terms + 1) + 1e-6
  np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - ref), tol)


def test_rows_are_exact_and_independent_without_outliers():
  """threshold 0: the int32 product is exact, so one row through the padded M=1 product
  equals the same row inside a larger batch, bit for bit."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((9, 96)), jnp.float32)
  wq = qtensor.quantize_8bit_array(jnp.asarray(rng.standard_normal((96, 40)), jnp.float32),
                                   transposed=True, threshold=0.0)
  f = jax.jit(lambda x: jaxbnb.matmul(x, wq))
  full = np.asarray(f(x))
  for i in range(x.shape[0]):
    np.testing.assert_array_equal(np.asarray(f(x[i:i + 1]))[0], full[i])
  np.testing.assert_array_equal(np.asarray(f(x[:2])), full[:2])


@pytest.mark.parametrize("n_in", [640, 4096 + 64, 33])
def test_one_row_product_is_the_gemm(n_in):
  """The one-row int32 loop (groups of 64 or more elements; one group for a short row) gives
  the int8 GEMM's exact sums, bit for bit, extreme codes included."""
  rng = np.random.default_rng(n_in)
  cb = rng.integers(-127, 128, (24, n_in)).astype(np.int8)
  cb[0] = 127
  cq = rng.integers(-127, 128, (3, n_in)).astype(np.int8)
  cq[0] = -127
  want = cq.astype(np.int64) @ cb.astype(np.int64).T
  for i in range(3):
    got = jax.jit(ops._int8_gemv)(jnp.asarray(cq[i:i + 1]), jnp.asarray(cb))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got)[0], want[i])
  gemm = ops._int8_product(jnp.asarray(np.repeat(cq, 2, 0)), jnp.asarray(cb))
  np.testing.assert_array_equal(np.asarray(gemm)[::2], want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_outlier_pages_agree(dtype):
  """40 outlier columns through pages of 1, 7, 16 and 256: the same sums up to float32
  rounding (the XLA path caps its page at 16 columns)."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((6, 200)).astype(np.float32)
  x[:, rng.choice(200, 40, replace=False)] *= 20
  x = jnp.asarray(x, dtype)
  wq = qtensor.quantize_8bit_array(jnp.asarray(rng.standard_normal((200, 24)), jnp.float32),
                                   transposed=True, threshold=6.0)
  ys = [np.asarray(ops.int8_matmul(x, wq, max_outlier_cols=p), np.float32)
        for p in (1, 7, 16, 256)]
  for y in ys[1:]:
    np.testing.assert_allclose(y, ys[0], rtol=4 * _EPS[np.dtype(dtype)], atol=1e-4)


def test_non_finite_inputs_stay_in_their_row():
  """A NaN poisons its own row only; an Inf (an outlier) its row, through its column's
  16-bit product (column 5, already an outlier column); the other rows are unchanged."""
  rng = np.random.default_rng(2)
  x = rng.standard_normal((4, 64)).astype(np.float32)
  x[3, 5] = 20.0
  wq = qtensor.quantize_8bit_array(jnp.asarray(rng.standard_normal((64, 16)), jnp.float32),
                                   transposed=True, threshold=6.0)
  clean = np.asarray(ops.int8_matmul(jnp.asarray(x), wq))
  x[1, 3], x[2, 5] = np.nan, np.inf
  y = np.asarray(jax.jit(ops.int8_matmul)(jnp.asarray(x), wq))
  assert np.isnan(y[1]).all() and not np.isfinite(y[2]).any()
  np.testing.assert_array_equal(y[[0, 3]], clean[[0, 3]])


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flax_kernel_matmul_and_gradient(m, dtype):
  """jaxbnb.matmul on an 8-bit Flax kernel and its gradient: bnb's backward, grad_x =
  g @ (CB * SCB / 127) in x's dtype, summed block by block."""
  rng = np.random.default_rng(3)
  k = jnp.asarray(rng.standard_normal((300, 260)) * 0.05, jnp.float32)  # (in, out)
  q = jaxbnb.quantize({"d": {"kernel": k}},
                      jaxbnb.BitsAndBytesConfig(load_in_8bit=True))["d"]["kernel"]
  x = jnp.asarray(rng.standard_normal((m, 300)), dtype).at[:, 7].set(30)
  y = jaxbnb.matmul(x, q)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(ops.int8_matmul(x, q)))
  g = jnp.asarray(rng.standard_normal((m, 260)), jnp.float32)
  old = ops._BWD_BLOCK_ELEMS
  try:
    ops._BWD_BLOCK_ELEMS = 300 * 64  # 4 blocks of 64 output rows + a tail of 4
    dx = jax.grad(lambda x: jnp.sum(jaxbnb.matmul(x, q).astype(jnp.float32) * g))(x)
  finally:
    ops._BWD_BLOCK_ELEMS = old
  assert dx.dtype == dtype
  wd = np.asarray(q.dequantize_matrix(dtype), np.float64)  # (out, in), rounded like bnb's
  g16 = np.asarray(g.astype(dtype), np.float64)
  ref = g16 @ wd
  tol = 2 * _EPS[np.dtype(dtype)] * np.abs(ref) + 1e-5 * (np.abs(g16) @ np.abs(wd))
  np.testing.assert_array_less(np.abs(np.asarray(dx, np.float64) - ref), tol + 1e-7)
