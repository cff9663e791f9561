"""8-bit optimizer ablation (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization", Table 3) at CPU scale: which ingredient makes 8-bit Adam as stable as 32-bit?

A byte-level GPT (jaxbnb.models.gpt) is trained from scratch on the King James Old Testament at
an aggressive learning rate, several seeds at once (vmapped), with:

  32-bit Adam                 optax.adam
  8-bit dynamic, blockwise    jaxbnb.optim.adam8bit (bitsandbytes' default: dynamic map, 256)
  8-bit dynamic, per tensor   research variant below: the dynamic map, one absmax per tensor
  8-bit linear, per tensor    research variant below: evenly spaced levels, one absmax per tensor

each with the model's plain nnx.Embed and with jaxbnb.nn.StableEmbedding (Xavier init, a
LayerNorm after the lookup, and 32-bit optimizer state for the table). The two research
variants are small optax transforms built here on jaxbnb.functional's codebooks and
nearest-code search; with the dynamic map and blocks of 256 the same transform equals
jaxbnb.optim.adam8bit (tests/test_experiments_smoke.py checks it).

Reported per variant: held-out loss (New Testament bytes) per seed, the fraction of unstable
seeds, and optimizer state bytes per parameter. A run is *unstable* when its loss ever becomes
NaN/Inf, or when its final held-out loss exceeds the median final loss of 32-bit Adam with the
same embedding by more than --margin nats/byte (default 0.1; healthy seeds of one variant spread
by ~0.01). Results: docs/results/optim_ablation.json and .png.

  python experiments/optim_ablation.py [--quick] [--seeds 4] [--steps 250] [--lr 1e-2]
  python experiments/optim_ablation.py --replot     # only the PNG, from the JSON
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import trange

import jaxbnb
from jaxbnb import optim
from jaxbnb.functional import create_dynamic_map, create_linear_map
from jaxbnb.functional.blockwise import nearest_code, normalize, to_blocks
from jaxbnb.models.gpt import GPT, GPTConfig, next_token_loss
from plotting import add_output_args, resolve_output, save_figure
from qlora_finetune import kjv  # a sibling script (this folder is on sys.path)

_F32_MAX = float(np.finfo(np.float32).max)


# --- the research variants: Adam with quantized moments on any map, any block size -------------


class Quantized(NamedTuple):
  """A moment in 8 bits: uint8 codes (the parameter's shape) and float32 absmax per block."""
  q: jax.Array
  absmax: jax.Array


def _quantize(x: jax.Array, code: jax.Array, block: Optional[int]) -> Quantized:
  """Nearest code of ``x / absmax`` per block; ``block=None``: one absmax for the tensor."""
  # Saturate as jaxbnb.optim does, so the variants differ only in map and block size.
  x = jnp.clip(jnp.nan_to_num(x, nan=0.0), -_F32_MAX, _F32_MAX)
  blocks = to_blocks(x, x.size if block is None else block)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  q = nearest_code(normalize(blocks, absmax), code)
  return Quantized(q.reshape(-1)[: x.size].reshape(x.shape), absmax)


def _dequantize(m: Quantized, code: jax.Array, block: Optional[int]) -> jax.Array:
  """float32 ``code[q] * absmax[block]`` of ``m``'s shape."""
  values = code[m.q.reshape(-1).astype(jnp.int32)]
  size = values.size if block is None else block
  blocks = jnp.pad(values, (0, m.absmax.size * size - values.size)).reshape(-1, size)
  return (blocks * m.absmax[:, None]).reshape(-1)[: m.q.size].reshape(m.q.shape)


class QuantizedAdamState(NamedTuple):
  count: jax.Array
  mu: tuple
  nu: tuple


def quantized_adam(learning_rate: float, code_m: jax.Array, code_v: jax.Array,
                   block: Optional[int], *, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, min_8bit_size: int = 4096,
                   fp32_mask: Any = None) -> optax.GradientTransformation:
  """Adam whose moments are stored on the ascending 256-entry maps ``code_m`` (signed, first
  moment) and ``code_v`` (unsigned, second moment), one float32 absmax per ``block`` elements
  (``None``: per tensor). Leaves under ``min_8bit_size`` or masked True keep float32 moments.
  The update is jaxbnb.optim.scale_by_adam_8bit's (bitsandbytes' arithmetic, non-finite
  gradient elements skipped)."""
  code_m, code_v = jnp.asarray(code_m, jnp.float32), jnp.asarray(code_v, jnp.float32)

  def init_fn(params):
    leaves = jax.tree.leaves(params)
    mask = [False] * len(leaves) if fp32_mask is None else jax.tree.leaves(fp32_mask)

    def zero(p, keep32):
      if keep32 or p.size < min_8bit_size:
        return jnp.zeros(p.shape, jnp.float32)
      nblocks = 1 if block is None else -(-p.size // block)
      return Quantized(jnp.zeros(p.shape, jnp.uint8), jnp.zeros((nblocks,), jnp.float32))
    mu = tuple(zero(p, k) for p, k in zip(leaves, mask))
    return QuantizedAdamState(jnp.zeros([], jnp.int32), mu, mu)

  def read(m, code):
    return _dequantize(m, code, block) if isinstance(m, Quantized) else m

  def write(m, x, code):
    return _quantize(x, code, block) if isinstance(m, Quantized) else x

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    c1, c2 = 1 - jnp.power(b1, t), 1 - jnp.power(b2, t)
    g_leaves, g_def = jax.tree.flatten(updates)
    out, mus, nus = [], [], []
    for g, m, v in zip(g_leaves, state.mu, state.nu):
      g32 = g.astype(jnp.float32)
      ok = jnp.isfinite(g32)
      g0 = jnp.where(ok, g32, 0.0)
      m_old, v_old = read(m, code_m), read(v, code_v)
      m_new = jnp.where(ok, b1 * m_old + (1 - b1) * g0, m_old)
      v_new = jnp.where(ok, b2 * v_old + (1 - b2) * g0 * g0, v_old)
      u = jnp.where(ok, (jnp.sqrt(c2) / c1) * m_new / (jnp.sqrt(v_new) + eps * jnp.sqrt(c2)),
                    0.0)
      out.append((-learning_rate * u).astype(g.dtype))
      mus.append(write(m, m_new, code_m))
      nus.append(write(v, v_new, code_v))
    return g_def.unflatten(out), QuantizedAdamState(count, tuple(mus), tuple(nus))

  return optax.GradientTransformation(init_fn, update_fn)


def optimizers(lr: float, fp32_mask) -> dict:
  """name -> optax optimizer; ``fp32_mask`` keeps 32-bit state (StableEmbedding's table)."""
  dyn = create_dynamic_map(signed=True), create_dynamic_map(signed=False)
  lin = create_linear_map(signed=True), create_linear_map(signed=False)
  return {
      "32-bit Adam": optax.adam(lr),
      "8-bit dynamic blockwise": optim.adam8bit(lr, fp32_mask=fp32_mask),
      "8-bit dynamic per-tensor": quantized_adam(lr, *dyn, None, fp32_mask=fp32_mask),
      "8-bit linear per-tensor": quantized_adam(lr, *lin, None, fp32_mask=fp32_mask),
  }


# --- the model and the training loop (seeds vmapped) --------------------------------------------


def make_model(config: GPTConfig, seed: int, stable: bool):
  """GPT with nnx.Embed, or with the token table swapped for a StableEmbedding."""
  rngs = nnx.Rngs(seed)
  model = GPT(config, rngs=rngs)
  if stable:
    model.embed = jaxbnb.nn.StableEmbedding(config.vocab_size, config.d_model, rngs=rngs)
  return nnx.split(model)


def embedding_mask(state) -> Any:
  """True for the token embedding table (the leaf StableEmbedding tags optim_bits=32)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: jaxbnb.tree.path_str(p) == "embed.embedding", state)


def windows(data: np.ndarray, starts: np.ndarray, seq: int) -> np.ndarray:
  return np.stack([data[s:s + seq] for s in starts]).astype(np.int32)


def train(name, tx, graphdef, states, train_data, eval_tokens, args):
  """Train every seed (leading axis of ``states``) at once; returns per-seed curves and
  final held-out loss."""
  loss_fn = lambda s, t: next_token_loss(nnx.merge(graphdef, s)(t), t)

  @jax.jit
  @jax.vmap
  def step(state, opt_state, tokens):
    value, grads = jax.value_and_grad(loss_fn)(state, tokens)
    updates, opt_state = tx.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, value

  eval_fn = jax.jit(jax.vmap(loss_fn, in_axes=(0, None)))
  opt_states = jax.vmap(tx.init)(states)
  rng = np.random.default_rng(1234)  # the same batches for every variant; each seed its own
  curve = np.zeros((args.steps, args.seeds), np.float32)
  start = time.perf_counter()
  for i in (bar := trange(args.steps, desc=name, leave=False)):
    starts = rng.integers(0, len(train_data) - args.seq - 1, (args.seeds, args.batch))
    tokens = jnp.asarray(np.stack([windows(train_data, s, args.seq) for s in starts]))
    states, opt_states, loss = step(states, opt_states, tokens)
    curve[i] = np.asarray(loss)
    if i % 20 == 0:
      bar.set_postfix(loss=f"{np.nanmedian(curve[i]):.3f}")
  seconds = time.perf_counter() - start
  final = np.asarray(eval_fn(states, eval_tokens), np.float64)
  return curve, final, seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny run (seconds) for CI")
  parser.add_argument("--seeds", type=int, default=4)
  parser.add_argument("--steps", type=int, default=250)
  parser.add_argument("--lr", type=float, default=1e-2, help="aggressive on purpose")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=64)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--margin", type=float, default=0.1,
                      help="nats/byte over 32-bit Adam's median that count as unstable")
  add_output_args(parser, "optim_ablation")
  args = parser.parse_args()
  write = resolve_output(args, "optim_ablation")
  if args.replot:
    data = json.loads(args.out.read_text())
    save_figure(lambda fig: plot(fig, data["rows"], argparse.Namespace(**data["config"])),
                args.out.with_suffix(".png"), figsize=(11.0, 4.2))
    return
  if args.quick:
    args.seeds, args.steps, args.layers, args.width, args.seq, args.batch = 2, 8, 1, 64, 32, 4

  old, new = kjv()
  old, new = np.frombuffer(old, np.uint8), np.frombuffer(new, np.uint8)
  eval_tokens = jnp.asarray(windows(new, np.linspace(0, len(new) - args.seq - 1, 32).astype(int),
                                    args.seq))
  config = GPTConfig(n_layer=args.layers, d_model=args.width, n_head=max(1, args.width // 64),
                     d_ff=4 * args.width, max_len=args.seq)
  rows = []
  # --quick: StableEmbedding only (the path with the 32-bit mask), to stay within seconds.
  for stable in (True,) if args.quick else (False, True):
    graphdef, state0 = make_model(config, 0, stable)
    seeds = [make_model(config, s, stable)[1] for s in range(args.seeds)]
    states = jax.tree.map(lambda *x: jnp.stack(x), *seeds)
    n_params = sum(x.size for x in jax.tree.leaves(state0))
    mask = embedding_mask(state0) if stable else None
    for name, tx in optimizers(args.lr, mask).items():
      curve, final, seconds = train(name + (" + StableEmb" if stable else ""), tx, graphdef,
                                    states, old, eval_tokens, args)
      rows.append({
          "optimizer": name, "stable_embedding": stable,
          "final_eval_loss": [float(x) for x in final],
          "diverged": [bool(x) for x in ~np.all(np.isfinite(curve), axis=0)
                       | ~np.isfinite(final)],
          "state_bytes_per_param": optim.state_bytes(tx.init(state0)) / n_params,
          "n_params": n_params, "seconds": seconds,
          # every 10th step, median over seeds, to keep the JSON small
          "train_loss_median": [float(x) for x in np.median(curve, axis=1)[::10]],
          "train_loss_every": 10,
      })

  for r in rows:
    ref = next(x for x in rows if x["optimizer"] == "32-bit Adam"
               and x["stable_embedding"] == r["stable_embedding"])
    ref_loss = float(np.median(ref["final_eval_loss"]))
    r["unstable"] = [bool(d or not f <= ref_loss + args.margin)
                     for d, f in zip(r["diverged"], r["final_eval_loss"])]
    r["unstable_fraction"] = float(np.mean(r["unstable"]))
    stable_losses = [f for f, u in zip(r["final_eval_loss"], r["unstable"]) if not u]
    r["median_eval_loss_stable_runs"] = (float(np.median(stable_losses)) if stable_losses
                                         else None)

  print(f"\nbyte-level GPT {args.layers} x {args.width} ({rows[0]['n_params'] / 1e6:.2f}M params), "
        f"{args.steps} steps, batch {args.batch} x {args.seq}, Adam lr {args.lr:g} (constant), "
        f"{args.seeds} seeds; held-out loss in nats/byte; unstable: NaN/Inf or > 32-bit median "
        f"+ {args.margin:g}; {jax.devices()[0].platform}, {time.strftime('%Y-%m-%d')}")
  print(f"{'optimizer':<26}{'StableEmb':>10}{'NaN/Inf':>8}{'unstable':>10}{'median loss':>13}"
        f"{'(stable runs)':>14}{'bytes/param':>12}{'s':>7}")
  for r in rows:
    med = r["median_eval_loss_stable_runs"]
    print(f"{r['optimizer']:<26}{'yes' if r['stable_embedding'] else 'no':>10}"
          f"{np.mean(r['diverged']):>8.0%}"
          f"{r['unstable_fraction']:>10.0%}{np.median(r['final_eval_loss']):>13.4f}"
          f"{'-' if med is None else f'{med:.4f}':>14}{r['state_bytes_per_param']:>12.3f}"
          f"{r['seconds']:>7.1f}")
  print("per seed: " + "; ".join(
      f"{r['optimizer']}{' +SE' if r['stable_embedding'] else ''}: "
      + " ".join(f"{x:.3f}" for x in r["final_eval_loss"]) for r in rows))

  if not write:
    return
  args.out.parent.mkdir(parents=True, exist_ok=True)
  settings = {k: v for k, v in vars(args).items() if k not in ("out", "replot")}
  command = " ".join(["python", f"experiments/{pathlib.Path(__file__).name}", *sys.argv[1:]])
  args.out.write_text(json.dumps({"command": command, "config": settings, "device": jax.devices()[0].platform,
                                  "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
  save_figure(lambda fig: plot(fig, rows, args), args.out.with_suffix(".png"),
              figsize=(11.0, 4.2))


def plot(fig, rows, args):
  """Left: median training loss per variant; right: final held-out loss per seed.
  ``args``: anything with ``.lr`` (the parsed arguments, or the JSON's config)."""
  colors = {"32-bit Adam": "black", "8-bit dynamic blockwise": "tab:blue",
            "8-bit dynamic per-tensor": "tab:orange", "8-bit linear per-tensor": "tab:red"}
  ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
  for r in rows:
    y = np.asarray(r["train_loss_median"], np.float64)
    x = np.arange(len(y)) * r["train_loss_every"]
    label = r["optimizer"] + (" + StableEmb" if r["stable_embedding"] else "")
    if not y[-1] < 5.6:  # NaN or huge by the end
      label += " (diverged: off the plot)"
    ax1.plot(x, y, color=colors[r["optimizer"]], ls="-" if r["stable_embedding"] else "--",
             lw=1.2, label=label)
  ax1.set_ylim(1.0, 5.6)
  ax1.set_xlabel("step")
  ax1.set_ylabel("train loss, median over seeds (nats/byte)")
  ax1.set_title(f"byte-level GPT, Adam lr {args.lr:g}")
  ax1.legend(fontsize=7)
  labels = []
  for i, r in enumerate(rows):
    losses = np.asarray(r["final_eval_loss"], np.float64)
    shown = np.where(np.isfinite(losses), np.minimum(losses, 5.5), 5.5)
    ax2.scatter(np.full(len(shown), i), shown, color=colors[r["optimizer"]],
                marker="o" if r["stable_embedding"] else "x", zorder=3)
    labels.append(r["optimizer"].replace("8-bit ", "8b ").replace(" per-tensor", "\nper-tensor")
                  .replace(" blockwise", "\nblockwise") + ("\n+SE" if r["stable_embedding"]
                                                          else "")
                  + f"\n{r['unstable_fraction']:.0%} unst.")
  ax2.set_xticks(range(len(rows)), labels, fontsize=6)
  ax2.set_ylim(1.0, 5.6)
  ax2.set_ylabel("final held-out loss per seed (NaN, > 5.5: at 5.5)")
  ax2.set_title("instability: % of seeds diverged or > 32-bit + margin", fontsize=9)


if __name__ == "__main__":
  main()
