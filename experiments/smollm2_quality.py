"""Is NF4's perplexity cost on SmolLM2-135M-Instruct real, or a bug? Weight errors and ablations.

The float reference is the GGUF file's own weights (Q4_1 linear layers, Q8_0 embedding,
dequantized to float32), so every 4-bit format here quantizes weights that already sit on a
4-bit grid. The script measures, on the same texts as `make demo` (a held-out KJV chapter and
an English passage of the Python docs, plus the memorized Genesis 1:1-4 for reference):

1. relative L2 weight error per layer type: NF4 (blocksize 32/64/128), FP4, Q4_0 (llama.cpp's
   symmetric 4-bit, blocks of 32, through the `gguf` package), LLM.int8()'s per-row int8, next
   to an estimate of the Q4_1 file's own error (a uniform step `d` costs `d / sqrt(12)` rms);
2. perplexity with every linear layer quantized (packed path and dequantized weights, which must
   agree), with only attention or only MLP layers, one layer type at a time, one decoder layer at
   a time, the tied embedding / head quantized too, in float32 / bfloat16 / float16 activations;
3. LLM.int8() with threshold 6 vs 0, weight-only int8, attention-only / MLP-only;
4. an independent numpy float64 forward (tests/llama_reference.py) on the dequantized NF4
   weights against the packed JAX path, so the packed kernels are ruled in or out.

  python experiments/smollm2_quality.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jaxbnb
from jaxbnb.models import CausalLM, from_pretrained
from jaxbnb.models.causal_lm import stack_layers
from demo import eval_texts, smollm2_path  # a sibling script (this folder is on sys.path)

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN, MLP = MODULES[:4], MODULES[4:]


def nf4(blocksize=64, **kw):
  return jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   blocksize=blocksize, **kw)


# --- perplexity ----------------------------------------------------------------------------------


def windows(texts: dict, tok, seq: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Every text cut into windows of ``seq`` predicted tokens, right-padded into one batch.

  Returns tokens int32 ``(N, seq + 1)``, loss weights float32 ``(N, seq)`` (1 on real next
  tokens) and each row's text name.
  """
  rows, weights, names = [], [], []
  for name, text in texts.items():
    ids = np.asarray(tok.encode(text), np.int32)
    for start in range(0, len(ids) - 1, seq):
      chunk = ids[start:start + seq + 1]
      pad = seq + 1 - len(chunk)
      rows.append(np.pad(chunk, (0, pad)))
      weights.append(np.pad(np.ones(len(chunk) - 1, np.float32), (0, pad)))
      names.append(name)
  return np.stack(rows), np.stack(weights), names


@jax.jit
def _nll(logits, targets, weights):
  logp = jax.nn.log_softmax(logits, axis=-1)
  tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return -jnp.sum(tok * weights, axis=-1)


def perplexities(lm: CausalLM, batch) -> dict[str, float]:
  """exp(mean NLL) per text (right padding never reaches a real token: the mask is causal)."""
  tokens, weights, names = batch
  nll = np.asarray(_nll(lm(tokens[:, :-1]), jnp.asarray(tokens[:, 1:]), jnp.asarray(weights)))
  out = {}
  for name in dict.fromkeys(names):
    sel = np.asarray([n == name for n in names])
    out[name] = float(math.exp(nll[sel].sum() / weights[sel].sum()))
  return out


# --- weights -------------------------------------------------------------------------------------


def with_params(lm: CausalLM, params, dtype=None) -> CausalLM:
  return CausalLM(lm.config, params, dtype=dtype or lm.dtype, tokenizer=lm.tokenizer)


def fake_quant(lm: CausalLM, cfg) -> dict:
  """The float params with every weight ``cfg`` packs replaced by its dequantized value (stacked
  like ``lm.params``): the model stays a float model, so variants share one compilation."""
  deq = jaxbnb.dequantize(jaxbnb.quantize(lm.unstacked_params(), cfg))
  deq["layers"] = stack_layers(deq["layers"])
  return deq


def gguf_round_trip(lm: CausalLM, qtype: str, shift: int = 0) -> dict:
  """The float params with every linear kernel quantized by llama.cpp's ``qtype`` (blocks of
  32 along the input axis, as in the file) and dequantized. ``shift`` moves the block
  boundaries that many columns: Q4_1 with ``shift=16`` re-quantizes the file's weights on a
  fresh grid of the file's own kind, an error like the one the file's conversion made."""
  import gguf
  q = getattr(gguf.GGMLQuantizationType, qtype)

  def one(k):  # stacked (L, in, out) -> (L, out, in) rows for gguf, and back
    w = np.roll(np.asarray(k, np.float32).transpose(0, 2, 1), shift, axis=-1)
    back = gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(w), q), q)
    back = np.roll(np.asarray(back, np.float32).reshape(w.shape), -shift, axis=-1)
    return jnp.asarray(back.transpose(0, 2, 1))

  return mix(lm.params, {m: one(kernel(lm.params, m)) for m in MODULES})


def kernel(params, module):
  group = "self_attn" if module in ATTN else "mlp"
  return params["layers"][group][module]["kernel"]


def mix(params, new: dict, layers=None) -> dict:
  """``params`` with module kernels from ``new`` ({module: stacked kernel}), in all layers or
  only in ``layers`` (a bool mask over the layer axis)."""
  out = jax.tree.map(lambda x: x, params)
  for m, k in new.items():
    group = "self_attn" if m in ATTN else "mlp"
    old = out["layers"][group][m]["kernel"]
    if layers is not None:
      k = jnp.where(jnp.asarray(layers)[:, None, None], k, old)
    out["layers"][group][m]["kernel"] = k
  return out


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def q41_error(path: str, lm: CausalLM) -> dict[str, float]:
  """Estimated relative L2 error of the file's own Q4_1 quantization per module type: each
  block of 32 stores ``d * q + m`` (q in 0..15), so a weight rounded to it errs by ``d /
  sqrt(12)`` rms if the original was spread evenly within a step."""
  import gguf
  from jaxbnb.models.gguf import hf_name
  reader = gguf.GGUFReader(path)
  num = dict.fromkeys(MODULES, 0.0)
  for t in reader.tensors:
    name = hf_name(t.name)
    if name is None or t.tensor_type != gguf.GGMLQuantizationType.Q4_1:
      continue
    d = np.asarray(t.data, np.uint8).reshape(-1, 20)[:, :2].copy().view(np.float16)
    module = name.split(".")[-2]
    num[module] += float(np.sum(32 * d.astype(np.float64) ** 2 / 12))
  return {m: math.sqrt(num[m]) / float(np.linalg.norm(np.asarray(kernel(lm.params, m),
                                                                  np.float64)))
          for m in MODULES}


def weight_errors(lm: CausalLM, path: str, fakes: dict) -> dict:
  """Relative L2 error per module type (all 30 layers) of each format's dequantized weights,
  and the Q4_1 estimate; also the worst single layer per format."""
  out = {"Q4_1 (file, estimated)": q41_error(path, lm)}
  for name, params in fakes.items():
    row = {m: rel_err(kernel(lm.params, m), kernel(params, m)) for m in MODULES}
    per_layer = [rel_err(kernel(lm.params, m)[i], kernel(params, m)[i])
                 for m in MODULES for i in range(lm.config.num_hidden_layers)]
    row["worst layer"] = max(per_layer)
    out[name] = row
  return out


# --- the numpy reference ----------------------------------------------------------------------


def reference_nll(lm: CausalLM, tokens: np.ndarray) -> float:
  """Mean next-token NLL of ``tokens`` (T,) from tests/llama_reference.py's float64 forward on
  the dequantized weights of ``lm`` (packed or not)."""
  sys.path.insert(0, str(ROOT))
  from tests.llama_reference import reference_logits
  from jaxbnb.models.hub import state_dict
  sd = {}
  for name, leaf in state_dict(lm).items():
    w = jaxbnb.dequantize(leaf) if jaxbnb.is_quantized(leaf) else leaf
    sd[name] = np.asarray(w, np.float64)
  if "lm_head.weight" in sd and lm.config.tie_word_embeddings:
    del sd["lm_head.weight"]
  c = lm.config
  cfg = dict(hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
             num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
             rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, rope_scaling=None,
             num_hidden_layers=c.num_hidden_layers, tie_word_embeddings=c.tie_word_embeddings,
             model_type="llama")
  logits = reference_logits(sd, cfg, tokens[None, :-1])[0]
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return float(-np.mean(logp[np.arange(len(tokens) - 1), tokens[1:]]))


def packed_nll(lm: CausalLM, tokens: np.ndarray) -> float:
  logp = jax.nn.log_softmax(lm(tokens[None, :-1])[0], axis=-1)
  return float(-jnp.mean(jnp.take_along_axis(logp, jnp.asarray(tokens[1:, None]), -1)))


# --- the run -----------------------------------------------------------------------------------


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="short texts, fewer ablations, no per-layer sweep (smoke test)")
  parser.add_argument("--seq", type=int, default=256, help="tokens per perplexity window")
  parser.add_argument("--out", type=pathlib.Path, default=None,
                      help="also write every number to this JSON file")
  args = parser.parse_args()
  start = time.perf_counter()
  path = smollm2_path()
  lm = from_pretrained(path)
  texts = eval_texts(genesis=True)
  if args.quick:
    texts = {k: v[:300] for k, v in texts.items()}
  batch = windows(texts, lm.tokenizer, args.seq)
  res: dict = {"texts": {k: int(np.sum(batch[1][np.asarray(batch[2]) == k])) for k in texts}}
  ppl: dict = {}
  bar = tqdm(desc="variants", leave=False)

  def run(name, model):
    ppl[name] = perplexities(model, batch)
    bar.update()
    bar.set_postfix_str(name)

  run("f32", lm)
  cfgs = {"nf4 bs32": nf4(32), "nf4 bs64": nf4(64), "nf4 bs128": nf4(128),
          "fp4 bs64": jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
          "int8 weights (per row)": jaxbnb.BitsAndBytesConfig(load_in_8bit=True)}
  if args.quick:
    cfgs = {k: cfgs[k] for k in ("nf4 bs64",)}
  fakes = {k: fake_quant(lm, c) for k, c in cfgs.items()}
  fakes["q4_0 (llama.cpp)"] = gguf_round_trip(lm, "Q4_0")
  fakes["q4_1, blocks shifted 16"] = gguf_round_trip(lm, "Q4_1", shift=16)
  if not args.quick:
    fakes["q4_1 again (sanity)"] = gguf_round_trip(lm, "Q4_1")
  res["weight_rel_err"] = weight_errors(lm, path, fakes)
  for k, p in fakes.items():
    run(f"{k} (dequantized)", with_params(lm, p))

  # The packed path must give the dequantized weights' numbers.
  packed = lm.quantize(nf4(64))
  run("nf4 bs64 packed", packed)
  run("nf4 bs64 + double quant packed", lm.quantize(nf4(64, bnb_4bit_use_double_quant=True)))
  emb = fake_quant(lm, nf4(64, quantize_embeddings=True))
  run("nf4 bs64 + embedding/head (dequantized)", with_params(lm, emb))
  only_emb = dict(lm.params, embed_tokens=emb["embed_tokens"])
  run("embedding/head only nf4 (dequantized)", with_params(lm, only_emb))
  nf4_all = fakes["nf4 bs64"]
  sel = lambda mods: {m: kernel(nf4_all, m) for m in mods}
  run("nf4 attention only", with_params(lm, mix(lm.params, sel(ATTN))))
  run("nf4 MLP only", with_params(lm, mix(lm.params, sel(MLP))))
  if not args.quick:
    for m in MODULES:
      run(f"nf4 {m} only", with_params(lm, mix(lm.params, sel([m]))))

  # Activation dtypes: the float model and NF4 (packed, compute dtype = activations).
  for dt in (jnp.bfloat16, jnp.float16) if not args.quick else (jnp.bfloat16,):
    name = jnp.dtype(dt).name
    lo = with_params(lm, jax.tree.map(lambda x: x.astype(dt), lm.params), dtype=dt)
    run(f"{name} activations", lo)
    run(f"nf4 bs64 packed, {name} activations",
        lo.quantize(nf4(64, bnb_4bit_compute_dtype=dt)))

  # LLM.int8(): outlier threshold, weight-only, attention / MLP only.
  for thr in (6.0, 0.0):
    cfg = jaxbnb.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=thr)
    run(f"LLM.int8 thr {thr:g}", lm.quantize(cfg))
  if not args.quick:
    run("LLM.int8 thr 6, fp16 activations",
        with_params(lm, jax.tree.map(lambda x: x.astype(jnp.float16), lm.params),
                    dtype=jnp.float16).quantize(jaxbnb.BitsAndBytesConfig(load_in_8bit=True)))
    for skip, name in (("mlp", "attention only"), ("self_attn", "MLP only")):
      cfg = jaxbnb.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=[skip])
      run(f"LLM.int8 thr 6, {name}", lm.quantize(cfg))
  bar.close()
  res["ppl"] = ppl

  # One decoder layer at a time (NF4 bs64), on the first window of each text.
  if not args.quick:
    first = [batch[2].index(k) for k in texts]
    small = (batch[0][first], batch[1][first], [batch[2][i] for i in first])
    base = perplexities(lm, small)
    sweep = []
    n = lm.config.num_hidden_layers
    for i in tqdm(range(n), desc="one layer at a time", leave=False):
      mask = np.arange(n) == i
      p = perplexities(with_params(lm, mix(lm.params, sel(MODULES), mask)), small)
      sweep.append({k: p[k] / base[k] for k in p})
    res["one_layer"] = {"base": base, "ratios": sweep}

  # The numpy float64 reference on the packed model's dequantized weights.
  ids = np.asarray(lm.tokenizer.encode(texts["KJV"]), np.int32)[:(65 if args.quick else 129)]
  res["reference_nll"] = {"numpy float64 (dequantized nf4)": reference_nll(packed, ids),
                          "jax packed nf4": packed_nll(packed, ids),
                          "numpy float64 (f32 file weights)": reference_nll(lm, ids),
                          "jax f32": packed_nll(lm, ids)}
  res["seconds"] = time.perf_counter() - start
  report(res)
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))


def report(res: dict) -> None:
  texts = list(res["texts"])
  print(f"SmolLM2-135M-Instruct (Q4_1 GGUF as the float reference); tokens scored: "
        + ", ".join(f"{k} {v}" for k, v in res["texts"].items()))
  print("\nrelative L2 weight error per layer type (all layers)")
  print(f"{'format':<28}" + "".join(f"{m:>10}" for m in MODULES) + f"{'worst':>10}")
  for name, row in res["weight_rel_err"].items():
    print(f"{name:<28}" + "".join(f"{row[m]:>10.4f}" for m in MODULES)
          + (f"{row['worst layer']:>10.4f}" if "worst layer" in row else f"{'':>10}"))
  base = res["ppl"]["f32"]
  print(f"\n{'perplexity':<48}" + "".join(f"{t:>16}" for t in texts))
  for name, p in res["ppl"].items():
    print(f"{name:<48}" + "".join(f"{p[t]:>9.3f} {p[t] / base[t]:>5.2f}x" for t in texts))
  if "one_layer" in res:
    print("\none decoder layer in NF4 at a time: perplexity ratio to f32 (first window)")
    for i, r in enumerate(res["one_layer"]["ratios"]):
      print(f"  layer {i:>2}: " + "  ".join(f"{t} {r[t]:.3f}" for t in r))
  print("\nmean NLL, numpy float64 reference vs the JAX path:")
  for k, v in res["reference_nll"].items():
    print(f"  {k:<36}{v:.5f}")
  print(f"\n({res['seconds']:.0f} s)")


if __name__ == "__main__":
  main()
