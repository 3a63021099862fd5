"""The benchmark and the step profiler in experiments/, run tiny end to end."""
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax import lax

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import client_conv  # noqa: E402
import profile_step  # noqa: E402


def test_classify_tells_the_three_convolutions_apart():
  dn = ("NHWC", "HWIO", "NHWC")

  def loss(x, w1, w2):
    h = jax.nn.relu(lax.conv_general_dilated(x, w1, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn))
    y = lax.conv_general_dilated(h, w2, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
    return jnp.mean(y ** 2) + jnp.sum(h)

  args = (jnp.ones((4, 8, 8, 3)), jnp.ones((3, 3, 3, 8)), jnp.ones((3, 3, 8, 8)))
  text = jax.jit(jax.grad(loss, (1, 2))).lower(*args).compile().as_text()
  kinds = profile_step.classify(text)
  assert kinds and set(kinds.values()) <= set(profile_step.CATEGORIES)
  counts = {c: list(kinds.values()).count(c) for c in profile_step.CATEGORIES}
  # two layers: two forward convolutions, two kernel gradients, one input
  # gradient (the first layer's input needs none)
  assert counts["conv forward"] == 2, kinds
  assert counts["conv kernel-grad"] == 2, kinds
  assert counts["conv input-grad"] == 1, kinds
  assert counts["elementwise"] >= 1  # the ReLU mask


def test_client_conv_formulations_agree_and_vmap_is_the_grouped_one(tmp_path):
  """The four ways of one per-client 3x3 layer give the same loss and
  gradients; only ``vmap``'s program holds grouped convolutions (feature
  groups forward and for the input gradient, batch groups for the kernel
  gradient), the matrix-product ones none at all; the script writes its tables."""
  agreement = client_conv.check()
  assert set(agreement) == {"vmap", "im2col", "matmul9"}
  assert all(d < 1e-5 for d in agreement.values()), agreement
  data = client_conv.inputs(3, 2, 6, 4)
  ops = {f: client_conv.program_ops(client_conv.train_layer(f, jnp.float32), *data)["lowered"]
         for f in client_conv.FORMS}
  assert ops["separate"] == {"convolution plain": 9}           # 3 clients x (forward, dx, dw)
  assert ops["vmap"] == {"convolution feature_groups=3": 2, "convolution batch_groups=3": 1}
  assert ops["im2col"] == {"dot_general": 3} and ops["matmul9"] == {"dot_general": 27}
  out = tmp_path / "cc"
  assert client_conv.main(["--out", str(out), "--width", "0.0625", "--stages", "3,4", "--ks", "2",
                           "--batches", "2", "--precisions", "float32,bfloat16",
                           "--reps", "1", "--iters", "1"]) == 0
  result = json.loads((out / "client_conv.json").read_text())
  assert len(result["rows"]) == 2 * 2 * 4 and all(r["ms"] > 0 for r in result["rows"])
  described = [(r["form"], r["precision"]) for r in result["rows"] if r["ops"]]
  assert sorted(described) == sorted((f, p) for f in client_conv.FORMS
                                     for p in ("float32", "bfloat16"))
  assert (out / "client_conv.csv").read_text().count("\n") == 1 + 2 * 2 * 4
  md = (out / "client_conv.md").read_text()
  assert "| 3 (8x8x16) | 2 | 2 | bfloat16 |" in md and "| vmap | 1 convolution batch_groups=2" in md


@pytest.mark.long
def test_profile_step_end_to_end(tmp_path):
  out = tmp_path / "prof"
  r = subprocess.run([sys.executable, str(REPO / "experiments" / "profile_step.py"), "--width", "0.125",
                      "--batch", "8", "--cut", "3", "--steps", "2", "--no-torch", "--out", str(out)],
                     capture_output=True, text=True, timeout=300, cwd=REPO)
  assert r.returncode == 0, r.stderr[-2000:]
  prof = json.loads((out / "profile.json").read_text())["hsee_jax"]
  cats = prof["categories_ms"]
  assert set(cats) == set(profile_step.CATEGORIES)
  assert prof["wall_ms_per_step"] > 0 and prof["traced_ms_per_step"] > 0
  assert abs(sum(cats.values()) - prof["traced_ms_per_step"]) < 1e-6 * max(1.0, prof["traced_ms_per_step"])
  assert cats["conv forward"] > 0 and cats["conv kernel-grad"] > 0
  assert (out / "profile.csv").read_text().startswith("implementation,category,ms_per_step")


@pytest.mark.long
def test_bench_throughput_writes_its_tables(tmp_path):
  out = tmp_path / "bench"
  r = subprocess.run([sys.executable, str(REPO / "experiments" / "bench_throughput.py"), "--ks", "1,2",
                      "--width", "0.125", "--batch", "4", "--steps", "1", "--reps", "1",
                      "--executions", "loop,unrolled", "--out", str(out)],
                     capture_output=True, text=True, timeout=600, cwd=REPO)
  assert r.returncode == 0, r.stderr[-2000:]
  bench = json.loads((out / "bench.json").read_text())
  rows = bench["rows"]
  assert {(row["execution"], row["clients"]) for row in rows} == {
      ("loop", 1), ("unrolled", 1), ("loop", 2), ("unrolled", 2)}
  for row in rows:
    assert row["images_per_s"] > 0 and row["seconds_per_round"] > 0
    assert row["flops_per_round"] > 0 and row["mfu"] is None  # no known peak on a CPU
  assert set(bench["flops_per_training_image"]) >= {"3", "5", "7"}
  assert (out / "bench.csv").read_text().startswith("execution,clients")


@pytest.mark.long
def test_ab_cpu_speedups_compares_like_with_like(tmp_path):
  import ab_cpu_speedups
  from hsee_jax import models
  real, real_depthwise = models.materialize, models.depthwise_conv3x3
  ab_cpu_speedups.main(["--k", "2", "--width", "0.125", "--batch", "4", "--steps", "1",
                        "--reps", "2", "--modes", "loop", "--out", str(tmp_path),
                        "--parts", "tree_helpers,materialize,depthwise_layers"])
  assert models.materialize is real  # restored after the A/B
  ab = json.loads((tmp_path / "ab.json").read_text())
  t = ab["tree_helpers"]
  assert t["leaves"] > 0 and t["slice_eager_ms"] > 0 and t["slice_jit_ms"] > 0
  (m,) = ab["materialize"]
  assert m["mode"] == "loop" and len(m["round_seconds_with"]) == len(m["round_seconds_without"]) == 2
  assert m["images_per_s_with"] > 0 and m["images_per_s_without"] > 0
  assert m["separate_programs"]  # each side traced its own programs, not the other's
  # the two runs train the same network: at most float rounding apart
  assert m["states_max_abs_difference"] < 1e-4
  assert models.depthwise_conv3x3 is real_depthwise and "depthwise" not in ab  # not asked for
  # every distinct depthwise layer of MobileNetV2, both ways
  layers = {(r["hw"], r["channels"], r["strides"]) for r in ab["depthwise_layers"]}
  assert (32, 8, 1) in layers and any(st == 2 for _, _, st in layers), layers  # first block, stride 2
  assert all(r["grouped_ms"] > 0 and r["shifted_ms"] > 0 for r in ab["depthwise_layers"])


@pytest.mark.long
def test_bench_fleet_end_to_end(tmp_path):
  out = tmp_path / "fleet"
  r = subprocess.run([sys.executable, str(REPO / "experiments" / "bench_fleet.py"), "--out", str(out),
                      "--strategies", "averaging", "--widths", "0.0625", "--ns", "40",
                      "--fixed-c", "3", "--cs", "", "--rounds", "1", "--mode", "loop",
                      "--steps", "1", "--batch", "4", "--no-torch", "--fixed-n", "40",
                      "--chunks", "2", "--chunk-modes", "loop", "--train-images", "256",
                      "--max-rounds", "4"],
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  rows = json.loads((out / "bench_fleet.json").read_text())["rows"]
  assert [(row["sweep"], row["num_clients"], row["clients_per_round"], row["mode"], row["chunk"])
          for row in rows] == [("a", 40, 3, "loop", 2), ("c", 40, 3, "loop", 2)]
  for row in rows:
    assert row["round_s"] > 0 and row["checkpoint_mb"] > 0
    assert 0 < row["train_rss_mb"] <= row["peak_rss_mb"]
  # Averaging with reset client state holds nothing per client (test_fleet checks
  # the state's growth with N from the state tree)
  assert all(b == 0 for b in rows[0]["per_client_state_bytes"].values())
  assert (out / "bench_fleet.csv").exists() and (out / "bench_fleet.png").exists()


@pytest.mark.long
def test_gpu_check_writes_its_tables_and_goals(tmp_path):
  """The prepared GPU check, shrunk to this CPU: every section measured and
  written, the goals computed from the rows (no peak known here: not met or unknown)."""
  import gpu_check
  out = tmp_path / "check"
  assert gpu_check.main(["--out", str(out), "--width", "0.0625", "--ks", "1", "--batches", "4",
                         "--precisions", "float32,bfloat16", "--executions", "loop",
                         "--torch", "", "--steps", "1", "--reps", "1", "--accuracy-rounds", "1",
                         "--data-dir", str(tmp_path),
                         "--accuracy-set", "dataset=synthetic", "--accuracy-set", "width=0.0625",
                         "--accuracy-set", "synthetic_shape=(16, 16, 4, 48, 16)",
                         "--accuracy-set", "batch_size=8", "--accuracy-set", "local_steps=1",
                         "--accuracy-set", "cuts=(2, 6)", "--layer-stages", "4",
                         "--layer-batches", "4", "--layer-forms", "separate,vmap"]) == 0
  result = json.loads((out / "gpu_check.json").read_text())
  assert [(r["precision"], r["clients"]) for r in result["rows"]] == [
      ("float32", 1), ("bfloat16", 1)]
  assert all(r["execution"] == "loop" and r["images_per_s"] > 0 for r in result["rows"])
  acc = result["accuracy"]
  assert 0.0 <= acc["float32"] <= 1.0 and 0.0 <= acc["bfloat16"] <= 1.0
  goals = {g["goal"].split(":")[0]: g for g in result["goals"]}
  assert len(goals) == 4 and goals["configs/averaging.py"]["measured"] == pytest.approx(
      abs(acc["bfloat16"] - acc["float32"]) * 100)
  assert all(g["measured"] is None for g in result["goals"][:3])  # no peak, no torch here
  # mode = auto against what was measured: loop is the only execution here
  assert [(a["batch"], a["precision"], a["fastest"]) for a in result["auto"]] == [
      (4, "float32", "loop"), (4, "bfloat16", "loop")]
  assert all(a["auto"] == "unrolled" and a["auto_vs_fastest"] is None for a in result["auto"])
  assert [(r["form"], r["precision"]) for r in result["layers"]] == [
      ("separate", "float32"), ("vmap", "float32"), ("separate", "bfloat16"), ("vmap", "bfloat16")]
  assert result["skipped"] == []
  md = (out / "gpu_check.md").read_text()
  assert md.count("| 4 | 1 | loop |") == 2 and "| goal | target | measured | met |" in md
  assert "| 4 | float32 | 1 | unrolled | loop | not measured |" in md
  assert "    ('cpu', 'bfloat16'): ((None, 'loop'),)," in md   # the AUTO_MODE entry it gives
  assert "| 4 (4x4x32) | 4 | 1 | bfloat16 |" in md


def test_gpu_check_stops_starting_sections_at_its_time_limit(tmp_path):
  """A check whose --time-limit has passed (a tiny one) measures its first
  section only and names the ones it left out, in both files."""
  import gpu_check
  out = tmp_path / "check"
  assert gpu_check.main(["--out", str(out), "--width", "0.0625", "--ks", "1", "--batches", "4",
                         "--precisions", "float32,bfloat16", "--executions", "loop",
                         "--torch", "", "--steps", "1", "--reps", "1", "--accuracy-rounds", "1",
                         "--layer-stages", "4", "--time-limit", "1e-9"]) == 0
  result = json.loads((out / "gpu_check.json").read_text())
  assert result["rows"] == [] and "layers" not in result and "accuracy" not in result
  assert result["skipped"] == ["throughput batch 4 float32", "throughput batch 4 bfloat16",
                               "per-client convolution layers", "accuracy"]
  assert "Not run (--time-limit 0 s reached): throughput batch 4 float32;" in (
      out / "gpu_check.md").read_text()


def test_gpu_check_goes_on_after_a_failing_section(tmp_path, monkeypatch):
  """A section that raises (here: the first throughput section, as if out of
  memory) is one line under ``errors``; the sections after it still run, and a
  failing layer formulation is marked in its row while the others are timed."""
  import bench_throughput
  import gpu_check
  real = bench_throughput.measure
  calls = []

  def measure(section, execs, log):
    calls.append(section.precision)
    if len(calls) == 1:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate\nmore lines")
    return real(section, execs, log)

  def no_im2col(x, w):
    raise RuntimeError("im2col: no room")
  monkeypatch.setattr(bench_throughput, "measure", measure)
  monkeypatch.setitem(client_conv.CONVS, "im2col", no_im2col)
  out = tmp_path / "check"
  assert gpu_check.main(["--out", str(out), "--width", "0.0625", "--ks", "1", "--batches", "4",
                         "--precisions", "float32,bfloat16", "--executions", "loop", "--torch", "",
                         "--steps", "1", "--reps", "1", "--accuracy-rounds", "0",
                         "--layer-stages", "4", "--layer-batches", "2",
                         "--layer-forms", "separate,im2col"]) == 0
  result = json.loads((out / "gpu_check.json").read_text())
  assert result["errors"] == ["throughput batch 4 float32: RuntimeError: RESOURCE_EXHAUSTED: "
                              "Out of memory while trying to allocate"]
  assert [r["precision"] for r in result["rows"]] == ["bfloat16"]
  layers = {(r["form"], r["precision"]): r for r in result["layers"]}
  assert layers[("im2col", "float32")]["error"] == "RuntimeError: im2col: no room"
  assert layers[("im2col", "float32")]["ms"] is None and layers[("separate", "float32")]["ms"] > 0
  md = (out / "gpu_check.md").read_text()
  assert "Failed: throughput batch 4 float32: RuntimeError: RESOURCE_EXHAUSTED" in md
  assert "| 4 (4x4x32) | 2 | 1 | float32 |" in md and "| failed |" in md


def test_gpu_check_suggests_auto_mode_entries_from_what_it_measured():
  """Per precision, the fastest execution at each batch, equal neighbours
  merged, the largest batch left unbounded: entries in AUTO_MODE's form."""
  import gpu_check
  from hsee_jax import engine
  choices = [{"batch": 128, "precision": "float32", "fastest": "loop"},
             {"batch": 32, "precision": "float32", "fastest": "unrolled"},
             {"batch": 32, "precision": "bfloat16", "fastest": "loop"},
             {"batch": 128, "precision": "bfloat16", "fastest": "loop"},
             {"batch": 64, "precision": "float32", "fastest": "unrolled"}]
  table = gpu_check.suggested_auto(choices, "gpu")
  assert table == {("accelerator", "float32"): ((64, "unrolled"), (None, "loop")),
                   ("accelerator", "bfloat16"): ((None, "loop"),)}
  assert set(table) <= set(engine.AUTO_MODE)
  assert gpu_check.suggested_auto(choices[:1], "cpu") == {("cpu", "float32"): ((None, "loop"),)}


@pytest.mark.long
def test_price_grid_gives_what_a_run_records(tmp_path):
  """A grid priced without training (experiments/price_grid.py) gives the
  simulated seconds and bytes that training the same config records."""
  import dataclasses
  import price_grid
  import reproduce
  from hsee_jax import train
  sets = ["train_subset=200", "test_subset=100", "rounds=2", "eval_every=1", "local_steps=1"]
  out = tmp_path / "price.json"
  assert price_grid.main(["--scale", "iot-more", "--runs", "deadline-by-tier", "--seeds", "0",
                          "--out", str(out)] + [x for s in sets for x in ("--set", s)]) == 0
  priced = json.loads(out.read_text())["deadline-by-tier"]
  cfg = dict(reproduce.grid("cifar10", "iot-more", sets))["deadline-by-tier"]
  train.train(dataclasses.replace(cfg, seed=0), tmp_path / "run", log=lambda s: None)
  recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert priced["first_seed_sim_seconds_at_eval"] == pytest.approx(
      [recs[0]["sim_seconds"], recs[0]["sim_seconds"] + recs[1]["sim_seconds"]], rel=1e-12)
  assert priced["bytes_per_round"] == pytest.approx((recs[0]["bytes_sent"] + recs[1]["bytes_sent"]) / 2)
  assert priced["unused_per_round"] == pytest.approx(
      sum(sum(r["unused_per_cut"].values()) for r in recs) / 2)
