"""One process of a (multi-process) jaxbnb run for ``tests/test_multiprocess.py``; not collected.

``python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES HOST:PORT WORKDIR`` runs
:func:`run` on a (fsdp=2, data=2) mesh of 4 CPU devices, ``4 / NUM_PROCESSES`` in each process;
with several processes it first joins a ``jax.distributed`` job whose coordinator (process 0)
listens on ``HOST:PORT``. :func:`run`: an NF4 NNX model quantized under ``jit`` straight into
shards, one QLoRA step (the packed forward pass, adapter gradients, ``adamw8bit``), then a
:mod:`jaxbnb.checkpoint` saved by every process and restored. The results, gathered to the
host, go to ``WORKDIR/out<PROCESS_ID>.npz``.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

DEVICES = 4
MESH_AXES = ("fsdp", "data")  # fsdp spans the processes: each holds part of every packed weight
LEARNING_RATE = 1e-3
# XLA's cheapest compilation: the programs are tiny, compiling them is what takes time.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
_START = time.monotonic()


def log(msg: str) -> None:
  """A progress line on stderr: the test shows it when a process fails or hangs."""
  print(f"[{time.monotonic() - _START:6.1f}s, cpu {time.process_time():5.1f}s] {msg}",
        file=sys.stderr, flush=True)


def flat(tree) -> dict:
  """``{dotted path: leaf}``, named as a restore without a target rebuilds the tree (optax
  states and NNX ``State``s as dicts, NNX ``.value`` dropped), so a tree and its restore
  compare."""
  import jax  # pylint: disable=import-outside-toplevel

  def name(path):
    parts = [next(str(v) for v in (getattr(k, a, None) for a in ("key", "name", "idx"))
                  if v is not None) for k in path]
    return ".".join(p for p in parts if p not in ("value", "raw_value"))
  return {name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _mlp(nnx, rngs):
  """A small NNX model: LayerNorm, Linear 64 -> 256, GELU, Linear 256 -> 64 (two kernels to
  quantize: compiling the packed matmuls and their gradients is most of a run's CPU time)."""
  import jax  # pylint: disable=import-outside-toplevel

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.norm = nnx.LayerNorm(64, rngs=rngs)
      self.fc1 = nnx.Linear(64, 256, rngs=rngs)
      self.fc2 = nnx.Linear(256, 64, rngs=rngs)

    def __call__(self, x):
      return self.fc2(jax.nn.gelu(self.fc1(self.norm(x))))
  return MLP(rngs)


def run(mesh, ckpt_dir: str) -> dict[str, np.ndarray]:
  """Quantize, one QLoRA step and a checkpoint round trip on ``mesh``.

  Every process calls this with the same arguments (``ckpt_dir`` on a filesystem they share).
  Returns ``{name: numpy array}``: global values, the same on every process.
  """
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding, PartitionSpec as P

  import jaxbnb
  from jaxbnb import checkpoint, lora, optim

  n_fsdp = mesh.shape["fsdp"]

  def rows(shape):  # axis 0 over fsdp where it divides: runs of whole (out, in) rows if packed
    return P("fsdp") if len(shape) and shape[0] % n_fsdp == 0 else P()

  def columns(shape):  # a float (in, out) kernel over its output features
    return P(None, "fsdp") if len(shape) == 2 and shape[1] % n_fsdp == 0 else P()

  def to_global(x, spec):
    """A global array from a value that every process holds in full (the same seed)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])

  def gather(tree):  # global arrays -> {name: whole numpy value}, on every process
    return {k: np.asarray(multihost_utils.process_allgather(x, tiled=True))
            for k, x in flat(tree).items() if isinstance(x, jax.Array)}

  log("quantize")
  # 1. Float params as global arrays sharded over fsdp, quantized where their shards live.
  graphdef, state = nnx.split(_mlp(nnx, rngs=nnx.Rngs(0)))
  state = jax.tree.map(lambda x: to_global(x, columns(x.shape)), state)
  cfg = jaxbnb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True)
  quantize = lambda s: jaxbnb.quantize(s, cfg)
  shardings = jax.tree.map(lambda a: NamedSharding(mesh, rows(a.shape)),
                           jax.eval_shape(quantize, state))
  q = jax.jit(quantize, out_shardings=shardings)(state)
  packed = [x for x in jax.tree.leaves(q) if x.dtype == jnp.uint8 and rows(x.shape) != P()]
  assert packed and all(not x.sharding.is_fully_replicated for x in packed)

  log("qlora step")
  # 2. One QLoRA step: the packed forward pass (batch sharded over data), its gradient for the
  # adapters, and 8-bit AdamW; adapters and moments sharded over fsdp. (One program: compiling
  # is most of a run's time.) B is random, not zero, so that every adapter has a gradient.
  x = to_global(np.random.default_rng(1).normal(size=(8, 64)).astype(np.float32), P("data"))
  model = jaxbnb.intercept(lambda s, x: nnx.merge(graphdef, s)(x))
  lcfg = lora.LoRAConfig(rank=4, alpha=8.0)
  adapters = lora.init(q, lcfg, jax.random.key(1))
  rng = np.random.default_rng(0)
  adapters = {k: {"a": to_global(v["a"], rows(v["a"].shape)),
                  "b": to_global(rng.normal(0, 0.02, v["b"].shape).astype(np.float32),
                                 rows(v["b"].shape))} for k, v in adapters.items()}
  tx = optim.adamw8bit(LEARNING_RATE, weight_decay=1e-2, min_8bit_size=0)
  opt_state = tx.init(adapters)

  def step(q, adapters, opt_state, x):  # q passed in: jit cannot close over global arrays
    def loss(a):
      y = model(lora.attach(q, a, lcfg), x)
      return jnp.mean((y - jnp.roll(x, 1, axis=-1)) ** 2), y
    (value, y), grads = jax.value_and_grad(loss, has_aux=True)(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, value, grads, y

  adapters, opt_state, loss, grads, y = jax.jit(step)(q, adapters, opt_state, x)

  log("checkpoint")
  # 3. Saved by every process, then replaced (force=True: renames by process 0 only); restored
  # into the same shardings, and without a target (whole, on one device of each process).
  tree = {"params": q, "adapters": adapters, "opt_state": opt_state, "step": 1}
  path = os.path.join(ckpt_dir, "ckpt")
  checkpoint.save(path, {"step": 0})
  checkpoint.save(path, tree, force=True)
  restored = checkpoint.restore(path, target=tree)
  assert all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(restored),
                                                      jax.tree.leaves(tree))
             if isinstance(b, jax.Array)), "restore(target=tree) changed the shardings"
  local = checkpoint.restore(path)

  log("gather")
  out = gather({"y": y, "loss": loss})
  out.update({f"grads:{k}": v for k, v in gather(grads).items()})
  out.update({f"saved:{k}": v for k, v in gather(tree).items()})
  out.update({f"restored:{k}": v for k, v in gather(restored).items()})
  out.update({f"local:{k}": np.asarray(v) for k, v in flat(local).items()})
  log("done")
  return out


def main(argv: list[str]) -> None:
  process_id, num_processes, coordinator, workdir = (int(argv[0]), int(argv[1]), argv[2],
                                                     argv[3])
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count="
                             f"{DEVICES // num_processes} {FAST_COMPILE}")
  import jax  # pylint: disable=import-outside-toplevel
  if num_processes > 1:  # before any JAX computation
    # gloo: jax 0.11's default for CPU collectives across processes, named so that a change
    # of default fails here, not as a hang in the first collective.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                               initialization_timeout=60, heartbeat_timeout_seconds=30,
                               shutdown_timeout_seconds=30)
  log(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_devices()}")
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, -1), MESH_AXES)  # by process
  out = run(mesh, workdir)
  np.savez(os.path.join(workdir, f"out{process_id}.npz"), **out)
  if num_processes > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1:])
