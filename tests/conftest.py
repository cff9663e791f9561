"""Shared test set-up: CPU only, hypothesis profiles sized for 2 CPU cores."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 virtual CPU devices for the sharding tests (must be set before jax initializes).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

from hypothesis import HealthCheck, settings  # noqa: E402

# Each new shape compiles once (~0.5-2 s on two cores): example counts set the run time.
# CI (`make test`) runs "ci": 25 examples, derandomized, the same every run (~1.5 min for
# test_properties.py). "thorough" searches deeper: HYPOTHESIS_PROFILE=thorough pytest
# tests/test_properties.py tests/test_hardening.py --hypothesis-seed=N (N = 1, 2, 3: ~20 min
# each on two shared cores, measured 2026-11-27), before a release or after a change to the
# functional core; too long for CI's 25-minute budget.
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "thorough", max_examples=300, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# `make test-fast` (pytest -m "not slow"): the core and every feature once, in a few minutes.
# Left to `make test` (CI): Pallas kernels in interpret mode, hypothesis property suites, the
# experiments' and benchmarks' smoke runs, sharding on 8 virtual devices, the documentation's
# examples, and the single tests below that take over ~8 s each on two cores.
_SLOW_FILES = {"test_pallas_4bit.py", "test_pallas_int8.py", "test_pallas_optim.py",
               "test_pallas_triton_ir.py", "test_properties.py", "test_experiments_smoke.py",
               "test_bench_smoke.py", "test_bench_cpu_smoke.py", "test_sharding.py",
               "test_docs_examples.py"}
_SLOW_TESTS = {"test_real_smollm2_from_gguf", "test_qlora_step_on_a_2x4_mesh_gives_the_single_device_loss",
               "test_peak_host_memory_while_loading_1gb", "test_matches_the_decomposition",
               "test_close_to_optax_32bit", "test_training_lowers_loss_and_leaves_base_bits_alone",
               "test_killed_replacing_save_never_loses_the_checkpoint",
               "test_killed_save_leaves_previous_checkpoint_intact"}


def pytest_collection_modifyitems(config, items):
  import pytest  # noqa: PLC0415 - conftest imports stay minimal before jax is configured
  for item in items:
    if item.path.name in _SLOW_FILES or item.originalname in _SLOW_TESTS:
      item.add_marker(pytest.mark.slow)
