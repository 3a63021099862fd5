"""DepthFL's objective as its paper writes it, as a Variant that runs through
every command: a client trains an exit at each of the fleet's cuts up to its
own (``client_exits=every``) and its exits' losses are summed, not averaged.

    hsee train --config configs/smoke.py --set client_exits=every \\
        --variant examples/depthfl_sum.py --out runs/depthfl_sum
    hsee train --resume runs/depthfl_sum          # config.json records the variant
    hsee sweep --config configs/smoke.py --set client_exits=every \\
        --variant examples/depthfl_sum.py --seeds 0,1 --out runs/depthfl_sum_sweep

``objective(exits, final, labels, hp)``: ``exits`` the client's exit logits
(shallowest first, its own last), ``final`` the server part's logits (held
fixed), ``labels`` [B], ``hp`` the step's hyperparameters by name. Sum or
mean differ only where a client holds several exits: the deeper clients'
exits then weigh more against their server part than in DepthFL's mean
(``client_exits=every`` alone).
"""
import jax.numpy as jnp

from hsee_jax import Variant, cross_entropy


def summed_exits(exits, final, labels, hp):
  return hp["exit_loss_weight"] * jnp.sum(jnp.stack([cross_entropy(e, labels) for e in exits]))


variant = Variant(name="depthfl_sum", objective=summed_exits)
