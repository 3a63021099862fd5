"""Paper-like Sequential run: configs/averaging.py with one shared server part
instead of one per client; clients cut at l = 3, 5, 7 take turns each round.
For an accelerator."""
import dataclasses
from pathlib import Path

from hsee_jax import config


def get_config() -> config.Config:
  base = config.load(Path(__file__).with_name("averaging.py"))
  return dataclasses.replace(base, name="sequential", strategy="sequential")
