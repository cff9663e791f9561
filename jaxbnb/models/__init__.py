"""Reference Flax models used by jaxbnb's tests, demos and experiments (plain Flax: no jaxbnb imports)."""

from jaxbnb.models.bert import (BertConfig, MiniLM, encode, hf_to_nnx_names, load_hf_weights,
                                load_minilm, load_tokenizer, mean_pool, minilm_dir,
                                sentence_embedding)
from jaxbnb.models.gpt import GPT, GPTConfig, next_token_loss
from jaxbnb.models.gpt_linen import GPTLinen
