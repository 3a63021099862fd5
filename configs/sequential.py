"""Paper-like Sequential run: one shared server, clients cut at l = 3, 5, 7 take
turns each round. For an accelerator."""
import dataclasses

from hsee_jax.config import Config


def get_config() -> Config:
  base = Config(
      name="sequential",
      dataset="cifar10",
      width=1.0,
      cuts=(3, 5, 7),
      rounds=200,
      batch_size=128,
      lr=0.1,
      eval_every=5,
  )
  return dataclasses.replace(base, strategy="sequential")
