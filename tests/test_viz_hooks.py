"""Figures of the inference hooks: each builder shows the numbers it is given, in order, and rejects empty input."""
import math

import pytest
import torch

from cortexlab.viz import hooks as viz


def repetition(rates=(0.0, 1.0, 0.1)):
    return {"settings": [{"habituation_rate": r, "guard_perplexity": 2.0 + r,
                          "mean": {"repeated_ngram_rate": 0.5 - r / 4, "distinct_2": 0.4 + r / 4, "new_tokens": 100}}
                         for r in rates]}


def test_repetition_figure_sorts_by_rate_and_plots_the_guard_on_the_second_axis():
    fig = viz.repetition_figure(repetition())
    names = [t.name for t in fig.data]
    assert names == ["repeated ngram rate", "distinct 2", "guard perplexity (unhooked model)"]
    assert list(fig.data[0].x) == ["0 (off)", "0.1", "1.0"]
    assert list(fig.data[0].y) == [0.5, 0.475, 0.25]
    assert fig.data[2].yaxis == "y2" and list(fig.data[2].y) == [2.0, 2.1, 3.0]
    with pytest.raises(ValueError, match="settings"):
        viz.repetition_figure({"settings": []})


def test_loss_effects_figure_groups_by_hook_with_error_bars():
    loss = {"baseline": {"mean_nats": 2.5},
            "settings": [{"hook": "temperature", "param": "temperature_strength", "value": v,
                          "diff_vs_baseline": {"mean": v / 100, "se": 0.001}} for v in (0.5, 1.0)]
            + [{"hook": "voting", "param": "voting_temperature", "value": math.inf,
                "diff_vs_baseline": {"mean": 0.0, "se": 0.0}}]}
    fig = viz.loss_effects_figure(loss)
    assert [t.name for t in fig.data] == ["temperature", "voting"]
    assert list(fig.data[0].y) == [0.005, 0.01] and list(fig.data[0].error_y.array) == [0.001, 0.001]
    assert "2.500" in fig.layout.title.text
    with pytest.raises(ValueError, match="settings"):
        viz.loss_effects_figure({"baseline": {"mean_nats": 1.0}, "settings": []})


def test_habituation_growth_figure_pads_unread_keys_and_shows_the_last_snapshot():
    snaps = [(2, torch.tensor([[0.0, 0.5], [0.1, 0.2]])), (3, torch.tensor([[0.0, 0.6, 0.2], [0.1, 0.3, 0.0]]))]
    fig = viz.habituation_growth_figure(snaps, ["a", "b", "c"])
    assert len(fig.data) == 2 and [t.visible for t in fig.data] == [False, True]
    assert list(fig.data[0].z[0]) == [0.0, 0.5, None]
    assert [s.label for s in fig.layout.sliders[0].steps] == ["2", "3"]
    assert fig.data[1].zmax == pytest.approx(0.6)
    with pytest.raises(ValueError, match="snapshots"):
        viz.habituation_growth_figure([])
