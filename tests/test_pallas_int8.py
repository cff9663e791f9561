"""LLM.int8() Pallas kernels (interpret mode on CPU) against the XLA path and bnb's vectors; plus
a CUDA lowering check of the Triton backend that runs on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxbnb import ops, qtensor
from jaxbnb.functional import int8 as F
from pallas_kernels import int8_matmul as im
from pallas_kernels import int8_quant as iq
from tests import helpers

# Interpret mode off a GPU; on one (experiments/gpu_session.sh check: JAX_PLATFORMS=cuda) the
# same tests compile and run the real Triton kernels.
INTERPRET = jax.default_backend() != "gpu"

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _eq(got, want):
  for g, w in zip(got, want):
    g, w = np.asarray(g), np.asarray(w)
    assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, w.dtype, g.shape, w.shape)
    np.testing.assert_array_equal(g, w)


def _activations(key, m, k, dtype, pattern):
  """``(m, k)`` inputs with an outlier ``pattern``; threshold 6 is used with them."""
  kx, kc = jax.random.split(key)
  x = jax.random.normal(kx, (m, k))
  if pattern == "one":
    x = x.at[:, k // 3].multiply(20.0)
  elif pattern == "many":
    cols = jax.random.choice(kc, k, (max(2, k // 5),), replace=False)
    x = x.at[:, cols].multiply(15.0)
  elif pattern == "all":
    x = x.at[0].set(7.0)  # one row reaches the threshold in every column
  elif pattern == "overflow":  # fp16 near its max (65504) in two columns
    x = x.at[:, 1].set(60000.0).at[m // 2, k - 1].set(-65000.0)
  elif pattern == "nonfinite":
    x = x.at[2, 7].set(jnp.nan).at[4, 9].set(jnp.inf)
  return x.astype(dtype)


def _weight(key, n, k):
  w = jax.random.normal(key, (n, k)) * 0.05
  w = w.at[n // 2].set(0.0)  # an all-zero row: SCB 0
  return qtensor.quantize_8bit_array(w, transposed=False, threshold=6.0)


# --- vector-wise quantization ------------------------------------------------------------------


@settings(max_examples=4, deadline=None)
@given(m=st.sampled_from([1, 7, 40]), k=st.sampled_from([1, 33, 130]), thr=st.sampled_from([0.0, 1.5, 6.0]),
       dtype=st.sampled_from(sorted(DTYPES)), seed=st.integers(0, 2**16),
       special=st.sampled_from(["none", "nan", "inf", "zero_row"]))
def test_quant_reference_bit_equal_to_functional(m, k, thr, dtype, seed, special):
  x = jax.random.normal(jax.random.key(seed), (m, k)) * 3
  r, c = seed % m, seed % k
  if special == "nan":
    x = x.at[r, c].set(jnp.nan)
  elif special == "inf":
    x = x.at[r, c].set(-jnp.inf)
  elif special == "zero_row":
    x = x.at[r].set(0.0)
  x = x.astype(DTYPES[dtype])
  _eq(iq.int8_vectorwise_quant_reference(x, threshold=thr), F.int8_vectorwise_quant(x, thr))


@pytest.mark.parametrize("m,k,dtype,thr", [
    (5, 48, "float16", 6.0),    # Inf (an outlier) + NaN rows, K not a power of two
    (37, 200, "bfloat16", 0.0),  # 2 programs, ragged last one; NaN/Inf poison their rows
    (1, 33, "float32", 1.0),     # one row, odd K, several outlier columns
])
def test_quant_kernel_bit_equal(m, k, dtype, thr):
  x = jax.random.normal(jax.random.key(m), (m, k)) * 3
  x = x.at[0, 5].set(jnp.inf).at[m - 1, k - 1].set(60000.0)
  if m > 2:
    x = x.at[1, 3].set(jnp.nan).at[2].set(0.0)  # a NaN row, an all-zero row
  x = x.astype(DTYPES[dtype])
  tiles = dict(block_m=32, max_tile=256, programs=1)  # 37 rows: 2 programs of 32
  got = iq.int8_vectorwise_quant(x, threshold=thr, interpret=INTERPRET, **tiles)
  _eq(got, F.int8_vectorwise_quant(x, thr))
  raw, _, cols = iq.int8_vectorwise_quant_raw(x, threshold=thr, interpret=INTERPRET, **tiles)
  raw, cols = np.asarray(raw), np.asarray(cols)
  np.testing.assert_array_equal(raw[:, ~cols], np.asarray(got[0])[:, ~cols])  # raw = zeroed
  assert cols.any() == (thr > 0)


def test_round_codes_ties_to_even():
  v = jnp.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 126.5, 127.6, -jnp.inf,
                 1e-30, -3.5000002, 0.0, -0.0], jnp.float32)
  want = np.array([0, 2, 2, 0, -2, -2, 0, 126, 127, -127, 0, -4, 0, 0], np.int8)
  np.testing.assert_array_equal(np.asarray(iq.round_codes(v)), want)


# --- int8 GEMM: exact int32 accumulation, bit-equal epilogue -----------------------------------


@pytest.mark.parametrize("m,n,k,tiles", [
    (3, 45, 96, dict(bn=16, bk=32)),           # GEMV regime: 3 N tiles (ragged), 3 K steps
    (40, 37, 160, dict(bm=16, bn=16, bk=32, group=2)),  # GEMM: 3x3 ragged tiles, grouped
                                                         # order with a partial group; 5 K steps
])
def test_gemm_int32_accumulator_exact(m, n, k, tiles):
  ka, kb, kc = jax.random.split(jax.random.key(m + n), 3)
  a = jax.random.randint(ka, (m, k), -127, 128, jnp.int8)
  b = jax.random.randint(kb, (n, k), -127, 128, jnp.int8).at[:, :8].set(127)
  a = a.at[:, :8].set(-127)  # extreme products
  mask = jax.random.bernoulli(kc, 0.2, (k,))
  ones = jnp.ones((m,), jnp.float32)
  acc = jax.jit(lambda a, b, mask: im.int8_gemm(
      a, b, ones, ones[:1].repeat(n), colmask=mask, return_acc=True, interpret=INTERPRET,
      tiles=tiles))(a, b, mask)
  want = jax.lax.dot_general(jnp.where(mask[None, :], jnp.int8(0), a), b,
                             (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
  assert acc.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(acc), np.asarray(want))
  assert int(jnp.abs(want).max()) > 8 * 127 * 127 - 1  # the extreme columns are not masked off


@pytest.mark.parametrize("m,dtype", [(2, "float32"), (21, "float16")])
def test_linear_threshold0_bit_equal_to_xla_path(m, dtype):
  """No outliers: exact int32 accumulation and the same float epilogue -> the same bits.

  Without a bias only: XLA:CPU (and Triton) may contract ``scaled + bias`` into an FMA, and do
  so differently in different fusions (seen on CPU: 1 float32 ulp); biased outputs are compared
  with a tolerance below.
  """
  n, k = 50, 96
  x = _activations(jax.random.key(m), m, k, DTYPES[dtype], "none")
  w = _weight(jax.random.key(1), n, k)
  got = im.int8_linear(x, w.CB, w.SCB, threshold=0.0, interpret=INTERPRET)
  want = ops._int8_linear_impl(x, w, None, 0.0, 256)
  _eq([got], [want])
  _eq([im.int8_linear_reference(x, w.CB, w.SCB, threshold=0.0)], [want])


# --- full LLM.int8() linear vs the XLA path -----------------------------------------------------


def _check_linear(x, w, bias, thr, cap):
  got = im.int8_linear(x, w.CB, w.SCB, bias, threshold=thr, max_outlier_cols=cap,
                       interpret=INTERPRET)
  want = ops._int8_linear_impl(x, w, bias, thr, cap)
  assert got.dtype == x.dtype and got.shape == want.shape
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  # bnb's limits for its int8 matmul (fp16): atol 0.025, rtol 0.05 ...
  np.testing.assert_allclose(got, want, atol=0.025, rtol=0.05)
  # ... but only the outlier product's summation order differs: one rounding of the output
  # dtype plus float32 reordering error of the outlier dot.
  eps = float(jnp.finfo(x.dtype).eps) if x.dtype != jnp.float32 else 4e-7
  xf = np.abs(np.asarray(x, np.float32))
  xf[~np.isfinite(xf)] = 0
  wd = np.abs(np.asarray(w.dequantize_matrix(jnp.float32)))
  scale = xf @ wd.T
  fin = np.isfinite(want)
  np.testing.assert_array_equal(np.isfinite(got), fin)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  with np.errstate(invalid="ignore"):  # inf - inf outside ``fin``
    err = np.abs(got - want)
  assert np.all(err[fin] <= (eps * np.abs(want) + 1e-5 * scale)[fin] + 1e-6)
  return got


@settings(max_examples=3, deadline=None)
@given(m=st.sampled_from([1, 3, 16, 17, 33]), n=st.integers(1, 70),
       k=st.sampled_from([32, 96, 160]), dtype=st.sampled_from(sorted(DTYPES)),
       pattern=st.sampled_from(["none", "one", "many", "all", "overflow"]),
       has_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_matches_xla_path(m, n, k, dtype, pattern, has_bias, seed):
  if pattern == "overflow" and dtype != "float16":
    dtype = "float16"
  kx, kw, kb = jax.random.split(jax.random.key(seed), 3)
  x = _activations(kx, m, k, DTYPES[dtype], pattern)
  w = _weight(kw, n, k)
  bias = jax.random.normal(kb, (n,)).astype(x.dtype) if has_bias else None
  _check_linear(x, w, bias, 6.0, 256)


@pytest.mark.parametrize("pattern,cap,m", [
    ("all", 256, 17),   # every column an outlier (K=96 <= cap: one fused dot over all of them)
    ("many", 4, 20),    # > max_outlier_cols: in-jit fallback to the masked dense product
    ("many", 4, 5),     # GEMV: outliers from the W tiles in the K loop, the cap does not apply
    ("overflow", 256, 4),
    ("nonfinite", 256, 6),  # NaN poisons only its row; Inf at threshold 6 is an outlier
])
def test_linear_outlier_patterns(pattern, cap, m):
  x = _activations(jax.random.key(7), m, 96, jnp.float16, pattern)
  w = _weight(jax.random.key(8), 40, 96)
  cols = np.asarray(F.int8_vectorwise_quant(x, 6.0)[2])
  assert cols.sum() > (cap if pattern == "many" else 0)
  assert cols.all() == (pattern == "all")
  got = _check_linear(x, w, jnp.linspace(-1, 1, 40).astype(x.dtype), 6.0, cap)
  if pattern == "overflow":
    assert np.abs(got).max() > 100  # the 6e4 columns did contribute, in 16-bit
  if pattern == "nonfinite":
    assert np.isnan(got[2]).all() and not np.isfinite(got[4]).all()
    assert np.isfinite(np.delete(got, [2, 4], axis=0)).all()


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_matches_bnb_linear8bitlt_vectors(threshold):
  a16, wq, y_ref = helpers.bnb_int8_case(threshold)
  y = helpers.assert_close_to_bnb_int8(
      im.int8_linear(a16, wq.CB, wq.SCB, threshold=threshold, interpret=INTERPRET), y_ref)
  np.testing.assert_allclose(y, np.asarray(ops._int8_linear_impl(a16, wq, None, threshold, 256),
                                           np.float32), atol=2e-3, rtol=2e-3)


def test_supported_and_unsupported_raise():
  assert im.supported(1, 1, 32, jnp.float16) and im.supported(4096, 8192, 14336, jnp.bfloat16)
  assert not im.supported(4, 64, 48, jnp.float16)   # K not a multiple of 32
  assert not im.supported(4, 64, 64, jnp.int32)
  assert not im.supported(0, 64, 64, jnp.float32)
  with pytest.raises(ValueError, match="XLA path"):
    im.int8_linear(jnp.zeros((2, 48)), jnp.zeros((8, 48), jnp.int8), jnp.ones((8,)),
                   interpret=INTERPRET)


def test_tiling_table():
  for gm, gn, group in ((3, 3, 2), (5, 7, 8), (1, 9, 8), (7, 1, 3)):  # grouped order: bijective
    seen = sorted(tuple(int(v) for v in im.tile_ij(p, gm, gn, group)) for p in range(gm * gn))
    assert seen == [(i, j) for i in range(gm) for j in range(gn)]
  assert im.tiling(1, 8192, 8192) == dict(bm=16, bn=32, bk=256, num_warps=4, num_stages=4)
  assert im.tiling(16, 4096, 4096)["bn"] == 16
  assert im.tiling(4096, 8192, 14336)["bm"] == 128
  assert im.tiling(4096, 8192, 14336)["bk"] == 128  # 14336 = 2^11 * 7
  assert im.tiling(3, 20, 96)["bk"] == 32 and im.tiling(3, 20, 96)["bn"] == 16
  assert iq.tiling(4096, 14336) == (8, 1) and iq.tiling(3, 100) == (4, 4)
  assert iq.tiling(512, 8192) == (1, 1) and iq.tiling(65536, 4096) == (32, 2)


# --- GPU lowering (Triton backend) from a CPU-only jaxlib --------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_kernels_lower_for_cuda_triton(dtype):
  s = jax.ShapeDtypeStruct
  n, k = 8192, 14336
  w = (s((n, k), jnp.int8), s((n,), jnp.float32), s((n,), dtype))
  for m, thr, calls, names in ((1, 6.0, 2, ("int8_gemv", "int8_vectorwise_quant")),
                               (4096, 6.0, 3, ("int8_gemm", "int8_vectorwise_quant")),
                               (16, 0.0, 2, ("int8_gemv",))):
    hlo = helpers.lower_for_h100(
        lambda x, cb, scb, b: im.int8_linear(x, cb, scb, b, threshold=thr), s((m, k), dtype), *w)
    # quantization + the GEMV; M > 16 at threshold 6: + the > max_outlier_cols fallback GEMM.
    assert hlo.count("__gpu$xla.gpu.triton") == calls
    assert all(name in hlo for name in names)


@pytest.mark.parametrize("m,thr", [(3, 6.0), (20, 6.0), (5, 0.0)])
def test_ops_dispatch_to_pallas_int8(m, thr):
  """backend="pallas" routes int8_matmul to the kernels (the jaxpr holds a pallas_call), gives
  the XLA path's answer, and the same gradient (the backward pass is XLA's for both)."""
  import jaxbnb
  w = qtensor.quantize_8bit_array(jax.random.normal(jax.random.key(0), (96, 40)) * 0.05,
                                  transposed=True, threshold=thr)
  x = jax.random.normal(jax.random.key(1), (m, 96)).at[:, 5].multiply(20).astype(jnp.float16)
  np.testing.assert_allclose(np.asarray(jaxbnb.int8_matmul(x, w, backend="pallas"), np.float32),
                             np.asarray(jaxbnb.int8_matmul(x, w, backend="xla"), np.float32),
                             rtol=2e-3, atol=2e-3)
  jaxpr = str(jax.make_jaxpr(lambda x: jaxbnb.int8_matmul(x, w, backend="pallas"))(x))
  assert "pallas_call" in jaxpr
  g = lambda b: jax.grad(lambda x: jaxbnb.matmul(x, w, backend=b).astype(jnp.float32).sum())(x)
  np.testing.assert_array_equal(np.asarray(g("pallas")), np.asarray(g("xla")))
