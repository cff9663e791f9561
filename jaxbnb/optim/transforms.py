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
from jaxbnb.optim import _blocks
from jaxbnb.optim.fourbit_state import Blockwise4bit, Rank1Moment, is_4bit
from jaxbnb.optim.state import (MaskOrFn, QuantizedMoment, _code, check_block_size,
                                init_moment, read_moment, runtime_zero, update_moments,
                                use_8bit_tree)
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
  return isinstance(x, QuantizedMoment) or is_4bit(x)


def _moment_spec(mesh, g, m, spec=None):
  """Spec of ``g``'s moment ``m``: shaped like ``g``, it shards like ``g`` (``spec``, default
  ``g``'s type's); its block scales follow ``g``'s shards where no block straddles them
  (``jaxbnb.optim._blocks.block_spec``)."""
  spec = _explicit.spec_of(g, g.ndim) if spec is None else tuple(spec)
  if not _is_moment(m):
    return P(*spec) if tuple(m.shape) == tuple(g.shape) else P(*(None,) * len(m.shape))
  if isinstance(m, Rank1Moment):  # rows of codes follow g's axis 0; each maximum its axis
    rows = _explicit.leading(spec, tuple(range(g.ndim)))
    return Rank1Moment(P(rows, None), tuple(P(a) for a in spec), m.shape)
  blocks = _blocks.block_spec(mesh, g.shape, spec, m.block_size)
  if isinstance(m, Blockwise4bit):
    return Blockwise4bit(P(*blocks, None), P(*blocks), m.signed, m.block_size, m.shape)
  return QuantizedMoment(P(*spec), P(*blocks), m.signed, m.block_size)


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
  if isinstance(state, tuple):  # an optax.chain's states
    return tuple(_state_specs(mesh, like, x) for x in state)
  return field(state)


def _auto_context(fn):
  """``fn`` traced with the context mesh's Explicit axes made Auto.

  ``_explicit.call`` first shapes ``fn``'s outputs with ``jax.eval_shape`` on unsharded
  stand-ins under the Explicit context mesh: constants traced there are typed on that mesh, and
  the chunk loop's in-place updates (``map_blocks``) refuse to mix the two typings.
  """
  def wrapped(*args):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not mesh.explicit_axes:
      return fn(*args)
    auto = mesh.update_axis_types({a: jax.sharding.AxisType.Auto for a in mesh.explicit_axes})
    with jax.sharding.use_abstract_mesh(auto):
      return fn(*args)
  return wrapped


def _explicit_mode(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` usable on params sharded under an Explicit mesh (see ``jaxbnb._explicit``): blocks
  are formed with Auto axes, moments come back sharded like their params."""
  tx = optax.GradientTransformation(_auto_context(tx.init), _auto_context(tx.update))

  def init_fn(params):
    return _explicit.call(tx.init, (params,),
                          lambda mesh, out: _state_specs(mesh, params, out))

  def update_fn(updates, state, params=None):
    def specs(mesh, out):
      return (jax.tree.map(lambda g: P(*_explicit.spec_of(g, g.ndim)), updates),
              _state_specs(mesh, updates, out[1]))
    return _explicit.call(tx.update, (updates, state, params), specs)
  return optax.GradientTransformation(init_fn, update_fn)


def _map(fn, updates, *moment_trees, params=None):
  """Apply ``fn(g, *moments) -> (update, *new_moments)`` per leaf; returns unzipped trees.

  Moment trees are matched to the updates leaf by leaf (in flattening order), and each keeps
  its own structure: wrappers such as ``nnx.Optimizer``'s state variables stay as they are.
  With ``params``, ``fn(g, p, *moments)``.
  """
  is_moment = _is_moment
  g_leaves, g_def = jax.tree.flatten(updates)
  extra = [] if params is None else [g_def.flatten_up_to(params)]
  flat = [jax.tree.flatten(t, is_leaf=is_moment) for t in moment_trees]
  for leaves, _ in flat:
    if len(leaves) != len(g_leaves):
      raise ValueError(f"optimizer state holds {len(leaves)} moments for {len(g_leaves)} "
                       "gradient leaves: was it initialized with these params?")
  outs, done = [], None
  for args in zip(g_leaves, *extra, *[leaves for leaves, _ in flat]):
    if done is not None and any(is_moment(m) for m in args):
      # One 8-bit leaf after the other: a gradient computed in the jitted step (an earlier
      # transform of a chain) is materialized for the update loop, and XLA would otherwise
      # compute them all first, holding every leaf's float32 copy at once.
      args, _ = jax.lax.optimization_barrier((args, done))
    outs.append(fn(*args))
    loops = [m.absmax if isinstance(m, QuantizedMoment) else m.q
             for m in outs[-1][1:] if is_moment(m)]
    done = loops or done
  return (g_def.unflatten([o[0] for o in outs]),
          *(d.unflatten([o[i + 1] for o in outs]) for i, (_, d) in enumerate(flat)))


def _fused(kind, interpret, scalars, g, *moments):
  """The Pallas kernel for one leaf whose moments are all 8-bit, else None (XLA path)."""
  if (interpret is None or g.size == 0
      or not all(isinstance(m, QuantizedMoment) for m in moments)):
    return None
  block_size = moments[0].block_size
  u, new = _kernel.update_8bit(
      g, [(m.q, m.absmax.reshape(-1)) for m in moments], [_code(m.signed) for m in moments],
      _kernel.scalar_vector(scalars), kind=kind, block_size=block_size, interpret=interpret)
  return (u, *(QuantizedMoment(q, a.reshape(m.absmax.shape), m.signed, m.block_size)
               for (q, a), m in zip(new, moments)))


def _finite(g, sq_scale=None):
  """``(g with non-finite elements zeroed, ok)`` in float32.

  ``ok``: the element is finite and, with ``sq_scale``, so is ``sq_scale * g * g`` (a second
  moment's increment, computed as the update computes it). An element that fails is skipped
  (moments kept, update 0), as bitsandbytes skips a NaN/Inf gradient: an increment that
  overflows float32 would otherwise saturate its block's scale and read the rest of the block
  back as 0 (``v = 0`` makes Adam's update ``m / eps``). Elements that pass are computed as
  bitsandbytes computes them, bit for bit.
  """
  g = g.astype(jnp.float32)
  ok = jnp.isfinite(g)
  g0 = jnp.where(ok, g, 0.0)
  if sq_scale is not None:
    ok = ok & jnp.isfinite(sq_scale * g0 * g0)
    g0 = jnp.where(ok, g0, 0.0)
  return g0, ok


def adam_scalars(b1, b2, eps, eps_root, count, z):
  """Adam's per-step scalars ``(b1, 1-b1, b2, 1-b2, eps_root, eps*sqrt(c2), sqrt(c2)/c1)``
  (``c = 1 - b^t``): computed once per step, shared by the XLA path and the kernel."""
  t = count.astype(jnp.float32)
  c1, c2 = 1 - jnp.power(b1, t), 1 - jnp.power(b2, t)
  return (b1, 1 - b1, b2, 1 - b2, eps_root, eps * jnp.sqrt(c2) + z, jnp.sqrt(c2) / c1)


def _step(fn, g, *moments, sq_scale=None):
  """``(new moments stored like moments, (g0, ok, *new float32 values))`` of one leaf.

  The stored moments come from :func:`update_moments` (chunked); the float32 values are
  ``fn`` recomputed from the old state, elementwise: the direction built from them fuses into
  its consumers instead of materializing a float32 copy of the moments. ``sq_scale``: as in
  :func:`_finite` (``fn``'s own skip rule).
  """
  stored = update_moments(fn, (g,), moments)
  g0, ok = _finite(g, sq_scale)
  return stored, (g0, ok, *fn(g, *(read_moment(m) for m in moments)))


def adam_moments(scalars, z):
  """Adam's moment rule ``fn(g, m_old, v_old) -> (m_new, v_new)`` (float32, elementwise)."""
  b1, c_b1, b2, c_b2 = scalars[:4]

  def fn(g, m_old, v_old):
    g0, ok = _finite(g, c_b2)
    return (jnp.where(ok, (b1 * m_old + z) + (c_b1 * g0 + z), m_old),
            jnp.where(ok, (b2 * v_old + z) + (c_b2 * g0 * g0 + z), v_old))
  return fn


def adam_direction(g, m_new, v_new, scalars):
  """float32 ``sqrt(c2)/c1 * m / (sqrt(v + eps_root) + eps*sqrt(c2))``, 0 where g is not finite."""
  eps_root, eps_c2, scale = scalars[4:]
  _, ok = _finite(g, scalars[3])
  return jnp.where(ok, scale * m_new / (jnp.sqrt(v_new + eps_root) + eps_c2), 0.0)


def adam_leaf(g, m, v, scalars, z):
  """XLA path of one leaf: ``(float32 direction, new m, new v)`` (moments stored like m, v)."""
  (m, v), (_, _, m_new, v_new) = _step(adam_moments(scalars, z), g, m, v, sq_scale=scalars[3])
  return adam_direction(g, m_new, v_new, scalars), m, v


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
      def moment(g, m_old):
        g0, ok = _finite(g)
        return (jnp.where(ok, (b2 * m_old + z) + ((1 - b2) * g0 + z), m_old),)

      (m_stored,), (g0, ok, _) = _step(moment, g, m)
      m_old = read_moment(m)
      u = jnp.where(ok, jnp.sign((b1 * m_old + z) + ((1 - b1) * g0 + z)), 0.0)
      return u.astype(g.dtype), m_stored

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
      def moment(g, m_old):
        g0, ok = _finite(g)
        return (jnp.where(ok, (decay * m_old + z) + g0, m_old),)

      (m,), (g0, ok, m_new) = _step(moment, g, m)
      u = g0 + (decay * m_new + z) if nesterov else m_new
      return jnp.where(ok, u, 0.0).astype(g.dtype), m

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
    z = runtime_zero()

    def moment(g, v_old):
      g0, ok = _finite(g, 1 - decay)
      return (jnp.where(ok, (decay * v_old + z) + ((1 - decay) * g0 * g0 + z), v_old),)

    def leaf(g, v):
      (v,), (g0, ok, v_new) = _step(moment, g, v, sq_scale=1 - decay)
      u = g0 * jax.lax.rsqrt(v_new + eps) if eps_in_sqrt else g0 / (jnp.sqrt(v_new) + eps)
      return jnp.where(ok, u, 0.0).astype(g.dtype), v

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
    z = runtime_zero()

    def moment(g, s_old):
      g0, ok = _finite(g, 1.0)
      return (jnp.where(ok, s_old + (g0 * g0 + z), s_old),)

    def leaf(g, s):
      (s,), (g0, ok, s_new) = _step(moment, g, s, sq_scale=1.0)
      inv = jnp.where(s_new > 0, jax.lax.rsqrt(s_new + eps), 0.0)
      return jnp.where(ok, g0 * inv, 0.0).astype(g.dtype), s

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
    z = runtime_zero()

    def moments(g, m1_old, m2_old, v_old):
      g0, ok = _finite(g, 1 - b2)
      return (jnp.where(ok, (b1 * m1_old + z) + ((1 - b1) * g0 + z), m1_old),
              jnp.where(ok, (b3_t * m2_old + z) + ((1 - b3_t) * g0 + z), m2_old),
              jnp.where(ok, (b2 * v_old + z) + ((1 - b2) * g0 * g0 + z), v_old))

    def leaf(g, m1, m2, v):
      (m1, m2, v), (_, ok, m1_new, m2_new, v_new) = _step(moments, g, m1, m2, v,
                                                          sq_scale=1 - b2)
      u = (m1_new / c1 + (alpha_t * m2_new + z)) / (jnp.sqrt(v_new / c2 + eps_root) + eps)
      return jnp.where(ok, u, 0.0).astype(g.dtype), m1, m2, v

    u, m1, m2, nu = _map(leaf, updates, state.m1, state.m2, state.nu)
    return u, ScaleByAdemamix8bitState(count, count_m2, m1, m2, nu)

  return _explicit_mode(optax.GradientTransformation(init_fn, update_fn))


def _leaf_flags(mask, params) -> list[bool]:
  """Static bool per params leaf of an optax mask (a tree, a prefix of one, or a function)."""
  mask = mask(params) if callable(mask) else mask
  return jax.tree.leaves(jax.tree.map(lambda m, sub: jax.tree.map(lambda _: bool(m), sub),
                                      mask, params))


def lars_8bit(chain: optax.GradientTransformation, decay_tx: optax.GradientTransformation,
              lr_tx: optax.GradientTransformation, weight_decay, weight_decay_mask,
              trust_coefficient: Scalar, eps: Scalar, trust_ratio_mask, momentum: Scalar,
              nesterov: bool) -> optax.GradientTransformation:
  """LARS's ``chain`` (decayed weights, masked trust ratio, learning rate, :func:`trace_8bit`)
  with the same state and results, computed per leaf from the raw gradient and parameter.

  As a chain, the momentum's input ``lr * ratio * (g + wd * p)`` is an array computed in the
  step: the update loop needs it in memory, and XLA computes every leaf's first (optax's norm
  also writes a masked copy of each leaf). Here the update loop reads ``g`` and ``p`` and
  recomputes that input per chunk; only per-leaf scalars (decay rate, trust ratio, step) come
  from outside. ``decay_tx`` and ``lr_tx`` are the chain's first and third transforms: run on
  scalars, they give those per-leaf values (schedules, masks and state counts as in the chain).
  """
  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(optax.NO_PARAMS_MSG)
    decay_state, trust_state, lr_state, trace_state = state
    scalars = lambda v: jax.tree.map(lambda p: jnp.full((), v, jnp.asarray(p).dtype), params)
    rates, decay_state = decay_tx.update(scalars(0), decay_state, scalars(1))
    steps, lr_state = lr_tx.update(scalars(1), lr_state)
    decays = _leaf_flags(weight_decay_mask, params)
    if isinstance(weight_decay, (int, float)) and weight_decay == 0:
      decays = [False] * len(decays)
    trusts = _leaf_flags(trust_ratio_mask, params)
    per_leaf = iter(zip(jax.tree.leaves(rates), jax.tree.leaves(steps), decays, trusts))
    z = runtime_zero()

    def leaf(g, p, m):
      rate, step, decayed, trusted = next(per_leaf)

      def decayed_g(g, p):
        return g + (rate * p + z.astype(p.dtype)) if decayed else g

      def gin(g, p):  # the momentum's input, as the chain computes it
        return decayed_g(g, p) * ratio if trusted else decayed_g(g, p)

      if trusted:
        p_norm, x_norm = jnp.linalg.norm(p), jnp.linalg.norm(decayed_g(g, p))
        ratio = jnp.where((p_norm == 0) | (x_norm == 0), jnp.ones((), p.dtype),
                          trust_coefficient * p_norm / (x_norm + eps))

      def moment(g, p, m_old):
        g0, ok = _finite(step * gin(g, p))
        return (jnp.where(ok, (momentum * m_old + z) + g0, m_old),)

      m_old = read_moment(m)
      (m,) = update_moments(moment, (g, p), (m,))
      g0, ok = _finite(step * gin(g, p))
      (m_new,) = moment(g, p, m_old)  # recomputed: fuses into the update's consumers
      u = g0 + (momentum * m_new + z) if nesterov else m_new
      return jnp.where(ok, u, 0.0).astype(g.dtype), m

    u, trace = _map(leaf, updates, trace_state.trace, params=params)
    return u, (decay_state, trust_state, lr_state, Trace8bitState(trace))

  return _explicit_mode(optax.GradientTransformation(chain.init, update_fn))
