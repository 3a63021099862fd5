"""FedAvgM (Hsu, Qi and Brown, 2019: federated averaging with server
momentum) as a strategy of one's own that runs through every command:
Averaging's round, then the shared model moves by a momentum of the
aggregated updates instead of to their average. The momentum is state of
the strategy's own, checkpointed and resumed with the rest.

    hsee train --config configs/smoke.py --strategy examples/fedavgm.py --out runs/fedavgm
    hsee train --resume runs/fedavgm --set rounds=5   # config.json records the strategy
    hsee eval --run runs/fedavgm
    hsee sweep --config configs/smoke.py --strategy examples/fedavgm.py --seeds 0,1 --out runs/m

A strategy is a function ``Context -> Algorithm`` (``init``, ``apply``,
``eval_models``, ``nonfinite_parts``, ``per_client_bytes``), as
``hsee_jax.averaging`` is; this one wraps it.
"""
import jax
import jax.numpy as jnp

from hsee_jax import Algorithm, averaging
from hsee_jax.config import ConfigError

BETA = 0.9   # server momentum (FedAvgM's paper sweeps 0.7-0.99)


@jax.jit
def server_step(old, new, momentum):
  """The shared model's parameters after a momentum step along the aggregated update."""
  momentum = jax.tree.map(lambda m, n, o: BETA * m + (n - o), momentum, new, old)
  return jax.tree.map(jnp.add, old, momentum), momentum


def strategy(ctx):
  if ctx.cfg.aggregate_every != 1:
    raise ConfigError("fedavgm: aggregate_every must be 1 (the clients keep no models of their own)")
  inner = averaging(ctx)

  def init(key):
    state = inner.init(key)
    return state, jax.tree.map(jnp.zeros_like, state.model.params)

  def apply(state, cohort):
    old, momentum = state
    new, metrics = inner.apply(old, cohort)
    params, momentum = server_step(old.model.params, new.model.params, momentum)
    return (new.replace(model=new.model.replace(params=params)), momentum), metrics

  return Algorithm(init, apply, lambda state: inner.eval_models(state[0]),
                   lambda state, ids=None: inner.nonfinite_parts(state[0], ids),
                   inner.per_client_bytes)
