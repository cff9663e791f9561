"""The XLA 4-bit path stays lean: the decode is fused into the matmul (no float W at small M,
at most one compute-dtype W at large M) and quantize/dequantize keep their temporaries small.

Bounds come from ``memory_analysis()`` of the compiled programs (deterministic; nothing here
is timed). Results are checked against the reference: dequantize, then a float32 dot.
"""

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxbnb
from jaxbnb import functional as F
from jaxbnb import ops, qtensor

N = 4096  # the weight: 4096 x 4096, bf16 compute
_EPS = {np.dtype(jnp.float32): 2.0**-24, np.dtype(jnp.bfloat16): 2.0**-8,
        np.dtype(jnp.float16): 2.0**-11}


def _eps(dtype) -> float:
  """Unit roundoff of a float dtype."""
  return _EPS[np.dtype(dtype)]


def _temp_bytes(fn, *specs) -> int:
  return jax.jit(fn).lower(*specs).compile().memory_analysis().temp_size_in_bytes


def _weight_spec(n_out, n_in, compute_dtype=jnp.bfloat16, nested=True, quant_type="nf4"):
  """A quantized Flax kernel (in, out) as shapes only: compiling needs no data."""
  return jax.eval_shape(
      lambda k: qtensor.quantize_4bit_array(
          k, transposed=True, quant_type=quant_type, compress_statistics=nested,
          compute_dtype=compute_dtype),
      jax.ShapeDtypeStruct((n_in, n_out), jnp.float32))


# --- temporaries ------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("nested", [False, True])
def test_small_m_never_writes_a_float_weight(m, nested):
  """M=1 and M=16: compiled temporaries <= 0.25x the weight's bf16 bytes, forward and grad."""
  w = _weight_spec(N, N, nested=nested)
  x = jax.ShapeDtypeStruct((m, N), jnp.bfloat16)
  bound = N * N * 2 // 4
  assert _temp_bytes(lambda x, w: jaxbnb.matmul(x, w), x, w) <= bound
  grad = jax.grad(lambda x, w: jnp.sum(jaxbnb.matmul(x, w).astype(jnp.float32)))
  assert _temp_bytes(grad, x, w) <= bound


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_one_row_is_one_pass_over_the_packed_bytes(quant_type):
  """M=1 on CPU: one elementwise loop over the packed bytes writes float32 partial sums
  (out, in / (2 * groups)), 1/16 of W's bf16 bytes, and one small dot adds them up: no decoded
  plane, no dot per step (the float32 absmax of a double-quantized weight comes on top)."""
  w = _weight_spec(N, N, quant_type=quant_type)
  x = jax.ShapeDtypeStruct((1, N), jnp.bfloat16)
  compiled = jax.jit(lambda x, w: jaxbnb.matmul(x, w)).lower(x, w).compile()
  groups = ops._gemv_groups(w, 1)
  assert groups == ops._GEMV_GROUPS
  partial = N * N // (2 * groups) * 4
  assert partial <= N * N * 2 // 16
  absmax = N * N // 64 * 4
  assert compiled.memory_analysis().temp_size_in_bytes <= partial + absmax + 16 * N * 4
  assert compiled.as_text().count(" dot(") == 1


def test_large_m_holds_no_float32_weight():
  """M=512: less than one float32 W of temporaries (at most one bf16 copy is allowed)."""
  w = _weight_spec(N, N)
  x = jax.ShapeDtypeStruct((512, N), jnp.bfloat16)
  assert _temp_bytes(lambda x, w: jaxbnb.matmul(x, w), x, w) < N * N * 4


def test_float32_compute_small_m_bound():
  w = _weight_spec(N, N, compute_dtype=jnp.float32, nested=False, quant_type="fp4")
  x = jax.ShapeDtypeStruct((1, N), jnp.float32)
  assert _temp_bytes(lambda x, w: jaxbnb.matmul(x, w), x, w) <= N * N * 2 // 4


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantize_dequantize_temporaries(dtype):
  """quantize_4bit keeps no converted copy of a float32 input (absmax and finiteness in one
  reduction pass; codes packed in the encoder's loop); dequantize_4bit writes its output only."""
  x = jax.ShapeDtypeStruct((N, N), dtype)
  quant = lambda x: F.fourbit._quantize_4bit(x, 64, "nf4", False, np.dtype(np.uint8))
  absmax_bytes = N * N // 64 * 4
  bound = absmax_bytes if dtype == jnp.float32 else N * N * 4 + absmax_bytes
  assert _temp_bytes(quant, x) <= bound
  q, state = jax.eval_shape(quant, x)
  assert _temp_bytes(F.fourbit._dequantize_4bit, q, state) <= absmax_bytes


# --- results ----------------------------------------------------------------------------------


@st.composite
def problems(draw):
  """A 4-bit weight of odd sizes (blocks that straddle rows, matrices the fused path does not
  take), an input of a few rows, and the dtypes."""
  bs = draw(st.sampled_from([32, 64, 128]))
  n_in = draw(st.one_of(st.integers(1, 12).map(lambda k: 2 * k * 8),   # whole blocks or less
                        st.integers(1, 97)))                            # anything, odd too
  n_out = draw(st.integers(1, 41))
  m = draw(st.sampled_from([1, 2, 3, 7]))
  quant_type = draw(st.sampled_from(["nf4", "fp4"]))
  nested = draw(st.booleans())
  compute_dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]))
  x_dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
  seed = draw(st.integers(0, 2**31 - 1))
  zero_rows = draw(st.booleans())
  return bs, n_in, n_out, m, quant_type, nested, compute_dtype, x_dtype, seed, zero_rows


def _case(bs, n_in, n_out, m, quant_type, nested, compute_dtype, x_dtype, seed, zero_rows):
  kw, kx = jax.random.split(jax.random.key(seed))
  w = jax.random.normal(kw, (n_out, n_in), jnp.float32)
  if zero_rows:  # all-zero blocks
    w = w.at[: max(1, n_out // 3)].set(0)
  wq = qtensor.quantize_4bit_array(w, transposed=False, blocksize=bs, quant_type=quant_type,
                                   compress_statistics=nested, compute_dtype=compute_dtype)
  x = jax.random.normal(kx, (m, n_in), jnp.float32).astype(x_dtype)
  return x, wq


def _reference(x, wq):
  """float32 ``x @ W.T`` with x and W rounded to the compute dtype (today's XLA path)."""
  cd = wq.compute_dtype
  wd = wq.dequantize_matrix(cd).astype(jnp.float32)
  return x.astype(cd).astype(jnp.float32) @ wd.T, wd


def _tolerance(x, wd, cd):
  """The compute dtype's rounding of W (the M=1 path keeps W exact), float32 sums, and the
  output's rounding to x's dtype."""
  mag = np.abs(np.asarray(x.astype(cd), np.float32)) @ np.abs(np.asarray(wd)).T
  return mag * (2 * _eps(cd) + 64 * _eps(jnp.float32)) + 1e-30


@contextlib.contextmanager
def _small_steps():
  """Steps of a few rows: many loop iterations, and a last step overlapping the one before."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(ops, "_STEP_BYTES", 96 * 4)
    mp.setattr(ops, "_MIN_STEP_BYTES", 0)
    yield


@given(problems())
def test_fused_matmul_equals_dequantize_then_dot(problem):
  x, wq = _case(*problem)
  with _small_steps():
    y = jaxbnb.matmul_4bit(x, wq)
  ref, wd = _reference(x, wq)
  assert y.shape == ref.shape and y.dtype == x.dtype
  tol = _tolerance(x, wd, wq.compute_dtype) + np.abs(np.asarray(ref)) * _eps(x.dtype)
  np.testing.assert_array_less(np.abs(np.asarray(y, np.float32) - np.asarray(ref)), tol)


@given(problems())
def test_fused_matmul_gradient(problem):
  x, wq = _case(*problem)
  x = x.astype(jnp.float32)
  g = jax.random.normal(jax.random.key(1), (x.shape[0], wq.matrix_shape[0]))
  with _small_steps():
    dx = jax.grad(lambda x: jnp.sum(jaxbnb.matmul_4bit(x, wq) * g))(x)
  _, wd = _reference(x, wq)
  ref = g @ wd
  mag = np.abs(np.asarray(g)) @ np.abs(np.asarray(wd))
  cd = wq.compute_dtype
  tol = mag * (3 * _eps(cd) + 64 * _eps(jnp.float32)) + 1e-30
  np.testing.assert_array_less(np.abs(np.asarray(dx) - np.asarray(ref)), tol)


@pytest.mark.parametrize("compute_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m", [1, 5])
def test_every_row_counted_once(monkeypatch, compute_dtype, m):
  """The last step overlaps the previous one: its rows are written once forward and summed
  once backward (37 rows in steps of 8: 0, 8, 16, 24, 29)."""
  monkeypatch.setattr(ops, "_STEP_BYTES", 1)
  monkeypatch.setattr(ops, "_MAX_STEPS", 5)  # steps of ceil(37 / 5) = 8 rows
  monkeypatch.setattr(ops, "_MIN_STEP_BYTES", 0)
  w = jnp.arange(37 * 64, dtype=jnp.float32).reshape(37, 64) % 7 - 3
  wq = qtensor.quantize_4bit_array(w, transposed=False, quant_type="fp4",
                                   compute_dtype=compute_dtype)
  assert ops._row_step(wq, m) == 8
  x = jnp.ones((m, 64), jnp.float32)
  ref, wd = _reference(x, wq)
  np.testing.assert_allclose(np.asarray(jaxbnb.matmul_4bit(x, wq)), np.asarray(ref), rtol=1e-6)
  dx = jax.grad(lambda x: jnp.sum(jaxbnb.matmul_4bit(x, wq)))(x)
  np.testing.assert_allclose(np.asarray(dx), np.broadcast_to(np.asarray(wd.sum(0)), dx.shape),
                             rtol=1e-2 if compute_dtype == jnp.bfloat16 else 1e-6)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compute_dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("n_blocks,groups,nested", [(48, 16, True), (9, 9, False)])
def test_one_row_groups(quant_type, compute_dtype, n_blocks, groups, nested):
  """The one-row product over block groups (the largest divisor of the row's block count up to
  16), an all-zero block and a NaN block included, equals dequantize-then-dot, NaNs where it
  has them (double quantization spreads a NaN absmax over its group of 256 blocks, as in bnb);
  a row of 3 blocks takes the stepped path."""
  w = jax.random.normal(jax.random.key(5), (24, n_blocks * 64))
  w = w.at[3, 64:128].set(0).at[7, 300].set(jnp.nan)
  wq = qtensor.quantize_4bit_array(w, transposed=False, quant_type=quant_type,
                                   compress_statistics=nested, compute_dtype=compute_dtype)
  assert ops._gemv_groups(wq, 1) == groups
  assert ops._gemv_groups(qtensor.quantize_4bit_array(w[:, :192], transposed=False), 1) is None
  x = jax.random.normal(jax.random.key(6), (1, n_blocks * 64), jnp.bfloat16)
  y = np.asarray(jax.jit(jaxbnb.matmul_4bit)(x, wq), np.float32)
  ref, wd = _reference(x, wq)
  ref = np.asarray(ref)
  np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
  assert np.isnan(y[0, 7])
  if not nested:
    assert np.isfinite(np.delete(y, 7, axis=1)).all()
  tol = _tolerance(x, np.nan_to_num(np.asarray(wd)), wq.compute_dtype) + np.abs(ref) * _eps(x.dtype)
  ok = ~np.isnan(ref)
  np.testing.assert_array_less(np.abs(y - ref)[ok], tol[ok])


def test_non_finite_inputs_and_blocks():
  """NaN/Inf in x poison their rows; a weight block holding NaN poisons the outputs that read
  it (its absmax is NaN), exactly as dequantize-then-dot does."""
  w = jax.random.normal(jax.random.key(0), (6, 128))
  w = w.at[2, 70].set(jnp.nan)
  x = jax.random.normal(jax.random.key(1), (3, 128)).at[1, 5].set(jnp.inf)
  for cd in (jnp.float32, jnp.bfloat16):
    wq = qtensor.quantize_4bit_array(w, transposed=False, quant_type="nf4", compute_dtype=cd)
    for rows in (x, x[:1]):
      y = np.asarray(jaxbnb.matmul_4bit(rows, wq))
      ref, _ = _reference(rows, wq)
      np.testing.assert_array_equal(np.isnan(y), np.isnan(np.asarray(ref)))
      assert np.isnan(y[:, 2]).all()


def test_fused_path_is_taken_and_generic_route_agrees():
  """A Flax kernel goes through the fused path (jaxbnb.matmul and qdot_general, as
  jaxbnb.intercept calls it); a row of odd length falls back to dequantize-then-dot."""
  k = jax.random.normal(jax.random.key(2), (64, 48))
  q = jaxbnb.quantize({"kernel": k}, jaxbnb.BitsAndBytesConfig(
      load_in_4bit=True, bnb_4bit_compute_dtype=jnp.bfloat16))["kernel"]
  assert ops._row_step(q, 3) is not None
  x = jax.random.normal(jax.random.key(3), (3, 64), jnp.bfloat16)
  y = jaxbnb.matmul(x, q)
  y2 = jaxbnb.qdot_general(x, q, (((1,), (0,)), ((), ())))
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y2, np.float32))
  odd = qtensor.quantize_4bit_array(jnp.ones((5, 33)), transposed=False)
  assert ops._row_step(odd, 1) is None
  np.testing.assert_allclose(np.asarray(jaxbnb.matmul_4bit(jnp.ones((1, 33)), odd)),
                             np.full((1, 5), 33.0), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_quantize_non_finite_blocks(dtype):
  """One-pass absmax: a block holding NaN or +-Inf gets a NaN absmax (and code 0 throughout,
  as before); every other block keeps its exact max |x|."""
  x = jax.random.normal(jax.random.key(4), (40, 64)).astype(dtype)
  x = x.at[3, 5].set(jnp.nan).at[7, 0].set(jnp.inf).at[11, 63].set(-jnp.inf)
  x = x.at[20].set(0)
  q, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
  absmax = np.asarray(state.absmax)
  bad = np.zeros(40, bool)
  bad[[3, 7, 11]] = True
  assert np.isnan(absmax[bad]).all()
  expect = np.abs(np.asarray(x.astype(jnp.float32))).max(1)
  np.testing.assert_array_equal(absmax[~bad], expect[~bad])
  packed = np.asarray(q).reshape(40, 32)
  assert (packed[bad] == 0).all()
  assert (packed[20] == 0x77).all()  # an all-zero block: the code of 0.0 (NF4 7)


def test_pack_nibbles_layout():
  codes = jnp.arange(16, dtype=jnp.uint8)
  packed = np.asarray(F.fourbit.pack_nibbles(codes))
  assert packed.tolist() == [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]
  np.testing.assert_array_equal(np.asarray(F.fourbit.unpack_nibbles(jnp.asarray(packed))),
                                np.arange(16))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_decode_tree_is_the_table(quant_type):
  """The select-tree decoder gives bnb's values for every byte, -0.0 for FP4's code 8."""
  b = jnp.arange(256, dtype=jnp.uint8)
  table = np.asarray(F.get_4bit_type(quant_type))
  if quant_type == "fp4":
    table = np.where(np.arange(16) >= 8, -np.abs(table), table)
  hi = np.asarray(F.fourbit.decode_nibbles(b, quant_type, True))
  lo = np.asarray(F.fourbit.decode_nibbles(b, quant_type, False))
  np.testing.assert_array_equal(hi, table[np.arange(256) >> 4])
  np.testing.assert_array_equal(lo, table[np.arange(256) & 15])
  np.testing.assert_array_equal(np.signbit(hi), np.signbit(table[np.arange(256) >> 4]))
  assert math.copysign(1, float(lo[8])) == (-1 if quant_type == "fp4" else 1)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_planes_by_block_are_the_planes_bit_for_bit(quant_type):
  """The matmul steps' per-block tables give dequantize_planes' bits in every dtype: every
  byte value, all-zero, huge, tiny, NaN and Inf blocks, FP4's -0.0."""
  rng = np.random.default_rng(7)
  x = rng.standard_normal(64 * 12).astype(np.float32)
  x[:64] = 0
  x[64:128] *= 1e30
  x[128:192] *= 1e-30
  x[200], x[300] = np.nan, np.inf
  _, state = F.quantize_4bit(jnp.asarray(x), 64, quant_type)
  packed = jnp.tile(jnp.arange(256, dtype=jnp.uint8), 12 * 32 // 256 + 1)[:12 * 32]
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    bits = np.uint32 if dtype == jnp.float32 else np.uint16
    want = F.fourbit.dequantize_planes(packed, state.absmax, quant_type, 64, dtype)
    got = F.fourbit.dequantize_planes_by_block(packed, state.absmax, quant_type, 64, dtype)
    for w, g in zip(want, got):
      assert g.dtype == w.dtype
      np.testing.assert_array_equal(np.asarray(g).view(bits), np.asarray(w).view(bits))
