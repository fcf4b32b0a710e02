"""cortexlab.eval.filler_damage: every filler call of a split ranked by how far it moves the answer's read-out."""
import json

import pytest
from transformers import AutoTokenizer

import cortexlab.eval.filler_damage as filler_damage_eval
from conftest import randomise_, tiny_cortex
from cortexlab.data import RecallTask, filler_windows
from cortexlab.data.recall import _docstrings, filler_files
from cortexlab.eval.filler_damage import answer_damage, window_damage
from cortexlab.models import default_model_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


def test_filler_windows_cut_each_module_into_whole_calls(tokenizer):
    windows = filler_windows(tokenizer, "heldout", 64)
    first = next(path for path in filler_files("heldout") if path.name == "pickletools.py")
    ids = [i for doc in _docstrings(first) for i in tokenizer.encode(" " + doc, add_special_tokens=False)]
    own = [w for w in windows if w[0] == first.name]
    assert [w[1] for w in own] == list(range(0, 64 * len(own), 64)) and len(ids) - 64 < 64 * len(own) <= len(ids)
    assert [i for w in own for i in w[2]] == ids[:64 * len(own)] and len(own) >= 10
    assert all(len(w[2]) == 64 for w in windows)
    assert not {w[0] for w in windows} & {w[0] for w in filler_windows(tokenizer, "train", 64)}
    with pytest.raises(ValueError, match="call_tokens"):
        filler_windows(tokenizer, "heldout", 8)


def test_answer_damage_is_nothing_for_a_ghost_sidecar_and_something_for_a_trained_one(tokenizer):
    task = RecallTask(tokenizer, "heldout", call_tokens=32)
    call = task.filler_calls(1, seed=2)[0]
    ghost = tiny_cortex(tokenizer, controller=True)             # zero-init output: the memory changes nothing
    assert answer_damage(ghost, task, call, episodes=3, seed=1, repeats=2)["nats"] == 0
    live = randomise_(tiny_cortex(tokenizer, controller=True))
    assert answer_damage(live, task, call, episodes=3, seed=1, repeats=2)["nats"] != 0
    assert (window_damage(ghost, task, task.filler_calls(3, seed=2), episodes=2) == 0).all()   # not 0 / 0
    assert (window_damage(live, task, task.filler_calls(3, seed=2), episodes=2) > 0).all()
    with pytest.raises(ValueError, match="repeats"):
        answer_damage(live, task, call, repeats=0)


def test_the_command_ranks_each_split_and_checks_the_top_on_the_answer(tokenizer, tmp_path, monkeypatch):
    few = {split: filler_windows(tokenizer, split, 128)[:10] for split in ("train", "heldout")}
    monkeypatch.setattr(filler_damage_eval, "filler_windows", lambda tok, split, T: few[split])
    result = filler_damage_eval.main(["--out", str(tmp_path / "d.json"), "--top", "2", "--episodes", "2",
                                      "--repeats", "1", "--threads", "2"])
    assert json.loads((tmp_path / "d.json").read_text())["splits"].keys() == {"train", "heldout"}
    for split, report in result["splits"].items():
        assert report["windows"] == 10
        top, others = [t["damage"] for t in report["top"]], [t["damage"] for t in report["random"]]
        assert top == sorted(top, reverse=True) and min(top) >= max(others) and len(others) == 2
        assert {t["file"] for t in report["top"]} <= {w[0] for w in few[split]}
        assert all(0 <= t["answer"]["exact_match"] <= 1 for t in report["top"] + report["random"])
    with pytest.raises(ValueError, match="top=6"):
        filler_damage_eval.main(["--out", str(tmp_path / "e.json"), "--top", "6", "--episodes", "1"])
