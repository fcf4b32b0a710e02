"""cortexlab.eval.hook_effects: the quick run's JSON, the held-out windows, the loss and paired statistics."""
import json
import math

import pytest
import torch

from cortexlab.data.corpus import stdlib_modules
from cortexlab.eval import hook_effects
from cortexlab.eval.decode import stdlib_token_ids
from cortexlab.models import tiny_model
from cortexlab.neuro.hooks import InferenceHookConfig, InferenceHookPipeline


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_paired_difference_by_hand():
    d = hook_effects.paired_difference([1.0, 3.0, 5.0], [0.0, 1.0, 2.0])   # differences 1, 2, 3
    assert d == {"mean": pytest.approx(2.0), "se": pytest.approx(1 / math.sqrt(3)), "n": 3}
    skip = hook_effects.paired_difference([1.0, math.nan, 4.0], [0.0, 1.0, 1.0])
    assert skip["n"] == 2 and skip["mean"] == pytest.approx(2.0)
    assert math.isnan(hook_effects.paired_difference([1.0], [0.5])["se"])
    with pytest.raises(ValueError, match="pair up"):
        hook_effects.paired_difference([1.0], [1.0, 2.0])


def test_heldout_windows_are_spread_evenly_over_the_heldout_stream():
    files = stdlib_modules("heldout")
    total = sum(len((p.read_text(encoding="utf-8", errors="replace") + "\n\n").encode()) for p in files)
    stride = total // 3
    windows, names = hook_effects.heldout_windows(None, 3, 40)
    stream, _ = stdlib_token_ids(2 * stride + 40, None, files=files)   # the same stream, UTF-8 bytes
    assert windows.shape == (3, 40)
    for w in range(3):
        assert torch.equal(windows[w], stream[0, w * stride:w * stride + 40])
    assert names[0] == files[0].name and len(set(names)) == 3 and set(names) <= {p.name for p in files}
    with pytest.raises(ValueError, match="window_tokens must be an int >= 2"):
        hook_effects.heldout_windows(None, 3, 1)
    with pytest.raises(ValueError, match="windows must be a positive int"):
        hook_effects.heldout_windows(None, 0, 8)
    with pytest.raises(ValueError, match="too few"):
        hook_effects.heldout_windows(None, 2, total)


def test_window_losses_are_the_models_loss_and_reset_between_windows():
    model = tiny_model("llama")
    windows, _ = hook_effects.heldout_windows(None, 3, 24)
    losses = hook_effects.window_losses(model, windows)
    with torch.no_grad():
        expected = [float(model(w[None], labels=w[None]).loss) for w in windows]
    assert losses == pytest.approx(expected, abs=1e-6)
    # a Hebbian matrix carries over calls until reset: reset per window makes the order irrelevant
    pipe = InferenceHookPipeline(InferenceHookConfig(enable_hebbian=True, hebbian_eta=50.0,
                                                     hebbian_learning_rate=0.5))
    forward = hook_effects.window_losses(model, windows, pipe)
    backward = hook_effects.window_losses(model, windows.flip(0), pipe)
    assert forward == pytest.approx(backward[::-1], abs=1e-9)
    assert forward != pytest.approx(losses, abs=1e-4)   # the hook acts
    assert not pipe.is_attached


def test_pipeline_enables_exactly_one_hook():
    pipe = hook_effects._pipeline("voting_temperature", 3.0, {"layers": [0]})
    cfg = pipe.config
    assert cfg.enable_voting and cfg.voting_temperature == 3.0 and cfg.layers == [0]
    assert not (cfg.enable_hebbian or cfg.enable_habituation or cfg.enable_temperature)
    assert not hook_effects._pipeline().config.any_enabled
    with pytest.raises(ValueError, match="param must be one of"):
        hook_effects._pipeline("eta", 1.0)


def test_quick_run_writes_the_result_structure(tmp_path, capsys):
    import transformers

    out = tmp_path / "hooks.json"
    level = transformers.logging.get_verbosity()
    assert hook_effects.main(["--quick", "--out", str(out)]) == 0
    assert transformers.logging.get_verbosity() == level     # quiet() restored it
    printed = capsys.readouterr().out
    assert "Repetition in greedy decoding" in printed and "Held-out next-token loss" in printed
    res = json.loads(out.read_text())
    assert res["command"] == f"python -m cortexlab.eval.hook_effects --quick --out {out}"
    assert set(res["git"]) == {"commit", "dirty"} and res["environment"]["torch_threads"] == 1
    assert set(res["hook_sources"]) == {f"cortexlab/{p}" for p in hook_effects.HOOK_SOURCES}
    assert res["config"]["model"] == "tiny-llama" and res["config"] == hook_effects.QUICK
    rep = res["repetition"]
    quick = hook_effects.QUICK
    assert len(rep["prompts"]) == quick["prompts"]
    assert [r["setting"] for r in rep["settings"]] == ["baseline"] + [f"habituation_rate={r:g}"
                                                                      for r in quick["habituation_rates"]]
    base = rep["settings"][0]
    assert "diff_vs_baseline" not in base and base["habituation_rate"] == 0.0
    for row in rep["settings"]:
        assert len(row["per_prompt"]) == quick["prompts"] and row["guard_perplexity"] > 1
        assert {"repeated_ngram_rate", "distinct_1", "distinct_2", "distinct_3", "new_tokens"} <= set(row["mean"])
        assert all(isinstance(p["text"], str) and p["new_tokens"] == quick["max_new_tokens"]
                   for p in row["per_prompt"])
    diff = rep["settings"][1]["diff_vs_baseline"]["repeated_ngram_rate"]
    rates = [[p["repeated_ngram_rate"] for p in r["per_prompt"]] for r in rep["settings"][:2]]
    assert diff["mean"] == pytest.approx(sum(a - b for a, b in zip(rates[1], rates[0])) / len(rates[0]))
    loss = res["heldout_loss"]
    assert len(loss["baseline"]["per_window"]) == quick["windows"]
    assert loss["eager_check"]["max_abs_diff_nats"] < 1e-4
    expected = [(p, v) for p, values in quick["loss_settings"].items() for v in values]
    assert [(r["param"], r["value"]) for r in loss["settings"]] == expected
    for row in loss["settings"]:
        assert row["mean_nats"] == pytest.approx(sum(row["per_window"]) / quick["windows"])
        assert row["diff_vs_baseline"]["mean"] == pytest.approx(row["mean_nats"] - loss["baseline"]["mean_nats"])
        assert row["hook"] in {"temperature", "voting", "hebbian", "habituation"}
    assert res["seconds"]["total"] > 0


def test_run_rejects_unknown_parts():
    with pytest.raises(ValueError, match="parts must be"):
        hook_effects.run(hook_effects.QUICK, command="x", parts=("speed",))
