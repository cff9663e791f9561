"""Host memory for arrays that should not occupy device memory (paged optimizer state,
offloaded layers): JAX's ``pinned_host`` memory kind."""

from __future__ import annotations

import dataclasses

import jax

HOST_KIND = "pinned_host"


def host_memory_supported(device=None) -> bool:
  """Whether ``device`` (default: the first) has a pinned host memory space."""
  device = device or jax.devices()[0]
  try:
    return any(m.kind == HOST_KIND for m in device.addressable_memories())
  except Exception:  # noqa: BLE001 - a backend without memory-kind support
    return False


@dataclasses.dataclass(frozen=True)
class HostOffloaded:
  """A float leaf kept in pinned host memory; :func:`jaxbnb.intercept` moves it to the device
  where the traced program first uses it (``jax.device_put(.., jax.memory.Space.Device)``, a
  transfer inside the caller's jit). ``array``: the leaf, any shape and dtype, unchanged."""

  array: jax.Array

  @property
  def shape(self) -> tuple:
    return tuple(self.array.shape)

  @property
  def dtype(self):
    return self.array.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    return int(self.array.nbytes)

  def dequantize(self, dtype=None) -> jax.Array:
    """The array in device memory (works under ``jit``), in ``dtype`` (default: its own)."""
    x = jax.device_put(self.array, jax.memory.Space.Device)
    return x if dtype is None else x.astype(dtype)


jax.tree_util.register_dataclass(HostOffloaded, data_fields=["array"], meta_fields=[])


def is_offloaded(x) -> bool:
  return isinstance(x, HostOffloaded)
