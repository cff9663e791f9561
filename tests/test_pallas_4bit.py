"""Pallas 4-bit kernels (interpret mode on CPU) against their XLA references and the
functional core — dequantize, quantize, GEMV, GEMM, nested absmax decoded in-kernel — plus a
CUDA lowering check of the Triton backend that runs on CPU."""

from __future__ import annotations

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
from pallas_kernels import gemm_4bit as gm
from pallas_kernels import gemv_4bit as gv
from pallas_kernels import quant_4bit as qk
from tests import helpers

# Interpret mode off a GPU; on one (experiments/gpu_session.sh check: JAX_PLATFORMS=cuda) the
# same tests compile and run the real Triton kernels.
INTERPRET = jax.default_backend() != "gpu"

QTYPES = ("nf4", "fp4")


def kernel_inputs(q, state, nested_in_kernel=True):
  """The adapter between jaxbnb's (q, QuantState) and the kernels: uint8 bytes, and the absmax
  as float32 or (nested state) as bnb stores it, for the kernels to decode."""
  if state.nested and nested_in_kernel:
    return fourbit.storage_bytes(q), common.NestedAbsmax(
        state.absmax, state.state2.absmax, state.offset, state.state2.code)
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
  got = dq.dequantize_4bit(b, a, interpret=INTERPRET, tile_bytes=4096, **kw)
  ref = dq.dequantize_4bit_reference(b, a, **kw)
  np.testing.assert_array_equal(bits(got), bits(want))
  np.testing.assert_array_equal(bits(ref), bits(want))
  for dt in (jnp.bfloat16, jnp.float16):  # 16-bit outputs: the same single rounding
    got16 = dq.dequantize_4bit(b, a, out_dtype=dt, interpret=INTERPRET, tile_bytes=4096, **kw)
    ref16 = dq.dequantize_4bit_reference(b, a, out_dtype=dt, **kw)
    np.testing.assert_array_equal(bits(got16), bits(want.astype(dt)))
    np.testing.assert_array_equal(bits(ref16), bits(want.astype(dt)))


@pytest.mark.parametrize("qt", QTYPES)
def test_dequant_16bit_state_matches_functional(qt):
  x = jax.random.normal(jax.random.key(1), (64, 128), jnp.bfloat16)
  q, state = fourbit.quantize_4bit(x, 64, qt)
  b, a = kernel_inputs(q, state)
  got = dq.dequantize_4bit(b, a, n=x.size, blocksize=64, quant_type=qt, out_dtype=jnp.bfloat16,
                           interpret=INTERPRET)
  np.testing.assert_array_equal(bits(got), bits(fourbit.dequantize_4bit(q, state).reshape(-1)))


@pytest.mark.parametrize("qt", QTYPES)
def test_dequant_nonfinite_absmax_policy(qt):
  """NaN absmax -> the whole block is NaN; Inf absmax -> +-Inf, and NaN where the code is 0."""
  x = jax.random.normal(jax.random.key(2), (8, 128))
  q, state = fourbit.quantize_4bit(x, 64, qt)
  b, a = kernel_inputs(q, state)
  a = a.at[3].set(jnp.nan).at[5].set(jnp.inf)
  kw = dict(n=x.size, blocksize=64, quant_type=qt)
  got = np.asarray(dq.dequantize_4bit(b, a, interpret=INTERPRET, **kw))
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
  got = gv.gemv_4bit(x, b, a, interpret=INTERPRET, **kw, **tiles)
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
    ("nf4", 1, 192, 320, 64, {}),  # K 5 blocks, N 3*64
    ("nf4", 3, 200, 512, 64, _SPLIT), ("fp4", 16, 200, 512, 64, _SPLIT),  # ragged N
    ("fp4", 1, 96, 384, 128, dict(block_n=32)),
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


@settings(max_examples=2)
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
  y = np.asarray(gv.gemv_4bit(x, b, a, n_out=n, blocksize=bs, quant_type=qt, interpret=INTERPRET))
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
                 jnp.zeros((128,)), n_out=64, blocksize=64, quant_type="nf4", interpret=INTERPRET)


# --- nested (double-quantized) absmax, decoded in-kernel --------------------------------------


def test_nested_decode_reference_is_unnest_absmax():
  """common.decode_nested_reference == jaxbnb's unnest_absmax, bit for bit, incl. NaN groups."""
  a = jnp.abs(jax.random.normal(jax.random.key(7), (1000,))) * 3
  a = a.at[300].set(jnp.nan).at[5].set(0.0)
  from jaxbnb.functional.blockwise import nest_absmax
  qa, off, st2 = nest_absmax(a, 256)
  nested = common.NestedAbsmax(qa, st2.absmax, off, st2.code)
  from jaxbnb.functional.state import QuantState
  want = unnest_absmax(QuantState(absmax=qa, code=jnp.zeros(16), offset=off, state2=st2,
                                  blocksize=64, quant_type="nf4", shape=(64000,),
                                  dtype=np.dtype(np.float32)))
  got = common.decode_nested_reference(nested)
  np.testing.assert_array_equal(bits(got), bits(want))
  assert np.isnan(np.asarray(got)[256:512]).all() and np.isfinite(np.asarray(got)[:256]).all()


def test_nested_decode_rounds_twice_in_kernel():
  """code*absmax2 is rounded before + offset: inputs where one FMA rounding differs decode
  as two roundings (checked against float64 math), in the kernel (interpret) and reference."""
  rng = np.random.default_rng(0)
  code = np.sort(rng.uniform(-1, 1, 256)).astype(np.float32)
  codes = rng.integers(0, 256, 512).astype(np.uint8)
  a2 = rng.uniform(0.5, 2, 2).astype(np.float32)
  off = np.float32(0.3183099)
  prod = (code[codes] * a2[np.arange(512) // 256]).astype(np.float32)
  two = (prod + off).astype(np.float32)
  fused = (code[codes].astype(np.float64) * a2[np.arange(512) // 256] + off).astype(np.float32)
  assert (two != fused).any()  # the test data can tell the two apart
  nested = common.NestedAbsmax(jnp.asarray(codes), jnp.asarray(a2), jnp.asarray(off),
                               jnp.asarray(code))
  packed = jnp.full((512 * 32 // 2,), 0xFF, jnp.uint8)  # every code 15: NF4 1.0
  got = dq.dequantize_4bit(packed, nested, n=512 * 32, blocksize=32, quant_type="nf4",
                           interpret=INTERPRET)
  np.testing.assert_array_equal(bits(np.asarray(got)[::32]), bits(two))
  np.testing.assert_array_equal(bits(common.decode_nested_reference(nested)), bits(two))


# --- quantize ----------------------------------------------------------------------------------


def test_quant_thresholds_match_functional_core():
  np.testing.assert_array_equal(qk.NF4_THRESHOLDS, fourbit._NF4_THRESHOLDS)
  np.testing.assert_array_equal(qk.FP4_THRESHOLDS, fourbit._FP4_THRESHOLDS)
  v = jnp.linspace(-1.1, 1.1, 4001).astype(jnp.float32)
  v = jnp.concatenate([v, jnp.array([jnp.nan, -0.0, 0.0, -1e-9])])
  for qt in QTYPES:
    np.testing.assert_array_equal(np.asarray(qk.encode_4bit(v, qt)),
                                  np.asarray(fourbit.encode_4bit(v, qt)))


def _check_quant(x, bs, qt, **kw):
  q, state = fourbit.quantize_4bit(x, bs, qt)
  want_q, want_a = np.asarray(fourbit.storage_bytes(q)), bits(state.absmax)
  got_q, got_a = qk.quantize_4bit(x, blocksize=bs, quant_type=qt, interpret=INTERPRET, **kw)
  ref_q, ref_a = qk.quantize_4bit_reference(x, blocksize=bs, quant_type=qt)
  np.testing.assert_array_equal(np.asarray(got_q), want_q)
  np.testing.assert_array_equal(bits(got_a), want_a)
  np.testing.assert_array_equal(np.asarray(ref_q), want_q)
  np.testing.assert_array_equal(bits(ref_a), want_a)
  return got_a


@pytest.mark.parametrize("qt", QTYPES)
@pytest.mark.parametrize("shape,bs,dtype", [
    ((33, 65), 32, jnp.float32),     # odd n, ragged last block and last tile
    ((96, 200), 64, jnp.bfloat16),
    ((64, 384), 128, jnp.float16),
])
def test_quant_bitexact(qt, shape, bs, dtype):
  x = (jax.random.normal(jax.random.key(0), shape) * 3).astype(dtype).reshape(-1)
  x = x.at[:6].set(jnp.array([0.0, -0.0, 1e-30, -1e-30, 7.0, -7.0], dtype))
  x = x.at[2 * bs: 3 * bs].set(0)                     # an all-zero block
  x = x.at[3 * bs + 5].set(jnp.nan).at[5 * bs + 1].set(-jnp.inf)  # poisoned blocks
  a = _check_quant(x.reshape(shape), bs, qt, tile_elems=1024)
  a = np.asarray(a)
  assert a[2] == 0 and np.isnan(a[3]) and np.isnan(a[5]) and np.isfinite(np.delete(a, [3, 5])).all()


@pytest.mark.parametrize("qt", QTYPES)
def test_quant_huge_finite_blocks_match_xla(qt):
  """Issue 19 R1: a block with absmax > 2**126 (1 / absmax subnormal) is encoded, not zeroed."""
  x = jax.random.normal(jax.random.key(4), (256,)) * 1e37
  x = x.at[:64].multiply(10.0).at[64].set(3.3e38)  # absmax ~ 2e37 .. 3.3e38, all finite
  _check_quant(x, 64, qt, tile_elems=256)  # bit for bit the XLA path ...
  y = np.asarray(fourbit.dequantize_4bit(*fourbit.quantize_4bit(x, 64, qt)), np.float64)
  xs = np.asarray(x, np.float64)
  assert np.all(np.isfinite(y)) and np.abs(y - xs).max() < 0.3 * np.abs(xs).max()  # ... not 0


@settings(max_examples=3)
@given(n=st.integers(1, 700), bs=st.sampled_from([32, 64, 256]), qt=st.sampled_from(QTYPES),
       dtype=st.sampled_from(["float32", "bfloat16", "float16"]), seed=st.integers(0, 2**16))
def test_quant_hypothesis(n, bs, qt, dtype, seed):
  x = jax.random.normal(jax.random.key(seed), (n,)) * 10.0 ** (seed % 7 - 3)
  _check_quant(x.astype(dtype), bs, qt, tile_elems=256)


def test_quant_roundtrip_through_dequant_kernel():
  x = jax.random.normal(jax.random.key(3), (64, 128), jnp.bfloat16)
  b, a = qk.quantize_4bit(x, blocksize=64, quant_type="nf4", interpret=INTERPRET)
  y = dq.dequantize_4bit(b, a, n=x.size, blocksize=64, quant_type="nf4",
                         out_dtype=jnp.bfloat16, interpret=INTERPRET)
  q, state = fourbit.quantize_4bit(x, 64, "nf4")
  np.testing.assert_array_equal(bits(y), bits(fourbit.dequantize_4bit(q, state).reshape(-1)))


# --- GEMM --------------------------------------------------------------------------------------


def _check_gemm(x, w, qt, bs, nested=True, tiles=None):
  n, k = w.shape
  q, state = fourbit.quantize_4bit(w, bs, qt, compress_statistics=nested)
  b, a = kernel_inputs(q, state)
  kw = dict(n_out=n, blocksize=bs, quant_type=qt)
  got = gm.gemm_4bit(x, b, a, interpret=INTERPRET, tiles=tiles, **kw)
  ref = gm.gemm_4bit_reference(x, b, a, **kw)
  assert got.shape == (x.shape[0], n) and got.dtype == x.dtype
  # Independent check through the public core: x @ round_{x.dtype}(dequantize(W)).T, in f32.
  wd = fourbit.dequantize_4bit(q, state).astype(x.dtype).astype(jnp.float32)
  xf = x.astype(jnp.float32)
  core = np.asarray(jnp.dot(xf, wd.T, precision=jax.lax.Precision.HIGHEST))
  scale = np.asarray(jnp.dot(jnp.abs(xf), jnp.abs(wd).T, precision=jax.lax.Precision.HIGHEST))
  # Only the f32 summation order and the final rounding to x.dtype differ.
  eps_out = float(jnp.finfo(x.dtype).eps)
  got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
  assert np.all(np.abs(got - ref) <= eps_out * np.abs(ref) + 1e-5 * scale + 1e-30)
  assert np.all(np.abs(got - core) <= eps_out * np.abs(core) + 1e-5 * scale + 1e-30)
  return got, core


@settings(max_examples=4)
@given(m=st.integers(1, 70), n=st.integers(1, 130), kblocks=st.integers(1, 9),
       bs=st.sampled_from([32, 64, 128]), qt=st.sampled_from(QTYPES),
       dtype=st.sampled_from(["bfloat16", "float16", "float32"]), nested=st.booleans(),
       seed=st.integers(0, 2**16))
def test_gemm_hypothesis(m, n, kblocks, bs, qt, dtype, nested, seed):
  """Shapes where M, N overhang the tiles and K (whole blocks) is not a multiple of BK."""
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (m, kblocks * bs)).astype(dtype)
  w = jax.random.normal(kw, (n, kblocks * bs)) * 0.1
  _check_gemm(x, w, qt, bs, nested, tiles=(16, 32, 128, 4, 3))


@pytest.mark.parametrize("qt,dtype,bs,tiles", [
    ("nf4", jnp.bfloat16, 64, (16, 16, 64, 4, 3)),    # K 5 blocks: 5 full tiles, no tail
    ("fp4", jnp.float16, 32, None),                    # default table; K tail 64 + 32
    ("nf4", jnp.float32, 256, (32, 16, 64, 4, 3)),    # a block spans 4 K tiles
])
def test_gemm_cases(qt, dtype, bs, tiles):
  kx, kw = jax.random.split(jax.random.key(11))
  k = 5 * bs if bs < 256 else 512
  x = jax.random.normal(kx, (40, k)).astype(dtype)
  _check_gemm(x, jax.random.normal(kw, (48, k)), qt, bs, True, tiles)


def test_gemm_identity_exact_and_bnb_error_bound():
  k = 576  # dim > 512: bnb's gemv bound, bf16 err / sqrt(dim) <= 2.06e-4
  x = jax.random.normal(jax.random.key(1), (24, k), jnp.bfloat16)
  got, _ = _check_gemm(x, jnp.eye(k), "nf4", 64, True, (16, 64, 128, 4, 3))
  np.testing.assert_array_equal(got, np.asarray(x, np.float32))  # identity reproduced exactly
  w = jax.random.normal(jax.random.key(2), (64, k), jnp.bfloat16) / np.sqrt(k)  # bnb's setup
  got, core = _check_gemm(x, w, "nf4", 64, True)
  err = np.mean(np.abs(got - core))
  assert err / np.sqrt(k) <= 2.06e-4, err / np.sqrt(k)


def test_gemm_nan_absmax_poisons_its_column():
  n, k, bs = 40, 256, 64
  x = jax.random.normal(jax.random.key(3), (20, k), jnp.bfloat16)
  q, state = fourbit.quantize_4bit(jax.random.normal(jax.random.key(4), (n, k)), bs, "nf4")
  b, a = kernel_inputs(q, state)
  a = a.at[5 * (k // bs) + 2].set(jnp.nan)  # a block of W's row 5 -> output column 5
  y = np.asarray(gm.gemm_4bit(x, b, a, n_out=n, blocksize=bs, quant_type="nf4",
                              interpret=INTERPRET, tiles=(16, 16, 64, 4, 3)), np.float32)
  assert np.isnan(y[:, 5]).all() and np.isfinite(np.delete(y, 5, axis=1)).all()


def test_no_dense_weight_or_decoded_absmax_outside_the_kernels():
  """The GEMM/GEMV programs hold no float W (N, K) and, with nested stats, no float absmax:
  both exist only tile by tile inside the pallas_call."""
  s = jax.ShapeDtypeStruct
  n, k, bs = 256, 512, 64
  nb = n * k // bs
  nspec = (s((nb,), jnp.uint8), s((nb // 256,), jnp.float32), s((), jnp.float32),
           s((256,), jnp.float32))
  nest = lambda c, a2, o, code: common.NestedAbsmax(c, a2, o, code)
  for m, fn in ((40, gm.gemm_4bit), (4, gv.gemv_4bit)):
    jaxpr = jax.make_jaxpr(lambda x, b, *na: fn(
        x, b, nest(*na), n_out=n, blocksize=bs, quant_type="nf4", interpret=INTERPRET))(
            s((m, k), jnp.bfloat16), s((n * k // 2,), jnp.uint8), *nspec)
    outer = [e for e in jaxpr.jaxpr.eqns[0].params["jaxpr"].eqns] if len(
        jaxpr.jaxpr.eqns) == 1 and "jaxpr" in jaxpr.jaxpr.eqns[0].params else jaxpr.jaxpr.eqns
    assert any(e.primitive.name == "pallas_call" for e in outer)
    for e in outer:
      if e.primitive.name == "pallas_call":
        continue
      for v in e.outvars:
        big_w = v.aval.shape == (nb,) or (n in v.aval.shape and v.aval.size >= nb)
        assert not (jnp.issubdtype(v.aval.dtype, jnp.floating) and big_w), (e.primitive, v.aval)


def test_gemm_tiling_and_unsupported():
  for m, want_bm in ((17, 16), (64, 32), (100, 64), (4096, 128)):
    bm, bn, bk, _, _ = gm.tiling(m, 8192, 8192, 64)
    assert bm == want_bm and all(d >= 16 and d & (d - 1) == 0 for d in (bm, bn, bk))
  assert gm.tiling(3, 5, 64, 64)[:3] == (16, 16, 64)
  assert gm.supported(1, 1, 64, 64, "nf4", jnp.float32)
  assert not gm.supported(4, 64, 96, 64, "nf4", jnp.bfloat16)  # K not whole blocks
  assert not gm.supported(4, 64, 128, 48, "nf4", jnp.bfloat16)
  assert not gm.supported(4, 64, 128, 64, "int8", jnp.bfloat16)
  assert not gm.supported(4, 64, 128, 64, "nf4", jnp.int8)
  with pytest.raises(ValueError, match="XLA path"):
    gm.gemm_4bit(jnp.zeros((20, 96)), jnp.zeros((64 * 48,), jnp.uint8), jnp.zeros((96,)),
                 n_out=64, blocksize=64, quant_type="nf4", interpret=INTERPRET)


# --- GPU lowering (Triton backend) from a CPU-only jaxlib --------------------------------------


@pytest.mark.parametrize("qt", QTYPES)
def test_kernels_lower_for_cuda_triton(qt):
  s = jax.ShapeDtypeStruct
  n, k = 8192, 8192
  wspec = (s((n * k // 2,), jnp.uint8), s((n * k // 64,), jnp.float32))
  for m, dt in ((1, jnp.bfloat16), (16, jnp.float16)):
    hlo = helpers.lower_for_h100(
        lambda x, b, a: gv.gemv_4bit(x, b, a, n_out=n, blocksize=64, quant_type=qt),
        s((m, k), dt), *wspec)
    assert "__gpu$xla.gpu.triton" in hlo and f"gemv_{qt}_bs64" in hlo
  hlo = helpers.lower_for_h100(
      lambda b, a: dq.dequantize_4bit(b, a, n=n * k, blocksize=64, quant_type=qt,
                                      out_dtype=jnp.bfloat16), *wspec)
  assert "__gpu$xla.gpu.triton" in hlo and f"dequant_{qt}_bs64" in hlo
  hlo = helpers.lower_for_h100(lambda x: qk.quantize_4bit(x, blocksize=64, quant_type=qt),
                        s((n, k), jnp.bfloat16))
  assert "__gpu$xla.gpu.triton" in hlo and f"quant_{qt}_bs64" in hlo
  assert "div.rn.f32" in hlo  # the IEEE reciprocal, not Triton's approximate division
  for m, dt, nn, kk in ((4096, jnp.bfloat16, n, k), (33, jnp.float16, 200, 320),
                        (64, jnp.float32, 128, 4096)):
    hlo = helpers.lower_for_h100(
        lambda x, b, a: gm.gemm_4bit(x, b, a, n_out=nn, blocksize=64, quant_type=qt),
        s((m, kk), dt), s((nn * kk // 2,), jnp.uint8), s((nn * kk // 64,), jnp.float32))
    assert "__gpu$xla.gpu.triton" in hlo and f"gemm_{qt}_bs64" in hlo


def test_nested_kernels_lower_for_cuda_triton():
  """Nested absmax: the dynamic-map gather and mul.rn.f32 (no FMA) lower for Triton."""
  s = jax.ShapeDtypeStruct
  n, k = 4096, 14336
  nb = n * k // 64
  nspec = (s((nb,), jnp.uint8), s((nb // 256,), jnp.float32), s((), jnp.float32),
           s((256,), jnp.float32))
  b = s((n * k // 2,), jnp.uint8)
  nest = lambda c, a2, o, code: common.NestedAbsmax(c, a2, o, code)
  fns = {
      "dequant_nf4_bs64_dq": lambda b, *na: dq.dequantize_4bit(
          b, nest(*na), n=n * k, blocksize=64, quant_type="nf4", out_dtype=jnp.bfloat16),
      "gemv_nf4_bs64_dq": lambda x, b, *na: gv.gemv_4bit(
          x, b, nest(*na), n_out=n, blocksize=64, quant_type="nf4"),
      "gemm_nf4_bs64_dq": lambda x, b, *na: gm.gemm_4bit(
          x, b, nest(*na), n_out=n, blocksize=64, quant_type="nf4"),
  }
  for name, fn in fns.items():
    args = (b, *nspec) if name.startswith("dequant") else (
        s((1 if "gemv" in name else 512, k), jnp.bfloat16), b, *nspec)
    hlo = helpers.lower_for_h100(fn, *args)
    assert "__gpu$xla.gpu.triton" in hlo and name in hlo and "mul.rn.f32" in hlo


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_ops_dispatch_to_pallas_gemv(quant_type):
  """matmul_4bit(backend="pallas") runs the GEMV kernel (interpret mode here) and agrees with the
  XLA path, gradients included; shapes no kernel covers fall back to XLA.

  Both at float32 precision: the kernels' float32 dots are IEEE (Precision.HIGHEST), while the
  XLA path follows JAX's default matmul precision, TF32 on a GPU (seen on an H100, 2026-11-27:
  differences of ~1e-3 relative)."""
  import jaxbnb
  from jaxbnb import qtensor
  with jax.default_matmul_precision("highest"):
    w = qtensor.quantize_4bit_array(jax.random.normal(jax.random.key(0), (256, 128)) * 0.05,
                                    transposed=True, quant_type=quant_type)
    x = jax.random.normal(jax.random.key(1), (3, 256))
    y_xla = jaxbnb.matmul_4bit(x, w, backend="xla")
    y_pl = jaxbnb.matmul_4bit(x, w, backend="pallas")
    np.testing.assert_allclose(np.asarray(y_pl), np.asarray(y_xla), rtol=1e-5, atol=1e-5)
    g_xla = jax.grad(lambda x: jaxbnb.matmul_4bit(x, w, backend="xla").sum())(x)
    g_pl = jax.grad(lambda x: jaxbnb.matmul_4bit(x, w, backend="pallas").sum())(x)
    np.testing.assert_array_equal(np.asarray(g_pl), np.asarray(g_xla))
    big = jax.random.normal(jax.random.key(2), (40, 256))  # M > 16: the GEMM kernel
    assert "pallas_call" in str(jax.make_jaxpr(
        lambda x: jaxbnb.matmul_4bit(x, w, backend="pallas"))(big))
    # float32 sums in another order (K tiles of 16 for float32 x): an absolute term for the
    # outputs that cancel to near 0.
    np.testing.assert_allclose(np.asarray(jaxbnb.matmul_4bit(big, w, backend="pallas")),
                               np.asarray(jaxbnb.matmul_4bit(big, w, backend="xla")), rtol=1e-6,
                               atol=1e-5)
    # A Flax-style x @ kernel through qdot_general reaches the kernels too.
    y_q = jaxbnb.qdot_general(big, w, (((1,), (0,)), ((), ())), backend="pallas")
    np.testing.assert_allclose(np.asarray(y_q), np.asarray(jaxbnb.matmul_4bit(big, w)), rtol=1e-6,
                               atol=1e-5)
