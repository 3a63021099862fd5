"""The grids of ``experiments/reproduce.py``, one file each, of data only:
``NAME``, the ``SCALES`` it is trained at (scale -> recipe: the config
fields of every run), its ``RUNS`` (run -> config fields; ``data_share`` and
``deadline_share`` are read by :func:`reproduce.grid`), the ``CLAIMS`` it is
judged on (``(number, text, comparisons)``, each comparison ``(run a,
metric, cut, run b, metric, cut, kind)``: cut None the fleet mean, kind
``better`` or ``not_worse``), and ``REPORT``: the report's sections and
plots beyond the common ones, by name with their parameters
(``experiments/report``), and optionally ``GOAL``. A grid is added by
adding its file here; no code names it.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

SHARED = ("common",)   # data the grids share, not a grid


def _load() -> dict:
  out = {}
  for m in pkgutil.iter_modules([str(Path(__file__).parent)]):
    if m.name not in SHARED:
      module = importlib.import_module(f"{__name__}.{m.name}")
      out[module.NAME] = module
  return out


GRIDS = _load()
SCALES = {scale: dict(recipe, grid=name) for name, g in GRIDS.items()
          for scale, recipe in g.SCALES.items()}


def of_scale(scale: str):
  """The grid (its module) that ``scale`` trains."""
  return GRIDS[SCALES[scale]["grid"]]
