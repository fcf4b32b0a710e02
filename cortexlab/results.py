"""Where the committed results live: `results/*.json` (each with the command that produced it) and
`results/adapters`, `results/models` (the trained checkpoints the notebooks and dashboards load).

`results_dir()` is $CORTEXLAB_RESULTS when set, else the `results/` folder of the source checkout the
package runs from.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["FIRST_RECALL_ADAPTER", "RECALL_ADAPTER", "RECALL_RESULT", "load_result", "results_dir"]

# the committed E2 sidecar (under results_dir()), the one the notebooks and dashboards load, and its run's results file
RECALL_ADAPTER = "adapters/recall_128_layer6_bridged"
RECALL_RESULT = "recall_across_calls_layer6_bridged_seed0.json"
# the first committed E2 sidecar: recall_shift, filler_damage and E4 read it by default, as their committed results did
FIRST_RECALL_ADAPTER = "adapters/recall_128"


def results_dir() -> Path:
    """The results folder ($CORTEXLAB_RESULTS, else the checkout's `results/`); FileNotFoundError if absent."""
    override = os.environ.get("CORTEXLAB_RESULTS")
    path = Path(override) if override else Path(__file__).resolve().parents[1] / "results"
    if not path.is_dir():
        raise FileNotFoundError(f"no results folder at {path}; use a cortexlab source checkout or set "
                                "CORTEXLAB_RESULTS to the folder that holds results/*.json and results/adapters")
    return path


def load_result(name: str) -> dict | None:
    """The parsed `results/<name>` (e.g. "recall_across_calls.json"), or None when that run has not been made."""
    if not isinstance(name, str) or not name.endswith(".json") or Path(name).name != name:
        raise ValueError(f"name must be the file name of a results JSON such as 'cortex_v1_v2.json', got {name!r}")
    path = results_dir() / name
    return json.loads(path.read_text()) if path.is_file() else None
