"""Quantized matmuls: bnb's own error limits, bnb's Linear8bitLt outputs, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbnb
from jaxbnb import qtensor
from tests import helpers


def _xavier(key, shape):
  limit = np.sqrt(6 / sum(shape))
  return jax.random.uniform(key, shape, jnp.float32, -limit, limit)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("has_bias", [False, True])
def test_matmul_4bit_like_bnb(dtype, quant_type, dq, has_bias):
  """bnb tests/test_autograd.py::test_matmul_4bit: A (64, 64) randn, B (96, 64) xavier."""
  ka, kb, kt, kbias = jax.random.split(jax.random.key(0), 4)
  a = jax.random.normal(ka, (48, 64)).astype(dtype)
  b = _xavier(kb, (96, 64)).astype(dtype)  # (out, in), torch layout
  bias = jax.random.normal(kbias, (96,)).astype(dtype) if has_bias else None
  w = qtensor.quantize_4bit_array(b, transposed=False, quant_type=quant_type,
                                  compress_statistics=dq, compute_dtype=dtype)
  out = jaxbnb.matmul_4bit(a, w, bias)
  ref = (a.astype(jnp.float32) @ b.astype(jnp.float32).T
         + (0 if bias is None else bias.astype(jnp.float32)))
  assert out.dtype == dtype and out.shape == (48, 96)
  assert float(jnp.abs(out.astype(jnp.float32) - ref).mean()) < 0.115

  target = jax.random.normal(kt, (48, 96))
  loss_q = lambda a, bias: jnp.mean((jaxbnb.matmul_4bit(a, w, bias).astype(jnp.float32)
                                     - target) ** 2)
  loss_f = lambda a, bias: jnp.mean((a.astype(jnp.float32) @ b.astype(jnp.float32).T
                                     + (0 if bias is None else bias) - target) ** 2)
  # bnb compares gradients with the forward outputs made equal; the weight's quantization
  # error is what remains.
  ga, gb = jax.grad(loss_q, argnums=(0, 1))(a, bias)
  gfa, gfb = jax.grad(loss_f, argnums=(0, 1))(a, bias)
  np.testing.assert_allclose(np.asarray(ga, np.float32), np.asarray(gfa, np.float32),
                             atol=0.015, rtol=0.05)
  if has_bias:
    np.testing.assert_allclose(np.asarray(gb, np.float32), np.asarray(gfb, np.float32),
                               atol=2e-3, rtol=0.05)


def test_matmul_4bit_backward_recomputes_weight():
  """The VJP's residuals are the packed weight only: no float copy of W is saved."""
  w = qtensor.quantize_4bit_array(jax.random.normal(jax.random.key(0), (512, 256)),
                                  transposed=True, quant_type="nf4")
  x = jax.random.normal(jax.random.key(1), (4, 512))
  _, vjp = jax.vjp(lambda x: jaxbnb.matmul_4bit(x, w), x)
  saved = [leaf for leaf in jax.tree.leaves(vjp) if hasattr(leaf, "shape")]
  assert not any(leaf.dtype == jnp.float32 and leaf.size >= 512 * 256 for leaf in saved)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_int8_matmul_matches_bnb_linear8bitlt(threshold):
  a16, wq, y_ref = helpers.bnb_int8_case(threshold)
  helpers.assert_close_to_bnb_int8(jaxbnb.int8_matmul(a16, wq), y_ref)


def test_int8_decomposition_matters():
  """Without the outlier decomposition, A's outlier column (x20) wrecks the int8 product."""
  with np.load(helpers.DATA / "bnb_int8_matmul.npz") as f:
    a, w = jnp.asarray(f["A"], jnp.float16), jnp.asarray(f["W"], jnp.float16)
  ref = np.asarray(a.astype(jnp.float32) @ w.astype(jnp.float32).T)
  err = {}
  for thr in (0.0, 6.0):
    wq = qtensor.quantize_8bit_array(w, transposed=False, threshold=thr)
    err[thr] = np.abs(np.asarray(jaxbnb.int8_matmul(a, wq), np.float32) - ref).mean()
  assert err[6.0] < 0.5 * err[0.0]


@pytest.mark.parametrize("has_bias", [False, True])
def test_int8_matmul_gradient(has_bias):
  kx, kw, kb, kt = jax.random.split(jax.random.key(3), 4)
  x = jax.random.normal(kx, (16, 128), jnp.float32).at[:, 5].multiply(20)
  w = _xavier(kw, (128, 64))  # a Flax kernel (in, out)
  bias = jax.random.normal(kb, (64,)) if has_bias else None
  wq = qtensor.quantize_8bit_array(w, transposed=True, threshold=6.0)
  target = jax.random.normal(kt, (16, 64))
  loss_q = lambda x, b: jnp.mean((jaxbnb.matmul(x, wq, b) - target) ** 2)
  loss_f = lambda x, b: jnp.mean((x @ w + (0 if b is None else b) - target) ** 2)
  gq, gbq = jax.jit(jax.grad(loss_q, argnums=(0, 1)))(x, bias)
  gf, gbf = jax.grad(loss_f, argnums=(0, 1))(x, bias)
  np.testing.assert_allclose(np.asarray(gq), np.asarray(gf), atol=0.008, rtol=0.05)
  if has_bias:
    np.testing.assert_allclose(np.asarray(gbq), np.asarray(gbf), atol=0.008, rtol=0.05)


def test_int8_many_outliers_takes_masked_path():
  x = jax.random.normal(jax.random.key(4), (8, 64)) * 10  # most columns are outliers
  w = _xavier(jax.random.key(5), (64, 32))
  wq = qtensor.quantize_8bit_array(w, transposed=True, threshold=6.0)
  ref = np.asarray(x @ wq.dequantize())
  for cap in (4, 64):  # cap 4 < outlier count: the in-jit fallback must give the same answer
    y = jax.jit(lambda x: jaxbnb.int8_matmul(x, wq, max_outlier_cols=cap))(x)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_matmul_is_x_at_kernel(kind):
  """jaxbnb.matmul(x, q) == x @ kernel for a quantized Flax kernel (in, out), any rank."""
  k = _xavier(jax.random.key(6), (96, 80))
  x = jax.random.normal(jax.random.key(7), (2, 3, 96))
  cfg = (jaxbnb.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0) if kind == "int8"
         else jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind))
  q = jaxbnb.quantize({"dense": {"kernel": k}}, cfg)["dense"]["kernel"]
  y = jaxbnb.matmul(x, q)
  assert y.shape == (2, 3, 80)
  deq = np.asarray(x @ jaxbnb.dequantize(q))
  tol = 0.05 if kind == "int8" else 1e-5  # int8 also quantizes x (vector-wise)
  np.testing.assert_allclose(np.asarray(y), deq, atol=tol, rtol=tol)
  assert float(jnp.abs(y - x @ k).mean()) < (0.02 if kind == "int8" else 0.1)


def test_qdot_general_any_dimension_numbers():
  k = jax.random.normal(jax.random.key(8), (8, 4, 16))  # DenseGeneral-style (in, heads, dim)
  q = qtensor.quantize_4bit_array(k, transposed=True, quant_type="nf4")
  kd = q.dequantize()
  x = jax.random.normal(jax.random.key(9), (3, 4, 16))
  dims = (((1, 2), (1, 2)), ((), ()))  # contract over the "out" axes: x @ k^T
  y = jaxbnb.qdot_general(x, q, dims)
  np.testing.assert_allclose(np.asarray(y), np.asarray(jax.lax.dot_general(x, kd, dims)),
                             rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda x: jaxbnb.qdot_general(x, q, dims).sum())(x)
  gf = jax.grad(lambda x: jax.lax.dot_general(x, kd, dims).sum())(x)
  np.testing.assert_allclose(np.asarray(g), np.asarray(gf), rtol=1e-5, atol=1e-5)
  with pytest.raises(TypeError, match="exactly one"):
    jaxbnb.qdot_general(x, x, dims)


def test_shape_mismatch_is_clear():
  q = qtensor.quantize_4bit_array(jnp.ones((64, 32)), transposed=True)
  with pytest.raises(ValueError, match="expects 64"):
    jaxbnb.matmul_4bit(jnp.ones((2, 63)), q)
  with pytest.raises(TypeError, match="Quantized4bit"):
    jaxbnb.matmul_4bit(jnp.ones((2, 64)), jnp.ones((64, 32)))
  with pytest.raises(ValueError, match="backend"):
    jaxbnb.matmul_4bit(jnp.ones((2, 64)), q, backend="cuda")


def test_pallas_backend_off_gpu_warns_and_bad_names_fail():
  """backend="pallas" without a GPU is a slow path (interpret mode): it says so, never silently;
  an unknown backend name is an error naming the choices."""
  from jaxbnb._backend import PallasInterpretWarning
  w = jaxbnb.quantize({"kernel": jax.random.normal(jax.random.key(0), (64, 32))},
                      jaxbnb.BitsAndBytesConfig(load_in_4bit=True))["kernel"]
  x = jnp.ones((2, 64))
  with pytest.warns(PallasInterpretWarning, match="interpret mode"):
    jaxbnb.matmul(x, w, backend="pallas")
  with pytest.warns(PallasInterpretWarning):
    jaxbnb.optim.adamw8bit(1e-3, backend="pallas")
  for bad in (lambda: jaxbnb.matmul(x, w, backend="gpu"),
              lambda: jaxbnb.optim.adam8bit(1e-3, backend="triton")):
    with pytest.raises(ValueError, match="'auto', 'xla', 'pallas'"):
      bad()
