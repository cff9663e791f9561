"""4-bit vs 8-bit vs 32-bit AdamW on a GPT full finetune: final and held-out loss, state bytes,
step time (issue 18, the language-model half of experiments/optim4bit.py).

A byte-level GPT (jaxbnb.models.gpt) is pretrained on the King James Old Testament with
qlora_finetune.pretrain (32-bit AdamW, Orbax-cached under experiments/.cache, shared by every
row), then every parameter is finetuned on the New Testament (first 90%) with

  AdamW 32-bit   optax.adamw
  AdamW 8-bit    jaxbnb.optim.adamw8bit (bitsandbytes' rule: dynamic map, blocks of 256)
  AdamW 4-bit    jaxbnb.optim.adamw4bit (Li et al. 2023: first moment blockwise 128, second
                 moment rank-1 normalized on the linear map without zero)

same learning rate, weight decay and gradient clipping; a seed is its own batch order, the same
for every optimizer. Held-out loss: 32 fixed windows of the last 10% of the New Testament.
Step time: gradient + optimizer update (two jitted calls), timed during the run in round robin
over the optimizers, median over all steps but the first. Results: docs/results/optim4bit_gpt.json
and .png.

  python experiments/optim4bit_gpt.py [--quick] [--seeds 3] [--steps 240]
  python experiments/optim4bit_gpt.py --replot        # only the PNG, from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import trange

from jaxbnb import optim
from jaxbnb.models.gpt import GPTConfig, next_token_loss
from benchlib import device_name
from plotting import add_output_args, resolve_output, save_figure
from qlora_finetune import ROOT, kjv, pretrain

COLORS = {"AdamW 32-bit": "black", "AdamW 8-bit": "tab:blue", "AdamW 4-bit": "tab:red"}


def optimizers(lr: float, wd: float, clip: float) -> dict:
  """name -> optax optimizer; the same clipping in front of each."""
  wrap = lambda tx: optax.chain(optax.clip_by_global_norm(clip), tx)
  return {
      "AdamW 32-bit": wrap(optax.adamw(lr, weight_decay=wd)),
      "AdamW 8-bit": wrap(optim.adamw8bit(lr, weight_decay=wd)),
      "AdamW 4-bit": wrap(optim.adamw4bit(lr, weight_decay=wd)),
  }


def windows(data: np.ndarray, starts: np.ndarray, seq: int) -> np.ndarray:
  return np.stack([data[s:s + seq] for s in starts]).astype(np.int32)


def batch_plan(data: np.ndarray, args) -> np.ndarray:
  """(steps, seeds, batch) window starts: seed s draws its own order, reused by every optimizer."""
  rng = np.random.default_rng(1234)
  return rng.integers(0, len(data) - args.seq - 1, (args.steps, args.seeds, args.batch))


def train(txs: dict, graphdef, state0, data, plan, eval_tokens, args):
  """Finetune ``state0`` with every optimizer in ``txs``, seed after seed, step by step in round
  robin: the same batch for every optimizer, and load drift on a shared machine hits all alike.

  One jitted gradient function serves every optimizer (same parameter tree); each optimizer
  compiles only its update. Returns name -> (train loss (steps, seeds), held-out loss
  (points, seeds), seed 0's final optimizer state, median step seconds, median update seconds)."""
  loss_fn = lambda s, t: next_token_loss(nnx.merge(graphdef, s)(t), t)
  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  eval_fn = jax.jit(lambda s: loss_fn(s, eval_tokens))

  def make(tx):
    def update(grads, opt_state, params):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state
    return jax.jit(update)
  update_fns = {name: make(tx) for name, tx in txs.items()}
  out = {name: {"train": np.zeros((args.steps, args.seeds)), "held": [], "step": [],
                "update": []} for name in txs}
  for seed in range(args.seeds):
    params = dict.fromkeys(txs, state0)
    opt = {name: tx.init(state0) for name, tx in txs.items()}
    held = {name: [float(eval_fn(state0))] for name in txs}
    for i in (bar := trange(args.steps, desc=f"seed {seed}", leave=False)):
      tokens = jnp.asarray(windows(data, plan[i, seed], args.seq))
      for name in txs:
        t0 = time.perf_counter()
        value, grads = jax.block_until_ready(grad_fn(params[name], tokens))
        t1 = time.perf_counter()
        params[name], opt[name] = jax.block_until_ready(
            update_fns[name](grads, opt[name], params[name]))
        t2 = time.perf_counter()
        if seed or i:  # the very first step compiles
          out[name]["step"].append(t2 - t0)
          out[name]["update"].append(t2 - t1)
        out[name]["train"][i, seed] = float(value)
        if (i + 1) % args.every == 0:
          held[name].append(float(eval_fn(params[name])))
      bar.set_postfix({n.split()[-1]: f"{held[n][-1]:.3f}" for n in txs})
    for name in txs:
      out[name]["held"].append(held[name])
      if seed == 0:
        out[name]["opt_state"] = opt[name]
  return {name: (o["train"], np.asarray(o["held"]).T, o["opt_state"],
                 float(np.median(o["step"])), float(np.median(o["update"])))
          for name, o in out.items()}


def spread(x: np.ndarray) -> dict:
  """mean, half the max-min range over seeds, and the per-seed values."""
  return {"mean": float(x.mean()), "spread": float((x.max() - x.min()) / 2),
          "per_seed": [float(v) for v in x]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny run (seconds) for CI")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=240, help="finetuning steps")
  parser.add_argument("--every", type=int, default=20, help="held-out loss every N steps")
  parser.add_argument("--pretrain-steps", type=int, default=300)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=64)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--weight-decay", type=float, default=1e-2)
  parser.add_argument("--clip", type=float, default=1.0, help="global-norm gradient clipping")
  add_output_args(parser, "optim4bit_gpt")
  args = parser.parse_args()
  write = resolve_output(args, "optim4bit_gpt")
  if args.replot:
    save_figure(lambda fig: plot(fig, json.loads(args.out.read_text())),
                args.out.with_suffix(".png"), figsize=(11.0, 4.0))
    return
  if args.quick:  # kjv_base_lm(quick=True)'s cached base: 2 x 64, 30 pretraining steps
    args.seeds, args.steps, args.every = 2, 4, 2
    args.layers, args.width, args.seq, args.pretrain_steps, args.batch = 2, 64, 64, 30, 4

  start, load_before = time.perf_counter(), os.getloadavg()
  old, new = kjv()
  old, new = np.frombuffer(old, np.uint8), np.frombuffer(new, np.uint8)
  split = int(len(new) * 0.9)
  train_new, eval_new = new[:split], new[split:]
  eval_tokens = jnp.asarray(windows(
      eval_new, np.linspace(0, len(eval_new) - args.seq - 1, 32).astype(int), args.seq))
  config = GPTConfig(n_layer=args.layers, d_model=args.width, n_head=max(1, args.width // 64),
                     d_ff=4 * args.width, max_len=args.seq)
  # pretrain()'s batch is 16 in every caller, so its cache key (layers, width, steps) holds.
  graphdef, state0 = pretrain(config, old, args.pretrain_steps, 16, args.seq,
                              ROOT / "experiments" / ".cache")
  n_params = sum(x.size for x in jax.tree.leaves(state0))
  txs = optimizers(args.lr, args.weight_decay, args.clip)
  plan = batch_plan(train_new, args)

  rows = []
  for name, (train_loss, held, opt_state, step_s, update_s) in train(
      txs, graphdef, state0, train_new, plan, eval_tokens, args).items():
    tail = args.every  # final train loss: mean of the last --every steps (one batch is noisy)
    rows.append({
        "optimizer": name,
        "final_train_loss": spread(train_loss[-tail:].mean(0)),
        "held_out_loss": spread(held[-1]),
        "held_out_before": float(held[0].mean()),
        "state_bytes": optim.state_bytes(opt_state),
        "state_bytes_per_param": optim.state_bytes(opt_state) / n_params,
        "step_ms": 1e3 * step_s, "update_ms": 1e3 * update_s,
        # curves: train loss per step and held-out loss per point, per seed
        "train_loss": train_loss.tolist(), "held_out_curve": held.tolist(),
    })
  ref = rows[0]
  for r in rows:
    r["train_loss_vs_32bit"] = r["final_train_loss"]["mean"] / ref["final_train_loss"]["mean"]
    r["held_out_vs_32bit"] = r["held_out_loss"]["mean"] / ref["held_out_loss"]["mean"]
    r["state_vs_32bit"] = r["state_bytes"] / ref["state_bytes"]
    r["step_time_vs_32bit"] = r["step_ms"] / ref["step_ms"]
  device = f"{device_name(jax.devices()[0])}, jax {jax.__version__}"
  total = time.perf_counter() - start

  print(f"\nbyte-level GPT {args.layers} x {args.width} ({n_params / 1e6:.2f}M params), pretrained "
        f"{args.pretrain_steps} steps on the Old Testament; full finetune {args.steps} steps on "
        f"the New Testament, batch {args.batch} x {args.seq}, lr {args.lr:g}, wd "
        f"{args.weight_decay:g}, clip {args.clip:g}, {args.seeds} seeds; {device}, "
        f"{time.strftime('%Y-%m-%d')}; loss in nats/byte, mean ± half-range over seeds")
  print(f"{'optimizer':<14}{'train loss':>18}{'vs 32':>7}{'held-out loss':>18}{'vs 32':>7}"
        f"{'state KB':>10}{'B/param':>9}{'step ms':>9}{'vs 32':>7}{'update ms':>10}")
  for r in rows:
    tl, hl = r["final_train_loss"], r["held_out_loss"]
    print(f"{r['optimizer']:<14}{tl['mean']:>11.4f} ± {tl['spread']:.4f}"
          f"{r['train_loss_vs_32bit']:>6.3f}x{hl['mean']:>11.4f} ± {hl['spread']:.4f}"
          f"{r['held_out_vs_32bit']:>6.3f}x{r['state_bytes'] / 1e3:>10.1f}"
          f"{r['state_bytes_per_param']:>9.3f}{r['step_ms']:>9.2f}{r['step_time_vs_32bit']:>6.2f}x"
          f"{r['update_ms']:>10.2f}")
  print(f"held-out before finetuning: {rows[0]['held_out_before']:.4f}; load average "
        f"{load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}; {total:.0f} s")

  if not write:
    return
  args.out.parent.mkdir(parents=True, exist_ok=True)
  settings = {k: v for k, v in vars(args).items() if k not in ("out", "replot")}
  command = " ".join(["python", f"experiments/{pathlib.Path(__file__).name}", *sys.argv[1:]])
  data = {"command": command, "config": settings, "n_params": n_params, "device": device,
          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
          "load_average_1min": {"start": load_before[0], "end": os.getloadavg()[0]},
          "seconds": total, "results": rows}
  args.out.write_text(json.dumps(data, indent=1))
  save_figure(lambda fig: plot(fig, data), args.out.with_suffix(".png"), figsize=(11.0, 4.0))


def plot(fig, data):
  """Left: train loss (smoothed over --every steps), right: held-out loss; mean over seeds,
  min-max over seeds shaded."""
  rows, cfg = data["results"], data["config"]
  ax1, ax2 = fig.subplots(1, 2)
  k = cfg["every"]
  for r in rows:
    c = COLORS.get(r["optimizer"], "gray")
    ls, z = ("--", 3) if "32" in r["optimizer"] else ("-", 2)  # 32-bit on top, visible
    loss = np.asarray(r["train_loss"], np.float64)  # (steps, seeds)
    smooth = loss[: len(loss) // k * k].reshape(-1, k, loss.shape[1]).mean(1)
    x = (np.arange(len(smooth)) + 1) * k
    ax1.plot(x, smooth.mean(1), color=c, ls=ls, zorder=z, label=f"{r['optimizer']} "
             f"({r['final_train_loss']['mean']:.4f}, {r['state_bytes_per_param']:.2f} B/param)")
    ax1.fill_between(x, smooth.min(1), smooth.max(1), color=c, alpha=0.2)
    held = np.asarray(r["held_out_curve"], np.float64)  # (points, seeds)
    xh = np.arange(len(held)) * k
    ax2.plot(xh, held.mean(1), color=c, ls=ls, zorder=z, marker=".",
             label=f"{r['optimizer']} ({r['held_out_loss']['mean']:.4f}, "
                   f"{r['step_ms']:.0f} ms/step)")
    ax2.fill_between(xh, held.min(1), held.max(1), color=c, alpha=0.2)
  ax1.set_xlabel("finetuning step")
  ax1.set_ylabel(f"train loss, mean of {k} steps (nats/byte)")
  ax1.legend(fontsize=7)
  ax2.set_xlabel("finetuning step")
  ax2.set_ylabel("held-out loss (nats/byte)")
  ax2.legend(fontsize=7)
  fig.suptitle(f"GPT {cfg['layers']} x {cfg['width']} ({data['n_params'] / 1e6:.2f}M params) "
               f"full finetune, KJV Old -> New Testament: AdamW with 32-, 8- and 4-bit state "
               f"({cfg['seeds']} seeds shaded)", fontsize=9)
  fig.tight_layout()


if __name__ == "__main__":
  main()
