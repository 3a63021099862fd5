"""The value a variant is (:class:`Variant`, its hooks described in
:mod:`hsee_jax.variants`) and their composition (:func:`chain`)."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from hsee_jax.config import ConfigError


class VariantError(ConfigError):
  """A variant that cannot be loaded or used; one line naming its spec."""


@dataclasses.dataclass(frozen=True)
class Variant:
  """A change to the method; each hook None = the paper's (module docstring)."""
  name: str = "variant"
  objective: Callable | None = None
  penalty: Callable | None = None
  grouping: Callable | None = None
  step_penalty: Callable | None = None
  exits: Callable | None = None
  evaluated: Callable | None = None
  hparams: tuple = ()
  downlink: Callable | None = None


def _sum_of(hooks: list):
  """One hook that adds the values of ``hooks`` (itself for one, None for none)."""
  if len(hooks) <= 1:
    return hooks[0] if hooks else None
  return lambda *args: sum(h(*args) for h in hooks)


@functools.lru_cache(maxsize=256)   # the same variants give the same hooks: programs are shared
def chain(*variants: Variant) -> Variant:
  """The variants composed: the one objective among them (two are an
  error), the sum of their penalties, step penalties and downlink bytes,
  the union of the exits they hold, their evaluation transforms in turn,
  their hyperparameters together (a name twice is an error); a leaf goes to
  the narrowest group any variant's ``grouping`` gives it (client, then
  tier, then side, then unit)."""
  objectives = [v for v in variants if v.objective is not None]
  if len(objectives) > 1:
    raise VariantError(f"variants {objectives[0].name} and {objectives[1].name} both replace "
                       f"the client objective; give one of them, or turn one into a penalty")
  names = [h for v in variants for h, _ in v.hparams]
  twice = sorted({h for h in names if names.count(h) > 1})
  if twice:
    raise VariantError(f"hyperparameter {twice[0]} is given by two variants "
                       f"({', '.join(v.name for v in variants if twice[0] in dict(v.hparams))})")
  hooks = lambda name: [getattr(v, name) for v in variants if getattr(v, name) is not None]
  groupings, exits, evaluated = hooks("grouping"), hooks("exits"), hooks("evaluated")

  def grouping(path, cut):
    answers = {g(path, cut) for g in groupings}
    return next((a for a in ("client", "tier", "side") if a in answers), "unit")

  def every_exit(cut, cuts):
    return tuple(sorted(set().union(*(set(e(cut, cuts)) for e in exits))))

  def transform(net, network, train_set, seed):
    for e in evaluated:
      network = e(net, network, train_set, seed)
    return network
  one = lambda hs, many: (hs[0] if len(hs) == 1 else many) if hs else None
  return Variant(name="+".join(v.name for v in variants) or "paper",
                 objective=objectives[0].objective if objectives else None,
                 penalty=_sum_of(hooks("penalty")), grouping=one(groupings, grouping),
                 step_penalty=_sum_of(hooks("step_penalty")), exits=one(exits, every_exit),
                 evaluated=one(evaluated, transform),
                 hparams=tuple(p for v in variants for p in v.hparams),
                 downlink=_sum_of(hooks("downlink")))
