"""Self-distillation of a client's exits ([choice], ``distill=deepest`` or
``distill=server``): a KL term at ``distill_temperature`` (Hinton's T^2
scaling) added to the client objective, weighed ``distill_weight`` from
round ``distill_start`` on (0 before). ``deepest``: each shallower exit
from the client's own deepest (ScaleFL, DepthFL; with ``client_exits=every``);
``server``: every exit from the server part's logits, sent back as soft
labels (forward information, float32, priced on the link). A variant with
the hooks ``penalty``, ``hparams`` and (``server``) ``downlink``."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hsee_jax.variants.base import Variant


def distillation_loss(student_logits, teacher_logits, temperature):
  """Hinton's distillation term, ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``
  averaged over the batch; the teacher is held fixed (no gradient reaches it)."""
  log_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits) / temperature)
  log_s = jax.nn.log_softmax(student_logits / temperature)
  return temperature ** 2 * jnp.mean(jnp.sum(jnp.exp(log_t) * (log_t - log_s), -1))


def _mean(values: list):
  return values[0] if len(values) == 1 else sum(values) / len(values)


def weight(cfg, rnd: int) -> float:
  """The term's weight in round ``rnd`` (0-based): 0 before ``distill_start``."""
  return cfg.distill_weight if rnd + 1 >= cfg.distill_start else 0.0


def soft_label_bytes(cfg, classes: int, rnd: int) -> int:
  """The server's logits sent back per image (float32), from ``distill_start`` on."""
  return 4 * classes if rnd + 1 >= cfg.distill_start else 0


@functools.lru_cache(maxsize=None)
def make(teacher: str, temperature: float) -> Variant:
  """The variant distilling from ``teacher`` (``deepest`` | ``server``) at ``temperature``."""
  if teacher not in ("deepest", "server"):
    raise ValueError(f"teacher: deepest or server, got {teacher!r}")

  def penalty(exits, final, labels, hp):
    if teacher == "deepest":
      if len(exits) == 1:
        return 0.0
      return hp["distill_weight"] * _mean([distillation_loss(e, exits[-1], temperature)
                                           for e in exits[:-1]])
    return hp["distill_weight"] * _mean([distillation_loss(e, final, temperature) for e in exits])
  return Variant(name=f"distill-{teacher}", penalty=penalty, hparams=(("distill_weight", weight),),
                 downlink=soft_label_bytes if teacher == "server" else None)


def from_config(cfg) -> Variant | None:
  return None if cfg.distill == "none" else make(cfg.distill, cfg.distill_temperature)
