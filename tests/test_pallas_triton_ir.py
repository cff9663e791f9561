"""The Triton IR the Pallas kernels lower to on CPU (no GPU needed), checked for what interpret
mode cannot show: masked block accesses on ragged tiles (Triton does not bound-check, interpret
mode pads), exactly rounded division/sqrt/abs (no approximate ``arith.divf``, no libdevice call
whose rounding or flush-to-zero the GPU compiler picks), ``tl.dot`` operand sizes, and a
register budget per thread at the benchmark shapes."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import common
from pallas_kernels import dequant_4bit as dq
from pallas_kernels import gemm_4bit as gm
from pallas_kernels import gemv_4bit as gv
from pallas_kernels import int8_matmul as im
from pallas_kernels import optim_8bit as K
from pallas_kernels import quant_4bit as qk
from tests import helpers

s = jax.ShapeDtypeStruct


def triton_ir(fn, *specs) -> list[tuple[str, int]]:
  """``(Triton IR text, num_warps)`` of every ``pallas_call`` in ``fn``, lowered for an H100."""
  try:
    from jax._src.pallas.triton import pallas_call_registration as reg
  except ImportError:  # pragma: no cover - a jax without the Triton backend module
    pytest.skip("jax._src.pallas.triton not importable")
  texts = []
  orig = reg.lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = orig(*args, **kwargs)
    texts.append(result.module.operation.get_asm())
    return result

  reg.lowering.lower_jaxpr_to_triton_module = capture
  jax.clear_caches()  # a cached lowering would not call the Triton lowering again
  try:
    hlo = helpers.lower_for_h100(fn, *specs)
  finally:
    reg.lowering.lower_jaxpr_to_triton_module = orig
  # The custom calls' order in the HLO text is not the lowering order: match them by name.
  warps = dict(re.findall(r'name = "(\w+)", num_stages = \d+ : i32, num_warps = (\d+)', hlo))
  out = [(t, int(warps[re.search(r"module @(\w+)", t).group(1)])) for t in texts]
  assert out, "no pallas_call lowered"
  return out


def _accesses(text, op):
  """``(operand count, tensor shape or None)`` of each ``tt.load``/``tt.store``."""
  out = []
  for m in re.finditer(rf"tt\.{op} ([^:\n]*): (tensor<([0-9x]+)x!tt\.ptr|!tt\.ptr)", text):
    out.append((m.group(1).count("%"), m.group(3)))
  return out


def _masked(text, op):
  need = 2 if op == "load" else 3  # load ptr, mask[, other]; store ptr, value, mask
  acc = _accesses(text, op)
  return sum(n >= need for n, _ in acc), len(acc)


def _numel(shape: str) -> int:
  n = 1
  for d in shape.split("x"):
    n *= int(d)
  return n


def _nested_spec(nb):
  return (s((nb,), jnp.uint8), s((-(-nb // 256),), jnp.float32), s((), jnp.float32),
          s((256,), jnp.float32))


def _nest(c, a2, o, code):
  return common.NestedAbsmax(c, a2, o, code)


# Ragged shapes: the last program's tile overhangs every blocked operand.
RAGGED = {
    "dequant": (lambda b, *na: dq.dequantize_4bit(b, _nest(*na), n=96 * 200, blocksize=64,
                                                  quant_type="fp4", tile_bytes=4096),
                s((96 * 100,), jnp.uint8), *_nested_spec(300)),
    "quant": (lambda x: qk.quantize_4bit(x, blocksize=64, quant_type="nf4", tile_elems=2048),
              s((33, 65), jnp.bfloat16)),
    "gemv": (lambda x, b, *na: gv.gemv_4bit(x, b, _nest(*na), n_out=200, blocksize=64,
                                            quant_type="nf4"),
             s((3, 512), jnp.float16), s((200 * 256,), jnp.uint8), *_nested_spec(1600)),
    "gemm": (lambda x, b, *na: gm.gemm_4bit(x, b, _nest(*na), n_out=200, blocksize=64,
                                            quant_type="nf4"),
             s((40, 320), jnp.bfloat16), s((200 * 160,), jnp.uint8), *_nested_spec(1000)),
    "int8": (lambda x, cb, scb, bias: im.int8_linear(x, cb, scb, bias, threshold=6.0),
             s((37, 96), jnp.float16), s((45, 96), jnp.int8), s((45,), jnp.float32),
             s((45,), jnp.float16)),
    "int8_gemv": (lambda x, cb, scb: im.int8_linear(x, cb, scb, threshold=6.0),
                  s((3, 96), jnp.bfloat16), s((45, 96), jnp.int8), s((45,), jnp.float32)),
}


def _optim_fn(kind, n, bs, with_param, dtype=jnp.float32):
  nm, nb = K.NUM_MOMENTS[kind], -(-n // bs)

  def fn(g, scalars, *flat):
    p, flat = (flat[0], flat[1:]) if with_param else (None, flat)
    moments = [(flat[2 * j], flat[2 * j + 1]) for j in range(nm)]
    return K.update_8bit(g, moments, [jnp.linspace(-1.0, 1.0, 256)] * nm, scalars, p,
                         kind=kind, block_size=bs)

  specs = [s((n,), dtype), s((K.SCALAR_SLOTS,), jnp.float32)]
  specs += [s((n,), dtype)] if with_param else []
  specs += [s((n,), jnp.uint8), s((nb,), jnp.float32)] * nm
  return (fn, *specs)


RAGGED["optim"] = _optim_fn("adam", 256 * 9 + 5, 256, True, jnp.bfloat16)  # 10 blocks, TB 8


@pytest.mark.parametrize("name", sorted(RAGGED))
def test_ragged_tiles_mask_every_store(name):
  """Every store of a kernel whose last tile overhangs its arrays is masked (the optimizer
  kernel's were not: on a GPU it wrote past its in-place state buffers)."""
  fn, *specs = RAGGED[name]
  for text, _ in triton_ir(fn, *specs):
    masked, total = _masked(text, "store")
    # int8 quant writes its (1, KP) partial outlier mask into an exactly fitting row.
    exact = 1 if "int8" in name and re.search(r"tt\.store [^\n]*tensor<(1x)?128x!tt\.ptr<i8>",
                                               text) else 0
    assert total > 0 and masked == total - exact, (name, masked, total, text[-3000:])
    loads_masked, _ = _masked(text, "load")
    assert loads_masked >= 1, name


@pytest.mark.parametrize("name", sorted(RAGGED))
def test_float_ops_exactly_rounded(name):
  """No approximate float32 division (Triton lowers ``arith.divf`` to ``div.full.f32``, up to
  2 ulp), no libdevice abs/sqrt (flush-to-zero follows a compiler flag): the kernels use PTX
  ``div.rn``/``sqrt.rn``/``mul.rn`` and a sign-bit mask, bit-identical to XLA."""
  fn, *specs = RAGGED[name]
  for text, _ in triton_ir(fn, *specs):
    assert "arith.divf" not in text, name
    assert "__nv_fabsf" not in text and "__nv_sqrtf" not in text, name
    assert "math.absf" not in text and "math.sqrt" not in text, name
    if name == "dequant":  # FP4: Pallas lowers ``-x`` to ``0 - x`` (+0.0 for code 8, not -0.0)
      assert "arith.subf" not in text


def _dots(text):
  rx = r"tt\.dot [^\n]*: tensor<(\d+)x(\d+)x(\w+)> \* tensor<(\d+)x(\d+)x\w+> -> tensor<[^>]*>"
  return [(int(a), int(b), t, int(d)) for a, b, t, _, d in re.findall(rx, text)]


# Benchmark shapes (experiments/bench_4bit.py, bench_int8.py, bench_optim.py). The largest value
# tensor may hold 64 elements a thread: several such tensors are live at once (codes, decoded
# values, a row kept for its absmax, a carried mask, an accumulator) in a thread's 255 registers.
PER_THREAD = 64
BENCH = {
    "gemv m16 8192x8192": (lambda x, b, a: gv.gemv_4bit(x, b, a, n_out=8192, blocksize=64,
                                                          quant_type="nf4"),
                           s((16, 8192), jnp.bfloat16), s((8192 * 4096,), jnp.uint8),
                           s((8192 * 128,), jnp.float32)),
    "gemv m1 4096x14336": (lambda x, b, *na: gv.gemv_4bit(x, b, _nest(*na), n_out=4096,
                                                           blocksize=64, quant_type="nf4"),
                           s((1, 14336), jnp.bfloat16), s((4096 * 7168,), jnp.uint8),
                           *_nested_spec(4096 * 224)),
    "gemm m64 14336x4096": (lambda x, b, a: gm.gemm_4bit(x, b, a, n_out=14336, blocksize=64,
                                                           quant_type="nf4"),
                            s((64, 4096), jnp.bfloat16), s((14336 * 2048,), jnp.uint8),
                            s((14336 * 64,), jnp.float32)),
    "gemm m512 8192x8192": (lambda x, b, a: gm.gemm_4bit(x, b, a, n_out=8192, blocksize=64,
                                                           quant_type="nf4"),
                            s((512, 8192), jnp.bfloat16), s((8192 * 4096,), jnp.uint8),
                            s((8192 * 128,), jnp.float32)),
    "gemm m4096 f32": (lambda x, b, a: gm.gemm_4bit(x, b, a, n_out=4096, blocksize=64,
                                                      quant_type="nf4"),
                       s((4096, 4096), jnp.float32), s((4096 * 2048,), jnp.uint8),
                       s((4096 * 64,), jnp.float32)),
    "dequant 8192x8192": (lambda b, a: dq.dequantize_4bit(b, a, n=8192 * 8192, blocksize=64,
                                                          quant_type="nf4",
                                                          out_dtype=jnp.bfloat16),
                          s((8192 * 4096,), jnp.uint8), s((8192 * 128,), jnp.float32)),
    "quant 8192x8192": (lambda x: qk.quantize_4bit(x, blocksize=64, quant_type="nf4"),
                        s((8192, 8192), jnp.bfloat16)),
    "int8 m1 4096x14336": (lambda x, cb, scb: im.int8_linear(x, cb, scb, threshold=6.0),
                           s((1, 14336), jnp.float16), s((4096, 14336), jnp.int8),
                           s((4096,), jnp.float32)),
    "int8 m4096 14336x4096": (lambda x, cb, scb: im.int8_linear(x, cb, scb, threshold=6.0),
                              s((4096, 4096), jnp.float16), s((14336, 4096), jnp.int8),
                              s((14336,), jnp.float32)),
    "optim 8192x8192": _optim_fn("adam", 8192 * 8192, 256, True),
}


@pytest.mark.parametrize("name", sorted(BENCH))
def test_benchmark_shapes_dots_and_register_budget(name):
  """At the benchmark shapes: ``tl.dot`` operands of at least 16 (int8: K a multiple of 32),
  and no value tensor above :data:`PER_THREAD` elements a thread (a thread has 255 registers; the
  first tile tables had decoded 4-bit tiles of 128 a thread live next to their float32
  accumulators, 2 x 128 in the 16-row GEMV, and a 16384-wide int8-quant row at 4 warps)."""
  fn, *specs = BENCH[name]
  for text, warps in triton_ir(fn, *specs):
    for m, k, t, n in _dots(text):
      assert min(m, k, n) >= 16, (name, m, k, n)
      if t == "i8":
        assert k % 32 == 0, (name, k)
    sizes = [_numel(d) for d in re.findall(r"tensor<([0-9x]+)x(?:f32|i32|f16|bf16|i8|i1)>",
                                           text)]
    per_thread = max(sizes) / (32 * warps)
    assert per_thread <= PER_THREAD, (name, max(sizes), warps)
    if "gem" in name:
      assert "scf.for" in text, name  # the K loop stays a loop (not unrolled)
