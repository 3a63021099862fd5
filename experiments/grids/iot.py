"""The IoT fleet (docs/usage.md, "Device speeds, deadlines and the link"):
20 clients in the three tiers (7 / 7 / 6 at cuts 3 / 5 / 7), each client's
FLOP/s and bandwidth drawn lognormal (sigma 0.5) around its tier's (TIERS);
the participation rules and the link settings on Averaging, IID and
Dirichlet(0.3). ``deadline`` samples everyone and keeps the first 14 to
finish (over-commitment 20 / 14: the slowest 30% dropped every round);
``partial`` gives every client the time in which 70% of seed 0's fleet
finish a round (``deadline_share``, turned into ``deadline_s`` by
``reproduce.grid``) and the slower ones do the steps that fit."""
from grids.common import EVIDENCE_RECIPE, SPLITS, tiers

NAME = "iot"
SCALES = {"iot": EVIDENCE_RECIPE}
FLEET = dict(strategy="averaging", num_clients=20, cut_tiers=((3, 0.35), (5, 0.35), (7, 0.3)),
             speed_spread=0.5, client_link_bytes_per_s=(1.25e6, 1.25e6, 1.25e6))
SETTINGS = {
    "everyone": {},
    "deadline": dict(participation="deadline", clients_per_round=14, overcommit=20 / 14,
                     deadline_s=1e9),
    "partial": dict(participation="partial", deadline_share=0.7),
    "int8": dict(link="int8"),
    "topk": dict(link="topk", link_topk=0.1),
}
RUNS = {f"{name}{sfx}": dict(FLEET, **fields, **extra)
        for name, fields in SETTINGS.items() for sfx, extra in SPLITS}
RULES, LINKS = ("deadline", "partial"), ("int8", "topk")


def claims(rules, links) -> list:
  """Claims 8 (the link) and 9 (a deadline), against everyone."""
  return [
      (8, "A compressed link costs no accuracy (full path not worse than the link as computed)",
       [(n + sfx, "full_acc", None, f"everyone{sfx}", "full_acc", None, "not_worse")
        for n in links for sfx, _ in SPLITS]),
      (9, "A deadline hurts no tier (each tier's exit and the full path not worse than everyone)",
       [c for n in rules for sfx, _ in SPLITS for c in
        tiers(n + sfx, f"everyone{sfx}", "not_worse")
        + [(n + sfx, "full_acc", None, f"everyone{sfx}", "full_acc", None, "not_worse")]]),
  ]


CLAIMS = claims(RULES, LINKS)
REPORT = (("link_and_participation",
           dict(reference="everyone", links=LINKS, link_claim=8, rules=RULES, rule_claim=9)),)
