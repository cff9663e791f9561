"""Stacked leaves (scanned layers, MoE experts) in Hugging Face interop, load_quantized and
Orbax checkpoints: one bnb tensor set per slice, bit for bit."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import save_file

import jaxbnb
from jaxbnb import checkpoint, interop
from jaxbnb.interop import load as L

FORMATS = {
    "nf4-dq-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=jnp.bfloat16),
    "int8": dict(load_in_8bit=True),
}
# Scanned layers (L=3) and, per layer, 2 experts (layers, experts, in, out).
STACKED = {"layers": 1, "moe": 2}


def _cfg(fmt, stacked=STACKED):
  return jaxbnb.BitsAndBytesConfig(**FORMATS[fmt], stacked_axes=stacked,
                                   llm_int8_skip_modules=[])


def _float_tree():
  k = jax.random.split(jax.random.key(0), 3)
  return {"layers": {"up": {"kernel": jax.random.normal(k[0], (3, 64, 32)),
                            "bias": jnp.arange(96, dtype=jnp.float32).reshape(3, 32)}},
          "moe": {"experts": {"kernel": jax.random.normal(k[1], (3, 2, 32, 64))}},
          "head": {"kernel": jax.random.normal(k[2], (32, 16))}}


def _same_bits(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)  # static metadata included
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def _read(path):
  with safe_open(str(path), framework="numpy") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


# HF per-layer names: layers.{l}.mlp.up.weight, layers.{l}.mlp.experts.{e}.weight.
def _to_hf(name):
  name = re.sub(r"^moe\.(\d+)\.(\d+)\.experts\.", r"layers.\1.mlp.experts.\2.", name)
  return re.sub(r"^layers\.(\d+)\.up\.", r"layers.\1.mlp.up.", name).replace("kernel", "weight")


def _from_hf(name):
  name = re.sub(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.", r"moe.\1.\2.experts.", name)
  return re.sub(r"^layers\.(\d+)\.mlp\.up\.", r"layers.\1.up.", name).replace("weight", "kernel")


# --- save_bnb_state_dict / to_flax ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_stacks_write_one_bnb_tensor_set_per_slice_and_load_back(fmt, tmp_path):
  cfg = _cfg(fmt)
  tree = _float_tree()
  q = jaxbnb.quantize(tree, cfg)
  assert q["moe"]["experts"]["kernel"].stack_shape == (3, 2)
  interop.save_bnb_state_dict(q, tmp_path / "hf", mapping=_to_hf, stacked_axes=STACKED,
                              max_shard_size=5_000)
  files = sorted((tmp_path / "hf").glob("*.safetensors"))
  assert len(files) > 2
  tensors = {}
  for f in files:
    part = _read(f)
    for k in part:  # a slice's companions stay in its shard
      if k.endswith((".absmax", ".SCB")):
        assert k.rsplit(".", 1)[0].removesuffix(".weight") + ".weight" in part
    tensors.update(part)
  names = {k for k in tensors if k.endswith((".weight", ".bias"))}
  assert names == ({f"layers.{l}.mlp.up.{p}" for l in range(3) for p in ("weight", "bias")}
                   | {f"layers.{l}.mlp.experts.{e}.weight" for l in range(3) for e in range(2)}
                   | {"head.weight"})
  np.testing.assert_array_equal(tensors["layers.2.mlp.up.bias"], tree["layers"]["up"]["bias"][2])
  # Each slice is bnb's layout of that weight quantized alone: the same keys and bytes.
  lone_cfg = _cfg(fmt, stacked={})
  lone = jaxbnb.quantize({"w": {"kernel": tree["moe"]["experts"]["kernel"][2, 1]}}, lone_cfg)
  want = interop.bnb_tensors({"layers.2.mlp.experts.1.weight":
                              interop.as_bnb_weight(lone["w"]["kernel"])})
  for k, v in want.items():
    assert tensors[k].dtype == v.dtype and tensors[k].tobytes() == v.tobytes(), k
  # And back: the same stacked leaves, bit for bit (static metadata included).
  back = interop.to_flax(interop.load_bnb_state_dict(tmp_path / "hf"), _from_hf,
                         stacked_axes=STACKED)
  _same_bits(back, q)


def test_load_bnb_state_dict_restacks_by_file_names(tmp_path):
  q = jaxbnb.quantize(_float_tree(), _cfg("nf4-dq-bf16"))
  interop.save_bnb_state_dict(q, tmp_path / "m.safetensors", stacked_axes=STACKED)
  assert "layers.1.up.kernel.absmax" in _read(tmp_path / "m.safetensors")
  sd = interop.load_bnb_state_dict(tmp_path / "m.safetensors", stacked_axes=STACKED)
  assert sorted(sd) == ["head.kernel", "layers.up.bias", "layers.up.kernel",
                        "moe.experts.kernel"]
  w = q["moe"]["experts"]["kernel"]
  _same_bits(sd["moe.experts.kernel"], interop.as_bnb_weight(w))  # bnb's (out, in) view
  assert sd["moe.experts.kernel"].stack_shape == (3, 2)


def test_the_naming_rule():
  w = jaxbnb.quantize({"x": {"kernel": jnp.ones((3, 32, 16))}},
                      _cfg("int8", stacked={"x": 1}))["x"]["kernel"]
  tree = {"params": {"blocks": {"moe": {"experts": {"w1": {"kernel": w}}}}}}
  cases = {  # stacked_axes -> the first slice's name
      (("moe.experts", 1),): "params.blocks.moe.experts.0.w1.kernel",  # after the pattern
      (("*.w1.*", 1),): "params.0.blocks.moe.experts.w1.kernel",       # a glob: after the 1st
      (): "params.0.blocks.moe.experts.w1.kernel",                     # marked by the model
  }
  for pairs, first in cases.items():
    sa = dict(pairs)
    sd = interop.from_flax(tree, stacked_axes=sa)
    assert list(sd)[0] == first and len(sd) == 3
    assert all(not v.stack_shape and not v.transposed for v in sd.values())
    if sa:
      back = interop.to_flax(sd, stacked_axes=sa)
      _same_bits(back, tree)
  # A one-component name takes the index first.
  assert list(interop.from_flax({"kernel": w}, stacked_axes={"*": 1})) == [
      "0.kernel", "1.kernel", "2.kernel"]


def test_stack_errors_name_the_fix():
  w = jaxbnb.quantize({"x": {"kernel": jnp.ones((3, 32, 16))}},
                      _cfg("int8", stacked={"x": 1}))["x"]["kernel"]
  with pytest.raises(ValueError, match="save_bnb_state_dict or from_flax"):
    interop.bnb_tensors({"x.weight": w})
  with pytest.raises(ValueError, match=r"stacked_axes\['x'\] = 2: pass the stacked_axes"):
    interop.from_flax({"x": {"kernel": w}}, stacked_axes={"x": 2})
  sd = interop.from_flax({"x": {"kernel": w}}, stacked_axes={"x": 1})
  gap = {k: v for k, v in sd.items() if k != "x.1.kernel"}
  with pytest.raises(ValueError, match=r"x.kernel: slices \[\(1,\)\] of the stack \(3,\)"):
    interop.to_flax(gap, stacked_axes={"x": 1})
  sd["x.1.kernel"] = jnp.ones((32, 16))
  with pytest.raises(ValueError, match="slice \\(1,\\) .* differs from slice \\(0,\\)"):
    interop.to_flax(sd, stacked_axes={"x": 1})


# --- load_quantized ------------------------------------------------------------------------------


def _torch_file(tree, path):
  """The float tree as a torch-layout checkpoint: the experts as (layers, experts, out, in)."""
  t = {"layers.up.kernel": tree["layers"]["up"]["kernel"],
       "layers.up.bias": tree["layers"]["up"]["bias"],
       "moe.experts.weight": jnp.swapaxes(tree["moe"]["experts"]["kernel"], -1, -2),
       "head.kernel": tree["head"]["kernel"]}
  save_file({k: np.asarray(v) for k, v in t.items()}, str(path))


def _mapping(name):
  if name == "moe.experts.weight":
    return "moe.experts.kernel", True  # transposed slice by slice
  return name, False


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_load_quantized_stacks_equal_quantize(fmt, tmp_path):
  tree = _float_tree()
  _torch_file(tree, tmp_path / "f.safetensors")
  cfg = _cfg(fmt)
  L._stats["traces"] = 0
  L._quantizer.cache_clear()
  got = jaxbnb.load_quantized(tmp_path / "f.safetensors", cfg, mapping=_mapping,
                              progress=False)
  _same_bits(got, jaxbnb.quantize(tree, cfg))
  assert L._stats["traces"] == 3  # one quantizer per slice shape, reused over the slices


def test_load_quantized_reads_stacks_marked_by_the_target(tmp_path):
  tree = _float_tree()
  del tree["moe"]
  save_file({"layers.up.kernel": np.asarray(tree["layers"]["up"]["kernel"]),
             "layers.up.bias": np.asarray(tree["layers"]["up"]["bias"]),
             "head.kernel": np.asarray(tree["head"]["kernel"])}, str(tmp_path / "f.safetensors"))
  marked = lambda x: nnx.Param(x, out_sharding=("layers",) + (None,) * (x.ndim - 1),
                               eager_sharding=False)
  target = jax.eval_shape(lambda: nnx.State(
      {"layers": {"up": {"kernel": marked(tree["layers"]["up"]["kernel"]),
                         "bias": nnx.Param(tree["layers"]["up"]["bias"])}},
       "head": {"kernel": nnx.Param(tree["head"]["kernel"])}}))
  cfg = jaxbnb.BitsAndBytesConfig(**FORMATS["int8"], llm_int8_skip_modules=[])  # no stacked_axes
  got = jaxbnb.load_quantized(tmp_path / "f.safetensors", cfg, target=target, progress=False)
  assert got["layers"]["up"]["kernel"].stack_shape == (3,)
  _same_bits(got, jaxbnb.quantize(tree, _cfg("int8", stacked={"layers": 1})))


@pytest.mark.slow  # 8 virtual devices: a few compilations per mesh layout
@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")
def test_sharded_load_over_the_stack_axis_and_checkpoint_round_trip(tmp_path):
  tree = _float_tree()
  _torch_file(tree, tmp_path / "f.safetensors")
  cfg = _cfg("nf4-dq-bf16")
  ref = jaxbnb.quantize(tree, cfg)
  mesh = Mesh(np.array(jax.devices()[:6]).reshape(3, 2), ("pp", "fsdp"))
  # Layers over "pp" (pipeline stages), each slice's rows over "fsdp".
  sharding = lambda path, shape: NamedSharding(mesh, P("pp", "fsdp") if path.startswith(
      "layers") else P("pp", None, "fsdp"))
  got = jaxbnb.load_quantized(tmp_path / "f.safetensors", cfg, mapping=_mapping,
                              sharding=sharding, progress=False)
  _same_bits(got, ref)
  up = got["layers"]["up"]["kernel"]
  assert up.packed.sharding.spec == P("pp", "fsdp")
  assert up.state.offset.sharding.spec == P("pp")  # one offset per layer: on its stage
  assert len(up.packed.addressable_shards) == 6
  assert {s.data.shape[0] for s in up.packed.addressable_shards} == {1}
  experts = got["moe"]["experts"]["kernel"]
  assert experts.packed.sharding.spec == P("pp", None, "fsdp")
  # Orbax round trip keeps the bits and, through the target, the stack-axis sharding.
  checkpoint.save(str(tmp_path / "ckpt"), got)
  restored = checkpoint.restore(str(tmp_path / "ckpt"), target=got)
  _same_bits(restored, ref)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(got)):
    assert a.sharding == b.sharding
  # Or resharded on restore: every array split over the stack axis.
  flat = checkpoint.restore(str(tmp_path / "ckpt"),
                            sharding=NamedSharding(mesh, P("pp")))
  _same_bits(flat, ref)
  assert flat["moe"]["experts"]["kernel"].state.absmax.sharding.spec == P("pp")
