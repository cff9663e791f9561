"""Copy the subset of a bitsandbytes 0.50.2 vector folder that tests/ needs into tests/data.

The folder holds `functional.npz` and `codebooks.npz`, written by running the real bitsandbytes
0.50.2 on a GPU over the inputs and settings listed in tests/test_bnb_vectors.py.

Inputs, codes and absmax are kept as arrays (bf16/fp16 inputs in their own dtype, losslessly);
bnb's dequantized outputs are kept as SHA-256 of their float32 bytes (full arrays only for the
shape with an all-zero block), which keeps tests/data small while still checking every bit.

  python experiments/make_test_vectors.py PATH/TO/bnb-0.50.2
"""

import argparse
import hashlib
import json
import pathlib
import shutil

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
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("src", type=pathlib.Path,
                      help="folder with bitsandbytes' functional.npz and codebooks.npz")
  parser.add_argument("--dst", type=pathlib.Path,
                      default=pathlib.Path(__file__).resolve().parents[1] / "tests" / "data")
  args = parser.parse_args()
  if not (args.src / "functional.npz").is_file():
    parser.error(f"{args.src} has no functional.npz")
  main(args.src, args.dst)
