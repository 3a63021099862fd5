"""The exit-aware variants ([choice]; docs/usage.md, "Exit-aware training
and aggregation"), each on plain Averaging's fleet, against plain Averaging,
alone and homogeneous-weak at the evidence recipe (the evidence grid's runs
of the same configs are identical), IID and Dirichlet(0.3); the report gives
the goal per variant. ``combined`` was fixed before the grid ran: DepthFL
(every exit, self-distillation) with HeteroFL's static BN. The last three
were added after the first five were measured, as the next steps their
figures pointed to: exits weighted by depth, ScaleFL's own distillation
settings (weight 0.05, T = 3, from a quarter of the rounds on), and every
exit with static BN. Shares ``--out`` with ``variants-more`` and
``variants-user`` (``--resume``)."""
from grids.common import EVIDENCE_RECIPE, GOAL, variant_claims, variant_report, variant_runs  # noqa: F401

NAME = "variants"
SCALES = {"variants": EVIDENCE_RECIPE}
VARIANTS = {
    "every-exit": dict(client_exits="every"),
    "distill": dict(client_exits="every", distill="deepest"),
    "tier-local-top": dict(tier_local_top=True),
    "static-bn": dict(static_bn=True),
    "combined": dict(client_exits="every", distill="deepest", static_bn=True),
    "rising": dict(client_exits="every", exit_weights="rising"),
    "distill-scalefl": dict(client_exits="every", distill="deepest", distill_weight=0.05,
                            distill_temperature=3.0, distill_start=11),
    "every-exit-static-bn": dict(client_exits="every", static_bn=True),
}
RUNS = variant_runs(VARIANTS)
CLAIMS = variant_claims(VARIANTS)
REPORT = variant_report(VARIANTS)
