"""optax optimisers and learning-rate schedules, kept per named subtree.

The update direction comes from an optax transformation (SGD with momentum
and weight decay, or Adam); the learning rate is applied by the train step
from the schedule, evaluated at the *global* step (round * local_steps + s).
Optimiser state is a dict keyed like the parameters (``unit_<k>``,
``exit_head``, ``classifier``): the Sequential server can then update only the
units a client's activations pass through, and leave the others untouched,
momentum included.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import optax

from hsee_jax import models
from hsee_jax.config import Config


@flax.struct.dataclass
class PartState:
  """One client part or server part: parameters, batch statistics, optimiser
  state, each a dict keyed by unit/head name. May carry a leading client axis."""
  params: dict
  batch_stats: dict
  opt_state: dict

  def subset(self, names) -> "PartState":
    """The units / heads ``names`` of this part (names it lacks are skipped)."""
    names = [n for n in names if n in self.params]
    return PartState(params={n: self.params[n] for n in names},
                     batch_stats={n: self.batch_stats[n] for n in names if n in self.batch_stats},
                     opt_state={n: self.opt_state[n] for n in names if n in self.opt_state})

  def split(self, cut: int) -> tuple["PartState", "PartState"]:
    """(client part, server part) at ``cut``: units 1..cut and the exit heads;
    the units after ``cut`` and the classifier."""
    def on_client(name):
      k = models.unit_index(name)
      return models.is_exit_head(name) or (k is not None and k <= cut)
    return (self.subset([n for n in self.params if on_client(n)]),
            self.subset([n for n in self.params if not on_client(n)]))

  def merge(self, other: "PartState") -> "PartState":
    """This state with ``other``'s subtrees written over it."""
    return PartState(params={**self.params, **other.params},
                     batch_stats={**self.batch_stats, **other.batch_stats},
                     opt_state={**self.opt_state, **other.opt_state})


def direction(optimizer: str, nesterov: bool, momentum: Any, weight_decay: Any
              ) -> optax.GradientTransformation:
  """The optimiser's update direction, an ``optax.GradientTransformation``
  (``optimizer``: ``sgd`` | ``adam``; ``nesterov`` for SGD); the step
  multiplies it by -lr (PyTorch SGD semantics:
  buf = m * buf + (g + wd * p); p -= lr * buf). ``momentum`` and
  ``weight_decay`` may be traced values: the training step builds the
  direction from its inputs, so runs that differ only in them share one
  compiled program. The state's structure does not depend on them."""
  if optimizer == "sgd":
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.trace(decay=momentum, nesterov=nesterov))
  return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay))


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
  """The config's update direction (:func:`direction` with its values)."""
  return direction(cfg.optimizer, cfg.nesterov, cfg.momentum, cfg.weight_decay)


def make_schedule(cfg: Config, total_steps: int) -> optax.Schedule:
  total_steps = max(1, total_steps)
  if cfg.schedule == "cosine":
    return optax.cosine_decay_schedule(cfg.lr, decay_steps=total_steps)
  if cfg.schedule == "step":
    bounds = {int(m * total_steps): cfg.step_gamma for m in cfg.step_milestones}
    return optax.piecewise_constant_schedule(cfg.lr, bounds)
  return optax.constant_schedule(cfg.lr)


def extension_note(cfg: Config, schedule: optax.Schedule, local_steps: int, start: int,
                   old_rounds: int) -> str:
  """What raising ``rounds`` from ``old_rounds`` after round ``start`` does to
  the learning rate (a resumed run says it plainly)."""
  if cfg.schedule == "constant":
    return f"the learning rate is constant, so this is exactly a run of {cfg.rounds} rounds"
  lr = float(schedule(start * local_steps))
  return (f"the {cfg.schedule} schedule now spans {cfg.rounds} rounds and goes on from its "
          f"value at round {start + 1} (lr {lr:.4g}); rounds 1-{start} ran under the "
          f"{old_rounds}-round schedule, so this is not a {cfg.rounds}-round run from scratch "
          f"(with schedule=constant it would be)")


def init_part(tx: optax.GradientTransformation, params: dict, batch_stats: dict) -> PartState:
  """A :class:`PartState` of ``params`` and ``batch_stats`` (dicts keyed by
  unit / head name, as ``SplitNetwork.init_span`` returns them) with the
  optimiser state ``tx.init`` gives each subtree. Returns the PartState."""
  return PartState(params=params, batch_stats=batch_stats,
                   opt_state={n: tx.init(p) for n, p in params.items()})


def apply_gradients(tx: optax.GradientTransformation, part: PartState, grads: dict,
                    lr: Any, batch_stats: dict) -> PartState:
  """One optimiser step on every subtree of ``part``."""
  params, opt_state = {}, {}
  for n, p in part.params.items():
    updates, opt_state[n] = tx.update(grads[n], part.opt_state[n], p)
    params[n] = optax.apply_updates(p, jax.tree.map(lambda u: -lr * u, updates))
  return PartState(params=params, batch_stats=batch_stats, opt_state=opt_state)
