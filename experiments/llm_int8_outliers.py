"""LLM.int8() at CPU scale (Dettmers et al. 2022, Table 1 and the outlier analysis).

Our byte-level GPT (pretrained on the KJV Old Testament; cached by qlora_finetune.py) is given
systematic outlier features WITHOUT changing its float function: for a few hidden dimensions d,
every LayerNorm feeding a linear layer gets its gain and bias at d multiplied by s, and that
layer's kernel row d divided by s. The linear layers' inputs then carry features of magnitude
~s in every token, as large LLMs do. For s up to 60 we compare held-out perplexity (New Testament
bytes) of the paper's Table 1 schemes on every quantized linear layer (all but lm_head, which
transformers/jaxbnb keep in float):

* 8-bit emulations of the matmul inputs in a script-side forward of the GPT (``forward``):
  absmax (one scale per tensor for X and for W), zero-point (asymmetric per tensor, X and W),
  row-wise (absmax per row of X = per token, one scale for W);
* jaxbnb's real int8 path: vector-wise (per row of X x per output column of W, threshold 0) and
  LLM.int8() (vector-wise + mixed-precision decomposition, threshold 6); the emulated
  vector-wise row cross-checks the emulation against it.

Activation capture of every linear layer's input counts outlier features by the paper's rule
(|x| >= 6 in >= 25% of the layers and >= 6% of the positions) and the fraction of input dims
LLM.int8() decomposes at threshold 6. A threshold sweep at the largest s ends the run.
Results: docs/results/llm_int8_outliers.json and .png (--replot: only the PNG, from the JSON).

  python experiments/llm_int8_outliers.py [--quick] [--out PATH] [--replot]
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxbnb
from jaxbnb.models.gpt import causal_attention, next_token_loss
from plotting import add_output_args, resolve_output, save_figure
from qlora_finetune import kjv_base_lm  # a sibling script (this folder is on sys.path)
from jaxbnb.tree import path_str

OUTLIER_DIMS = (3, 17, 42)
ALPHA = 6.0  # the paper's outlier magnitude (and LLM.int8()'s default threshold)
LAYER_FRAC, POS_FRAC = 0.25, 0.06  # the paper's rule: >= 25% of layers, >= 6% of positions
EMULATED = ("absmax", "zero-point", "row-wise")
CHECKS = ("vector-wise (emulated)", "decomp (emulated)")  # emulations of the two real rows
REAL = {"vector-wise": 0.0, "vector-wise + decomp (LLM.int8)": ALPHA}
SCHEMES = ("fp32", *EMULATED, *REAL)
# LLM.int8() paper, Table 1: C4 validation perplexity of its 125M-13B LMs ("32-bit Float" is
# its reference row; "absmax vector-wise + decomp" is LLM.int8()). Quoted for the rows this
# script reproduces; it also lists zero-point vector-wise (+ decomp) and row-wise + decomp.
PAPER = {
    "columns": ["125M", "1.3B", "2.7B", "6.7B", "13B"],
    "rows": {"fp32": [25.65, 15.91, 14.43, 13.30, 12.45],
             "absmax": [87.76, 16.55, 15.11, 14.59, 19.08],
             "zero-point": [56.66, 16.24, 14.76, 13.49, 13.94],
             "row-wise": [30.93, 17.08, 15.24, 14.13, 16.49],
             "vector-wise": [35.84, 16.82, 14.98, 14.13, 16.48],
             "vector-wise + decomp (LLM.int8)": [25.83, 15.93, 14.44, 13.24, 12.45]},
    "claim": "absmax, zero-point, row-wise and vector-wise int8 degrade once outlier features "
             "emerge (6.7B-13B); vector-wise + decomposition matches the float perplexity at "
             "every scale",
}


def inject_outliers(flat: dict, n_layer: int, s: float) -> dict:
  """Scale LN gain/bias at OUTLIER_DIMS by s and the consuming kernel rows by 1/s."""
  out = dict(flat)
  dims = np.asarray(OUTLIER_DIMS)
  for i in range(n_layer):
    for ln, kernel in ((f"blocks.{i}.ln1", f"blocks.{i}.attn.qkv.kernel"),
                       (f"blocks.{i}.ln2", f"blocks.{i}.mlp.fc1.kernel")):
      for part in ("scale", "bias"):
        out[f"{ln}.{part}"] = out[f"{ln}.{part}"].at[dims].multiply(s)
      out[kernel] = out[kernel].at[dims].divide(s)
  return out


# ---- 8-bit emulation: fake-quantize X (tokens, in) and W (in, out), then a float matmul. ----

def _absmax(v, axis):
  """Symmetric int8 round trip with one absmax scale per slice along ``axis`` (None: tensor)."""
  c = jnp.max(jnp.abs(v), axis=axis, keepdims=axis is not None)
  c = jnp.where(c == 0, 1.0, c)
  return jnp.round(v * (127.0 / c)) * (c / 127.0)


def _zeropoint(v):
  """Asymmetric per-tensor int8 round trip (paper eq. 2): 255 levels over [min, max], zero
  exact (the zero point is round(nd * min))."""
  nd = 254.0 / jnp.maximum(jnp.max(v) - jnp.min(v), 1e-12)
  return jnp.round(v * nd) / nd


def fake_quant(scheme: str, x, w):
  """(X, W) after the scheme's int8 round trip; x: (tokens, in), w: (in, out) float32."""
  if scheme == "absmax":
    return _absmax(x, None), _absmax(w, None)
  if scheme == "zero-point":
    return _zeropoint(x), _zeropoint(w)
  if scheme == "row-wise":  # per token for X; W keeps one scale (the brief's choice)
    return _absmax(x, 1), _absmax(w, None)
  if scheme == "vector-wise (emulated)":  # per token x per output column: jaxbnb's thr-0 path
    return _absmax(x, 1), _absmax(w, 0)
  if scheme == "decomp (emulated)":
    # LLM.int8(): input columns with any |x| >= 6 stay float (times W's int8 round trip, as
    # bnb keeps only the int8 weight); the rest is vector-wise int8.
    cols = jnp.any(jnp.abs(x) >= ALPHA, 0)
    return jnp.where(cols, x, _absmax(jnp.where(cols, 0.0, x), 1)), _absmax(w, 0)
  raise ValueError(scheme)


def forward(flat: dict, tokens, config, scheme: str = "fp32", capture: list | None = None):
  """jaxbnb/models/gpt.py's GPT as a function of its flat params, each quantized linear
  layer (qkv, attn.out, fc1, fc2; not lm_head) computing ``q(x) @ q(W) + b``. Returns the
  mean next-token loss; ``capture`` (a list) collects (name, x (tokens, in), W (in, out)) for
  every such layer."""

  def linear(name, x, kernel, bias):
    lead, w = x.shape[:-1], kernel.reshape(kernel.shape[0], -1)
    x2 = x.reshape(-1, x.shape[-1])
    if capture is not None:
      capture.append((name, x2, w))
    if scheme != "fp32":
      x2, w = fake_quant(scheme, x2, w)
    y = x2 @ w + bias.reshape(-1)
    return y.reshape(*lead, *kernel.shape[1:])

  def ln(name, x):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-6) * flat[f"{name}.scale"] + flat[f"{name}.bias"]

  b, t = tokens.shape
  x = flat["embed.embedding"][tokens] + flat["pos_embed.embedding"][jnp.arange(t)][None]
  for i in range(config.n_layer):
    p = f"blocks.{i}"
    qkv = linear(f"{p}.attn.qkv", ln(f"{p}.ln1", x), flat[f"{p}.attn.qkv.kernel"],
                 flat[f"{p}.attn.qkv.bias"])
    y = causal_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(b, t, -1)
    x = x + linear(f"{p}.attn.out", y, flat[f"{p}.attn.out.kernel"], flat[f"{p}.attn.out.bias"])
    h = linear(f"{p}.mlp.fc1", ln(f"{p}.ln2", x), flat[f"{p}.mlp.fc1.kernel"],
               flat[f"{p}.mlp.fc1.bias"])
    x = x + linear(f"{p}.mlp.fc2", jax.nn.gelu(h), flat[f"{p}.mlp.fc2.kernel"],
                   flat[f"{p}.mlp.fc2.bias"])
  logits = ln("ln_f", x) @ flat["lm_head.kernel"]
  return next_token_loss(logits, tokens)


def outlier_stats(flat: dict, tokens, config, batch: int) -> dict:
  """The paper's outlier count and LLM.int8()'s decomposed fraction from captured inputs.

  A hidden dim is an outlier feature when |x| >= 6 at >= 6% of the positions (all held-out
  tokens) in >= 25% of the layers the paper analyses (Sec. 4.1: attention projections qkv and
  attn.out, FFN expansion fc1; not the FFN contraction fc2). The decomposed fraction is, per
  layer (all four) and per batch of ``batch`` sequences, the share of input dims with any
  |x| >= 6 -- the columns the threshold-6 path multiplies in float -- averaged over layers and
  batches. ``matmul_err``: per scheme, ||q(X) q(W) - XW|| / ||XW|| averaged over layers and
  batches; ``max_abs_input``: the largest |x| of any layer input in the first batch.
  """
  names = [n for n, _, _ in _capture(flat, tokens[:1], config)[0]]
  pos, dec, err = [], [], []
  for i in range(0, tokens.shape[0], batch):
    frac, anyb, e = _stats(flat, tokens[i:i + batch], config)
    pos.append([np.asarray(f) for f in frac])
    dec.append([float(np.mean(a)) for a in anyb])
    err.append({k: float(np.mean(v)) for k, v in e.items()})
  hidden = [j for j, n in enumerate(names) if not n.endswith("fc2")]
  pos_frac = np.stack([np.mean([p[j] for p in pos], 0) for j in hidden])  # (layers, d_model)
  layer_share = np.mean(pos_frac >= POS_FRAC, 0)
  dims = np.flatnonzero(layer_share >= LAYER_FRAC)
  return {"outlier_dims": [int(d) for d in dims], "n_outlier_dims": int(len(dims)),
          "decomposed_frac": float(np.mean(dec)),
          "max_abs_input": max(float(np.max(p)) for p in _maxabs(flat, tokens[:batch], config)),
          "matmul_err": {k: float(np.mean([e[k] for e in err])) for k in err[0]}}


def _capture(flat, tokens, config):
  acts = []
  loss = forward(flat, tokens, config, capture=acts)
  return acts, loss


@functools.partial(jax.jit, static_argnums=2)
def _maxabs(flat, tokens, config):
  return [jnp.max(jnp.abs(x)) for _, x, _ in _capture(flat, tokens, config)[0]]


@functools.partial(jax.jit, static_argnums=2)
def _stats(flat, tokens, config):
  """Per captured layer: share of positions with |x| >= 6 per dim, whether any, and the
  relative matmul error of every emulated scheme."""
  acts = _capture(flat, tokens, config)[0]
  big = [jnp.abs(x) >= ALPHA for _, x, _ in acts]
  err = {}
  for scheme in (*EMULATED, *CHECKS):
    e = []
    for _, x, w in acts:
      xq, wq = fake_quant(scheme, x, w)
      e.append(jnp.linalg.norm(xq @ wq - x @ w) / jnp.linalg.norm(x @ w))
    err[scheme] = jnp.stack(e)
  return [jnp.mean(m, 0) for m in big], [jnp.any(m, 0) for m in big], err


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true")
  add_output_args(parser, "llm_int8_outliers")
  args = parser.parse_args()
  write = resolve_output(args, "llm_int8_outliers")
  if args.replot:
    save_figure(lambda fig: plot(fig, json.loads(args.out.read_text())),
                args.out.with_suffix(".png"), figsize=(18.0, 4.2))
    return
  start = time.perf_counter()
  graphdef, state, _, new, config = kjv_base_lm(args.quick)
  layers, width, seq = config.n_layer, config.d_model, config.max_len
  pure = nnx.to_pure_dict(state)
  leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
  flat = {path_str(p): jnp.asarray(x) for p, x in leaves}
  n_seq, batch = (8, 4) if args.quick else (48, 8)
  starts = np.linspace(0, len(new) - seq - 1, n_seq).astype(int)
  tokens = jnp.asarray(np.stack([new[s:s + seq] for s in starts]).astype(np.int32))
  real_forward = jax.jit(jaxbnb.intercept(
      lambda s, t: next_token_loss(nnx.merge(graphdef, s)(t), t)))
  emulated = jax.jit(functools.partial(forward, config=config), static_argnames="scheme")

  def real_ppl(flat_params, threshold=None) -> float:
    """jaxbnb's own path: the stock NNX model on ``jaxbnb.quantize``d int8 params."""
    tree = jax.tree_util.tree_unflatten(jax.tree.structure(pure),
                                        [flat_params[path_str(p)] for p, _ in leaves])
    s = jax.eval_shape(lambda: state)
    nnx.replace_by_pure_dict(s, tree)
    if threshold is not None:
      s = jaxbnb.quantize(s, jaxbnb.BitsAndBytesConfig(load_in_8bit=True,
                                                       llm_int8_threshold=threshold))
    return float(np.exp(real_forward(s, tokens)))

  scales = (1, 5, 20) if args.quick else (1, 2, 5, 10, 20, 40, 60)
  rows = []
  for s in scales:
    f = inject_outliers(flat, layers, float(s))
    row = {"s": s, "fp32": real_ppl(f)}
    # The script-side forward must be the model: its fp32 loss matches the stock one.
    row["fp32 (script forward)"] = float(np.exp(emulated(f, tokens, scheme="fp32")))
    for scheme in (*EMULATED, *CHECKS):
      row[scheme] = float(np.exp(emulated(f, tokens, scheme=scheme)))
    for name, thr in REAL.items():
      row[name] = real_ppl(f, thr)
    row.update(outlier_stats(f, tokens, config, batch))
    rows.append(row)
  sweep_s = scales[-1]
  f = inject_outliers(flat, layers, float(sweep_s))
  sweep = {thr: real_ppl(f, thr) for thr in ((1.0, 6.0, 20.0) if args.quick else
                                             (0.5, 1.0, 2.0, 4.0, 6.0, 10.0, 20.0, 50.0, 200.0))}

  print(f"\nbyte-level GPT {layers}x{width}, outlier dims {OUTLIER_DIMS} scaled by s at every "
        f"LN -> linear (float function unchanged); held-out PPL per byte on {n_seq}x{seq} "
        f"bytes; {jax.devices()[0].platform}, {time.strftime('%Y-%m-%d')}")
  cols = (*SCHEMES, *CHECKS)
  short = {"vector-wise + decomp (LLM.int8)": "LLM.int8 (thr 6)", "vector-wise": "vector (thr 0)",
           "vector-wise (emulated)": "vector emul.", "decomp (emulated)": "LLM.int8 emul."}
  print(f"{'s':>3}" + "".join(f"{short.get(c, c):>17}" for c in cols)
        + f"{'outliers':>9}{'decomp.':>8}{'max|x|':>8}")
  for r in rows:
    print(f"{r['s']:>3}" + "".join(f"{r[c]:>17.4f}" for c in cols)
          + f"{r['n_outlier_dims']:>9}{100 * r['decomposed_frac']:>7.1f}%"
          + f"{r['max_abs_input']:>8.1f}")
  print("relative matmul error ||q(X)q(W) - XW|| / ||XW||, mean over layers (emulations):")
  for r in rows:
    print(f"{r['s']:>3}" + "".join(f"  {short.get(k, k)} {r['matmul_err'][k]:.4f}"
                                   for k in (*EMULATED, *CHECKS)))
  gap = max(abs(r["fp32 (script forward)"] / r["fp32"] - 1) for r in rows)
  print(f"script forward vs stock model, fp32: max relative PPL gap {gap:.1e}")
  print(f"threshold sweep (LLM.int8) at s={sweep_s}: " +
        ", ".join(f"{t:g}: {v:.4f}" for t, v in sweep.items()))
  print("paper Table 1 (C4 PPL, " + ", ".join(PAPER["columns"]) + "):")
  for k, v in PAPER["rows"].items():
    print(f"  {k:<34}" + "".join(f"{x:>8.2f}" for x in v))
  print(f"({time.perf_counter() - start:.0f} s)")
  if write:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "device": jax.devices()[0].platform,
        "command": "python experiments/llm_int8_outliers.py" + (" --quick" if args.quick else ""),
        "model": f"{layers}x{width}", "eval_tokens": [n_seq, seq], "capture_batch": batch,
        "outlier_dims_injected": OUTLIER_DIMS, "schemes": list(SCHEMES),
        "outlier_rule": {"magnitude": ALPHA, "layer_frac": LAYER_FRAC, "pos_frac": POS_FRAC},
        "rows": rows, "threshold_sweep_s": sweep_s,
        "threshold_sweep": {str(k): v for k, v in sweep.items()}, "paper": PAPER}, indent=1))
    save_figure(lambda fig: plot(fig, json.loads(args.out.read_text())),
                args.out.with_suffix(".png"), figsize=(18.0, 4.2))


def plot(fig, data):
  """PPL over fp32 and the layers' matmul error against s per scheme; LLM.int8()'s threshold
  sweep; outlier counts and the decomposed fraction."""
  ax1, ax2, ax3, ax4 = fig.subplots(1, 4)
  rows = data["rows"]
  s = [r["s"] for r in rows]
  colors = {"fp32": "black", "absmax": "tab:red", "zero-point": "tab:orange",
            "row-wise": "tab:purple", "vector-wise": "tab:green",
            "vector-wise + decomp (LLM.int8)": "tab:blue"}
  rel = lambda v, ref: 100 * (v / ref - 1)  # % over fp32
  for key, color in colors.items():
    ax1.plot(s, [rel(r[key], r["fp32"]) for r in rows], "--" if "decomp" in key else "-",
             marker="o", color=color, label=key)
  ax1.set_xscale("log")
  ax1.set_xlabel("outlier scale s (3 hidden dims)")
  ax1.set_ylabel("held-out PPL per byte, % over fp32")
  ax1.set_title("outlier features vs int8 schemes", fontsize=9)
  ax1.legend(fontsize=7)
  errs = {"absmax": "absmax", "zero-point": "zero-point", "row-wise": "row-wise",
          "vector-wise (emulated)": "vector-wise", "decomp (emulated)":
          "vector-wise + decomp (LLM.int8)"}
  for key, color_key in errs.items():
    ax2.plot(s, [100 * r["matmul_err"][key] for r in rows], "--" if "decomp" in key else "-",
             marker="o", color=colors[color_key], label=key)
  ax2.set_xscale("log")
  ax2.set_yscale("log")
  ax2.set_xlabel("outlier scale s")
  ax2.set_ylabel("||q(X)q(W) - XW|| / ||XW||, %")
  ax2.set_title("int8 matmul error, mean over layers (emulated)", fontsize=9)
  ax2.legend(fontsize=7)
  thr = {float(k): v for k, v in data["threshold_sweep"].items()}
  ref = rows[-1]["fp32"]
  ax3.plot(list(thr), [rel(v, ref) for v in thr.values()], "o-", color="tab:blue",
           label="LLM.int8()")
  ax3.axhline(0.0, color="black", lw=1, label="fp32")
  ax3.set_xscale("log")
  ax3.set_xlabel("outlier threshold")
  ax3.set_ylabel("held-out PPL per byte, % over fp32")
  ax3.set_title(f"threshold sweep at s = {data['threshold_sweep_s']}", fontsize=9)
  ax3.legend(fontsize=7)
  ax4.plot(s, [r["n_outlier_dims"] for r in rows], "o-", color="tab:red")
  ax4.set_xscale("log")
  ax4.set_xlabel("outlier scale s")
  ax4.set_ylabel("# outlier feature dims (paper's rule)", color="tab:red")
  ax4.yaxis.get_major_locator().set_params(integer=True)
  ax5 = ax4.twinx()
  ax5.plot(s, [100 * r["decomposed_frac"] for r in rows], "s--", color="tab:blue")
  ax5.set_ylabel("% of input dims decomposed at threshold 6", color="tab:blue")
  ax4.set_title("|x| >= 6 in >= 25% of layers and >= 6% of positions", fontsize=9)


if __name__ == "__main__":
  main()
