from pathlib import Path

import pytest

from hsee_jax import config as config_lib
from hsee_jax.config import Config, ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cuts", [(0, 3), (3, 9), (3, -1)])
def test_cut_out_of_range(cuts):
  with pytest.raises(ConfigError, match="cut layer .* out of range"):
    Config(cuts=cuts)


def test_unknown_values_and_types_are_one_line_errors():
  for kwargs, pattern in [({"dataset": "mnist"}, "dataset: unknown value 'mnist'"),
                          ({"strategy": "fedavg"}, "strategy: unknown value"),
                          ({"rounds": "10"}, "rounds: expected int"),
                          ({"augment": 1}, "augment: expected bool"),
                          ({"dirichlet_alpha": 0.0}, "dirichlet_alpha: must be > 0"),
                          ({"cuts": ()}, "cuts: need at least one client"),
                          ({"client_aggregation": "cross_layer"}, "it needs strategy=sequential")]:
    with pytest.raises(ConfigError, match=pattern) as e:
      Config(**kwargs)
    assert "\n" not in str(e.value)


def test_override_parses_against_field_types():
  cfg = config_lib.override(Config(), ["rounds=4", "cuts=(2,4)", "dataset=synthetic", "lr=0.1",
                                       "augment=False"])
  assert (cfg.rounds, cfg.cuts, cfg.dataset, cfg.lr, cfg.augment) == (4, (2, 4), "synthetic", 0.1, False)
  with pytest.raises(ConfigError, match="unknown config key 'roundz'"):
    config_lib.override(Config(), ["roundz=3"])
  with pytest.raises(ConfigError, match="rounds: expected int"):
    config_lib.override(Config(), ["rounds=2.5"])
  with pytest.raises(ConfigError, match="expected key=value"):
    config_lib.override(Config(), ["rounds"])


def test_from_dict_round_trip_and_unknown_keys():
  cfg = Config(cuts=(1, 8), name="x")
  assert config_lib.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ConfigError, match="unknown config key"):
    config_lib.from_dict({**cfg.to_dict(), "bogus": 1})


def test_former_field_names_are_read_from_saved_configs_and_set():
  saved = {k: v for k, v in Config(name="x").to_dict().items() if k != "exit_head_kind"}
  assert config_lib.from_dict({**saved, "exit_head": "conv"}).exit_head_kind == "conv"
  assert config_lib.override(Config(), ["exit_head=conv"]).exit_head_kind == "conv"
  assert "exit_head" not in Config().to_dict()  # written under the current name


@pytest.mark.parametrize("name", ["smoke", "cpu", "averaging", "sequential"])
def test_shipped_configs_load(name):
  cfg = config_lib.load(REPO / "configs" / f"{name}.py")
  assert isinstance(cfg, Config) and cfg.name == name
  assert len(set(cfg.cuts)) > 1  # heterogeneous cuts


def test_missing_config_file():
  with pytest.raises(ConfigError, match="config file not found"):
    config_lib.load("configs/nope.py")


def test_each_field_has_one_compilation_role():
  """program, input or shape, declared once in config (the lists the
  strategies and sweeps read are those)."""
  import dataclasses

  from hsee_jax import strategies, sweep
  names = [f.name for f in dataclasses.fields(Config)]
  assert not set(config_lib.PROGRAM_FIELDS) & set(config_lib.INPUT_FIELDS)
  assert set(config_lib.PROGRAM_FIELDS) | set(config_lib.INPUT_FIELDS) <= set(names)
  assert strategies.PROGRAM_FIELDS is config_lib.PROGRAM_FIELDS
  assert sweep.INPUT_FIELDS == set(config_lib.INPUT_FIELDS)
  roles = {n: config_lib.field_role(n) for n in names}
  assert roles["precision"] == roles["width"] == "program" and roles["lr"] == "input"
  assert roles["cuts"] == roles["batch_size"] == roles["mode"] == "shape"


def test_the_config_is_in_sections_each_checking_its_own_fields():
  """Config is the sections' fields, each field in one section, in section
  order; each section's check refuses a bad value of its own fields in one
  line naming the field; a saved config loads whatever its key order."""
  import dataclasses
  from hsee_jax import config as config_lib
  names = [f.name for sec in config_lib.SECTIONS for f in dataclasses.fields(sec)]
  assert names == [f.name for f in dataclasses.fields(Config)] and len(set(names)) == len(names)
  assert [s.__name__ for s in config_lib.SECTIONS] == [
      "Data", "Network", "Fleet", "Optimiser", "Strategy", "Variants", "SpeedsAndLink",
      "Evaluation", "Run"]
  bad = {"dataset": "mnist", "width": 9.0, "clients_per_round": 0, "lr": 0.0, "strategy": "x",
         "prox_mu": -1.0, "link_topk": 2.0, "eval_every": 0, "seed": -1}
  for name, value in bad.items():
    sec = config_lib.section_of(name)
    with pytest.raises(ConfigError, match=f"^{name}: "):
      sec.check(_loose(name, value))
  saved = dict(reversed(list(Config(lr=0.1).to_dict().items())))
  assert config_lib.from_dict(saved) == Config(lr=0.1)


def _loose(name, value):
  """A config holding a bad value without its check (to hand to one section's check)."""
  cfg = Config()
  object.__setattr__(cfg, name, value)
  return cfg
