"""What the benchmarks write: a JSON of the whole result, a CSV of its rows,
and a line plot per benchmark (matplotlib, if installed)."""
from __future__ import annotations

import csv
import json
from pathlib import Path


def write_tables(out: Path, stem: str, result: dict, rows: list[dict], drop=()) -> None:
  """``out/<stem>.json`` (``result``) and ``out/<stem>.csv`` (``rows`` without
  the columns in ``drop``)."""
  (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
  with open(out / f"{stem}.csv", "w", newline="") as f:
    cols = list(dict.fromkeys(k for r in rows for k in r if k not in drop))   # every row's
    w = csv.DictWriter(f, fieldnames=cols, restval="")
    w.writeheader()
    for r in rows:
      w.writerow({k: v for k, v in r.items() if k not in drop})


def line_plot(path: Path, rows: list[dict], series: str, x: str, y: str, *, xlabel: str,
              ylabel: str, title: str, size=(6, 4), ylog: bool = False) -> bool:
  """One line per value of ``rows[series]``, ``y`` against ``x`` (log2 x axis;
  ``ylog``: log10 y axis); False where matplotlib is not installed."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  fig, ax = plt.subplots(figsize=size)
  for name in dict.fromkeys(r[series] for r in rows):
    rs = [r for r in rows if r[series] == name]
    ax.plot([r[x] for r in rs], [r[y] for r in rs], marker="o", label=name)
  ax.set_xscale("log", base=2)
  if ylog:
    ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=8)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True
