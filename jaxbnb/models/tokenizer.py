"""Tokenizer of a causal LM: a ``tokenizers.Tokenizer`` plus what transformers keeps beside it
(special tokens, chat template), read from and written to a Hugging Face folder.

``tokenizers`` and ``jinja2`` (chat templates) are imported only when a tokenizer is built or a
template rendered; a model without a tokenizer runs on token ids.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Optional, Sequence

import numpy as np

_SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_str(v) -> Optional[str]:
  """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
  if isinstance(v, dict):
    return v.get("content")
  return v if isinstance(v, str) else None


class Tokenizer:
  """Text <-> ids for a causal LM, with transformers' chat-template rendering.

  Attributes:
    tokenizer: the ``tokenizers.Tokenizer`` (its post-processor adds BOS where the model
      wants it).
    chat_template: a Jinja template (transformers' ``chat_template``) or None.
    bos_token, eos_token, pad_token, unk_token: special token strings (or None).
  """

  def __init__(self, tokenizer, *, chat_template: Optional[str] = None,
               bos_token: Optional[str] = None, eos_token: Optional[str] = None,
               pad_token: Optional[str] = None, unk_token: Optional[str] = None):
    self.tokenizer = tokenizer
    self.chat_template = chat_template
    self.bos_token, self.eos_token = bos_token, eos_token
    self.pad_token, self.unk_token = pad_token, unk_token

  def token_id(self, token: Optional[str]) -> Optional[int]:
    return None if token is None else self.tokenizer.token_to_id(token)

  @property
  def eos_token_id(self) -> Optional[int]:
    return self.token_id(self.eos_token)

  @property
  def pad_token_id(self) -> Optional[int]:
    return self.token_id(self.pad_token)

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def batch(self, texts: Sequence[str], *, pad_id: int = 0, multiple: int = 1,
            add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids int32 ``(B, T)`` and attention mask int32 ``(B, T)``; ``T`` is the
    longest text rounded up to ``multiple`` (fewer distinct shapes, fewer compilations)."""
    ids = [self.encode(t, add_special_tokens) for t in texts]
    t = max(1, max(len(i) for i in ids))
    t = -(-t // multiple) * multiple
    out = np.full((len(ids), t), pad_id, np.int32)
    mask = np.zeros((len(ids), t), np.int32)
    for row, i in enumerate(ids):
      if i:
        out[row, t - len(i):] = i
        mask[row, t - len(i):] = 1
    return out, mask

  def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                          **kwargs) -> str:
    """The prompt text for ``messages`` (``[{"role": ..., "content": ...}]``), rendered as
    transformers does (sandboxed Jinja, ``trim_blocks``/``lstrip_blocks``, the special tokens
    and ``raise_exception`` in scope). Encode it with ``add_special_tokens=False``."""
    if not self.chat_template:
      raise ValueError("this tokenizer has no chat_template")
    return _render(self.chat_template, messages=list(messages),
                   add_generation_prompt=add_generation_prompt,
                   **{k: getattr(self, k) for k in _SPECIAL}, **kwargs)

  # --- Hugging Face folders ------------------------------------------------------------------

  @classmethod
  def from_dir(cls, path) -> Optional["Tokenizer"]:
    """The tokenizer of a Hugging Face folder (tokenizer.json + tokenizer_config.json), or
    None when the folder has no tokenizer.json."""
    d = pathlib.Path(path)
    if not (d / "tokenizer.json").is_file():
      return None
    from tokenizers import Tokenizer as _Tok
    cfg = {}
    if (d / "tokenizer_config.json").is_file():
      cfg = json.loads((d / "tokenizer_config.json").read_text())
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: transformers uses "default"
      named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
      template = named.get("default") or next(iter(named.values()), None)
    if (d / "chat_template.jinja").is_file():
      template = (d / "chat_template.jinja").read_text()
    return cls(_Tok.from_file(str(d / "tokenizer.json")), chat_template=template,
               **{k: _token_str(cfg.get(k)) for k in _SPECIAL})

  def save(self, path) -> None:
    """Write tokenizer.json and tokenizer_config.json (with the chat template) into ``path``,
    which transformers' ``AutoTokenizer.from_pretrained`` reads."""
    d = pathlib.Path(path)
    d.mkdir(parents=True, exist_ok=True)
    self.tokenizer.save(str(d / "tokenizer.json"))
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                           "clean_up_tokenization_spaces": False}
    cfg.update({k: getattr(self, k) for k in _SPECIAL if getattr(self, k) is not None})
    if self.chat_template:
      cfg["chat_template"] = self.chat_template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _render(template: str, **context) -> str:
  try:
    from jinja2.sandbox import ImmutableSandboxedEnvironment
  except ImportError as e:
    raise ImportError("chat templates need jinja2: pip install jinja2") from e

  def raise_exception(message):
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
      x, indent=indent, ensure_ascii=ensure_ascii)
  env.globals["raise_exception"] = raise_exception
  return env.from_string(template).render(**context)
