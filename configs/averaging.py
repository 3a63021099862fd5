"""Paper-like Averaging run: ResNet-18 (width 1.0), CIFAR-10, three clients cut
after stage 1, 2 and 3 (l = 3, 5, 7), IID split, cross-layer aggregation
every round. For an accelerator."""
from hsee_jax.config import Config


def get_config() -> Config:
  return Config(
      name="averaging",
      dataset="cifar10",
      width=1.0,
      cuts=(3, 5, 7),
      strategy="averaging",
      rounds=200,
      batch_size=128,
      lr=0.1,
      momentum=0.9,
      weight_decay=5e-4,
      schedule="cosine",
      aggregate_every=1,
      eval_every=5,
  )
