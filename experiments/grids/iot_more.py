"""The deadline shared among the tiers: ``deadline-by-tier`` keeps the
first 14 to finish too, but each tier its share of them (5 / 5 / 4:
``deadline_by_tier``), so the slowest tier is not the one dropped; beside
the ``iot`` grid's everyone and deadline runs (identical configs). A grid of
its own so that each fits in 60 minutes of 2 CPU cores."""
from grids import iot
from grids.common import EVIDENCE_RECIPE, SPLITS

NAME = "iot-more"
SCALES = {"iot-more": EVIDENCE_RECIPE}
SETTINGS = {"everyone": iot.SETTINGS["everyone"], "deadline": iot.SETTINGS["deadline"],
            "deadline-by-tier": dict(iot.SETTINGS["deadline"], deadline_by_tier=True)}
RUNS = {f"{name}{sfx}": dict(iot.FLEET, **fields, **extra)
        for name, fields in SETTINGS.items() for sfx, extra in SPLITS}
RULES = ("deadline", "deadline-by-tier")
CLAIMS = iot.claims(RULES, iot.LINKS)
REPORT = (("link_and_participation",
           dict(reference="everyone", links=iot.LINKS, link_claim=8, rules=RULES, rule_claim=9)),)
