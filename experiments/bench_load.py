"""Quantize-on-load of a big float checkpoint: load time, peak device memory, then generate.

Writes (once; reused when present) a random-weight GPT as a bf16 safetensors checkpoint in
shards with a ``model.safetensors.index.json``, loads it with ``jaxbnb.load_quantized`` in NF4
+ double quant, and greedily generates tokens from the loaded model. The device should never
hold more than the packed model plus the largest float tensor; bf16 weights would need the
whole float size (printed beside it).

  python experiments/bench_load.py --preset 20b --dir /tmp/gpt20b   # ~20B params (GPU, ~41 GB disk)
  python experiments/bench_load.py --quick                          # tiny, seconds on CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file
from tqdm import tqdm

import jaxbnb
from bench_qlora_step import PRESETS
from jaxbnb.models.gpt import GPT, GPTConfig
from jaxbnb.tree import path_str

SHARD_BYTES = 4 << 30


def abstract_gpt(config: GPTConfig):
  """``(graphdef, abstract state)`` of a bf16 GPT, with no arrays allocated."""
  return nnx.split(nnx.eval_shape(
      lambda: GPT(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))


def write_checkpoint(abstract, directory: pathlib.Path) -> int:
  """Random bf16 weights (std 0.02; LayerNorm scale 1, biases 0) in ~4 GB shards; returns bytes.

  Values are slices of one random pool (drawing 20B fresh normals would take longer than the
  load being measured; the quantizer's work does not depend on them)."""
  directory.mkdir(parents=True, exist_ok=True)
  pool = (np.random.default_rng(0).standard_normal(1 << 24, np.float32) * 0.02).astype(
      ml_dtypes.bfloat16)
  leaves = jax.tree_util.tree_flatten_with_path(abstract.to_pure_dict())[0]
  total = sum(math.prod(x.shape) * 2 for _, x in leaves)
  shards, current, size = [], {}, 0
  for i, (path, x) in enumerate(leaves):
    name, n = path_str(path), math.prod(x.shape)
    if name.endswith("scale"):
      arr = np.ones(x.shape, ml_dtypes.bfloat16)
    elif name.endswith("bias"):
      arr = np.zeros(x.shape, ml_dtypes.bfloat16)
    else:
      start = (i * 7919) % pool.size
      arr = np.resize(np.roll(pool, -start), n).reshape(x.shape)
    if current and size + arr.nbytes > SHARD_BYTES:
      shards.append(current)
      current, size = {}, 0
    current[name] = arr
    size += arr.nbytes
  shards.append(current)
  weight_map = {}
  for k, shard in enumerate(tqdm(shards, desc="write shards")):
    fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, str(directory / fname))
    weight_map.update({name: fname for name in shard})
  (directory / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {"total_size": total}, "weight_map": weight_map}))
  return total


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", choices=sorted(PRESETS), default="20b")
  p.add_argument("--dir", default=None, help="checkpoint folder (default /tmp/jaxbnb_gpt_PRESET)")
  p.add_argument("--new-tokens", type=int, default=16)
  p.add_argument("--quick", action="store_true", help="tiny model (CPU smoke test)")
  p.add_argument("--out", default=None, help="write the results as JSON here")
  args = p.parse_args()
  if args.quick:
    args.preset, args.new_tokens = "tiny", 4
  config = PRESETS[args.preset]
  directory = pathlib.Path(args.dir or f"/tmp/jaxbnb_gpt_{args.preset}")
  graphdef, abstract = abstract_gpt(config)
  leaves = jax.tree.leaves(abstract)
  n_params = sum(math.prod(x.shape) for x in leaves)
  float_bytes = 2 * n_params
  largest = max(2 * math.prod(x.shape) for x in leaves)

  if not (directory / "model.safetensors.index.json").exists():
    t = time.perf_counter()
    write_checkpoint(abstract, directory)
    print(f"wrote {float_bytes / 2**30:.1f} GiB of bf16 shards in {time.perf_counter() - t:.0f} s")

  cfg = jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=jnp.bfloat16)
  t = time.perf_counter()
  params = jaxbnb.load_quantized(directory, cfg, mapping="gpt", target=abstract,
                                 progress=not args.quick)
  jax.block_until_ready(params)
  load_s = time.perf_counter() - t
  dev = jax.devices()[0]
  peak_load = (dev.memory_stats() or {}).get("peak_bytes_in_use")
  packed = jaxbnb.memory_footprint(params)
  nnx.replace_by_pure_dict(abstract, params)

  # Greedy decoding with a fixed-size token buffer (one compile): the model has no KV cache,
  # so each new token re-runs the prefix; fine for a smoke-level tokens/s figure.
  forward = jax.jit(jaxbnb.intercept(lambda s, t: nnx.merge(graphdef, s)(t)))
  prompt = [1, 2, 3, 4]
  length = len(prompt) + args.new_tokens
  buf = jnp.zeros((1, length), jnp.int32).at[0, :len(prompt)].set(jnp.asarray(prompt))

  @jax.jit
  def next_token(state, buf, i):
    logits = forward(state, buf)
    return buf.at[0, i].set(jnp.argmax(logits[0, i - 1]).astype(jnp.int32))

  jax.block_until_ready(next_token(abstract, buf, len(prompt)))  # compile
  t = time.perf_counter()
  for i in range(len(prompt), length):
    buf = next_token(abstract, buf, i)
  jax.block_until_ready(buf)
  gen_s = time.perf_counter() - t
  peak = (dev.memory_stats() or {}).get("peak_bytes_in_use")

  res = {
      "device": f"{dev.platform} {dev.device_kind}", "jax": jax.__version__,
      "date": str(datetime.date.today()), "preset": args.preset, "params": n_params,
      "float_bf16_bytes": float_bytes, "largest_tensor_bytes": largest,
      "packed_bytes": packed, "load_s": load_s, "peak_device_bytes_after_load": peak_load,
      "peak_device_bytes_after_generate": peak, "tokens_per_s": args.new_tokens / gen_s,
      "generated": [int(v) for v in np.asarray(buf[0])],
  }
  gib = lambda b: "-" if b is None else f"{b / 2**30:.2f} GiB"
  print(f"load_quantized NF4+DQ of a {n_params / 1e9:.2f}B-param bf16 GPT ({args.preset}), "
        f"device: {res['device']}, {res['date']}")
  for label, v in [("bf16 checkpoint (what bf16 weights need)", float_bytes),
                   ("packed NF4+DQ model", packed),
                   ("packed + largest float tensor (bound)", packed + largest),
                   ("peak device memory during load", peak_load),
                   ("peak device memory after generating", peak)]:
    print(f"  {label:<44}{gib(v):>12}")
  print(f"  {'load time':<44}{load_s:>10.1f} s")
  print(f"  {'greedy tokens/s (no KV cache)':<44}{res['tokens_per_s']:>12.2f}")
  print(f"  generated: {res['generated']}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
