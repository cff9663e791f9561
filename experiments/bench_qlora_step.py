"""One QLoRA training step on a GPT with random weights: step time and peak device memory.

The base is built leaf by leaf (random bf16 weights, std 0.02) and each linear kernel is
quantized to NF4 + double quant as soon as it exists, so the device never holds the float
model: a base whose bf16 full finetuning would not fit still trains. LoRA adapters (rank 16,
every kernel but the LM head) train with paged 8-bit AdamW, as in the QLoRA paper.

Prints: parameters, bytes of the NF4 base / adapters / optimizer state (on the arrays), the
memory full bf16 finetuning would need (bf16 weights + grads, fp32 master copy and Adam moments:
16 bytes/param), median step time, tokens/s, peak device memory; writes the same as JSON.

  python experiments/bench_qlora_step.py --preset 1b      # ~1.0B params (GPU)
  python experiments/bench_qlora_step.py --preset 7b      # ~6.7B params (GPU, 80 GB)
  python experiments/bench_qlora_step.py --quick          # tiny, seconds on CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxbnb
from jaxbnb import lora, optim
from jaxbnb.models.gpt import GPT, GPTConfig, next_token_loss
from jaxbnb.tree import path_str

PRESETS = {
    "tiny": GPTConfig(vocab_size=256, n_layer=2, n_head=4, d_model=64, d_ff=256, max_len=128),
    "1b": GPTConfig(vocab_size=32000, n_layer=18, n_head=16, d_model=2048, d_ff=8192,
                    max_len=2048),
    "7b": GPTConfig(vocab_size=32000, n_layer=32, n_head=32, d_model=4096, d_ff=16384,
                    max_len=2048),
    "20b": GPTConfig(vocab_size=32000, n_layer=44, n_head=48, d_model=6144, d_ff=24576,
                     max_len=2048),
}  # random-weight GPTs for the GPU benchmarks (also bench_load.py)
FULL_FINETUNE_BYTES_PER_PARAM = 16  # bf16 weight + bf16 grad + fp32 master + fp32 Adam m, v


def random_base(config: GPTConfig, qcfg: jaxbnb.BitsAndBytesConfig, dtype=jnp.bfloat16):
  """``(graphdef, state)`` of a GPT whose kernels (but the LM head) are quantized as they are
  drawn: peak device memory is the packed model plus one float leaf."""
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: GPT(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))))
  pure = abstract.to_pure_dict()
  paths, treedef = jax.tree_util.tree_flatten_with_path(pure)

  @jax.jit(static_argnums=(1, 2))
  def draw(key, shape, kind):
    if kind == "ones":
      return jnp.ones(shape, dtype)
    if kind == "zeros":
      return jnp.zeros(shape, dtype)
    w = (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)
    return jaxbnb.quantize({"kernel": w}, qcfg)["kernel"] if kind == "quantize" else w

  leaves = []
  for i, (path, leaf) in enumerate(paths):
    name = path_str(path)
    last = name.rsplit(".", 1)[-1]
    kind = ("ones" if last == "scale" else "zeros" if last == "bias" else
            "quantize" if last == "kernel" and "lm_head" not in name else "normal")
    leaves.append(draw(jax.random.key(i), tuple(leaf.shape), kind))
  nnx.replace_by_pure_dict(abstract, jax.tree.unflatten(treedef, leaves))
  return graphdef, abstract


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", choices=sorted(PRESETS), default="1b")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--quick", action="store_true", help="tiny model, 2 steps (CPU smoke test)")
  p.add_argument("--out", default=None, help="write the results as JSON here")
  args = p.parse_args()
  if args.quick:
    args.preset, args.batch, args.seq, args.steps = "tiny", 2, 32, 2
  config = PRESETS[args.preset]
  dev = jax.devices()[0]

  qcfg = jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=jnp.bfloat16)
  t0 = time.perf_counter()
  graphdef, base = random_base(config, qcfg)
  jax.block_until_ready(base)
  build_s = time.perf_counter() - t0
  n_params = sum(math.prod(x.shape) if jaxbnb.is_quantized(x) else x.size
                 for x in jax.tree.leaves(base, is_leaf=jaxbnb.is_quantized))

  cfg = lora.LoRAConfig(rank=args.rank, alpha=2.0 * args.rank)
  adapters = lora.init(base, cfg, jax.random.key(1))
  forward = jaxbnb.intercept(lambda s, t: nnx.merge(graphdef, s)(t))
  tx = optim.paged_adamw8bit(1e-4, weight_decay=0.0)
  opt_state = tx.init(adapters)

  def loss(adapters, tokens):
    return next_token_loss(forward(lora.attach(base, adapters, cfg), tokens), tokens)

  @jax.jit
  def step(adapters, opt_state, tokens):
    value, grads = jax.value_and_grad(loss)(adapters, tokens)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, value

  rng = np.random.default_rng(0)
  tokens = [jnp.asarray(rng.integers(0, config.vocab_size, (args.batch, args.seq)), jnp.int32)
            for _ in range(2)]
  # Two warm-up steps: the first call compiles for freshly created (uncommitted) arrays, the
  # second once more for the committed ones it returned.
  for i in range(2):
    adapters, opt_state, value = step(adapters, opt_state, tokens[i])
    jax.block_until_ready(value)
  times = []
  for i in range(args.steps):
    t = time.perf_counter()
    adapters, opt_state, value = step(adapters, opt_state, tokens[i % 2])
    jax.block_until_ready((adapters, value))
    times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  stats = dev.memory_stats() or {}

  res = {
      "device": f"{dev.platform} {dev.device_kind}", "jax": jax.__version__,
      "date": str(datetime.date.today()), "preset": args.preset,
      "config": {k: getattr(config, k) for k in ("vocab_size", "n_layer", "n_head", "d_model",
                                                  "d_ff")},
      "batch": args.batch, "seq": args.seq, "rank": args.rank, "params": n_params,
      "base_bytes": jaxbnb.memory_footprint(base),
      "adapter_params": lora.count_params(adapters),
      "adapter_bytes": jaxbnb.memory_footprint(adapters),
      "optimizer_state_bytes": optim.state_bytes(opt_state),
      "full_bf16_finetune_bytes": n_params * FULL_FINETUNE_BYTES_PER_PARAM,
      "build_s": build_s, "step_ms_median": step_s * 1e3,
      "tokens_per_s": args.batch * args.seq / step_s, "final_loss": float(value),
      "peak_device_bytes": stats.get("peak_bytes_in_use"),
      "device_bytes_limit": stats.get("bytes_limit"),
  }
  gib = lambda b: "-" if b is None else f"{b / 2**30:.2f} GiB"
  print(f"QLoRA step ({args.preset}: {n_params / 1e9:.2f}B params, NF4+DQ base, rank "
        f"{args.rank}, paged AdamW8bit), batch {args.batch} x {args.seq} tokens, device: "
        f"{res['device']}, {res['date']}")
  for label, key in [("NF4 base", "base_bytes"), ("adapters", "adapter_bytes"),
                     ("optimizer state", "optimizer_state_bytes"),
                     ("full bf16 finetune would need", "full_bf16_finetune_bytes"),
                     ("peak device memory", "peak_device_bytes"),
                     ("device memory limit", "device_bytes_limit")]:
    print(f"  {label:<32}{gib(res[key]):>14}")
  print(f"  {'step time (median)':<32}{res['step_ms_median']:>11.1f} ms")
  print(f"  {'tokens/s':<32}{res['tokens_per_s']:>14.0f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
