"""Quantized leaves under jit with NamedSharding over 8 virtual CPU devices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxbnb
from jaxbnb.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")

TOKENS = jnp.asarray(np.arange(64, dtype=np.int32).reshape(2, 32) * 7 % 256)


def _mesh():
  return Mesh(np.array(jax.devices()[:8]), ("fsdp",))


def _shard_leading_axis(tree, mesh):
  """Shard every array's axis 0 over 'fsdp' when it divides, else replicate. For a packed
  4-bit weight axis 0 is the flat byte stream of the (out, in) matrix, so a shard is a run of
  whole output rows (bnb layout); absmax shards the same way, block-aligned."""
  def put(x):
    spec = P("fsdp") if x.ndim and x.shape[0] % 8 == 0 else P()
    return jax.device_put(x, NamedSharding(mesh, spec))
  return jax.tree.map(put, tree)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_sharded_quantized_forward_equals_unsharded(fmt):
  cfg = (jaxbnb.BitsAndBytesConfig(load_in_8bit=True) if fmt == "int8" else
         jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True))
  graphdef, state = nnx.split(GPT(GPTConfig()))
  forward = jax.jit(jaxbnb.intercept(lambda s, t: nnx.merge(graphdef, s)(t)))
  q = jaxbnb.quantize(state, cfg)
  expected = forward(q, TOKENS)

  mesh = _mesh()
  q_sharded = _shard_leading_axis(q, mesh)
  packed = [x for x in jax.tree.leaves(q_sharded) if x.ndim and x.shape[0] % 8 == 0]
  assert packed and all(len(x.sharding.device_set) == 8 for x in packed)
  out = forward(q_sharded, jax.device_put(TOKENS, NamedSharding(mesh, P())))
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_quantize_sharded_params_under_jit():
  """Quantization runs on the devices holding the shards; with out_shardings (same rule) the
  packed weights stay distributed instead of being gathered onto one device."""
  graphdef, state = nnx.split(GPT(GPTConfig()))
  cfg = jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
  mesh = _mesh()
  sharded = _shard_leading_axis(state, mesh)
  quantize = lambda s: jaxbnb.quantize(s, cfg)
  out_shardings = jax.tree.map(
      lambda x: NamedSharding(mesh, P("fsdp") if x.ndim and x.shape[0] % 8 == 0 else P()),
      jax.eval_shape(quantize, state))
  q = jax.jit(quantize, out_shardings=out_shardings)(sharded)
  q_ref = jaxbnb.quantize(state, cfg)
  for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(q_ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  packed = [x for x in jax.tree.leaves(q) if x.dtype == jnp.uint8]
  assert packed and all(not x.sharding.is_fully_replicated for x in packed)


# --- JAX's Explicit sharding mode (jax.make_mesh's default axis type) ---------------------------

CONFIGS = {
    "nf4+dq": jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_use_double_quant=True),
    "fp4": jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": jaxbnb.BitsAndBytesConfig(load_in_8bit=True),
}


def _explicit_mesh():
  mesh = jax.make_mesh((4, 2), ("a", "b"))
  assert mesh.axis_types == (jax.sharding.AxisType.Explicit,) * 2
  return mesh


def _explicit_params(mesh):
  keys = jax.random.split(jax.random.key(7), 3)
  # 256 * 512 * 64 = a packed stream of whole rows per device for blocksize 64 nested (256 blocks).
  col = jax.random.normal(keys[0], (256, 512)) * 2   # Flax kernel (in, out), out sharded
  both = jax.random.normal(keys[1], (512, 256))      # sharded on both axes
  torch_w = jax.random.normal(keys[2], (512, 256))   # torch-style (out, in), rows sharded
  specs = {"col": {"kernel": P(None, "a")}, "both": {"kernel": P("a", "b")},
           "torch": {"weight": P("a", None)}}
  plain = {"col": {"kernel": col}, "both": {"kernel": both}, "torch": {"weight": torch_w}}
  sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), plain, specs)
  return plain, sharded


@pytest.mark.parametrize("fmt", list(CONFIGS))
def test_explicit_mode_quantize_equals_unsharded_and_keeps_row_shards(fmt):
  cfg = CONFIGS[fmt]
  mesh = _explicit_mesh()
  plain, sharded = _explicit_params(mesh)
  want = jaxbnb.quantize(plain, cfg)
  with jax.set_mesh(mesh):
    for got in (jaxbnb.quantize(sharded, cfg), jax.jit(lambda p: jaxbnb.quantize(p, cfg))(sharded)):
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        if jnp.issubdtype(a.dtype, jnp.integer) or a.shape == (16,) or a.shape == (256,):
          np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # codes, codebooks
        else:  # the nested-absmax mean is a distributed sum: its last bit may round differently
          np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=5e-7)
      # Output-feature shards survive as runs of whole rows of the (out, in) stream.
      for name in ("col", "torch"):
        leaf = got[name]["kernel" if name == "col" else "weight"]
        lead = leaf.CB if fmt == "int8" else leaf.packed
        assert jax.typeof(lead).sharding.spec[0] == "a", (name, jax.typeof(lead))
        if fmt != "int8":
          assert jax.typeof(leaf.state.absmax).sharding.spec[0] == "a"
      # dequantize gives the logical array with those shards back.
      deq = jaxbnb.dequantize(got)
      for (name, key), spec in ((("col", "kernel"), P(None, "a")),
                                (("torch", "weight"), P("a", None))):
        assert jax.typeof(deq[name][key]).sharding.spec == spec
        np.testing.assert_allclose(np.asarray(deq[name][key]),
                                   np.asarray(jaxbnb.dequantize(want)[name][key]),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", list(CONFIGS))
def test_explicit_mode_matmul_and_grad_equal_unsharded(fmt):
  cfg = CONFIGS[fmt]
  mesh = _explicit_mesh()
  plain, sharded = _explicit_params(mesh)
  x = jax.random.normal(jax.random.key(1), (8, 256)).at[0, 3].set(9.0)  # an int8 outlier
  loss = lambda x, w: jnp.sum(jnp.tanh(jaxbnb.matmul(x, w) / 64))
  w0 = jaxbnb.quantize(plain, cfg)["col"]["kernel"]
  want_y, want_g = jaxbnb.matmul(x, w0), jax.grad(loss)(x, w0)
  with jax.set_mesh(mesh):
    w = jaxbnb.quantize(sharded, cfg)["col"]["kernel"]
    xs = jax.device_put(x, NamedSharding(mesh, P("b", None)))
    y = jax.jit(jaxbnb.matmul)(xs, w)
    assert jax.typeof(y).sharding.spec == P("b", "a")  # as a dense x @ kernel would be
    g = jax.jit(jax.grad(loss))(xs, w)
    # Through an unmodified function too (jaxbnb.intercept).
    yi = jax.jit(jaxbnb.intercept(lambda p, x: x @ p["col"]["kernel"]))(
        jaxbnb.quantize(sharded, cfg), xs)
  np.testing.assert_allclose(np.asarray(y), np.asarray(want_y), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(yi), np.asarray(want_y), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(g), np.asarray(want_g), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("make", [lambda: jaxbnb.optim.adamw8bit(1e-2),
                                  lambda: jaxbnb.optim.lion8bit(1e-3),
                                  lambda: jaxbnb.optim.ademamix8bit(1e-2)])
def test_explicit_mode_8bit_optimizer_equals_unsharded(make):
  """8-bit state of params sharded under an Explicit mesh: same bits as unsharded, moments
  sharded like their params, absmax following whole-row shards."""
  mesh = _explicit_mesh()
  keys = jax.random.split(jax.random.key(3), 3)
  params = {"w": jax.random.normal(keys[0], (512, 256)), "v": jax.random.normal(keys[1], (512, 256)),
            "b": jnp.zeros((256,))}
  specs = {"w": P("a", None), "v": P("a", "b"), "b": P()}
  grads = [jax.tree.map(lambda p, k=k: jax.random.normal(jax.random.key(k), p.shape) * 1e-2,
                        params) for k in range(3)]
  tx = make()

  def run(params, grads):
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(g, s, p)))
    for g in grads:
      params, state = step(params, state, g)
    return params, state

  want_p, want_s = run(params, grads)
  with jax.set_mesh(mesh):
    put = lambda t: jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, specs)
    got_p, got_s = run(put(params), [put(g) for g in grads])
  for a, b in zip(jax.tree.leaves((got_p, got_s)), jax.tree.leaves((want_p, want_s))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  moments = [m for m in jax.tree.leaves(got_s, is_leaf=lambda x: isinstance(
      x, jaxbnb.optim.QuantizedMoment)) if isinstance(m, jaxbnb.optim.QuantizedMoment)]
  assert moments
  for m in moments:
    q_spec = jax.typeof(m.q).sharding.spec
    assert q_spec in (P("a", None), P("a", "b")), q_spec
    want_absmax = P("a") if q_spec == P("a", None) else P(None)
    assert jax.typeof(m.absmax).sharding.spec == want_absmax


@pytest.mark.parametrize("fmt", ["nf4+dq", "int8"])
def test_explicit_mode_stacked_layers_shard_the_stack_axis(fmt):
  """A stack of layers sharded over 'a' (pipeline stages / layer-wise FSDP) and inside each
  layer over 'b': the packed stack keeps both, dequantize gives them back, and a scanned
  forward of FSDP-sharded layers equals the unsharded one."""
  cfg = dataclasses.replace(CONFIGS[fmt], stacked_axes={"layers": 1})
  mesh = _explicit_mesh()
  plain = {"layers": {"kernel": jax.random.normal(jax.random.key(0), (4, 256, 512)) * 0.1}}
  want = jaxbnb.quantize(plain, cfg)
  x = jnp.ones((8, 256))

  def forward(p, x):  # each layer: x @ kernel, first 256 features, back to replicated
    body = lambda h, k: (jax.sharding.reshard(jnp.tanh((h @ k)[:, :256]), P()), None)
    return jax.lax.scan(body, x, p["layers"]["kernel"])[0]

  with jax.set_mesh(mesh):
    got = jaxbnb.quantize(jax.device_put(plain, NamedSharding(mesh, P("a", None, "b"))), cfg)
    leaf = got["layers"]["kernel"]
    lead = leaf.CB if fmt == "int8" else leaf.packed
    assert jax.typeof(lead).sharding.spec[:2] == ("a", "b")  # stack axis, then whole rows
    assert jax.typeof(jaxbnb.dequantize(leaf)).sharding.spec == P("a", None, "b")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=5e-7)
    # lax.scan needs its xs' leading axis replicated: FSDP inside each layer only.
    fsdp = jaxbnb.quantize(jax.device_put(plain, NamedSharding(mesh, P(None, None, "b"))), cfg)
    xs = jax.device_put(x, NamedSharding(mesh, P()))
    y = jax.jit(jaxbnb.intercept(forward))(fsdp, xs)
    y_ref = jax.jit(jaxbnb.intercept(forward))(want, xs)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
