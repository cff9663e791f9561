"""QLoRA Table 2 / Appendix E at CPU scale: 4-bit data types compared.

Int4, FP4 (E2M1, bitsandbytes' FP4), FP4 (E3M0) and NF4 (with and without double quantization),
all blockwise with blocksize 64, on (1) N(0, 1) samples, (2) the pretrained all-MiniLM-L6-v2
Linear weights and (3) the Linear weights of our byte-level GPT pretrained on the KJV Old
Testament (experiments/qlora_finetune.py trains and caches it); then the GPT's held-out
perplexity (New Testament bytes) with its weights quantized each way. Also the bits per
parameter actually stored and the QLoRA paper's 65B projection.

Int4 and E3M0 are not bitsandbytes storage formats: they run through the same blockwise
nearest-code quantizer (`jaxbnb.functional.quantize_blockwise` with a 16-entry table).

  python experiments/qlora_datatypes.py [--quick] [--replot]

Writes docs/results/qlora_datatypes.json and .png (--replot: only the PNG, from the JSON).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxbnb
from jaxbnb import functional as F
from jaxbnb.models import bert
from jaxbnb.models.gpt import next_token_loss
from plotting import save_figure
from qlora_finetune import kjv_base_lm  # a sibling script (this folder is on sys.path)

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK = 64
PAPER_MEAN_PPL = {"Int4": 34.34, "FP4 (E2M1)": 31.07, "FP4 (E3M0)": 29.48, "NF4 + DQ": 27.41}


def _table(values) -> jnp.ndarray:
  v = np.sort(np.asarray(values, np.float64))
  return jnp.asarray(v / np.abs(v).max(), jnp.float32)


def data_types():
  """name -> quantize-dequantize function on an (out, in) matrix (blocks along `in`)."""
  int4 = _table(np.arange(-7, 8))                                   # symmetric, 15 levels
  e3m0 = _table(np.concatenate([[0.0], 2.0 ** np.arange(7), -2.0 ** np.arange(7)]))

  def table(code):
    return lambda w: F.dequantize_blockwise(*F.quantize_blockwise(w, code=code, blocksize=BLOCK))

  def fourbit(qt, dq):
    return lambda w: F.dequantize_4bit(*F.quantize_4bit(w, blocksize=BLOCK, quant_type=qt,
                                                        compress_statistics=dq))
  return {"Int4": table(int4), "FP4 (E2M1)": fourbit("fp4", False), "FP4 (E3M0)": table(e3m0),
          "NF4": fourbit("nf4", False), "NF4 + DQ": fourbit("nf4", True)}


def errors(fn, mats) -> dict:
  num_abs = num_sq = den_sq = n = 0.0
  for w in mats:
    d = np.asarray(fn(w), np.float64) - np.asarray(w, np.float64)
    num_abs += np.abs(d).sum()
    num_sq += (d**2).sum()
    den_sq += (np.asarray(w, np.float64) ** 2).sum()
    n += d.size
  return {"mean_abs": num_abs / n, "rel_l2": float(np.sqrt(num_sq / den_sq))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="small samples, tiny LM (smoke test)")
  parser.add_argument("--out", type=pathlib.Path,
                      default=ROOT / "docs" / "results" / "qlora_datatypes.json")
  parser.add_argument("--replot", action="store_true", help="only redraw the PNG from --out")
  args = parser.parse_args()
  if args.replot:
    save_figure(lambda fig: plot(fig, json.loads(args.out.read_text())),
                args.out.with_suffix(".png"), figsize=(10.0, 4.0))
    return
  start = time.perf_counter()
  types = data_types()

  # (1) N(0, 1) samples; (2) MiniLM Linear kernels, as (out, in) matrices.
  normal = [jax.random.normal(jax.random.key(0), (256 if args.quick else 1024, 1024))]
  model, _ = bert.load_minilm()
  minilm = [np.asarray(x).T for p, x in jax.tree_util.tree_flatten_with_path(
      nnx.to_pure_dict(nnx.state(model)))[0] if jaxbnb.tree.path_str(p).endswith("kernel")]
  if args.quick:
    minilm = minilm[:4]

  # (3) our LM, pretrained on the Old Testament (cached by qlora_finetune.py).
  graphdef, state, _, new, config = kjv_base_lm(args.quick)
  layers, width, seq = config.n_layer, config.d_model, config.max_len
  pure = nnx.to_pure_dict(state)
  flat = {jaxbnb.tree.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(pure)[0]}
  kernels = [k for k in flat if k.endswith("kernel") and "lm_head" not in k]
  lm_mats = [np.asarray(flat[k]).T for k in kernels]
  loss_fn = jax.jit(lambda s, t: next_token_loss(nnx.merge(graphdef, s)(t), t))
  starts = np.linspace(0, len(new) - seq - 1, 8 if args.quick else 64).astype(int)
  tokens = jnp.asarray(np.stack([new[s:s + seq] for s in starts]).astype(np.int32))

  def ppl(tree) -> float:
    s = jax.eval_shape(lambda: state)
    nnx.replace_by_pure_dict(s, tree)
    return float(np.exp(loss_fn(s, tokens)))

  rows = {"fp32 (reference)": {"held_out_ppl": ppl(pure)}}
  for name, fn in types.items():
    quantized = dict(flat)
    for k in kernels:
      quantized[k] = fn(jnp.asarray(flat[k]).T).T  # blocks along the input axis, as bnb does
    tree = jax.tree_util.tree_unflatten(jax.tree.structure(pure), [quantized[jaxbnb.tree.path_str(p)]
                                         for p, _ in jax.tree_util.tree_flatten_with_path(pure)[0]])
    rows[name] = {"normal": errors(fn, normal), "minilm": errors(fn, minilm),
                  "our_lm": errors(fn, lm_mats), "held_out_ppl": ppl(tree)}

  # Bits per parameter, counted on the arrays (4096 x 4096), and the 65B projection.
  w = jax.random.normal(jax.random.key(1), (4096, 4096), jnp.bfloat16)
  bits = {}
  for dq in (False, True):
    qw, st = F.quantize_4bit(w, blocksize=BLOCK, quant_type="nf4", compress_statistics=dq)
    stored = qw.nbytes + st.absmax.nbytes + (st.state2.absmax.nbytes + st.offset.nbytes if dq
                                             else 0)
    bits["NF4 + DQ" if dq else "NF4"] = stored * 8 / w.size
  projection = {k: 65e9 * b / 8 / 1e9 for k, b in bits.items()}

  print(f"\n4-bit data types, blocksize {BLOCK}; our LM: byte-level GPT {layers}x{width}, "
        f"held-out = New Testament bytes; {jax.devices()[0].platform}, {time.strftime('%Y-%m-%d')}")
  print(f"{'data type':<18}{'N(0,1) |err|':>14}{'MiniLM rel':>12}{'our LM rel':>12}"
        f"{'held-out PPL':>14}{'paper mean PPL':>16}")
  for name, r in rows.items():
    if "normal" not in r:
      print(f"{name:<18}{'':>14}{'':>12}{'':>12}{r['held_out_ppl']:>14.4f}{'':>16}")
      continue
    paper = PAPER_MEAN_PPL.get(name)
    print(f"{name:<18}{r['normal']['mean_abs']:>14.4f}{r['minilm']['rel_l2']:>12.4f}"
          f"{r['our_lm']['rel_l2']:>12.4f}{r['held_out_ppl']:>14.4f}"
          f"{(f'{paper:.2f}' if paper else '-'):>16}")
  print(f"bits/param on the arrays: NF4 {bits['NF4']:.3f}, NF4 + DQ {bits['NF4 + DQ']:.3f} "
        f"(paper: 4.5 and 4.127); a 65B model: {projection['NF4']:.1f} GB vs "
        f"{projection['NF4 + DQ']:.1f} GB ({projection['NF4'] - projection['NF4 + DQ']:.1f} GB "
        f"saved; paper ~3 GB). ({time.perf_counter() - start:.0f} s)")
  if not args.quick:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"),
                                    "device": jax.devices()[0].platform,
                                    "command": "python experiments/qlora_datatypes.py",
                                    "rows": rows, "bits_per_param": bits,
                                    "gb_for_65b": projection, "paper_mean_ppl": PAPER_MEAN_PPL},
                                   indent=1))
    save_figure(lambda fig: plot(fig, json.loads(args.out.read_text())),
                args.out.with_suffix(".png"), figsize=(10.0, 4.0))


def plot(fig, data):
  """Left: quantization error per data type on three weight sets; right: held-out PPL, ours
  against the QLoRA paper's mean PPL (its own axis: different models)."""
  rows = {k: v for k, v in data["rows"].items() if "normal" in v}
  names = list(rows)
  ax1, ax2 = fig.subplots(1, 2)
  x = np.arange(len(names))
  for i, (key, label) in enumerate([("normal", "N(0,1) rel L2"), ("minilm", "MiniLM rel L2"),
                                    ("our_lm", "our LM rel L2")]):
    ax1.bar(x + (i - 1) * 0.27, [rows[n][key]["rel_l2"] for n in names], 0.27, label=label)
  ax1.set_xticks(x, names, fontsize=7)
  ax1.set_ylabel("relative L2 error (blocksize 64)")
  ax1.set_title("weight quantization error (lower is better)", fontsize=9)
  ax1.legend(fontsize=7)
  ref = data["rows"]["fp32 (reference)"]["held_out_ppl"]
  ax2.bar(x, [rows[n]["held_out_ppl"] - ref for n in names], 0.5, color="tab:purple",
          label="ours: PPL - fp32 PPL (left axis)")
  ax2.set_xticks(x, names, fontsize=7)
  ax2.set_ylabel(f"our LM: held-out PPL minus fp32 ({ref:.3f})")
  paper = data.get("paper_mean_ppl", {})
  twin = ax2.twinx()
  px = [i for i, n in enumerate(names) if n in paper]
  twin.plot(px, [paper[names[i]] for i in px], "o", color="black",
            label="paper: mean PPL (right axis)")
  twin.set_ylabel("QLoRA paper, Table 2: mean PPL")
  h1, l1 = ax2.get_legend_handles_labels()
  h2, l2 = twin.get_legend_handles_labels()
  ax2.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center")
  ax2.set_title("held-out perplexity under each 4-bit type", fontsize=9)


if __name__ == "__main__":
  main()
