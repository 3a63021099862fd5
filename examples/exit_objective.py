"""A client objective of your own, through hsee_jax's public API: exits that
learn from the server where the server is right.

The split update's client objective is an argument (``hsee.build(cfg,
objective=...)``): ``(exits, final, labels, hp) -> scalar``, with ``exits``
the client's exit logits (shallowest first, its own cut's last), ``final``
the server's logits for the same images (held fixed: forward information
sent back, never a gradient), ``hp`` the step's hyperparameters by name
(``hsee.fleet.HPARAMS``). The same function as a ``Variant`` runs through
every command (``examples/depthfl_sum.py``). This one keeps the paper's exit loss and adds a
distillation term from the server's soft labels, counted only on the images
the server classifies correctly (a confidence gate of the kind the
heterogeneous-FL literature uses against a wrong teacher).
"""
import jax
import jax.numpy as jnp
import numpy as np

import hsee_jax as hsee


def gated_server_distillation(weight=0.5, temperature=2.0):
  def objective(exits, final, labels, hp):
    ce = jnp.mean(jnp.stack([hsee.cross_entropy(e, labels) for e in exits]))
    right = (jnp.argmax(final, -1) == labels).astype(jnp.float32)       # [B]
    gate = right / jnp.maximum(right.sum(), 1.0)                         # mean over the right ones
    kd = jnp.stack([jnp.sum(gate * per_image_kl(e, final, temperature)) for e in exits])
    return hp["exit_loss_weight"] * ce + weight * jnp.mean(kd)
  return objective


def per_image_kl(student, teacher, temperature):
  """distillation_loss per image (the library's averages over the batch)."""
  return jax.vmap(lambda s, t: hsee.distillation_loss(s[None], t[None], temperature))(student, teacher)


def main(rounds=2, **fields):
  cfg = hsee.Config(**{"train_subset": 1024, "test_subset": 500, "width": 0.125, "cuts": (2, 5),
                       "batch_size": 32, "local_steps": 4, "rounds": rounds, **fields})
  data, sim = hsee.build(cfg, objective=gated_server_distillation())   # shipped CIFAR-10
  init_key, train_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
  state = sim.init_state(init_key)
  for rnd in range(cfg.rounds):
    state, metrics, _ = sim.run_round(state, rnd, train_key)
    print(f"round {rnd + 1}:", *(f"{k} {v:.3f}" for k, v in
                                  zip(hsee.METRIC_NAMES, np.asarray(metrics).mean(0))))
  test = hsee.evaluate(sim.net, sim.fleet, sim.algorithm.eval_models(state), data, (0.0,), 500)
  for c in test["cuts"]:
    print(f"cut {c['cut']}: test exit_acc {c['exit_acc']['mean']:.3f} "
          f"full_acc {c['full_acc']['mean']:.3f}")
  return test


if __name__ == "__main__":
  main()
