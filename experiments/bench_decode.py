"""Greedy decode tokens/s of a small GPT (jaxbnb.models.gpt, NNX): NF4 weights vs bf16 weights.

The same model three ways: bf16 parameters; NF4 (bs 64, compute bf16) and NF4 + double
quantization, quantized by ``jaxbnb.quantize`` and run unmodified through ``jaxbnb.intercept``
(``lm_head`` stays bf16, transformers' default). Decoding uses a KV cache built from the
model's own modules (one token per step, so every Linear is an M = batch GEMV: the memory-bound
case 4-bit weights are for). The whole generation is one jit (``lax.fori_loop`` over steps),
timed after a warm-up call; tokens/s = batch * steps / seconds. The first generated tokens of
the NF4 and bf16 models are printed side by side as a sanity check.

  python experiments/bench_decode.py                       # GPU: ~0.5B-parameter model
  python experiments/bench_decode.py --backend pallas      # 4-bit matmuls through Pallas
  python experiments/bench_decode.py --quick               # CPU smoke run, seconds
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

import jaxbnb
from jaxbnb import ops
from jaxbnb.models.gpt import GPT, GPTConfig


def _attend(q, ck, cv, pos):
  """One query over the cache: q (B, 1, H, D), ck/cv (B, T, H, D); keys > pos masked."""
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  s = jnp.einsum("bqhk,bshk->bhqs", q, ck).astype(jnp.float32)
  s = jnp.where(jnp.arange(ck.shape[1]) <= pos, s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1).astype(cv.dtype)
  return jnp.einsum("bhqs,bshk->bqhk", p, cv)


def decode_step(graphdef, state, cache, tok, pos):
  """Logits (B, vocab) f32 for tokens ``tok`` (B,) at ``pos``; returns the updated cache."""
  model = nnx.merge(graphdef, state)
  x = model.embed(tok[:, None]) + model.pos_embed(jnp.full((1, 1), pos))
  ks, vs = cache
  new_k, new_v = [], []
  for layer, blk in enumerate(model.blocks):
    qkv = blk.attn.qkv(blk.ln1(x))  # (B, 1, 3, H, D)
    ck = jax.lax.dynamic_update_slice(ks[layer], qkv[:, :, 1].astype(ks.dtype), (0, pos, 0, 0))
    cv = jax.lax.dynamic_update_slice(vs[layer], qkv[:, :, 2].astype(vs.dtype), (0, pos, 0, 0))
    y = _attend(qkv[:, :, 0].astype(ck.dtype), ck, cv, pos)
    x = x + blk.attn.out(y.reshape(*x.shape[:2], -1).astype(x.dtype))
    x = x + blk.mlp(blk.ln2(x))
    new_k.append(ck)
    new_v.append(cv)
  logits = model.lm_head(model.ln_f(x))[:, 0].astype(jnp.float32)
  return logits, (jnp.stack(new_k), jnp.stack(new_v))


def make_generate(graphdef, cfg: GPTConfig, batch: int, steps: int):
  step = jaxbnb.intercept(functools.partial(decode_step, graphdef))

  @jax.jit
  def generate(state, tok0):
    shape = (cfg.n_layer, batch, cfg.max_len, cfg.n_head, cfg.head_dim)
    cache = (jnp.zeros(shape, jnp.bfloat16), jnp.zeros(shape, jnp.bfloat16))
    out = jnp.zeros((batch, steps), jnp.int32)

    def body(i, carry):
      tok, cache, out = carry
      logits, cache = step(state, cache, tok, i)
      tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      return tok, cache, out.at[:, i].set(tok)

    return jax.lax.fori_loop(0, steps, body, (tok0, cache, out))[2]

  return generate


def _tokens_per_s(generate, state, tok0, steps, repeats):
  for _ in range(2):  # compile + warm up (seen on CPU: the second call can still compile)
    jax.block_until_ready(generate(state, tok0))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(generate(state, tok0))
    times.append(time.perf_counter() - t0)
  return tok0.shape[0] * steps / statistics.median(times), out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--d-model", type=int, default=2048)
  p.add_argument("--n-layer", type=int, default=8)
  p.add_argument("--n-head", type=int, default=16)
  p.add_argument("--d-ff", type=int, default=8192)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--steps", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--backend", choices=("auto", "xla", "pallas"), default="auto",
                 help="backend of the 4-bit matmuls inside jaxbnb.intercept")
  p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, few steps")
  args = p.parse_args()
  if args.quick:
    args.d_model, args.n_layer, args.n_head, args.d_ff, args.vocab = 128, 2, 4, 512, 256
    args.steps, args.repeats = 8, 1
  if args.backend != "auto":
    # intercept calls ops.qdot_general with the default backend; pick one for this run.
    sys.modules["jaxbnb.intercept"].qdot_general = functools.partial(
        ops.qdot_general, backend=args.backend)

  cfg = GPTConfig(vocab_size=args.vocab, n_layer=args.n_layer, n_head=args.n_head,
                  d_model=args.d_model, d_ff=args.d_ff, max_len=max(64, args.steps))
  graphdef, state = nnx.split(GPT(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  bf16_state = jax.tree.map(lambda a: a.astype(jnp.bfloat16), state)
  tok0 = jnp.arange(args.batch, dtype=jnp.int32) % args.vocab
  generate = make_generate(graphdef, cfg, args.batch, args.steps)

  dev = jax.devices()[0]
  n_params = sum(a.size for a in jax.tree.leaves(state))
  print(f"device: {dev.device_kind}  GPT d={args.d_model} layers={args.n_layer} "
        f"ff={args.d_ff} vocab={args.vocab} ({n_params / 1e6:.0f}M params)  batch {args.batch}"
        f"  steps {args.steps}  4-bit backend {args.backend}")
  rows = [("bf16", bf16_state)]
  for dq in (False, True):
    qcfg = jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                     bnb_4bit_use_double_quant=dq,
                                     bnb_4bit_compute_dtype="bfloat16")
    rows.append(("nf4+dq" if dq else "nf4", jaxbnb.quantize(state, qcfg)))
  base, first = None, None
  print(f"{'weights':<8}{'MiB':>9}{'tokens/s':>11}{'vs bf16':>9}  first tokens")
  for name, st in rows:
    tps, out = _tokens_per_s(generate, st, tok0, args.steps, args.repeats)
    base = base or tps
    first = first if first is not None else out
    mib = jaxbnb.memory_footprint(st) / 2**20
    print(f"{name:<8}{mib:>9.1f}{tps:>11.1f}{tps / base:>9.2f}  {out[0, :8].tolist()}")


if __name__ == "__main__":
  main()
