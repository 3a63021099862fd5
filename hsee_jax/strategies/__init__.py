"""Hetero-SplitEE training: the client update, cross-layer aggregation, and
the two strategies, Averaging and Sequential.

* :mod:`.update`: the split update, FedJAX's init / step / final
  (:func:`split_update`), its client objective (:func:`exit_objective`),
  loss and preprocessing, the train set on the
  device (:class:`TrainSet`);
* :mod:`.aggregation`: cross-layer aggregation (:func:`cross_layer_average`
  and its streaming form, :func:`combine_sides` with the two sides apart);
* :mod:`.algorithm`: a strategy as a value (:class:`Algorithm`: ``init``,
  ``apply``, what evaluation and the checks need), what it is built from
  (:class:`Context`), the cache of compiled programs;
* :mod:`.averaging`, :mod:`.sequential`: the two strategies, each a
  function ``Context -> Algorithm`` (as FedJAX builds a federated algorithm);
* :mod:`.parts`: per-client parts stored per cut, taken and put by slot.

:data:`STRATEGIES` holds the two; a strategy of one's own is the same kind
of function, named by a spec in the config's ``strategy`` field
(:func:`hsee_jax.variants.load_strategy`, ``examples/fedavgm.py``).

``apply(state, cohort) -> (state, metrics [C, 4])`` trains one round of a
cohort's clients (:class:`hsee_jax.fleet.Cohort`) and reads nothing back to
the host; :func:`hsee_jax.train.run_rounds` is the loop over rounds.
"""
from hsee_jax.strategies.aggregation import (chunk_sums, combine_sides, combine_sums,
                                             cross_layer_average)
from hsee_jax.strategies.algorithm import (PROGRAM_CACHE_SIZE, PROGRAM_FIELDS, Algorithm, Context,
                                           EvalModel, cached_program, clear_program_cache,
                                           program_config, step_inputs)
from hsee_jax.strategies.averaging import AveragingState, averaging, client_server_parts
from hsee_jax.strategies.parts import group_key
from hsee_jax.strategies.sequential import SequentialState, sequential
from hsee_jax.strategies.update import (METRIC_NAMES, TrainSet, cross_entropy,
                                        exit_objective, preprocessing, put_train_set,
                                        split_update)

STRATEGIES = {"averaging": averaging, "sequential": sequential}

__all__ = ["METRIC_NAMES", "PROGRAM_CACHE_SIZE", "PROGRAM_FIELDS", "STRATEGIES", "Algorithm",
           "AveragingState", "Context", "EvalModel", "SequentialState", "TrainSet",
           "averaging", "cached_program", "chunk_sums", "clear_program_cache",
           "client_server_parts", "combine_sides", "combine_sums",
           "cross_entropy",
           "cross_layer_average", "exit_objective", "group_key", "preprocessing", "program_config",
           "put_train_set", "sequential", "split_update", "step_inputs"]
