"""bitsandbytes' CPU timings for experiments/bench_cpu.py, run in the side venv's interpreter.

  .venv-bnb/bin/python experiments/_bnb_cpu_timer.py '<json config>'

The config (written by bench_cpu.py) names the cases; this prints one JSON object
``{case key: median ms per call}`` on its last line. Same method as the JAX side: each call
returns a fresh output (the optimizer steps in place, as bnb's does), is synchronous on CPU, and
is timed alone; the median over ``repeats`` calls after one warm-up call, the best of that
over the ``threads`` counts given. Needs only torch,
bitsandbytes and numpy (no jaxbnb: this runs under another Python).
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time


def _median_ms(fn, repeats: int, budget_s: float) -> float:
  fn()  # warm-up (first-call set-up, e.g. the 4-bit weight repacking)
  times, t_end = [], time.perf_counter() + budget_s
  while len(times) < 3 or (len(times) < repeats and time.perf_counter() < t_end):
    t0 = time.perf_counter()
    fn()
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def main(cfg: dict) -> dict:
  import torch
  import bitsandbytes as bnb
  import bitsandbytes.functional as bF

  torch.manual_seed(0)
  reps, budget = cfg["repeats"], cfg["budget_s"]

  def timed(fn):
    # The best median over the thread counts: on a loaded machine an OpenMP region waits for
    # a descheduled thread (a whole time slice), which a single thread never does.
    best = {}
    for n in cfg["threads"]:
      torch.set_num_threads(n)
      best[n] = _median_ms(fn, reps, budget)
    return min(best.values())

  out = {"torch": torch.__version__, "bitsandbytes": bnb.__version__,
         "threads": cfg["threads"]}

  for key, shapes in cfg["optim"].items():  # AdamW8bit, bnb's defaults (wd 1e-2, block 256)
    ps = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    for p in ps:
      p.grad = torch.randn_like(p)
    opt = bnb.optim.AdamW8bit(ps, lr=1e-3)
    out[key] = timed(opt.step)
    del ps, opt

  with torch.no_grad():
    for key, (n, k, m, kind) in cfg["matmul"].items():
      w = torch.randn(n, k) * 0.05
      if kind == "nf4":  # Linear4bit in eval: bnb repacks for its AVX512-BF16 kernel if it can
        lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
        x = torch.randn(m, k, dtype=torch.bfloat16)
      else:  # LLM.int8(): Linear8bitLt, int8 weights, threshold 6, fp16 input (its dtype)
        lin = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False,
                                  threshold=cfg["int8_threshold"])
        lin.weight = bnb.nn.Int8Params(w.half(), requires_grad=False, has_fp16_weights=False)
        x = torch.randn(m, k).half()
        cols = torch.randperm(k)[:max(1, k // 1000)]
        x[:, cols] *= 20  # 0.1% outlier columns, as on the JAX side
      lin = lin.to("cpu").eval()
      out[key] = timed(lambda: lin(x))
      if kind == "nf4":
        out[key + "/packed"] = bool(getattr(lin.weight.quant_state, "packing_format_for_cpu",
                                            False))
      del lin, w

    for key, (op, side, blocksize) in cfg["functional"].items():
      if op.endswith("4bit"):
        x = torch.randn(side, side, dtype=torch.bfloat16)
        q, st = bF.quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
        fn = ((lambda: bF.quantize_4bit(x, blocksize=blocksize, quant_type="nf4"))
              if op == "quantize_4bit" else (lambda: bF.dequantize_4bit(q, st)))
      else:
        x = torch.randn(side, side)
        q, st = bF.quantize_blockwise(x, blocksize=blocksize)
        fn = ((lambda: bF.quantize_blockwise(x, blocksize=blocksize))
              if op == "quantize_blockwise" else (lambda: bF.dequantize_blockwise(q, st)))
      out[key] = timed(fn)
      del x, q, st
  return out


if __name__ == "__main__":
  logging.disable(logging.WARNING)  # bnb warns on import (optional CPU kernels) and per call
  print(json.dumps(main(json.loads(sys.argv[1]))))
