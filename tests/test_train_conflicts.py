"""cortexlab.train.conflicts: the controller ablation on MQAR with conflicting re-bindings.

The committed models (results/models/controller_conflicts) are checked for the effect the ablation reports: with
its controller, one memory layer keeps the first binding; reset to neutral, the same weights let the second
overwrite it; the layer trained without a controller keeps fewer.
"""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import cortexlab.train.conflicts as conflicts
from cortexlab.cortex import MetacognitiveController, neutralise_controller_
from cortexlab.data.mqar import IGNORE, MQARTask, split_seed
from cortexlab.train.__main__ import main
from cortexlab.train.conflicts import DEFAULT_TASK, VARIANTS, conflict_accuracy, load_model
from cortexlab.train.mqar import MQARTrainConfig
from cortexlab.viz import controller as viz

MODELS = Path(__file__).resolve().parent.parent / "results" / "models" / "controller_conflicts"
TINY = ["--vocab-size", "32", "--seq-len", "32", "--pairs", "4", "--conflicts", "2", "--d-model", "16",
        "--steps", "4", "--eval-every", "4", "--test-size", "16", "--no-progress"]


class Answers(nn.Module):
    """A 'model' whose argmax at every position is a fixed token table [n, L]."""

    def __init__(self, table: torch.Tensor, vocab_size: int):
        super().__init__()
        self.table, self.vocab_size, self.offset = table, vocab_size, 0
        self.device_marker = nn.Parameter(torch.zeros(1))     # the readings move inputs to the model's device

    def forward(self, ids):
        table = self.table[self.offset:self.offset + len(ids)]
        self.offset += len(ids)
        return nn.functional.one_hot(table.clamp(min=0), self.vocab_size).float()


def test_accuracy_is_split_into_conflicted_and_clean_queries():
    task = MQARTask(vocab_size=64, seq_len=64, num_pairs=8, conflicts=3)
    inputs, labels = task.sample(40, seed=1)
    second = task.conflicting_values(inputs, labels)
    first = conflict_accuracy(Answers(labels, 64), task, inputs, labels, batch_size=16)
    assert first["conflicted"] == first["clean"] == first["all"] == 1 and first["answered_second"] == 0
    assert first["queries"] == {"conflicted": 40 * 3, "clean": 40 * 5}
    # answering every conflicted query with the second binding: those all wrong, the clean ones still right
    overwritten = conflict_accuracy(Answers(torch.where(second != IGNORE, second, labels), 64), task, inputs, labels)
    assert overwritten["conflicted"] == 0 and overwritten["clean"] == 1 and overwritten["answered_second"] == 1
    assert overwritten["all"] == pytest.approx(5 / 8)


def test_committed_models_show_the_controller_keeps_the_first_binding(one_thread):
    inputs, labels = DEFAULT_TASK.sample(512, split_seed("test", 0))
    with_controller = load_model(MODELS / "gdn+controller")
    kept = conflict_accuracy(with_controller, DEFAULT_TASK, inputs, labels)
    assert kept["conflicted"] >= 0.9 and kept["clean"] >= 0.95
    # the same weights with the controller reset to neutral: the conflicting value overwrites the first
    assert neutralise_controller_(with_controller) == 1
    neutral = conflict_accuracy(with_controller, DEFAULT_TASK, inputs, labels)
    assert neutral["conflicted"] <= 0.5 and neutral["answered_second"] >= 0.5 and neutral["clean"] >= 0.9
    # one layer trained without a controller keeps the clean bindings but fewer of the conflicted ones
    without = conflict_accuracy(load_model(MODELS / "gdn"), DEFAULT_TASK, inputs, labels)
    assert without["clean"] >= 0.95 and without["conflicted"] <= kept["conflicted"] - 0.15
    card = json.loads((MODELS / "gdn+controller" / "card.json").read_text())
    assert card["accuracy"]["conflicted"] == pytest.approx(kept["conflicted"], abs=0.01)
    assert card["config"]["task"]["conflicts"] == 4


def test_recipe_writes_every_variant_saves_models_and_resumes(tmp_path, one_thread, monkeypatch):
    out, models = tmp_path / "ablation.json", tmp_path / "models"
    main(["controller-ablation", "--out", str(out), "--seeds", "0,1", "--save-models", str(models), *TINY])
    result = json.loads(out.read_text())
    assert result["complete"] and result["command"].startswith("python -m cortexlab.train controller-ablation")
    runs = result["runs"]
    assert [(r["variant"], r["config"]["seed"]) for r in runs] == [(v, s) for s in (0, 1) for v in VARIANTS]
    for r in runs:
        layers, controller = VARIANTS[r["variant"]]
        assert r["model_config"]["num_layers"] == layers and r["model_config"]["controller"] == controller
        assert len(r["writes"]) == layers and ("neutralised" in r) == controller
        assert ("surprise" in r["writes"][0]["first"]) == controller
        assert 0 <= r["accuracy"]["conflicted"] <= 1 and r["accuracy"]["queries"]["conflicted"] == 16 * 2
    assert result["summary"]["gdn+controller (neutralised at test)"]["seeds"] == 2
    # the first seed's models are saved and read back to the same readings
    assert sorted(p.name for p in models.iterdir()) == sorted(VARIANTS)
    task = MQARTask(vocab_size=32, seq_len=32, num_pairs=4, conflicts=2)
    inputs, labels = task.sample(16, split_seed("test", 0))
    assert conflict_accuracy(load_model(models / "gdn_2layers"), task, inputs, labels) == runs[2]["accuracy"]
    # --resume trains nothing that is finished, and a subset of the seeds keeps the others' runs
    real_train_mqar = conflicts.train_mqar
    monkeypatch.setattr(conflicts, "train_mqar", lambda *a, **k: pytest.fail("retrained a finished run"))
    main(["controller-ablation", "--out", str(out), "--seeds", "0,1", "--resume", *TINY])
    assert json.loads(out.read_text())["runs"] == runs
    main(["controller-ablation", "--out", str(out), "--seeds", "1", "--variants", "gdn", "--resume", *TINY])
    assert sorted(map(json.dumps, json.loads(out.read_text())["runs"])) == sorted(map(json.dumps, runs))
    # ... unless the model's architecture changed since: then it trains again, and runs of the old revision or
    # of another setting are not kept beside it
    trained = []
    monkeypatch.setattr(conflicts, "train_mqar", lambda *a, **k: trained.append(1) or real_train_mqar(*a, **k))
    monkeypatch.setattr(conflicts, "MODEL_REVISION", conflicts.MODEL_REVISION + 1)
    main(["controller-ablation", "--out", str(out), "--seeds", "1", "--variants", "gdn", "--resume", *TINY])
    result = json.loads(out.read_text())
    assert len(trained) == 1 and len(result["runs"]) == 1 and result["seeds"] == [1]


def test_bad_settings_raise():
    plain = MQARTrainConfig(task=MQARTask(vocab_size=32, seq_len=32, num_pairs=4))
    with pytest.raises(ValueError, match="conflicts"):
        conflicts.train_conflict_ablation(plain, [0])
    with pytest.raises(ValueError, match="variants"):
        conflicts.train_conflict_ablation(MQARTrainConfig(task=DEFAULT_TASK), [0], ["gdn", "lstm"])
    model = load_model(MODELS / "gdn")
    with pytest.raises(ValueError, match="conflicts"):
        conflicts.write_strengths(model, MQARTask(vocab_size=128, seq_len=64, num_pairs=8), torch.zeros(1, 64).long())


def test_neutralise_resets_every_controller_in_any_module():
    blocks = nn.ModuleList(MetacognitiveController(2) for _ in range(3))
    with torch.no_grad():
        for p in blocks.parameters():
            p.add_(1.0)
    assert neutralise_controller_(blocks) == 3
    fresh = MetacognitiveController(2)
    for block in blocks:
        for (name, p), q in zip(block.named_parameters(), fresh.parameters()):
            assert torch.equal(p, q), name


def test_figures_draw_every_variant_and_reading():
    runs = [{"variant": "gdn", "accuracy": {"conflicted": 0.5, "clean": 1.0}},
            {"variant": "gdn+controller", "accuracy": {"conflicted": 0.9, "clean": 1.0},
             "neutralised": {"accuracy": {"conflicted": 0.1, "clean": 0.9}}}]
    fig = viz.conflicts_figure(runs, chance=0.01)
    bars = [trace for trace in fig.data if trace.type == "bar"]
    assert [list(b.x) for b in bars] == [["gdn", "gdn+controller", "gdn+controller, neutralised at test"]] * 2
    assert list(bars[0].y) == [0.5, 0.9, 0.1] and list(bars[1].y) == [1.0, 1.0, 0.9]
    reading = {"conflict": {"3": {"first": 0.8, "second": 0.1}, "6": {"first": 0.7, "second": 0.2}}}
    fig = viz.recall_conflicts_figure({"a": reading, "b": reading})
    assert len(fig.data) == 4 and list(fig.data[0].y) == [0.8, 0.8] and list(fig.data[3].y) == [0.2, 0.2]
