"""8-bit blockwise quantization on the dynamic map (bitsandbytes ``quantize_blockwise``).

The array is flattened row-major and cut into blocks of ``blocksize`` elements (the last one may
be partial). Each block stores its absolute maximum; each element stores the index of the code
nearest to ``x * (1 / absmax)``.

Non-finite policy: a block holding NaN or +-Inf gets a NaN absmax, so that block, and only that
block, dequantizes to NaN. With nested statistics the NaN absmax poisons its second-level block
(``blocksize`` first-level blocks for 8-bit, 256 for 4-bit); the nesting offset is the mean of
the finite absmax values only, so every other block stays exact.

Extreme finite values: finite in, finite out, within the format's error bound. Where
bitsandbytes' float32 arithmetic over- or underflows (``1 / absmax`` subnormal for absmax >
2**126, the nested offset's sum past float32's max, a decoded nested absmax that rounds to
inf in the output dtype) jaxbnb computes the value bitsandbytes meant; everywhere else the
bits are bitsandbytes'.

Nearest code: bitsandbytes' rule is a binary search (:func:`_search`), 7 dependent table
lookups that XLA cannot fuse (one full-size buffer per step). On the dynamic maps
:func:`nearest_dynamic` gives the same index from the float's bits and one bucket lookup;
other tables keep the search. Arrays are processed by :func:`map_blocks`, a loop over
cache-sized chunks of whole blocks, so the absmax pass and the code pass read memory once
and the temporaries do not grow with the array.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb.functional import _checks
from jaxbnb.functional.codebooks import _dynamic_map_np, create_dynamic_map
from jaxbnb.functional.state import QuantState


def to_blocks(x: jax.Array, blocksize: int) -> jax.Array:
  """float32 ``(nblocks, blocksize)`` view of ``x`` flattened row-major, zero-padded."""
  flat = x.reshape(-1).astype(jnp.float32)
  nblocks = -(-flat.size // blocksize)
  return jnp.pad(flat, (0, nblocks * blocksize - flat.size)).reshape(nblocks, blocksize)


def block_absmax(blocks: jax.Array) -> jax.Array:
  """float32 ``(nblocks,)`` max |x| per block; NaN for a block holding any NaN or Inf."""
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  # Explicit test: XLA's vectorized CPU max does not always propagate NaN.
  bad = jnp.any(~jnp.isfinite(blocks), axis=1)
  return jnp.where(bad, jnp.nan, absmax)


_HUGE = np.float32(2.0**126)  # above this absmax, 1 / absmax is subnormal: flushed to zero
_RESCALE = np.float32(2.0**-64)
_SUM_SCALE = np.float32(2.0**-32)
_F32_MAX = np.float32(np.finfo(np.float32).max)


def _recip_rn(a: jax.Array) -> jax.Array:
  """float32 ``1 / a``, correctly rounded (to nearest, ties to even), from integer arithmetic.

  Exact wherever ``1 / a`` is a normal float (``a`` normal, ``|a| <= 2**126``), whatever the
  backend's float division does; elsewhere (0, subnormal, larger, inf, NaN) the plain ``1 / a``.
  """
  bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
  e = (bits >> 23) & jnp.uint32(0xFF)
  m = (bits & jnp.uint32(0x7FFFFF)) | jnp.uint32(0x800000)
  # |a| = m * 2**(e - 150), so 1 / |a| = (2**47 / m) * 2**(103 - e), 2**23 < 2**47 / m <= 2**24.
  # Long division of 2**47 by m in uint32: 2**31 // m < 2**8 first, then 8 bits at a time
  # (rem < m < 2**24, so rem << 8 and d * m stay below 2**32).
  top = jnp.uint32(2**31)
  q = jax.lax.div(top, m)
  rem = top - q * m
  for _ in range(2):
    rem = rem << 8
    d = jax.lax.div(rem, m)
    rem, q = rem - d * m, (q << 8) | d
  q = q + ((2 * rem > m) | ((2 * rem == m) & ((q & 1) == 1))).astype(jnp.uint32)
  # q in [2**23, 2**24]: q - 2**23 is the mantissa field and q == 2**24 (|a| a power of 2)
  # carries into the biased exponent 253 - e. Below 2**23 the result would be subnormal.
  mag = ((253 - e.astype(jnp.int32)) << 23) + (q.astype(jnp.int32) - (1 << 23))
  exact = (e >= 1) & (mag >= (1 << 23))
  out = jax.lax.bitcast_convert_type(mag, jnp.uint32) | (bits & jnp.uint32(0x80000000))
  return jnp.where(exact, jax.lax.bitcast_convert_type(out, jnp.float32), jnp.float32(1) / a)


def reciprocal(absmax: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(rcp, post)``, float32 like ``absmax``: ``x * rcp * post`` is bnb's ``x * (1 / absmax)``.

  For absmax > 2**126 bnb's reciprocal is subnormal, flushed to zero (finite values would come
  back as 0): there ``rcp = 1 / (absmax * 2**-64)`` and ``post = 2**-64``, powers of two that
  give the same rounding. Elsewhere ``post`` is 1 (exact), so the bits are bnb's. A zero absmax
  (all-zero block) gets ``rcp = 1`` (bnb's 0 * inf would give NaN codes there).

  Off CPU the division is :func:`_recip_rn`: XLA:GPU's fused f32 division is not correctly
  rounded (1-ulp reciprocals flipped FP4 codes on an H100, 2026-11-27). XLA:CPU's is.
  """
  huge = absmax > _HUGE
  safe = jnp.where(absmax == 0, jnp.float32(1), absmax)
  rcp = jax.lax.platform_dependent(jnp.where(huge, safe * _RESCALE, safe),
                                   cpu=lambda a: jnp.float32(1) / a, default=_recip_rn)
  return rcp, jnp.where(huge, _RESCALE, jnp.float32(1))


def normalize(blocks: jax.Array, absmax: jax.Array) -> jax.Array:
  """``blocks / absmax`` per row, rounded as bitsandbytes does (times the reciprocal).

  An all-zero block maps to zeros; a block with absmax > 2**126 is normalized too (see
  :func:`reciprocal`). Subnormal values are flushed to zero by XLA on CPU and GPU (as by bnb's
  fast-math kernels), so a block of only subnormals dequantizes to zeros.
  """
  rcp, post = reciprocal(absmax)
  return blocks.astype(jnp.float32) * rcp[:, None] * post[:, None]


def _search(v, code, xp=jnp):
  """Index of a nearest entry of the ascending 256-entry ``code`` to each float32 ``v``.

  bitsandbytes' 7-step binary search (``dQuantize``), whose midpoint test misses the nearest
  code on ~0.2% of inputs, then corrected among the pivot's neighbours: always a nearest code,
  and at exact ties the one bitsandbytes picks. ``xp`` is ``jnp`` (traced: a chain of dependent
  gathers) or ``np`` (on the host, to derive :func:`nearest_dynamic`'s tables); int32 result.
  """
  top = code.shape[0] - 1
  pivot = xp.full(v.shape, top // 2, xp.int32)
  lower_pivot = xp.zeros(v.shape, xp.int32)
  upper_pivot = xp.full(v.shape, top, xp.int32)
  # Scalars broadcast (not code[pivot]): a gather at constant indices from a constant table
  # would be constant-folded into an array the size of the input.
  val = xp.broadcast_to(code[top // 2], v.shape)
  lower, upper = xp.broadcast_to(code[0], v.shape), xp.broadcast_to(code[top], v.shape)
  step = (top + 1) // 4
  while step > 0:
    right = v > val
    lower_pivot, lower = xp.where(right, pivot, lower_pivot), xp.where(right, val, lower)
    upper_pivot, upper = xp.where(right, upper_pivot, pivot), xp.where(right, upper, val)
    pivot = xp.where(right, pivot + step, pivot - step)
    val = code[pivot]
    step //= 2
  right = v > val
  bnb = xp.where(right, xp.where(v > (upper + val) * 0.5, upper_pivot, pivot),
                 xp.where(v < (lower + val) * 0.5, lower_pivot, pivot))
  best, best_err = bnb, xp.abs(v - code[bnb])
  for cand in (pivot - 1, pivot, pivot + 1):
    cand = xp.clip(cand, 0, top)
    err = xp.abs(v - code[cand])
    best, best_err = xp.where(err < best_err, cand, best), xp.minimum(err, best_err)
  return best


class _IndexTable(NamedTuple):
  """:func:`nearest_dynamic`'s tables for one code (host NumPy; see :func:`_index_table`)."""

  floor: int        # float32 magnitude bits where bucket 0 ends (smaller ones share it)
  ceil: int         # magnitude bits from which on everything shares the last bucket
  shift: int        # log2 of the float32 magnitudes per bucket
  center: int       # index of the bucket of +-0; negative values count down from it
  base: np.ndarray  # uint8 (nbuckets,): the search's result at the bucket's lowest value
  thr: np.ndarray   # float32 (nbuckets,): where inside the bucket it grows by one (NaN: never)


def _f32_key(bits: np.ndarray) -> np.ndarray:
  """int64 total order of float32 bit patterns (as int32): -0.0 and +0.0 share key 0."""
  return np.where(bits >= 0, bits, -(bits & 0x7FFFFFFF)).astype(np.int64)


def _from_key(key: np.ndarray) -> np.ndarray:
  mag = np.abs(key).astype(np.uint32) | np.where(key < 0, np.uint32(1 << 31), np.uint32(0))
  return mag.view(np.float32)


@functools.lru_cache(maxsize=None)
def _index_table(signed: bool) -> _IndexTable:
  """Tables that give :func:`_search`'s result on the dynamic map without searching.

  The search's result is a non-decreasing step function of ``v`` (checked when written on every
  float32 of magnitude <= 2, and by tests near every step): ``#{k : v >= t_k}`` for 255 thresholds
  ``t_k`` found here by bisection over float32 with the search itself. The float32 magnitude
  bits, cut into buckets of ``2**shift`` consecutive floats, hold at most one threshold each.
  """
  code = _dynamic_map_np(signed, 7, 8)
  lo = np.full(255, _f32_key(np.float32(-2).view(np.int32)))
  hi = np.full(255, _f32_key(np.float32(2).view(np.int32)))
  k = np.arange(1, 256)
  while np.any(hi - lo > 1):  # invariant: search(lo) < k <= search(hi)
    mid = (lo + hi) // 2
    up = _search(_from_key(mid), code, np) >= k
    lo, hi = np.where(up, lo, mid), np.where(up, mid, hi)
  thr = _from_key(hi)
  if np.any(np.diff(thr) <= 0):
    raise AssertionError("dynamic map: every code must win somewhere")
  mag = thr.view(np.int32) & 0x7FFFFFFF
  floor = int(np.float32(2.0 ** np.floor(np.log2(np.abs(thr).min()))).view(np.int32))
  ceil = int(np.float32(2).view(np.int32))
  for shift in range(23, -1, -1):  # the coarsest buckets that separate all thresholds
    half = (ceil - floor) >> shift
    center = half if thr[0] < 0 else 0
    b = (mag - floor) >> shift
    bucket = np.where(thr < 0, center - b, center + b)
    if np.all(np.diff(bucket) > 0):
      break
  nbuckets = center + half + 1
  base = np.searchsorted(bucket, np.arange(nbuckets), side="left").astype(np.uint8)
  table = np.full(nbuckets, np.nan, np.float32)
  table[bucket] = thr
  return _IndexTable(floor, ceil, shift, center, base, table)


def nearest_dynamic(v: jax.Array, signed: bool = True) -> jax.Array:
  """uint8 index of the nearest code of the dynamic map to float32 ``v``, any shape.

  Equals :func:`_search` (bitsandbytes' rule) on every float32, NaN included (code 0), but with
  no dependent gathers: the float's bits pick a bucket, whose base index and single threshold
  (two independent lookups in a table of a few KiB) give the code. XLA fuses it into one
  elementwise loop.
  """
  t = _index_table(bool(signed))
  v = v.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(v, jnp.int32)
  mag = bits & 0x7FFFFFFF
  neg = (bits < 0) | (mag > 0x7F800000)  # NaN joins the bottom bucket: code 0, as the search
  b = (jnp.clip(mag, t.floor, t.ceil) - t.floor) >> t.shift
  bucket = jnp.where(neg, jnp.maximum(t.center - b, 0), t.center + b)
  base = jnp.asarray(t.base).at[bucket].get(mode="promise_in_bounds")
  thr = jnp.asarray(t.thr).at[bucket].get(mode="promise_in_bounds")
  return base + (v >= thr).astype(jnp.uint8)


def dynamic_sign(code) -> bool | None:
  """True/False when ``code`` is concretely the signed/unsigned dynamic map, else None."""
  if code is None:
    return True
  if isinstance(code, jax.core.Tracer):
    return None
  c = np.asarray(code)
  for signed in (True, False):
    if c.shape == (256,) and np.array_equal(c, _dynamic_map_np(signed, 7, 8)):
      return signed
  return None


def nearest_code(v: jax.Array, code: jax.Array) -> jax.Array:
  """uint8 index of the entry of the ascending 256-entry ``code`` nearest to each ``v``.

  bitsandbytes' rule (see :func:`_search`): always a nearest code, and at exact ties the one
  bitsandbytes picks. A concrete dynamic map takes :func:`nearest_dynamic` (same result, no
  gather chain); any other table, or a traced one, runs the search.
  """
  signed = dynamic_sign(code)
  if signed is not None:
    return nearest_dynamic(v, signed)
  return _search(v, code).astype(jnp.uint8)


CHUNK = 1 << 17  # elements per step of map_blocks: its buffers stay in L2/L3; ~0.1-1 ms of work


def map_blocks(fn: Callable, elems: Sequence[jax.Array], blocks: Sequence[jax.Array],
               out_elems: Sequence[jax.Array], out_blocks: Sequence[jax.Array],
               block_size: int, chunk: int | None = None) -> tuple[list, list]:
  """Apply a per-block function over flat arrays chunk by chunk, in a loop.

  XLA:CPU fuses no elementwise producer into a reduction it does not hand to YNNPACK (a select,
  compare or gather), so a whole-array ``max(|f(x)|)`` per block writes ``f(x)`` out in full.
  Here every intermediate is one chunk (``chunk`` elements of whole blocks) that stays in
  cache, whatever the array size: temporaries are bounded, and memory is read once.

  Args:
    fn: ``fn(valid, *elem_chunks, *block_chunks, *out_elem_chunks, *out_block_chunks) ->
      (elem_results, block_results)``: the chunks of the inputs, then the outputs' current
      contents there; chunks are ``(r, block_size)`` and ``(r,)``, results likewise. ``valid``
      is None, or for the ragged last chunk a bool ``(r, block_size)`` mask (False on the zero
      padding past the end).
    elems: flat ``(n,)`` arrays. blocks: ``(ceil(n / block_size),)`` arrays.
    out_elems, out_blocks: the results' buffers (flat), updated chunk by chunk in place. An
      array updated in place (an optimizer state) is passed here only, not also as an input:
      ``fn`` reads its old chunk, and with donated buffers nothing is copied.
    chunk: elements per loop step (default :data:`CHUNK`), rounded down to whole blocks.

  Returns:
    ``(elem_results, block_results)``: the filled ``out_elems`` and ``out_blocks``.
  """
  n = (list(elems) + list(out_elems))[0].shape[0]
  args = ((list(elems), list(blocks)), (list(out_elems), list(out_blocks)))
  chunked = functools.partial(_map_chunks, fn, n, block_size, chunk or CHUNK)
  if n <= (chunk or CHUNK):
    return chunked(*args)
  # The loop is for XLA:CPU. XLA:GPU/TPU fuse a reduction with its elementwise producers, and
  # each loop step there would cost kernel launches: the whole array is one chunk.
  return jax.lax.platform_dependent(
      *args, cpu=chunked, default=functools.partial(_map_chunks, fn, n, block_size, n))


def _map_chunks(fn, n, block_size, chunk, ins, outs):
  rows = max(1, min(chunk // block_size, -(-n // block_size)))
  step = rows * block_size
  full = n // step

  def run(start, brow, length, valid, ins, outs):
    r = -(-length // block_size)
    pad = r * block_size - length

    def elem(x):
      x = jax.lax.dynamic_slice_in_dim(x, start, length)
      return (jnp.pad(x, (0, pad)) if pad else x).reshape(r, block_size)
    block = lambda b: jax.lax.dynamic_slice_in_dim(b, brow, r)
    res_e, res_b = fn(valid, *map(elem, ins[0]), *map(block, ins[1]), *map(elem, outs[0]),
                      *map(block, outs[1]))
    new_e = [jax.lax.dynamic_update_slice_in_dim(o, x.reshape(-1)[:length], start, 0)
             for o, x in zip(outs[0], res_e)]
    new_b = [jax.lax.dynamic_update_slice_in_dim(o, x, brow, 0)
             for o, x in zip(outs[1], res_b)]
    return new_e, new_b

  tail = n - full * step
  if tail:  # first: then the loop updates the buffers that the tail's update created, in place
    r = -(-tail // block_size)
    valid = None
    if tail % block_size:
      valid = jnp.arange(r * block_size, dtype=jnp.int32).reshape(r, block_size) < tail
    outs = run(full * step, full * rows, tail, valid, ins, outs)
  if full == 1:
    outs = run(0, 0, step, None, ins, outs)
  elif full:
    # The inputs ride in the carry (XLA passes loop constants that way anyway): captured, they
    # would be typed on the context mesh while the carry is not (jax.eval_shape under an
    # Explicit mesh, see jaxbnb._explicit).
    _, outs = jax.lax.fori_loop(
        0, full, lambda i, c: (c[0], run(i * step, i * rows, step, None, *c)), (ins, outs))
  return outs


def _nested_offset(absmax: jax.Array) -> jax.Array:
  # torch's mean is sum * (1/n); only finite entries count (the non-finite policy).
  finite = jnp.isfinite(absmax)
  values = jnp.where(finite, absmax, 0)
  rcount = jnp.float32(1) / jnp.maximum(jnp.sum(finite), 1).astype(jnp.float32)
  total = jnp.sum(values)
  # Absmax values near float32's max overflow the sum (bnb's offset is then inf, and every
  # block NaN): sum them scaled by 2**-32 (exact) instead, which cannot overflow.
  scaled = jnp.minimum(jnp.sum(values * _SUM_SCALE) * rcount * (1 / _SUM_SCALE), _F32_MAX)
  return jnp.where(jnp.isinf(total), scaled, total * rcount)


@functools.lru_cache(maxsize=None)
def finite_limit(dtype) -> np.float32:
  """The largest float32 that rounds to a finite value of float ``dtype`` (float32: its max).

  float16: 65519.996 (65520 rounds to inf); bfloat16: just below (2 - 2**-8) * 2**127.
  """
  info = jnp.finfo(dtype)
  if info.bits >= 32:
    return _F32_MAX
  ulp = 2.0 ** (info.maxexp - 1 - info.nmant)  # spacing of the largest binade
  halfway = np.float32(float(info.max) + ulp / 2)  # exact: few mantissa bits
  return np.nextafter(halfway, np.float32(0))


def nest_absmax(absmax: jax.Array, blocksize: int) -> tuple[jax.Array, jax.Array, QuantState]:
  """Double quantization: ``(uint8 codes of absmax - offset, offset, their QuantState)``."""
  # The barrier keeps XLA from fusing ``absmax - sum * (1/n)`` into one FMA inside a larger
  # program (a vmapped stack, a model): bnb rounds the offset first.
  offset = jax.lax.optimization_barrier(_nested_offset(absmax))
  qabsmax, state2 = _quantize(absmax - offset, create_dynamic_map(), blocksize, False, True)
  return qabsmax, offset, state2


def unnest_absmax(state: QuantState) -> jax.Array:
  """float32 ``(nblocks,)`` per-block absmax of ``state``, decoding nested statistics."""
  if not state.nested:
    return state.absmax.astype(jnp.float32)
  # The barrier keeps XLA from fusing code * absmax2 + offset into one FMA: bnb rounds twice.
  absmax = jax.lax.optimization_barrier(_dequantize(state.absmax, state.state2)) + state.offset
  # The quantization error of the nested codes can lift a block's absmax past what the output
  # dtype holds (fp16 data at 65504 decoding as 65532: bnb gives inf there). Clip it to the
  # largest float32 that still rounds to a finite output: a no-op wherever bnb stays finite.
  return jnp.minimum(absmax, finite_limit(np.dtype(state.dtype)))


def quantize_blocks(blocks: jax.Array,
                    nearest: Callable[[jax.Array], jax.Array] = nearest_dynamic,
                    valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """``(uint8 codes, float32 absmax (rows,))`` of ``(rows, blocksize)`` blocks.

  ``nearest``: float32 -> uint8 code index (default the signed dynamic map); ``valid``: None or a
  bool mask of ``blocks``' shape, False on padding (set to 0 first).
  """
  blocks = blocks.astype(jnp.float32)
  if valid is not None:
    blocks = jnp.where(valid, blocks, 0)
  absmax = block_absmax(blocks)
  return nearest(normalize(blocks, absmax)), absmax


def _quantize(x, code, blocksize, nested, signed):
  """``signed``: True/False when ``code`` is the signed/unsigned dynamic map (the fast rule),
  None for any other table (the search)."""
  if signed is None:
    nearest = lambda v: _search(v, code).astype(jnp.uint8)
  else:
    nearest = functools.partial(nearest_dynamic, signed=signed)
  n = x.size
  nblocks = -(-n // blocksize)
  (q,), (absmax,) = map_blocks(
      lambda valid, xb, *_: tuple((r,) for r in quantize_blocks(xb, nearest, valid)),
      [x.reshape(-1)], [], [jnp.zeros((n,), jnp.uint8)], [jnp.zeros((nblocks,), jnp.float32)],
      blocksize)
  q = q.reshape(x.shape)
  dtype = np.dtype(x.dtype)
  if nested:
    qabsmax, offset, state2 = nest_absmax(absmax, blocksize)
    return q, QuantState(absmax=qabsmax, code=code, offset=offset, state2=state2,
                         blocksize=blocksize, quant_type="dynamic", shape=x.shape, dtype=dtype)
  return q, QuantState(absmax=absmax, code=code, blocksize=blocksize, quant_type="dynamic",
                       shape=x.shape, dtype=dtype)


def dequantize_blocks(q: jax.Array, absmax: jax.Array, code: jax.Array,
                      block_size: int) -> jax.Array:
  """float32 ``code[q] * absmax[block]`` of flat uint8 ``q``: one gather, fused elementwise."""
  # A uint8 index is always inside a 256-entry table: no bounds handling in the gather.
  mode = "promise_in_bounds" if code.shape[0] >= 256 else None
  values = code.astype(jnp.float32).at[q.reshape(-1)].get(mode=mode)
  n = values.size
  pad = absmax.size * block_size - n
  blocks = (jnp.pad(values, (0, pad)) if pad else values).reshape(absmax.size, block_size)
  out = (blocks * absmax[:, None]).reshape(-1)
  return out[:n] if pad else out


def _dequantize(q, state):
  absmax = unnest_absmax(state)
  out = dequantize_blocks(q, absmax, state.code, state.blocksize)
  return out.reshape(q.shape).astype(state.dtype)


_quantize_jit = jax.jit(_quantize, static_argnames=("blocksize", "nested", "signed"))
_dequantize_jit = jax.jit(_dequantize)


def quantize_blockwise(x: jax.Array, code: jax.Array | None = None, blocksize: int = 4096,
                       nested: bool = False) -> tuple[jax.Array, QuantState]:
  """Blockwise 8-bit quantization (bitsandbytes ``quantize_blockwise``).

  Args:
    x: floating array of any shape (float32, bfloat16, float16).
    code: ascending float32 ``(256,)`` table; default the signed dynamic map.
    blocksize: one of 64, 128, ..., 4096.
    nested: also quantize the absmax (offset = mean, 8-bit dynamic, same blocksize).

  Returns:
    ``(q, state)``: uint8 codes of ``x.shape`` and the ``QuantState``.
  """
  _checks.check_float_input(x, "quantize_blockwise")
  blocksize = _checks.check_blocksize(blocksize, _checks.BLOCKSIZES_8BIT, "quantize_blockwise")
  x = jnp.asarray(x)
  if x.size == 0:
    raise ValueError("quantize_blockwise: x is empty")
  signed = dynamic_sign(code)
  code = create_dynamic_map() if code is None else jnp.asarray(code, jnp.float32)
  return _quantize_jit(x, code, blocksize, bool(nested), signed)


def dequantize_blockwise(q: jax.Array, state: QuantState | None = None, *,
                         absmax: jax.Array | None = None, code: jax.Array | None = None,
                         blocksize: int = 4096, dtype=jnp.float32) -> jax.Array:
  """Inverse of :func:`quantize_blockwise`: ``code[q] * absmax[block]`` in ``state.dtype``.

  Pass ``state``, or (as bitsandbytes allows) ``absmax`` with optional ``code``/``blocksize``.
  A state that does not fit ``q`` (another array's, a 4-bit one, an edited blocksize or a
  truncated absmax) raises ``ValueError``.
  """
  _checks.check_uint8(q, "dequantize_blockwise")
  q = jnp.asarray(q)
  if state is None:
    if absmax is None:
      raise ValueError("dequantize_blockwise needs a QuantState or absmax=")
    blocksize = _checks.check_blocksize(blocksize, _checks.BLOCKSIZES_8BIT,
                                        "dequantize_blockwise")
    state = QuantState(absmax=jnp.asarray(absmax, jnp.float32),
                       code=create_dynamic_map() if code is None else jnp.asarray(code),
                       blocksize=blocksize, shape=q.shape, dtype=np.dtype(dtype))
  _checks.check_state(state, q.size, 8, "dequantize_blockwise")
  return _dequantize_jit(q, state)
