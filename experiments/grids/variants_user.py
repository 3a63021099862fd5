"""Two methods written as user files (hsee_jax.variants), run as
``--variant FILE.py`` runs them: FedBN (``examples/fedbn.py``) and DepthFL's
summed exits (``examples/depthfl_sum.py``), beside plain Averaging and
every-exit (the ``variants`` grid's runs of the same configs)."""
from grids.common import (EVIDENCE_RECIPE, EXAMPLES, GOAL, variant_claims,  # noqa: F401
                          variant_report, variant_runs)

NAME = "variants-user"
SCALES = {"variants-user": EVIDENCE_RECIPE}
VARIANTS = {
    "every-exit": dict(client_exits="every"),
    "fedbn": dict(variants=(f"{EXAMPLES / 'fedbn.py'}:variant",)),
    "depthfl-sum": dict(client_exits="every", variants=(f"{EXAMPLES / 'depthfl_sum.py'}:variant",)),
}
RUNS = variant_runs(VARIANTS, baselines=("hsee-averaging",))
CLAIMS = variant_claims(VARIANTS)
REPORT = variant_report(VARIANTS)
