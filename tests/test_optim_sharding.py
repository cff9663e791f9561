"""Low-bit optimizer state of stacked and sharded parameters: the state keeps a stack's leading
axes (blocks within a slice), is sharded like its parameter under Auto and Explicit meshes (8
virtual CPU devices), and a jitted step neither gathers it nor grows its temporaries."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxbnb
from jaxbnb.functional import blockwise as B
from jaxbnb.optim import Blockwise4bit, QuantizedLeaf, QuantizedMoment, Rank1Moment
from tests.helpers import optimizer_step_temporaries

OPTIMIZERS = {
    "adamw8bit": lambda: jaxbnb.optim.adamw8bit(1e-2),
    "adamw4bit": lambda: jaxbnb.optim.adamw4bit(1e-2),
    "quantize_state8": lambda: jaxbnb.optim.quantize_state(optax.adamw(1e-2), bits=8),
    "quantize_state4": lambda: jaxbnb.optim.quantize_state(optax.adamw(1e-2), bits=4),
}
# One per code path (quantize_state's 8 and 4 bits share theirs; the lean test takes all four).
FAMILIES = ["adamw8bit", "adamw4bit", "quantize_state4"]
needs_8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")
_BLOCKWISE = (QuantizedMoment, Blockwise4bit, QuantizedLeaf)
_ANY = _BLOCKWISE + (Rank1Moment,)


def _quantized(state):
  leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, _ANY))
  return [x for x in leaves if isinstance(x, _ANY)]


def _step(tx):
  return jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)))


def _grads(params, seed):
  keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten([jax.random.normal(k, x.shape) * 1e-2 for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("name", FAMILIES)
def test_stacked_state_keeps_the_stack_axis_and_each_slice_is_its_own(name):
  """A (4, 32, 64) stack: block scales carry the stack axis, and slice l of the state after two
  steps has the bits of the same optimizer run on layer l alone (no block straddles layers)."""
  tx = OPTIMIZERS[name]()
  stack = jax.random.normal(jax.random.key(0), (4, 32, 128))
  grads = [_grads({"w": stack}, k)["w"] for k in (1, 2)]

  def run(p, gs):
    state = tx.init({"w": p})
    for g in gs:
      p, state = _step(tx)({"w": p}, state, {"w": g})
      p = p["w"]
    return _quantized(state)

  got = run(stack, grads)
  assert got
  for m in got:
    if isinstance(m, _BLOCKWISE):
      assert m.absmax.shape[0] == 4 and m.absmax.ndim == 2, m.absmax.shape
      assert m.q.shape[0] == 4
  layer = run(stack[2], [g[2] for g in grads])
  for m, alone in zip(got, layer):
    if isinstance(m, Rank1Moment):  # rank-1 maxima span the whole leaf (Li et al.)
      continue
    q, q_alone = np.asarray(m.q[2]).reshape(-1), np.asarray(alone.q).reshape(-1)
    if isinstance(m, QuantizedLeaf):
      # optax's own arithmetic (not pinned like jaxbnb's) may round by an ulp differently in
      # another fusion: a scale by an ulp, a code at a midpoint.
      np.testing.assert_allclose(np.asarray(m.absmax[2]), np.asarray(alone.absmax), rtol=1e-6)
      assert np.mean(q != q_alone) < 0.01
      continue
    np.testing.assert_array_equal(np.asarray(m.absmax[2]), np.asarray(alone.absmax))
    np.testing.assert_array_equal(q, q_alone)


def test_matrices_and_straddling_stacks_keep_the_flat_bitsandbytes_layout():
  tx = jaxbnb.optim.adamw8bit(1e-2)
  s = tx.init({"m": jnp.zeros((64, 128)), "odd": jnp.zeros((3, 50, 30))})
  shapes = sorted(m.absmax.shape for m in _quantized(s))
  assert shapes == [(18,), (18,), (32,), (32,)]  # 1500 elements a slice: blocks straddle


def _mesh(mode):
  kind = AxisType.Explicit if mode == "explicit" else AxisType.Auto
  return jax.make_mesh((4, 2), ("a", "b"), axis_types=(kind, kind))


# Leading-axis shardings: the stack axis (pipeline / layer-wise FSDP), FSDP rows of a matrix.
SPECS = {"stack": P("a", None, None), "w": P("a", None), "bias": P()}


def _params():
  k = jax.random.split(jax.random.key(0), 2)
  return {"stack": jax.random.normal(k[0], (8, 32, 64)), "w": jax.random.normal(k[1], (128, 64)),
          "bias": jnp.zeros((64,))}


def _want_specs(x, spec):
  """Specs a moment of a param sharded ``spec`` must have (every device: its own rows)."""
  lead = spec[0]
  if isinstance(x, QuantizedMoment):
    return {"q": P(*spec), "absmax": P(lead, None) if x.absmax.ndim == 2 else P(lead)}
  if isinstance(x, Rank1Moment):
    return {"q": P(lead, None), "maxes": P(lead)}
  blocks = P(lead, None) if x.absmax.ndim == 2 else P(lead)
  out = {"q": P(*blocks, None), "absmax": blocks}
  if isinstance(x, QuantizedLeaf):
    out["signed"] = blocks
  return out


def _check_shardings(state, params):
  by_shape = {tuple(p.shape): SPECS[k] for k, p in params.items()}
  found = 0
  for m in _quantized(state):
    shape = m.shape if not isinstance(m, QuantizedMoment) else m.q.shape
    for field, want in _want_specs(m, tuple(by_shape[tuple(shape)])).items():
      arr = getattr(m, field)[0] if field == "maxes" else getattr(m, field)
      got = arr.sharding.spec
      want = tuple(want) + (None,) * (arr.ndim - len(want))
      assert tuple(got) + (None,) * (arr.ndim - len(got)) == want, (type(m), field, got, want)
      found += 1
  assert found


@needs_8
@pytest.mark.slow  # sharding on 8 virtual devices: `make test` (see tests/conftest.py)
@pytest.mark.parametrize("mode", ["auto", "explicit"])
@pytest.mark.parametrize("name", FAMILIES)
def test_sharded_state_follows_its_params_and_the_step_gathers_nothing(name, mode, monkeypatch):
  """Params sharded over their leading axis: the state is sharded like them after init and
  after a jitted step, the step's HLO has no all-gather or all-to-all (each device updates its
  own blocks in the chunk loop), and the bits equal an unsharded run."""
  monkeypatch.setattr(B, "CHUNK", 2048)  # small leaves, yet the chunk loop runs several steps
  tx, params = OPTIMIZERS[name](), _params()
  grads = _grads(params, 1)
  want_p, want_s = _step(tx)(params, tx.init(params), grads)
  mesh = _mesh(mode)
  with jax.set_mesh(mesh):
    put = lambda t: {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in t.items()}
    p, g = put(params), put(grads)
    state = tx.init(p)
    _check_shardings(state, params)
    step = _step(tx)
    hlo = step.lower(p, state, g).compile().as_text()
    got_p, got_s = step(p, state, g)
  collectives = [line.strip()[:120] for line in hlo.splitlines()
                 if " all-gather(" in line or " all-to-all(" in line]
  assert not collectives, collectives
  _check_shardings(got_s, params)
  for a, b in zip(jax.tree.leaves((got_p, got_s)), jax.tree.leaves((want_p, want_s))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_8
@pytest.mark.parametrize("name", ["adamw8bit", "quantize_state4"])
def test_jitted_init_under_an_auto_mesh_takes_state_shardings(name):
  """A traced init cannot see its inputs' shardings under an Auto mesh: state_shardings gives
  the out_shardings that put every moment where an eager init does."""
  tx, params = OPTIMIZERS[name](), _params()
  mesh = _mesh("auto")
  p = {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in params.items()}
  eager = tx.init(p)
  shardings = jaxbnb.optim.state_shardings(tx, p)
  jitted = jax.jit(tx.init, out_shardings=shardings)(p)
  _check_shardings(jitted, params)
  for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
    if a.ndim:  # (eager scalars such as a step count sit on one device)
      assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.shape, a.sharding, b.sharding)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_stacked_leaves_keep_the_step_lean(name):
  """Compiled temporaries (shapes only, no data) of a step on a scanned stack and an MoE
  stack of 16M params each: <= 1 byte a param."""
  temp, n = optimizer_step_temporaries(OPTIMIZERS[name](), [(16, 1024, 1024), (8, 1024, 2048)])
  assert temp <= n, f"{temp / n:.2f} B/param of temporaries"


@needs_8
def test_nnx_optimizer_on_a_stack_under_an_explicit_mesh():
  """An NNX stack (layers, experts) whose kernel is sharded over its stack axis (sharding names):
  nnx.Optimizer with 8-bit AdamW keeps the stack axis in its state and shards it likewise."""
  from flax import nnx  # noqa: PLC0415

  class Stack(nnx.Module):
    def __init__(self):
      init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("layers", None, None))
      self.kernel = nnx.Param(init(jax.random.key(0), (8, 64, 64)))

    def __call__(self, x):  # every layer (expert) on x: the stack axis stays sharded
      return jnp.einsum("bi,lio->lbo", x, self.kernel[...])

  mesh = jax.make_mesh((4, 2), ("layers", "b"), axis_types=(AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    model = Stack()
    assert model.kernel[...].sharding.spec[0] == "layers"
    opt = nnx.Optimizer(model, jaxbnb.optim.adamw8bit(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train(model, opt, x):
      grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
      opt.update(model, grads)

    train(model, opt, jnp.ones((4, 64)))
  moments = _quantized(opt.opt_state)  # their arrays are nnx OptArray variables
  assert len(moments) == 2
  for m in moments:
    q, absmax = m.q[...], m.absmax[...]
    assert q.shape == (8, 64, 64) and absmax.shape == (8, 16)
    assert q.sharding.spec[0] == "layers" and absmax.sharding.spec[0] == "layers"
    assert float(jnp.max(absmax)) > 0  # the step wrote them


@needs_8
def test_linen_scanned_stack_with_partitioned_params():
  """A Linen nn.scan stack (nn.Partitioned names, stack axis 'layers'): with boxed params,
  jit(init, out_shardings=state_shardings(...)) and a jitted step keep quantize_state's codes
  and scales sharded over the stack axis (nn.get_sharding sees only the boxes' names)."""
  import flax.linen as nn  # noqa: PLC0415

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, None))
      return jnp.tanh(x @ self.param("kernel", init, (64, 64))), None

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=8, metadata_params={nn.PARTITION_NAME: "layers"})
      return stack(name="stack")(x, None)[0]

  model, x = Model(), jnp.ones((4, 64))
  mesh = jax.make_mesh((4, 2), ("layers", "b"), axis_types=(AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    sharding = nn.get_sharding(jax.eval_shape(model.init, jax.random.key(0), x), mesh)
    params = jax.jit(model.init, out_shardings=sharding)(jax.random.key(0), x)["params"]
    tx = jaxbnb.optim.quantize_state(optax.adamw(1e-2), bits=4)
    state = jax.jit(tx.init, out_shardings=jaxbnb.optim.state_shardings(tx, params))(params)
    grads = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)))(params)
    _, state = jax.jit(tx.update)(grads, state, params)
  leaves = _quantized(state)
  assert len(leaves) == 2
  for m in leaves:
    assert m.absmax.shape == (8, 32)
    for a in (m.q, m.absmax, m.signed):
      assert a.sharding.spec[0] == "layers", a.sharding
