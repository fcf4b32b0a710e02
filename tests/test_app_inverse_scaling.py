"""The inverse_scaling app: E1-E4 from results files, messages for missing ones, the live tiny E1; and the
`on_step` callback of `train_mqar` that drives its progress bar."""
import asyncio
import json
import math
import shutil
from pathlib import Path

import plotly.graph_objects as go
import pytest

from cortexlab.apps import inverse_scaling as app_module
from cortexlab.apps.inverse_scaling import E1, E2, E3, E4, EXPERIMENTS, InverseScalingApp
from cortexlab.data.mqar import MQARTask
from cortexlab.results import RECALL_RESULT, load_result
from cortexlab.train.mqar import MQARTrainConfig, train_mqar
from cortexlab.viz.experiments import mqar_live_figure

COMMITTED = Path(__file__).resolve().parents[1] / "results"


def mqar_results():
    runs = [{"config": {"mixer": mixer, "d_model": 64, "num_heads": 2, "task": {"seq_len": L, "num_pairs": P}},
             "state_size": 2048, "accuracy": acc, "chance": 1 / 16, "untrained_accuracy": 0.06, "steps": 100,
             "stopped": "steps"}
            for mixer, acc in (("gdn", 0.99), ("sliding_window", 0.3)) for L, P in ((64, 16), (128, 16), (256, 64))]
    return {"grid": {"fixed_pairs": 16, "fixed_len": 256, "seq_lens": [64, 128], "pairs": [16, 64]},
            "runs": runs, "complete": False, "command": "python -m cortexlab.train mqar --quick"}


@pytest.fixture
def results(tmp_path):
    """A results folder with the committed E2-E4 files and no E1 file."""
    for experiment in (E2, E3, E4):
        shutil.copy(COMMITTED / EXPERIMENTS[experiment], tmp_path)
    return tmp_path


def test_experiment_changes_the_figure_numbers_and_command(results):
    app = InverseScalingApp(results=results)
    assert app.experiment == E2 and not app.message.visible
    seen = [app.figure_pane.object.layout.title.text]
    assert "reset" in app.summary.object and f"`{load_result(RECALL_RESULT)['command']}`" in app.summary.object
    app.experiment = E3
    seen.append(app.figure_pane.object.layout.title.text)
    assert "later segments" in app.summary.object and "longtext" in app.summary.object
    assert not app.extra_pane.visible
    app.experiment = E4
    seen.append(app.figure_pane.object.layout.title.text)
    assert app.extra_pane.visible and "retained fraction" in app.extra_pane.object.layout.yaxis.title.text
    assert "training throughput" in app.summary.object
    assert len(set(seen)) == 3
    (results / EXPERIMENTS[E1]).write_text(json.dumps(mqar_results()))
    app.experiment = E1
    assert app.figure_pane.visible and app.figure_pane.object.layout.title.text.startswith("E1")
    assert "partial grid" in app.summary.object and "| L=64, 16 pairs | L=128, 16 pairs |" in app.summary.object
    assert "| gdn | d=64 H=2 | 0.990 | 0.990 | 0.990 |" in app.summary.object
    assert not app.extra_pane.visible and not app.run_button.disabled
    capacity = mqar_results()                                        # a capacity sweep beside the grid is merged
    capacity["runs"] = [{**r, "config": {**r["config"], "task": {"seq_len": 256, "num_pairs": 4}}, "accuracy": 0.5}
                        for r in capacity["runs"][:1]]
    capacity["command"] = "python -m cortexlab.train mqar --pairs 4"
    (results / "mqar_capacity.json").write_text(json.dumps(capacity))
    app.experiment = E2
    app.experiment = E1
    assert "| L=256, 4 pairs |" in app.summary.object and "| gdn | d=64 H=2 | 0.990 | 0.990 | 0.990 | 0.500 |" \
        in app.summary.object and "--pairs 4`" in app.summary.object


def test_missing_or_unreadable_results_show_a_message(results, tmp_path):
    app = InverseScalingApp(results=results)
    app.experiment = E1
    assert app.message.visible and not app.figure_pane.visible and app.figure_pane.object is None
    assert "has not been produced" in app.message.object
    assert "python -m cortexlab.train mqar --out results/mqar_cpu.json" in app.message.object
    (results / EXPERIMENTS[E3]).write_text("{not json")
    app.experiment = E3
    assert app.message.visible and "could not be read" in app.message.object
    app.experiment = E2
    assert not app.message.visible and app.figure_pane.visible
    nowhere = InverseScalingApp(results=tmp_path / "nowhere")          # no folder at all: still a page
    assert nowhere.message.visible and nowhere.page() is not None


def test_live_run_fills_the_progress_bar_and_draws_the_result(results):
    app = InverseScalingApp(results=results, live_steps=3)
    app.experiment = E1
    runs = app.run_live()
    assert set(runs) == set(app_module.LIVE_MIXERS) and all("model" not in r for r in runs.values())
    assert app.progress.max == 3 * len(runs) and app.progress.value == app.progress.max
    fig = app.live_pane.object
    assert isinstance(fig, go.Figure) and app.live_pane.visible
    assert [len(t.x) for t in fig.data] == [2, 2]                       # untrained at step 0, then the last step
    assert "Done" in app.live_status.object and not app.run_button.disabled
    app.progress.value = 0
    asyncio.run(app._on_run())                                          # the button's path: a worker thread
    assert app.progress.value == app.progress.max and "Done" in app.live_status.object
    app.experiment = E2
    assert app.run_button.disabled and not app.live_pane.visible


def test_train_mqar_calls_on_step_after_every_step():
    cfg = MQARTrainConfig(task=MQARTask(vocab_size=32, seq_len=16, num_pairs=2), d_model=16, num_heads=2, steps=4,
                          batch_size=4, warmup_steps=1, test_size=8, eval_every=2, stop_accuracy=None)
    calls = []
    run = train_mqar(cfg, progress=False, on_step=lambda step, loss: calls.append((step, loss)))
    assert [s for s, _ in calls] == [1, 2, 3, 4] == list(range(1, run["steps"] + 1))
    assert all(math.isfinite(loss) and loss > 0 for _, loss in calls)
    assert run["evals"][0]["train_loss"] == pytest.approx(sum(loss for _, loss in calls[:2]) / 2, abs=1e-5)


def test_mqar_live_figure_starts_from_the_untrained_model():
    run = {"evals": [{"step": 50, "accuracy": 0.5}], "untrained_accuracy": 0.06, "accuracy": 0.5, "steps": 50,
           "chance": 1 / 16}
    fig = mqar_live_figure({"gdn": run})
    assert list(fig.data[0].x) == [0, 50] and list(fig.data[0].y) == [0.06, 0.5]
    assert any(s.y0 == pytest.approx(1 / 16) for s in fig.layout.shapes)
    with pytest.raises(ValueError, match="empty"):
        mqar_live_figure({})
