"""Your own method as a value: a :class:`Variant` of the split update, loaded
from a file or module by every command.

A variant is a small frozen dataclass of optional hooks; ``Variant()`` (no
hook) is the paper's method. :func:`chain` composes variants (as
``optax.chain`` composes transformations): at most one of them replaces the
client objective, every ``penalty`` is added to it. The hooks:

* ``objective(exits, final, labels, hp) -> scalar``: the client objective
  in place of the config's (:func:`hsee_jax.strategies.exit_objective`):
  ``exits`` the client's exit logits (shallowest first, its own cut's
  last), ``final`` the server part's logits for the same images (held
  fixed: forward information, no gradient), ``labels`` [B], ``hp`` the
  step's hyperparameters by name (``hp["exit_loss_weight"]``;
  :data:`hsee_jax.fleet.HPARAMS`);
* ``penalty(exits, final, labels, hp) -> scalar``: a term added to the
  client objective (the config's or a variant's);
* ``grouping(path) -> "unit" | "client"``: how a leaf is aggregated
  (Averaging): ``path`` is ``("params" | "batch_stats", unit or head,
  module, ..., leaf)``, e.g. ``("batch_stats", "unit_3", "BatchNorm_0",
  "mean")``; ``"unit"`` (the paper's) averages it across every model that
  holds its unit (cross-layer aggregation), ``"client"`` keeps it per client,
  never averaged: each client trains and is evaluated with its own
  (``examples/fedbn.py``, FedBN's batch norm). It is called once per leaf
  name when the program is built, never on arrays.

A variant reaches every command by its *spec*: ``FILE.py`` or
``FILE.py:NAME`` (NAME defaults to ``variant``) or ``module:NAME``, given as
``hsee train|sweep ... --variant SPEC`` (repeatable) and recorded in the
run's ``config.json`` (the ``variants`` field), so ``--resume``, ``hsee
eval`` and ``hsee sweep --resume`` load it again. :func:`resolve` loads the
specs and traces every hook once against abstract shapes, so a wrong
signature or a loss that is not a scalar is one line before any data is
loaded. ``examples/depthfl_sum.py`` is one.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from hsee_jax import config as config_lib
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


def chain(*variants: Variant) -> Variant:
  """The variants composed: the one objective among them (two are an
  error), the sum of their penalties; a leaf is kept per client when any
  variant's ``grouping`` keeps it."""
  objectives = [v for v in variants if v.objective is not None]
  if len(objectives) > 1:
    raise VariantError(f"variants {objectives[0].name} and {objectives[1].name} both replace "
                       f"the client objective; give one of them, or turn one into a penalty")
  penalties = [v.penalty for v in variants if v.penalty is not None]

  def penalty(exits, final, labels, hp):
    return sum(p(exits, final, labels, hp) for p in penalties)
  groupings = [v.grouping for v in variants if v.grouping is not None]

  def grouping(path):
    return "client" if any(g(path) == "client" for g in groupings) else "unit"
  return Variant(name="+".join(v.name for v in variants) or "paper",
                 objective=objectives[0].objective if objectives else None,
                 penalty=(penalties[0] if len(penalties) == 1 else penalty) if penalties else None,
                 grouping=(groupings[0] if len(groupings) == 1 else grouping) if groupings else None)


def canonical(spec: str) -> str:
  """``spec`` as recorded in a config: a file path made absolute (so a run
  resumes from any directory), ``:variant`` spelled out."""
  path, name = _split(spec)
  if path is None:
    return spec
  return f"{Path(path).expanduser().resolve()}:{name}"


def _split(spec: str) -> tuple[str | None, str]:
  """(file path, or None for a module; the attribute's name)."""
  head, sep, name = spec.rpartition(":")
  if not sep:                                   # FILE.py
    return spec, "variant"
  if head.endswith(".py") or os.sep in head:    # FILE.py:NAME
    return head, name or "variant"
  return None, name                             # module:NAME


_LOADED: dict = {}


def load(spec: str) -> Variant:
  """The :class:`Variant` a spec names (``FILE.py[:NAME]`` or
  ``module:NAME``); a file is executed once per process and change (the same
  hooks then serve every run of a sweep, and its compiled programs too)."""
  path, name = _split(spec)
  try:
    if path is not None:
      file = Path(path).expanduser().resolve()
      if not file.is_file():
        raise VariantError(f"no file {file}")
      key = (str(file), file.stat().st_mtime_ns)
      if key not in _LOADED:
        _LOADED[key] = config_lib.run_user_file(file, f"hsee_variant_{file.stem}",
                                                f"variant {spec}")
      module = _LOADED[key]
    else:
      module = importlib.import_module(spec.rpartition(":")[0])
    if not hasattr(module, name):
      raise VariantError(f"it defines no {name}")
    value = getattr(module, name)
    if inspect.isfunction(value):   # a factory of a Variant, with no arguments
      try:
        value = value()
      except Exception as e:  # noqa: BLE001
        raise VariantError(f"{name}() (a factory of the variant, called with no arguments) "
                           f"raised {type(e).__name__}: {config_lib._first(e)}") from None
    if not isinstance(value, Variant):
      raise VariantError(f"{name} is a {type(value).__name__}, not an hsee_jax.variants.Variant")
    return value
  except VariantError as e:
    raise VariantError(f"variant {spec}: {e}") from None
  except ConfigError as e:   # the file's own error, already one line naming the spec
    raise VariantError(str(e)) from None
  except Exception as e:  # noqa: BLE001  (a module of the user's)
    raise VariantError(f"variant {spec}: {type(e).__name__}: {config_lib._first(e)}") from None


def check(variant: Variant, spec: str, exits: int, batch: int, classes: int,
          hparams: tuple, leaf_paths: Callable | None = None) -> None:
  """Trace each hook of ``variant`` once against abstract shapes (``exits``
  exit logits [batch, classes], the final logits, labels [batch], the named
  hyperparameters) and ask ``grouping`` about every leaf of ``leaf_paths()``:
  a wrong signature, a value that is not one number or a grouping that is
  not one of ``"unit"``, ``"client"`` is a one-line :class:`VariantError`
  naming ``spec``."""
  if variant.grouping is not None and leaf_paths is not None:
    from hsee_jax.strategies.parts import GROUPS
    for path in leaf_paths():
      try:
        group = variant.grouping(path)
      except Exception as e:  # noqa: BLE001  (the user's function)
        raise VariantError(f"variant {spec}: grouping{path!r} raised {type(e).__name__}: "
                           f"{config_lib._first(e)}") from None
      if group not in GROUPS:
        raise VariantError(f"variant {spec}: grouping{path!r} returned {group!r}; it answers "
                           f"one of {', '.join(map(repr, GROUPS))}")
  logits = jax.ShapeDtypeStruct((batch, classes), jnp.float32)
  args = ([logits] * exits, logits, jax.ShapeDtypeStruct((batch,), jnp.int32),
          {h: jax.ShapeDtypeStruct((), jnp.float32) for h in hparams})
  for hook in ("objective", "penalty"):
    fn = getattr(variant, hook)
    if fn is None:
      continue
    try:
      out = jax.eval_shape(fn, *args)
    except Exception as e:  # noqa: BLE001  (the user's function)
      text = str(e).strip().splitlines()[0] if str(e).strip() else ""
      raise VariantError(f"variant {spec}: {hook}(exits, final, labels, hp) fails on abstract "
                         f"inputs: {type(e).__name__}: {text[:200]}") from None
    shape = getattr(out, "shape", None)
    if shape != ():
      raise VariantError(f"variant {spec}: {hook} must return one number (a scalar loss), "
                         f"got {'shape ' + str(tuple(shape)) if shape is not None else type(out).__name__}")


def resolve(specs, exits: int = 1, batch: int = 8, classes: int = 10,
            hparams: tuple = (), leaf_paths: Callable | None = None) -> Variant | None:
  """The variants of ``specs`` loaded, checked (:func:`check`) and
  chained; None without any."""
  if not specs:
    return None
  loaded = []
  for spec in specs:
    v = load(spec)
    check(v, spec, exits, batch, classes, hparams, leaf_paths)
    loaded.append(v)
  return chain(*loaded)
