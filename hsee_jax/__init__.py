"""hsee_jax: Hetero-SplitEE (split learning with early exits for heterogeneous
clients; Oda et al., arXiv 2512.09313) in JAX/Flax.

The pieces a researcher composes (see ``examples/custom_network.py``):

* networks: :class:`SplitNetwork` (the interface a network implements to be
  cut), the shipped :class:`SplitResNet18`, :class:`SplitVGG16BN`,
  :class:`SplitMobileNetV2`, and :func:`network` (by name);
* the split update: :func:`split_update` (FedJAX-style init / step / final,
  loss, client objective and preprocessing as arguments; :func:`cross_entropy`,
  :func:`exit_objective`, :func:`preprocessing`;
  ``examples/exit_objective.py``), run over clients by :class:`ClientRunner`;
  parts are :class:`PartState` (:func:`init_part`, optimiser :func:`direction`);
  the train set on device is a :class:`TrainSet` (:func:`put_train_set`);
* cross-layer aggregation: :func:`cross_layer_average`;
* your own method as a value: :class:`Variant` (hooks: the client
  objective, penalties on the exits and on the weights, the exits a client
  holds, how a leaf is averaged, the evaluated networks, hyperparameters of
  its own beside :data:`HPARAMS`, what the server sends back), composed by
  :func:`chain`, run by every command with ``--variant SPEC``
  (``examples/depthfl_sum.py``); the built-in variants are modules of
  :mod:`hsee_jax.variants` written against the same hooks
  (:func:`distillation_loss` is :mod:`hsee_jax.variants.distill`'s);
* the fleet as it runs: :class:`Link` (what crosses the link, compressed, and
  its bytes), :class:`Clock` (each client's simulated seconds and bytes);
* the strategies as values: :func:`averaging`, :func:`sequential`
  (:class:`Algorithm`), each built from a run's :class:`Context`; :func:`build`
  makes both for a config;
* data: :func:`load_dataset`, :func:`partition`, :class:`Dataset`;
* whole runs: :class:`Config`, :func:`load_config`, ``train.train(cfg,
  out_dir)``, :func:`run_rounds` (the loop over rounds, for a loop of your
  own with :func:`build`), :func:`evaluate`, :func:`run_sweep`.
"""
import importlib

# name -> (module, attribute; None: the module itself). Imported on first use
# (PEP 562), so that ``hsee --help`` and config errors answer without JAX.
_EXPORTS = {
    **{n: ("hsee_jax.config", n) for n in ("Config", "ConfigError")},
    "load_config": ("hsee_jax.config", "load"),
    **{n: ("hsee_jax.data", n) for n in ("Dataset", "DataError", "load_dataset", "partition")},
    **{n: ("hsee_jax.engine", n) for n in ("ClientRunner", "ClientUpdate")},
    "Clock": ("hsee_jax.costs", "Clock"),
    "Link": ("hsee_jax.link", "Link"),
    **{n: ("hsee_jax.evaluation", n) for n in ("early_exit_table", "evaluate")},
    **{n: ("hsee_jax.models", n) for n in ("CLASSIFIER", "EXIT_HEAD", "NETWORKS",
                                           "SplitMobileNetV2", "SplitNetwork", "SplitResNet18",
                                           "SplitVGG16BN", "network")},
    **{n: ("hsee_jax.optim", n) for n in ("PartState", "direction", "init_part")},
    **{n: ("hsee_jax.strategies", n) for n in (
        "METRIC_NAMES", "Algorithm", "Context", "TrainSet", "averaging",
        "cross_entropy", "cross_layer_average", "exit_objective",
        "preprocessing", "put_train_set", "sequential",
        "split_update")},
    "run_sweep": ("hsee_jax.sweep", "run_sweep"),
    "HPARAMS": ("hsee_jax.fleet", "HPARAMS"),
    **{n: ("hsee_jax.variants", n) for n in ("Variant", "chain")},
    "distillation_loss": ("hsee_jax.variants.distill", "distillation_loss"),
    "train": ("hsee_jax.train", None),  # the module: train.train(cfg, out_dir) runs a config
    **{n: ("hsee_jax.train", n) for n in ("Simulation", "build", "run_rounds")},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'hsee_jax' has no attribute {name!r}")
  module, attr = _EXPORTS[name]
  value = importlib.import_module(module)
  value = value if attr is None else getattr(value, attr)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"
