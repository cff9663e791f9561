"""Stacked weights (scanned layers, MoE experts): per-slice quantization and packed execution.

Every packed-execution test turns warnings into errors: a dequantize fallback in
``jaxbnb.intercept`` warns, so these tests fail if any op unpacks the stack.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from hypothesis import given, settings, strategies as st
from flax import nnx

import jaxbnb

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")
CONFIGS = {
    "nf4": NF4,
    "fp4-dq-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=jnp.bfloat16),
    "int8": dict(load_in_8bit=True),
}
packed = pytest.mark.filterwarnings("error")


def _cfg(name, **kw):
  return jaxbnb.BitsAndBytesConfig(**CONFIGS[name], **kw)


def _same_bits(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                  np.asarray(y).reshape(-1).view(np.uint8))


def _rel(y, ref):
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  return np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30)


# --- per-slice quantization ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("shape,dtype", [((3, 64, 96), jnp.float32), ((2, 33, 17), jnp.float16),
                                         ((2, 2, 40, 24), jnp.bfloat16)])
def test_each_slice_is_quantized_as_if_alone(name, shape, dtype):
  n_stack = len(shape) - 2
  w = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  w = w.at[(0,) * n_stack].set(0.0)                       # an all-zero slice
  w = w.at[(n_stack and 1,) * n_stack + (3, 5)].set(jnp.nan)  # a NaN in another
  w = w.astype(dtype)
  cfg = _cfg(name, stacked_axes={"experts": n_stack})
  q = jaxbnb.quantize({"experts": {"kernel": w}}, cfg)["experts"]["kernel"]
  assert q.stack_shape == shape[:n_stack] and q.shape == shape[n_stack:]
  assert q.full_shape == shape
  for a in jax.tree.leaves(q):  # every array carries the stack axes
    assert a.shape[:n_stack] == shape[:n_stack]
  dq = jaxbnb.dequantize(q)
  assert dq.shape == shape and dq.dtype == dtype
  for idx in np.ndindex(*shape[:n_stack]):
    alone = jaxbnb.quantize({"kernel": w[idx]}, cfg)["kernel"]
    _same_bits(q[idx], alone)
    _same_bits(dq[idx], jaxbnb.dequantize(alone))
  assert jaxbnb.memory_footprint(q) == sum(
      jaxbnb.memory_footprint(q[idx]) for idx in np.ndindex(*shape[:n_stack]))


@pytest.mark.slow  # ~20-40 s on two loaded cores
@settings(max_examples=6)
@given(stack=st.integers(1, 3), rows=st.integers(1, 70), cols=st.integers(2, 70),
       fmt=st.sampled_from(["nf4", "fp4-dq-bf16", "int8"]),
       special=st.sampled_from([None, 0.0, np.inf, np.nan]))
def test_per_slice_bits_property(stack, rows, cols, fmt, special):
  w = np.array(jax.random.normal(jax.random.key(rows * 71 + cols), (stack, rows, cols)))
  if special is not None:
    w[-1, : rows // 2 + 1] = special  # whole blocks of zeros / a non-finite value
  cfg = _cfg(fmt, stacked_axes={"w": 1})
  q = jaxbnb.quantize({"w": {"kernel": jnp.asarray(w)}}, cfg)["w"]["kernel"]
  for l in range(stack):
    _same_bits(q[l], jaxbnb.quantize({"kernel": jnp.asarray(w[l])}, cfg)["kernel"])


def test_packed_stacks_slice_natively_and_round_trip_checkpoints(tmp_path):
  from jaxbnb import checkpoint

  w = jax.random.normal(jax.random.key(0), (3, 64, 32))
  q = jaxbnb.quantize({"layers": {"kernel": w}},
                      jaxbnb.BitsAndBytesConfig(**NF4, stacked_axes={"layers": 1}))
  leaf = q["layers"]["kernel"]
  x = jax.random.normal(jax.random.key(1), (3, 5, 64))
  y = jax.vmap(lambda w, x: jaxbnb.matmul(x, w))(leaf, x)  # vmap hands out one packed slice
  ref = jnp.einsum("lbi,lio->lbo", x, jaxbnb.dequantize(leaf))
  assert _rel(y, ref) < 1e-5
  _same_bits(jax.tree.map(lambda a: a[1], leaf), leaf[1])
  assert leaf[1:].stack_shape == (2,) and leaf[...] is leaf
  # Stacking per-layer packed leaves (e.g. loaded one layer at a time) gives the stacked leaf.
  _same_bits(jax.tree.map(lambda *s: jnp.stack(s), *[leaf[i] for i in range(3)]), leaf)
  checkpoint.save(str(tmp_path / "ckpt"), q)
  restored = checkpoint.restore(str(tmp_path / "ckpt"))
  _same_bits(restored, q)
  assert restored["layers"]["kernel"].stack_shape == (3,)


def test_an_unmarked_3d_kernel_keeps_its_dense_general_meaning():
  w = jax.random.normal(jax.random.key(0), (4, 64, 32))
  q = jaxbnb.quantize({"layers": {"kernel": w}}, jaxbnb.BitsAndBytesConfig(**NF4))
  leaf = q["layers"]["kernel"]
  assert leaf.stack_shape == () and leaf.shape == (4, 64, 32) and leaf.matrix_shape == (2048, 4)


def test_stacked_axes_patterns_and_errors():
  w = jax.random.normal(jax.random.key(0), (2, 64, 32))
  tree = {"blocks": {"mlp": {"kernel": w}}, "head": {"kernel": w[0]}}
  q = jaxbnb.quantize(tree, jaxbnb.BitsAndBytesConfig(**NF4, stacked_axes={"*.mlp.*": 1}))
  assert q["blocks"]["mlp"]["kernel"].stack_shape == (2,)
  assert q["head"]["kernel"].stack_shape == ()
  with pytest.raises(ValueError, match="stacked_axes"):
    jaxbnb.BitsAndBytesConfig(**NF4, stacked_axes={"layers": 0})
  with pytest.raises(ValueError, match="stacked_axes"):
    jaxbnb.BitsAndBytesConfig(**NF4, stacked_axes=["layers"])
  with pytest.raises(ValueError, match="each slice must be a matrix"):
    jaxbnb.quantize(tree, jaxbnb.BitsAndBytesConfig(**NF4, stacked_axes={"mlp": 2}))
  with pytest.raises(IndexError, match="stack axes"):
    q["head"]["kernel"][0]
  with pytest.raises(ValueError, match="stacked quantized weight"):
    jaxbnb.matmul(jnp.ones((1, 64)), q["blocks"]["mlp"]["kernel"])


# --- packed execution ---------------------------------------------------------------------------


class _Block(nn.Module):
  boxed: bool = True

  @nn.compact
  def __call__(self, x, _):
    init = nn.initializers.lecun_normal()
    if self.boxed:  # logical axis names, to which nn.scan adds "layers"
      init = nn.with_partitioning(init, (None, "mlp"))
    return nn.gelu(nn.Dense(64, kernel_init=init)(x)), None


class _LinenStack(nn.Module):
  marked: bool = True

  @nn.compact
  def __call__(self, x):
    meta = {nn.PARTITION_NAME: "layers"} if self.marked else {}
    scan = nn.scan(nn.remat(_Block), variable_axes={"params": 0},
                   split_rngs={"params": True}, length=4, metadata_params=meta)
    return scan(boxed=self.marked, name="layers")(x, None)[0]


@packed
@pytest.mark.parametrize("marked", [True, False])
@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_linen_nn_scan_runs_packed(name, marked):
  model = _LinenStack(marked=marked)
  x = jax.random.normal(jax.random.key(1), (3, 64))
  variables = model.init(jax.random.key(0), x)
  # Marked: Linen's own metadata says which axis is the stack; unmarked: the config does.
  cfg = _cfg(name) if marked else _cfg(name, stacked_axes={"layers": 1})
  q = jaxbnb.quantize(variables, cfg)
  kernel = nn.unbox(q)["params"]["layers"]["Dense_0"]["kernel"]
  assert kernel.stack_shape == (4,) and kernel.shape == (64, 64)
  y = jax.jit(jaxbnb.intercept(model.apply))(q, x)
  ref = model.apply(jaxbnb.dequantize(q), x)
  # 4-bit: the dequantized model's output; LLM.int8() also quantizes x (its own error).
  assert _rel(y, ref) < (1e-5 if name == "nf4" else 5e-2)
  if name == "int8":  # the same as running each layer's packed weight unstacked
    layers = [jax.tree.map(lambda a, l=l: a[l], nn.unbox(q)["params"]["layers"]["Dense_0"])
              for l in range(4)]
    h = x
    for lp in layers:
      h = jax.nn.gelu(jaxbnb.matmul(h, lp["kernel"]) + lp["bias"])
    assert _rel(y, h) < 1e-5


class _NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(64, 64, rngs=rngs)

  def __call__(self, x):
    return nnx.gelu(self.lin(x))


class _NNXStack(nnx.Module):
  def __init__(self, n, rngs):
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
      return _NNXBlock(rngs)
    self.layers = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    @nnx.remat
    def step(x, block):
      return block(x)
    return step(x, self.layers)


def test_nnx_transform_metadata_marks_the_stack():
  class Block(nnx.Module):
    def __init__(self, rngs):  # logical axis names, to which nnx.vmap adds "layers"
      meta = {"out_sharding": (None, "mlp"), "eager_sharding": False}
      self.lin = nnx.Linear(64, 64, rngs=rngs, kernel_metadata=meta)

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(rngs):
    return Block(rngs)
  _, state = nnx.split(make(nnx.Rngs(0)))
  q = jaxbnb.quantize(state, jaxbnb.BitsAndBytesConfig(**NF4))  # no stacked_axes needed
  assert q["lin"]["kernel"].get_value().stack_shape == (3,)


@packed
@pytest.mark.parametrize("name", ["nf4", "fp4-dq-bf16"])
def test_nnx_scanned_stack_runs_packed(name):
  graphdef, state = nnx.split(_NNXStack(4, nnx.Rngs(0)))
  q = jaxbnb.quantize(state, _cfg(name, stacked_axes={"layers": 1}))
  assert q["layers"]["lin"]["kernel"].get_value().stack_shape == (4,)
  forward = jaxbnb.intercept(lambda s, x: nnx.merge(graphdef, s)(x))
  x = jax.random.normal(jax.random.key(1), (5, 64))
  y = jax.jit(forward)(q, x)
  ref = nnx.merge(graphdef, jaxbnb.dequantize(q))(x)
  assert _rel(y, ref) < (1e-5 if name == "nf4" else 2e-2)  # bf16 compute dtype


@packed
@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_ragged_dot_over_experts(name):
  e, k, n, m = 4, 64, 48, 300
  w = jax.random.normal(jax.random.key(0), (e, k, n))
  q = jaxbnb.quantize({"experts": {"kernel": w}}, _cfg(name, stacked_axes={"experts": 1}))
  wq = q["experts"]["kernel"]
  x = jax.random.normal(jax.random.key(1), (m, k))
  sizes = jnp.array([100, 0, 150, 40], jnp.int32)  # an empty group; 10 rows past the groups
  y = jax.jit(jaxbnb.intercept(jax.lax.ragged_dot))(x, wq, sizes)
  ref = jax.lax.ragged_dot(x, jaxbnb.dequantize(wq), sizes)
  assert y.shape == (m, n)
  np.testing.assert_array_equal(y[290:], 0)
  assert _rel(y, ref) < (1e-5 if name == "nf4" else 5e-2)
  # The gradient w.r.t. x runs packed too (a linear loss: both backward passes use W exactly).
  c = jax.random.normal(jax.random.key(2), (m, n))
  loss = lambda f, w: lambda x: jnp.sum(f(x, w, sizes) * c)
  g = jax.grad(loss(jaxbnb.intercept(jax.lax.ragged_dot), wq))(x)
  g_ref = jax.grad(loss(jax.lax.ragged_dot, jaxbnb.dequantize(wq)))(x)
  assert _rel(g, g_ref) < 1e-5


@packed
@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_einsum_and_vmap_over_experts(name):
  w = jax.random.normal(jax.random.key(0), (4, 64, 32))
  wq = jaxbnb.quantize({"experts": {"kernel": w}},
                       _cfg(name, stacked_axes={"experts": 1}))["experts"]["kernel"]
  wd = jaxbnb.dequantize(wq)
  tol = 1e-5 if name == "nf4" else 5e-2
  x = jax.random.normal(jax.random.key(1), (4, 6, 64))
  dense_moe = lambda w, x: jnp.einsum("ecd,edf->ecf", x, w)  # capacity-batched experts
  assert _rel(jax.jit(jaxbnb.intercept(dense_moe))(wq, x), dense_moe(wd, x)) < tol
  swapped = lambda w, x: jnp.einsum("edf,ced->cef", w, x.transpose(1, 0, 2))
  assert _rel(jaxbnb.intercept(swapped)(wq, x), swapped(wd, x)) < tol
  every = lambda w, x: jnp.einsum("td,edf->tef", x, w)  # every token through every expert
  assert _rel(jaxbnb.intercept(every)(wq, x[0]), every(wd, x[0])) < tol
  vmapped = lambda w, x: jax.vmap(lambda w, x: x @ w)(w, x)
  assert _rel(jaxbnb.intercept(vmapped)(wq, x), vmapped(wd, x)) < tol


@packed
def test_loops_and_cond_index_the_packed_stack():
  w = jax.random.normal(jax.random.key(0), (5, 64, 64)) * 0.1
  wq = jaxbnb.quantize({"layers": {"kernel": w}},
                       jaxbnb.BitsAndBytesConfig(**NF4, stacked_axes={"layers": 1}))
  wq = wq["layers"]["kernel"]
  wd = jaxbnb.dequantize(wq)

  def run(w, x, n):  # fori_loop (a while with a dynamic trip count), dynamic index, cond
    step = lambda i, h: jax.lax.cond(i % 2 == 0, lambda h: h @ w[i],
                                     lambda h: jnp.tanh(h @ w[i]), h)
    return jax.lax.fori_loop(0, n, step, x) + x @ w[4]  # and a static index
  x = jax.random.normal(jax.random.key(1), (3, 64))
  assert _rel(jax.jit(jaxbnb.intercept(run))(wq, x, 4), run(wd, x, 4)) < 1e-5


def test_scanned_nf4_forward_temporaries_below_two_layers_of_weights():
  n, d = 6, 512
  params = {"layers": {"kernel": jax.random.normal(jax.random.key(0), (n, d, d)) * 0.05,
                       "bias": jnp.zeros((n, d))}}
  q = jaxbnb.quantize(params, jaxbnb.BitsAndBytesConfig(**NF4, stacked_axes={"layers": 1}))

  def forward(p, x):
    body = lambda h, lp: (jnp.tanh(h @ lp["kernel"] + lp["bias"]), None)
    return jax.lax.scan(body, x, p["layers"])[0]
  x = jnp.ones((8, d))
  compiled = jax.jit(jaxbnb.intercept(forward)).lower(q, x).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 2 * d * d * 4
  assert jaxbnb.memory_footprint(q) < 0.2 * jaxbnb.memory_footprint(params)


@pytest.mark.slow  # ~20-40 s on two loaded cores
@packed
def test_qlora_on_a_scanned_stack_trains_stacked_adapters():
  from jaxbnb import lora

  n, d = 3, 64
  params = {"layers": {"kernel": jax.random.normal(jax.random.key(0), (n, d, d)) * 0.1}}
  q = jaxbnb.quantize(params, jaxbnb.BitsAndBytesConfig(**NF4, stacked_axes={"layers": 1}))
  lcfg = lora.LoRAConfig(rank=4, alpha=8)
  adapters = lora.init(q, lcfg, jax.random.key(1))
  assert adapters["layers.kernel"]["a"].shape == (n, d, 4)
  assert adapters["layers.kernel"]["b"].shape == (n, 4, d)
  adapters = jax.tree.map(lambda a: a + 0.01, adapters)  # a non-zero delta

  def forward(p, x):
    return jax.lax.scan(lambda h, lp: (jnp.tanh(h @ lp["kernel"]), None), x, p["layers"])[0]
  x = jax.random.normal(jax.random.key(2), (5, d))
  loss = lambda ad, f, base: jnp.mean(f(lora.attach(base, ad, lcfg), x) ** 2)
  grads = jax.jit(jax.grad(loss, argnums=0), static_argnums=1)(
      adapters, jaxbnb.intercept(forward), q)
  # The same adapters on the dequantized base, merged into float weights.
  merged = lambda ad: {"layers": {"kernel": jaxbnb.dequantize(q)["layers"]["kernel"]
                                  + lcfg.scale * ad["layers.kernel"]["a"]
                                  @ ad["layers.kernel"]["b"]}}
  ref = jax.grad(lambda ad: jnp.mean(forward(merged(ad), x) ** 2))(adapters)
  for k in ("a", "b"):
    assert _rel(grads["layers.kernel"][k], ref["layers.kernel"][k]) < 1e-4
  assert _rel(loss(adapters, jaxbnb.intercept(forward), q),
              jnp.mean(forward(merged(adapters), x) ** 2)) < 1e-5
  assert lora.count_params(q) == n * d * d


# --- the README's examples (their bodies, after the imports of this module) -----------------


@pytest.mark.slow  # ~20-40 s on two loaded cores
@packed
def test_readme_scanned_linen():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.gelu(nn.Dense(256)(x)), None

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):  # 6 layers, params stacked (6, 256, 256), run by lax.scan
      layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=6)
      return layers(name="layers")(x, None)[0]

  model, x = Model(), jnp.ones((4, 256))
  variables = model.init(jax.random.key(0), x)
  cfg = jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  stacked_axes={"layers": 1})  # 1 leading axis: the layer
  q = jaxbnb.quantize(variables, cfg)              # each layer packed as if alone
  y = jax.jit(jaxbnb.intercept(model.apply))(q, x)  # each scan step runs one packed layer
  assert y.shape == (4, 256)


@pytest.mark.slow  # ~20-40 s on two loaded cores
@packed
def test_readme_scanned_nnx():
  class Model(nnx.Module):
    def __init__(self, n_layers, rngs):
      @nnx.split_rngs(splits=n_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return nnx.Linear(256, 256, rngs=rngs)
      self.layers = make(rngs)                     # kernel (n_layers, 256, 256)

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def step(x, layer):
        return nnx.gelu(layer(x))
      return step(x, self.layers)

  graphdef, state = nnx.split(Model(6, nnx.Rngs(0)))
  cfg = jaxbnb.BitsAndBytesConfig(load_in_8bit=True, stacked_axes={"layers": 1})  # LLM.int8()
  forward = jax.jit(jaxbnb.intercept(lambda s, x: nnx.merge(graphdef, s)(x)))
  y = forward(jaxbnb.quantize(state, cfg), jnp.ones((4, 256)))
  assert y.shape == (4, 256)


@pytest.mark.slow  # ~20-40 s on two loaded cores
@packed
def test_readme_moe():
  experts = {"moe": {"kernel": jax.random.normal(jax.random.key(0), (8, 256, 512))}}
  cfg = jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  stacked_axes={"moe": 1})
  w = jaxbnb.quantize(experts, cfg)["moe"]["kernel"]  # 8 packed experts, each (256, 512)
  tokens = jnp.ones((64, 256))                        # sorted by expert
  group_sizes = jnp.array([8, 8, 16, 0, 8, 8, 8, 8], jnp.int32)
  y = jax.jit(jaxbnb.intercept(jax.lax.ragged_dot))(tokens, w, group_sizes)   # (64, 512)
  einsum = jaxbnb.intercept(lambda w, x: jnp.einsum("ecd,edf->ecf", x, w))     # dense MoE
  y2 = jax.jit(einsum)(w, tokens.reshape(8, 8, 256))                           # (8, 8, 512)
  assert y.shape == (64, 512) and y2.shape == (8, 8, 512)


def test_a_product_over_the_stack_axis_falls_back_with_a_warning():
  w = jax.random.normal(jax.random.key(0), (4, 16, 32))
  wq = jaxbnb.quantize({"layers": {"kernel": w}},
                       jaxbnb.BitsAndBytesConfig(**NF4, stacked_axes={"layers": 1}))
  wq = wq["layers"]["kernel"]
  summed = lambda w, x: jnp.einsum("li,lio->o", x, w)  # contracts the layer axis
  x = jnp.ones((4, 16))
  with pytest.warns(UserWarning, match="dequantized"):
    y = jaxbnb.intercept(summed)(wq, x)
  assert _rel(y, summed(jaxbnb.dequantize(wq), x)) < 1e-5
  with pytest.raises(NotImplementedError, match="stack axes"):
    jaxbnb.qdot_general(x, wq, (((0, 1), (0, 1)), ((), ())))
