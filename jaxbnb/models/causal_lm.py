"""``CausalLM``: a :class:`~jaxbnb.models.llama.Llama` with its params (float or packed),
tokenizer and configs, run layer by layer in a ``lax.scan``.

The decoder layers' params are kept *stacked*: every leaf of the per-layer trees gets a leading
``num_hidden_layers`` axis (a packed leaf's arrays do; its static metadata is the one layer's,
so a scan step slices out an ordinary packed leaf). A forward is then ``embed -> scan(layer) ->
norm -> head``, each piece an NNX module run through :func:`jaxbnb.intercept`:

* compile time does not grow with depth (a 30-layer model compiles one layer);
* XLA keeps one layer's temporaries alive, never all layers' at once (an unrolled graph may
  hoist every layer's weight decode to the start and hold them all);
* generation (prefill + a ``while_loop`` of cached steps) is one jit.

Layers whose trees differ (e.g. ``llm_int8_skip_modules`` kept one layer in float) cannot be
stacked; they are kept as ``{0: ..., 1: ...}`` and run unrolled.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbnb.config import BitsAndBytesConfig
from jaxbnb.intercept import intercept
from jaxbnb.models import generate as _gen
from jaxbnb.models.llama import (DecoderLayer, Llama, LlamaConfig, causal_mask,
                                 default_positions, rope_inv_freq)
from jaxbnb.models.tokenizer import Tokenizer
from jaxbnb.qtensor import is_quantized
from jaxbnb.tree import memory_footprint
from jaxbnb.tree import quantize_parts, warn_unused_skip_patterns


def _delete(tree) -> None:
  for a in jax.tree.leaves(tree):
    if isinstance(a, jax.Array) and not a.is_deleted():
      a.delete()


def stack_layers(layers: dict, *, consume: bool = False) -> Optional[dict]:
  """Per-layer params ``{0: tree, 1: tree, ...}`` -> one tree whose arrays have a leading
  layer axis, or None when the layers' tree structures (packed leaves' metadata included)
  differ. ``consume`` deletes each per-layer array once it is copied (peak: one stacked leaf
  beyond the params)."""
  trees = [layers[i] for i in range(len(layers))]
  flat = [jax.tree.flatten(t) for t in trees]
  if any(f[1] != flat[0][1] for f in flat):
    return None
  out = []
  for j in range(len(flat[0][0])):
    parts = [f[0][j] for f in flat]
    out.append(jnp.stack(parts))
    if consume:
      _delete(parts)
  return jax.tree.unflatten(flat[0][1], out)


def _check_stacked(layers, n: int) -> None:
  """Every array of stacked layers has the leading layer axis; a packed leaf describes ONE
  layer's matrix (``jaxbnb.quantize`` of a stacked float tree would pack the whole stack as one
  matrix: use :meth:`CausalLM.quantize`)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(layers, is_leaf=is_quantized)[0]:
    arrays = jax.tree.leaves(leaf)
    bad = any(a.ndim == 0 or a.shape[0] != n for a in arrays)
    if is_quantized(leaf) and len(leaf.shape) != 2:
      bad = True
    if bad:
      raise ValueError(f"layers{jax.tree_util.keystr(path)}: not stacked over the {n} layers "
                       "(a packed leaf must hold one layer's weight with its arrays stacked); "
                       "quantize a loaded model with lm.quantize(config), or pass "
                       "quantization_config to from_pretrained")


def unstack_layers(stacked, n: int) -> dict:
  """The inverse of :func:`stack_layers`: ``{i: layer i's tree}`` (slices; packed leaves keep
  their bits)."""
  return {i: jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)}


@dataclasses.dataclass(frozen=True)
class Runner:
  """How to run a :class:`Llama`'s params (hashable: the static argument of the jitted
  forward and generate, so models of one architecture share their compiled code).

  The forward is ``embed -> layers -> norm -> head``, each piece an NNX module merged from its
  params and run through :func:`jaxbnb.intercept`; layers in a ``lax.scan`` when ``scanned``.
  """

  config: LlamaConfig
  dtype: np.dtype
  backend: str = "auto"
  scanned: bool = True

  @functools.cached_property
  def top_def(self):  # embed_tokens, norm, lm_head: a Llama without layers
    shell = dataclasses.replace(self.config, num_hidden_layers=0)
    return nnx.graphdef(nnx.eval_shape(lambda: Llama(shell, dtype=self.dtype,
                                                     param_dtype=self.dtype)))

  @functools.cached_property
  def layer_def(self):
    return nnx.graphdef(nnx.eval_shape(lambda: DecoderLayer(
        self.config, dtype=self.dtype, param_dtype=self.dtype, rngs=nnx.Rngs(0))))

  def _run(self, fn, *args):
    return intercept(fn, backend=self.backend)(*args)

  def hidden(self, params, tokens, positions, mask, cache=None, index=0):
    """Final hidden states ``(B, T, d)`` and the updated cache (stacked ``(k, v)``, each
    ``(L, B, S, kv_heads, head_dim)``, or None). mask bool ``(B, T, S)``."""
    top = {k: v for k, v in params.items() if k != "layers"}
    x = self._run(lambda p, t: nnx.merge(self.top_def, p).embed_tokens(t), top, tokens)
    inv_freq = rope_inv_freq(self.config)

    def layer(lp, x, c, positions, mask, index):
      return nnx.merge(self.layer_def, lp)(x, positions, mask, inv_freq, c, index)

    def step(x, lp, kv, i):
      c = None if kv is None else (kv[0][i], kv[1][i])
      x, c = self._run(layer, lp, x, c, positions, mask, index)
      if kv is not None:
        kv = (kv[0].at[i].set(c[0]), kv[1].at[i].set(c[1]))
      return x, kv

    if self.scanned:
      def body(carry, xs):
        return step(carry[0], xs[0], carry[1], xs[1]), None
      n = self.config.num_hidden_layers
      (x, cache), _ = jax.lax.scan(body, (x, cache), (params["layers"], jnp.arange(n)))
    else:
      for i in range(self.config.num_hidden_layers):
        x, cache = step(x, params["layers"][i], cache, i)
    return self._run(lambda p, x: nnx.merge(self.top_def, p).norm(x), top, x), cache

  def logits(self, params, h):
    """float32 logits ``(..., vocab)`` of final hidden states ``(..., d)``."""
    top = {k: v for k, v in params.items() if k != "layers"}
    return self._run(lambda p, h: nnx.merge(self.top_def, p).logits(h), top, h)

  def init_cache(self, batch: int, slots: int):
    c = self.config
    shape = (c.num_hidden_layers, batch, slots, c.num_key_value_heads, c.head_dim)
    return jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)

  def step(self, params, tokens, positions, key_valid, cache, index):
    """One cached step (see :func:`jaxbnb.models.generate.generate`)."""
    mask = causal_mask(key_valid, tokens.shape[1], index, self.config.sliding_window)
    h, cache = self.hidden(params, tokens, positions, mask, cache, index)
    return self.logits(params, h[:, -1]), cache


@functools.partial(jax.jit, static_argnums=0)
def _forward(runner: Runner, params, tokens, attention_mask):
  valid = attention_mask.astype(bool)
  mask = causal_mask(valid, tokens.shape[1], 0, runner.config.sliding_window)
  h, _ = runner.hidden(params, tokens, default_positions(valid), mask)
  return runner.logits(params, h)


@functools.partial(jax.jit, static_argnums=0, static_argnames=(
    "max_new_tokens", "eos", "pad", "temperature", "top_k", "top_p"))
def _generate(runner: Runner, params, tokens, mask, key, *, max_new_tokens, eos, pad,
              temperature, top_k, top_p):
  b, t = tokens.shape
  return _gen.generate(functools.partial(runner.step, params),
                       runner.init_cache(b, t + max_new_tokens), tokens, mask, key,
                       max_new_tokens=max_new_tokens, eos_token_ids=eos, pad_token_id=pad,
                       temperature=temperature, top_k=top_k, top_p=top_p)


class CausalLM:
  """A loaded causal LM.

  ``lm(tokens, attention_mask=None)`` -> float32 logits ``(B, T, vocab)``; :meth:`generate`
  (ids), :meth:`complete` and :meth:`chat` (text), :meth:`perplexity`,
  :meth:`save_pretrained`. Packed weights stay packed: every layer runs through
  :func:`jaxbnb.intercept` (4-bit / LLM.int8() matmuls).

  Attributes:
    config: :class:`LlamaConfig`. dtype: params and compute dtype.
    params: pure dict ``{"embed_tokens", "norm", ["lm_head"], "layers"}``; ``layers`` is
      stacked (see the module docstring) when ``scanned``, else ``{i: layer i}``.
    tokenizer: :class:`Tokenizer` or None. quantization_config: the
      :class:`BitsAndBytesConfig` the weights were packed with, or None.
    runner: the :class:`Runner` (static jit argument; equal for equal architectures).
  """

  def __init__(self, config: LlamaConfig, params: dict, *, dtype,
               tokenizer: Optional[Tokenizer] = None,
               quantization_config: Optional[BitsAndBytesConfig] = None,
               backend: str = "auto"):
    self.config, self.dtype = config, np.dtype(jnp.dtype(dtype))
    self.tokenizer, self.quantization_config, self.backend = (tokenizer, quantization_config,
                                                              backend)
    layers = params["layers"]
    self.scanned = not (isinstance(layers, dict) and 0 in layers)
    if self.scanned:
      _check_stacked(layers, config.num_hidden_layers)
    self.params = params
    self.runner = Runner(config, self.dtype, backend, self.scanned)

  # --- views ---------------------------------------------------------------------------------

  def layer_params(self) -> dict:
    """``{i: layer i's params}`` (slices of the stacked arrays when ``scanned``)."""
    if not self.scanned:
      return self.params["layers"]
    return unstack_layers(self.params["layers"], self.config.num_hidden_layers)

  def unstacked_params(self) -> dict:
    """The params as :class:`Llama`'s ``nnx.to_pure_dict`` lays them out."""
    return {**{k: v for k, v in self.params.items() if k != "layers"},
            "layers": self.layer_params()}

  @property
  def module(self) -> Llama:
    """The plain NNX :class:`Llama` (packed leaves need :func:`jaxbnb.intercept` to run)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Llama(
        self.config, dtype=self.dtype, param_dtype=self.dtype)))
    return nnx.merge(graphdef, self.unstacked_params())

  @property
  def memory_footprint(self) -> int:
    """Bytes held by the params (packed data and quantization constants included)."""
    return memory_footprint(self.params)

  def quantize(self, config: BitsAndBytesConfig) -> "CausalLM":
    """A copy with the linear weights packed by ``config`` (bit for bit what
    :func:`jaxbnb.quantize` gives on the unstacked params). One layer is sliced out and packed at
    a time, so beyond the float params and the packed result only one layer's float slice is
    ever alive."""
    if not isinstance(config, BitsAndBytesConfig):
      raise TypeError("quantize(config) needs a jaxbnb.BitsAndBytesConfig")
    # Quantized under their full paths ("layers.3.mlp..."), so skip patterns match as usual.
    top, used = quantize_parts({k: v for k, v in self.params.items() if k != "layers"}, config)
    layers = {}
    for i in range(self.config.num_hidden_layers):
      layer = (jax.tree.map(lambda a, i=i: a[i], self.params["layers"]) if self.scanned
               else self.params["layers"][i])
      packed, hit = quantize_parts({"layers": {i: layer}}, config)
      layers[i], used = packed["layers"][i], used | hit
    warn_unused_skip_patterns(config, used)
    params = {**top, "layers": layers}
    if self.scanned:
      stacked = stack_layers(layers, consume=True)
      params["layers"] = layers if stacked is None else stacked
    return CausalLM(self.config, params, dtype=self.dtype, tokenizer=self.tokenizer,
                    quantization_config=config, backend=self.backend)

  # --- the forward and generation ------------------------------------------------------------

  def __call__(self, tokens, attention_mask=None) -> jax.Array:
    """float32 logits ``(B, T, vocab)`` of int tokens ``(B, T)`` (``attention_mask`` 1 on
    real tokens; left padding keeps positions right)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be int (batch, seq); got shape {tokens.shape}")
    mask = (jnp.ones(tokens.shape, jnp.int32) if attention_mask is None
            else jnp.asarray(attention_mask, jnp.int32))
    return _forward(self.runner, self.params, tokens, mask)

  def _eos(self, eos_token_id) -> tuple[int, ...]:
    if eos_token_id is not None:
      return (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    ids = set(self.config.eos_token_ids)
    if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
      ids.add(self.tokenizer.eos_token_id)
    return tuple(sorted(ids))

  def _pad(self) -> int:
    if self.config.pad_token_id is not None:
      return int(self.config.pad_token_id)
    eos = self.config.eos_token_ids
    return int(eos[0]) if eos else 0

  def generate(self, tokens, attention_mask=None, *, max_new_tokens: int = 32,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               eos_token_id=None) -> np.ndarray:
    """New token ids int32 ``(B, max_new_tokens)`` after left-padded prompts.

    tokens int ``(B, T)``; attention_mask ``(B, T)``, 1 on real tokens (default all). Greedy
    when ``temperature == 0``, else sampled (``top_k`` 0 = all, ``top_p`` 1.0 = all) from
    ``jax.random.key(seed)``. A row stops at an EOS token (default: the config's and the
    tokenizer's); its later slots hold the pad id. Prefill and the decode loop are one jit,
    compiled once per shape and sampling setting.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be int (batch, seq); got shape {tokens.shape}")
    mask = (jnp.ones(tokens.shape, jnp.int32) if attention_mask is None
            else jnp.asarray(attention_mask, jnp.int32))
    out = _generate(self.runner, self.params, tokens, mask, jax.random.key(seed),
                    max_new_tokens=int(max_new_tokens), eos=self._eos(eos_token_id),
                    pad=self._pad(), temperature=float(temperature), top_k=int(top_k),
                    top_p=float(top_p))
    return np.asarray(out)

  def _need_tokenizer(self) -> Tokenizer:
    if self.tokenizer is None:
      raise ValueError("this model has no tokenizer; pass token ids to generate() / __call__")
    return self.tokenizer

  def complete(self, prompts: Union[str, Sequence[str]], *, add_special_tokens: bool = True,
               **kwargs) -> Union[str, list[str]]:
    """Text continuations of ``prompts`` (a string or a list, batched with left padding to a
    multiple of 16 tokens); ``kwargs`` as :meth:`generate`."""
    tok = self._need_tokenizer()
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    ids, mask = tok.batch(texts, pad_id=self._pad(), multiple=16,
                          add_special_tokens=add_special_tokens)
    out = self.generate(ids, mask, **kwargs)
    eos = set(self._eos(kwargs.get("eos_token_id")))
    res = []
    for row in out.tolist():
      stop = next((i for i, t in enumerate(row) if t in eos), len(row))
      res.append(tok.decode(row[:stop]))
    return res[0] if single else res

  def chat(self, messages: Sequence[dict], **kwargs) -> str:
    """The assistant's reply to ``messages`` (``[{"role": "user", "content": ...}]``) through
    the tokenizer's chat template; ``kwargs`` as :meth:`generate`."""
    prompt = self._need_tokenizer().apply_chat_template(messages, add_generation_prompt=True)
    return self.complete(prompt, add_special_tokens=False, **kwargs)

  def perplexity(self, text_or_tokens, *, window: int = 256) -> float:
    """exp(mean next-token NLL) of a text (or int ids ``(T,)``), in non-overlapping windows of
    ``window`` predicted tokens."""
    ids = (np.asarray(self._need_tokenizer().encode(text_or_tokens), np.int32)
           if isinstance(text_or_tokens, str) else np.asarray(text_or_tokens, np.int32))
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
      chunk = ids[start:start + window + 1]
      logp = jax.nn.log_softmax(self(chunk[None, :-1])[0], axis=-1)
      nll -= float(jnp.sum(jnp.take_along_axis(logp, jnp.asarray(chunk[1:, None]), axis=-1)))
      count += len(chunk) - 1
    return float(math.exp(nll / max(count, 1)))

  def save_pretrained(self, path, *, max_shard_size: Optional[int] = None) -> None:
    """Write a Hugging Face folder; see :func:`jaxbnb.models.hub.save_pretrained`."""
    from jaxbnb.models.hub import save_pretrained
    save_pretrained(self, path, max_shard_size=max_shard_size)
