"""Pallas kernel: one fused 8-bit optimizer step per leaf (bitsandbytes' blockwise 8-bit update).

One pass over memory per block of ``block_size`` elements: read the gradient and the uint8
moments with their float32 absmax, dequantize (256-entry table lookup), update in float32,
re-quantize to the nearest code of the dynamic map (bnb's 7-step binary search plus a
nearest-neighbour correction, exactly as ``jaxbnb.functional.blockwise.nearest_code``), and
write the new codes, the new absmax (the block's max |moment|, computed in the kernel) and the
update direction in the gradient's dtype — or, given the parameter, the new parameter
``p - lr * (u + wd * p)`` in place (the fused AdamW/Lion step; no update array at all).

``kind`` (static) picks the rule, float op for float op as ``jaxbnb.optim.transforms``:
  * ``"adam"``: moments ``(m signed, v unsigned)``;
    scalars ``(b1, 1-b1, b2, 1-b2, eps_root, eps*sqrt(c2), sqrt(c2)/c1)``.
  * ``"lion"``: moment ``m`` (signed); scalars ``(b1, 1-b1, b2, 1-b2)``.
  * ``"momentum"`` / ``"nesterov"``: moment ``m`` (signed); scalars ``(decay,)``.
Scalars arrive as a small float32 array (traced: schedules and ``inject_hyperparams`` work);
the caller computes them with the same expressions as the XLA path so both round alike.
Non-finite gradient elements are skipped (moments kept, update 0), as in the XLA path.

Bit-exactness with the XLA path: the float ops are the same and in the same order, and every
product feeding an add is rounded explicitly (``a * b + z``, ``z`` a run-time 0.0 from the
scalar array): XLA:CPU contracts ``a*b + c*d`` into an FMA on one product or the other depending
on operand order and constants, so without it the interpret-mode kernel and the XLA transform
differed in the last bit of the update. Division and sqrt are IEEE (correctly rounded) on both
sides: on GPU the kernel issues PTX ``div.rn.f32`` / ``sqrt.rn.f32`` (Triton's own ``/`` is
approximate). Verified in interpret mode; on a device it still needs the same subnormal
handling as XLA:GPU — not yet checked on a GPU.

Gathers: Triton has no gather instruction, but Pallas' Triton lowering turns ``ref[int_array]``
into a pointer gather (``tt.load`` of computed addresses), as bnb's kernels read their code
table; the 1 KiB tables stay in L1. Layout: the flattened leaf is viewed as
``(nblocks, block_size)`` (zero-padded when ``n % block_size``; the padding is masked out of the
absmax), the absmax as ``(nblocks, 1)``; each program owns ``TB`` whole blocks (the last
program's rows past ``nblocks`` are masked: Triton does not bound-check block accesses).
Grid ``(cdiv(nblocks, TB),)``. Codes and absmax are updated in place (``input_output_aliases``).

Kernels never import ``jaxbnb``: the caller passes the code tables (float32 ``(256,)``).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import common

KINDS = ("adam", "lion", "momentum", "nesterov")
NUM_MOMENTS = {"adam": 2, "lion": 1, "momentum": 1, "nesterov": 1}
NUM_SCALARS = {"adam": 7, "lion": 4, "momentum": 1, "nesterov": 1}
SCALAR_SLOTS = 16  # the scalar vector is padded to a power of two (Triton block dims)
_F32_MAX = float(np.finfo(np.float32).max)


# --- correctly rounded division and sqrt -----------------------------------------------------


def _ptx(op: str, *args: jax.Array) -> jax.Array:
  """float32 elementwise PTX instruction ``op`` (Triton inline asm) on broadcast ``args``."""
  from jax.experimental.pallas import triton as plt  # pylint: disable=g-import-not-at-top
  args = jnp.broadcast_arrays(*[jnp.asarray(a, jnp.float32) for a in args])
  regs = ", ".join(f"${i + 1}" for i in range(len(args)))
  [r] = plt.elementwise_inline_asm(
      f"{op} $0, {regs};", args=list(args), constraints="=f" + ",f" * len(args), pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, jnp.float32)])
  return r


class Ops(NamedTuple):
  """The float ops whose rounding differs between backends unless pinned down."""

  div: Callable[[jax.Array, jax.Array], jax.Array]
  sqrt: Callable[[jax.Array], jax.Array]


# XLA (reference, interpret mode) divides and takes square roots correctly rounded. Triton
# lowers float32 ``/`` to the approximate ``div.full.f32`` (up to 2 ulp) and ``sqrt`` to
# libdevice, whose precision depends on reflect flags: the kernel on GPU uses the IEEE PTX
# instructions explicitly.
XLA_OPS = Ops(div=lambda a, b: a / b, sqrt=jnp.sqrt)
TRITON_OPS = Ops(div=lambda a, b: _ptx("div.rn.f32", a, b),
                 sqrt=lambda a: _ptx("sqrt.rn.f32", a))


# --- the math, shared by the kernel and the plain-jnp reference -----------------------------


def _finite(g):
  g = g.astype(jnp.float32)
  ok = common.isfinite(g)
  return jnp.where(ok, g, 0.0), ok


def step_math(kind: str, s: Sequence[jax.Array], z: jax.Array, g: jax.Array,
              moments: Sequence[jax.Array], ops: Ops = XLA_OPS):
  """``(update float32, new moments float32)`` of one step, elementwise.

  ``s``: the kind's scalars; ``z``: a float32 zero the compiler cannot see (a runtime value).
  Every product that feeds an add is written ``a * b + z``: contracted to ``fma(a, b, 0)`` or
  not, that is the product rounded once, so no compiler (XLA:CPU, XLA:GPU, Triton) can choose
  which of two products to fuse into an FMA, and all backends round alike.
  """
  g0, ok = _finite(g)
  if kind == "adam":
    b1, c_b1, b2, c_b2, eps_root, eps_c2, scale = s[:7]
    # Skip an element whose v increment overflows float32, as the XLA path does (issue 19 R6).
    ok = ok & common.isfinite(c_b2 * g0 * g0)
    g0 = jnp.where(ok, g0, 0.0)
    m_old, v_old = moments
    m_new = jnp.where(ok, (b1 * m_old + z) + (c_b1 * g0 + z), m_old)
    v_new = jnp.where(ok, (b2 * v_old + z) + (c_b2 * g0 * g0 + z), v_old)
    denom = ops.sqrt(v_new + eps_root) + eps_c2
    u = jnp.where(ok, ops.div(scale * m_new, denom), 0.0)
    return u, (m_new, v_new)
  if kind == "lion":
    b1, c_b1, b2, c_b2 = s[:4]
    (m_old,) = moments
    u = jnp.where(ok, jnp.sign((b1 * m_old + z) + (c_b1 * g0 + z)), 0.0)
    m_new = jnp.where(ok, (b2 * m_old + z) + (c_b2 * g0 + z), m_old)
    return u, (m_new,)
  if kind in ("momentum", "nesterov"):
    decay = s[0]
    (m_old,) = moments
    m_new = jnp.where(ok, (decay * m_old + z) + g0, m_old)
    u = g0 + (decay * m_new + z) if kind == "nesterov" else m_new
    return jnp.where(ok, u, 0.0), (m_new,)
  raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")


def param_math(p: jax.Array, u: jax.Array, wd, nlr, z) -> jax.Array:
  """The fused step's new parameter ``p + nlr * (u + wd * p)`` (decoupled weight decay, then
  ``nlr = -learning_rate``), in float32 with products rounded explicitly, rounded once to
  ``p.dtype``. ``u``: the float32 direction from :func:`step_math`."""
  p32 = p.astype(jnp.float32)
  return (p32 + (nlr * (u + (wd * p32 + z)) + z)).astype(p.dtype)


def nearest_code(v: jax.Array, lookup: Callable[[jax.Array], jax.Array],
                 code_at: Callable[[int], jax.Array]) -> jax.Array:
  """int32 index of the nearest of 256 ascending codes to ``v`` (see module docstring).

  ``lookup(idx)`` gathers codes at an int32 array; ``code_at(i)`` reads one at a static index.
  The same comparisons and midpoints as ``jaxbnb.functional.blockwise.nearest_code``.
  """
  top = 255
  pivot = jnp.full(v.shape, top // 2, jnp.int32)
  lower_pivot = jnp.zeros(v.shape, jnp.int32)
  upper_pivot = jnp.full(v.shape, top, jnp.int32)
  val = jnp.broadcast_to(code_at(top // 2), v.shape)
  lower = jnp.broadcast_to(code_at(0), v.shape)
  upper = jnp.broadcast_to(code_at(top), v.shape)
  step = (top + 1) // 4
  while step > 0:
    right = v > val
    lower_pivot, lower = jnp.where(right, pivot, lower_pivot), jnp.where(right, val, lower)
    upper_pivot, upper = jnp.where(right, upper_pivot, pivot), jnp.where(right, upper, val)
    pivot = jnp.where(right, pivot + step, pivot - step)
    val = lookup(pivot)
    step //= 2
  right = v > val
  best = jnp.where(right, jnp.where(v > (upper + val) * 0.5, upper_pivot, pivot),
                   jnp.where(v < (lower + val) * 0.5, lower_pivot, pivot))
  best_err = common.fabs(v - lookup(best))
  for cand in (pivot - 1, pivot, pivot + 1):
    cand = jnp.clip(cand, 0, top)
    err = common.fabs(v - lookup(cand))
    best, best_err = jnp.where(err < best_err, cand, best), jnp.minimum(err, best_err)
  return best


def requantize(new: jax.Array, valid, z, lookup, code_at, ops: Ops = XLA_OPS):
  """``(uint8 codes, float32 (rows, 1) absmax)`` of float32 ``new (rows, bs)``.

  As ``jaxbnb.optim.state.write_moment``: NaN -> 0, saturate at +-f32 max, padding (``valid``
  False, or None for none) -> 0, absmax = max |x| per row, codes nearest to
  ``x * (1/absmax) + z`` (rounded before the search subtracts codes from it: see step_math).
  """
  new = jnp.clip(jnp.nan_to_num(new, nan=0.0), -_F32_MAX, _F32_MAX)
  if valid is not None:
    new = jnp.where(valid, new, 0.0)
  absmax = jnp.max(common.fabs(new), axis=1, keepdims=True)
  safe = jnp.where(absmax == 0, jnp.float32(1), absmax)
  # 1/absmax is subnormal (flushed) above 2**126: scale such blocks first, as the XLA path does.
  tiny = jnp.where(absmax > 2.0**126, jnp.float32(2.0**-32), jnp.float32(1))
  q = nearest_code((new * tiny) * ops.div(jnp.ones_like(safe), safe * tiny) + z, lookup,
                   code_at)
  return q.astype(jnp.uint8), absmax


# --- the kernel -------------------------------------------------------------------------------


def _kernel(s_ref, g_ref, *refs, kind, n, nblocks, block_size, tb, with_param, interpret):
  nm, ns = NUM_MOMENTS[kind], NUM_SCALARS[kind]
  ops = XLA_OPS if interpret else TRITON_OPS
  p_ref, refs = (refs[0], refs[1:]) if with_param else (None, refs)
  ins, outs = refs[:3 * nm], refs[3 * nm:]
  out_ref, state_refs = outs[0], outs[1:]
  s = [s_ref[i] for i in range(ns)]
  z = s_ref[SCALAR_SLOTS - 1]  # always 0.0, read at run time
  # The last program's tile overhangs the (nblocks, bs) arrays when TB does not divide nblocks:
  # Pallas' Triton lowering neither bounds-checks nor masks it (interpret mode pads instead,
  # which hides it), and the state is aliased in place, so its rows past nblocks would be read
  # from and written to whatever lies behind the buffers. Mask every block load and store.
  row = pl.program_id(0) * tb + jax.lax.broadcasted_iota(jnp.int32, (tb, 1), 0)
  row_ok = None if nblocks % tb == 0 else row < nblocks                  # (TB, 1)
  blk_ok = None if row_ok is None else jnp.broadcast_to(row_ok, (tb, block_size))
  load = common.masked_load

  def store(ref, value, mask):
    from jax.experimental.pallas import triton as plt  # pylint: disable=g-import-not-at-top
    if mask is None:
      ref[...] = value
    else:
      plt.store(ref, value, mask=mask)

  old = []
  for j in range(nm):
    q_ref, a_ref, code_ref = ins[3 * j: 3 * j + 3]
    old.append(code_ref[load(q_ref, blk_ok).astype(jnp.int32)] * load(a_ref, row_ok))
  u, new = step_math(kind, s, z, load(g_ref, blk_ok), old, ops)
  if with_param:
    store(out_ref, param_math(load(p_ref, blk_ok), u, s_ref[ns], s_ref[ns + 1], z), blk_ok)
  else:
    store(out_ref, u.astype(out_ref.dtype), blk_ok)
  valid = None
  if n % block_size:  # only a ragged last block needs the mask
    col = jax.lax.broadcasted_iota(jnp.int32, (tb, block_size), 1)
    valid = row * block_size + col < n
  for j in range(nm):
    code_ref = ins[3 * j + 2]
    q, absmax = requantize(new[j], valid, z, lambda idx: code_ref[idx],
                           lambda i: code_ref[i], ops)
    store(state_refs[2 * j], q, blk_ok)
    store(state_refs[2 * j + 1], absmax, row_ok)


def _blocks(x: jax.Array, nblocks: int, block_size: int) -> jax.Array:
  flat = x.reshape(-1)
  pad = nblocks * block_size - flat.size
  return (jnp.pad(flat, (0, pad)) if pad else flat).reshape(nblocks, block_size)


def _unblocks(x: jax.Array, shape) -> jax.Array:
  size = int(np.prod(shape))
  flat = x.reshape(-1)
  return (flat[:size] if flat.size != size else flat).reshape(shape)


def scalar_vector(values: Sequence) -> jax.Array:
  """float32 ``(SCALAR_SLOTS,)``: the kind's scalars (Python floats or traced float32), then
  zeros; the last slot is the kernel's run-time zero ``z``."""
  if len(values) >= SCALAR_SLOTS:
    raise ValueError(f"at most {SCALAR_SLOTS - 1} scalars; got {len(values)}")
  vals = [jnp.asarray(v, jnp.float32).reshape(()) for v in values]
  vals += [jnp.zeros((), jnp.float32)] * (SCALAR_SLOTS - len(vals))
  return jnp.stack(vals)


def _check(kind, g, moments, codes):
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
  if len(moments) != NUM_MOMENTS[kind] or len(codes) != NUM_MOMENTS[kind]:
    raise ValueError(f"{kind}: needs {NUM_MOMENTS[kind]} moments and code tables")
  for q, absmax in moments:
    if q.shape != g.shape or q.dtype != jnp.uint8:
      raise ValueError(f"moment codes must be uint8 {g.shape}; got {q.dtype} {q.shape}")


@functools.partial(jax.jit, static_argnames=("kind", "block_size", "block_elems", "interpret",
                                             "num_warps"))
def update_8bit(g: jax.Array, moments: Sequence[tuple[jax.Array, jax.Array]],
                codes: Sequence[jax.Array], scalars: jax.Array, param: jax.Array | None = None,
                *, kind: str, block_size: int = 256, block_elems: int = 2048,
                interpret: bool = False, num_warps: int = 4):
  """One fused 8-bit optimizer step of one leaf (Pallas kernel; see the module docstring).

  Args:
    g: gradient, any shape, float32/bfloat16/float16.
    moments: per moment ``(q uint8 g.shape, absmax float32 (ceil(n / block_size),))``.
    codes: per moment its float32 ``(256,)`` ascending code table.
    scalars: float32 ``(SCALAR_SLOTS,)`` from :func:`scalar_vector`: the kind's scalars, then
      (with ``param``) ``weight_decay`` and ``-learning_rate``.
    param: optional parameter, ``g.shape``, any float dtype: when given the kernel returns the
      new parameter (:func:`param_math`) instead of the direction, updated in place.
    kind: "adam" | "lion" | "momentum" | "nesterov".
    block_elems: elements per program (rounded down to whole blocks, a power of two).

  Returns:
    ``(out, ((q, absmax), ...))``: ``out`` is the direction (``g.shape``, ``g.dtype``) or the new
    parameter; the new moments in the input layout.
  """
  _check(kind, g, moments, codes)
  n = g.size
  nblocks = -(-n // block_size)
  tb = common.pow2_at_most(nblocks, max(1, block_elems // block_size))
  blk = pl.BlockSpec((tb, block_size), lambda i: (i, 0))
  col = pl.BlockSpec((tb, 1), lambda i: (i, 0))
  table = pl.BlockSpec((256,), lambda i: (0,))
  in_specs = [pl.BlockSpec((SCALAR_SLOTS,), lambda i: (0,)), blk]
  # The barrier keeps XLA from constant-folding z (and the scalars) into the interpret-mode
  # kernel body, where it would drop ``x + 0`` and let products contract again.
  scalars = jax.lax.optimization_barrier(scalars.astype(jnp.float32))
  args = [scalars, _blocks(g, nblocks, block_size)]
  out_specs = [blk]
  out = param if param is not None else g
  out_shape = [jax.ShapeDtypeStruct((nblocks, block_size), out.dtype)]
  aliases = {}
  if param is not None:
    if param.shape != g.shape:
      raise ValueError(f"param {param.shape} and gradient {g.shape} differ in shape")
    aliases[len(args)] = 0
    in_specs.append(blk)
    args.append(_blocks(param, nblocks, block_size))
  for (q, absmax), code in zip(moments, codes):
    aliases[len(args)] = len(out_shape)
    aliases[len(args) + 1] = len(out_shape) + 1
    in_specs += [blk, col, table]
    args += [_blocks(q, nblocks, block_size), absmax.reshape(nblocks, 1).astype(jnp.float32),
             code.astype(jnp.float32)]
    out_specs += [blk, col]
    out_shape += [jax.ShapeDtypeStruct((nblocks, block_size), jnp.uint8),
                  jax.ShapeDtypeStruct((nblocks, 1), jnp.float32)]
  outs = pl.pallas_call(
      functools.partial(_kernel, kind=kind, n=n, nblocks=nblocks, block_size=block_size,
                        tb=tb, with_param=param is not None, interpret=interpret),
      out_shape=out_shape,
      grid=(pl.cdiv(nblocks, tb),),
      in_specs=in_specs,
      out_specs=out_specs,
      input_output_aliases=aliases,
      compiler_params=None if interpret else common.triton_params(num_warps, 1),
      interpret=interpret,
      name=f"optim8bit_{kind}_bs{block_size}",
  )(*args)
  new = tuple((_unblocks(outs[1 + 2 * j], g.shape), outs[2 + 2 * j].reshape(-1))
              for j in range(len(moments)))
  return _unblocks(outs[0], g.shape), new


@functools.partial(jax.jit, static_argnames=("kind", "block_size"))
def update_8bit_reference(g: jax.Array, moments: Sequence[tuple[jax.Array, jax.Array]],
                          codes: Sequence[jax.Array], scalars: jax.Array,
                          param: jax.Array | None = None, *, kind: str, block_size: int = 256):
  """Plain-jnp reference of :func:`update_8bit` (same arguments and outputs) on whole arrays."""
  _check(kind, g, moments, codes)
  n = g.size
  nblocks = -(-n // block_size)
  scalars = jax.lax.optimization_barrier(scalars.astype(jnp.float32))
  s = [scalars[i] for i in range(NUM_SCALARS[kind])]
  z = scalars[SCALAR_SLOTS - 1]
  old = [code[_blocks(q, nblocks, block_size).astype(jnp.int32)] * absmax.reshape(nblocks, 1)
         for (q, absmax), code in zip(moments, codes)]
  u, new = step_math(kind, s, z, _blocks(g, nblocks, block_size), old)
  flat = jnp.arange(nblocks * block_size, dtype=jnp.int32).reshape(nblocks, block_size)
  valid = flat < n if n % block_size else None
  out = []
  for x, code in zip(new, codes):
    q, absmax = requantize(x, valid, z, lambda idx, c=code: c[idx], lambda i, c=code: c[i])
    out.append((_unblocks(q, g.shape), absmax.reshape(-1)))
  if param is not None:
    ns = NUM_SCALARS[kind]
    p_new = param_math(_blocks(param, nblocks, block_size), u, scalars[ns], scalars[ns + 1], z)
    return _unblocks(p_new, g.shape), tuple(out)
  return _unblocks(u.astype(g.dtype), g.shape), tuple(out)
