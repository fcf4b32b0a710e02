"""cortexlab's Panel dashboards. Each view is a `panel.viewable.Viewer` in its own module here;
the scripts in the repository's `apps/` folder only serve them. Launch them all with

    python -m cortexlab.apps            (or `make serve`: set up, then this)

`APPS` lists them in the order of the index page: module name -> (title, what it shows).
"""
from __future__ import annotations

__all__ = ["APPS"]

APPS = {
    "memory_state": ("Memory state",
                     "Read your text into a Cortex session and watch the Gated DeltaNet memory S fill, token by "
                     "token: heatmap, norm, effective rank, gates and controller signals; then ask a question in a "
                     "later call and compare with the memory reset."),
    "habituation": ("Habituation maps",
                    "The inference hooks on SmolLM2: which keys each head has habituated to (heads x tokens, per "
                    "layer), the novelty boosts, and attention before vs after habituation."),
    "columns": ("Column specialisation",
                "Jensen-Shannon divergence between cortical columns, lateral-inhibition weights and the "
                "hierarchical tiers, on the trained NeuroLlama and on SmolLM2's GQA groups."),
    "inverse_scaling": ("Inverse-scaling experiments",
                        "E1-E4 from results/: MQAR, recall across calls, loss by token position, v1 vs v2, each "
                        "with its baselines; run a small live version."),
}
