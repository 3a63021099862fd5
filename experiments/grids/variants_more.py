"""More exit-aware variants, for the deepest exit's non-IID shortfall in the
``variants`` grid: FedProx's proximal term at two weights of its paper's grid
(0.001-1), 1 and 0.01; then, to test the averaging study's cause directly,
client-side and server-side copies of a unit averaged apart (SplitFed),
alone and with every exit. A grid of its own so that each fits in 90
minutes of 2 CPU cores; both share the baselines."""
from grids.common import EVIDENCE_RECIPE, GOAL, variant_claims, variant_report, variant_runs  # noqa: F401

NAME = "variants-more"
SCALES = {"variants-more": EVIDENCE_RECIPE}
VARIANTS = {
    "prox": dict(prox_mu=1.0),
    "prox-0.01": dict(prox_mu=0.01),
    "sides-apart": dict(aggregate_sides="apart"),
    "every-exit-sides-apart": dict(client_exits="every", aggregate_sides="apart"),
}
RUNS = variant_runs(VARIANTS)
CLAIMS = variant_claims(VARIANTS)
REPORT = variant_report(VARIANTS)
