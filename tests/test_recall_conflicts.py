"""cortexlab.train.recall_conflicts: the controller ablation on frozen SmolLM2 with a conflicting key."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from cortexlab.data import RecallTask
from cortexlab.models import default_model_path
from cortexlab.train import episode_forward, neutralise_controller_
from cortexlab.train.__main__ import main
from cortexlab.train.recall_conflicts import ConflictFinetuneConfig, sidecar_without_controller
from conftest import randomise_, tiny_cortex


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


def test_without_controller_computes_what_the_neutralised_controller_computes(tokenizer):
    task = RecallTask(tokenizer, "train", max_filler_chars=20_000)
    batch = task.conflict_batch(3, 2, seed=0)
    model = randomise_(tiny_cortex(tokenizer))
    with torch.no_grad():
        excited = episode_forward(model, batch)
        neutralise_controller_(model)
        neutral = episode_forward(model, batch)
        plain = sidecar_without_controller(model)
        assert not plain.config.controller and all(b.gdn.controller is None for b in plain.sidecars.values())
        torch.testing.assert_close(episode_forward(plain, batch), neutral, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(excited, neutral)      # the controller mattered before it was reset


def test_recipe_writes_readings_before_and_after(tmp_path, one_thread):
    out, adapter = tmp_path / "conflicts.json", tmp_path / "adapter"
    main(["recall-conflicts", "--variant", "controller", "--out", str(out), "--save-adapter", str(adapter),
          "--steps", "1", "--eval-examples", "2", "--eval-batch-size", "2", "--eval-calls", "3", "--no-progress"])
    result = json.loads(out.read_text())
    for reading in ("before", "after", "after_neutralised"):
        first_second = result[reading]["conflict"]["3"]
        assert set(first_second) == {"first", "second"} and 0 <= result[reading]["plain"]["2"] <= 1
    assert result["config"]["adapter"] == "results/adapters/recall_ctrl" and len(result["history"]) == 1
    assert result["config"]["score_prefix"] and 0 <= result["history"][0]["prefix_accuracy"] <= 1   # the space too
    assert (adapter / "cortex.safetensors").is_file() and json.loads((adapter / "card.json").read_text())["after"]
    # the saved sidecar holds the trained controller (restored after the neutralised reading), not zeros
    assert max(abs(x) for w in result["controller_weights"].values() for x in w) > 0
    saved = load_file(adapter / "cortex.safetensors")
    for name, values in result["controller_weights"].items():
        torch.testing.assert_close(saved["layer" + name].flatten(),
                                   torch.tensor(values), atol=1e-4, rtol=0)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="variant"):
        ConflictFinetuneConfig(variant="both")
    with pytest.raises(ValueError, match="calls"):
        ConflictFinetuneConfig(calls=[2])
    with pytest.raises(ValueError, match="plain_fraction"):
        ConflictFinetuneConfig(plain_fraction=1.5)
    with pytest.raises(ValueError, match="controller_lr"):
        ConflictFinetuneConfig(variant="no_controller", controller_lr=0.02)
    with pytest.raises(ValueError, match="score_prefix"):
        ConflictFinetuneConfig(score_prefix="yes")
