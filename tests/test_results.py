"""cortexlab.results: the committed results folder and its files; cortexlab.models.token_texts."""
import json

import pytest

from cortexlab.models import token_texts
from cortexlab.results import RECALL_ADAPTER, RECALL_RESULT, load_result, results_dir


def test_results_dir_is_the_checkout_folder_or_the_override(tmp_path, monkeypatch):
    assert (results_dir() / "recall_across_calls.json").is_file()
    monkeypatch.setenv("CORTEXLAB_RESULTS", str(tmp_path))
    assert results_dir() == tmp_path
    (tmp_path / "run.json").write_text(json.dumps({"command": "x"}))
    assert load_result("run.json") == {"command": "x"}
    assert load_result("never_run.json") is None
    monkeypatch.setenv("CORTEXLAB_RESULTS", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="CORTEXLAB_RESULTS"):
        results_dir()


def test_the_committed_recall_sidecar_is_the_one_its_results_file_describes():
    card = json.loads((results_dir() / RECALL_ADAPTER / "card.json").read_text())
    result = load_result(RECALL_RESULT)
    assert card["command"] == result["command"] and card["eval"] == result["eval"]
    assert (results_dir() / RECALL_ADAPTER / "cortex.safetensors").stat().st_size == result["adapter"]["bytes"]


@pytest.mark.parametrize("name", ["../secrets.json", "results", "sub/run.json", 3])
def test_load_result_takes_a_json_file_name_only(name):
    with pytest.raises(ValueError, match="name must be"):
        load_result(name)


def test_token_texts_decodes_each_id():
    class Tokenizer:
        def decode(self, ids):
            return {1: "a", 2: " b"}[ids[0]]

    assert token_texts(Tokenizer(), [1, 2]) == ["a", " b"]
