"""jaxbnb.nn: NNX and Linen layers with packed weights (bitsandbytes' bnb.nn)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbnb
from jaxbnb import nn as qnn
from jaxbnb.nn import linen as qlinen
from jaxbnb.qtensor import Quantized4bit, Quantized8bit
from jaxbnb.tree import memory_footprint

IN, OUT = 64, 48
_bias_init = nnx.initializers.normal(1.0)  # nonzero, so the bias really is tested


def _x(shape=(3, 5, IN), dtype=jnp.float32, seed=1):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


def _ref(x, leaf, bias):
  """Float reference from the dequantized weight: x @ W + b, float32."""
  w = leaf.dequantize(jnp.float32)
  y = jnp.dot(x.astype(jnp.float32), w, precision="highest")
  return y if bias is None else y + bias.astype(jnp.float32)


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol,
                             atol=tol)


# --- NNX linear ---------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type,dq", [("nf4", True), ("fp4", False)])
def test_linear4bit_matches_dequantized_and_float(quant_type, dq):
  layer = qnn.Linear4bit(IN, OUT, quant_type=quant_type, compress_statistics=dq,
                         bias_init=_bias_init, rngs=nnx.Rngs(0))
  leaf = layer.kernel.get_value()
  assert isinstance(layer.kernel, qnn.QuantizedParam) and isinstance(leaf, Quantized4bit)
  assert (leaf.quant_type, leaf.state.nested, leaf.shape) == (quant_type, dq, (IN, OUT))
  x = _x()
  y = layer(x)
  assert y.shape == (3, 5, OUT) and y.dtype == jnp.float32
  _close(y, _ref(x, leaf, layer.bias[...]))
  # Same rng stream as nnx.Linear: the packed kernel is that layer's kernel, quantized.
  fl = nnx.Linear(IN, OUT, bias_init=_bias_init, rngs=nnx.Rngs(0))
  _close(layer.bias[...], fl.bias[...], 0)
  w, wq = fl.kernel[...], leaf.dequantize()
  rel = float(jnp.mean(jnp.abs(wq - w)) / jnp.mean(jnp.abs(w)))
  assert rel < (0.11 if quant_type == "nf4" else 0.15), rel
  yf = fl(x)
  assert float(jnp.mean(jnp.abs(y - yf)) / jnp.mean(jnp.abs(yf))) < 0.1


def test_linear_nf4_fp4_no_bias_and_dtypes():
  nf4 = qnn.LinearNF4(IN, OUT, use_bias=False, rngs=nnx.Rngs(0))
  fp4 = qnn.LinearFP4(IN, OUT, rngs=nnx.Rngs(0))
  assert nf4.kernel.get_value().quant_type == "nf4" and nf4.bias is None
  assert fp4.kernel.get_value().quant_type == "fp4"
  x = _x((4, IN))
  _close(nf4(x), _ref(x, nf4.kernel.get_value(), None))
  # Output dtype: the input's by default; `dtype` casts the input (and so the output).
  assert nf4(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
  bf = qnn.LinearNF4(IN, OUT, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                     compute_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert bf(x).dtype == jnp.bfloat16 and bf.kernel.get_value().dtype == jnp.bfloat16
  assert bf.bias[...].dtype == jnp.bfloat16
  _close(bf(x), _ref(x.astype(jnp.bfloat16), bf.kernel.get_value(), bf.bias[...]), 5e-2)


def test_param_selection_jit_and_grads():
  layer = qnn.LinearNF4(IN, OUT, bias_init=_bias_init, rngs=nnx.Rngs(0))
  # Trainable params exclude the packed weight; it has its own Variable type.
  assert set(nnx.state(layer, nnx.Param).keys()) == {"bias"}
  assert set(nnx.state(layer, qnn.QuantizedParam).keys()) == {"kernel"}
  x = _x((4, IN))
  y = layer(x)
  _close(nnx.jit(lambda m, x: m(x))(layer, x), y)
  graphdef, params, packed = nnx.split(layer, nnx.Param, qnn.QuantizedParam)
  _close(jax.jit(lambda p, q, x: nnx.merge(graphdef, p, q)(x))(params, packed, x), y)

  ct = _x((4, OUT), seed=2)
  leaf = layer.kernel.get_value()
  loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p, packed)(x) * ct)
  gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  _close(gx, ct @ leaf.dequantize().T)
  _close(gp["bias"][...], ct.sum(0))
  # nnx.grad over the module differentiates only nnx.Param by default.
  g = nnx.grad(lambda m: jnp.sum(m(x) * ct))(layer)
  assert set(g.keys()) == {"bias"}


def test_linear8bitlt_forward_grads_dtypes():
  layer = qnn.Linear8bitLt(IN, OUT, bias_init=_bias_init, rngs=nnx.Rngs(0))
  leaf = layer.kernel.get_value()
  assert isinstance(leaf, Quantized8bit) and leaf.threshold == 0.0 and layer.threshold == 0.0
  x = _x((4, IN))
  y = layer(x)
  _close(y, jaxbnb.int8_matmul(x, leaf, layer.bias[...]), 0)  # the LLM.int8() op itself
  _close(y, _ref(x, leaf, layer.bias[...]), 5e-2)  # int8 activations: ~1% error
  assert layer(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
  _close(nnx.jit(lambda m, x: m(x))(layer, x), y)
  ct = _x((4, OUT), seed=2)
  gx = jax.grad(lambda x: jnp.sum(layer(x) * ct))(x)
  _close(gx, ct @ leaf.dequantize().T, 1e-4)
  g = nnx.grad(lambda m: jnp.sum(m(x) * ct))(layer)
  _close(g["bias"][...], ct.sum(0))
  # A bfloat16 bias gets a bfloat16 gradient.
  bf = qnn.Linear8bitLt(IN, OUT, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  g = nnx.grad(lambda m: jnp.sum(m(x.astype(jnp.bfloat16)).astype(jnp.float32)))(bf)
  assert g["bias"][...].dtype == jnp.bfloat16


def test_linear8bitlt_threshold_helps_with_outlier_column():
  kernel = jax.random.normal(jax.random.key(0), (IN, OUT)) * 0.1
  x = _x((16, IN))
  x = x.at[:, 3].set(40.0 * jnp.sign(x[:, 3]))  # an outlier feature, as in LLM.int8()
  exact = x @ kernel
  err = {}
  for t in (0.0, 6.0):
    layer = qnn.Linear8bitLt.from_kernel(kernel, threshold=t)
    err[t] = float(jnp.mean(jnp.abs(layer(x) - exact)))
  assert err[6.0] < 0.5 * err[0.0], err


@pytest.mark.parametrize("cls,cfg", [
    (qnn.LinearNF4, dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                         bnb_4bit_use_double_quant=True)),
    (qnn.Linear8bitLt, dict(load_in_8bit=True, llm_int8_threshold=6.0))])
def test_from_linear_equals_jaxbnb_quantize(cls, cfg):
  linear = nnx.Linear(IN, OUT, bias_init=_bias_init, rngs=nnx.Rngs(3))
  kw = dict(compress_statistics=True) if cls is qnn.LinearNF4 else dict(threshold=6.0)
  layer = cls.from_linear(linear, **kw)
  qstate = jaxbnb.quantize(nnx.state(linear), jaxbnb.BitsAndBytesConfig(**cfg))
  want = qstate["kernel"].get_value()
  got = layer.kernel.get_value()
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x = _x((4, IN))
  _close(layer(x), jaxbnb.matmul(x, want, linear.bias[...]), 0)
  # from_kernel without bias.
  nob = cls.from_kernel(linear.kernel[...], **kw)
  assert nob.bias is None and nob(x).shape == (4, OUT)


# --- NNX embeddings -----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [qnn.EmbeddingNF4, qnn.EmbeddingFP4, qnn.Embedding8bit])
def test_embedding_lookup_and_attend(cls):
  emb = cls(50, 64, rngs=nnx.Rngs(0))
  leaf = emb.embedding.get_value()
  assert isinstance(emb.embedding, qnn.QuantizedParam) and not leaf.transposed
  assert nnx.state(emb, nnx.Param) == nnx.State({})
  ids = jnp.array([[0, 7, 49], [3, 3, 12]])
  table = leaf.dequantize()
  rows = emb(ids)
  assert rows.shape == (2, 3, 64) and rows.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(rows), np.asarray(table[ids]))
  np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, i: m(i))(emb, ids)),
                                np.asarray(rows))
  # Same init as nnx.Embed, so the table is close to the float one.
  fl = nnx.Embed(50, 64, rngs=nnx.Rngs(0)).embedding[...]
  assert float(jnp.mean(jnp.abs(table - fl)) / jnp.mean(jnp.abs(fl))) < 0.15
  q = _x((4, 64))
  logits = emb.attend(q)
  assert logits.shape == (4, 50)
  tol = 5e-2 if cls is qnn.Embedding8bit else 1e-5  # 8-bit attend is LLM.int8()
  _close(logits, q @ table.T, tol)
  gq = jax.grad(lambda q: jnp.sum(emb.attend(q)))(q)
  _close(gq, jnp.broadcast_to(table.sum(0), q.shape), 1e-4)
  half = cls(50, 64, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert half(ids).dtype == jnp.bfloat16 and half.attend(q).dtype == jnp.bfloat16


def test_stable_embedding():
  m = qnn.StableEmbedding(40, 16, rngs=nnx.Rngs(0))
  table = m.embedding[...]
  assert isinstance(m.embedding, qnn.StableEmbeddingParam)
  assert isinstance(m.embedding, nnx.Param) and m.embedding.get_metadata("optim_bits") == 32
  assert float(jnp.max(jnp.abs(table))) <= (6 / (40 + 16)) ** 0.5  # Xavier-uniform bound
  ids = jnp.array([[1, 2, 39]])
  y = m(ids)
  e = table[ids]
  ref = (e - e.mean(-1, keepdims=True)) / jnp.sqrt(e.var(-1, keepdims=True) + 1e-5)
  _close(y, ref, 1e-4)
  assert qnn.StableEmbedding(40, 16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(ids).dtype == (
      jnp.bfloat16)
  # Selecting the tables that want 32-bit optimizer state.
  assert set(nnx.state(m, qnn.StableEmbeddingParam).keys()) == {"embedding"}
  mask = qnn.stable_embedding_mask(nnx.state(m, nnx.Param))
  assert mask["embedding"] is True and jax.tree.leaves(mask["norm"]) == [False, False]
  g = nnx.jit(nnx.grad(lambda m: jnp.sum(m(ids) * jnp.arange(16.0))))(m)
  assert float(jnp.sum(jnp.abs(g["embedding"][...]))) > 0


def test_memory_footprint_nf4_dq():
  layer = qnn.Linear4bit(1024, 1024, quant_type="nf4", compress_statistics=True,
                         rngs=nnx.Rngs(0))
  ratio = memory_footprint(nnx.state(layer)) / (1024 * 1024 * 2)
  assert ratio <= 0.29, ratio


def test_bad_arguments():
  r = nnx.Rngs(0)
  with pytest.raises(ValueError, match="quant_type"):
    qnn.Linear4bit(8, 8, quant_type="int4", rngs=r)
  with pytest.raises(ValueError, match="blocksize"):
    qnn.Linear4bit(8, 8, blocksize=48, rngs=r)
  with pytest.raises(ValueError, match="in_features"):
    qnn.Linear4bit(0, 8, rngs=r)
  with pytest.raises(ValueError, match="compute_dtype"):
    qnn.Linear4bit(8, 8, compute_dtype=jnp.int8, rngs=r)
  with pytest.raises(TypeError, match="fixes quant_type"):
    qnn.LinearNF4(8, 8, quant_type="fp4", rngs=r)
  with pytest.raises(NotImplementedError, match="has_fp16_weights"):
    qnn.Linear8bitLt(8, 8, has_fp16_weights=True, rngs=r)
  with pytest.raises(ValueError, match="threshold"):
    qnn.Linear8bitLt(8, 8, threshold=-1.0, rngs=r)
  with pytest.raises(ValueError, match="use blocksize=32"):
    qnn.Embedding4bit(10, 96, rngs=r)
  with pytest.raises(ValueError, match="pad features"):
    qnn.EmbeddingNF4(10, 100, rngs=r)
  layer = qnn.LinearNF4(IN, OUT, rngs=r)  # shapes compiled above: keeps the test fast
  with pytest.raises(TypeError, match="float input"):
    layer(jnp.ones((2, IN), jnp.int32))
  with pytest.raises(ValueError, match="features"):
    layer(jnp.ones((2, 32)))
  with pytest.raises(TypeError, match="integer ids"):
    qnn.Embedding8bit(50, 64, rngs=r)(jnp.ones((2,)))
  with pytest.raises(TypeError, match="nnx.Linear"):
    qnn.LinearNF4.from_linear(layer)
  with pytest.raises(ValueError, match="2-D"):
    qnn.LinearNF4.from_kernel(jnp.ones((2, 3, 4)))
  with pytest.raises(ValueError, match="bias shape"):
    qnn.LinearNF4.from_kernel(jnp.ones((IN, 4)), jnp.ones(5))


# --- Linen --------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [qlinen.LinearNF4(OUT, bias_init=_bias_init),
                                    qlinen.LinearFP4(OUT, compress_statistics=False),
                                    qlinen.Linear8bitLt(OUT, threshold=6.0)],
                         ids=["nf4", "fp4", "int8"])
def test_linen_linear(module):
  x = _x((4, IN))
  v = jax.jit(module.init)(jax.random.key(0), x)
  assert set(v) == {"params", qlinen.QUANTIZED} and set(v["params"]) == {"bias"}
  leaf = v[qlinen.QUANTIZED]["kernel"]
  assert leaf.shape == (IN, OUT)
  y = jax.jit(module.apply)(v, x)
  bias = v["params"]["bias"]
  if isinstance(leaf, Quantized8bit):
    assert leaf.threshold == 6.0
    _close(y, jaxbnb.int8_matmul(x, leaf, bias), 0)
  else:
    _close(y, _ref(x, leaf, bias))
  assert module.apply(v, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
  ct = _x((4, OUT), seed=2)
  gp, gx = jax.grad(lambda p, x: jnp.sum(module.apply({**v, "params": p}, x) * ct),
                    argnums=(0, 1))(v["params"], x)
  _close(gp["bias"], ct.sum(0), 1e-4)
  _close(gx, ct @ leaf.dequantize().T, 1e-4)
  with pytest.raises(ValueError, match="quantized"):
    module.apply({"params": v["params"]}, x)


@pytest.mark.parametrize("module", [qlinen.EmbeddingNF4(50, 64), qlinen.Embedding8bit(50, 64)],
                         ids=["nf4", "int8"])
def test_linen_embedding(module):
  ids = jnp.array([[0, 7, 49]])
  v = jax.jit(module.init)(jax.random.key(0), ids)
  assert "params" not in v
  table = v[qlinen.QUANTIZED]["embedding"].dequantize()
  np.testing.assert_array_equal(np.asarray(jax.jit(module.apply)(v, ids)),
                                np.asarray(table[ids]))
  q = _x((2, 64))
  tol = 5e-2 if isinstance(module, qlinen.Embedding8bit) else 1e-5
  _close(module.apply(v, q, method="attend"), q @ table.T, tol)


def test_linen_stable_embedding_and_errors():
  m = qlinen.StableEmbedding(40, 16)
  ids = jnp.array([[1, 2, 39]])
  v = m.init(jax.random.key(0), ids)
  e = v["params"]["embedding"][ids]
  ref = (e - e.mean(-1, keepdims=True)) / jnp.sqrt(e.var(-1, keepdims=True) + 1e-5)
  _close(m.apply({"params": v["params"]}, ids), ref, 1e-4)
  mask = qlinen.stable_embedding_mask(v)
  assert mask == {"embedding": True, "norm": {"scale": False, "bias": False}}

  with pytest.raises(ValueError, match="quant_type"):
    qlinen.Linear4bit(8, quant_type="int4")
  with pytest.raises(ValueError, match="fixes quant_type"):
    qlinen.LinearNF4(8, quant_type="fp4")
  with pytest.raises(NotImplementedError, match="has_fp16_weights"):
    qlinen.Linear8bitLt(8, has_fp16_weights=True)
  with pytest.raises(ValueError, match="use blocksize=32"):
    qlinen.Embedding4bit(10, 96)


@pytest.mark.parametrize("cls", [qnn.EmbeddingNF4, qnn.Embedding8bit])
def test_embedding_lookup_dequantizes_only_the_rows_read(cls):
  """No float intermediate anywhere near the table's size: only the looked-up rows decode."""
  emb = cls(1000, 64, rngs=nnx.Rngs(0))
  ids = jnp.array([[0, 7, 49]])
  jaxpr = jax.make_jaxpr(lambda i: emb(i))(ids)
  sizes = [int(np.prod(v.aval.shape)) for e in jaxpr.eqns for v in e.outvars
           if jnp.issubdtype(v.aval.dtype, jnp.floating)]
  assert max(sizes) < 1000 * 64 // 8, sorted(sizes)[-3:]


@pytest.mark.parametrize("make", [
    lambda b: qnn.LinearNF4(64, 48, backend=b, rngs=nnx.Rngs(0)),
    lambda b: qnn.Linear8bitLt(64, 48, threshold=6.0, backend=b, rngs=nnx.Rngs(0)),
])
def test_linear_layers_take_a_backend(make):
  """backend="pallas" runs the kernels (interpret mode here) with the XLA layer's answer; an
  unknown backend fails at construction."""
  x = _x((20, 64)).at[0, 5].set(9.0)  # M > 16 (GEMM), with an int8 outlier column
  want = make("xla")(x)
  layer = make("pallas")
  assert "pallas_call" in str(jax.make_jaxpr(lambda x: layer(x))(x))
  np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(want), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="backend"):
    make("cuda")


def test_linen_linear_layers_take_a_backend():
  x = _x((4, 64))
  for cls, kw in ((qlinen.Linear4bit, {"quant_type": "nf4"}), (qlinen.Linear8bitLt, {})):
    layer = cls(32, backend="pallas", **kw)
    variables = layer.init(jax.random.key(0), x)
    ref = cls(32, backend="xla", **kw).apply(variables, x)
    np.testing.assert_allclose(np.asarray(layer.apply(variables, x)), np.asarray(ref),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="backend"):
      cls(32, backend="cuda", **kw).init(jax.random.key(0), x)
