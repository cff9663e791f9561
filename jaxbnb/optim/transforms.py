"""Building blocks: optax ``GradientTransformation``s whose moments are kept in 8 bits.

Each mirrors an optax transform (same argument names and outputs) and adds ``block_size``,
``min_8bit_size`` and ``fp32_mask``. They chain with ``optax.chain``, schedules,
``clip_by_global_norm``, ``MultiSteps`` and ``inject_hyperparams`` like their 32-bit twins.

Non-finite gradients (bitsandbytes' rule): an element whose gradient is NaN or +-Inf is
skipped — its moments keep their values and its update is 0 — so one bad element never
poisons the optimizer state, and an 8-bit run never turns NaN where it would not in float32.

``backend`` (Adam, Lion, momentum): ``"xla"`` (this module, runs everywhere), ``"pallas"`` (the
fused kernel of pallas_kernels/optim_8bit.py for every leaf whose moments are 8-bit; interpret
mode without a GPU, for tests) or ``"auto"`` (XLA until the kernel is timed on a GPU). Both give
the same bits: products are rounded explicitly (``a * b + z``, see jaxbnb.optim.state).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from jaxbnb import _backend, _explicit
from jaxbnb.optim.state import (MaskOrFn, QuantizedMoment, _code, check_block_size,
                                init_moment, read_moment, runtime_zero, use_8bit_tree,
                                write_moment)
from pallas_kernels import optim_8bit as _kernel


Scalar = Union[float, jax.Array]
ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]


def _value(x: ScalarOrSchedule, count):
  return x(count) if callable(x) else x


def _init(params, use8, *, signed: bool, block_size: int, fill: float = 0.0):
  """One moment per parameter leaf, as a flat tuple in flattening order.

  Flat, not mirroring ``params``: wrappers around the params (e.g. NNX ``Variable``s) would
  otherwise hold the moments, and ``nnx.Optimizer`` rebuilds Variable values as ``State``s,
  dropping the moments' static fields. Updates match moments to gradients by leaf order.
  """
  return tuple(init_moment(p, signed=signed, block_size=block_size, use_8bit=u, fill=fill)
               for p, u in zip(jax.tree.leaves(params), jax.tree.leaves(use8)))


def _is_moment(x) -> bool:
  return isinstance(x, QuantizedMoment)


def _moment_spec(mesh, g, m):
  """Spec of ``g``'s moment ``m``: shaped like ``g``, it shards like ``g``; its block-absmax
  stream follows ``g``'s leading-axis shards when no block straddles them."""
  spec = _explicit.spec_of(g, g.ndim)
  if not _is_moment(m):
    return P(*spec) if tuple(m.shape) == tuple(g.shape) else P(*(None,) * len(m.shape))
  rows = _explicit.leading(spec, tuple(range(g.ndim)))
  n_rows = g.shape[0] if g.ndim else 1
  n_cols = g.size // n_rows if n_rows else 0
  absmax = _explicit.stream(mesh, rows, n_rows, n_cols, m.absmax.shape[0], m.block_size)
  return QuantizedMoment(P(*spec), P(absmax), m.signed, m.block_size)


def _state_specs(mesh, like, state):
  """Specs for a state whose moment fields hold one moment per leaf of ``like`` (in order)."""
  g_leaves = jax.tree.leaves(like)

  def field(x):
    leaves, treedef = jax.tree.flatten(x, is_leaf=_is_moment)
    if len(leaves) == len(g_leaves) and leaves and all(
        _is_moment(m) or m.shape == g.shape for m, g in zip(leaves, g_leaves)):
      return treedef.unflatten([_moment_spec(mesh, g, m) for g, m in zip(g_leaves, leaves)])
    return jax.tree.map(lambda a: P(*(None,) * len(a.shape)), x)
  if isinstance(state, tuple) and hasattr(state, "_fields"):
    return type(state)(*(field(x) for x in state))
  return field(state)


def _explicit_mode(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` usable on params sharded under an Explicit mesh (see ``jaxbnb._explicit``): blocks
  are formed with Auto axes, moments come back sharded like their params."""
  def init_fn(params):
    return _explicit.call(tx.init, (params,),
                          lambda mesh, out: _state_specs(mesh, params, out))

  def update_fn(updates, state, params=None):
    def specs(mesh, out):
      return (jax.tree.map(lambda g: P(*_explicit.spec_of(g, g.ndim)), updates),
              _state_specs(mesh, updates, out[1]))
    return _explicit.call(tx.update, (updates, state, params), specs)
  return optax.GradientTransformation(init_fn, update_fn)


def _map(fn, updates, *moment_trees):
  """Apply ``fn(g, *moments) -> (update, *new_moments)`` per leaf; returns unzipped trees.

  Moment trees are matched to the updates leaf by leaf (in flattening order), and each keeps
  its own structure: wrappers such as ``nnx.Optimizer``'s state variables stay as they are.
  """
  is_moment = lambda x: isinstance(x, QuantizedMoment)
  g_leaves, g_def = jax.tree.flatten(updates)
  flat = [jax.tree.flatten(t, is_leaf=is_moment) for t in moment_trees]
  for leaves, _ in flat:
    if len(leaves) != len(g_leaves):
      raise ValueError(f"optimizer state holds {len(leaves)} moments for {len(g_leaves)} "
                       "gradient leaves: was it initialized with these params?")
  outs = [fn(g, *ms) for g, *ms in zip(g_leaves, *[leaves for leaves, _ in flat])]
  return (g_def.unflatten([o[0] for o in outs]),
          *(d.unflatten([o[i + 1] for o in outs]) for i, (_, d) in enumerate(flat)))


def _fused(kind, interpret, scalars, g, *moments):
  """The Pallas kernel for one leaf whose moments are all 8-bit, else None (XLA path)."""
  if (interpret is None or g.size == 0
      or not all(isinstance(m, QuantizedMoment) for m in moments)):
    return None
  block_size = moments[0].block_size
  u, new = _kernel.update_8bit(
      g, [(m.q, m.absmax) for m in moments], [_code(m.signed) for m in moments],
      _kernel.scalar_vector(scalars), kind=kind, block_size=block_size, interpret=interpret)
  return (u, *(QuantizedMoment(q, a, m.signed, m.block_size)
               for (q, a), m in zip(new, moments)))


def _finite(g):
  g = g.astype(jnp.float32)
  ok = jnp.isfinite(g)
  return jnp.where(ok, g, 0.0), ok


def adam_scalars(b1, b2, eps, eps_root, count, z):
  """Adam's per-step scalars ``(b1, 1-b1, b2, 1-b2, eps_root, eps*sqrt(c2), sqrt(c2)/c1)``
  (``c = 1 - b^t``): computed once per step, shared by the XLA path and the kernel."""
  t = count.astype(jnp.float32)
  c1, c2 = 1 - jnp.power(b1, t), 1 - jnp.power(b2, t)
  return (b1, 1 - b1, b2, 1 - b2, eps_root, eps * jnp.sqrt(c2) + z, jnp.sqrt(c2) / c1)


def adam_leaf(g, m, v, scalars, z):
  """XLA path of one leaf: ``(float32 direction, new m, new v)`` (moments stored like m, v)."""
  b1, c_b1, b2, c_b2, eps_root, eps_c2, scale = scalars
  g0, ok = _finite(g)
  m_old, v_old = read_moment(m), read_moment(v)
  m_new = jnp.where(ok, (b1 * m_old + z) + (c_b1 * g0 + z), m_old)
  v_new = jnp.where(ok, (b2 * v_old + z) + (c_b2 * g0 * g0 + z), v_old)
  denom = jnp.sqrt(v_new + eps_root) + eps_c2
  u = jnp.where(ok, scale * m_new / denom, 0.0)
  return u, write_moment(m, m_new), write_moment(v, v_new)


class ScaleByAdam8bitState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any


def scale_by_adam_8bit(b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8,
                       eps_root: Scalar = 0.0, *, block_size: int = 256,
                       min_8bit_size: int = 4096, fp32_mask: MaskOrFn = None,
                       backend: str = "auto") -> optax.GradientTransformation:
  """Adam's direction ``m_hat / (sqrt(v_hat + eps_root) + eps)`` with 8-bit ``m`` and ``v``.

  Computed as bitsandbytes does: ``sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps*sqrt(1-b2^t))``.
  """
  block_size = check_block_size(block_size)
  interpret = _backend.pallas_interpret(backend)

  def init_fn(params):
    use8 = use_8bit_tree(params, min_8bit_size, fp32_mask)
    return ScaleByAdam8bitState(jnp.zeros([], jnp.int32),
                                _init(params, use8, signed=True, block_size=block_size),
                                _init(params, use8, signed=False, block_size=block_size))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    z = runtime_zero()
    scalars = adam_scalars(b1, b2, eps, eps_root, count, z)

    def leaf(g, m, v):
      fused = _fused("adam", interpret, scalars, g, m, v)
      if fused is not None:
        return fused
      u, m, v = adam_leaf(g, m, v, scalars, z)
      return u.astype(g.dtype), m, v

    u, mu, nu = _map(leaf, updates, state.mu, state.nu)
    return u, ScaleByAdam8bitState(count, mu, nu)

  return _explicit_mode(optax.GradientTransformation(init_fn, update_fn))


class ScaleByLion8bitState(NamedTuple):
  count: jax.Array
  mu: Any


def scale_by_lion_8bit(b1: Scalar = 0.9, b2: Scalar = 0.99, *, block_size: int = 256,
                       min_8bit_size: int = 4096, fp32_mask: MaskOrFn = None,
                       backend: str = "auto") -> optax.GradientTransformation:
  """Lion's direction ``sign(b1*m + (1-b1)*g)``, then ``m = b2*m + (1-b2)*g`` in 8 bits."""
  block_size = check_block_size(block_size)
  interpret = _backend.pallas_interpret(backend)

  def init_fn(params):
    use8 = use_8bit_tree(params, min_8bit_size, fp32_mask)
    return ScaleByLion8bitState(jnp.zeros([], jnp.int32),
                                _init(params, use8, signed=True, block_size=block_size))

  def update_fn(updates, state, params=None):
    del params

    z = runtime_zero()

    def leaf(g, m):
      fused = _fused("lion", interpret, (b1, 1 - b1, b2, 1 - b2), g, m)
      if fused is not None:
        return fused
      g0, ok = _finite(g)
      m_old = read_moment(m)
      u = jnp.where(ok, jnp.sign((b1 * m_old + z) + ((1 - b1) * g0 + z)), 0.0)
      m_new = jnp.where(ok, (b2 * m_old + z) + ((1 - b2) * g0 + z), m_old)
      return u.astype(g.dtype), write_moment(m, m_new)

    u, mu = _map(leaf, updates, state.mu)
    return u, ScaleByLion8bitState(optax.safe_increment(state.count), mu)

  return _explicit_mode(optax.GradientTransformation(init_fn, update_fn))


class Trace8bitState(NamedTuple):
  trace: Any


def trace_8bit(decay: Scalar, nesterov: bool = False, *, block_size: int = 256,
               min_8bit_size: int = 4096, fp32_mask: MaskOrFn = None,
               backend: str = "auto") -> optax.GradientTransformation:
  """Momentum ``m = decay*m + g`` (``optax.trace``) with ``m`` in 8 bits; Nesterov returns
  ``g + decay*m``. At the first step ``m = g``, as in bitsandbytes' SGD."""
  block_size = check_block_size(block_size)
  interpret = _backend.pallas_interpret(backend)

  def init_fn(params):
    use8 = use_8bit_tree(params, min_8bit_size, fp32_mask)
    return Trace8bitState(_init(params, use8, signed=True, block_size=block_size))

  def update_fn(updates, state, params=None):
    del params

    z = runtime_zero()

    def leaf(g, m):
      fused = _fused("nesterov" if nesterov else "momentum", interpret, (decay,), g, m)
      if fused is not None:
        return fused
      g0, ok = _finite(g)
      m_old = read_moment(m)
      m_new = jnp.where(ok, (decay * m_old + z) + g0, m_old)
      u = g0 + (decay * m_new + z) if nesterov else m_new
      return jnp.where(ok, u, 0.0).astype(g.dtype), write_moment(m, m_new)

    u, tr = _map(leaf, updates, state.trace)
    return u, Trace8bitState(tr)

  return _explicit_mode(optax.GradientTransformation(init_fn, update_fn))


class ScaleByRms8bitState(NamedTuple):
  nu: Any


def scale_by_rms_8bit(decay: Scalar = 0.9, eps: Scalar = 1e-8, initial_scale: float = 0.0,
                      eps_in_sqrt: bool = True, *, block_size: int = 256,
                      min_8bit_size: int = 4096,
                      fp32_mask: MaskOrFn = None) -> optax.GradientTransformation:
  """RMSProp's ``g / sqrt(nu + eps)`` (``optax.scale_by_rms``) with ``nu`` in 8 bits
  (unsigned map: a second moment is never negative)."""
  block_size = check_block_size(block_size)

  def init_fn(params):
    use8 = use_8bit_tree(params, min_8bit_size, fp32_mask)
    return ScaleByRms8bitState(_init(params, use8, signed=False, block_size=block_size,
                                     fill=initial_scale))

  def update_fn(updates, state, params=None):
    del params

    def leaf(g, v):
      g0, ok = _finite(g)
      v_old = read_moment(v)
      v_new = jnp.where(ok, decay * v_old + (1 - decay) * g0 * g0, v_old)
      u = g0 * jax.lax.rsqrt(v_new + eps) if eps_in_sqrt else g0 / (jnp.sqrt(v_new) + eps)
      return jnp.where(ok, u, 0.0).astype(g.dtype), write_moment(v, v_new)

    u, nu = _map(leaf, updates, state.nu)
    return u, ScaleByRms8bitState(nu)

  return _explicit_mode(optax.GradientTransformation(init_fn, update_fn))


class ScaleByRss8bitState(NamedTuple):
  sum_of_squares: Any


def scale_by_rss_8bit(initial_accumulator_value: float = 0.1, eps: Scalar = 1e-7, *,
                      block_size: int = 256, min_8bit_size: int = 4096,
                      fp32_mask: MaskOrFn = None) -> optax.GradientTransformation:
  """Adagrad's ``g / sqrt(sum g^2 + eps)`` (``optax.scale_by_rss``), the sum in 8 bits."""
  block_size = check_block_size(block_size)

  def init_fn(params):
    use8 = use_8bit_tree(params, min_8bit_size, fp32_mask)
    return ScaleByRss8bitState(_init(params, use8, signed=False, block_size=block_size,
                                     fill=initial_accumulator_value))

  def update_fn(updates, state, params=None):
    del params

    def leaf(g, s):
      g0, ok = _finite(g)
      s_old = read_moment(s)
      s_new = jnp.where(ok, s_old + g0 * g0, s_old)
      inv = jnp.where(s_new > 0, jax.lax.rsqrt(s_new + eps), 0.0)
      return jnp.where(ok, g0 * inv, 0.0).astype(g.dtype), write_moment(s, s_new)

    u, ss = _map(leaf, updates, state.sum_of_squares)
    return u, ScaleByRss8bitState(ss)

  return _explicit_mode(optax.GradientTransformation(init_fn, update_fn))


class ScaleByAdemamix8bitState(NamedTuple):
  count: jax.Array
  count_m2: jax.Array
  m1: Any
  m2: Any
  nu: Any


def scale_by_ademamix_8bit(b1: Scalar = 0.9, b2: Scalar = 0.999,
                           b3: ScalarOrSchedule = 0.9999, alpha: ScalarOrSchedule = 5.0,
                           eps: Scalar = 1e-8, eps_root: Scalar = 0.0, *,
                           block_size: int = 256, min_8bit_size: int = 4096,
                           fp32_mask: MaskOrFn = None) -> optax.GradientTransformation:
  """AdEMAMix (``optax.contrib.scale_by_ademamix``): a fast and a slow EMA of the gradient and
  the second moment, all three in 8 bits:
  ``(m1_hat + alpha * m2) / (sqrt(nu_hat + eps_root) + eps)``."""
  block_size = check_block_size(block_size)

  def init_fn(params):
    use8 = use_8bit_tree(params, min_8bit_size, fp32_mask)
    z = jnp.zeros([], jnp.int32)
    return ScaleByAdemamix8bitState(
        z, z, _init(params, use8, signed=True, block_size=block_size),
        _init(params, use8, signed=True, block_size=block_size),
        _init(params, use8, signed=False, block_size=block_size))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    count_m2 = optax.safe_increment(state.count_m2)
    t = count.astype(jnp.float32)
    c1, c2 = 1 - jnp.power(b1, t), 1 - jnp.power(b2, t)
    b3_t, alpha_t = _value(b3, state.count_m2), _value(alpha, state.count_m2)

    def leaf(g, m1, m2, v):
      g0, ok = _finite(g)
      m1_old, m2_old, v_old = read_moment(m1), read_moment(m2), read_moment(v)
      m1_new = jnp.where(ok, b1 * m1_old + (1 - b1) * g0, m1_old)
      m2_new = jnp.where(ok, b3_t * m2_old + (1 - b3_t) * g0, m2_old)
      v_new = jnp.where(ok, b2 * v_old + (1 - b2) * g0 * g0, v_old)
      u = (m1_new / c1 + alpha_t * m2_new) / (jnp.sqrt(v_new / c2 + eps_root) + eps)
      return (jnp.where(ok, u, 0.0).astype(g.dtype), write_moment(m1, m1_new),
              write_moment(m2, m2_new), write_moment(v, v_new))

    u, m1, m2, nu = _map(leaf, updates, state.m1, state.m2, state.nu)
    return u, ScaleByAdemamix8bitState(count, count_m2, m1, m2, nu)

  return _explicit_mode(optax.GradientTransformation(init_fn, update_fn))
