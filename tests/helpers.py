"""Test helpers: the bitsandbytes 0.50.2 vectors shipped in tests/data; CUDA lowering on CPU."""

from __future__ import annotations

import functools
import json
import pathlib
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb import qtensor

DATA = pathlib.Path(__file__).parent / "data"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@functools.lru_cache(maxsize=None)
def functional_vectors() -> dict[str, np.ndarray]:
  with np.load(DATA / "bnb_functional.npz") as f:
    return {k: f[k] for k in f.files}


@functools.lru_cache(maxsize=None)
def deq_hashes() -> dict[str, str]:
  return json.loads((DATA / "bnb_functional_deq_sha256.json").read_text())


def codebook_vectors() -> dict[str, np.ndarray]:
  with np.load(DATA / "bnb_codebooks.npz") as f:
    return {k: f[k] for k in f.files}


def input_array(prefix: str) -> jnp.ndarray:
  """The bnb input ``{prefix}_x`` (e.g. ``s1_bfloat16``) in the dtype bnb quantized it in."""
  raw = functional_vectors()[prefix + "_x"]
  dtype = prefix.split("_", 1)[1]
  if dtype == "bfloat16":  # stored as the bf16 bit pattern
    return jnp.asarray((raw.astype(np.uint32) << 16).view(np.float32)).astype(jnp.bfloat16)
  return jnp.asarray(raw).astype(DTYPES[dtype])


def cases(pattern: str) -> list[tuple[str, ...]]:
  """Regex groups of every vector key matching ``pattern`` (sorted, for parametrize ids)."""
  rx = re.compile(pattern)
  return sorted({m.groups() for k in functional_vectors() for m in [rx.fullmatch(k)] if m})


def lower_for_h100(fn, *specs):
  """StableHLO text of ``fn`` lowered for CUDA on a CPU-only jaxlib.

  The Triton lowering asks for the GPU's compute capability; without a GPU it reads it from the
  abstract device of the current abstract mesh, so we name one (an H100 -> sm_90).
  """
  from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh
  dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
  mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=dev)
  with use_abstract_mesh(mesh), warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # the Triton backend's deprecation
    return jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()


def bnb_int8_case(threshold: float):
  """bnb's Linear8bitLt vectors: ``(A fp16, W as a Quantized8bit (out, in), bnb's output)``."""
  with np.load(DATA / "bnb_int8_matmul.npz") as f:
    a, w, y_ref = f["A"], f["W"], f[f"y_thr{threshold}"]
  wq = qtensor.quantize_8bit_array(jnp.asarray(w, jnp.float16), transposed=False,
                                   threshold=threshold)
  return jnp.asarray(a, jnp.float16), wq, y_ref


def assert_close_to_bnb_int8(y, y_ref) -> np.ndarray:
  """bnb's Linear8bitLt output reproduced: fp16, same shape, within its int8 tolerances."""
  assert y.dtype == jnp.float16 and y.shape == y_ref.shape
  y = np.asarray(y, np.float32)
  diff = np.abs(y - y_ref)
  assert diff.max() <= 0.15, diff.max()
  assert np.mean(diff <= 4e-3 * np.abs(y_ref) + 1e-3) >= 0.98
  return y


def optimizer_step_temporaries(tx, shapes) -> tuple[int, int]:
  """``(compiled temporaries in bytes, parameter count)`` of one jitted ``tx`` step (update +
  apply_updates) on float32 leaves of ``shapes``; compiled from shapes only (no data)."""
  import optax  # noqa: PLC0415 - only the optimizer tests need it
  params = {f"w{i:02d}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(shapes)}
  state = jax.eval_shape(tx.init, params)

  def step(g, s, p):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  compiled = jax.jit(step).lower(params, state, params).compile()
  return compiled.memory_analysis().temp_size_in_bytes, sum(int(np.prod(s)) for s in shapes)
