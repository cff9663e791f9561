"""Copy the subset of ../shared/vectors/bnb-0.50.2 that tests/ needs into tests/data.

Inputs, codes and absmax are kept as arrays (bf16/fp16 inputs in their own dtype, losslessly);
bnb's dequantized outputs are kept as SHA-256 of their float32 bytes (full arrays only for the
shape with an all-zero block), which keeps tests/data small while still checking every bit.

  python experiments/make_test_vectors.py PATH/TO/bnb-0.50.2
"""

import hashlib
import json
import pathlib
import shutil
import sys

import numpy as np


def main(src: pathlib.Path, dst: pathlib.Path) -> None:
  dst.mkdir(parents=True, exist_ok=True)
  out, hashes = {}, {}
  with np.load(src / "functional.npz") as f:
    for k in f.files:
      a = f[k]
      if k.endswith("_deq"):
        hashes[k] = hashlib.sha256(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()
        if k.startswith("s1_float32"):
          out[k] = a
        continue
      if k.endswith("_x"):
        dtype = k.split("_")[1]
        if dtype == "float16":
          a = a.astype(np.float16)
        elif dtype == "bfloat16":  # the bf16 bit pattern (exact: these are bf16 values)
          a = (a.view(np.uint32) >> 16).astype(np.uint16)
      out[k] = a
  np.savez_compressed(dst / "bnb_functional.npz", **out)
  (dst / "bnb_functional_deq_sha256.json").write_text(json.dumps(hashes, indent=0, sort_keys=True))
  shutil.copyfile(src / "codebooks.npz", dst / "bnb_codebooks.npz")


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1]), pathlib.Path(__file__).resolve().parents[1] / "tests" / "data")
