"""8-bit (and 4-bit) vs 32-bit AdamW on a real pretrained LLM: full finetunes of SmolLM2-135M.

The same task, batches and steps as smollm2_qlora.py's full-finetuning row (KJV verse
continuation: Old Testament pairs to train, New Testament pairs held out; float32 master
weights, bf16 forward/backward, clip 1.0), with the optimizer changed: optax.adamw (two float32
moments), jaxbnb.optim.adamw8bit (bitsandbytes' blockwise 8-bit state, blocks of 256) and,
when this jaxbnb has it, jaxbnb.optim.adamw4bit (Li et al. 2023's 4-bit state). The paper
(Dettmers et al. 2022) finds 8-bit Adam matches 32-bit Adam's loss at a quarter of the state;
here: the train loss per step, the held-out loss every ``--eval-every`` steps, and the state's
bytes measured on the arrays (jaxbnb.optim.state_bytes).

  python experiments/smollm2_optim.py [--steps 100] [--seed 0] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import optax

from jaxbnb import lora, optim
from plotting import add_output_args, resolve_output, save_figure
from smollm2_data import load_smollm2
from smollm2_datatypes import _device
from smollm2_qlora import add_task_args, full_finetune, task_data


def optimizers(lr: float) -> dict:
  """name -> optax transformation (clip 1.0, then AdamW without weight decay)."""
  clip = lambda tx: optax.chain(optax.clip_by_global_norm(1.0), tx)
  out = {"AdamW 32-bit (optax)": clip(optax.adamw(lr, weight_decay=0.0)),
         "AdamW 8-bit": clip(optim.adamw8bit(lr, weight_decay=0.0))}
  if hasattr(optim, "adamw4bit"):  # Li et al. 2023, another issue's work
    out["AdamW 4-bit"] = clip(optim.adamw4bit(lr, weight_decay=0.0))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_task_args(parser, steps=100)
  parser.add_argument("--lr", type=float, default=3e-5)
  parser.add_argument("--eval-every", type=int, default=25)
  parser.add_argument("--optimizers", default=None,
                      help="comma-separated subset of the optimizer names (default: all)")
  parser.add_argument("--quick", action="store_true",
                      help="32-bit and 8-bit AdamW, 2 steps of 2 x 32 tokens (smoke test)")
  add_output_args(parser, "smollm2_optim")
  args = parser.parse_args()
  write = resolve_output(args, "smollm2_optim")
  if args.replot:
    save_figure(lambda fig: plot(fig, json.loads(args.out.read_text())),
                args.out.with_suffix(".png"), figsize=(12.0, 4.4))
    return
  todo = optimizers(args.lr)
  if args.quick:
    args.steps, args.batch, args.seq, args.eval_pairs, args.eval_every = 2, 2, 32, 2, 0
    todo = {k: todo[k] for k in ("AdamW 32-bit (optax)", "AdamW 8-bit")}
  if args.optimizers:
    todo = {k: todo[k] for k in args.optimizers.split(",")}
  start = time.perf_counter()
  lm = load_smollm2()
  data, heldout = task_data(lm, args)
  total = lora.count_params(lm.params)
  rows = []
  for name, tx in todo.items():
    row = full_finetune(lm, tx, data, heldout, args, name=name, eval_every=args.eval_every)
    row["state_bytes_per_param"] = row["optimizer_state_bytes"] / total
    rows.append({"optimizer": name, **row})
    print(f"  {name}: held-out {row['eval_loss_before']:.4f} -> {row['eval_loss_after']:.4f}, "
          f"state {row['state_bytes_per_param']:.3f} B/param", flush=True)
  res = {"date": time.strftime("%Y-%m-%d"), "device": _device(),
         "command": " ".join(["python experiments/smollm2_optim.py", *sys.argv[1:]]),
         "config": {k: getattr(args, k) for k in ("steps", "batch", "seq", "eval_pairs", "seed",
                                                  "lr", "eval_every")},
         "has_adamw4bit": hasattr(optim, "adamw4bit"), "train_pairs": int(len(data[0])),
         "total_params": total, "rows": rows, "seconds": time.perf_counter() - start}
  report(res)
  if write:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    save_figure(lambda fig: plot(fig, json.loads(args.out.read_text())),
                args.out.with_suffix(".png"), figsize=(12.0, 4.4))


def report(res: dict) -> None:
  c = res["config"]
  print(f"\nSmolLM2-135M-Instruct full finetune, KJV verse continuation, {c['steps']} steps of "
        f"{c['batch']} x {c['seq']} tokens, lr {c['lr']:g}, seed {c['seed']}")
  print(f"{'optimizer':<24}{'held-out before':>16}{'after':>8}{'last train':>11}"
        f"{'state MiB':>10}{'B/param':>9}{'s/step':>8}")
  for r in res["rows"]:
    tail = np.mean(r["train_curve"][-max(1, len(r["train_curve"]) // 10):])
    print(f"{r['optimizer']:<24}{r['eval_loss_before']:>16.4f}{r['eval_loss_after']:>8.4f}"
          f"{tail:>11.4f}{r['optimizer_state_bytes'] / 2**20:>10.1f}"
          f"{r['state_bytes_per_param']:>9.3f}{r['seconds_per_step']:>8.2f}")
  print(f"({res['seconds']:.0f} s on {res['device']})")


def plot(fig, data):
  """Left: train (smoothed) and held-out loss per step; right: optimizer state per param."""
  ax1, ax2 = fig.subplots(1, 2)
  rows = data["rows"]
  for r in rows:
    curve = np.asarray(r["train_curve"])
    k = max(1, len(curve) // 20)
    smooth = np.convolve(curve, np.ones(k) / k, mode="valid")
    line, = ax1.plot(np.arange(len(smooth)) + k, smooth, label=r["optimizer"])
    ev = {int(s): v for s, v in r["eval_curve"].items()}
    ax1.plot(list(ev), list(ev.values()), "o--", color=line.get_color(), ms=4)
  ax1.set_xlabel("step")
  ax1.set_ylabel("loss (nats/token): train, smoothed; dots: held-out")
  ax1.set_title(f"SmolLM2-135M full finetune, lr {data['config']['lr']:g}", fontsize=9)
  ax1.legend(fontsize=7)
  x = np.arange(len(rows))
  ax2.bar(x, [r["state_bytes_per_param"] for r in rows], 0.6, color="tab:purple")
  ax2.set_xticks(x, [r["optimizer"] for r in rows], fontsize=7)
  ax2.set_ylabel("optimizer state, bytes per parameter (measured)")
  ax2.set_title("state memory", fontsize=9)


if __name__ == "__main__":
  main()
