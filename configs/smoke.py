"""CI-sized run on real CIFAR-10: three heterogeneous clients (cuts 3, 5, 7),
a narrow network and a small subset, a couple of minutes on 2 CPU cores."""
from hsee_jax.config import Config


def get_config() -> Config:
  return Config(
      name="smoke",
      dataset="cifar10",
      train_subset=3000,
      test_subset=1000,
      width=0.125,
      cuts=(3, 5, 7),
      strategy="averaging",
      rounds=3,
      batch_size=32,
      lr=0.05,
      eval_batch_size=500,
  )
