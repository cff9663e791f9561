"""Matmuls on quantized weights, with autodiff w.r.t. the float operand.

Every op is a ``jax.custom_vjp`` whose backward pass re-dequantizes the weight instead of
saving a float copy (QLoRA's memory rests on this). The weight itself gets no gradient: it is
frozen, packed data.

``backend``: ``"xla"`` (this module, runs everywhere), ``"pallas"`` (the Pallas kernels where
one covers the problem; on a non-GPU backend they run in interpret mode, for tests) or ``"auto"``
(XLA for now; Pallas on GPU once the kernels are measured there). A problem no kernel covers (shape,
dtype, quant type) always takes the XLA path: ``backend`` picks speed, never the answer.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxbnb import _backend, _explicit
from jaxbnb.functional import fourbit as _fourbit
from jaxbnb.functional import int8 as _int8
from jaxbnb.functional.blockwise import unnest_absmax
from jaxbnb.qtensor import Quantized4bit, Quantized8bit, QuantizedArray
from pallas_kernels import common as _pallas_common
from pallas_kernels import gemm_4bit as _pallas_gemm
from pallas_kernels import gemv_4bit as _pallas_gemv
from pallas_kernels import int8_matmul as _pallas_int8

DimensionNumbers = tuple[tuple[tuple[int, ...], tuple[int, ...]],
                         tuple[tuple[int, ...], tuple[int, ...]]]


def _dot_f32(lhs, rhs, dims):
  """dot_general with float32 accumulation; on CPU, 16-bit operands are widened to float32
  first (exact: 16-bit products fit float32). XLA:CPU does have a fast bf16 x bf16 -> f32 GEMM
  (YNNPACK) from two lhs rows on, which the fused 4-bit path uses directly; this generic helper
  (the outlier product, the backward passes, the generic dequantize-then-dot) keeps the widening,
  which also covers float16 and one-row products (a naive loop in 16 bits)."""
  if jax.default_backend() == "cpu" and lhs.dtype.itemsize < 4:
    lhs, rhs = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
  return jax.lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32)


def _sharded(fn, x, w, bias, dense_fn=None):
  """``fn(x, w, bias)``; under an Explicit mesh (see ``jaxbnb._explicit``) its output is
  sharded as ``dense_fn(x, W)`` would be, ``W`` the logical array with the weight's shards
  (default: ``x @ M.T``, ``M`` the ``(out, in)`` matrix)."""
  if w.stack_shape:
    raise ValueError(f"a stacked quantized weight (stack axes {w.stack_shape}, one weight "
                     f"{w.shape}) is not one matrix: index a slice (w[i]) for a linear layer, "
                     "or run the model through jaxbnb.intercept (scan, einsum, ragged_dot)")
  def specs(mesh, out):
    def typed(shape, dtype, spec):
      return jax.ShapeDtypeStruct(shape, dtype,
                                  sharding=jax.sharding.NamedSharding(mesh, spec))
    xs = typed(x.shape, x.dtype, P(*_explicit.spec_of(x, x.ndim)))
    if dense_fn is None:
      dense, ws = _matrix_product, typed(w.matrix_shape, x.dtype, P(*w.matrix_specs(mesh)))
    else:
      dense, ws = dense_fn, typed(w.shape, x.dtype, w.logical_spec(mesh))
    try:
      with jax.sharding.use_abstract_mesh(mesh):
        return P(*jax.eval_shape(dense, xs, ws).sharding.spec)
    except Exception:  # noqa: BLE001 - JAX's ShardingTypeError subclasses Exception only
      # The dense op itself would need an out_sharding (e.g. both operands sharded on the
      # same mesh axis): replicate the (small, activation-sized) result.
      return P(*(None,) * out.ndim)
  return _explicit.call(fn, (x, w, bias), specs)


def _matrix_product(x, m):
  return x @ m.T


def _compute_dtype(x_dtype, w: QuantizedArray):
  if isinstance(w, Quantized4bit):
    return w.compute_dtype
  # LLM.int8(): the 16-bit parts run in the input's precision, like bnb (fp16 there).
  return x_dtype


# --- generic: any dot_general with a quantized operand (dequantize, then dot) -----------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _qdot(x, w, dims, w_is_lhs, out_dtype):
  return _qdot_fwd_impl(x, w, dims, w_is_lhs, out_dtype)


def _qdot_fwd_impl(x, w, dims, w_is_lhs, out_dtype):
  cd = _compute_dtype(x.dtype, w)
  wd = w.dequantize(cd)
  xc = x.astype(cd)
  lhs, rhs = (wd, xc) if w_is_lhs else (xc, wd)
  return _dot_f32(lhs, rhs, dims).astype(out_dtype)


def _qdot_fwd(x, w, dims, w_is_lhs, out_dtype):
  return _qdot_fwd_impl(x, w, dims, w_is_lhs, out_dtype), (w, jax.ShapeDtypeStruct(
      x.shape, x.dtype))


def _qdot_bwd(dims, w_is_lhs, out_dtype, res, g):
  w, x_spec = res
  # d/dx of a linear map: transpose it, with the weight dequantized again (not saved).
  f = lambda x: _qdot_fwd_impl(x, w, dims, w_is_lhs, out_dtype)
  (dx,) = jax.linear_transpose(f, x_spec)(g)
  return dx, None  # the packed weight is frozen: no cotangent


_qdot.defvjp(_qdot_fwd, _qdot_bwd)


def qdot_general(lhs, rhs, dimension_numbers: DimensionNumbers, *, out_dtype=None,
                 backend: str = "auto") -> jax.Array:
  """``lax.dot_general`` where one operand is a quantized leaf (its logical array is used).

  The output dtype defaults to the float operand's. Differentiable w.r.t. the float operand.
  """
  _backend.check(backend)
  w_is_lhs = isinstance(lhs, QuantizedArray)
  if w_is_lhs == isinstance(rhs, QuantizedArray):
    raise TypeError("qdot_general needs exactly one quantized operand")
  x, w = (rhs, lhs) if w_is_lhs else (lhs, rhs)
  dims = jax.tree.map(int, dimension_numbers)
  dims = (tuple(map(tuple, dims[0])), tuple(map(tuple, dims[1])))
  if w.stack_shape:  # a stack of weights (layers, experts): one packed product per slice
    return _stacked_qdot(x, w, dims, w_is_lhs, out_dtype, backend)
  if isinstance(w, Quantized8bit):
    int8_case = None if w_is_lhs else _as_int8_linear(x, w, dims, backend)
    if int8_case is not None:
      return int8_case(out_dtype or x.dtype)
    warnings.warn(
        f"jaxbnb: an 8-bit weight of shape {w.shape} is contracted over axes {dims[0]}, which "
        f"are not its input axes (the first {w.n_in}); LLM.int8() needs x's last axis against "
        "the input axes, so this product dequantizes the weight and runs in 16-bit",
        stacklevel=2)
  if isinstance(w, Quantized4bit) and not w_is_lhs:
    linear_case = _as_4bit_linear(x, w, dims, backend)
    if linear_case is not None:
      return linear_case(out_dtype or x.dtype)
  out_dtype = np.dtype(out_dtype or x.dtype)
  dense = ((lambda x, w: jax.lax.dot_general(w, x, dims)) if w_is_lhs
           else (lambda x, w: jax.lax.dot_general(x, w, dims)))
  return _sharded(lambda x, w, _: _qdot(x, w, dims, w_is_lhs, out_dtype), x, w, None, dense)


def _stacked_qdot(x, w, dims, w_is_lhs, out_dtype, backend):
  """qdot_general with a stacked weight (see :mod:`jaxbnb.stacked`): its stack axes must be
  all batch axes (dense MoE einsum, vmapped dots) or all free axes of the product."""
  from jaxbnb import stacked  # noqa: PLC0415 - stacked builds on this module

  out_dtype = np.dtype(out_dtype or x.dtype)

  def per_slice(xs, ws, d):
    lhs, rhs = (ws, xs) if w_is_lhs else (xs, ws)
    return qdot_general(lhs, rhs, d, out_dtype=out_dtype, backend=backend)
  y = stacked.dot_general(x, w, dims, w_is_lhs, out_dtype, per_slice)
  if y is None:
    raise NotImplementedError(
        f"jaxbnb: a stacked weight (stack axes {w.stack_shape}, one weight {w.shape}) is "
        f"contracted with dimension numbers {dims}: its stack axes must all be batch axes "
        "(an einsum over experts) or all free axes; index the stack (leaf[i]) or dequantize it "
        "(jaxbnb.dequantize) for other products")
  return y


# --- 4-bit: y = x @ W.T (+ bias) ----------------------------------------------------------------


def matmul_4bit(x: jax.Array, w: Quantized4bit, bias: Optional[jax.Array] = None, *,
                backend: str = "auto") -> jax.Array:
  """``x @ W.T + bias`` for a 4-bit weight ``W`` stored ``(out, in)`` (bnb's ``matmul_4bit``).

  Args:
    x: ``(..., in)`` float input.
    w: :class:`Quantized4bit` leaf (a Flax kernel leaf behaves as its ``(in, out)`` kernel).
    bias: optional ``(out,)``.

  Returns:
    ``(..., out)`` in ``x.dtype``; computed in ``w.compute_dtype`` with float32 accumulation.
  """
  if not isinstance(w, Quantized4bit):
    raise TypeError(f"matmul_4bit expects a Quantized4bit weight; got {type(w).__name__}")
  return _sharded(lambda x, w, b: _linear(x, w, b, backend), x, w, bias)


def _linear(x, w, bias, backend):
  n_out, n_in = w.matrix_shape
  if x.shape[-1] != n_in:
    raise ValueError(f"input has {x.shape[-1]} features; the weight expects {n_in}")
  _backend.check(backend)
  interpret = _backend.pallas_interpret(backend)
  m = math.prod(x.shape[:-1])
  kernel = (_pallas_4bit_kernel(m, n_out, n_in, w)
            if interpret is not None and jnp.issubdtype(x.dtype, jnp.floating) else None)
  if kernel is not None:
    y = _linear_pallas(x.reshape(m, n_in), w, kernel, interpret).reshape(*x.shape[:-1], n_out)
    if bias is not None:
      y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)
  if _row_step(w, m) is not None and jnp.issubdtype(x.dtype, jnp.floating):
    y = _linear_xla(x.reshape(m, n_in), w).reshape(*x.shape[:-1], n_out)
    if bias is not None:
      y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)
  # A matrix the fused path does not cover (odd rows, blocks across the end): dequantize, dot.
  if w.transposed:
    x2 = x.reshape(*x.shape[:-1], *w.shape[:w.n_in])
    dims = ((tuple(range(x.ndim - 1, x2.ndim)), tuple(range(w.n_in))), ((), ()))
  else:
    x2 = x.reshape(*x.shape[:-1], *w.shape[1:])
    dims = ((tuple(range(x.ndim - 1, x2.ndim)), tuple(range(1, w.ndim))), ((), ()))
  y = qdot_general(x2, w, dims, out_dtype=jnp.float32, backend=backend)
  y = y.reshape(*x.shape[:-1], n_out)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)


def _as_linear(x, w, dims, linear):
  """``x @ kernel`` as ``linear(x2 (..., in), w) -> (..., out)`` when ``dims`` contract x's last
  axes with the weight's input axes (no batch axes); else None. Returns ``run(out_dtype)``."""
  (xc, wc), (xb, wb) = dims
  in_axes = tuple(range(w.n_in)) if w.transposed else tuple(range(1, w.ndim))
  n_in_axes = len(in_axes)
  if xb or wb or tuple(wc) != in_axes or tuple(xc) != tuple(range(x.ndim - n_in_axes, x.ndim)):
    return None
  lead = x.shape[:x.ndim - n_in_axes]
  out_axes = w.shape[w.n_in:] if w.transposed else w.shape[:1]

  def run(out_dtype):
    y = linear(x.reshape(*lead, w.matrix_shape[1]), w)
    return y.reshape(*lead, *out_axes).astype(out_dtype)
  return run


def _as_4bit_linear(x, w, dims, backend):
  """``x @ kernel`` on a 4-bit weight through :func:`matmul_4bit` (the fused XLA path or a
  Pallas kernel) when ``dims`` contract x's last axes with the weight's input axes and one of
  them covers the matrix; else None (the generic dequantize-then-dot). Routes
  ``qdot_general`` (hence ``jaxbnb.intercept``) to the fast paths."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return None
  m = math.prod(x.shape) // max(1, w.matrix_shape[1])
  pallas = (_backend.pallas_interpret(backend) is not None
            and _pallas_4bit_kernel(m, *w.matrix_shape, w) is not None)
  if not pallas and _row_step(w, m) is None:
    return None
  return _as_linear(x, w, dims, lambda x2, w: matmul_4bit(x2, w, backend=backend))


def _pallas_4bit_kernel(m, n_out, n_in, w) -> Optional[str]:
  """The Pallas kernel covering ``(m, in) @ W.T``: "gemv" (M <= 16), "gemm", or None (XLA)."""
  problem = (m, n_out, n_in, w.state.blocksize, w.state.quant_type, w.compute_dtype)
  if _pallas_gemv.supported(*problem):
    return "gemv"
  if _pallas_gemm.supported(*problem):
    return "gemm"
  return None


def _pallas_absmax(state):
  """The kernels' absmax operand: float32, or (double quantization) bnb's nested storage,
  which the kernels decode in-kernel bit-identically to ``unnest_absmax``."""
  if state.nested:
    return _pallas_common.NestedAbsmax(state.absmax, state.state2.absmax, state.offset,
                                       state.state2.code)
  return state.absmax.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _linear_pallas(x2, w, kernel, interpret):
  """float32 ``(M, in) @ W.T`` by a Pallas kernel (``kernel``: "gemv" | "gemm").

  ``x`` is rounded to ``w.compute_dtype`` like the XLA path. The GEMV uses ``W`` as exact
  float32 ``code * absmax``; the GEMM rounds it to ``compute_dtype`` first, as the XLA path does.
  """
  n_out, _ = w.matrix_shape
  fn = _pallas_gemv.gemv_4bit if kernel == "gemv" else _pallas_gemm.gemm_4bit
  group = w.state.state2.blocksize if w.state.nested else _pallas_common.NESTED_GROUP
  return fn(x2.astype(w.compute_dtype), _fourbit.storage_bytes(w.packed),
            _pallas_absmax(w.state), n_out=n_out, blocksize=w.state.blocksize,
            quant_type=w.state.quant_type, out_dtype=jnp.float32, interpret=interpret,
            absmax_group=group)


def _linear_pallas_fwd(x2, w, kernel, interpret):
  return _linear_pallas(x2, w, kernel, interpret), (w, jax.ShapeDtypeStruct(x2.shape, x2.dtype))


def _linear_pallas_bwd(kernel, interpret, res, g):
  del kernel, interpret
  w, x_spec = res
  # dx = g @ W as the XLA path computes it (W decoded again, not saved), so both backends give
  # the same gradient. The packed weight gets no cotangent.
  if _row_step(w, g.shape[0]) is not None:
    return _linear_xla_bwd(res, g)
  cd = w.compute_dtype
  wd = w.dequantize_matrix(cd)
  f = lambda x2: _dot_f32(x2.astype(cd), wd, (((1,), (1,)), ((), ())))
  (dx,) = jax.linear_transpose(f, x_spec)(g)
  return dx, None


_linear_pallas.defvjp(_linear_pallas_fwd, _linear_pallas_bwd)


# --- 4-bit, XLA: the decode fused into the product ------------------------------------------
#
# XLA:CPU does not fuse a decode into a dot (a decode-then-multiply-then-reduce expression gets
# its decoded W materialized), so the CPU path walks the (out, in) matrix in steps of whole
# rows: each step decodes its rows (a select tree; cache-sized) and multiplies them at once.
# Nothing the size of W is ever written. Other backends take one step: one decode into the
# compute dtype (never float32 for a 16-bit compute dtype), then the dot. The two nibbles of
# each byte are decoded as two planes (W's even and odd columns) and met by x's even and odd
# columns, so no step interleaves anything. One row of x on CPU takes no steps and no dot over
# W (``_gemv``): the decode and the product are one elementwise pass over the packed bytes.

# Decoded planes per CPU step: at most _STEP_BYTES (they stay in cache for the dot; a bf16
# step has twice the rows of a float32 one: fewer, larger GEMM calls) and at most
# 1 / (2 * _FRACTION) of the weight's bf16 bytes, so that no matrix, however small, is decoded
# whole; at most _MAX_STEPS steps (they are unrolled, see _loop). A weight whose planes fit in
# _MIN_STEP_BYTES is decoded in one step: a cache-sized buffer, and few unrolled steps to
# compile (32 steps of a 64 x 192 layer made a small QLoRA step compile 8x longer).
_STEP_BYTES = 4 << 20
_FRACTION = 8
_MAX_STEPS = 64
_MIN_STEP_BYTES = 256 << 10
# XLA:CPU has a fast bf16 x bf16 -> f32 GEMM (YNNPACK) from two rows of x on; for one row it
# falls back to a naive loop (15x slower than a float32 GEMV), so a one-row step (the
# backward's g, or ``_gemv``'s fallbacks) runs in float32.
_MIN_ROWS_16BIT = 2


def _row_step(w: Quantized4bit, m: int, itemsize: int = 4) -> Optional[int]:
  """Rows of the ``(out, in)`` matrix per step of the fused path for planes of ``itemsize``
  bytes; None if the path does not apply (an odd row length, or a last block that runs past
  the matrix)."""
  n_out, n_in = w.matrix_shape
  bs = w.state.blocksize
  if n_in % 2 or (n_out * n_in) % bs or m == 0:
    return None
  if jax.default_backend() != "cpu":
    return n_out
  whole = bs // math.gcd(n_in, bs)  # the fewest rows that hold whole blocks
  rows = min(_STEP_BYTES // (n_in * itemsize), n_out // (_FRACTION * itemsize))
  rows = max(rows, -(-n_out // _MAX_STEPS), _MIN_STEP_BYTES // (n_in * itemsize))
  return min(n_out, max(whole, rows // whole * whole))


def _plane_dtypes(compute_dtype, rows: int, operand_dtype) -> tuple[Any, Any]:
  """(dtype W is rounded to, dtype the dot runs in) against ``rows`` rows of the other operand.

  Accumulation is float32 always. A 16-bit product needs the other operand to hold exactly
  compute-dtype values (else it runs in float32 on the same rounded W, as bnb multiplies in
  the gradient's dtype) and, on CPU, a fast kernel: bf16 from two rows on. One row runs in
  float32 with W exact (``code * absmax``, as the Pallas GEMV): rounding it would only add
  work to the case that is all decode.
  """
  cd = np.dtype(compute_dtype)
  f32 = np.dtype(np.float32)
  if cd.itemsize == 4:
    return cd, cd
  on_cpu = jax.default_backend() == "cpu"
  if np.dtype(operand_dtype) == cd and (
      not on_cpu or (cd == np.dtype(jnp.bfloat16) and rows >= _MIN_ROWS_16BIT)):
    return cd, cd
  return (f32, f32) if on_cpu and rows == 1 else (cd, f32)


def _weight_steps(w: Quantized4bit, rows: int, round_dtype, dot_dtype):
  """``(n_steps, step)``: ``step(i, after)`` -> ``(even plane, odd plane)`` of the rows from
  ``min(i * rows, out - rows)`` on, ``(rows, in / 2)`` in ``dot_dtype``, decoded only once
  ``after`` (the previous step's result) exists. The last step may redo rows of the one
  before: whole-row steps keep every block inside one step."""
  n_out, n_in = w.matrix_shape
  bs = w.state.blocksize
  packed = _fourbit.storage_bytes(w.packed)
  absmax = unnest_absmax(w.state)
  # CPU steps select among per-block tables of products (~15% less decode time, 2026-11-27,
  # 4096^2 M=16); a single whole-matrix step elsewhere would hold its table (1/4 of the planes)
  # beside the planes.
  decode = (_fourbit.dequantize_planes_by_block if jax.default_backend() == "cpu"
            else _fourbit.dequantize_planes)

  def step(i, after=None):
    start = min(i * rows, n_out - rows)
    if after is not None:  # a data dependence on the previous step's result orders the steps
      start = jax.lax.optimization_barrier((jnp.int32(start), after))[0]
    p = jax.lax.dynamic_slice_in_dim(packed, start * (n_in // 2), rows * n_in // 2)
    a = jax.lax.dynamic_slice_in_dim(absmax, start * n_in // bs, rows * n_in // bs)
    even, odd = decode(p, a, w.state.quant_type, bs, round_dtype)
    shape = (rows, n_in // 2)
    return even.astype(dot_dtype).reshape(shape), odd.astype(dot_dtype).reshape(shape)
  return -(-n_out // rows), step


def _loop(n_steps, body, init):
  """``body(i, carry)`` for i in 0..n_steps-1, unrolled: a fori_loop would copy a weight that
  is not a plain buffer (a layer sliced out of a scanned stack) into its loop state. Each step
  decodes after the one before has finished (see ``_weight_steps``), so the steps' planes are
  never alive together and share one buffer."""
  carry = init
  for i in range(n_steps):
    carry = body(i, carry)
  return carry


_NT = (((1,), (1,)), ((), ()))  # (M, K) x (N, K) -> (M, N)
_NN = (((1,), (0,)), ((), ()))  # (M, N) x (N, K) -> (M, K)


# One input row on CPU (a GEMV) takes no dot over W at all: the product is one elementwise loop
# over the packed bytes. Each row's blocks fall into _GEMV_GROUPS groups; the loop adds the
# groups' terms ``(code_hi * x_even + code_lo * x_odd) * absmax`` elementwise and writes only
# ``(out, in / (2 * groups))`` float32 partial sums, which a small dot with ones reduces. The
# decode is all the work left: the stepped path spent ~1/3 of its CPU time in the per-step dots,
# and on two cores more in the handoffs between its ~4 thunks a step (2026-11-27, 4096^2:
# 1.07x dense float32 x @ W against 1.47x, same run, loaded machine). The groups' count trades
# the partial sums' size (1/16 of W's bf16 bytes at 16) against the loop's code size: compile
# time grows with it (0.5 s at 16, CPU time; the stepped path took 1.8 s). The partial sums
# are 1/groups of W's bf16 bytes, so a row whose block count has no divisor from
# _GEMV_MIN_GROUPS to _GEMV_GROUPS (1-3 blocks, or a prime count above 16) takes the stepped
# path instead.
_GEMV_GROUPS = 16
_GEMV_MIN_GROUPS = 4


def _gemv_groups(w: Quantized4bit, m: int) -> Optional[int]:
  """Block groups per row of the one-row CPU product: the largest divisor of the row's block
  count up to _GEMV_GROUPS; None where the path does not apply (not one row, not on CPU, rows
  that do not hold whole blocks, or fewer than _GEMV_MIN_GROUPS groups)."""
  n_out, n_in = w.matrix_shape
  bs = w.state.blocksize
  if m != 1 or n_in % bs or jax.default_backend() != "cpu":
    return None
  n_blocks = n_in // bs
  groups = max(g for g in range(1, _GEMV_GROUPS + 1) if n_blocks % g == 0)
  return groups if groups >= _GEMV_MIN_GROUPS else None


def _gemv(x2, w, groups: int):
  """float32 ``(1, in) @ W.T`` as one elementwise pass over the packed bytes (see above).

  W is ``code * absmax`` exactly (float32), as the Pallas GEMV; x is rounded to the compute
  dtype first, as on every path.
  """
  n_out, n_in = w.matrix_shape
  bs = w.state.blocksize
  per_group = n_in // bs // groups  # blocks per group
  packed = _fourbit.storage_bytes(w.packed).reshape(n_out, groups, per_group, bs // 2)
  absmax = unnest_absmax(w.state).reshape(n_out, groups, per_group, 1)
  xc = x2.astype(w.compute_dtype).astype(jnp.float32).reshape(n_in // 2, 2)
  # x's even and odd elements as two contiguous vectors of their own: read strided inside the
  # loop, they cost shuffles in every iteration (vshufps/vpermpd in its assembly).
  xe, xo = jax.lax.optimization_barrier((xc[:, 0], xc[:, 1]))
  xe, xo = (v.reshape(groups, per_group, bs // 2) for v in (xe, xo))
  qt = w.state.quant_type
  total = None
  for g in range(groups):  # unrolled: slices of one loop, never a loop of slices
    p = packed[:, g]
    term = (_fourbit.decode_nibbles(p, qt, True) * xe[g]
            + _fourbit.decode_nibbles(p, qt, False) * xo[g]) * absmax[:, g]
    total = term if total is None else total + term
  partial = total.reshape(n_out, -1)
  ones = jnp.ones((1, partial.shape[1]), jnp.float32)
  return jax.lax.dot_general(ones, partial, _NT)


@jax.custom_vjp
def _linear_xla(x2, w):
  """float32 ``(M, in) @ W.T`` from the packed weight (see the section comment)."""
  m = x2.shape[0]
  groups = _gemv_groups(w, m)
  if groups is not None:
    return _gemv(x2, w, groups)
  n_out, n_in = w.matrix_shape
  round_dt, dot_dt = _plane_dtypes(w.compute_dtype, m, np.dtype(w.compute_dtype))
  xc = x2.astype(w.compute_dtype).astype(dot_dt)  # x rounded to the compute dtype, as bnb
  x_even, x_odd = xc[:, 0::2], xc[:, 1::2]
  rows = _row_step(w, m, dot_dt.itemsize)
  n_steps, step = _weight_steps(w, rows, round_dt, dot_dt)

  def body(i, parts):
    even, odd = step(i, parts[-1] if parts else None)
    part = (jax.lax.dot_general(x_even, even, _NT, preferred_element_type=jnp.float32)
            + jax.lax.dot_general(x_odd, odd, _NT, preferred_element_type=jnp.float32))
    return parts + [part]
  parts = _loop(n_steps, body, [])
  if n_steps > 1 and n_out % rows:  # the last step redid rows of the one before
    parts[-1] = parts[-1][:, rows - n_out % rows:]
  return jnp.concatenate(parts, axis=1) if n_steps > 1 else parts[0]


def _linear_xla_fwd(x2, w):
  return _linear_xla(x2, w), (w, jax.ShapeDtypeStruct(x2.shape, x2.dtype))


def _linear_xla_bwd(res, g):
  """dx = g @ W, W decoded again step by step (never saved); the weight gets no cotangent."""
  w, x_spec = res
  m = g.shape[0]
  n_out, n_in = w.matrix_shape
  cd = np.dtype(w.compute_dtype)
  # g holds x.dtype values (the output was cast to it): it meets W in 16 bits only when that
  # loses nothing, as bnb's backward multiplies in grad_output's dtype.
  round_dt, dot_dt = _plane_dtypes(cd, m, np.dtype(x_spec.dtype))
  gc = g.astype(dot_dt)
  rows = _row_step(w, m, dot_dt.itemsize)
  n_steps, step = _weight_steps(w, rows, round_dt, dot_dt)

  def body(i, acc):
    start = min(i * rows, n_out - rows)
    even, odd = step(i, acc if i else None)
    # Rows an earlier step already did (the last step's overlap) must not count twice.
    gb = jax.lax.slice_in_dim(gc, start, start + rows, axis=1)
    if start < i * rows:
      gb = jnp.where(jnp.arange(rows) >= i * rows - start, gb, 0)
    return (acc[0] + jax.lax.dot_general(gb, even, _NN, preferred_element_type=jnp.float32),
            acc[1] + jax.lax.dot_general(gb, odd, _NN, preferred_element_type=jnp.float32))
  zeros = jnp.zeros((m, n_in // 2), jnp.float32)
  dx_even, dx_odd = _loop(n_steps, body, (zeros, zeros))
  dx = jnp.stack([dx_even, dx_odd], axis=-1).reshape(m, n_in)
  # Through the rounding of x to the compute dtype, as the transpose of a cast does.
  return dx.astype(cd).astype(x_spec.dtype), None


_linear_xla.defvjp(_linear_xla_fwd, _linear_xla_bwd)


# --- LLM.int8() ---------------------------------------------------------------------------------


def int8_matmul(x: jax.Array, w: Quantized8bit, bias: Optional[jax.Array] = None, *,
                threshold: Optional[float] = None, max_outlier_cols: int = 256,
                backend: str = "auto") -> jax.Array:
  """LLM.int8(): ``x @ W.T + bias`` with the int8 weight ``W`` (bnb's ``Linear8bitLt``).

  ``x`` is quantized vector-wise (per row) to int8 except its outlier columns (any
  ``|x| >= threshold``), which are multiplied in 16-bit with the dequantized weight columns
  ``CB * SCB / 127`` and added (the mixed-precision decomposition). The int8 product
  accumulates exactly in int32 and is scaled by ``row_absmax(x) * SCB / 127**2``.

  The XLA path gathers the outlier columns ``min(max_outlier_cols, 16)`` at a time, in a loop
  that runs once per page (none without outliers); no float copy of W is made at any count.
  The Pallas kernels gather up to ``max_outlier_cols`` and past that switch, inside the same
  jit, to a masked 16-bit product over all columns (correct, slower).

  Returns:
    ``(..., out)`` in ``x.dtype``.
  """
  _backend.check(backend)
  if not isinstance(w, Quantized8bit):
    raise TypeError(f"int8_matmul expects a Quantized8bit weight; got {type(w).__name__}")
  n_out, n_in = w.matrix_shape
  if x.shape[-1] != n_in:
    raise ValueError(f"input has {x.shape[-1]} features; the weight expects {n_in}")
  thr = w.threshold if threshold is None else float(threshold)

  def run(x, w, bias):
    m = math.prod(x.shape[:-1])
    interpret = _backend.pallas_interpret(backend)
    if interpret is not None and not _pallas_int8.supported(m, w.CB.shape[0], n_in, x.dtype):
      interpret = None  # no kernel covers this (local) problem: the XLA path
    y = _int8_linear(x.reshape(m, n_in), w, bias, thr, int(max_outlier_cols), interpret)
    return y.reshape(*x.shape[:-1], n_out)
  return _sharded(run, x, w, bias)


def _as_int8_linear(x, w, dims, backend="auto"):
  """The LLM.int8() path when ``dims`` contract x's last axis with the weight's input axes."""
  return _as_linear(x, w, dims, lambda x2, w: int8_matmul(x2, w, backend=backend))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _int8_linear(x, w, bias, threshold, max_outlier_cols, interpret):
  return _int8_linear_fwd_impl(x, w, bias, threshold, max_outlier_cols, interpret)


def _int8_linear_fwd_impl(x, w, bias, threshold, max_cols, interpret):
  """interpret None: the XLA path; else the Pallas kernels (interpret mode off a GPU)."""
  if interpret is None:
    return _int8_linear_impl(x, w, bias, threshold, max_cols)
  return _pallas_int8.int8_linear(x, w.CB, w.SCB, bias, threshold=threshold,
                                  max_outlier_cols=max_cols, interpret=interpret)


# XLA:CPU lowers an s8 x s8 -> s32 dot with one lhs row as an s32 GEMV over a widened copy of
# CB (64 MiB at 4096^2, ~10x slower); from a few rows on it takes the int8 GEMM (4 rows measured
# fastest of 2..16). Padding x's codes with zero rows leaves the kept rows' results exact. (One
# row on CPU skips the GEMM altogether: _int8_gemv.)
_INT8_MIN_ROWS = 4
# At those few rows the int8 GEMM's time is repacking CB; as a batch of 8 row blocks of CB
# (2 MiB each at 4096^2) it repacks within cache: ~10% faster at M=1, no gain from M=16 on.
_INT8_GEMV_BLOCKS = 8
# Outlier columns gathered per loop step by the XLA path. Each step gathers (out, page) codes
# whatever the real count, so a small page keeps the usual few outliers cheap (at 4096^2, M=1,
# 4 outlier columns: ~0.35 ms at 16, ~0.55 ms at 32, ~1.7 ms at 256; dense f32 x @ W ~3 ms).
_OUTLIER_PAGE = 16


def _int8_linear_impl(x, w, bias, threshold, max_cols):
  cq, row_absmax, outlier_cols = _int8.int8_vectorwise_quant(x, threshold)
  acc = _int8_product(cq, w.CB)
  # bnb's int8_mm_dequant: acc * row_stats * col_stats / 127^2, in float32.
  y = acc.astype(jnp.float32) * row_absmax[:, None] * w.SCB[None, :] * jnp.float32(
      1 / (127 * 127))
  if threshold > 0:
    y = _add_outlier_product(y, x, w, outlier_cols, min(max_cols, _OUTLIER_PAGE))
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)


# One row on CPU: no dot at all. The int8 GEMM's time at one row is repacking CB (all of it,
# every call); an elementwise int32 loop over CB instead reads it once in place (at 4096^2 about
# half the time of the padded GEMM, a third of a dense float32 GEMV). Each row of CB is cut into
# at most _INT8_GEMV_GROUPS groups whose products are added elementwise, so the loop writes
# only ``(out, in / groups)`` int32 partial sums, which one reduction adds up. int32
# throughout: exact, as the GEMM. A group keeps >= _INT8_GEMV_MIN_PER elements: LLVM left a
# 32-element row of the loop scalar (4x slower).
_INT8_GEMV_GROUPS = 64
_INT8_GEMV_MIN_PER = 64


def _int8_gemv_groups(n_in: int) -> int:
  """Groups per row of CB for :func:`_int8_gemv`: the most (<= _INT8_GEMV_GROUPS) that divide
  ``in`` and keep _INT8_GEMV_MIN_PER elements each; 1 for a short row."""
  return max(g for g in range(1, _INT8_GEMV_GROUPS + 1)
             if n_in % g == 0 and (n_in // g >= _INT8_GEMV_MIN_PER or g == 1))


def _int8_gemv(cq, cb):
  """Exact int32 ``(1, in) @ cb.T`` without a dot (see above)."""
  n_out, n_in = cb.shape
  groups = _int8_gemv_groups(n_in)
  per = n_in // groups
  # x's codes widened once, outside the loop, not once per group inside it.
  xq = jax.lax.optimization_barrier(cq.reshape(groups, per).astype(jnp.int32))
  w = cb.reshape(n_out, groups, per)
  total = None
  for g in range(groups):  # unrolled: slices of one loop
    term = w[:, g].astype(jnp.int32) * xq[g]
    total = term if total is None else total + term
  # The partial sums as a buffer of their own, so that the loop stays elementwise (vectorized)
  # and only this small array meets XLA:CPU's reduction, which it runs as a scalar loop.
  partial = jax.lax.optimization_barrier(total)
  return jnp.sum(partial, axis=1, dtype=jnp.int32)[None]


def _int8_product(cq, cb):
  """Exact int32 ``cq @ cb.T``: int8 ``(m, in)`` x int8 ``(out, in)`` -> ``(m, out)``."""
  m, (n_out, n_in) = cq.shape[0], cb.shape
  if m == 1 and jax.default_backend() == "cpu":
    return _int8_gemv(cq, cb)
  if m >= _INT8_MIN_ROWS:
    return jax.lax.dot_general(cq, cb, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.int32)
  cq = jnp.pad(cq, ((0, _INT8_MIN_ROWS - m), (0, 0)))
  nb = _INT8_GEMV_BLOCKS if n_out % _INT8_GEMV_BLOCKS == 0 else 1
  acc = jax.lax.dot_general(jnp.broadcast_to(cq, (nb, *cq.shape)),
                            cb.reshape(nb, n_out // nb, n_in), (((2,), (2,)), ((0,), (0,))),
                            preferred_element_type=jnp.int32)  # (nb, rows, out / nb)
  return acc[:, :m].transpose(1, 0, 2).reshape(m, n_out)


def _add_outlier_product(y, x, w, outlier_cols, page):
  """``y + x[:, cols] @ W[:, cols].T`` over the outlier columns: 16-bit operands (bnb's
  ``CB * SCB / 127`` in x's dtype), float32 accumulation into ``y`` (float32 ``(m, out)``).

  The columns are gathered ``page`` at a time in a loop that runs ``ceil(count / page)`` times:
  no outliers cost no product, and any count needs only one page of dequantized weight
  (``(out, page)``), never the whole float W.
  """
  n_in = x.shape[-1]
  page = max(1, min(page, n_in))
  n_pages = -(-n_in // page)
  count = jnp.sum(outlier_cols, dtype=jnp.int32)
  idx = jnp.nonzero(outlier_cols, size=n_pages * page, fill_value=0)[0]
  scale = w.SCB[:, None] * jnp.float32(1 / 127)

  def body(i, y):
    cols = jax.lax.dynamic_slice_in_dim(idx, i * page, page)
    valid = i * page + jnp.arange(page) < count
    sub_x = jnp.where(valid[None, :], x[:, cols], 0)
    # W's page gathered row by row into its own buffer: fused into the dot's operand, XLA:CPU
    # gathers it column by column (one cache miss per element, ~10x slower).
    cb = jax.lax.optimization_barrier(w.CB[:, cols].reshape(-1)).reshape(-1, page)
    sub_w = (cb.astype(jnp.float32) * scale).astype(x.dtype)
    return y + _dot_f32(sub_x, sub_w, (((1,), (1,)), ((), ())))

  return jax.lax.fori_loop(0, (count + page - 1) // page, body, y)


def _int8_linear_fwd(x, w, bias, threshold, max_cols, interpret):
  out = _int8_linear_fwd_impl(x, w, bias, threshold, max_cols, interpret)
  bias_spec = None if bias is None else jax.ShapeDtypeStruct(bias.shape, bias.dtype)
  return out, (w, bias_spec, jax.ShapeDtypeStruct(x.shape, x.dtype))


def _int8_linear_bwd(threshold, max_cols, interpret, res, g):
  del interpret  # the backward pass is XLA's for both backends
  w, bias_spec, x_spec = res
  # bnb's backward: grad_x = g @ (CB * SCB / 127) in the input dtype.
  dx = _grad_input(g.astype(x_spec.dtype), w)
  dbias = (None if bias_spec is None
           else jnp.sum(g.astype(jnp.float32), axis=0).astype(bias_spec.dtype))
  return dx.astype(x_spec.dtype), None, dbias


_int8_linear.defvjp(_int8_linear_fwd, _int8_linear_bwd)

# Weight elements dequantized per step of the backward product (4 MiB as float32).
_BWD_BLOCK_ELEMS = 1 << 20


def _grad_input(g, w):
  """float32 ``g @ (CB * SCB / 127)``: ``g`` ``(m, out)`` in x's dtype -> ``(m, in)``.

  W is dequantized (to g's dtype, bnb's rounding) a block of output rows at a time and the
  partial products summed in float32, so no full-size float copy of W is ever alive (on CPU
  ``_dot_f32`` would widen a 16-bit one to float32 as well).
  """
  n_out, n_in = w.CB.shape
  rows = max(1, min(n_out, _BWD_BLOCK_ELEMS // n_in))
  scale = w.SCB * jnp.float32(1 / 127)

  def block(start, size):
    cb = jax.lax.dynamic_slice_in_dim(w.CB, start, size)
    wd = (cb.astype(jnp.float32) * jax.lax.dynamic_slice_in_dim(scale, start, size)[:, None])
    gb = jax.lax.dynamic_slice_in_dim(g, start, size, axis=1)
    return _dot_f32(gb, wd.astype(g.dtype), (((1,), (0,)), ((), ())))

  n_full = n_out // rows
  dx = jax.lax.fori_loop(0, n_full, lambda i, acc: acc + block(i * rows, rows),
                         jnp.zeros((g.shape[0], n_in), jnp.float32))
  if n_out % rows:
    dx = dx + block(n_full * rows, n_out % rows)
  return dx


# --- generic entry point ------------------------------------------------------------------------


def matmul(x: jax.Array, w: Any, bias: Optional[jax.Array] = None, *,
           backend: str = "auto") -> jax.Array:
  """``x @ w (+ bias)`` where ``w`` is a quantized Flax kernel ``(in, out)`` (or a plain array).

  Computed from the packed form: 4-bit through :func:`matmul_4bit`, 8-bit through LLM.int8()
  (:func:`int8_matmul`, the config's threshold). ``w``'s logical layout decides which axis is
  contracted: ``matmul(x, w) == x @ jaxbnb.dequantize(w)``.
  """
  if not isinstance(w, QuantizedArray):
    y = x @ w
    return y if bias is None else y + bias
  if w.ndim != 2:
    n_lead = x.ndim - 1
    dims = (((n_lead,), (0,)), ((), ()))
    y = qdot_general(x, w, dims, backend=backend)
    return y if bias is None else y + bias
  if w.transposed:  # a Flax kernel: its (out, in) matrix is what bnb's linear uses
    return (matmul_4bit(x, w, bias, backend=backend) if isinstance(w, Quantized4bit)
            else int8_matmul(x, w, bias, backend=backend))
  # A bnb-layout (out, in) leaf used as x @ W: contract over its first axis.
  y = qdot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), backend=backend)
  return y if bias is None else y + bias
