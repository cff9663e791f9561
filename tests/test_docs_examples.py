"""Every ```python block of README.md and of the documentation (docs/**/*.md) runs on its own.

Each block gets a fresh namespace (its own imports, no names from an earlier block) and a
temporary working directory, so an example that writes files leaves the tree clean. The blocks
run in one child process, as a user would run them: one CPU device, not the 8 virtual ones of
the test session, and XLA's cheapest compilation (the examples are tiny: compiling them costs
far more than running them). Test ids are ``file:line`` of the block; a failure shows the
block's traceback with the line numbers of the Markdown file.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import traceback

import pytest

ROOT = pathlib.Path(__file__).parents[1]
# The site's reading order. The blocks share one process, so the first model examples compile
# what later ones reuse; backends.md runs Pallas in interpret mode, whose many small
# compilations push earlier ones out of JAX's caches, so it comes last.
FIRST = ["README.md", "docs/index.md", "docs/guide/quantize.md", "docs/guide/functional.md",
         "docs/guide/layers.md", "docs/guide/optimizers.md", "docs/guide/qlora.md",
         "docs/guide/checkpoints.md", "docs/guide/big_models.md", "docs/guide/sharding.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _order(path: pathlib.Path):
  rel = str(path.relative_to(ROOT))
  return (FIRST.index(rel) if rel in FIRST else len(FIRST), rel)


def examples() -> list[tuple[str, int, str]]:
  """``(file relative to the repo, first line of the code, code)`` for every python block."""
  out = []
  for path in sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")], key=_order):
    text = path.read_text()
    for match in BLOCK.finditer(text):
      line = text.count("\n", 0, match.start(1)) + 1
      out.append((str(path.relative_to(ROOT)), line, match.group(1)))
  return out


EXAMPLES = examples()
IDS = [f"{name}:{line}" for name, line, _ in EXAMPLES]


def run(selected: list[str]) -> dict[str, str]:
  """Run the selected examples in this process; ``{id: "" or the traceback}``."""
  results = {}
  for (name, line, code), example_id in zip(EXAMPLES, IDS):
    if example_id not in selected:
      continue
    padded = "\n" * (line - 1) + code  # tracebacks show the Markdown file's line numbers
    with tempfile.TemporaryDirectory() as tmp:
      os.chdir(tmp)
      try:
        exec(compile(padded, str(ROOT / name), "exec"), {"__name__": "__example__"})  # noqa: S102
        results[example_id] = ""
      except BaseException:  # noqa: BLE001 - reported by the test of that block
        results[example_id] = traceback.format_exc()
      finally:
        os.chdir(ROOT)
  return results


@pytest.fixture(scope="module")
def results(request) -> dict[str, str]:
  """Runs the examples this session selected, all in one child process."""
  selected = [item.callspec.id for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec")]
  env = {**os.environ, "XLA_FLAGS": XLA_FLAGS,  # one device, as a user has; fast compiles
         "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
  proc = subprocess.run([sys.executable, __file__, *selected], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  out = proc.stdout.strip().splitlines()
  assert proc.returncode == 0 and out, f"the example runner failed:\n{proc.stderr[-5000:]}"
  return json.loads(out[-1])


def test_examples_are_found():
  files = {name for name, _, _ in EXAMPLES}
  assert "README.md" in files
  assert len(files) >= 8, files  # the README and a page per feature
  assert len(EXAMPLES) >= 20


@pytest.mark.parametrize("example_id", IDS, ids=IDS)
def test_example_runs_standalone(example_id, results):
  assert results[example_id] == "", f"{example_id} failed:\n{results[example_id]}"


if __name__ == "__main__":  # the child process: python tests/test_docs_examples.py [ID ...]
  print("\n" + json.dumps(run(sys.argv[1:] or IDS)))  # the last line, whatever the examples print
