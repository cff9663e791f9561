"""Bad input gets an error that names the fix; NaN/Inf damage stays inside its block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbnb
from jaxbnb import functional as F


@pytest.mark.parametrize("blocksize", [0, 16, 100, 8192, 64.0, True])
def test_bad_blocksize_lists_allowed(blocksize):
  x = jnp.ones(256)
  with pytest.raises(ValueError, match="64, 128, 256, 512, 1024, 2048, 4096"):
    F.quantize_blockwise(x, blocksize=blocksize)
  with pytest.raises(ValueError, match="32, 64, 128"):
    F.quantize_4bit(x, blocksize=blocksize)


def test_8bit_rejects_blocksize_32():
  with pytest.raises(ValueError, match="one of 64"):
    F.quantize_blockwise(jnp.ones(64), blocksize=32)


@pytest.mark.parametrize("x", [jnp.arange(64, dtype=jnp.int32), jnp.ones(64, jnp.uint8),
                               jnp.ones(64, jnp.bool_)])
def test_integer_input_is_type_error(x):
  for fn in (F.quantize_blockwise, F.quantize_4bit, F.int8_vectorwise_quant):
    with pytest.raises(TypeError, match="astype"):
      fn(x)


def test_complex_input_is_type_error():
  with pytest.raises(TypeError, match="complex"):
    F.quantize_4bit(jnp.ones(64, jnp.complex64))


def test_unknown_quant_type():
  with pytest.raises(ValueError, match="'nf4', 'fp4'"):
    F.quantize_4bit(jnp.ones(64), quant_type="int4")
  with pytest.raises(ValueError, match="nf4"):
    F.get_4bit_type("af4")


def test_empty_input():
  with pytest.raises(ValueError, match="empty"):
    F.quantize_4bit(jnp.ones((0, 3)))


def test_dequantize_checks_state():
  q, state = F.quantize_4bit(jnp.ones(128), blocksize=64)
  with pytest.raises(TypeError, match="QuantState"):
    F.dequantize_4bit(q, None)
  q8, s8 = F.quantize_blockwise(jnp.ones(256), blocksize=64)
  with pytest.raises(ValueError, match="absmax"):
    F.dequantize_blockwise(q8[:128], s8)
  with pytest.raises(TypeError, match="uint8"):
    F.dequantize_blockwise(q8.astype(jnp.int32), s8)
  with pytest.raises(TypeError, match="int8"):
    F.int8_vectorwise_dequant(jnp.ones((2, 2), jnp.float32), jnp.ones(2))


def _with_bad_block(bad, blocksize, nblocks=6, which=2):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(nblocks * blocksize - 5).astype(np.float32)  # partial last block
  x_bad = x.copy()
  x_bad[which * blocksize + 3] = bad
  clean = x.copy()
  clean[which * blocksize:(which + 1) * blocksize] = 0
  return jnp.asarray(x_bad), jnp.asarray(clean), slice(which * blocksize, (which + 1) * blocksize)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kind", ["8bit", "nf4", "fp4"])
def test_nonfinite_stays_in_its_block(bad, kind):
  bs = 64
  x_bad, clean, blk = _with_bad_block(bad, bs)
  if kind == "8bit":
    run = lambda v: F.dequantize_blockwise(*F.quantize_blockwise(v, blocksize=bs))
  else:
    run = lambda v: F.dequantize_4bit(*F.quantize_4bit(v, blocksize=bs, quant_type=kind))
  y, y_clean = np.asarray(run(x_bad)), np.asarray(run(clean))
  assert np.all(np.isnan(y[blk]))  # the whole damaged block is NaN: nothing silently finite
  outside = np.ones(y.size, bool)
  outside[blk] = False
  np.testing.assert_array_equal(y[outside], y_clean[outside])  # every other block is exact


@pytest.mark.parametrize("kind", ["8bit", "nf4"])
def test_nonfinite_with_nested_stats_stays_in_its_group(kind):
  # Nested absmax: the NaN poisons its second-level block (256 first-level blocks for 4-bit,
  # `blocksize` for 8-bit); the offset is the mean of finite absmax values, so other groups
  # dequantize finitely, within their usual bound.
  bs = 64
  group = 256 if kind == "nf4" else bs
  nblocks = 2 * group + 3
  x_bad, _, _ = _with_bad_block(np.nan, bs, nblocks=nblocks, which=5)
  if kind == "8bit":
    q, st = F.quantize_blockwise(x_bad, blocksize=bs, nested=True)
    y = np.asarray(F.dequantize_blockwise(q, st))
  else:
    q, st = F.quantize_4bit(x_bad, blocksize=bs, quant_type="nf4", compress_statistics=True)
    y = np.asarray(F.dequantize_4bit(q, st))
  assert np.isfinite(float(st.offset))
  first = slice(0, group * bs)
  assert np.all(np.isnan(y[first][5 * bs:6 * bs]))
  rest = y[group * bs:]
  assert np.all(np.isfinite(rest))
  np.testing.assert_allclose(rest, np.asarray(x_bad)[group * bs:], atol=0.6)


def test_int8_nan_row_only():
  x = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
  x[2, 5] = np.nan
  q, absmax, cols = F.int8_vectorwise_quant(jnp.asarray(x), threshold=6.0)
  y = np.asarray(F.int8_vectorwise_dequant(q, absmax))
  assert np.all(np.isnan(y[2])) and np.all(np.isfinite(y[[0, 1, 3]]))
  assert np.all(np.asarray(q)[2] == 0)
  # An Inf is an outlier (|inf| >= threshold): its column goes to 16-bit, the rows stay finite.
  x[2, 5] = np.inf
  q, absmax, cols = F.int8_vectorwise_quant(jnp.asarray(x), threshold=6.0)
  assert bool(cols[5]) and np.all(np.isfinite(np.asarray(absmax)))


def test_everything_jits_and_is_a_pytree():
  @jax.jit
  def round_trip(x):
    q, st = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    q8, st8 = F.quantize_blockwise(x, blocksize=256, nested=True)
    qi, ai, _ = F.int8_vectorwise_quant(x, threshold=3.0)
    return F.dequantize_4bit(q, st), F.dequantize_blockwise(q8, st8), F.int8_vectorwise_dequant(qi, ai)

  x = jnp.asarray(np.random.default_rng(2).standard_normal((33, 77)), jnp.bfloat16)
  a, b, c = round_trip(x)
  assert a.dtype == b.dtype == jnp.bfloat16 and c.dtype == jnp.float32
  _, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
  leaves, treedef = jax.tree.flatten(state)
  assert all(isinstance(leaf, jax.Array) for leaf in leaves)
  back = jax.tree.unflatten(treedef, leaves)
  assert (back.blocksize, back.quant_type, back.shape, back.dtype) == (64, "nf4", (33, 77),
                                                                        np.dtype(jnp.bfloat16))
  assert back.nested and back.state2.blocksize == 256 and back.state2.shape == (40,)
  assert back.absmax.shape == (40,) and back.state2.absmax.shape == (1,)


def test_threshold_can_be_traced():
  x = jnp.asarray(np.random.default_rng(3).standard_normal((8, 16)) * 3, jnp.float16)
  f = jax.jit(lambda x, t: F.int8_vectorwise_quant(x, t)[2])
  assert int(f(x, 1.0).sum()) > int(f(x, 8.0).sum())


@pytest.mark.parametrize("kw, match", [
    (dict(load_in_4bit="yes"), "load_in_4bit must be True or False"),
    (dict(load_in_4bit=True, bnb_4bit_use_double_quant=1), "use_double_quant must be True"),
    (dict(load_in_8bit=True, llm_int8_threshold=float("nan")), "finite number"),
    (dict(load_in_8bit=True, llm_int8_threshold=True), "finite number"),
    (dict(load_in_4bit=True, bnb_4bit_quant_storage=jnp.int4), "whole-byte"),
    (dict(load_in_4bit=True, bnb_4bit_quant_storage=bool), "whole-byte"),
    (dict(load_in_4bit=True, bnb_4bit_quant_storage=jnp.complex64), "whole-byte"),
])
def test_config_refuses_values_that_would_be_misread(kw, match):
  with pytest.raises(ValueError, match=match):
    jaxbnb.BitsAndBytesConfig(**kw)


def test_config_accepts_numpy_scalars():
  cfg = jaxbnb.BitsAndBytesConfig(load_in_8bit=np.bool_(True), llm_int8_threshold=np.float32(6))
  assert cfg.load_in_8bit is True and cfg.llm_int8_threshold == 6.0
  assert type(cfg.llm_int8_threshold) is float
