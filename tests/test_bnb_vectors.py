"""Bit compatibility with bitsandbytes 0.50.2 (CUDA, H100) on its own vectors (tests/data)."""

import dataclasses
import hashlib

import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb import functional as F
from tests import helpers

V = helpers.functional_vectors

BLOCKWISE = helpers.cases(r"(s\d_\w+?)_blockwise8_bs(\d+)_n(\d)_q")
FOURBIT = helpers.cases(r"(s\d_\w+?)_(nf4|fp4)_bs(\d+)_dq(\d)_packed")
INT8 = helpers.cases(r"(s\d_\w+?)_int8vw_thr([\d.]+)_q")


def _f32_bits(a) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(a, np.float32)).view(np.uint32)


def _assert_deq_matches(key: str, out) -> None:
  """Our dequantized output equals bnb's bit for bit (hashes; full arrays where stored)."""
  out = np.ascontiguousarray(np.asarray(out).astype(np.float32))
  if key in V():
    np.testing.assert_array_equal(_f32_bits(out), _f32_bits(V()[key].reshape(out.shape)))
  assert hashlib.sha256(out.tobytes()).hexdigest() == helpers.deq_hashes()[key]


def _normalized(x, absmax, blocksize):
  """float32 x * (1 / absmax) per block, flattened (what bnb's kernels compare)."""
  flat = np.asarray(x.astype(jnp.float32)).reshape(-1)
  a = np.repeat(absmax.astype(np.float32), blocksize)[: flat.size]
  return flat * (np.float32(1) / np.where(a == 0, np.float32(1), a)), a


def test_codebooks_equal_bnb():
  ref = helpers.codebook_vectors()
  for name, ours in [("dynamic_signed", F.create_dynamic_map(signed=True)),
                     ("dynamic_unsigned", F.create_dynamic_map(signed=False)),
                     ("nf4", F.get_4bit_type("nf4")), ("fp4", F.get_4bit_type("fp4"))]:
    assert ours.dtype == jnp.float32
    np.testing.assert_array_equal(_f32_bits(ours), _f32_bits(ref[name]), err_msg=name)


def test_normal_map_is_nf4():
  nf4 = helpers.codebook_vectors()["nf4"]
  np.testing.assert_allclose(np.asarray(F.create_normal_map()), nf4, atol=1e-6, rtol=0)
  wide = np.asarray(F.create_normal_map(total_bits=8))  # bnb's 256-entry layout
  assert wide.shape == (256,) and np.count_nonzero(wide) == 15
  np.testing.assert_allclose(np.unique(wide), nf4, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prefix,bs,nested", BLOCKWISE)
def test_blockwise8_matches_bnb(prefix, bs, nested):
  bs, nested = int(bs), nested == "1"
  key = f"{prefix}_blockwise8_bs{bs}_n{int(nested)}"
  x = helpers.input_array(prefix)
  q, state = F.quantize_blockwise(x, blocksize=bs, nested=nested)
  q_ref = V()[key + "_q"]
  assert q.dtype == jnp.uint8 and q.shape == x.shape and state.dtype == x.dtype
  if nested:
    np.testing.assert_allclose(float(state.offset), float(V()[key + "_offset"]), rtol=2.5e-7)
    # torch's CUDA mean sums in its own order: offset and absmax2 agree to the last ulp.
    np.testing.assert_allclose(np.asarray(state.state2.absmax), V()[key + "_absmax2"],
                               rtol=0, atol=3 * np.spacing(V()[key + "_offset"]))
    np.testing.assert_array_equal(np.asarray(state.absmax), V()[key + "_absmax"])
    absmax_ref = V()[f"{prefix}_blockwise8_bs{bs}_n0_absmax"]
  else:
    absmax_ref = V()[key + "_absmax"]
    np.testing.assert_array_equal(_f32_bits(state.absmax), _f32_bits(absmax_ref))
  # Codes: equal wherever bnb picked a nearest code; where bnb's binary search missed it,
  # ours is strictly nearer. Compare errors in float64 on the float32 normalized values.
  v, _ = _normalized(x, absmax_ref, bs)
  code = np.asarray(state.code, np.float64)
  ours, ref = np.asarray(q).reshape(-1), q_ref.reshape(-1)
  err_ours, err_ref = np.abs(v - code[ours]), np.abs(v - code[ref])
  assert np.all(err_ours <= err_ref)
  # All-zero blocks: bnb's 0 * (1/0) is NaN and its search lands on some code; we store the
  # code of 0.0. Both dequantize to exactly 0.
  differ = (ours != ref) & (_normalized(x, absmax_ref, bs)[1] > 0)
  assert differ.mean() < 0.003, differ.mean()
  assert np.all(np.abs(ours[differ].astype(int) - ref[differ]) == 1)  # neighbours only

  # Dequantizing bnb's own codes and state reproduces bnb's output bit for bit.
  bnb_state = dataclasses.replace(state, absmax=jnp.asarray(V()[key + "_absmax"]))
  if nested:
    bnb_state = dataclasses.replace(
        bnb_state, offset=jnp.asarray(V()[key + "_offset"]),
        state2=dataclasses.replace(state.state2, absmax=jnp.asarray(V()[key + "_absmax2"])))
  _assert_deq_matches(key + "_deq", F.dequantize_blockwise(jnp.asarray(q_ref), bnb_state))


def _fp4_exact_ties(x, absmax, blocksize):
  """Elements whose exact x / absmax lies on an FP4 midpoint (e.g. 5/6).

  bnb is compiled with --use_fast_math, so its 1/absmax is the GPU's approximate reciprocal;
  at an exact tie either neighbour is equally near, and bnb's pick follows that last-ulp error.
  """
  flat = np.asarray(x.astype(jnp.float32), np.float64).reshape(-1)
  a = np.repeat(absmax.astype(np.float64), blocksize)[: flat.size]
  ratio = np.abs(flat / np.where(a == 0, 1, a))
  levels = np.array([0, 0.0625, 2, 3, 4, 6, 8, 12], np.float64) / 12
  mids = (levels[:-1] + levels[1:]) / 2
  return np.any(np.abs(ratio[:, None] - mids[None, :]) < 1e-12, axis=1)


@pytest.mark.parametrize("prefix,quant_type,bs,dq", FOURBIT)
def test_4bit_matches_bnb(prefix, quant_type, bs, dq):
  bs, dq = int(bs), dq == "1"
  key = f"{prefix}_{quant_type}_bs{bs}_dq{int(dq)}"
  x = helpers.input_array(prefix)
  q, state = F.quantize_4bit(x, blocksize=bs, quant_type=quant_type, compress_statistics=dq)
  packed_ref = V()[key + "_packed"]
  assert q.dtype == jnp.uint8 and q.shape == (packed_ref.size, 1)
  assert state.shape == x.shape and state.dtype == x.dtype and state.quant_type == quant_type
  absmax_ref = V()[f"{prefix}_{quant_type}_bs{bs}_dq0_absmax"]
  if dq:
    np.testing.assert_allclose(float(state.offset), float(V()[key + "_offset"]), rtol=2.5e-7)
    # torch's CUDA mean sums in its own order: offset and absmax2 agree to the last ulp.
    np.testing.assert_allclose(np.asarray(state.state2.absmax), V()[key + "_absmax2"],
                               rtol=0, atol=3 * np.spacing(V()[key + "_offset"]))
    np.testing.assert_array_equal(np.asarray(state.absmax), V()[key + "_absmax"])
    assert state.state2.blocksize == 256
  else:
    np.testing.assert_array_equal(_f32_bits(state.absmax), _f32_bits(absmax_ref))
  # Packed bytes: equal outside all-zero blocks (bnb stores code 0 there, from 0 * inf;
  # we store the code of 0.0; both dequantize to 0) and FP4's exact ties (see above).
  n = x.size
  ours = np.asarray(q).reshape(-1)
  codes = np.stack([ours >> 4, ours & 15], -1).reshape(-1)
  codes_ref = np.stack([packed_ref >> 4, packed_ref & 15], -1).reshape(-1)
  zero_block = np.repeat(absmax_ref == 0, bs)[:n]
  skip = zero_block | (_fp4_exact_ties(x, absmax_ref, bs) if quant_type == "fp4" else False)
  np.testing.assert_array_equal(codes[:n][~skip], codes_ref[:n][~skip])
  assert np.mean(skip & ~zero_block) < 5e-3  # exact ties are rare (bf16 inputs: ~0.15%)
  if n % 2:  # the padding nibble is the code of 0.0
    assert codes[n] == (7 if quant_type == "nf4" else 0)
  if not skip.any():
    np.testing.assert_array_equal(ours[:n // 2], packed_ref[:n // 2])

  bnb_state = dataclasses.replace(state, absmax=jnp.asarray(V()[key + "_absmax"]))
  if dq:
    bnb_state = dataclasses.replace(
        bnb_state, offset=jnp.asarray(V()[key + "_offset"]),
        state2=dataclasses.replace(state.state2, absmax=jnp.asarray(V()[key + "_absmax2"])))
  out = F.dequantize_4bit(jnp.asarray(packed_ref).reshape(-1, 1), bnb_state)
  assert out.dtype == x.dtype and out.shape == x.shape
  _assert_deq_matches(key + "_deq", out)


@pytest.mark.parametrize("storage", [jnp.float32, jnp.int32, jnp.bfloat16, jnp.float16,
                                     jnp.int8, jnp.uint8])
def test_quant_storage_views_same_bytes(storage):
  x = helpers.input_array("s0_float32")  # 8192 elements: 4096 bytes
  ref = V()["s0_float32_nf4_bs64_dq1_packed"]
  q, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True,
                             quant_storage=storage)
  assert q.dtype == storage and q.shape == (ref.size // np.dtype(storage).itemsize, 1)
  np.testing.assert_array_equal(np.asarray(q).view(np.uint8).reshape(-1), ref)
  q8, _ = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
  np.testing.assert_array_equal(np.asarray(F.dequantize_4bit(q, state)),
                                np.asarray(F.dequantize_4bit(q8, state)))


def test_quant_storage_pads_instead_of_dropping_codes():
  x = jnp.arange(1, 12, dtype=jnp.float32)  # 11 codes -> 6 bytes -> 2 int32 words
  q, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", quant_storage=jnp.int32)
  assert q.shape == (2, 1)
  q8, _ = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
  np.testing.assert_array_equal(np.asarray(q).view(np.uint8).reshape(-1)[:6],
                                np.asarray(q8).reshape(-1))
  np.testing.assert_array_equal(F.dequantize_4bit(q, state), F.dequantize_4bit(q8, state))


@pytest.mark.parametrize("prefix,threshold", INT8)
def test_int8_vectorwise_matches_bnb(prefix, threshold):
  key = f"{prefix}_int8vw_thr{threshold}"
  x = helpers.input_array(prefix).astype(jnp.float16)  # bnb's LLM.int8() takes fp16
  q, row_absmax, outlier_cols = F.int8_vectorwise_quant(x, threshold=float(threshold))
  q_ref = V()[key + "_q"]
  assert q.dtype == jnp.int8 and q.shape == x.shape and outlier_cols.dtype == jnp.bool_
  np.testing.assert_array_equal(_f32_bits(row_absmax), _f32_bits(V()[key + "_rowabsmax"]))
  np.testing.assert_array_equal(np.nonzero(np.asarray(outlier_cols))[0],
                                V()[key + "_outlier_cols"])
  # Codes: equal except at round-half ties, where bnb's approximate reciprocal (fast math)
  # may land a last-ulp either side of k + 0.5.
  xf = np.where(np.asarray(outlier_cols)[None, :], 0, np.asarray(x, np.float32))
  scaled = np.abs(xf.astype(np.float64) * 127 / np.asarray(row_absmax, np.float64)[:, None])
  tie = np.abs(scaled - np.floor(scaled) - 0.5) < 1e-5
  ours = np.asarray(q)
  np.testing.assert_array_equal(ours[~tie], q_ref[~tie])
  assert np.all(np.abs(ours[tie].astype(int) - q_ref[tie]) <= 1)
