"""jaxbnb-written checkpoints in the real bitsandbytes 0.50.2 (and transformers), and back.

Needs torch + bitsandbytes (the optional ``interop-test`` extra); skipped without them. Compares
bits and metadata only: bnb 0.50.2's CPU ``dequantize_4bit`` reads the wrong absmax past the
first row, so its CPU outputs are no reference.
"""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
from safetensors.torch import load_file, save_file  # noqa: E402

from jaxbnb import interop  # noqa: E402
from jaxbnb.qtensor import quantize_4bit_array, quantize_8bit_array  # noqa: E402

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def t2np(t) -> np.ndarray:
  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(jnp.bfloat16)
  return t.numpy()


def same(t, a) -> bool:
  x, y = t2np(t), np.asarray(a)
  return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def assert_files_equal(sd_torch, path):
  """bnb's own state_dict equals the file jaxbnb wrote: keys, dtypes, shapes, bytes."""
  want = load_file(str(path))
  assert sorted(sd_torch) == sorted(want)
  for k, v in want.items():
    assert v.dtype == sd_torch[k].dtype and v.shape == sd_torch[k].shape, k
    assert torch.equal(v.view(torch.uint8) if v.dtype == torch.bfloat16 else v,
                       sd_torch[k].view(torch.uint8) if v.dtype == torch.bfloat16
                       else sd_torch[k].cpu()), k


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jaxbnb_4bit_file_loads_into_bnb(tmp_path, quant_type, nested, dtype):
  w = jax.random.normal(jax.random.key(0), (96, 160), dtype)
  leaf = quantize_4bit_array(w, transposed=False, quant_type=quant_type, blocksize=64,
                             compress_statistics=nested)
  bias = jnp.linspace(-1, 1, 96, dtype=dtype)
  interop.save_bnb_state_dict({"0.weight": leaf, "0.bias": bias}, tmp_path / "m.safetensors")
  sd = load_file(str(tmp_path / "m.safetensors"))
  # What transformers does for a pre-quantized 4-bit checkpoint.
  m = torch.nn.Sequential(bnb.nn.Linear4bit(160, 96, quant_type=quant_type,
                                            compress_statistics=nested,
                                            compute_dtype=TORCH_DTYPES[dtype]))
  stats = {k: v for k, v in sd.items() if k.startswith("0.weight.")}
  m[0].weight = bnb.nn.Params4bit.from_prequantized(sd["0.weight"], stats, requires_grad=False,
                                                    device="cpu", module=m[0])
  m[0].bias = torch.nn.Parameter(sd["0.bias"], requires_grad=False)
  qs = m[0].weight.quant_state
  st = leaf.state
  assert same(m[0].weight.data, leaf.packed)
  assert same(qs.absmax, st.absmax) and same(qs.code, st.code)
  assert (qs.quant_type, qs.blocksize, tuple(qs.shape)) == (quant_type, 64, (96, 160))
  assert qs.dtype == TORCH_DTYPES[dtype] and m[0].weight.quant_storage == torch.uint8
  assert qs.nested == nested
  if nested:
    assert same(qs.offset, st.offset)
    assert same(qs.state2.absmax, st.state2.absmax) and same(qs.state2.code, st.state2.code)
    assert qs.state2.blocksize == st.state2.blocksize == 256
    assert qs.state2.dtype == torch.float32
  # And bnb writes back exactly the file jaxbnb wrote (JSON blob included).
  assert_files_equal(m.state_dict(), tmp_path / "m.safetensors")


def test_jaxbnb_int8_file_loads_into_bnb(tmp_path):
  w = jax.random.normal(jax.random.key(1), (64, 128), jnp.float32)
  leaf = quantize_8bit_array(w, transposed=False)
  interop.save_bnb_state_dict({"0.weight": leaf, "0.bias": jnp.zeros(64)},
                              tmp_path / "m.safetensors")
  sd = load_file(str(tmp_path / "m.safetensors"))
  # bnb loads int8 checkpoints into an already-quantized module (".cuda() before load").
  m = torch.nn.Sequential(bnb.nn.Linear8bitLt(128, 64, has_fp16_weights=False,
                                              threshold=6.0)).to("cpu")
  m.load_state_dict(sd)
  assert m[0].weight.dtype == torch.int8
  assert same(m[0].weight.data, leaf.CB) and same(m[0].weight.SCB, leaf.SCB)
  assert_files_equal(m.state_dict(), tmp_path / "m.safetensors")


def test_bnb_written_file_loads_into_jaxbnb(tmp_path):
  """bnb quantizes (on CPU here) and saves; jaxbnb reads the very same bits."""
  torch.manual_seed(0)
  m = torch.nn.Sequential(
      bnb.nn.Linear4bit(128, 64, quant_type="nf4", compress_statistics=True),
      bnb.nn.Linear4bit(64, 32, quant_type="fp4", compress_statistics=False),
      bnb.nn.Linear8bitLt(32, 16, has_fp16_weights=False)).to("cpu")
  sd = {k: v.detach().contiguous() for k, v in m.state_dict().items()}
  save_file(sd, str(tmp_path / "bnb.safetensors"))
  loaded = interop.load_bnb_state_dict(tmp_path / "bnb.safetensors")
  for i in (0, 1):
    leaf, p = loaded[f"{i}.weight"], m[i].weight
    qs = p.quant_state
    assert same(p.data, leaf.packed) and same(qs.absmax, leaf.state.absmax)
    assert (leaf.state.quant_type, leaf.state.blocksize, leaf.shape) == (
        qs.quant_type, qs.blocksize, tuple(qs.shape))
    if qs.nested:
      assert same(qs.offset, leaf.state.offset) and same(qs.state2.absmax,
                                                         leaf.state.state2.absmax)
  assert same(m[2].weight.data, loaded["2.weight"].CB)
  assert same(m[2].weight.SCB, loaded["2.weight"].SCB)
  interop.save_bnb_state_dict(loaded, tmp_path / "again.safetensors")
  again = load_file(str(tmp_path / "again.safetensors"))
  assert sorted(again) == sorted(sd)
  for k in sd:
    assert torch.equal(again[k], sd[k]), k
    if ".quant_state." in k:
      assert json.loads(bytes(again[k].tolist())) == json.loads(bytes(sd[k].tolist()))


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                    or importlib.util.find_spec("accelerate") is None,
                    reason="needs transformers + accelerate")
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_transformers_from_pretrained(tmp_path, mode):
  """A tiny Llama written by jaxbnb loads with transformers' from_pretrained + bnb."""
  import transformers
  cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=4, vocab_size=64,
                                 max_position_embeddings=32)
  torch.manual_seed(0)
  ref = transformers.LlamaForCausalLM(cfg)
  tree = {}
  for k, v in ref.state_dict().items():
    v = jnp.asarray(v.detach().numpy())
    if k.endswith("proj.weight"):
      v = (quantize_4bit_array(v, transposed=False, quant_type="nf4", compress_statistics=True)
           if mode == "nf4" else quantize_8bit_array(v, transposed=False))
    tree[k] = v
  interop.save_bnb_state_dict(tree, tmp_path)
  qc = (transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.float32)
        if mode == "nf4" else transformers.BitsAndBytesConfig(load_in_8bit=True))
  cfg.quantization_config = qc.to_dict()
  cfg.save_pretrained(tmp_path)
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
  n = 0
  for name, module in model.named_modules():
    leaf = tree.get(name + ".weight")
    if mode == "nf4" and isinstance(module, bnb.nn.Linear4bit):
      qs = module.weight.quant_state
      assert same(module.weight.data, leaf.packed) and same(qs.absmax, leaf.state.absmax)
      assert same(qs.offset, leaf.state.offset)
      assert same(qs.state2.absmax, leaf.state.state2.absmax)
      assert tuple(qs.shape) == leaf.shape and qs.blocksize == leaf.state.blocksize
      n += 1
    elif mode == "int8" and isinstance(module, bnb.nn.Linear8bitLt):
      scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
      assert same(module.weight.data, leaf.CB) and same(scb, leaf.SCB)
      n += 1
  assert n == 7  # q, k, v, o, gate, up, down
  # The loaded model's state dict (what save_pretrained writes; transformers 5.23's
  # save_pretrained itself raises NotImplementedError for bnb 4-bit models) reads back the same.
  save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
            str(tmp_path / "hf.safetensors"))
  back = interop.load_bnb_state_dict(tmp_path / "hf.safetensors")
  for k, leaf in tree.items():
    if k.endswith("proj.weight"):
      for a, b in zip(jax.tree.leaves(back[k]), jax.tree.leaves(leaf)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), k
