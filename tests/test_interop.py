"""jaxbnb.interop: bitsandbytes / transformers safetensors checkpoints, bit for bit."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

import jaxbnb
from jaxbnb import interop
from jaxbnb.models.gpt import GPT, GPTConfig
from jaxbnb.qtensor import quantize_4bit_array, quantize_8bit_array

DATA = pathlib.Path(__file__).parent / "data"
VECTORS = DATA / "bnb_linear4bit_state_dict.safetensors"


def read_file(path):
  with safe_open(str(path), framework="numpy") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


def assert_same_bits(a, b):
  assert type(a) is type(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)  # every static field, QuantState's too
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


# --- the bnb 0.50.2 vectors ----------------------------------------------------------------------


def test_vectors_load():
  sd = interop.load_bnb_state_dict(VECTORS)
  assert sorted(sd) == ["0.bias", "0.weight", "2.bias", "2.weight"]
  w0, w2 = sd["0.weight"], sd["2.weight"]
  assert isinstance(w0, jaxbnb.Quantized4bit) and not w0.transposed
  assert w0.shape == (256, 128) and w0.matrix_shape == (256, 128)
  st0 = w0.state
  assert (st0.quant_type, st0.blocksize, st0.shape, st0.dtype) == ("nf4", 64, (256, 128),
                                                                  np.float32)
  assert st0.nested and st0.absmax.dtype == jnp.uint8 and st0.absmax.shape == (512,)
  assert st0.state2.blocksize == 256 and st0.state2.absmax.shape == (2,)
  blob = json.loads(bytes(read_file(VECTORS)["0.weight.quant_state.bitsandbytes__nf4"]))
  assert float(st0.offset) == np.float32(blob["nested_offset"])
  assert w2.quant_type == "fp4" and not w2.state.nested and w2.state.absmax.dtype == jnp.float32
  assert isinstance(sd["0.bias"], jax.Array)
  io = np.load(DATA / "bnb_linear4bit_io.npz")
  # Dequantized (out, in) weights are NF4/FP4 approximations of the originals.
  for leaf, w in ((w0, io["w0"]), (w2, io["w2"])):
    deq = jaxbnb.dequantize(leaf)
    assert deq.shape == w.shape
    assert np.abs(np.asarray(deq) - w).max() <= 0.2 * np.abs(w).max()


def test_vectors_model_reproduces_bnb_output():
  """Linear4bit(nf4 + DQ) -> GELU(erf) -> Linear4bit(fp4), fp32 compute, on bnb's input."""
  sd = interop.load_bnb_state_dict(VECTORS)
  io = np.load(DATA / "bnb_linear4bit_io.npz")
  x = jnp.asarray(io["x"])
  h = jax.nn.gelu(jaxbnb.matmul_4bit(x, sd["0.weight"], sd["0.bias"]), approximate=False)
  y = jaxbnb.matmul_4bit(h, sd["2.weight"], sd["2.bias"])
  np.testing.assert_allclose(np.asarray(y), io["y"], rtol=1e-5, atol=1e-5)
  # The Flax kernel view holds the same bits: x @ kernel == x @ W.T.
  k0 = interop.as_flax_kernel(sd["0.weight"])
  assert k0.transposed and k0.shape == (128, 256) and k0.packed is sd["0.weight"].packed
  w = jaxbnb.dequantize(sd["0.weight"])
  np.testing.assert_allclose(np.asarray(jaxbnb.matmul(x, k0)), np.asarray(x @ w.T),
                             rtol=1e-5, atol=1e-5)
  assert_same_bits(interop.as_bnb_weight(k0), sd["0.weight"])


def test_vectors_written_back_exactly(tmp_path):
  sd = interop.load_bnb_state_dict(VECTORS)
  interop.save_bnb_state_dict(sd, tmp_path / "out.safetensors")
  want, got = read_file(VECTORS), read_file(tmp_path / "out.safetensors")
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
    assert got[k].tobytes() == v.tobytes(), k  # the JSON blobs too, byte for byte
  for k in want:
    if ".quant_state." in k:
      assert json.loads(bytes(got[k])) == json.loads(bytes(want[k]))
  with safe_open(str(tmp_path / "out.safetensors"), framework="numpy") as f:
    assert f.metadata()["format"] == "pt"


# --- jaxbnb -> bnb -> jaxbnb ----------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_4bit_round_trip(tmp_path, quant_type, nested, dtype):
  w = jax.random.normal(jax.random.key(3), (47, 201), dtype)  # odd count, a partial block
  leaf = quantize_4bit_array(w, transposed=False, quant_type=quant_type, blocksize=128,
                             compress_statistics=nested, compute_dtype=jnp.bfloat16)
  bias = jnp.arange(47, dtype=dtype)
  interop.save_bnb_state_dict({"proj.weight": leaf, "proj.bias": bias}, tmp_path / "m.safetensors")
  keys = set(read_file(tmp_path / "m.safetensors"))
  suffixes = {"", ".absmax", ".quant_map", f".quant_state.bitsandbytes__{quant_type}"}
  if nested:
    suffixes |= {".nested_absmax", ".nested_quant_map"}
  assert keys == {"proj.weight" + s for s in suffixes} | {"proj.bias"}
  back = interop.load_bnb_state_dict(tmp_path / "m.safetensors")
  assert_same_bits(back["proj.weight"], leaf)  # QuantState fields, compute dtype included
  assert_same_bits(back["proj.bias"], bias)
  # A Flax kernel leaf is written as its (out, in) bnb matrix: the same bits.
  kernel = quantize_4bit_array(w.T, transposed=True, quant_type=quant_type, blocksize=128,
                               compress_statistics=nested, compute_dtype=jnp.bfloat16)
  interop.save_bnb_state_dict({"proj.weight": kernel}, tmp_path / "k.safetensors")
  assert_same_bits(interop.load_bnb_state_dict(tmp_path / "k.safetensors")["proj.weight"], leaf)


def test_int8_round_trip(tmp_path):
  w = jax.random.normal(jax.random.key(4), (32, 64), jnp.float32)
  leaf = quantize_8bit_array(w, transposed=False, threshold=4.0)
  interop.save_bnb_state_dict({"fc.weight": leaf, "fc.bias": jnp.ones(32)},
                              tmp_path / "m.safetensors")
  raw = read_file(tmp_path / "m.safetensors")
  assert sorted(raw) == ["fc.SCB", "fc.bias", "fc.weight", "fc.weight_format"]
  assert raw["fc.weight"].dtype == np.int8 and raw["fc.SCB"].dtype == np.float32
  assert raw["fc.weight_format"].dtype == np.uint8 and raw["fc.weight_format"].shape == ()
  back = interop.load_bnb_state_dict(tmp_path / "m.safetensors")
  assert_same_bits(back["fc.weight"], leaf)
  # A file bnb wrote carries no jaxbnb hints: LLM.int8() defaults (float16, threshold 6).
  save_file(raw, str(tmp_path / "plain.safetensors"))
  plain = interop.load_bnb_state_dict(tmp_path / "plain.safetensors")["fc.weight"]
  assert plain.dtype == np.float16 and plain.threshold == 6.0
  raw["fc.weight_format"] = np.array(1, np.uint8)
  save_file(raw, str(tmp_path / "col.safetensors"))
  with pytest.raises(ValueError, match="row-major"):
    interop.load_bnb_state_dict(tmp_path / "col.safetensors")


# --- Flax trees ---------------------------------------------------------------------------------


def _gpt_names(flax_name):
  """GPT (NNX) parameter path -> a torch-style name, and the Einsum kernel's shape."""
  return flax_name.replace(".kernel", ".weight").replace(".embedding", ".weight")


def test_flax_gpt_through_bnb_layout(tmp_path):
  cfg = GPTConfig(n_layer=1, d_model=64, d_ff=128, vocab_size=64, max_len=16)
  graphdef, state = nnx.split(GPT(cfg))
  q = jaxbnb.quantize(state, jaxbnb.BitsAndBytesConfig(
      load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))
  names = {}

  def to_bnb(flax_name):
    names[_gpt_names(flax_name)] = flax_name
    return _gpt_names(flax_name)

  interop.save_bnb_state_dict(q, tmp_path / "gpt", mapping=to_bnb)
  sd = interop.load_bnb_state_dict(tmp_path / "gpt")
  assert isinstance(sd["blocks.0.mlp.fc1.weight"], jaxbnb.Quantized4bit)
  assert sd["blocks.0.mlp.fc1.weight"].shape == (cfg.d_ff, cfg.d_model)  # bnb (out, in)
  qkv = (cfg.d_model, 3, cfg.n_head, cfg.head_dim)

  def to_flax(bnb_name):
    flax_name = names[bnb_name]
    return (flax_name, True, qkv) if flax_name.endswith("qkv.kernel") else flax_name

  tree = interop.to_flax(sd, to_flax)
  restored = jax.eval_shape(lambda: q)
  nnx.replace_by_pure_dict(restored, tree)
  assert jax.tree.structure(restored) == jax.tree.structure(q)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(q)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  tokens = jnp.arange(16, dtype=jnp.int32)[None] % cfg.vocab_size
  run = jax.jit(jaxbnb.intercept(lambda s, t: nnx.merge(graphdef, s)(t)))
  np.testing.assert_array_equal(np.asarray(run(restored, tokens)), np.asarray(run(q, tokens)))


def test_float_kernels_transpose(tmp_path):
  k = jnp.arange(12.0).reshape(3, 4)  # Flax (in, out)
  interop.save_bnb_state_dict({"dense": {"kernel": k, "bias": jnp.ones(4)}},
                              tmp_path / "d.safetensors",
                              mapping=lambda n: n.replace("kernel", "weight"))
  raw = read_file(tmp_path / "d.safetensors")
  np.testing.assert_array_equal(raw["dense.weight"], np.asarray(k).T)
  tree = interop.to_flax(interop.load_bnb_state_dict(tmp_path / "d.safetensors"),
                         {"dense.weight": "dense.kernel"})
  np.testing.assert_array_equal(tree["dense"]["kernel"], k)
  np.testing.assert_array_equal(tree["dense"]["bias"], jnp.ones(4))


# --- files and directories ----------------------------------------------------------------------


def test_sharded_directory(tmp_path):
  sd = interop.load_bnb_state_dict(VECTORS)
  interop.save_bnb_state_dict(sd, tmp_path / "sharded", max_shard_size=10_000)
  index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
  shards = set(index["weight_map"].values())
  assert len(shards) >= 2
  # A 4-bit weight's companions share its shard.
  assert len({index["weight_map"][k] for k in index["weight_map"] if k.startswith("0.weight")}) == 1
  for path in (tmp_path / "sharded", tmp_path / "sharded" / "model.safetensors.index.json"):
    back = interop.load_bnb_state_dict(path)
    assert sorted(back) == sorted(sd)
    for k in sd:
      assert_same_bits(back[k], sd[k])
  (tmp_path / "sharded" / sorted(shards)[0]).unlink()
  with pytest.raises(FileNotFoundError, match="missing"):
    interop.load_bnb_state_dict(tmp_path / "sharded")


def test_pickles_refused(tmp_path):
  (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04not really")
  for path in (tmp_path / "pytorch_model.bin", tmp_path):
    with pytest.raises(ValueError, match="safe_serialization=True"):
      interop.load_bnb_state_dict(path)
  disguised = tmp_path / "model.safetensors"
  disguised.write_bytes(b"\x80\x04\x95pickle")
  with pytest.raises(ValueError, match="pickle"):
    interop.load_bnb_state_dict(disguised)
  (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
  with pytest.raises(ValueError, match="not a valid safetensors file"):
    interop.load_bnb_state_dict(tmp_path / "junk.safetensors")


def _edited(tmp_path, edit):
  raw = read_file(VECTORS)
  edit(raw)
  save_file(raw, str(tmp_path / "edited.safetensors"))
  return tmp_path / "edited.safetensors"


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("0.weight.absmax"), r"companion tensor '0\.weight\.absmax' is missing"),
    (lambda r: r.pop("0.weight.nested_absmax"), "nested_absmax / .nested_quant_map are missing"),
    (lambda r: r.__setitem__("2.weight.quant_map", r["2.weight.quant_map"][::-1].copy()),
     "differs from bitsandbytes' fp4 table"),
    (lambda r: r.__setitem__("2.weight.absmax", r["2.weight.absmax"][:-1].copy()),
     r"2\.weight\.absmax: expected float32 \(256,\)"),
    (lambda r: r.__setitem__("2.weight.quant_state.bitsandbytes__fp4",
                             np.frombuffer(b'{"quant_type": "fp4"}', np.uint8).copy()),
     r"lacks \['blocksize', 'dtype', 'shape'\]"),
    (lambda r: r.__setitem__("2.weight.quant_state.bitsandbytes__nf4",
                             r.pop("2.weight.quant_state.bitsandbytes__fp4")),
     "the key says 'nf4' but the blob says 'fp4'"),
])
def test_malformed_checkpoints(tmp_path, edit, message):
  with pytest.raises(ValueError, match=message):
    interop.load_bnb_state_dict(_edited(tmp_path, edit))


def _blob(obj) -> np.ndarray:
  return np.frombuffer(json.dumps(obj).encode(), np.uint8).copy()


def _parse_or_value_error(blob):
  try:
    out = interop.parse_quant_state(blob, "x.quant_state.bitsandbytes__nf4")
  except ValueError as e:
    assert str(e).startswith("x.quant_state.bitsandbytes__nf4: ")
    return None
  assert out["quant_type"] in ("nf4", "fp4") and out["blocksize"] in (32, 64, 128, 256, 512,
                                                                       1024, 2048, 4096)
  return out


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4), max_leaves=12)
_fields = st.fixed_dictionaries({}, optional={
    "quant_type": st.sampled_from(["nf4", "fp4", "int8", ""]) | _json,
    "blocksize": st.sampled_from([64, 256, 100, 0, -64, True]) | _json,
    "dtype": st.sampled_from(["float32", "bfloat16", "torch.float16", "int8"]) | _json,
    "shape": st.lists(st.integers(-2, 300), max_size=3) | _json,
    "nested_blocksize": st.sampled_from([256, 32]) | _json,
    "nested_dtype": st.sampled_from(["float32", "float16"]) | _json,
    "nested_offset": st.floats() | _json,
    "extra": _json,
})


@given(st.binary(max_size=64))
def test_fuzz_blob_bytes(data):
  _parse_or_value_error(np.frombuffer(data, np.uint8))


@given(_json)
def test_fuzz_blob_json(obj):
  _parse_or_value_error(_blob(obj))


@given(_fields)
def test_fuzz_blob_fields(obj):
  out = _parse_or_value_error(_blob(obj))
  if out is not None:
    assert out["shape"] == tuple(obj["shape"])


def test_blob_edge_cases():
  blob = {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4, 64],
          "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.25,
          "a_future_field": [1, 2]}  # unknown fields are ignored
  out = interop.parse_quant_state(_blob(blob), "k")
  assert out["dtype"] == jnp.bfloat16 and out["nested_offset"] == np.float32(0.25)
  with pytest.raises(ValueError, match=r"has only \['nested_offset'\]"):
    interop.parse_quant_state(_blob({k: blob[k] for k in list(blob)[:4]} | {"nested_offset": 1}),
                              "k")
  with pytest.raises(ValueError, match="1-D uint8"):
    interop.parse_quant_state(np.zeros((2, 2), np.uint8), "k")
  with pytest.raises(ValueError, match="not UTF-8 JSON"):
    interop.parse_quant_state(np.frombuffer(b"[" * 100_000, np.uint8), "k")


def test_header_length_byte_0x80_is_not_a_pickle(tmp_path):
  """A safetensors header length whose low byte is 0x80 must not be taken for a pickle."""
  import struct
  header = b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
  header += b" " * (0x80 - len(header))  # pad (safetensors allows trailing spaces)
  path = tmp_path / "odd.safetensors"
  path.write_bytes(struct.pack("<Q", len(header)) + header + np.float32(1.5).tobytes())
  assert path.read_bytes()[0] == 0x80
  out = interop.load_bnb_state_dict(path)
  assert float(out["x"][0]) == 1.5
