"""The paper's baselines (scales ``cpu`` and ``paper``):

  hsee-averaging    Hetero-SplitEE, Averaging, heterogeneous cuts l = 3, 5, 7
  hsee-sequential   Hetero-SplitEE, Sequential, the same cuts
  homogeneous       split learning with every client at the same cut (l = 5), Averaging
  alone             each client on its own data with its exit head, no aggregation
  classical-split   the server gradient goes back to the client (no exit loss), cuts 3, 5, 7
  central           the uncut ResNet-18 trained on all the data
"""
from grids.common import HETERO_CUTS
from grids.common import PAPER_CLAIMS as CLAIMS  # noqa: F401

NAME = "baseline"
SCALES = {
    # the short grid: whole CIFAR-10 baseline grid in under an hour on 2 CPU cores
    "cpu": dict(width=0.125, train_subset=10000, test_subset=0, rounds=8, batch_size=32,
                lr=0.05, eval_every=1, checkpoint_every=0),
    # the paper's setting (for an accelerator)
    "paper": dict(width=1.0, train_subset=0, test_subset=0, rounds=200, batch_size=128, lr=0.1,
                  eval_every=5, checkpoint_every=10),
}
RUNS = {
    "hsee-averaging": dict(strategy="averaging", cuts=HETERO_CUTS),
    "hsee-sequential": dict(strategy="sequential", cuts=HETERO_CUTS),
    "homogeneous": dict(strategy="averaging", cuts=(5, 5, 5)),
    "alone": dict(strategy="averaging", cuts=HETERO_CUTS, aggregate_every=10**9),
    "classical-split": dict(strategy="averaging", cuts=HETERO_CUTS, server_grad_to_client=True,
                            exit_loss_weight=0.0),
    "central": dict(strategy="averaging", cuts=(1,), server_grad_to_client=True,
                    exit_loss_weight=0.0),
}
REPORT = (("claim_plots", {}),)
