"""Quantized leaves under jit with NamedSharding over 8 virtual CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
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
