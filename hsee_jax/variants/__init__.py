"""Your own method as a value: a :class:`Variant` of the split update, loaded
from a file or module by every command.

A variant is a small frozen dataclass of optional hooks; ``Variant()`` (no
hook) is the paper's method. :func:`chain` composes variants (as
``optax.chain`` composes transformations): at most one of them replaces the
client objective, every ``penalty`` is added to it. The hooks:

* ``objective(exits, final, labels, hp) -> scalar``: the client objective
  in place of the paper's (:func:`hsee_jax.strategies.exit_objective`):
  ``exits`` the client's exit logits (shallowest first, its own cut's
  last), ``final`` the server part's logits for the same images (held
  fixed: forward information, no gradient), ``labels`` [B], ``hp`` the
  step's hyperparameters by name (``hp["exit_loss_weight"]``;
  :data:`hsee_jax.fleet.HPARAMS` and the variants' own, ``hparams``);
* ``penalty(exits, final, labels, hp) -> scalar``: a term added to the
  client objective (the paper's or a variant's);
* ``step_penalty(params, start, hp) -> scalar``: a term on each local step
  that reads the weights: ``params`` (client part, server part) parameter
  trees, ``start`` the same at the start of the client's round (FedProx's
  proximal term, :mod:`.fedprox`);
* ``exits(cut, cuts) -> lower cuts``: the cuts below ``cut`` (of the
  fleet's ``cuts``) where a client at ``cut`` also holds and trains an exit
  head (DepthFL, :mod:`.every_exit`); each such head is averaged over every
  client that trains one, and priced on the client;
* ``grouping(path, cut) -> "unit" | "tier" | "side" | "client"``: how a
  leaf of a client at ``cut`` is aggregated (Averaging): ``path`` is
  ``("params" | "batch_stats", unit or head, module, ..., leaf)``, e.g.
  ``("batch_stats", "unit_3", "BatchNorm_0", "mean")``; ``"unit"`` (the
  paper's) averages it across every model that holds its unit (cross-layer
  aggregation), ``"tier"`` across the clients at the same cut only (a
  tier's own copy: :mod:`.tier_local_top`), ``"side"`` across the holders
  on the same side only, client parts apart from server parts
  (:mod:`.sides_apart`), ``"client"`` keeps it per client, never averaged:
  each client trains and is evaluated with its own (``examples/fedbn.py``,
  FedBN's batch norm). A unit goes to a tier or a side whole. It is called
  once per leaf name and cut when the program is built, never on arrays;
* ``evaluated(net, network, train_set, seed) -> network``: the network
  (a :class:`hsee_jax.optim.PartState` of a tier's whole model) as it is
  evaluated (HeteroFL's static batch norm, :mod:`.static_bn`; Averaging);
* ``hparams``: ``((name, value(cfg, round)), ...)``, hyperparameters of the
  variant's own, given to the hooks as ``hp[name]`` each step (round
  0-based): inputs of the compiled programs, so runs that differ in them
  share their programs (:mod:`.distill`'s weight, 0 before its start round);
* ``downlink(cfg, classes, round) -> bytes``: what the server sends back
  per training image (priced on the link and the simulated clock;
  :mod:`.distill`'s soft labels).

The built-in variants ([choice]; docs/usage.md, "Exit-aware training and
aggregation") are modules of this package written only against these hooks,
each turned on by its config fields (:func:`builtin`): :mod:`.every_exit`,
:mod:`.rising`, :mod:`.distill`, :mod:`.static_bn`, :mod:`.fedprox`,
:mod:`.tier_local_top`, :mod:`.sides_apart`.

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

import importlib
import inspect
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from hsee_jax import config as config_lib
from hsee_jax.config import ConfigError
from hsee_jax.variants.base import Variant, VariantError, chain

__all__ = ["Variant", "VariantError", "builtin", "canonical", "chain", "check", "for_config",
           "load", "load_strategy"]


def canonical(spec: str, default: str = "variant") -> str:
  """``spec`` as recorded in a config: a file path made absolute (so a run
  resumes from any directory), ``:NAME`` spelled out (``default``)."""
  path, name = _split(spec, default)
  if path is None:
    return spec
  return f"{Path(path).expanduser().resolve()}:{name}"


def _split(spec: str, default: str = "variant") -> tuple[str | None, str]:
  """(file path, or None for a module; the attribute's name)."""
  head, sep, name = spec.rpartition(":")
  if not sep:                                   # FILE.py
    return spec, default
  if head.endswith(".py") or os.sep in head:    # FILE.py:NAME
    return head, name or default
  return None, name                             # module:NAME


_LOADED: dict = {}


def _attribute(spec: str, default: str, what: str):
  """The attribute a spec names, its file executed once per process and
  change (the same functions then serve every run of a sweep, and its
  compiled programs too); a :class:`VariantError` without the spec."""
  path, name = _split(spec, default)
  if path is not None:
    file = Path(path).expanduser().resolve()
    if not file.is_file():
      raise VariantError(f"no file {file}")
    key = (str(file), file.stat().st_mtime_ns)
    if key not in _LOADED:
      _LOADED[key] = config_lib.run_user_file(file, f"hsee_{what}_{file.stem}", f"{what} {spec}")
    module = _LOADED[key]
  else:
    module = importlib.import_module(spec.rpartition(":")[0])
  if not hasattr(module, name):
    raise VariantError(f"it defines no {name}")
  return name, getattr(module, name)


def load(spec: str) -> Variant:
  """The :class:`Variant` a spec names (``FILE.py[:NAME]`` or
  ``module:NAME``; a function there is called with no arguments to make one)."""
  try:
    name, value = _attribute(spec, "variant", "variant")
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


def load_strategy(spec: str) -> Callable:
  """A strategy of one's own that a spec names (``FILE.py[:NAME]``, NAME
  defaulting to ``strategy``, or ``module:NAME``): a function ``Context ->
  Algorithm``, as :func:`hsee_jax.strategies.averaging` is."""
  try:
    name, value = _attribute(spec, "strategy", "strategy")
    if not callable(value):
      raise VariantError(f"{name} is a {type(value).__name__}, not a function Context -> Algorithm")
    try:
      inspect.signature(value).bind(None)
    except TypeError:
      raise VariantError(f"{name} must take one argument, the run's Context "
                         f"(Context -> Algorithm)") from None
    except ValueError:   # no signature to read (a builtin): called as it is
      pass
    return value
  except VariantError as e:
    raise VariantError(f"strategy {spec}: {e}") from None
  except ConfigError as e:
    raise VariantError(str(e)) from None
  except Exception as e:  # noqa: BLE001  (a module of the user's)
    raise VariantError(f"strategy {spec}: {type(e).__name__}: {config_lib._first(e)}") from None


def check(variant: Variant, spec: str, cfg, exits: int, classes: int, hparams: tuple,
          leaf_paths: Callable | None = None) -> None:
  """Try each hook of ``variant`` once, before any data is loaded: trace the
  objective and the penalty against abstract shapes (``exits`` exit logits
  [batch, classes], the final logits, labels [batch], the hyperparameters
  ``hparams`` by name), ask ``grouping`` about every leaf of
  ``leaf_paths()``, ``exits`` about each of ``cfg``'s cuts, and the
  hyperparameters and ``downlink`` for round 0. A wrong signature, a value
  that is not one number, a grouping that is not one of ``"unit"``,
  ``"client"`` or exits that are not cuts of the fleet below the client's
  is a one-line :class:`VariantError` naming ``spec``."""
  call = lambda hook, fn, *args: _call(spec, hook, fn, *args)
  if variant.grouping is not None and leaf_paths is not None:
    from hsee_jax.strategies.parts import GROUPS
    for cut in cfg.static_cuts() or (1,):
      unit_answer = {}
      for path in leaf_paths():
        group = call(f"grouping({path!r}, {cut})", variant.grouping, path, cut)
        if group not in GROUPS:
          raise VariantError(f"variant {spec}: grouping({path!r}, {cut}) returned {group!r}; it "
                             f"answers one of {', '.join(map(repr, GROUPS))}")
        other = unit_answer.setdefault(path[1], group)
        if other != group and {group, other} & {"tier", "side"}:
          raise VariantError(f"variant {spec}: grouping answers {other!r} and {group!r} for "
                             f"leaves of {path[1]} at cut {cut}; a unit goes to a tier or a side "
                             f"whole")
  _check_exits(variant, spec, cfg.static_cuts() or ())
  numbers = [(f"hparams {name!r}", lambda fn=fn: fn(cfg, 0)) for name, fn in variant.hparams]
  if variant.downlink is not None:
    numbers.append(("downlink(cfg, classes, round)", lambda: variant.downlink(cfg, classes, 0)))
  for hook, fn in numbers:
    value = call(hook, fn)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
      raise VariantError(f"variant {spec}: {hook} must give a number >= 0, got {value!r}")
  batch = cfg.batch_size
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


def _call(spec: str, hook: str, fn, *args):
  try:
    return fn(*args)
  except Exception as e:  # noqa: BLE001  (the user's function)
    raise VariantError(f"variant {spec}: {hook} raised {type(e).__name__}: "
                       f"{config_lib._first(e)}") from None


def _check_exits(variant: Variant, spec: str, cuts: tuple) -> None:
  """``exits`` asked about each of ``cuts``: a tuple of the cuts below each."""
  for c in cuts if variant.exits is not None else ():
    lower = _call(spec, f"exits({c}, {cuts})", variant.exits, c, cuts)
    if not isinstance(lower, tuple) or any(x not in cuts or x >= c for x in lower):
      raise VariantError(f"variant {spec}: exits({c}, {cuts}) returned {lower!r}; it answers a "
                         f"tuple of the fleet's cuts below {c}")


def builtin(cfg) -> list[Variant]:
  """The built-in variants ``cfg``'s fields turn on, in a fixed order."""
  from hsee_jax.variants import (distill, every_exit, fedprox, rising, sides_apart, static_bn,
                                 tier_local_top)
  return [v for v in (m.from_config(cfg) for m in (every_exit, rising, distill, static_bn,
                                                  fedprox, tier_local_top, sides_apart))
          if v is not None]


def for_config(cfg, classes: int = 10, leaf_paths: Callable | None = None) -> Variant | None:
  """Every variant of ``cfg`` chained: the built-in ones its fields turn on
  (:func:`builtin`), then its ``variants`` specs loaded and checked
  (:func:`check`; the objective traced with as many exits as its deepest
  client holds); None for the paper's method."""
  from hsee_jax.fleet import HPARAMS
  given = builtin(cfg)
  mine = [(spec, load(spec)) for spec in cfg.variants]
  every = given + [v for _, v in mine]
  if not every:
    return None
  names = HPARAMS + tuple(h for v in every for h, _ in v.hparams)
  cuts = cfg.static_cuts() or ()
  for spec, v in mine:
    _check_exits(v, spec, cuts)
  exits_of = chain(*every).exits
  exits = 1 + max((len(exits_of(c, cuts)) for c in cuts), default=0) if exits_of else 1
  for spec, v in mine:
    check(v, spec, cfg, exits, classes, names, leaf_paths)
  return chain(*every)
