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
  python experiments/smollm2_optim.py --combine   # the seeds' JSONs -> mean +- sd, one plot

``--seed k`` writes docs/results/smollm2_optim.seedk.json (seed 0: smollm2_optim.json);
``--combine`` reads those that exist and writes smollm2_optim_seeds.json / .png.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np
import optax

from jaxbnb import lora, optim
from plotting import RESULTS, add_output_args, resolve_output, save_figure
from smollm2_data import RunClock, load_smollm2
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
  parser.add_argument("--combine", action="store_true",
                      help="only summarize the seeds' JSONs (smollm2_optim[.seedk].json)")
  add_output_args(parser, "smollm2_optim")
  args = parser.parse_args()
  if args.combine:
    return combine(RESULTS)
  write = resolve_output(args, seed_name("smollm2_optim", args.seed))
  if args.replot:
    report(json.loads(args.out.read_text()))  # the tables, for docs/RESULTS.md
    save_figure(lambda fig: plot(fig, json.loads(args.out.read_text())),
                args.out.with_suffix(".png"), figsize=(12.0, 4.4))
    return
  todo = optimizers(args.lr)
  if args.quick:
    args.steps, args.batch, args.seq, args.eval_pairs, args.eval_every = 2, 2, 32, 2, 0
    todo = {k: todo[k] for k in ("AdamW 32-bit (optax)", "AdamW 8-bit")}
  if args.optimizers:
    todo = {k: todo[k] for k in args.optimizers.split(",")}
  start, clock = time.perf_counter(), RunClock()
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
         "total_params": total, "rows": rows, "seconds": time.perf_counter() - start,
         "timing": clock.summary()}
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
        f"{'state MiB':>10}{'B/param':>9}{'s/step med':>11}{'min':>6}{'CPU s':>7}")
  for r in res["rows"]:
    print(f"{r['optimizer']:<24}{r['eval_loss_before']:>16.4f}{r['eval_loss_after']:>8.4f}"
          f"{tail_loss(r):>11.4f}{r['optimizer_state_bytes'] / 2**20:>10.1f}"
          f"{r['state_bytes_per_param']:>9.3f}{r.get('step_seconds_median', np.nan):>11.2f}"
          f"{r.get('step_seconds_min', np.nan):>6.2f}{r.get('cpu_seconds_per_step', np.nan):>7.2f}")
  t = res.get("timing", {})
  print(f"({res['seconds']:.0f} s on {res['device']}"
        + (f"; CPU {t['cpu_s']:.0f} s, load {t['load_1min_mean']:.1f} mean)" if t else ")"))


def tail_loss(row: dict) -> float:
  """Mean train loss over the last 10% of the steps (one batch is a noisy loss)."""
  c = row["train_curve"]
  return float(np.mean(c[-max(1, len(c) // 10):]))


def seed_name(name: str, seed: int) -> str:
  return name if seed == 0 else f"{name}.seed{seed}"


def combine(folder: pathlib.Path) -> None:
  """Mean +- sd over the seeds' runs found in ``folder``: held-out loss after, train loss over
  the last 10% of steps, state B/param, step time; writes smollm2_optim_seeds.json and .png."""
  runs = [json.loads(f.read_text()) for s in range(10)
          if (f := folder / f"{seed_name('smollm2_optim', s)}.json").exists()]
  if not runs:
    raise SystemExit(f"no smollm2_optim*.json under {folder}: run the seeds first")
  names = [r["optimizer"] for r in runs[0]["rows"]]
  out = {"seeds": [r["config"]["seed"] for r in runs], "config": runs[0]["config"],
         "dates": sorted({r["date"] for r in runs}), "device": runs[0]["device"], "rows": {}}
  for n in names:
    rows = [next(x for x in r["rows"] if x["optimizer"] == n) for r in runs]
    stat = lambda v: [float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0]
    out["rows"][n] = {
        "eval_loss_after": stat([x["eval_loss_after"] for x in rows]),
        "eval_loss_before": float(rows[0]["eval_loss_before"]),
        "train_loss_tail": stat([tail_loss(x) for x in rows]),
        "state_bytes_per_param": float(rows[0]["state_bytes_per_param"]),
        "optimizer_state_bytes": int(rows[0]["optimizer_state_bytes"]),
        "step_seconds_median": stat([x["step_seconds_median"] for x in rows]),
        "cpu_seconds_per_step": stat([x["cpu_seconds_per_step"] for x in rows]),
        "curves": [x["train_curve"] for x in rows],
        "eval_curves": [x["eval_curve"] for x in rows]}
  ref = out["rows"][names[0]]["eval_loss_after"][0]
  print(f"SmolLM2-135M full finetune, {out['config']['steps']} steps, seeds {out['seeds']}")
  print(f"{'optimizer':<24}{'held-out after':>20}{'vs 32-bit':>10}{'train (last 10%)':>20}"
        f"{'B/param':>9}{'s/step':>13}{'CPU s/step':>13}")
  for n, r in out["rows"].items():
    pm = lambda k, f: f"{r[k][0]:{f}} +- {r[k][1]:{f}}"
    print(f"{n:<24}{pm('eval_loss_after', '.4f'):>20}{r['eval_loss_after'][0] / ref:>9.3f}x"
          f"{pm('train_loss_tail', '.4f'):>20}{r['state_bytes_per_param']:>9.3f}"
          f"{pm('step_seconds_median', '.2f'):>13}{pm('cpu_seconds_per_step', '.2f'):>13}")
  path = folder / "smollm2_optim_seeds.json"
  path.write_text(json.dumps(out, indent=1))
  save_figure(lambda fig: plot_seeds(fig, out), path.with_suffix(".png"), figsize=(12.0, 4.4))


def plot_seeds(fig, data):
  """Left: train loss (smoothed), mean over seeds with the min-max band, held-out dots; right:
  state bytes per parameter."""
  ax1, ax2 = fig.subplots(1, 2)
  for n, r in data["rows"].items():
    c = np.asarray(r["curves"])
    k = max(1, c.shape[1] // 20)
    sm = np.stack([np.convolve(x, np.ones(k) / k, mode="valid") for x in c])
    steps = np.arange(sm.shape[1]) + k
    line, = ax1.plot(steps, sm.mean(0), label=n)
    ax1.fill_between(steps, sm.min(0), sm.max(0), color=line.get_color(), alpha=0.2)
    ev = sorted({int(s) for e in r["eval_curves"] for s in e})
    ax1.errorbar(ev, [np.mean([e[str(s)] for e in r["eval_curves"]]) for s in ev],
                 [np.std([e[str(s)] for e in r["eval_curves"]]) for s in ev], fmt="o--",
                 color=line.get_color(), ms=4)
  ax1.set_xlabel("step")
  ax1.set_ylabel("loss (nats/token): train, smoothed; dots: held-out")
  ax1.set_title(f"SmolLM2-135M full finetune, seeds {data['seeds']} (band: min-max)",
                fontsize=9)
  ax1.legend(fontsize=7)
  names = list(data["rows"])
  ax2.bar(range(len(names)), [data["rows"][n]["state_bytes_per_param"] for n in names], 0.6,
          color="tab:purple")
  ax2.set_xticks(range(len(names)), names, fontsize=7)
  ax2.set_ylabel("optimizer state, bytes per parameter (measured)")
  ax2.set_title("state memory", fontsize=9)


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
