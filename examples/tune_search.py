"""A search of Ray Tune's own over hsee_jax runs: the learning rate and the
exit-loss weight drawn at random, ASHA stopping the hopeless trials. Each
trial is an ordinary run directory, OUT/runs/<trial> (hsee_jax.tune.trainable),
so `hsee eval` and `hsee train --resume` take any of them.

    pip install -e '.[ray]'
    python examples/tune_search.py --config configs/smoke.py --samples 8 --out runs/tune
"""
import argparse
from pathlib import Path

from ray import tune
from ray.tune.schedulers import ASHAScheduler

from hsee_jax import load_config
from hsee_jax.tune import trainable

p = argparse.ArgumentParser()
p.add_argument("--config", default="configs/smoke.py")
p.add_argument("--samples", type=int, default=8)
p.add_argument("--out", default="runs/tune")
args = p.parse_args()
cfg = load_config(args.config, [])
tuner = tune.Tuner(
    tune.with_resources(trainable, {"cpu": 1}),
    param_space={"hsee": cfg.to_dict(), "runs": str(Path(args.out, "runs").resolve()),
                 "lr": tune.loguniform(1e-3, 0.3),
                 "exit_loss_weight": tune.uniform(0.25, 1.0)},
    tune_config=tune.TuneConfig(num_samples=args.samples, metric="mean_full_acc", mode="max",
                                # past the last round: a trial stopped at its last report
                                # would end before its run writes its summary
                                scheduler=ASHAScheduler(time_attr="round", max_t=cfg.rounds + 1)),
    run_config=tune.RunConfig(storage_path=str(Path(args.out).resolve())))
best = tuner.fit().get_best_result()
print(f"best: lr {best.config['lr']:.4g}, exit_loss_weight {best.config['exit_loss_weight']:.3f}: "
      f"mean_full_acc {best.metrics['mean_full_acc']:.4f} after round {best.metrics['round']}; "
      f"its run: {Path(args.out, 'runs', Path(best.path).name)}")
