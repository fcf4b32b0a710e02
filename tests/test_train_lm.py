"""cortexlab.train.lm: NeuroLlama learns held-out text, resumes exactly, and the ablation reports every variant."""
import json
import math
import shutil

import pytest
import torch

from cortexlab.train import LMTrainConfig, evaluate_lm, train_lm, train_lm_ablation
from cortexlab.train.__main__ import main

TINY = {"num_layers": 2, "hidden_dim": 64, "num_heads": 4, "num_kv_heads": 2, "ffn_dim": 128}


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CORTEXLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))   # tokenizer cache


def tiny_cfg(**kw):
    return LMTrainConfig(**{"overrides": dict(TINY), "vocab_size": 300, "seq_len": 32, "batch_size": 4,
                            "steps": 40, "lr": 1e-2, "warmup_steps": 5, "eval_every": 20, "eval_windows": 8,
                            "checkpoint_every": 20, "max_train_files": 4, **kw})


def test_training_lowers_heldout_loss():
    result = train_lm(tiny_cfg(), progress=False)
    first, last = result["evals"][0]["heldout_loss"], result["heldout"]["loss"]
    assert result["history"][0]["loss"] == pytest.approx(math.log(300), abs=0.3)   # starts at chance
    assert last < math.log(300) - 1.0 and last <= first
    assert len(result["heldout"]["loss_by_position"]) == 32
    assert set(result["data"]["train"]["files"]).isdisjoint(result["data"]["heldout"]["files"])
    again = evaluate_lm(result["model"], torch.zeros(2, 33, dtype=torch.long))
    assert again["tokens"] == 64


def test_resume_continues_exactly(tmp_path):
    full = train_lm(tiny_cfg(steps=20, checkpoint_every=10), progress=False, checkpoint_dir=tmp_path)
    # interrupted after step 10: only that checkpoint is left
    shutil.rmtree(tmp_path / "step-000020")
    (tmp_path / "latest.json").write_text(json.dumps({"checkpoint": "step-000010", "step": 10}))
    resumed = train_lm(tiny_cfg(steps=20, checkpoint_every=10), progress=False, checkpoint_dir=tmp_path, resume=True)
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in full["history"]], abs=1e-4)
    assert resumed["heldout"]["loss"] == pytest.approx(full["heldout"]["loss"], abs=1e-4)
    with pytest.raises(ValueError, match="different config"):
        train_lm(tiny_cfg(steps=20, checkpoint_every=10, lr=5e-3), progress=False, checkpoint_dir=tmp_path,
                 resume=True)


def test_ablation_and_command_line(tmp_path):
    out = tmp_path / "ablation.json"
    argv = ["neuro-ablation", "--out", str(out), "--variants", "baseline,synaptic_static", "--seeds", "0,1",
            "--steps", "4", "--vocab-size", "300", "--seq-len", "16", "--batch-size", "2", "--eval-windows", "2",
            "--max-train-files", "2", "--no-progress", "--checkpoint-dir", str(tmp_path / "runs")]
    main(argv + [f"--set={k}={v}" for k, v in TINY.items()])
    result = json.loads(out.read_text())
    table = result["table"]
    assert result["complete"] and set(table) == {"baseline", "synaptic_static"}
    assert table["baseline"]["mean_delta_vs_baseline"] == 0 and set(table["baseline"]["heldout_loss"]) == {"0", "1"}
    paired = [table["synaptic_static"]["heldout_loss"][s] - table["baseline"]["heldout_loss"][s] for s in "01"]
    assert table["synaptic_static"]["mean_delta_vs_baseline"] == pytest.approx(sum(paired) / 2, abs=1e-4)
    assert result["runs"]["synaptic_static"]["1"]["model_config"]["enable_synaptic_modulation"] is True
    assert result["runs"]["synaptic_static"]["1"]["config"]["seed"] == 1
    assert result["command"].startswith("python -m cortexlab.train neuro-ablation")
    with pytest.raises(ValueError, match="variants"):
        train_lm_ablation(tiny_cfg(), {"hebbian": {}})


def test_bad_config():
    with pytest.raises(ValueError, match="steps"):
        tiny_cfg(steps=0)
    with pytest.raises(ValueError, match="preset"):
        tiny_cfg(preset="1T")
    with pytest.raises(ValueError, match="hidden_dim|num_heads"):
        tiny_cfg(overrides={**TINY, "num_heads": 5})


def test_a_fresh_run_removes_only_its_own_checkpoints(tmp_path):
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    train_lm(tiny_cfg(steps=2, checkpoint_every=1, eval_every=2), progress=False, checkpoint_dir=tmp_path)
    train_lm(tiny_cfg(steps=1, checkpoint_every=1, eval_every=1), progress=False, checkpoint_dir=tmp_path)
    assert keep.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000001"]
