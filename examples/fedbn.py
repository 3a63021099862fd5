"""FedBN (Li et al., ICLR 2021) as a Variant that runs through every command:
each client keeps its own batch norm, scales and shifts and running
statistics, and the cross-layer aggregation averages everything else.

    hsee train --config configs/smoke.py --variant examples/fedbn.py --out runs/fedbn
    hsee train --resume runs/fedbn                # config.json records the variant
    hsee eval --run runs/fedbn                    # each client with its own batch norm
    hsee sweep --config configs/smoke.py --variant examples/fedbn.py \\
        --seeds 0,1 --out runs/fedbn_sweep

``grouping(path, cut)`` answers for each leaf of a client at ``cut``:
``path`` is ``("params" | "batch_stats", unit or head, module, ..., leaf)``,
e.g. ``("params", "unit_2", "BatchNorm_1", "scale")``. ``"client"`` keeps
the leaf per client (never averaged), ``"unit"`` averages it as the paper
does (``"tier"`` and ``"side"``: within the client's tier or side only).
Averaging only (Sequential's server part is one model). Evaluation runs a
seeded sample of each cut's clients (``eval_clients``), since they differ.
"""
from hsee_jax import Variant


def batch_norm_per_client(path, cut):
  kind, *names = path
  is_norm = kind == "batch_stats" or any(n.startswith("BatchNorm") for n in names)
  return "client" if is_norm else "unit"


variant = Variant(name="fedbn", grouping=batch_norm_per_client)
