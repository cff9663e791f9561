"""jaxbnb.checkpoint: Orbax checkpoints of quantized trees, exact bits and metadata."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxbnb
from jaxbnb import checkpoint as ckpt
from jaxbnb import functional as F
from jaxbnb.models.gpt import GPT, GPTConfig
from jaxbnb.qtensor import quantize_4bit_array

CONFIGS = {
    "nf4_dq": jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=jnp.bfloat16),
    "fp4": jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": jaxbnb.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=5.0),
}


@pytest.fixture(scope="module")
def gpt_state():
  return nnx.split(GPT(GPTConfig()))[1]


@pytest.fixture(scope="module")
def quantized(gpt_state):
  return {name: jaxbnb.quantize(gpt_state, cfg) for name, cfg in CONFIGS.items()}


def assert_identical(a, b):
  """Same tree structure (so equal static metadata) and bit-identical leaves."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    if isinstance(x, (int, float, str)):
      assert x == y and type(x) is type(y), path
      continue
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, path
    np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8),
                                  err_msg=str(path))


def quantized_leaves(tree):
  return [x for x in jax.tree.leaves(tree, is_leaf=jaxbnb.is_quantized) if jaxbnb.is_quantized(x)]


@pytest.mark.parametrize("fmt", list(CONFIGS))
def test_gpt_round_trip(tmp_path, quantized, fmt):
  q = quantized[fmt]
  ckpt.save(tmp_path / "ck", q)
  # No target: the tree comes back from the metadata alone, as nested dicts (NNX Variables
  # dropped, like nnx.to_pure_dict) holding the very same quantized leaves.
  restored = ckpt.restore(tmp_path / "ck")
  assert_identical(restored, nnx.to_pure_dict(q))
  leaves = quantized_leaves(restored)
  assert leaves and all(type(x).__name__ == ("Quantized8bit" if fmt == "int8" else
                                             "Quantized4bit") for x in leaves)
  # Into the concrete tree (an nnx.State with Param wrappers) and into an abstract one.
  assert_identical(ckpt.restore(tmp_path / "ck", target=q), q)
  abstract = jax.eval_shape(lambda: q)
  assert_identical(ckpt.restore(str(tmp_path / "ck"), target=abstract), q)
  # The pure-dict restore slots into a fresh model's state.
  state = jax.eval_shape(lambda: q)
  nnx.replace_by_pure_dict(state, restored)
  assert_identical(state, q)


def test_plain_tree_round_trip(tmp_path):
  q8, st8 = F.quantize_blockwise(jnp.linspace(-3, 3, 1000, dtype=jnp.float32), blocksize=256,
                                 nested=True)
  tree = {
      "w": np.arange(12, dtype=np.float32).reshape(3, 4),
      "layers": [jnp.ones((5,), jnp.bfloat16), (jnp.arange(7, dtype=jnp.int8), None)],
      "opt": {"q": q8, "state": st8, "count": jnp.int32(3)},
      "lr": 0.5, "steps": 7, "name": "adam", "flag": True,
      "a.b": jnp.zeros((2,)), "a": {"b": jnp.ones((2,))},  # colliding dotted names
      "empty": {},
  }
  ckpt.save(tmp_path / "ck", tree)
  restored = ckpt.restore(tmp_path / "ck")
  assert_identical(restored, tree)
  assert isinstance(restored["layers"][1], tuple) and restored["layers"][1][1] is None
  assert isinstance(restored["opt"]["state"], jaxbnb.QuantState)
  assert restored["opt"]["state"].state2.shape == st8.state2.shape
  # A numpy target leaf comes back as numpy.
  assert isinstance(ckpt.restore(tmp_path / "ck", target=tree)["w"], np.ndarray)
  meta = ckpt.read_metadata(tmp_path / "ck")
  assert meta["format"] == "jaxbnb.checkpoint" and meta["version"] == ckpt.FORMAT_VERSION


def test_existing_path_needs_force(tmp_path):
  ckpt.save(tmp_path / "ck", {"x": jnp.ones(3)})
  with pytest.raises(FileExistsError, match="force=True"):
    ckpt.save(tmp_path / "ck", {"x": jnp.zeros(3)})
  ckpt.save(tmp_path / "ck", {"x": jnp.zeros(3)}, force=True)
  assert float(ckpt.restore(tmp_path / "ck")["x"].sum()) == 0


# --- targets that do not match ------------------------------------------------------------------


def _leaf(quant_type="nf4", blocksize=64, shape=(64, 128), dtype=jnp.float32, nested=False):
  w = jax.random.normal(jax.random.key(0), shape, dtype)
  return quantize_4bit_array(w, transposed=True, quant_type=quant_type, blocksize=blocksize,
                             compress_statistics=nested)


@pytest.mark.parametrize("other, what", [
    (dict(quant_type="fp4"), "quant_type saved 'nf4', target 'fp4'"),
    (dict(blocksize=128), "blocksize saved 64, target 128"),
    (dict(shape=(128, 128)), "shape"),
    (dict(dtype=jnp.bfloat16), "dtype"),
    (dict(nested=True), "dtype saved 'float32', target 'uint8'"),
])
def test_mismatched_target_names_path_and_values(tmp_path, other, what):
  ckpt.save(tmp_path / "ck", {"layer": {"kernel": _leaf()}})
  target = jax.eval_shape(lambda: {"layer": {"kernel": _leaf(**other)}})
  with pytest.raises(ValueError, match=r"layer\.kernel") as e:
    ckpt.restore(tmp_path / "ck", target=target)
  assert what in str(e.value)


def test_mismatched_structure(tmp_path):
  ckpt.save(tmp_path / "ck", {"a": jnp.ones(3), "b": jnp.ones(2)})
  with pytest.raises(ValueError, match=r"\['b'\] not in the target"):
    ckpt.restore(tmp_path / "ck", target={"a": jnp.ones(3)})
  with pytest.raises(ValueError, match="Quantized8bit"):
    ckpt.restore(tmp_path / "ck", target={"a": jnp.ones(3), "b": jaxbnb.quantize(
        {"weight": jnp.ones((2, 64))}, CONFIGS["int8"])["weight"]})


# --- registered dataclasses (e.g. 8-bit optimizer states) ---------------------------------------


@dataclasses.dataclass(frozen=True)
class _OptState:
  mu: jax.Array
  qstate: jaxbnb.QuantState
  block_size: int = 256
  names: tuple = ("mu",)
  dtype: object = np.dtype(np.float32)


jax.tree_util.register_dataclass(_OptState, data_fields=["mu", "qstate"],
                                 meta_fields=["block_size", "names", "dtype"])


def test_registered_dataclass(tmp_path):
  q, st = F.quantize_blockwise(jnp.arange(512, dtype=jnp.float32), blocksize=256)
  tree = {"opt": _OptState(mu=q, qstate=st, block_size=128, names=("mu", "nu"),
                           dtype=np.dtype(jnp.bfloat16))}
  ckpt.save(tmp_path / "ck", tree)
  # With a target the class needs no registration; without one it does.
  assert_identical(ckpt.restore(tmp_path / "ck", target=tree), tree)
  with pytest.raises(ckpt.CheckpointError, match="register_checkpointable"):
    ckpt.restore(tmp_path / "ck")
  ckpt.register_checkpointable(_OptState)
  restored = ckpt.restore(tmp_path / "ck")
  assert_identical(restored, tree)
  assert restored["opt"].names == ("mu", "nu") and restored["opt"].block_size == 128
  other = _OptState(mu=q, qstate=st, block_size=64)
  with pytest.raises(ValueError, match="block_size saved 128, target 64"):
    ckpt.restore(tmp_path / "ck", target={"opt": other})


def test_8bit_optimizer_state(tmp_path):
  """A training state: params, adamw8bit's state (QuantizedMoment leaves inside optax named
  tuples), a step counter; restored exactly, and the next step is identical."""
  params = {"w": jax.random.normal(jax.random.key(0), (64, 128)), "b": jnp.zeros(128)}
  opt = jaxbnb.optim.adamw8bit(1e-3)
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(opt.update)
  state = update(grads, opt.init(params), params)[1]
  assert any(isinstance(x, jaxbnb.optim.QuantizedMoment)
             for x in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "block_size")))
  tree = {"params": params, "opt_state": state}
  ckpt.save(tmp_path / "ck", tree)
  abstract = jax.eval_shape(lambda: {"params": params, "opt_state": opt.init(params)})
  restored = ckpt.restore(tmp_path / "ck", target=abstract)
  assert_identical(restored, tree)
  step = lambda t: update(grads, t["opt_state"], t["params"])
  assert_identical(step(restored), step(tree))
  # Without a target: named tuples become dicts, the 8-bit moments come back as themselves.
  plain = ckpt.restore(tmp_path / "ck")
  moments = [x for x in jax.tree.leaves(plain, is_leaf=lambda x: hasattr(x, "block_size"))
             if isinstance(x, jaxbnb.optim.QuantizedMoment)]
  assert len(moments) == 2 and {m.signed for m in moments} == {True, False}


def test_prng_keys_and_lora(tmp_path):
  base = jaxbnb.quantize({"dense": {"kernel": jax.random.normal(jax.random.key(1), (64, 32))}},
                         CONFIGS["fp4"])
  cfg = jaxbnb.lora.LoRAConfig(rank=4, dropout=0.1)
  adapters = jaxbnb.lora.init(base, cfg, jax.random.key(2))
  tree = {"params": jaxbnb.lora.attach(base, adapters, cfg, rng=jax.random.key(3)),
          "keys": jax.random.split(jax.random.key(4), 3), "raw": jax.random.PRNGKey(5)}
  ckpt.save(tmp_path / "ck", tree)
  for restored in (ckpt.restore(tmp_path / "ck"), ckpt.restore(tmp_path / "ck", target=tree)):
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    assert restored["keys"].dtype == tree["keys"].dtype
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)):
      if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
      np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match=r"keys: dtype saved 'key<fry>', target 'uint32'"):
    ckpt.restore(tmp_path / "ck", target=dict(tree, keys=jnp.zeros((3,), jnp.uint32)))


def test_unsaveable_static_field(tmp_path):
  bad = _OptState(mu=jnp.ones(2), qstate=None, names=(object(),))
  with pytest.raises(TypeError, match="not JSON-able"):
    ckpt.save(tmp_path / "ck", bad)
  assert not (tmp_path / "ck").exists()


# --- sharding -----------------------------------------------------------------------------------


def _mesh():
  return Mesh(np.array(jax.devices()[:8]), ("fsdp",))


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")
def test_restore_onto_named_sharding(tmp_path, quantized):
  q = quantized["nf4_dq"]
  ckpt.save(tmp_path / "ck", q)
  mesh = _mesh()
  row = NamedSharding(mesh, P("fsdp"))
  # One sharding for everything: arrays it cannot lay out (0-d offset, 3-entry nested absmax)
  # are replicated on the same mesh.
  restored = ckpt.restore(tmp_path / "ck", target=jax.eval_shape(lambda: q), sharding=row)
  assert_identical(restored, q)
  for x in jax.tree.leaves(restored):
    assert x.sharding.mesh == mesh
    if x.ndim and x.shape[0] % 8 == 0:
      assert x.sharding.spec == P("fsdp")
      assert x.addressable_shards[0].data.shape[0] == x.shape[0] // 8  # read as shards
    else:
      assert x.sharding.is_fully_replicated
  # A tree of shardings (what jax.jit's out_shardings would take), without a target.
  restored_dict = ckpt.restore(tmp_path / "ck")
  tree = jax.tree.map(lambda x: NamedSharding(mesh, P("fsdp") if x.ndim and x.shape[0] % 16 == 0
                                              else P()), restored_dict)
  again = ckpt.restore(tmp_path / "ck", sharding=tree)
  assert_identical(again, restored_dict)
  for x, s in zip(jax.tree.leaves(again), jax.tree.leaves(tree)):
    assert x.sharding == s
  # Saved sharded, restored onto one device and onto another layout: same bits.
  ckpt.save(tmp_path / "sharded", restored)
  assert_identical(ckpt.restore(tmp_path / "sharded", target=q), q)
  by8 = NamedSharding(Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b")), P("b"))
  assert_identical(ckpt.restore(tmp_path / "sharded", sharding=by8), restored_dict)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")
def test_digests_do_not_depend_on_the_layout(tmp_path):
  """A digest is a sum over the shards each process holds (replica 0 of each, so replicated
  and partly replicated arrays count once): the same value for every layout, which is what
  lets a multi-process save add up its processes' parts (tests/test_multiprocess.py)."""
  x = jax.random.normal(jax.random.key(0), (16, 24))
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
  layouts = [P(), P("a"), P(None, "b"), P("b", "a"), P(("a", "b"))]
  digests = set()
  for i, spec in enumerate(layouts):
    ckpt.save(tmp_path / str(i), {"x": jax.device_put(x, NamedSharding(mesh, spec))})
    digests.add(ckpt.read_metadata(tmp_path / str(i))["tree"]["items"][0][1]["digest"])
  ckpt.save(tmp_path / "host", {"x": np.asarray(x)})
  digests.add(ckpt.read_metadata(tmp_path / "host")["tree"]["items"][0][1]["digest"])
  assert len(digests) == 1 and None not in digests, digests
  # Restored without a target: whole, on this process's first device.
  back = ckpt.restore(tmp_path / "1")["x"]
  assert back.sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  np.testing.assert_array_equal(np.asarray(back), np.asarray(x))


# --- CheckpointManager ----------------------------------------------------------------------------


def _train_tree(step):
  w = jax.random.normal(jax.random.key(step), (64, 128))
  return {"params": jaxbnb.quantize({"dense": {"kernel": w}}, CONFIGS["nf4_dq"]),
          "step": jnp.int32(step), "lr": 1e-3 * (step + 1)}


def test_checkpoint_manager_max_to_keep(tmp_path):
  trees = {step: _train_tree(step) for step in range(3)}
  with ocp.CheckpointManager(tmp_path / "run",
                             options=ocp.CheckpointManagerOptions(max_to_keep=2)) as mngr:
    for step, tree in trees.items():
      mngr.save(step, args=ckpt.save_args(tree))  # async by default
    mngr.wait_until_finished()
    assert list(mngr.all_steps()) == [1, 2]
    for step in (1, 2):
      assert_identical(ckpt.restore(mngr, step=step), trees[step])
    assert_identical(ckpt.restore(mngr, target=jax.eval_shape(lambda: trees[2])), trees[2])
    with pytest.raises(ckpt.CheckpointError, match="step 0"):
      ckpt.restore(mngr, step=0)
  # A step directory is an ordinary jaxbnb checkpoint.
  assert_identical(ckpt.restore(tmp_path / "run" / "2"), trees[2])


# --- faults -------------------------------------------------------------------------------------

_WRITER = textwrap.dedent("""
    import sys, numpy as np, jax, jax.numpy as jnp, orbax.checkpoint as ocp
    from jaxbnb import checkpoint as ckpt
    from tests.test_checkpoint import _train_tree
    mngr = ocp.CheckpointManager(sys.argv[1])
    mngr.save(0, args=ckpt.save_args(_train_tree(0)))
    mngr.wait_until_finished()
    big = np.random.default_rng(0).integers(0, 256, (96 << 20,), dtype=np.uint8)
    print("saving 1", flush=True)
    mngr.save(1, args=ckpt.save_args({"big": big, **_train_tree(1)}))
    mngr.wait_until_finished()
    print("done", flush=True)
""")


def test_killed_save_leaves_previous_checkpoint_intact(tmp_path):
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "run")], cwd=root,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    assert proc.stdout.readline().strip() == "saving 1"
    deadline = time.time() + 60
    while not list((tmp_path / "run").glob("1.orbax-checkpoint-tmp*")):
      assert proc.poll() is None and time.time() < deadline, "the writer never started step 1"
      time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # midway through writing step 1
  finally:
    proc.kill()
    proc.wait()
  assert not (tmp_path / "run" / "1").exists()
  with ocp.CheckpointManager(tmp_path / "run") as mngr:
    assert list(mngr.all_steps()) == [0]
    assert_identical(ckpt.restore(mngr), _train_tree(0))
  with pytest.raises(ckpt.CheckpointError, match="unfinished save"):
    ckpt.restore(tmp_path / "run" / "1")


def _data_files(path):
  files = [f for f in (path / "arrays").rglob("*") if f.is_file() and f.parent.name == "d"]
  return sorted(files, key=lambda f: f.stat().st_size)


# When one array read fails, Orbax abandons its other read coroutines; their clean-up noise is
# not ours to fix.
_orbax_noise = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture()
def saved(tmp_path):
  tree = {"w": np.random.default_rng(1).standard_normal((256, 256)).astype(np.float32),
          "q": _leaf()}
  ckpt.save(tmp_path / "ck", tree)
  return tmp_path / "ck", tree


@_orbax_noise
def test_truncated_array_file(saved):
  path, _ = saved
  big = _data_files(path)[-1]
  big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
  with pytest.raises(ckpt.CheckpointError, match="cannot read the arrays|damaged"):
    ckpt.restore(path)


@_orbax_noise
def test_flipped_byte_is_never_garbage(saved):
  path, tree = saved
  big = _data_files(path)[-1]
  data = bytearray(big.read_bytes())
  data[len(data) // 2] ^= 0x40
  big.write_bytes(bytes(data))
  # Orbax/tensorstore read this without complaint; the digest recorded at save time catches it.
  with pytest.raises(ckpt.CheckpointError, match="'w' is damaged"):
    ckpt.restore(path)
  assert not np.array_equal(ckpt.restore(path, verify=False)["w"], tree["w"])


@_orbax_noise
def test_damaged_or_missing_metadata(saved):
  path, _ = saved
  meta = path / "jaxbnb" / "metadata"
  text = meta.read_text()
  meta.write_text(text[: len(text) // 2])
  with pytest.raises(ckpt.CheckpointError, match="metadata"):
    ckpt.restore(path)
  # An array the metadata lists but the Orbax item lacks (a version-1 skeleton: no digest).
  old = json.loads(text.replace('"key": "w"', '"key": "missing"'))
  old["version"] = 1
  del old["tree_sha256"]
  meta.write_text(json.dumps(old))
  with pytest.raises(ckpt.CheckpointError, match="cannot read the arrays"):
    ckpt.restore(path)
  meta.unlink()
  with pytest.raises(ckpt.CheckpointError, match="metadata"):
    ckpt.restore(path)


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(ckpt.CheckpointError, match="no finished checkpoint"):
    ckpt.restore(tmp_path / "nothing")
  (tmp_path / "plain").mkdir()
  with pytest.raises(ckpt.CheckpointError, match="not a jaxbnb checkpoint"):
    ckpt.restore(tmp_path / "plain")


@pytest.mark.parametrize("old, new", [
    ('"blocksize": 64', '"blocksize": 65'),   # a static field of the 4-bit leaf
    ('"value": 3', '"value": 1'),             # a Python scalar leaf (e.g. a step counter)
    ('"quant_type": "nf4"', '"quant_type": "fp4"'),
])
def test_damaged_skeleton_that_still_parses_is_refused(tmp_path, old, new):
  path = tmp_path / "ck"
  ckpt.save(path, {"q": _leaf(), "step": 3})
  meta = path / "jaxbnb" / "metadata"
  text = meta.read_text()
  assert old in text
  meta.write_text(text.replace(old, new, 1))
  with pytest.raises(ckpt.CheckpointError, match="metadata is damaged"):
    ckpt.restore(path)


_REPLACER = textwrap.dedent("""
    import sys
    import numpy as np
    from jaxbnb import checkpoint as ckpt
    rng = np.random.default_rng(0)
    print("ready", flush=True)
    for i in range(1, 1000):   # replace the checkpoint again and again until killed
      ckpt.save(sys.argv[1], {"i": np.int32(i), "w": rng.standard_normal((1 << 19,), np.float32)},
                force=True)
      print(i, flush=True)
""")


def test_killed_replacing_save_never_loses_the_checkpoint(tmp_path):
  """SIGKILL at several moments of ``save(force=True)``: the old or the complete new one."""
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
  path = tmp_path / "ck"
  ckpt.save(path, {"i": np.int32(0), "w": np.zeros((1 << 19,), np.float32)})
  for delay in (0.0, 0.013, 0.05, 0.11, 0.23, 0.41):
    proc = subprocess.Popen([sys.executable, "-c", _REPLACER, str(path)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
      assert proc.stdout.readline().strip() == "ready"
      time.sleep(delay)
      proc.send_signal(signal.SIGKILL)
    finally:
      proc.kill()
      proc.wait()
    tree = ckpt.restore(path)  # finds the new one if the swap was cut between its renames
    assert tree["w"].shape == (1 << 19,) and int(tree["i"]) >= 0
    ckpt.save(path, tree, force=True)  # settles leftovers, then replaces
    assert not list(tmp_path.glob("ck.jaxbnb-*"))
    np.testing.assert_array_equal(ckpt.restore(path)["w"], tree["w"])
