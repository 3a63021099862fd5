"""Run one client update over many clients, with swappable backends.

Modelled on FedJAX's ``for_each_client``: a client update is written once as
three pure functions,

* ``init(common, state) -> carry``
* ``step(common, carry, x) -> carry``   (one minibatch; ``x`` is one row of ``xs``)
* ``final(common, carry) -> output``

and a backend runs it for every client of a stack (pytrees with a leading
client axis). ``common`` is the same for every client (the training images on
device, normalisation constants); ``states`` and ``xs`` carry the client axis.

Backends:

* ``vmap``:  one ``jit(vmap(...))`` over the whole stack;
* ``unrolled``: one jitted computation holding every client's step side by
  side (a Python loop over the client axis inside ``jit``, no ``vmap``): each
  client keeps ordinary convolutions, and XLA sees all of them at once;
* ``loop``:  a Python loop over clients calling one jitted single-client update;
* ``debug``: the same loop with no jit at all (step through it in a debugger).

Local steps run either as one ``lax.scan`` inside the compiled function or as a
host loop over the compiled step (``scan_steps``). A :class:`ClientRunner`
compiles its step once per input shape; ``num_traces`` counts traces of the
step so tests can check that a run does not recompile.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class ClientUpdate:
  """A client's local update as FedJAX writes one: ``init(common, state) ->
  carry``, ``step(common, carry, x) -> carry`` once per local step (``x``
  the step's input), ``final(common, carry) -> output``. ``common`` is what
  every client reads (the train set on device); :class:`ClientRunner` runs it
  over a stack of clients."""
  init: Callable[[Any, Any], Any]
  step: Callable[[Any, Any, Any], Any]
  final: Callable[[Any, Any], Any]


MODES = ("vmap", "unrolled", "loop", "debug")


def _unrolled(f):
  """``f`` over a leading client axis by a Python loop inside the trace."""
  def g(common, *args):
    k = jax.tree.leaves(args[0])[0].shape[0]
    return tree_stack([f(common, *[tree_slice(a, i) for a in args]) for i in range(k)])
  return g


# What ``mode = auto`` runs for Averaging, by backend (``cpu``, or
# ``accelerator`` for GPU and TPU) and resolved precision: (largest batch, mode)
# pairs, the first whose batch bound holds (None: any batch). The measurements
# behind each row, with their commands, are in docs/performance.md
# ("Throughput"); experiments/gpu_check.py measures every entry of the
# accelerator rows and says where its figures disagree with this table.
AUTO_MODE = {
    ("cpu", "float32"): ((None, "unrolled"),),
    ("cpu", "bfloat16"): ((None, "unrolled"),),
    ("accelerator", "float32"): ((None, "loop"),),
    ("accelerator", "bfloat16"): ((None, "loop"),),
}


def auto_mode(precision: str, batch: int, backend: str | None = None) -> str:
  """The Averaging execution ``AUTO_MODE`` gives for ``precision`` (resolved:
  float32 or bfloat16) and ``batch`` on ``backend`` (default: JAX's)."""
  kind = "cpu" if (backend or jax.default_backend()) == "cpu" else "accelerator"
  for bound, mode in AUTO_MODE[(kind, precision)]:
    if bound is None or batch <= bound:
      return mode
  raise ValueError(f"AUTO_MODE[{(kind, precision)}]: no entry for batch {batch}")


def resolve_mode(mode: str, strategy: str = "averaging", shard_clients: bool = False,
                 precision: str = "float32", batch: int = 32) -> str:
  """The execution mode of a run, decided here only. ``auto``: ``loop`` for
  Sequential (it trains one client at a time: one server part serves them all);
  for Averaging what experiments/bench_throughput.py measured fastest on
  this backend at this precision and batch (:data:`AUTO_MODE`), except that
  ``vmap`` replaces ``loop`` where the client axis is laid over a mesh
  (``shard_clients``). ``precision`` is the resolved one (float32 or bfloat16).
  """
  if mode != "auto":
    return mode
  if strategy == "sequential":
    return "loop"
  best = auto_mode(precision, batch)
  return "vmap" if shard_clients and best == "loop" else best


# Clients per compiled call when ``client_chunk = 0``. CPU: 2, the fastest of
# experiments/bench_fleet.py's chunk sweep, which compiles least (an unrolled
# program grows with its chunk; docs/performance.md, Fleets). Accelerators:
# ``auto`` runs ``loop`` there (one call per client whatever the chunk); for
# ``vmap`` or ``unrolled`` chosen by hand a chunk of 32 (not measured by chunk).
AUTO_CHUNK = {"cpu": 2}
AUTO_CHUNK_ACCELERATOR = 32


def resolve_chunk(chunk: int) -> int:
  """Clients per chunk: ``chunk``, or the backend's default for 0. A chunk is
  one compiled call in ``vmap``/``unrolled``, one call per client in ``loop``."""
  if chunk:
    return chunk
  return AUTO_CHUNK.get(jax.default_backend(), AUTO_CHUNK_ACCELERATOR)


# A rest of at most this many clients runs unpadded (chunk_plan).
EXACT_CHUNK_SIZES = 4


def chunk_plan(n: int, chunk: int, pad: bool) -> list[tuple[int, int]]:
  """Split ``n`` clients into calls of at most ``chunk``: (real, size) pairs.

  Full chunks, then the rest. With ``pad`` (sampled cohorts in a stacked
  mode, whose group sizes change from round to round) a rest above
  ``EXACT_CHUNK_SIZES`` is padded with zero-weight clients up to the next
  power of two, so at most ``EXACT_CHUNK_SIZES + log2(chunk / 4)`` sizes
  compile per cut and serve every round; a rest of 1..4 runs as it is (no
  wasted clients at a chunk of 4). Without ``pad`` (the same clients every
  round, or one call per client) the rest runs unpadded.
  """
  out = [(chunk, chunk)] * (n // chunk)
  rest = n % chunk
  if rest:
    size = rest
    if pad and rest > EXACT_CHUNK_SIZES:
      size = min(chunk, 1 << math.ceil(math.log2(rest)))
    out.append((rest, size))
  return out


def blocks(positions: np.ndarray, chunk: int, pad: bool):
  """``positions`` (of clients in a cohort) in calls of :func:`chunk_plan`:
  yields ``(padded, real)``, the positions of one call padded to its size
  by repeating the first (their results are dropped), and how many are real
  (after FedJAX's ``_blockify``)."""
  start = 0
  for real, size in chunk_plan(len(positions), chunk, pad):
    pos = positions[start:start + real]
    start += real
    yield np.concatenate([pos, np.full(size - real, pos[0])]), real


class ClientMesh:
  """The devices as one ``clients`` mesh axis (``shard_clients``): a chunk of
  clients is laid over it when its size divides evenly, else replicated."""

  def __init__(self, devices):
    self.mesh = jax.sharding.Mesh(np.asarray(devices), ("clients",))
    self.sharded_chunks = 0   # chunks laid over the mesh (a count for tests)

  def _sharding(self, k: int) -> NamedSharding:
    return NamedSharding(self.mesh, P("clients") if k % self.mesh.devices.size == 0 else P())

  def place(self, tree, k: int):
    """``tree`` (a chunk of ``k`` clients on the leading axis) on the mesh."""
    sharding = self._sharding(k)
    self.sharded_chunks += sharding.spec == P("clients")
    return jax.device_put(tree, sharding)

  def constrain(self, tree):
    """Inside a compiled program: ``tree`` (a chunk on the leading axis) laid
    out as :meth:`place` lays it."""
    k = jax.tree.leaves(tree)[0].shape[0]
    return jax.lax.with_sharding_constraint(tree, self._sharding(k))


# The tree helpers are jitted: one dispatch for the whole tree instead of one
# per leaf (a client state has ~170 leaves; experiments/ab_cpu_speedups.py).
@jax.jit
def tree_slice(tree, i):
  """Client ``i`` of a stacked tree."""
  return jax.tree.map(lambda a: a[i], tree)


@jax.jit
def tree_stack(trees):
  """A list of trees stacked on a new leading client axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


class ClientRunner:
  """Runs a :class:`ClientUpdate` (init / step / final) for one client or a stack of them.

  Args:
    update: the client update, e.g. :func:`hsee_jax.split_update`.
    mode: how a stack of clients is run: ``vmap`` (one batched program),
      ``unrolled`` (the clients side by side in one program), ``loop`` (one
      client at a time), ``debug`` (no jit), or ``auto`` (the backend's best;
      docs/design.md).
    scan_steps: see below; None picks the backend's default.

  Call :meth:`one` for a single client and the runner itself for a stack;
  both return ``update.final``'s output.

  ``scan_steps``: run the local steps as one ``lax.scan`` inside the compiled
  function (fewer dispatches; the default on accelerators) or as a host loop
  over a compiled step (the default on CPU, where XLA:CPU ran the split step
  inside a while loop far slower than called from the host; docs/design.md).
  """

  def __init__(self, update: ClientUpdate, mode: str, scan_steps: bool | None = None):
    self.update = update
    self.mode = resolve_mode(mode)
    if self.mode not in MODES:
      raise ValueError(f"unknown execution mode {mode!r}; expected auto or one of {MODES}")
    self.scan_steps = (jax.default_backend() != "cpu") if scan_steps is None else scan_steps
    self.num_traces = 0
    if self.mode == "debug":
      self._init, self._step, self._final = update.init, update.step, update.final
    else:
      client_axis = {"vmap": lambda f, n: jax.vmap(f, in_axes=(None,) + (0,) * n),
                     "unrolled": lambda f, n: _unrolled(f),
                     "loop": lambda f, n: f}[self.mode]
      # the update over the client axis, traceable (chunk_program fuses these)
      self._stack_init = client_axis(update.init, 1)
      self._stack_final = client_axis(update.final, 1)
      self._stack_whole = client_axis(self._scanned, 2)
      self._init = jax.jit(self._stack_init)
      self._step = jax.jit(client_axis(self._counted_step, 2))
      self._final = jax.jit(self._stack_final)
      self._whole = jax.jit(self._stack_whole)

  def _counted_step(self, common, carry, x):
    self.num_traces += 1  # Python runs this only while tracing
    return self.update.step(common, carry, x)

  def _scanned(self, common, state, xs):
    carry = self.update.init(common, state)
    carry, _ = jax.lax.scan(lambda c, x: (self._counted_step(common, c, x), None), carry, xs)
    return self.update.final(common, carry)

  def _run(self, common, state, xs, step_axis: int):
    """Whole local update; ``xs`` has its step axis at ``step_axis``."""
    if self.scan_steps and self.mode != "debug":
      return self._whole(common, state, xs)  # per client, xs is [steps, ...]
    return self._final(common, self._steps(common, self._init(common, state), xs, step_axis))

  def _steps(self, common, carry, xs, step_axis: int):
    """The host loop over the compiled step."""
    for s in range(jax.tree.leaves(xs)[0].shape[step_axis]):
      carry = self._step(common, carry, jax.tree.map(lambda a: a[(slice(None),) * step_axis + (s,)], xs))
    return carry

  def chunk_program(self, prepare: Callable, finish: Callable, constrain: Callable | None = None):
    """A chunk's local update fused with what comes before and after it.

    Args:
      prepare: ``prepare(read, owned) -> states``, the chunk's client states
        (leading client axis) from what the caller reads and owns.
      finish: ``finish(outputs, read, owned) -> owned``, ``final``'s stacked
        outputs taken back into what the caller owns.
      constrain: applied to the prepared states inside the program (a
        sharding constraint, :meth:`ClientMesh.constrain`), or None.
    Returns:
      ``run(common, read, owned, xs) -> owned``, ``xs`` as for a stack
      ([clients, steps, ...]). ``owned`` is donated: its buffers are reused
      for the result, the caller's copy is deleted.

    Compiled calls per chunk: in ``vmap`` and ``unrolled`` with scanned
    steps one (prepare, the steps and finish in one program); with the host
    loop over steps, one per step plus two (prepare fused into ``init``,
    ``final`` into finish). ``loop`` runs one client per call by design:
    prepare, the clients, finish (donated); ``debug`` compiles nothing.
    """
    place = constrain or (lambda tree: tree)
    if not self.stacked:
      begin = prepare if self.mode == "debug" else jax.jit(prepare)
      end = finish if self.mode == "debug" else jax.jit(finish, donate_argnums=2)
      return lambda common, read, owned, xs: end(self(common, begin(read, owned), xs), read, owned)

    def chunk(common, read, owned, xs):
      return finish(self._stack_whole(common, place(prepare(read, owned)), xs), read, owned)

    def chunk_begin(common, read, owned):
      return self._stack_init(common, place(prepare(read, owned)))

    def chunk_end(common, carry, read, owned):
      return finish(self._stack_final(common, carry), read, owned)

    if self.scan_steps:
      return jax.jit(chunk, donate_argnums=2)
    begin, end = jax.jit(chunk_begin), jax.jit(chunk_end, donate_argnums=3)
    return lambda common, read, owned, xs: end(
        common, self._steps(common, begin(common, read, owned), xs, 1), read, owned)

  @property
  def stacked(self) -> bool:
    """Whether one compiled call serves the whole client stack."""
    return self.mode in ("vmap", "unrolled")

  def one(self, common, state, xs):
    """A single client's local update.

    Args:
      common: what every client reads (:class:`hsee_jax.TrainSet` for the split update).
      state: the client's state (``update.init``'s input), no client axis.
      xs: the per-step inputs stacked on a leading step axis [steps, ...].
    Returns:
      ``update.final``'s output for this client.
    """
    if self.stacked:
      add = lambda t: jax.tree.map(lambda a: a[None], t)
      return tree_slice(self._run(common, add(state), add(xs), 1), 0)
    return self._run(common, state, xs, 0)

  def __call__(self, common, states, xs):
    """Every client of a stack: as :meth:`one`, with a leading client axis
    on ``states`` and on ``xs`` ([clients, steps, ...]); returns the outputs
    stacked on that axis."""
    if self.stacked:
      return self._run(common, states, xs, 1)
    k = jax.tree.leaves(xs)[0].shape[0]
    return tree_stack([self._run(common, tree_slice(states, i), _host_or_device_slice(xs, i), 0)
                       for i in range(k)])


def _host_or_device_slice(tree, i):
  """Client ``i``: host (numpy) inputs are sliced on the host, for free; device
  arrays by one jitted call."""
  if all(isinstance(a, np.ndarray) for a in jax.tree.leaves(tree)):
    return jax.tree.map(lambda a: a[i], tree)
  return tree_slice(tree, i)
