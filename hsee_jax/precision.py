"""Mixed precision: the one place that decides which dtype a computation runs in.

``Config.precision``: ``float32``, ``bfloat16``, or ``auto`` (bfloat16 on a
GPU or TPU; float32 on the CPU, where bfloat16 gained at most a few percent
in docs/performance.md's measurement and float32 keeps the CPU's results as
they were). Under bfloat16 the policy is the usual one for training
convolutional networks (Flax's ``examples/imagenet`` ``half_precision``,
Micikevicius et al. 2018):

* kept in float32: parameters, optimiser state, batch-norm statistics (and
  the normalisation's mean and variance), checkpoints, the cross-layer
  aggregation (it averages the float32 parameters);
* computed in bfloat16: convolutions, matrix products and the activations
  between them, so the activations a client sends to the server travel in
  bfloat16 (the cost table and the simulated clock count them at 2 bytes);
* back in float32: every head's logits, so losses, softmax and the exit
  entropy are float32.

:func:`apply` is where a network's module runs under the policy
(``SplitNetwork`` calls it for every unit and head, shipped or user-written):
its float parameters and its input are cast to the compute dtype (the
gradient flows back through the cast to the float32 parameters) and the
output of every normalisation layer, which Flax promotes to float32 by its
float32 statistics, is cast back to it. Under float32 it is a plain
``module.apply``: not one extra operation.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

PRECISIONS = ("float32", "bfloat16", "auto")
_NORMS = ("BatchNorm", "LayerNorm", "GroupNorm", "RMSNorm")


def resolve(precision: str, backend: str | None = None) -> str:
  """``float32`` or ``bfloat16``: what ``precision`` means on ``backend``
  (default: JAX's default backend)."""
  if precision not in PRECISIONS:
    raise ValueError(f"precision: one of {', '.join(PRECISIONS)}, got {precision!r}")
  if precision != "auto":
    return precision
  return "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"


def tree_bytes(tree) -> int:
  """Bytes of every array of ``tree`` (from shapes and dtypes: abstract trees too)."""
  return int(sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


def itemsize(precision: str) -> int:
  """Bytes of one activation value in the (resolved) ``precision``."""
  return jnp.dtype(precision).itemsize


def _cast(tree, dtype):
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                      tree)


def _norm_output_to(dtype):
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and type(context.module).__name__ in _NORMS:
      out = _cast(out, dtype)
    return out
  return interceptor


def apply(module, variables: dict, x, precision: str, **kwargs):
  """``module.apply(variables, x, **kwargs)`` under ``precision`` (resolved):
  in bfloat16 the float parameters and ``x`` are cast to it and so are the
  normalisation layers' outputs; the batch statistics stay float32."""
  if precision == "float32":
    return module.apply(variables, x, **kwargs)
  import flax.linen as nn
  dtype = jnp.dtype(precision)
  variables = dict(variables, params=_cast(variables["params"], dtype))
  with nn.intercept_methods(_norm_output_to(dtype)):
    return module.apply(variables, _cast(x, dtype), **kwargs)
