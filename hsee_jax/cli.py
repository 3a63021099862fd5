"""``hsee train --config configs/<name>.py [--set key=value ...] --out DIR``."""
from __future__ import annotations

import argparse
import sys

from hsee_jax import config as config_lib


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="hsee", description="Hetero-SplitEE in JAX/Flax")
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train a Hetero-SplitEE run")
  t.add_argument("--config", required=True, help="a configs/*.py file defining get_config()")
  t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config field (repeatable), e.g. --set rounds=20")
  t.add_argument("--out", required=True, help="output directory for metrics and summary")
  t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
  return p


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  # Imported late so that --help and config errors answer without loading JAX.
  from hsee_jax.data import DataError
  from hsee_jax.train import RunError, train
  try:
    cfg = config_lib.load(args.config, args.overrides)
    train(cfg, args.out, overwrite=args.overwrite)
  except (config_lib.ConfigError, DataError, RunError) as e:
    print(f"hsee: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
