"""The correctly rounded float32 reciprocal that every quantizer normalizes with off CPU.

XLA:GPU's fused f32 division is not correctly rounded (1-ulp reciprocals flipped FP4 codes on an
H100, 2026-11-27), so :func:`blockwise.reciprocal` takes :func:`blockwise._recip_rn`, integer
arithmetic on the bits, on every platform but CPU. No GPU here: the integer path is checked
bit for bit on CPU, and the CUDA lowering is checked to take it.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxbnb import functional as F
from jaxbnb.functional import blockwise

_recip_rn = jax.jit(blockwise._recip_rn)
_xla_recip = jax.jit(lambda a: jnp.float32(1) / a)  # XLA:CPU's division: IEEE, subnormals flushed
_TINY = np.float32(np.finfo(np.float32).tiny)


def _bits(a) -> np.ndarray:
  return np.asarray(a, np.float32).view(np.uint32)


def _ieee_recip(a: np.ndarray) -> np.ndarray:
  with np.errstate(over="ignore", divide="ignore"):
    return np.float32(1) / a


def _assert_exact_where_normal(a: np.ndarray):
  """``_recip_rn(a)``: numpy's IEEE ``1 / a`` where that is normal, else XLA:CPU's ``1 / a``."""
  got, want, fallback = _bits(_recip_rn(a)), _bits(_ieee_recip(a)), _bits(_xla_recip(a))
  normal = (np.abs(a) >= _TINY) & np.isfinite(a) & (np.abs(_ieee_recip(a)) >= _TINY)
  np.testing.assert_array_equal(got[normal], want[normal])
  np.testing.assert_array_equal(got[~normal], fallback[~normal])


@pytest.mark.parametrize("e", [1, 2, 100, 127, 150, 200, 252, 253])
def test_every_mantissa(e):
  # All 2**23 mantissas at biased exponent e, both signs; e = 253 is past 2**126, where only
  # the power of two has a normal reciprocal (the rest falls back).
  mant = np.arange(1 << 23, dtype=np.uint32)
  for sign in (0, 1):
    a = ((np.uint32(sign) << 31) | (np.uint32(e) << 23) | mant).view(np.float32)
    _assert_exact_where_normal(a)
  if e == 253:
    assert _bits(_recip_rn(np.float32(2.0**126))) == _bits(np.float32(2.0**-126))


@given(hnp.arrays(np.uint32, 512, elements=st.integers(0, 2**32 - 1)))
def test_any_bit_pattern(bits):
  _assert_exact_where_normal(bits.view(np.float32))


@given(hnp.arrays(np.float32, 512, elements=st.floats(float(_TINY), 2.0**126, width=32)))
def test_normal_range(a):
  np.testing.assert_array_equal(_bits(_recip_rn(a)), _bits(_ieee_recip(a)))


def test_edge_values():
  f32 = np.float32
  big = f32(2.0**126)
  edges = np.array([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 3.0, _TINY, np.nextafter(_TINY, f32(1)),
                    f32(1e-45), f32(1e-40), np.nextafter(_TINY, f32(0)), np.nextafter(big, f32(0)),
                    big, np.nextafter(big, f32(np.inf)), f32(2.0**127), np.finfo(f32).max,
                    np.inf, -np.inf, np.nan, -np.nan], f32)
  edges = np.concatenate([edges, -edges])
  _assert_exact_where_normal(edges)
  np.testing.assert_array_equal(np.asarray(_recip_rn(edges)), np.asarray(_xla_recip(edges)))
  assert _recip_rn(edges).shape == edges.shape and _recip_rn(f32(4.0)).shape == ()
  assert _recip_rn(edges.reshape(2, 3, 7)).shape == (2, 3, 7)


def _old_reciprocal(absmax):
  """blockwise.reciprocal before the platform split (its plain float division)."""
  huge = absmax > blockwise._HUGE
  safe = jnp.where(absmax == 0, jnp.float32(1), absmax)
  rcp = jnp.float32(1) / jnp.where(huge, safe * blockwise._RESCALE, safe)
  return rcp, jnp.where(huge, blockwise._RESCALE, jnp.float32(1))


def test_cpu_reciprocal_unchanged():
  rng = np.random.default_rng(0)
  absmax = (np.float32(2.0) ** rng.integers(-149, 128, 65536)).astype(np.float32)
  absmax *= rng.uniform(1, 2, absmax.size).astype(np.float32)
  absmax[:8] = [0, np.nan, np.inf, 2.0**126, 2.0**127, np.finfo(np.float32).max, 1e-45, 1]
  for got, want in zip(jax.jit(blockwise.reciprocal)(absmax), jax.jit(_old_reciprocal)(absmax)):
    np.testing.assert_array_equal(_bits(got), _bits(want))


_UINT_DIV = re.compile(r"stablehlo\.divide .*: tensor<[^>]*ui32>")
_F32_DIV = re.compile(r"stablehlo\.divide .*: tensor<[^>]*f32>")


def _lower(fn, spec, platform):
  return jax.jit(fn).trace(spec).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("fn", [
    blockwise.reciprocal,
    lambda x: F.quantize_4bit(x, blocksize=64, quant_type="fp4"),
    lambda x: F.quantize_blockwise(x, blocksize=256),
    lambda x: F.int8_vectorwise_quant(x.astype(jnp.float16)),
], ids=["reciprocal", "quantize_4bit", "quantize_blockwise", "int8_vectorwise_quant"])
def test_cuda_lowering_takes_the_integer_path(fn):
  spec = jax.ShapeDtypeStruct((64, 256), jnp.float32)
  if fn is blockwise.reciprocal:
    spec = jax.ShapeDtypeStruct((256,), jnp.float32)
  cuda, cpu = _lower(fn, spec, "cuda"), _lower(fn, spec, "cpu")
  assert _UINT_DIV.search(cuda), "no uint32 division in the CUDA lowering"
  assert not _UINT_DIV.search(cpu) and _F32_DIV.search(cpu)
