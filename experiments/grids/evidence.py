"""The runs that test each claim of PAPER.md ("The paper's claims"), scale
``evidence``: the baseline runs with ``homogeneous-weak`` (every client at
l = 3) and ``homogeneous-mid`` (l = 5) in place of ``homogeneous``,
``strong-only`` (the weak tier left out: clients at 5 and 7 on their two
thirds of the data), and ``-noniid`` twins of hsee-averaging, alone and
homogeneous-weak on a Dirichlet(0.3) split (Sequential's exits are alone's
by construction: its client parts never aggregate)."""
from grids import baseline
from grids.common import EVIDENCE_RECIPE, NON_IID, PAPER_CLAIMS, TIERS

NAME = "evidence"
SCALES = {"evidence": EVIDENCE_RECIPE}
# ``data_share``: the run trains on this share of the scale's training images
# (the weak tier's third left out), with the same images per client; the
# devices keep their tiers' speeds (clients without their own are the
# weak, middle and strong tier in turn).
RUNS = {
    "hsee-averaging": baseline.RUNS["hsee-averaging"],
    "hsee-sequential": baseline.RUNS["hsee-sequential"],
    "alone": baseline.RUNS["alone"],
    "homogeneous-weak": dict(strategy="averaging", cuts=(3, 3, 3)),
    "homogeneous-mid": dict(strategy="averaging", cuts=(5, 5, 5)),
    "strong-only": dict(strategy="averaging", cuts=(5, 7), data_share=2 / 3,
                        client_flops_per_s=TIERS["client_flops_per_s"][1:]),
    "classical-split": baseline.RUNS["classical-split"],
    "central": baseline.RUNS["central"],
    "hsee-averaging-noniid": dict(baseline.RUNS["hsee-averaging"], **NON_IID),
    "alone-noniid": dict(baseline.RUNS["alone"], **NON_IID),
    "homogeneous-weak-noniid": dict(cuts=(3, 3, 3), **NON_IID),
}
CLAIMS = PAPER_CLAIMS
REPORT = (("claim_plots", {}),)
