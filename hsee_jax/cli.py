"""Command line.

    hsee train --config configs/<name>.py [--set key=value ...] --out DIR [--overwrite]
    hsee train --resume DIR [--config ... --set ...]
    hsee eval --run DIR [--round N]
    hsee sweep --config configs/<name>.py --grid key=v1,v2 [--grid ...] --seeds 0,1,2 --out DIR
    hsee sweep --resume DIR
    ... --distributed [--coordinator HOST:PORT --num-processes N --process-id I]
"""
from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import traceback
from pathlib import Path

from hsee_jax import config as config_lib
from hsee_jax import stopping


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="hsee", description="Hetero-SplitEE in JAX/Flax")
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train a Hetero-SplitEE run, or resume one")
  t.add_argument("--config", help="a configs/*.py file defining get_config() "
                 "(with --resume: defaults to the run's config.json)")
  t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config field (repeatable), e.g. --set rounds=20")
  t.add_argument("--out", help="output directory for metrics, summary and checkpoints")
  t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
  t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its newest checkpoint")
  for q in (t,):
    q.add_argument("--variant", dest="variants", action="append", default=[], metavar="SPEC",
                   help="your own method: FILE.py[:NAME] (NAME defaults to variant) or "
                        "module:NAME, an hsee_jax.variants.Variant (repeatable; recorded in "
                        "config.json, so --resume and eval load it again)")
    q.add_argument("--strategy", metavar="SPEC",
                   help="a strategy of your own: FILE.py[:NAME] (NAME defaults to strategy) or "
                        "module:NAME, a function Context -> Algorithm (recorded in config.json)")
  w = sub.add_parser("sweep", help="train a grid of configs x seeds, one run directory each")
  w.add_argument("--config", help="the base config (a configs/*.py file)")
  w.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                 help="a swept field and its values (repeatable; the grid is their product)")
  w.add_argument("--seeds", help="comma list of seeds, each run for every grid point (default 0)")
  w.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a base config field (repeatable)")
  w.add_argument("--out", help="the sweep directory")
  w.add_argument("--overwrite", action="store_true", help="start again over a sweep in --out")
  w.add_argument("--resume", metavar="DIR", help="finish every unfinished run of the sweep in DIR")
  w.add_argument("--stack", help=argparse.SUPPRESS)  # removed; said plainly in _sweep
  w.add_argument("--variant", dest="variants", action="append", default=[], metavar="SPEC",
                 help="your own method for every run (as for train; repeatable)")
  w.add_argument("--strategy", metavar="SPEC", help="a strategy of your own for every run "
                                                    "(as for train)")
  r = w.add_argument_group("runs as Ray tasks (the extra: pip install -e '.[ray]')")
  r.add_argument("--workers", type=int, metavar="N",
                 help="train N runs at a time, each a Ray task with its share of the machine "
                      "(a Ray started in this process unless --ray-address)")
  r.add_argument("--ray-address", metavar="ADDR",
                 help="an existing Ray cluster (or RAY_ADDRESS); the sweep directory must be "
                      "on a filesystem every node sees")
  r.add_argument("--stop-early", choices=["asha"],
                 help="stop the runs Ray Tune's ASHA ranks hopeless at their evaluations "
                      "(with --workers or --ray-address); the tables mark them")
  r.add_argument("--metric", help="what ASHA ranks the runs by (default mean_full_acc; "
                                  "mean_exit_acc, exit_acc_cut<l>, full_acc_cut<l>)")
  r.add_argument("--gpus-per-run", type=float, metavar="F",
                 help="GPUs per run (default 1 where there are GPUs; 0.25: four runs per GPU, "
                      "each preallocating a quarter of its memory)")
  for q in (t, w):
    d = q.add_argument_group("several processes (jax.distributed)")
    d.add_argument("--distributed", action="store_true",
                   help="join the other processes of this job first (every process runs "
                        "the same command); the cluster is detected on TPU pods, SLURM and "
                        "Open MPI, else give the three options below")
    d.add_argument("--coordinator", metavar="HOST:PORT",
                   help="process 0's host and a free port (or JAX_COORDINATOR_ADDRESS)")
    d.add_argument("--num-processes", type=int, metavar="N", help="(or HSEE_NUM_PROCESSES)")
    d.add_argument("--process-id", type=int, metavar="I", help="(or HSEE_PROCESS_ID)")
    d.add_argument("--distributed-timeout", type=int, default=300, metavar="S",
                   help="seconds to wait for the coordinator (default 300)")
  e = sub.add_parser("eval", help="test metrics of a run's checkpoint, without training")
  e.add_argument("--run", required=True, metavar="DIR", help="a run directory")
  e.add_argument("--round", type=int, default=None,
                 help="the checkpoint after this many rounds (default: the newest)")
  return p


def _with_variants(cfg: config_lib.Config, specs: list[str],
                   strategy: str | None = None) -> config_lib.Config:
  """``cfg`` with the ``--variant`` specs added and the ``--strategy`` spec
  set (file paths made absolute)."""
  if not specs and not strategy:
    return cfg
  from hsee_jax import variants
  import dataclasses
  return dataclasses.replace(
      cfg, variants=cfg.variants + tuple(map(variants.canonical, specs)),
      strategy=variants.canonical(strategy, "strategy") if strategy else cfg.strategy)


def _train_config(args) -> tuple[config_lib.Config, Path]:
  cfg, out = _train_config_of(args)
  return _with_variants(cfg, args.variants, args.strategy), out


def _train_config_of(args) -> tuple[config_lib.Config, Path]:
  if args.resume:
    out = Path(args.resume)
    if args.out and Path(args.out).resolve() != out.resolve():
      raise config_lib.ConfigError("--resume DIR and --out name different directories")
    if args.config:
      return config_lib.load(args.config, args.overrides), out
    from hsee_jax import rundir
    try:
      cfg = rundir.load_config(out)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"--resume: {e}") from None
    return config_lib.override(cfg, args.overrides), out
  if not args.config or not args.out:
    raise config_lib.ConfigError("train needs --config and --out (or --resume DIR)")
  return config_lib.load(args.config, args.overrides), Path(args.out)


def _sweep(args) -> None:
  from hsee_jax import sweep
  if args.stack is not None:
    raise config_lib.ConfigError("--stack: stacking the runs of a sweep was removed (it measured "
                                 "slower than one run after another); drop the flag")
  launcher = None
  if (args.stop_early or args.metric) and not (args.workers or args.ray_address):
    raise config_lib.ConfigError(f"{'--stop-early' if args.stop_early else '--metric'}: runs on "
                                 f"Ray; give --workers N or --ray-address ADDR")
  if args.metric and not args.stop_early:
    raise config_lib.ConfigError("--metric: is what --stop-early asha ranks runs by; give both")
  if args.workers is not None or args.ray_address or args.gpus_per_run is not None:
    from hsee_jax import ray_sweep
    if args.distributed:
      raise config_lib.ConfigError("--workers / --ray-address: a sweep on Ray places its runs "
                                   "itself; drop --distributed")
    placement = ray_sweep.Placement(args.workers or 1, args.ray_address, args.gpus_per_run)
    ray_sweep.import_ray()
    launcher = functools.partial(ray_sweep.train_runs, placement=placement)
    if args.stop_early:
      from hsee_jax import tune
      tune.import_tune()
      launcher = functools.partial(tune.train_runs, placement=placement,
                                   metric=args.metric or "mean_full_acc")
  if args.resume:
    given = [o for o, v in (("--config", args.config), ("--grid", args.grid), ("--out", args.out),
                            ("--seeds", args.seeds), ("--overwrite", args.overwrite),
                            ("--variant", args.variants), ("--strategy", args.strategy)) if v]
    if given:
      raise config_lib.ConfigError(f"sweep --resume DIR takes no {', '.join(given)} (the plan "
                                   f"is in DIR/sweep.json; --set rounds=N extends every run)")
    sweep.resume_sweep(args.resume, overrides=args.overrides, launcher=launcher)
    return
  if not args.config or not args.out:
    raise config_lib.ConfigError("sweep needs --config and --out (or --resume DIR)")
  base = _with_variants(config_lib.load(args.config, args.overrides), args.variants,
                        args.strategy)
  sweep.run_sweep(base, sweep.parse_grid(args.grid), sweep.parse_seeds(args.seeds or "0"),
                  args.out, overwrite=args.overwrite, launcher=launcher)


def main(argv: list[str] | None = None) -> int:
  """The ``hsee`` command. Exit codes: 0 done; 1 the machine refused a write
  (a full disk: one line on stderr naming the newest checkpoint that
  restores); 2 a user error (one line on stderr); 128 + signal number after SIGINT (130) or SIGTERM (143)."""
  try:
    with stopping.early_signals():
      return _main(argv)
  except (KeyboardInterrupt, stopping.Early) as e:  # before any work began (parsing, imports)
    signum = getattr(e, "signum", signal.SIGINT)
    print(f"hsee: {signal.Signals(signum).name}: stopped before any work began; nothing was "
          f"written", file=sys.stderr, flush=True)
    return 128 + signum


def entry() -> None:
  """The console script: :func:`main`, then the exit. After a signal (exit
  code above 128) the process ends without the interpreter's teardown: every
  file is closed and every lock released by then, and tearing Python down
  under XLA's and orbax's still-running threads can crash it (exit 139)."""
  code = main()
  if code > 128:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


def _main(argv: list[str] | None) -> int:
  args = _parser().parse_args(argv)
  # Imported late so that --help and config errors answer without loading JAX.
  from hsee_jax import rundir
  from hsee_jax.data import DataError
  from hsee_jax.train import RunError, evaluate_run, train
  from hsee_jax import distributed
  _quiet_library_logs()
  stopping.check_early()   # a signal during the imports, swallowed where it was raised
  try:
    if args.command in ("train", "sweep"):
      given = [o for o, v in (("--coordinator", args.coordinator),
                              ("--num-processes", args.num_processes),
                              ("--process-id", args.process_id)) if v is not None]
      if given and not args.distributed:
        raise config_lib.ConfigError(f"{', '.join(given)} needs --distributed")
      if args.distributed:
        if args.coordinator and args.process_id == 0:  # XLA ends it, in many lines, on failure
          print(f"hsee: process 0 of {args.num_processes}: coordinator at {args.coordinator}, "
                f"waiting up to {args.distributed_timeout} s for the others",
                file=sys.stderr, flush=True)
        distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               args.distributed_timeout)
    if args.command == "train":
      cfg, out = _train_config(args)
      train(cfg, out, overwrite=args.overwrite, resume=bool(args.resume))
    elif args.command == "sweep":
      _sweep(args)
    else:
      evaluate_run(args.run, args.round)
  except (config_lib.ConfigError, DataError, RunError, distributed.DistributedError) as e:
    code = getattr(e, "exit_code", 2)   # 1: the machine refused a write (rundir.WriteError)
    distributed.yield_to_watcher()
    distributed.fail(f"{e}", code)  # several processes: the others stop too
    return code
  except stopping.Stopped as e:
    if args.command == "sweep":
      e = stopping.Stopped(e.signum, e.rounds_done, e.out, sweep=args.resume or args.out,
                           note=e.note)
    print(f"hsee: {e}", file=sys.stderr)
    return 128 + e.signum
  except (stopping.Abandoned, KeyboardInterrupt, stopping.Early) as e:
    signum = getattr(e, "signum", signal.SIGINT)
    if args.command == "eval":
      print(f"hsee: {signal.Signals(signum).name}: evaluation stopped; nothing was written",
            file=sys.stderr, flush=True)
      return 128 + signum
    out = getattr(e, "out", None)
    last = rundir.RunDir(out).last_checkpoint() if out is not None else "none"
    where = f"; last checkpoint: {last}; resume with: hsee train --resume {out}" if last != "none" else ""
    # a KeyboardInterrupt came before the run's signal handlers were set (JAX
    # starting, the run directory being locked): no round was in flight
    what = ("the round in flight is lost" if isinstance(e, stopping.Abandoned) else
            "before any round began")
    message = f"{signal.Signals(signum).name}: stopped at once, {what}{where}"
    print(f"hsee: {message}", file=sys.stderr, flush=True)
    distributed.stop_all(message, 128 + signum)  # several processes: the others stop too
    return 128 + signum
  except Exception as e:  # a bug: its traceback (several processes: the others stop too)
    if distributed.several_processes():
      distributed.yield_to_watcher()
      traceback.print_exc()
      from hsee_jax.checkpoint import first_line
      distributed.fail(first_line(e), 1)
    raise
  return 0


def _quiet_library_logs() -> None:
  """orbax logs its failures with whole tracebacks (thousands of lines on a
  full disk); hsee reports them in one line, so library logs below CRITICAL
  stay off the terminal."""
  import logging
  for name in ("absl", "asyncio"):  # absl: orbax's logger
    logger = logging.getLogger(name)
    logger.propagate = False           # hsee's handlers on it still see every record
    logger.addHandler(logging.NullHandler())
  # After a failed save or restore, orbax's abandoned coroutines and
  # TensorStore's posts to orbax's closed event loop surface as "unraisable"
  # exceptions when collected (hundreds of tracebacks on a full disk); the
  # failure itself is reported in one line.
  default = sys.unraisablehook

  def from_orbax(unraisable) -> bool:
    if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
      return True
    tb = unraisable.exc_traceback
    while tb is not None:
      if "/orbax/" in tb.tb_frame.f_code.co_filename:
        return True
      tb = tb.tb_next
    return False

  def hook(unraisable):
    if not from_orbax(unraisable):
      default(unraisable)
  sys.unraisablehook = hook


if __name__ == "__main__":
  entry()
