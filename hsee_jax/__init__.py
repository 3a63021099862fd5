"""hsee_jax: Hetero-SplitEE (split learning with early exits for heterogeneous
clients; Oda et al., arXiv 2512.09313) in JAX/Flax.

The pieces a researcher composes (see ``examples/custom_network.py``):

* networks: :class:`SplitNetwork` (the interface a network implements to be
  cut), the shipped :class:`SplitResNet18`, :class:`SplitVGG16BN`,
  :class:`SplitMobileNetV2`, and :func:`network` (by name);
* the split update: :func:`split_update` (FedJAX-style init / step / final,
  loss and preprocessing as arguments; :func:`cross_entropy`,
  :func:`preprocessing`), run over clients by :class:`ClientRunner`;
  parts are :class:`PartState` (:func:`init_part`, optimiser :func:`direction`);
  the train set on device is a :class:`Shared` (:func:`make_shared`);
* cross-layer aggregation: :func:`cross_layer_average`;
* the strategies as values: :func:`averaging`, :func:`sequential`
  (:class:`Algorithm`), each built from a run's :class:`Context`; :func:`build`
  makes both for a config;
* data: :func:`load_dataset`, :func:`partition`, :class:`Dataset`;
* whole runs: :class:`Config`, :func:`load_config`, ``train.train(cfg,
  out_dir)``, :func:`evaluate`, :func:`run_sweep`.
"""
from hsee_jax.config import Config, ConfigError
from hsee_jax.config import load as load_config
from hsee_jax.data import Dataset, DataError, load_dataset, partition
from hsee_jax.engine import ClientRunner, ClientUpdate
from hsee_jax.evaluation import early_exit_table, evaluate
from hsee_jax.models import (CLASSIFIER, EXIT_HEAD, NETWORKS, SplitMobileNetV2, SplitNetwork,
                             SplitResNet18, SplitVGG16BN, network)
from hsee_jax.optim import PartState, direction, init_part
from hsee_jax.strategies import (METRIC_NAMES, Algorithm, Context, Shared, averaging, cross_entropy,
                                 cross_layer_average, make_shared, preprocessing, sequential,
                                 split_update)
from hsee_jax.sweep import run_sweep
from hsee_jax import train  # the module: train.train(cfg, out_dir) runs a config
from hsee_jax.train import Simulation, build

__all__ = [
    "Algorithm", "CLASSIFIER", "ClientRunner", "ClientUpdate", "Config", "ConfigError", "Context",
    "DataError", "Dataset", "EXIT_HEAD", "METRIC_NAMES", "NETWORKS", "PartState", "Shared",
    "Simulation", "SplitMobileNetV2", "SplitNetwork", "SplitResNet18", "SplitVGG16BN",
    "averaging", "build", "cross_entropy", "cross_layer_average", "direction",
    "early_exit_table", "evaluate", "init_part", "load_config", "load_dataset", "make_shared",
    "network", "partition", "preprocessing", "run_sweep", "sequential", "split_update", "train",
]
__version__ = "0.1.0"
