"""Pallas 4-bit kernels (interpret mode on CPU) against their XLA references and the
functional core; plus a CUDA lowering check of the Triton backend that runs on CPU."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxbnb.functional import fourbit
from jaxbnb.functional.blockwise import unnest_absmax
from pallas_kernels import common
from pallas_kernels import dequant_4bit as dq
from pallas_kernels import gemv_4bit as gv

QTYPES = ("nf4", "fp4")


def kernel_inputs(q, state):
  """The adapter between jaxbnb's (q, QuantState) and the kernels: uint8 bytes, f32 absmax."""
  return fourbit.storage_bytes(q), unnest_absmax(state)


def bits(a):
  a = np.asarray(a)
  return a.view({4: np.uint32, 2: np.uint16}[a.dtype.itemsize])


def test_codebooks_match_functional_core():
  from jaxbnb.functional.codebooks import get_4bit_type
  codes = jnp.arange(16)
  for qt in QTYPES:
    table = np.asarray(get_4bit_type(qt))
    if qt == "fp4":
      table = np.where(np.arange(16) >= 8, -np.abs(table), table)
    np.testing.assert_array_equal(bits(common.decode_4bit(codes, qt)), bits(table))
  assert bits(common.decode_4bit(jnp.array([8]), "fp4"))[0] == 0x80000000  # -0.0


# --- dequantize --------------------------------------------------------------------------------


@pytest.mark.parametrize("qt", QTYPES)
@pytest.mark.parametrize("shape,bs,nested,storage", [
    ((96, 200), 64, True, jnp.uint8),     # n % bs != 0: padded last block
    ((33, 65), 32, False, jnp.uint8),     # odd n: padded last nibble
    ((64, 384), 128, True, jnp.float32),  # quant_storage wider than a byte
])
def test_dequant_bitexact(qt, shape, bs, nested, storage):
  x = jax.random.normal(jax.random.key(0), shape) * 3
  x = x.at[0, :5].set(jnp.array([0.0, -0.0, 1e-30, -1e-30, 7.0]))
  q, state = fourbit.quantize_4bit(x, bs, qt, compress_statistics=nested, quant_storage=storage)
  b, a = kernel_inputs(q, state)
  kw = dict(n=x.size, blocksize=bs, quant_type=qt)
  want = fourbit.dequantize_4bit(q, state).reshape(-1)
  got = dq.dequantize_4bit(b, a, interpret=True, tile_bytes=4096, **kw)
  ref = dq.dequantize_4bit_reference(b, a, **kw)
  np.testing.assert_array_equal(bits(got), bits(want))
  np.testing.assert_array_equal(bits(ref), bits(want))
  for dt in (jnp.bfloat16, jnp.float16):  # 16-bit outputs: the same single rounding
    got16 = dq.dequantize_4bit(b, a, out_dtype=dt, interpret=True, tile_bytes=4096, **kw)
    ref16 = dq.dequantize_4bit_reference(b, a, out_dtype=dt, **kw)
    np.testing.assert_array_equal(bits(got16), bits(want.astype(dt)))
    np.testing.assert_array_equal(bits(ref16), bits(want.astype(dt)))


@pytest.mark.parametrize("qt", QTYPES)
def test_dequant_16bit_state_matches_functional(qt):
  x = jax.random.normal(jax.random.key(1), (64, 128), jnp.bfloat16)
  q, state = fourbit.quantize_4bit(x, 64, qt)
  b, a = kernel_inputs(q, state)
  got = dq.dequantize_4bit(b, a, n=x.size, blocksize=64, quant_type=qt, out_dtype=jnp.bfloat16,
                           interpret=True)
  np.testing.assert_array_equal(bits(got), bits(fourbit.dequantize_4bit(q, state).reshape(-1)))


@pytest.mark.parametrize("qt", QTYPES)
def test_dequant_nonfinite_absmax_policy(qt):
  """NaN absmax -> the whole block is NaN; Inf absmax -> +-Inf, and NaN where the code is 0."""
  x = jax.random.normal(jax.random.key(2), (8, 128))
  q, state = fourbit.quantize_4bit(x, 64, qt)
  b, a = kernel_inputs(q, state)
  a = a.at[3].set(jnp.nan).at[5].set(jnp.inf)
  kw = dict(n=x.size, blocksize=64, quant_type=qt)
  got = np.asarray(dq.dequantize_4bit(b, a, interpret=True, **kw))
  ref = np.asarray(dq.dequantize_4bit_reference(b, a, **kw))
  np.testing.assert_array_equal(bits(got), bits(ref))
  assert np.isnan(got[3 * 64: 4 * 64]).all()
  assert not np.isfinite(got[5 * 64: 6 * 64]).any()
  assert np.isfinite(np.delete(got, np.r_[3 * 64: 4 * 64, 5 * 64: 6 * 64])).all()


# --- GEMV --------------------------------------------------------------------------------------


def _check_gemv(x, w, qt, bs, **tiles):
  n, k = w.shape
  q, state = fourbit.quantize_4bit(w, bs, qt, compress_statistics=True)
  b, a = kernel_inputs(q, state)
  kw = dict(n_out=n, blocksize=bs, quant_type=qt)
  got = gv.gemv_4bit(x, b, a, interpret=True, **kw, **tiles)
  ref = gv.gemv_4bit_reference(x, b, a, **kw)
  assert got.shape == (x.shape[0], n) and got.dtype == x.dtype
  # Independent check through the public core: x @ dequantize(W).T.
  wd = fourbit.dequantize_4bit(q, state).astype(jnp.float32)
  xf = x.astype(jnp.float32)
  core = jnp.dot(xf, wd.T, precision=jax.lax.Precision.HIGHEST)
  # Summation order differs: bound the error by eps * sum |x||w| (not by |y|, which cancels).
  scale = np.asarray(jnp.dot(jnp.abs(xf), jnp.abs(wd).T, precision=jax.lax.Precision.HIGHEST))
  eps = 1e-5 if x.dtype == jnp.float32 else float(jnp.finfo(x.dtype).eps)
  got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
  assert np.all(np.abs(got - ref) <= eps * scale + 1e-30)
  assert np.all(np.abs(got - np.asarray(core)) <= eps * scale + 1e-30)


_SPLIT = dict(block_k=128, k_per_program=256)  # K 512: 2 blocks a step, 2 steps, split-K 2


@pytest.mark.parametrize("qt,m,n,k,bs,tiles", [
    *[(qt, m, 192, 320, 64, {}) for qt in QTYPES for m in (1, 3, 16)],  # K 5 blocks, N 3*64
    ("nf4", 3, 200, 512, 64, _SPLIT), ("fp4", 16, 200, 512, 64, _SPLIT),  # ragged N
    ("fp4", 1, 200, 512, 64, _SPLIT),
    ("fp4", 1, 96, 384, 128, dict(block_n=32)), ("nf4", 16, 96, 384, 128, dict(block_n=32)),
])
def test_gemv_matches_reference(qt, m, n, k, bs, tiles):
  kx, kw = jax.random.split(jax.random.key(m * 7 + n))
  x = jax.random.normal(kx, (m, k))
  w = jax.random.normal(kw, (n, k))
  _check_gemv(x, w, qt, bs, **tiles)


@pytest.mark.parametrize("dtype,qt", [(jnp.bfloat16, "nf4"), (jnp.float16, "fp4")])
def test_gemv_16bit_input(dtype, qt):
  kx, kw = jax.random.split(jax.random.key(5))
  x = jax.random.normal(kx, (3, 320)).astype(dtype)
  _check_gemv(x, jax.random.normal(kw, (192, 320)), qt, 64)


@settings(max_examples=3)
@given(m=st.sampled_from([1, 2, 5, 16]), n=st.integers(1, 130), kblocks=st.integers(1, 7),
       bs=st.sampled_from([32, 64, 256]), qt=st.sampled_from(QTYPES),
       dtype=st.sampled_from(["float32", "bfloat16", "float16"]), seed=st.integers(0, 2**16))
def test_gemv_hypothesis(m, n, kblocks, bs, qt, dtype, seed):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (m, kblocks * bs)).astype(dtype)
  w = jax.random.normal(kw, (n, kblocks * bs)) * 0.1
  _check_gemv(x, w, qt, bs, block_k=64)


@pytest.mark.parametrize("qt", QTYPES)
def test_gemv_nan_absmax_poisons_its_row(qt):
  n, k, bs = 64, 256, 64
  x = jax.random.normal(jax.random.key(3), (3, k))
  q, state = fourbit.quantize_4bit(jax.random.normal(jax.random.key(4), (n, k)), bs, qt)
  b, a = kernel_inputs(q, state)
  a = a.at[5 * (k // bs) + 2].set(jnp.nan)  # a block of row 5
  y = np.asarray(gv.gemv_4bit(x, b, a, n_out=n, blocksize=bs, quant_type=qt, interpret=True))
  ref = np.asarray(gv.gemv_4bit_reference(x, b, a, n_out=n, blocksize=bs, quant_type=qt))
  assert np.isnan(y[:, 5]).all() and np.isnan(ref[:, 5]).all()
  assert np.isfinite(np.delete(y, 5, axis=1)).all()


def test_gemv_unsupported_raises():
  assert not gv.supported(17, 64, 128, 64, "nf4", jnp.float32)
  assert not gv.supported(1, 64, 96, 64, "nf4", jnp.float32)  # K not whole blocks
  assert not gv.supported(1, 64, 128, 64, "int8", jnp.float32)
  assert not gv.supported(1, 64, 128, 64, "nf4", jnp.int32)
  assert gv.supported(16, 1, 64, 64, "fp4", jnp.bfloat16)
  with pytest.raises(ValueError, match="XLA path"):
    gv.gemv_4bit(jnp.zeros((17, 128)), jnp.zeros((64 * 64,), jnp.uint8),
                 jnp.zeros((128,)), n_out=64, blocksize=64, quant_type="nf4", interpret=True)


# --- GPU lowering (Triton backend) from a CPU-only jaxlib --------------------------------------


def _lower_for_h100(fn, *specs):
  """StableHLO text of ``fn`` lowered for CUDA on a CPU-only jaxlib.

  The Triton lowering asks for the GPU's compute capability; without a GPU it reads it from the
  abstract device of the current abstract mesh, so we name one (an H100 -> sm_90).
  """
  from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh
  dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
  mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=dev)
  with use_abstract_mesh(mesh), warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # the Triton backend's deprecation
    return jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("qt", QTYPES)
def test_kernels_lower_for_cuda_triton(qt):
  s = jax.ShapeDtypeStruct
  n, k = 8192, 8192
  wspec = (s((n * k // 2,), jnp.uint8), s((n * k // 64,), jnp.float32))
  for m, dt in ((1, jnp.bfloat16), (16, jnp.float16)):
    hlo = _lower_for_h100(
        lambda x, b, a: gv.gemv_4bit(x, b, a, n_out=n, blocksize=64, quant_type=qt),
        s((m, k), dt), *wspec)
    assert "__gpu$xla.gpu.triton" in hlo and f"gemv_{qt}_bs64" in hlo
  hlo = _lower_for_h100(
      lambda b, a: dq.dequantize_4bit(b, a, n=n * k, blocksize=64, quant_type=qt,
                                      out_dtype=jnp.bfloat16), *wspec)
  assert "__gpu$xla.gpu.triton" in hlo and f"dequant_{qt}_bs64" in hlo


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_ops_dispatch_to_pallas_gemv(quant_type):
  """matmul_4bit(backend="pallas") runs the GEMV kernel (interpret mode here) and agrees with the
  XLA path, gradients included; shapes no kernel covers fall back to XLA."""
  import jaxbnb
  from jaxbnb import qtensor
  w = qtensor.quantize_4bit_array(jax.random.normal(jax.random.key(0), (256, 128)) * 0.05,
                                  transposed=True, quant_type=quant_type)
  x = jax.random.normal(jax.random.key(1), (3, 256))
  y_xla = jaxbnb.matmul_4bit(x, w, backend="xla")
  y_pl = jaxbnb.matmul_4bit(x, w, backend="pallas")
  np.testing.assert_allclose(np.asarray(y_pl), np.asarray(y_xla), rtol=1e-5, atol=1e-5)
  g_xla = jax.grad(lambda x: jaxbnb.matmul_4bit(x, w, backend="xla").sum())(x)
  g_pl = jax.grad(lambda x: jaxbnb.matmul_4bit(x, w, backend="pallas").sum())(x)
  np.testing.assert_array_equal(np.asarray(g_pl), np.asarray(g_xla))
  big = jax.random.normal(jax.random.key(2), (40, 256))  # M > 16: the XLA path
  np.testing.assert_allclose(np.asarray(jaxbnb.matmul_4bit(big, w, backend="pallas")),
                             np.asarray(jaxbnb.matmul_4bit(big, w, backend="xla")), rtol=1e-6)
