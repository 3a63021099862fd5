"""A larger CPU run on real CIFAR-10: width 0.25, 10,000 training images, the
whole test set, three heterogeneous clients (l = 3, 5, 7), 10 rounds."""
from hsee_jax.config import Config


def get_config() -> Config:
  return Config(
      name="cpu",
      dataset="cifar10",
      train_subset=10000,
      width=0.25,
      cuts=(3, 5, 7),
      strategy="averaging",
      rounds=10,
      batch_size=32,
      lr=0.05,
      eval_every=2,
  )
