"""Models: pretrained Llama-family causal LMs, and reference Flax models used by jaxbnb's tests, demos and experiments (``bert``, ``gpt``,
``gpt_linen``, ``llama``: plain Flax, no jaxbnb imports), and loaders of pretrained causal LMs
(``hub``: Hugging Face folders and GGUF files, packed with jaxbnb; ``gguf``; ``tokenizer``).

Example::

  lm = jaxbnb.models.from_pretrained(path, quantization_config=None)
  logits = lm(tokens)              # int32 (B, T) -> (B, T, vocab)
  lm.save_pretrained(out_dir)
"""

from jaxbnb.models.bert import (BertConfig, MiniLM, encode, hf_to_nnx_names, load_hf_weights,
                                load_minilm, load_tokenizer, mean_pool, minilm_dir,
                                sentence_embedding)
from jaxbnb.models.gpt import GPT, GPTConfig, next_token_loss
from jaxbnb.models.gpt_linen import GPTLinen
from jaxbnb.models.causal_lm import CausalLM
from jaxbnb.models.hub import from_pretrained, save_pretrained
from jaxbnb.models.llama import Llama, LlamaConfig
from jaxbnb.models.tokenizer import Tokenizer
