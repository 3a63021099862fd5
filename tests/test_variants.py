"""Your own method as a value (hsee_jax.variants): specs loaded from files
and modules, hooks traced before any data is loaded, and a variant run
through every command (train, SIGKILL + --resume, eval, sweep) from the
run's config.json."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from hsee_jax import cli, train, variants
from hsee_jax import config as config_lib
from hsee_jax.config import Config, ConfigError
from hsee_jax.variants import Variant, VariantError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "depthfl_sum.py"
FEDBN = REPO / "examples" / "fedbn.py"
CONFIG = """from hsee_jax.config import Config
def get_config():
  return Config(dataset="synthetic", synthetic_shape=(16, 16, 4, 64, 32), width=0.0625,
                cuts=(2, 4), batch_size=8, local_steps=1, rounds=3, augment=False, mode="loop",
                eval_every=3, checkpoint_every=1, eval_batch_size=32, client_exits="every")
"""


def _records(run):
  return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_s")}
          for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def cfg_file(tmp_path):
  path = tmp_path / "cfg.py"
  path.write_text(CONFIG)
  return path


def test_specs_load_from_files_and_modules_and_fail_in_one_line(tmp_path):
  assert variants.load(str(EXAMPLE)).name == "depthfl_sum"
  assert variants.load(f"{EXAMPLE}:variant").objective is not None
  (tmp_path / "mine.py").write_text("from hsee_jax import Variant\n"
                                    "def make():\n  return Variant(name='made')\n"
                                    "other = Variant(name='other')\nnumber = 3\n")
  assert variants.load(f"{tmp_path / 'mine.py'}:make").name == "made"     # a factory
  assert variants.load(f"{tmp_path / 'mine.py'}:other").name == "other"
  assert variants.canonical(str(EXAMPLE.relative_to(Path.cwd()))
                            if EXAMPLE.is_relative_to(Path.cwd()) else str(EXAMPLE)) == \
      f"{EXAMPLE}:variant"
  assert variants.canonical("some.module:thing") == "some.module:thing"
  (tmp_path / "broken.py").write_text("def (:\n")
  for spec, msg in [(str(tmp_path / "none.py"), "no file"),
                    (f"{tmp_path / 'mine.py'}:nope", "it defines no nope"),
                    (f"{tmp_path / 'mine.py'}:number", "number is a int, not an hsee_jax"),
                    (str(tmp_path / "broken.py"), "syntax error at line 1"),
                    ("hsee_jax.config:Config", "Config is a type, not an hsee_jax"),
                    ("no_such_module_xyz:thing", "ModuleNotFoundError")]:
    with pytest.raises(VariantError) as e:
      variants.load(spec)
    assert str(e.value).startswith(f"variant {spec}: ") and msg in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_chain_composes_one_objective_and_every_penalty():
  import jax.numpy as jnp
  one = lambda exits, final, labels, hp: jnp.float32(1.0)
  two = lambda exits, final, labels, hp: jnp.float32(2.0)
  v = variants.chain(Variant("a", objective=one), Variant("b", penalty=two),
                     Variant("c", penalty=two))
  assert v.name == "a+b+c" and v.objective is one and float(v.penalty([], None, None, {})) == 4.0
  with pytest.raises(VariantError, match="variants a and b both replace the client objective"):
    variants.chain(Variant("a", objective=one), Variant("b", objective=two))


@pytest.mark.parametrize("body,msg", [
    ("lambda exits, labels, hp: 0.0", "objective(exits, final, labels, hp) fails on abstract "
     "inputs: TypeError"),
    ("lambda exits, final, labels, hp: optax_free_per_image(exits, labels)",
     "objective must return one number (a scalar loss), got shape (8,)"),
    ("lambda exits, final, labels, hp: hp[3]", "fails on abstract inputs: KeyError"),
])
def test_a_wrong_hook_is_one_line_before_any_data_is_loaded(tmp_path, body, msg):
  (tmp_path / "bad.py").write_text(
      "import jax.numpy as jnp\nfrom hsee_jax import Variant\n"
      "def optax_free_per_image(exits, labels):\n  return -exits[0][jnp.arange(8), labels]\n"
      f"variant = Variant(name='bad', objective={body})\n")
  # cifar100 from a folder that does not exist: loading data would fail otherwise
  cfg = Config(dataset="cifar100", data_dir=str(tmp_path / "nowhere"), batch_size=8,
               variants=(str(tmp_path / "bad.py"),))
  with pytest.raises(VariantError) as e:
    train.build(cfg)
  assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("example", [EXAMPLE, pytest.param(FEDBN, marks=pytest.mark.long)],
                         ids=["depthfl_sum", "fedbn"])
def test_a_variant_through_train_eval_sweep_and_a_resume_it_no_longer_loads(
    tmp_path, cfg_file, capsys, example):
  run = tmp_path / "run"
  assert cli.main(["train", "--config", str(cfg_file), "--variant",
                   str(example.relative_to(REPO)), "--out", str(run)]) == 0
  saved = json.loads((run / "config.json").read_text())
  assert saved["variants"] == [f"{example}:variant"]
  assert f"variants variants={example}:variant" in capsys.readouterr().out   # the header says so
  # the run trained with the variant's hooks (the client runners were built with them)
  _, sim = train.build(config_lib.read_json_config(run / "config.json"))
  loaded = variants.load(saved["variants"][0])
  assert (sim.ctx.objective, sim.ctx.grouping) == (loaded.objective, loaded.grouping)
  # eval rebuilds it from config.json
  capsys.readouterr()
  assert cli.main(["eval", "--run", str(run)]) == 0
  assert json.loads((run / "eval_round3.json").read_text())["test"] == \
      json.loads((run / "summary.json").read_text())["test"]
  # a sweep of two seeds, each run recording the spec
  sw = tmp_path / "sweep"
  assert cli.main(["sweep", "--config", str(cfg_file), "--variant", str(example), "--seeds", "0,1",
                   "--out", str(sw)]) == 0
  for seed in (0, 1):
    assert json.loads((sw / "base" / f"seed{seed}" / "config.json").read_text())["variants"] == \
        [f"{example}:variant"]
  assert _records(sw / "base" / "seed0") == _records(run)
  # the spec of a run whose file is gone: one line naming it
  mine = tmp_path / "mine.py"
  shutil.copy(EXAMPLE, mine)
  other = tmp_path / "other"
  assert cli.main(["train", "--config", str(cfg_file), "--variant", str(mine), "--set",
                   "rounds=1", "--out", str(other)]) == 0
  mine.unlink()
  capsys.readouterr()
  assert cli.main(["train", "--resume", str(other), "--set", "rounds=2"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"variant {mine}:variant: no file {mine}" in err, err


@pytest.mark.long
@pytest.mark.parametrize("example", [EXAMPLE, FEDBN], ids=["depthfl_sum", "fedbn"])
def test_a_variant_run_killed_mid_save_resumes_bit_for_bit(tmp_path, cfg_file, example):
  straight, run = tmp_path / "straight", tmp_path / "run"
  assert cli.main(["train", "--config", str(cfg_file), "--variant", str(example),
                   "--out", str(straight)]) == 0
  env = {**os.environ, "PYTHONUNBUFFERED": "1", "HSEE_FAULT_KILL_DURING_SAVE": "2"}
  r = subprocess.run([sys.executable, "-m", "hsee_jax", "train", "--config", str(cfg_file),
                      "--variant", str(example), "--out", str(run)], cwd=tmp_path, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == -9, r.stderr
  env.pop("HSEE_FAULT_KILL_DURING_SAVE")
  r = subprocess.run([sys.executable, "-m", "hsee_jax", "train", "--resume", str(run)],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0 and "resuming" in r.stdout, r.stderr
  assert _records(run) == _records(straight)


FEDBN_CFG = Config(dataset="synthetic", synthetic_shape=(16, 16, 4, 96, 32), width=0.0625,
                   cut_tiers=((2, 0.5), (4, 0.5)), num_clients=6, partition="dirichlet",
                   dirichlet_alpha=0.3, batch_size=8, local_steps=2, rounds=2, augment=False,
                   mode="loop", eval_every=2, eval_batch_size=32,
                   variants=(str(FEDBN),))


def test_local_leaves_pick_by_path_and_write_over_only_those():
  """parts.local_leaves / with_local, the grouping hook's two halves: the
  leaves a grouping keeps (by path, params and batch statistics alike),
  and a part with exactly those leaves written over, every other leaf and
  the structure as they were (empty subtrees kept)."""
  import jax.numpy as jnp
  from hsee_jax.optim import PartState
  from hsee_jax.strategies.parts import local_leaves, with_local
  sys.path.insert(0, str(FEDBN.parent))
  from fedbn import batch_norm_per_client
  part = PartState(
      params={"unit_1": {"Conv_0": {"kernel": jnp.ones(3)},
                         "BatchNorm_0": {"scale": jnp.ones(2), "bias": jnp.zeros(2)}},
              "exit_head": {"Dense_0": {"kernel": jnp.ones(2)}}},
      batch_stats={"unit_1": {"BatchNorm_0": {"mean": jnp.zeros(2), "var": jnp.ones(2)}},
                   "exit_head": {}}, opt_state={})
  mine = local_leaves(part, batch_norm_per_client, 1)
  assert mine.params == {"unit_1": {"BatchNorm_0": part.params["unit_1"]["BatchNorm_0"]}}
  assert mine.batch_stats == {"unit_1": part.batch_stats["unit_1"]}
  other = jax.tree.map(lambda a: a + 7, mine)
  over = with_local(part, other)
  assert float(over.params["unit_1"]["BatchNorm_0"]["bias"][0]) == 7.0
  assert float(over.batch_stats["unit_1"]["BatchNorm_0"]["var"][0]) == 8.0
  assert over.params["unit_1"]["Conv_0"]["kernel"] is part.params["unit_1"]["Conv_0"]["kernel"]
  assert over.params["exit_head"] == part.params["exit_head"] and over.batch_stats["exit_head"] == {}
  assert local_leaves(part, lambda path, cut: "unit", 1).params == {}


@pytest.mark.long
@pytest.mark.parametrize("aggregate_every", [1, 2])
def test_fedbn_keeps_batch_norm_per_client_and_averages_the_rest(aggregate_every):
  """examples/fedbn.py through train.build: after a round that aggregates,
  the clients of a cut hold the shared model's convolution kernels (the
  cross-layer average) but each its own batch norm scale, shift and
  statistics, and each is evaluated with its own (with per-client models
  between aggregations too, ``aggregate_every=2``)."""
  import jax
  import numpy as np
  from flax import traverse_util
  leaves = lambda part: traverse_util.flatten_dict({"params": part.params,
                                                    "batch_stats": part.batch_stats})
  cfg = dataclasses.replace(FEDBN_CFG, aggregate_every=aggregate_every, rounds=aggregate_every)
  _, sim = train.build(cfg)
  state = sim.init_state(jax.random.PRNGKey(0))
  for rnd in range(cfg.rounds):   # 0-based, as run_rounds calls it
    state, _, _ = sim.run_round(state, rnd, jax.random.PRNGKey(0))
  ids = [int(i) for i in sim.ctx.fleet.groups[2]]
  models = [m for m in sim.algorithm.eval_models(state) if m.cut == 2]
  assert len(ids) == 3 and [m.clients for m in models] == [(i,) for i in ids]
  shared = leaves(state.model)
  first, second = (leaves(m.client.merge(m.server)) for m in models[:2])
  norm = [k for k in first if k[0] == "batch_stats" or "BatchNorm" in "".join(k[2:])]
  assert norm and len(norm) < len(first)
  for k in first:
    if k[1].startswith("unit_"):   # the shared model holds units and classifier, not heads
      assert np.array_equal(np.asarray(first[k]), np.asarray(shared[k])) == (k not in norm), k
    assert np.array_equal(np.asarray(first[k]), np.asarray(second[k])) == (k not in norm), k


def test_a_grouping_that_answers_otherwise_is_one_line(tmp_path):
  (tmp_path / "g.py").write_text("from hsee_jax import Variant\n"
                                 "variant = Variant(name='g', grouping=lambda path, cut: 'layer')\n")
  cfg = dataclasses.replace(FEDBN_CFG, variants=(str(tmp_path / "g.py"),))
  with pytest.raises(VariantError) as e:
    train.build(cfg)
  assert str(e.value).startswith(f"variant {tmp_path / 'g.py'}: grouping(('params', ")
  assert "returned 'layer'; it answers one of 'unit', 'tier', 'side', 'client'" in str(e.value)
  assert "\n" not in str(e.value)
  (tmp_path / "half.py").write_text(
      "from hsee_jax import Variant\n"
      "variant = Variant(name='half', grouping=lambda path, cut: 'tier' if path[0] == 'params' "
      "else 'unit')\n")
  with pytest.raises(VariantError, match=r"grouping answers 'tier' and 'unit' for leaves of "
                                         r"unit_1 at cut 2; a unit goes to a tier or a side whole"):
    train.build(dataclasses.replace(FEDBN_CFG, variants=(str(tmp_path / "half.py"),)))
  with pytest.raises(ConfigError, match="needs strategy=averaging"):
    train.build(dataclasses.replace(FEDBN_CFG, strategy="sequential"))


# The fields of the built-in variants, which only hsee_jax/variants/ reads (config.py
# still declares them, beside the rest, until the config is in sections).
MOVED = ("client_exits", "exit_weights", "distill", "distill_weight", "distill_temperature",
         "distill_start", "prox_mu", "static_bn", "tier_local_top", "aggregate_sides")


def test_the_core_names_no_moved_variant_or_its_fields():
  """Outside hsee_jax/variants/ (and config.py's declarations) no module of
  the package reads a built-in variant's field or names its module: the
  core sees the variants only through their hooks."""
  import ast
  pkg = REPO / "hsee_jax"
  for path in pkg.rglob("*.py"):
    if "variants" in path.relative_to(pkg).parts or path.name == "config.py":
      continue
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
      named = (node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name)
               else node.arg if isinstance(node, ast.keyword) else
               node.value if isinstance(node, ast.Constant) and isinstance(node.value, str)
               and id(node) not in docs else None)
      assert named not in MOVED, f"{path.relative_to(REPO)}:{node.lineno} names {named}"
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
          "hsee_jax.variants."):
        assert path.name == "__init__.py" and path.parent == pkg, (path, node.module)


def test_the_builtin_variants_are_values_of_the_public_hooks():
  """Each built-in variant comes from its fields as a Variant; the same
  fields give the same value (compiled programs are shared); chained with
  a variant of one's own, its hooks compose."""
  cfg = Config(cuts=(3, 5, 7), client_exits="every", exit_weights="rising", distill="deepest",
               static_bn=True, prox_mu=0.1)
  given = variants.builtin(cfg)
  assert [v.name for v in given] == ["every-exit", "rising", "distill-deepest", "static-bn",
                                     "fedprox"]
  both = variants.builtin(Config(cuts=(3, 5), tier_local_top=True, aggregate_sides="apart"))
  assert [v.name for v in both] == ["tier-local-top", "sides-apart"]
  path = ("params", "unit_5", "Conv_0", "kernel")
  assert [v.grouping(path, 5) for v in both] == ["tier", "side"]
  assert variants.chain(*both).grouping(path, 5) == "tier"
  assert variants.chain(*both).grouping(("params", "classifier", "Dense_0", "kernel"), 5) == "unit"
  assert all(isinstance(v, Variant) for v in given)
  assert variants.builtin(dataclasses.replace(cfg, distill_weight=0.2)) == given  # an input
  v = variants.for_config(cfg)
  assert v is variants.for_config(cfg)
  assert v.exits(7, (3, 5, 7)) == (3, 5) and [h for h, _ in v.hparams] == ["distill_weight"]
  assert variants.builtin(Config()) == [] and variants.for_config(Config()) is None
  more = Variant("more", exits=lambda cut, cuts: tuple(c for c in cuts if c < cut)[-1:],
                 step_penalty=lambda p, s, hp: 1.0, downlink=lambda cfg, k, rnd: 7)
  both = variants.chain(v, more)
  assert both.exits(7, (3, 5, 7)) == (3, 5) and both.downlink(cfg, 10, 0) == 7
  two = variants.chain(more, Variant("two", step_penalty=lambda p, s, hp: 2.0))
  assert two.step_penalty(None, None, {}) == 3.0
  with pytest.raises(VariantError, match="hyperparameter distill_weight is given by two"):
    variants.chain(v, Variant("again", hparams=(("distill_weight", lambda c, r: 0.0),)))


@pytest.mark.parametrize("hooks,msg", [
    ("exits=lambda cut, cuts: (cut,)", "exits(2, (2, 4)) returned (2,); it answers a tuple"),
    ("exits=lambda cut: ()", "exits(2, (2, 4)) raised TypeError"),
    ("hparams=(('w', lambda cfg, rnd: 'x'),)", "hparams 'w' must give a number >= 0, got 'x'"),
    ("downlink=lambda cfg, classes, rnd: -1", "downlink(cfg, classes, round) must give a number"),
])
def test_a_wrong_exits_hparams_or_downlink_is_one_line(tmp_path, hooks, msg):
  (tmp_path / "bad.py").write_text(f"from hsee_jax.variants import Variant\n"
                                   f"variant = Variant(name='bad', {hooks})\n")
  cfg = Config(dataset="synthetic", cuts=(2, 4), variants=(str(tmp_path / "bad.py"),))
  with pytest.raises(VariantError) as e:
    train.build(cfg)
  assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_variant_of_ones_own_with_every_hook_trains_and_is_priced(tmp_path):
  """A user's variant with its own hyperparameter (read by its penalty), a
  step penalty, an extra exit, an evaluation transform and a downlink: it
  trains, the cohort carries its hyperparameter's column, the link carries
  its bytes and the evaluated networks are its transform's."""
  (tmp_path / "mine.py").write_text(
      "import jax.numpy as jnp\n"
      "from hsee_jax.variants import Variant\n"
      "variant = Variant(name='mine', hparams=(('w', lambda cfg, rnd: 0.5 * (rnd + 1)),),\n"
      "  penalty=lambda exits, final, labels, hp: hp['w'] * jnp.mean(exits[0] ** 2) * 0.0,\n"
      "  step_penalty=lambda p, s, hp: 0.0 * hp['w'],\n"
      "  exits=lambda cut, cuts: tuple(c for c in cuts if c < cut),\n"
      "  evaluated=lambda net, network, ts, seed: network.replace(batch_stats=network.batch_stats),\n"
      "  downlink=lambda cfg, classes, rnd: 40)\n")
  base = Config(dataset="synthetic", synthetic_shape=(16, 16, 4, 64, 32), width=0.0625,
                cuts=(2, 4), batch_size=8, local_steps=2, rounds=2, mode="loop",
                eval_batch_size=32, exit_thresholds=(0.5,))
  (tmp_path / "exits.py").write_text(
      "from hsee_jax.variants import Variant\n"
      "variant = Variant(name='exits', exits=lambda cut, cuts: tuple(c for c in cuts if c < cut))\n")
  _, plain = train.build(dataclasses.replace(base, variants=(str(tmp_path / "exits.py"),)))
  _, sim = train.build(dataclasses.replace(base, variants=(str(tmp_path / "mine.py"),)))
  key = jax.random.PRNGKey(0)
  c0, c1 = sim.cohort(0, key), sim.cohort(1, key)
  assert c0.hparams.shape[-1] == len(train.fleet_lib.HPARAMS) + 1
  assert (c0.hparams[:, -1] == 0.5).all() and (c1.hparams[:, -1] == 1.0).all()
  assert c0.bytes_sent - plain.cohort(0, key).bytes_sent == 2 * 2 * 8 * 40
  assert sim.ctx.exit_cuts(4) == (2,)
  state, metrics = sim.algorithm.apply(sim.init_state(key), c0)
  assert metrics.shape == (2, 4) and bool(jax.numpy.isfinite(metrics).all())
  assert "exit_head_at_2" in str(jax.tree_util.tree_structure(state.clients)) or \
      any("2" in k for k in state.exit_heads)


STRATEGY = REPO / "examples" / "fedavgm.py"


def test_a_strategy_of_ones_own_is_built_from_its_spec_or_refused_in_one_line(tmp_path):
  """The default run's check of a strategy of one's own (the long test runs
  it through every command): examples/fedavgm.py by its spec builds an
  Algorithm whose state carries its momentum beside Averaging's; a spec that
  does not load, or a function that returns no Algorithm, is one line."""
  from hsee_jax import Algorithm
  cfg = Config(dataset="synthetic", synthetic_shape=(16, 16, 4, 64, 32), width=0.0625,
               cuts=(2, 4), batch_size=8, mode="loop", strategy=f"{STRATEGY}:strategy")
  _, sim = train.build(cfg)
  assert isinstance(sim.algorithm, Algorithm)
  state, momentum = sim.abstract_state()
  assert jax.tree.structure(momentum) == jax.tree.structure(state.model.params)
  (tmp_path / "bad.py").write_text("def strategy(ctx):\n  return 3\n")
  (tmp_path / "none.py").write_text("x = 1\n")
  (tmp_path / "two.py").write_text("def strategy(ctx, other):\n  return ctx\n")
  for spec, msg in (("bad.py", "returned a int, not an hsee_jax.Algorithm"),
                    ("none.py", "it defines no strategy"),
                    ("two.py", "strategy must take one argument, the run's Context")):
    with pytest.raises((VariantError, train.RunError)) as e:
      train.build(dataclasses.replace(cfg, strategy=str(tmp_path / spec)))
    assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.long
def test_a_strategy_of_ones_own_through_train_resume_and_eval(tmp_path, capsys):
  """examples/fedavgm.py (Averaging with server momentum, state of its own)
  by `--strategy`: config.json records the spec, the first round's training
  is Averaging's and later rounds differ from it; `--resume` extends the run
  and `hsee eval` rebuilds it; a strategy that does not load or returns
  something else is one line before any data is loaded."""
  cfg = tmp_path / "cfg.py"
  cfg.write_text(CONFIG.replace(', client_exits="every"', "").replace("rounds=3", "rounds=2")
                 .replace("local_steps=1", "local_steps=2"))
  run, plain = tmp_path / "run", tmp_path / "plain"
  assert cli.main(["train", "--config", str(cfg), "--strategy", str(STRATEGY.relative_to(REPO)),
                   "--out", str(run)]) == 0
  assert f"{STRATEGY}:strategy" in capsys.readouterr().out   # the header names it
  assert json.loads((run / "config.json").read_text())["strategy"] == f"{STRATEGY}:strategy"
  assert cli.main(["train", "--config", str(cfg), "--out", str(plain)]) == 0
  mine, theirs = _records(run), _records(plain)
  assert mine[0]["train"] == theirs[0]["train"] and mine[1]["train"] != theirs[1]["train"]
  assert cli.main(["train", "--resume", str(run), "--set", "rounds=3"]) == 0
  assert [r["round"] for r in _records(run) if "train" in r] == [0, 1, 2]
  capsys.readouterr()
  assert cli.main(["eval", "--run", str(run)]) == 0
  assert json.loads((run / "eval_round3.json").read_text())["test"] == \
      json.loads((run / "summary.json").read_text())["test"]
  (tmp_path / "bad.py").write_text("def strategy(ctx):\n  return 3\n")
  (tmp_path / "none.py").write_text("x = 1\n")
  # cifar100 from a folder that does not exist: loading data would fail otherwise
  nowhere = ["--set", "dataset=cifar100", "--set", f"data_dir={tmp_path / 'nowhere'}",
             "--set", "synthetic_shape=(32, 32, 10, 512, 256)"]
  for spec, msg in ((tmp_path / "none.py", "it defines no strategy"),
                    ("averagin", "strategy: unknown value 'averagin'; expected one of averaging, "
                                 "sequential, or your own")):
    code = cli.main(["train", "--config", str(cfg), "--set", f"strategy={spec}", *nowhere,
                     "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and err.count("\n") == 1, err
  code = cli.main(["train", "--config", str(cfg), "--strategy", str(tmp_path / "bad.py"),
                   "--out", str(tmp_path / "y")])
  err = capsys.readouterr().err
  assert code == 2 and "returned a int, not an hsee_jax.Algorithm" in err, err


@pytest.mark.long
def test_a_strategy_of_ones_own_through_a_sweep_and_its_resume(tmp_path):
  cfg = tmp_path / "cfg.py"
  cfg.write_text(CONFIG.replace(', client_exits="every"', "").replace("rounds=3", "rounds=2"))
  out = tmp_path / "sweep"
  assert cli.main(["sweep", "--config", str(cfg), "--strategy", str(STRATEGY), "--seeds", "0,1",
                   "--out", str(out)]) == 0
  for seed in (0, 1):
    assert json.loads((out / "base" / f"seed{seed}" / "config.json").read_text())["strategy"] \
        == f"{STRATEGY}:strategy"
  assert cli.main(["sweep", "--resume", str(out), "--set", "rounds=3"]) == 0
  assert json.loads((out / "base" / "seed1" / "summary.json").read_text())["rounds"] == 3
