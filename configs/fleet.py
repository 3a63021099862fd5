"""A device fleet on the whole CIFAR-10: 1,000 clients in three tiers (cuts 3,
5, 7 on half, 30% and 20% of the devices), Dirichlet(0.3) non-IID data, 30
clients sampled per round, client optimiser state reset every round (the
federated-learning convention), 150 rounds. About 14 minutes on 2 CPU cores."""
from hsee_jax.config import Config


def get_config() -> Config:
  return Config(
      name="fleet",
      dataset="cifar10",
      width=0.125,
      num_clients=1000,
      cut_tiers=((3, 0.5), (5, 0.3), (7, 0.2)),
      clients_per_round=30,
      client_state="reset",
      partition="dirichlet",
      dirichlet_alpha=0.3,
      strategy="averaging",
      rounds=150,
      local_steps=4,
      batch_size=32,
      lr=0.05,
      eval_every=25,
      checkpoint_every=25,
  )
