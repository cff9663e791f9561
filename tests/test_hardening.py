"""Issue 19: extreme-but-finite inputs stay finite and within bound; inconsistent states and
malformed checkpoints are refused; bitsandbytes' bits are kept wherever its arithmetic holds."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import save_file

import jaxbnb
from jaxbnb import functional as F
from jaxbnb import interop
from jaxbnb.functional import blockwise, int8
from jaxbnb.interop import load as L

F32_MAX = float(np.finfo(np.float32).max)
EPS = {np.dtype(jnp.float32): 2.0**-24, np.dtype(jnp.bfloat16): 2.0**-8,
       np.dtype(jnp.float16): 2.0**-11}  # unit roundoff of the output dtype
# Absolute error of the smallest outputs: code * absmax is computed in float32, whose
# subnormals XLA flushes to zero (bfloat16 shares float32's range); float16 rounds to its own
# subnormal spacing.
_FLUSH = {np.dtype(jnp.float32): float(np.finfo(np.float32).tiny),
          np.dtype(jnp.bfloat16): float(np.finfo(np.float32).tiny),
          np.dtype(jnp.float16): float(np.finfo(np.float16).smallest_subnormal)}


def _gap(kind):
  code = F.create_dynamic_map() if kind == "8bit" else F.get_4bit_type(kind)
  return float(np.max(np.diff(np.unique(np.asarray(code, np.float64)))))


def _round_trip(x, kind, blocksize=64, nested=False):
  if kind == "8bit":
    q, state = F.quantize_blockwise(x, blocksize=blocksize, nested=nested)
    return F.dequantize_blockwise(q, state), state
  q, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=kind, compress_statistics=nested)
  return F.dequantize_4bit(q, state), state


def _assert_within(x, y, kind, state):
  """Finite, and per block |x - y| <= absmax * gap / 2, plus the stored (nested) absmax's own
  error and the output dtype's rounding; float64 arithmetic."""
  x64 = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64).reshape(-1)
  y64 = np.asarray(jnp.asarray(y).astype(jnp.float32), np.float64).reshape(-1)
  assert np.all(np.isfinite(y64))
  bs = state.blocksize
  true = np.abs(np.pad(x64, (0, -x64.size % bs))).reshape(-1, bs).max(1)
  stored = np.asarray(blockwise.unnest_absmax(state), np.float64)
  bound = (np.repeat(true * _gap(kind) / 2 * (1 + 1e-6) + np.abs(stored - true), bs)[: x64.size]
           + np.abs(y64) * EPS[np.dtype(state.dtype)] + _FLUSH[np.dtype(state.dtype)])
  assert np.all(np.abs(x64 - y64) <= bound), np.max(np.abs(x64 - y64) - bound)


# --- R1: |x| > 2**126 came back as 0 (1 / absmax subnormal, flushed) --------------------------


@pytest.mark.parametrize("kind", ["8bit", "nf4", "fp4"])
@pytest.mark.parametrize("value", [1e38, -3e38, F32_MAX, 1.5 * 2.0**126])
def test_huge_blocks_come_back(kind, value):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(192).astype(np.float32)
  x[64:128] *= np.float32(value / 4)  # one huge block between two ordinary ones
  x[64 + 7] = value
  y, state = _round_trip(jnp.asarray(x), kind)
  _assert_within(x, y, kind, state)
  # (The dynamic map's most negative code is -0.99297: -|x| comes back 0.7% smaller.)
  assert float(y[64 + 7]) == pytest.approx(value, rel=1e-6 if value > 0 or kind != "8bit"
                                           else 0.0071)
  # The ordinary blocks are what they are without the huge one (blocks are independent).
  clean = x.copy()
  clean[64:128] = 0
  y_clean, _ = _round_trip(jnp.asarray(clean), kind)
  np.testing.assert_array_equal(np.asarray(y)[:64], np.asarray(y_clean)[:64])
  np.testing.assert_array_equal(np.asarray(y)[128:], np.asarray(y_clean)[128:])


def test_reciprocal_keeps_bnb_bits_where_it_does_not_underflow():
  # bnb's x * (1 / absmax) in float32, where every result is a normal float: the same bits.
  rng = np.random.default_rng(1)
  absmax = np.float32(2.0) ** rng.integers(-120, 126, 4096).astype(np.float32)
  absmax *= rng.uniform(1, 2, 4096).astype(np.float32)
  x = (absmax[:, None] * rng.uniform(-1, 1, (4096, 8)).astype(np.float32)).astype(np.float32)
  want = x * (np.float32(1) / absmax)[:, None]
  got = np.asarray(blockwise.normalize(jnp.asarray(x), jnp.asarray(absmax)))
  tiny = np.finfo(np.float32).tiny  # subnormal inputs and results are flushed to zero
  normal = (np.abs(want) >= tiny) & (np.abs(x) >= tiny)
  np.testing.assert_array_equal(got[normal], want[normal])


def test_huge_rows_int8():
  x = np.ones((3, 16), np.float32)
  x[1] = np.linspace(-1, 1, 16, dtype=np.float32) * np.float32(3e38)
  x[2, 4] = np.float32(2.0**127)
  q, absmax, _ = F.int8_vectorwise_quant(jnp.asarray(x))
  y = np.asarray(F.int8_vectorwise_dequant(q, absmax), np.float64)
  assert np.all(np.isfinite(y))
  a = np.abs(x).max(1, keepdims=True).astype(np.float64)
  assert np.all(np.abs(y - x) <= a / 127 * 0.5 * (1 + 1e-5))
  np.testing.assert_array_equal(np.asarray(q)[0], 127)  # the ordinary row is bnb's


def test_tiny_rows_int8():
  # Row absmax below 2**-120: bnb's 127 / absmax overflows to inf; jaxbnb scales first.
  x = np.ones((2, 8), np.float32)
  v = np.array([-1, -0.5, -0.25, -1 / 16, 1 / 16, 0.25, 0.5, 1], np.float32)
  x[1] = v * np.float32(2.0**-121)  # normal numbers all (XLA flushes subnormal inputs)
  q, absmax, _ = F.int8_vectorwise_quant(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(q)[1], np.round(127 * v))  # [-127, -64, -32, -8, ..]
  y = np.asarray(F.int8_vectorwise_dequant(q, absmax), np.float64)
  assert np.all(np.abs(y - x) <= 2.0**-121 / 127 * 0.5 * (1 + 1e-5))


def test_int8_dequant_past_127x_overflow():
  # bnb: (q * absmax) / 127 is inf for absmax > ~2.7e36; jaxbnb scales the absmax first there.
  q = jnp.asarray([[127, -127, 64, 1], [127, 3, -5, 0]], jnp.int8)
  absmax = jnp.asarray([3e36, 2.0], jnp.float32)
  y = np.asarray(F.int8_vectorwise_dequant(q, absmax))
  assert np.all(np.isfinite(y))
  np.testing.assert_allclose(y[0], np.array([127, -127, 64, 1]) * 3e36 / 127, rtol=1e-6)
  # An ordinary row keeps bnb's arithmetic bit for bit: (q * absmax) * float32(1/127).
  want = (np.asarray([127, 3, -5, 0], np.float32) * np.float32(2)) * np.float32(1 / 127)
  np.testing.assert_array_equal(y[1], want)


# --- R2: the nested offset's sum overflowed float32 (offset inf, every block NaN) --------------


@pytest.mark.parametrize("kind", ["8bit", "nf4"])
def test_double_quant_of_huge_absmax(kind):
  rng = np.random.default_rng(2)
  x = (rng.uniform(0.5, 1, 64 * 70) * 3e38).astype(np.float32)  # sum of absmax >> float32 max
  x[::7] *= -1
  x[64 * 5:64 * 6] = 1.0  # a small block among huge ones
  y, state = _round_trip(jnp.asarray(x), kind, nested=True)
  offset = float(state.offset)
  assert np.isfinite(offset) and 1e38 < offset < F32_MAX
  _assert_within(x, y, kind, state)
  # The stored absmax is off by at most a nested code's gap (~0.8% of the group's largest).
  stored = np.asarray(blockwise.unnest_absmax(state), np.float64)
  true = np.abs(x.astype(np.float64)).reshape(-1, 64).max(1)
  assert np.all(np.abs(stored - true) <= 0.01 * true.max())


def test_nested_offset_is_bnbs_mean_when_the_sum_fits():
  absmax = jnp.asarray(np.random.default_rng(3).uniform(0, 5, 1000), jnp.float32)
  ref = jax.jit(lambda a: jnp.sum(a) * (jnp.float32(1) / jnp.float32(a.size)))(absmax)
  assert float(jax.jit(blockwise._nested_offset)(absmax)) == float(ref)  # torch: sum * (1/n)


# --- R3: fp16/bf16 data near the dtype's max with double quant decoded to inf ------------------


def test_fp16_double_quant_near_65504():
  x = np.zeros(96, np.float16)
  x[[0, 32, 64]] = [10968, 65504, 65504]
  q, state = F.quantize_4bit(jnp.asarray(x), blocksize=32, quant_type="nf4",
                             compress_statistics=True)
  y = np.asarray(F.dequantize_4bit(q, state), np.float32)
  assert np.all(np.isfinite(y)) and y[32] == y[64] == 65504


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["8bit", "nf4", "fp4"])
def test_near_max_16bit_with_double_quant(dtype, kind):
  big = float(jnp.finfo(dtype).max)
  rng = np.random.default_rng(4)
  for _ in range(5):  # (the issue saw 67 of 200 such fp16 tensors decode to inf)
    x = rng.uniform(-1, 1, 64 * 9) * big
    x[rng.integers(0, x.size, 5)] = big
    x = jnp.asarray(x, dtype)
    y, state = _round_trip(x, kind, nested=True)
    _assert_within(x, y, kind, state)


def test_finite_limit():
  assert blockwise.finite_limit(np.dtype(np.float16)) == np.nextafter(np.float32(65520), 0)
  for dtype in (np.float16, jnp.bfloat16):
    lim = blockwise.finite_limit(np.dtype(dtype))
    assert np.isfinite(np.float32(lim).astype(dtype))
    with np.errstate(over="ignore"):
      assert np.isinf(np.nextafter(np.float32(lim), np.float32(np.inf)).astype(dtype))
  assert blockwise.finite_limit(np.dtype(np.float32)) == np.float32(F32_MAX)


# --- R4: LLM.int8() of a float32 weight with values past 65504 (fp16 copy overflowed) ----------


def test_int8_weight_quant_keeps_values_past_fp16():
  w = np.random.default_rng(5).standard_normal((8, 32)).astype(np.float32)
  cb16, scb16, _ = F.int8_vectorwise_quant(jnp.asarray(w, jnp.float16))
  cb, scb = int8.int8_weight_quant(jnp.asarray(w))
  np.testing.assert_array_equal(np.asarray(cb), np.asarray(cb16))  # bnb's Int8Params bits
  np.testing.assert_array_equal(np.asarray(scb), np.asarray(scb16))
  w[3, 5] = 1e5
  cb, scb = int8.int8_weight_quant(jnp.asarray(w))
  y = np.asarray(F.int8_vectorwise_dequant(cb, scb))
  assert np.all(np.isfinite(y)) and float(scb[3]) == 1e5 and y[3, 5] == pytest.approx(1e5)
  np.testing.assert_array_equal(np.asarray(cb)[[0, 1, 2, 4]], np.asarray(cb16)[[0, 1, 2, 4]])
  cbb, scbb = int8.int8_weight_quant(jnp.asarray(w, jnp.bfloat16))
  assert np.all(np.isfinite(np.asarray(scbb)))


def test_llm_int8_kernel_past_65504_end_to_end():
  w = np.random.default_rng(6).standard_normal((64, 32)).astype(np.float32)
  w[3, 5] = 1e5
  qp = jaxbnb.quantize({"d": {"kernel": jnp.asarray(w)}},
                       jaxbnb.BitsAndBytesConfig(load_in_8bit=True))
  x = jnp.ones((2, 64))
  y = np.asarray(jaxbnb.matmul(x, qp["d"]["kernel"]))
  assert np.all(np.isfinite(y))
  np.testing.assert_allclose(y, np.asarray(x) @ w, rtol=0.02, atol=0.5)


# --- R5: a QuantState that does not fit the codes is refused -----------------------------------


@pytest.fixture(scope="module")
def states():
  x = jnp.asarray(np.random.default_rng(7).standard_normal(256 * 64 + 3), jnp.float32)
  return (F.quantize_4bit(x, blocksize=64, quant_type="nf4"),
          F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True),
          F.quantize_blockwise(x, blocksize=64, nested=True))


def _edits(state):
  r = dataclasses.replace
  yield r(state, blocksize=128), "blocksize 128 need absmax"
  yield r(state, blocksize=100), "blocksize must be one of"
  yield r(state, absmax=state.absmax[:-1]), "need absmax"
  yield r(state, shape=(7, 7)), "need absmax|describes shape"
  if state.quant_type == "dynamic":  # 8-bit: any map of at most 256 values
    yield r(state, code=jnp.zeros(300)), "code table"
  else:
    yield r(state, code=state.code[:8]), "code table"
  if state.nested:
    yield r(state, state2=r(state.state2, absmax=state.state2.absmax[:-1])), "nested absmax"
    yield r(state, state2=r(state.state2, blocksize=2 * state.state2.blocksize)), "nested absmax"
    yield r(state, offset=jnp.zeros(2)), "offset"
    yield r(state, absmax=state.absmax.astype(jnp.float32)), "need absmax uint8"


def test_mismatched_states_are_refused(states):
  (q4, s4), (q4n, s4n), (q8, s8) = states
  for q, s, deq in [(q4, s4, F.dequantize_4bit), (q4n, s4n, F.dequantize_4bit),
                    (q8, s8, F.dequantize_blockwise)]:
    for bad, message in _edits(s):
      with pytest.raises(ValueError, match=message):
        deq(q, bad)
  with pytest.raises(ValueError, match="4-bit state: use dequantize_4bit"):
    F.dequantize_blockwise(q8, s4)
  with pytest.raises(ValueError, match="8-bit state: use dequantize_blockwise"):
    F.dequantize_4bit(q4, s8)
  with pytest.raises(ValueError, match="needs .* bytes of codes"):
    F.dequantize_4bit(q4[:-1], s4)  # truncated codes
  with pytest.raises(ValueError, match="needs .* bytes of codes"):
    F.dequantize_4bit(jnp.concatenate([q4, q4]), s4)  # another array's (larger) codes
  with pytest.raises(ValueError, match="row_absmax"):
    F.int8_vectorwise_dequant(jnp.ones((4, 3), jnp.int8), jnp.ones(3))


def test_matching_states_still_work_under_jit(states):
  (q4, s4), (q4n, s4n), (q8, s8) = states
  for q, s, deq in [(q4, s4, F.dequantize_4bit), (q4n, s4n, F.dequantize_4bit),
                    (q8, s8, F.dequantize_blockwise)]:
    np.testing.assert_array_equal(np.asarray(jax.jit(deq)(q, s)), np.asarray(deq(q, s)))


# --- minor: empty columns, int4 storage ----------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 0), (0, 4), (0,), (2, 3, 0)])
def test_int8_empty_shapes(shape):
  x = jnp.zeros(shape, jnp.float16)
  q, absmax, cols = F.int8_vectorwise_quant(x, threshold=6.0)
  rows = int(np.prod(shape[:-1]))
  assert q.shape == shape and q.dtype == jnp.int8
  assert absmax.shape == (rows,) and cols.shape == (shape[-1],)
  assert F.int8_vectorwise_dequant(q, absmax).shape == shape


@pytest.mark.parametrize("storage", [jnp.int4, jnp.uint4, jnp.bool_, jnp.complex64])
def test_sub_byte_quant_storage_refused(storage):
  with pytest.raises(ValueError, match="whole-byte"):
    F.quantize_4bit(jnp.ones(64), quant_storage=storage)


@pytest.mark.parametrize("storage", [jnp.uint8, jnp.int8, jnp.bfloat16, jnp.float32])
def test_whole_byte_quant_storage_round_trips(storage):
  x = jnp.linspace(-1, 1, 130)
  q, state = F.quantize_4bit(x, quant_type="nf4", quant_storage=storage)
  assert q.dtype == storage
  _assert_within(x, F.dequantize_4bit(q, state), "nf4", state)


# --- interop: nested offset, shard paths, target dtypes ------------------------------------------


@pytest.mark.parametrize("offset", [float("nan"), float("inf"), -float("inf"), 1e39, -1e39])
def test_non_finite_nested_offset_refused(offset):
  blob = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [4, 64],
          "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": offset}
  raw = np.frombuffer(json.dumps(blob).encode(), np.uint8).copy()  # NaN/Infinity: Python JSON
  with pytest.raises(ValueError, match="finite float32"):
    interop.parse_quant_state(raw, "k")


@pytest.mark.parametrize("where", ["absolute", "parent", "inner parent"])
def test_index_entries_outside_the_folder_refused(tmp_path, where):
  model = tmp_path / "model"
  model.mkdir()
  outside = tmp_path / "secret.safetensors"
  save_file({"w": np.ones(3, np.float32)}, str(outside))
  save_file({"b": np.ones(2, np.float32)}, str(model / "model-1.safetensors"))
  file = {"absolute": str(outside), "parent": "../secret.safetensors",
          "inner parent": "sub/../../secret.safetensors"}[where]
  (model / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"w": file, "b": "model-1.safetensors"}}))
  with pytest.raises(ValueError, match="relative to the index's folder"):
    interop.load_bnb_state_dict(model)
  with pytest.raises(ValueError, match="relative to the index's folder"):
    L.load_quantized(model, None, progress=False)


def test_index_in_a_subfolder_still_loads(tmp_path):
  (tmp_path / "shards").mkdir()
  save_file({"w": np.ones(3, np.float32)}, str(tmp_path / "shards" / "a.safetensors"))
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"w": "shards/a.safetensors"}}))
  np.testing.assert_array_equal(np.asarray(interop.load_bnb_state_dict(tmp_path)["w"]), 1)


@pytest.mark.parametrize("src, dst, ok", [
    (np.int64, np.float32, False), (np.bool_, np.float32, False), (np.float32, np.int32, False),
    (np.int32, np.int8, False), (np.int8, np.int32, True), (np.bool_, np.int8, True),
    (np.float16, np.float32, True)])
def test_load_quantized_target_dtypes(tmp_path, src, dst, ok):
  path = tmp_path / "model.safetensors"
  save_file({"t": np.ones((2, 3), src)}, str(path))
  target = {"t": jax.ShapeDtypeStruct((2, 3), dst)}
  if not ok:
    with pytest.raises(ValueError, match="cannot fill"):
      L.load_quantized(path, None, target=target, progress=False)
    return
  out = L.load_quantized(path, None, target=target, progress=False)
  assert out["t"].dtype == dst
  np.testing.assert_array_equal(np.asarray(out["t"]), 1)


# --- finite in, finite out: every primitive over the whole float range --------------------------


@st.composite
def extreme_arrays(draw):
  """(x, dtype): a few sizes, magnitudes at either end of the dtype's finite range (its max
  included; down to its smallest normal), with all-zero stretches."""
  dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]))
  n = draw(st.sampled_from([1, 7, 64, 65, 200, 300]))  # few shapes: few compilations
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  info = jnp.finfo(dtype)
  big, span = float(info.max), draw(st.sampled_from([1, 8, 60]))
  if draw(st.booleans()):  # the top of the range
    exps = rng.uniform(np.log2(big) - span, np.log2(big), n)
  else:  # the bottom (normal numbers only: XLA flushes float32 subnormals)
    exps = rng.uniform(np.log2(float(info.tiny)), np.log2(float(info.tiny)) + span, n)
  x = np.sign(rng.standard_normal(n)) * np.minimum(2.0 ** exps, big)
  if draw(st.booleans()):
    x[rng.integers(0, n, 3)] = big * np.sign(rng.standard_normal(3))
  if draw(st.booleans()):
    x[draw(st.integers(0, n - 1)):][: draw(st.integers(1, 64))] = 0
  return jnp.asarray(x, dtype), dtype


@pytest.mark.slow  # ~30 s: one compilation per (size, dtype, format)
@given(extreme_arrays(), st.sampled_from(["8bit", "nf4", "fp4"]), st.booleans())
def test_extreme_values_stay_finite_and_within_bound(xd, kind, nested):
  x, _ = xd
  y, state = _round_trip(x, kind, nested=nested)
  assert y.dtype == x.dtype
  _assert_within(x, y, kind, state)
  if x.ndim == 1:
    q, absmax, _ = F.int8_vectorwise_quant(x[None, :])
    y8 = np.asarray(F.int8_vectorwise_dequant(q, absmax), np.float64)[0]
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    assert np.all(np.isfinite(y8))
    bound = np.abs(x64).max() / 127 * 0.5 * (1 + 1e-5) + _FLUSH[np.dtype(np.float32)]
    assert np.all(np.abs(y8 - x64) <= bound)
