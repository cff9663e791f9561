"""The fused Pallas 8-bit optimizer kernel (interpret mode on CPU) against the XLA transforms of
jaxbnb.optim bit for bit, the in-place fused AdamW step, and a CUDA (Triton) lowering check."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxbnb import optim
from jaxbnb.functional.codebooks import create_dynamic_map
from jaxbnb.optim.state import QuantizedMoment, read_moment
from pallas_kernels import optim_8bit as K
from tests import helpers

# Interpret mode off a GPU; on one (experiments/gpu_session.sh check: JAX_PLATFORMS=cuda) the
# same tests compile and run the real Triton kernels.
INTERPRET = jax.default_backend() != "gpu"


def _bits(tree):
  """Every leaf as raw bytes, so -0.0 vs 0.0 and NaN payloads count."""
  return [np.asarray(x).reshape(-1).view(np.uint8) for x in jax.tree.leaves(tree)]


def assert_same_bits(a, b):
  la, lb = _bits(a), _bits(b)
  assert len(la) == len(lb)
  for i, (x, y) in enumerate(zip(la, lb)):
    assert np.array_equal(x, y), f"leaf {i}: {np.mean(x != y):.2%} of bytes differ"


def _grad(key, shape, dtype, step):
  """A gradient with the awkward cases: NaN/+-Inf elements, an all-zero block, a huge value."""
  g = jax.random.normal(key, shape) * 0.1
  flat = g.reshape(-1)
  if step == 1:
    flat = flat.at[:3].set(jnp.array([jnp.nan, jnp.inf, -jnp.inf]))
  flat = flat.at[256:512].set(0.0)  # an all-zero block at bs 256 (and 4 of them at bs 64)
  if step == 0:
    flat = flat.at[5].set(3e4)      # a block scale jumps; g*g still finite in float32
  return flat.reshape(shape).astype(dtype)


def _params(*names):
  k = jax.random.split(jax.random.key(0), 4)
  every = {"ragged": jax.random.normal(k[0], (37, 71)),                   # 2627: 11 blocks
           "bf16": jax.random.normal(k[1], (8, 384)).astype(jnp.bfloat16),
           "f16": jax.random.normal(k[2], (1280,)).astype(jnp.float16),
           "small": jax.random.normal(k[3], (7,))}                       # 32-bit state
  return {n: every[n] for n in names + ("small",)}


# Each with the leaves it runs on (interpret mode compiles one kernel per leaf: CPU time).
OPTIMIZERS = {
    "adamw": (lambda be: optim.adamw8bit(1e-3, min_8bit_size=64, backend=be),
              ("ragged", "bf16")),
    "lion": (lambda be: optim.lion8bit(1e-3, weight_decay=0.1, min_8bit_size=64, backend=be),
             ("ragged",)),
    "momentum": (lambda be: optim.sgd8bit(1e-2, 0.9, min_8bit_size=64, block_size=64,
                                          backend=be), ("ragged",)),
    "nesterov": (lambda be: optim.sgd8bit(1e-2, 0.9, nesterov=True, min_8bit_size=64,
                                          backend=be), ("f16",)),
}


def _run(tx, params, steps=2):
  state = tx.init(params)
  update = jax.jit(tx.update)
  trace = []
  for i in range(steps):
    grads = {k: _grad(jax.random.key(100 * i + j), p.shape, p.dtype, i)
             for j, (k, p) in enumerate(sorted(params.items()))}
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    trace.append((updates, state))
  return params, trace


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_pallas_backend_equals_xla_bit_for_bit(name):
  """Two steps (NaN/Inf grads, a zero block, a block-scale jump, a ragged last block, 16-bit
  params and grads, a leaf kept in 32 bits): updates, codes and absmax identical each step."""
  make, leaves = OPTIMIZERS[name]
  params = _params(*leaves)
  p_xla, t_xla = _run(make("xla"), params)
  p_pl, t_pl = _run(make("pallas"), params)
  assert_same_bits(t_pl, t_xla)
  assert_same_bits(p_pl, p_xla)
  state = t_pl[-1][1][0]
  moments = state.trace if hasattr(state, "trace") else state.mu
  assert isinstance(moments[0], QuantizedMoment) and not isinstance(moments[-1], QuantizedMoment)
  assert np.asarray(moments[0].q).std() > 0  # the state really moved
  # Skipped elements (NaN/Inf at step 1) kept finite params.
  assert all(np.isfinite(np.asarray(p, np.float32)).all() for p in jax.tree.leaves(p_pl))


def test_traced_hyperparameters_reach_the_kernel():
  """inject_hyperparams makes b1/b2 traced values: the kernel reads them from its scalar array."""
  make = lambda be: optax.inject_hyperparams(
      optim.adamw8bit, static_args=("block_size", "min_8bit_size", "backend"))(
          learning_rate=1e-3, b1=0.8, b2=0.99, min_8bit_size=64, backend=be)
  params = {"w": jax.random.normal(jax.random.key(3), (33, 40))}
  _, t_xla = _run(make("xla"), params, steps=2)
  _, t_pl = _run(make("pallas"), params, steps=2)
  assert_same_bits(t_pl, t_xla)


_KIND_SCALARS = {"adam": (0.9, 0.1, 0.999, 1e-3, 0.0, 1e-8, 1.7),
                 "lion": (0.9, 0.1, 0.99, 1e-2), "momentum": (0.9,), "nesterov": (0.9,)}


@settings(max_examples=3, deadline=None)
@given(kind=st.sampled_from(K.KINDS), n=st.integers(1, 3000), bs=st.sampled_from([64, 256]),
       dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
       with_param=st.booleans(), seed=st.integers(0, 2**16))
def test_kernel_matches_reference_hypothesis(kind, n, bs, dtype, with_param, seed):
  """Any size (ragged last block, a last program with fewer blocks), any gradient dtype."""
  kg, km, kp = jax.random.split(jax.random.key(seed), 3)
  g = (jax.random.normal(kg, (n,)) * 0.3).at[n // 2].set(jnp.nan).astype(dtype)
  nb = -(-n // bs)
  moments, codes = [], []
  for j in range(K.NUM_MOMENTS[kind]):
    signed = j == 0
    codes.append(create_dynamic_map(signed=signed))
    q = jax.random.randint(jax.random.fold_in(km, j), (n,), 0, 256).astype(jnp.uint8)
    absmax = jnp.abs(jax.random.normal(jax.random.fold_in(km, 10 + j), (nb,)))
    moments.append((q, absmax.at[0].set(0.0)))  # one block all zero
  extra = (1e-2, -1e-3) if with_param else ()
  scalars = K.scalar_vector((*_KIND_SCALARS[kind], *extra))
  param = jax.random.normal(kp, (n,)).astype(dtype) if with_param else None
  got = K.update_8bit(g, moments, codes, scalars, param, kind=kind, block_size=bs,
                      block_elems=2 * bs, interpret=INTERPRET)
  want = K.update_8bit_reference(g, moments, codes, scalars, param, kind=kind, block_size=bs)
  assert_same_bits(got, want)
  (out, new) = got
  assert out.shape == (n,) and out.dtype == np.dtype(dtype)
  assert all(q.dtype == jnp.uint8 and a.shape == (nb,) for q, a in new)


def test_reference_matches_state_codec():
  """The kernel's dequantize/requantize is jaxbnb.optim.state's (read_moment / write_moment)."""
  from jaxbnb.optim.state import init_moment, write_moment
  x = jax.random.normal(jax.random.key(7), (3, 100)) * 5
  m = write_moment(init_moment(x, signed=True, block_size=64, use_8bit=True), x)
  # decay 0: momentum's new moment is exactly g, so the kernel requantizes g itself.
  scalars = K.scalar_vector((0.0,))
  u, ((q, a),) = K.update_8bit(x, [(m.q, m.absmax)], [create_dynamic_map(True)], scalars,
                               kind="momentum", block_size=64, interpret=INTERPRET)
  np.testing.assert_array_equal(np.asarray(u), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(q), np.asarray(m.q))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(m.absmax))
  assert np.abs(np.asarray(read_moment(m)) - np.asarray(x)).max() < 0.05 * 5 * 3


# --- the fused in-place step -------------------------------------------------------------------


def test_fused_adamw_step_backends_agree_and_track_optax_chain():
  params = _params("ragged", "bf16")
  sched = optax.linear_schedule(1e-2, 1e-3, 10)
  mask = lambda p: {k: k != "small" for k in p}
  kw = dict(min_8bit_size=64, mask=mask, weight_decay=0.1)
  runs = {}
  for be in ("xla", "pallas"):
    fused = optim.adamw8bit_fused(sched, backend=be, **kw)
    state, p = fused.init(params), params
    step = jax.jit(fused.step)
    for i in range(2):
      grads = {k: _grad(jax.random.key(100 * i + j), x.shape, x.dtype, i)
               for j, (k, x) in enumerate(sorted(p.items()))}
      p, state = step(grads, state, p)
    runs[be] = (p, state)
  assert_same_bits(runs["pallas"], runs["xla"])
  p_chain, t_chain = _run(optim.adamw8bit(sched, **kw), params)
  assert jax.tree.structure(t_chain[-1][1]) == jax.tree.structure(runs["xla"][1])
  for k, want in p_chain.items():
    got = np.asarray(runs["xla"][0][k], np.float32)
    want = np.asarray(want, np.float32)
    # Rounding differs from the chain's in the last bit of each update; 16-bit params are
    # rounded once here, where the chain rounds the update to 16 bits first: a few units in the
    # last place of the params, plus the update's own 16-bit rounding (|update| <= 1.3 lr).
    dt = params[k].dtype
    ulp = np.spacing(np.abs(want).astype(dt)).astype(np.float32)
    tol = 4 * ulp + 2 * 1.3e-2 * float(jnp.finfo(dt).eps)
    assert np.all(np.abs(got - want) <= tol), k
  assert not np.array_equal(np.asarray(runs["xla"][0]["ragged"]), np.asarray(params["ragged"]))


def test_backend_validation():
  with pytest.raises(ValueError, match="backend"):
    optim.adamw8bit(1e-3, backend="triton")
  with pytest.raises(ValueError, match="backend"):
    optim.adamw8bit_fused(1e-3, backend="cuda")
  with pytest.raises(TypeError, match="schedule"):
    optim.adamw8bit_fused(1e-3, weight_decay=lambda c: 0.1)
  with pytest.raises(ValueError, match="kind"):
    K.update_8bit_reference(jnp.zeros(4), [], [], K.scalar_vector(()), kind="adagrad")


# --- GPU lowering (Triton backend) from a CPU-only jaxlib --------------------------------------


@pytest.mark.parametrize("kind,n,bs,dtype,with_param", [
    ("adam", 8192 * 8192, 256, jnp.float32, True),   # the benchmark's leaf, in place
    ("adam", 4096 * 1000 + 17, 4096, jnp.bfloat16, False),  # ragged: masked last block
    ("lion", 1 << 20, 64, jnp.float16, True),
    ("nesterov", 1 << 20, 256, jnp.float32, False),
])
def test_kernel_lowers_for_cuda_triton(kind, n, bs, dtype, with_param):
  """The code-table gathers (``ref[int_array]``) lower to Triton pointer loads, and division and
  sqrt are the IEEE PTX instructions (Triton's own float32 ``/`` is approximate)."""
  s = jax.ShapeDtypeStruct
  nm, nb = K.NUM_MOMENTS[kind], -(-n // bs)

  def fn(g, scalars, *flat):
    p, flat = (flat[0], flat[1:]) if with_param else (None, flat)
    moments = [(flat[2 * j], flat[2 * j + 1]) for j in range(nm)]
    codes = [jnp.linspace(-1.0, 1.0, 256)] * nm
    return K.update_8bit(g, moments, codes, scalars, p, kind=kind, block_size=bs)

  specs = [s((n,), dtype), s((K.SCALAR_SLOTS,), jnp.float32)]
  specs += [s((n,), dtype)] if with_param else []
  specs += [s((n,), jnp.uint8), s((nb,), jnp.float32)] * nm
  hlo = helpers.lower_for_h100(fn, *specs)
  assert "__gpu$xla.gpu.triton" in hlo and f"optim8bit_{kind}_bs{bs}" in hlo
  assert "div.rn.f32" in hlo and ("sqrt.rn.f32" in hlo) == (kind == "adam")


def test_bench_optim_rows_run():
  """experiments/bench_optim.py's timing loop and memory accounting on a tiny problem: the
  in-place fused Pallas row and the paged row (its state left out of the device bytes)."""
  import pathlib
  import sys
  sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "experiments"))
  try:
    import bench_optim
  finally:
    sys.path.pop(0)
  rows = {name: (init, update) for name, init, update, _ in
          bench_optim.rows_to_run(on_gpu=False, quick=True, skip_pallas=False)}
  assert "jaxbnb adamw8bit_fused (pallas)" in rows and "optax adamw (fp32 state)" in rows
  params = {"w": jax.random.normal(jax.random.key(0), (64, 64))}
  t, state_bytes, mem = bench_optim.time_steps(*rows["jaxbnb adamw8bit_fused (pallas)"],
                                               params, steps=2, repeats=1)
  assert t > 0 and state_bytes == 2 * (64 * 64 + 16 * 4) + 4  # codes, absmax, the count
  assert mem >= 2 * 64 * 64 * 4  # params and grads at least
  if "jaxbnb paged adamw8bit (xla)" in rows:
    _, _, mem_paged = bench_optim.time_steps(*rows["jaxbnb paged adamw8bit (xla)"], params,
                                             steps=2, repeats=1)
    _, _, mem_xla = bench_optim.time_steps(*rows["jaxbnb adamw8bit (xla)"], params, steps=2,
                                           repeats=1)
    assert mem_paged <= mem_xla - state_bytes
