"""Shared plotting helper for the experiment scripts: PNGs next to their JSON, Agg backend.

matplotlib is optional (the ``demo`` extra): without it each script prints a note and still
writes its JSON.
"""

from __future__ import annotations

import argparse
import pathlib
from typing import Callable

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "results"


def add_output_args(parser: argparse.ArgumentParser, name: str) -> None:
  """``--out`` (default docs/results/NAME.json) and ``--replot``."""
  parser.add_argument("--out", type=pathlib.Path, default=None,
                      help=f"default docs/results/{name}.json; --quick writes only here")
  parser.add_argument("--replot", action="store_true", help="only redraw the PNG from --out")


def resolve_output(args: argparse.Namespace, name: str) -> bool:
  """Fill in ``args.out``; whether results may be written (``--quick`` never overwrites the
  committed results unless ``--out`` says where)."""
  write = args.out is not None or not getattr(args, "quick", False)
  args.out = args.out or RESULTS / f"{name}.json"
  return write


def save_figure(draw: Callable, path: pathlib.Path, *, figsize=(7.0, 4.2)) -> bool:
  """Call ``draw(fig)`` on a fresh figure and save it to ``path`` (PNG, 120 dpi).

  Returns False, after printing a note, when matplotlib is not installed.
  """
  try:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on CI or the GPU box
    import matplotlib.pyplot as plt
  except ImportError:
    print(f"note: matplotlib is not installed; skipped the plot {path.name} "
          "(pip install -e '.[demo]')")
    return False
  fig = plt.figure(figsize=figsize)
  try:
    draw(fig)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
  finally:
    plt.close(fig)
  print(f"wrote {path}")
  return True
