"""The paper's scale (width 1.0, the whole CIFAR-10) for one seed, scale
``gpu``: as many rounds as fit in 8 minutes of an H200 with compilation
(docs/results.md, "The paper's scale on a GPU")."""
from grids import evidence
from grids.common import PAPER_CLAIMS

NAME = "gpu"
SCALES = {"gpu": dict(width=1.0, train_subset=0, test_subset=0, rounds=15, batch_size=128,
                      lr=0.1, eval_every=5, checkpoint_every=0)}
RUNS = {name: evidence.RUNS[name] for name in
        ("hsee-averaging", "hsee-sequential", "homogeneous-weak", "alone", "central")}
CLAIMS = PAPER_CLAIMS
REPORT = (("claim_plots", {}),)
