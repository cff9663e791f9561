"""Error limits from bitsandbytes' own test suite (1024x1024 randn) and the bits per parameter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb import functional as F

# bnb 0.50.2 tests/test_functional.py::test_4bit_quant: mean abs and relative error of a
# 1024x1024 randn (averages of 1k samples; the test allows +1e-3). The Foundation issue asks
# for the stricter NF4 < 0.0733 and FP4 < 0.0973 at blocksize 64.
BNB_ERR = {
    "fp4": {64: 0.096545, 128: 0.102947, 256: 0.108685, 512: 0.114087, 1024: 0.119312,
            2048: 0.124460, 4096: 0.129573},
    "nf4": {64: 0.072792, 128: 0.076835, 256: 0.080326, 512: 0.083535, 1024: 0.086603,
            2048: 0.089592, 4096: 0.092537},
}
BNB_REL_ERR = {
    "fp4": {64: 0.260130, 128: 0.275734, 256: 0.289842, 512: 0.302852, 1024: 0.314982,
            2048: 0.326402, 4096: 0.337228},
    "nf4": {64: 0.203299, 128: 0.215252, 256: 0.226044, 512: 0.236021, 1024: 0.245365,
            2048: 0.254146, 4096: 0.262457},
}
ISSUE_ERR = {("nf4", 64): 0.0733, ("fp4", 64): 0.0973}


@pytest.fixture(scope="module")
def randn():
  return jax.random.normal(jax.random.key(0), (1024, 1024), jnp.float32)


@pytest.mark.parametrize("blocksize", F.BLOCKSIZES_8BIT)
def test_blockwise8_error(randn, blocksize):
  y = F.dequantize_blockwise(*F.quantize_blockwise(randn, blocksize=blocksize))
  diff = jnp.abs(randn - y)
  assert float(diff.mean()) < 0.011
  assert float((diff / jnp.abs(randn + 1e-8)).mean()) < 0.018


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", F.BLOCKSIZES_8BIT)
def test_4bit_error(randn, dtype, quant_type, blocksize):
  a1 = randn.astype(dtype)
  a2 = F.dequantize_4bit(*F.quantize_4bit(a1, blocksize=blocksize, quant_type=quant_type))
  assert a2.dtype == dtype
  err = jnp.abs(a1.astype(jnp.float32) - a2.astype(jnp.float32))
  relerr = float((err / (jnp.abs(a1.astype(jnp.float32)) + 1e-8)).mean())
  limit = min(BNB_ERR[quant_type][blocksize] + 1e-3,
              ISSUE_ERR.get((quant_type, blocksize), 1.0))
  assert float(err.mean()) < limit
  assert relerr < BNB_REL_ERR[quant_type][blocksize] + 1e-3


def test_nf4_beats_fp4_on_normal_data(randn):
  err = {t: float(jnp.abs(randn - F.dequantize_4bit(*F.quantize_4bit(randn, quant_type=t))).mean())
         for t in ("nf4", "fp4")}
  assert err["nf4"] < err["fp4"]


@pytest.mark.parametrize("dq,expected", [(False, 4.5), (True, 4.127)])
def test_bits_per_parameter(dq, expected):
  """QLoRA's 4.127 bits/param for NF4 + double quant at blocksize 64 (4.5 without), counted
  from the arrays actually stored: packed codes, absmax (codes), second-level absmax, offset."""
  n = 64 * 256 * 256  # 4M parameters
  x = jax.random.normal(jax.random.key(1), (n // 4096, 4096), jnp.bfloat16)
  q, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=dq)
  stored = q.nbytes + state.absmax.nbytes
  if dq:
    assert state.absmax.dtype == jnp.uint8 and state.state2.absmax.shape == (n // 64 // 256,)
    stored += state.state2.absmax.nbytes + state.offset.nbytes
  bits = stored * 8 / n
  assert round(bits, 3) == expected, bits
