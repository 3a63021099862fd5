"""Command line.

    hsee train --config configs/<name>.py [--set key=value ...] --out DIR [--overwrite]
    hsee train --resume DIR [--config ... --set ...]
    hsee eval --run DIR [--round N]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hsee_jax import config as config_lib


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="hsee", description="Hetero-SplitEE in JAX/Flax")
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train a Hetero-SplitEE run, or resume one")
  t.add_argument("--config", help="a configs/*.py file defining get_config() "
                 "(with --resume: defaults to the run's config.json)")
  t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config field (repeatable), e.g. --set rounds=20")
  t.add_argument("--out", help="output directory for metrics, summary and checkpoints")
  t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
  t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its newest checkpoint")
  e = sub.add_parser("eval", help="test metrics of a run's checkpoint, without training")
  e.add_argument("--run", required=True, metavar="DIR", help="a run directory")
  e.add_argument("--round", type=int, default=None,
                 help="the checkpoint after this many rounds (default: the newest)")
  return p


def _train_config(args) -> tuple[config_lib.Config, Path]:
  if args.resume:
    out = Path(args.resume)
    if args.out and Path(args.out).resolve() != out.resolve():
      raise config_lib.ConfigError("--resume DIR and --out name different directories")
    if args.config:
      return config_lib.load(args.config, args.overrides), out
    saved = out / "config.json"
    if not saved.exists():
      raise config_lib.ConfigError(f"--resume: {out} holds no run (no config.json)")
    cfg = config_lib.from_dict(json.loads(saved.read_text()))
    return config_lib.override(cfg, args.overrides), out
  if not args.config or not args.out:
    raise config_lib.ConfigError("train needs --config and --out (or --resume DIR)")
  return config_lib.load(args.config, args.overrides), Path(args.out)


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  # Imported late so that --help and config errors answer without loading JAX.
  from hsee_jax.data import DataError
  from hsee_jax.train import RunError, evaluate_run, train
  try:
    if args.command == "train":
      cfg, out = _train_config(args)
      train(cfg, out, overwrite=args.overwrite, resume=bool(args.resume))
    else:
      evaluate_run(args.run, args.round)
  except (config_lib.ConfigError, DataError, RunError) as e:
    print(f"hsee: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
