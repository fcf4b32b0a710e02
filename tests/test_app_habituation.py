"""The habituation dashboard with the real SmolLM2, and the eval/viz functions it added."""
import panel as pn
import pytest
import torch

from cortexlab.apps import common
from cortexlab.apps.habituation import HabituationApp
from cortexlab.eval.attention import record_attention
from cortexlab.eval.hook_maps import habituation_over_time, hooked_attention
from cortexlab.neuro.hooks import InferenceHookConfig, InferenceHookPipeline
from cortexlab.viz.habituation import attention_before_after_figure

REPEATED = "The quick brown fox jumps over the lazy dog. " * 4


@pytest.fixture(scope="module")
def smollm2():
    return common.base_model()


@pytest.fixture
def app(smollm2):
    return HabituationApp(*smollm2)


def heatmap_z(pane) -> torch.Tensor:
    return torch.tensor(pane.object.data[0].z)


def widget(app, name):
    return next(w for w in app.controls() if w.name == name)


def test_first_view_shows_map_novelty_and_attention(app, smollm2):
    tokens = smollm2[1](app.text).input_ids
    assert heatmap_z(app.map_pane).shape == (9, len(tokens))
    assert len(app.novelty_pane.object.data[0].y) == len(tokens)
    assert [tuple(torch.tensor(t.z).shape) for t in app.attention_pane.object.data] == [(len(tokens),) * 2] * 2
    assert not app.message.visible
    assert {w.name for w in app.controls()} == {"text", "Run", "layer", "habituation rate", "head"}
    assert isinstance(app.page(), pn.template.FastListTemplate)


def test_layer_slider_changes_the_map(app):
    before = heatmap_z(app.map_pane)
    widget(app, "layer").value = 5
    assert app.layer == 5 and "layer 5" in app.map_pane.object.layout.title.text
    assert not torch.equal(heatmap_z(app.map_pane), before)


def test_rate_zero_leaves_no_habituation(app):
    for text in (app.text, REPEATED):
        app.text = text
        app.habituation_rate = 0.0
        assert heatmap_z(app.map_pane).abs().max() == 0
        before, after = (torch.tensor(t.z) for t in app.attention_pane.object.data)
        assert torch.allclose(before, after, atol=1e-6)
        app.habituation_rate = 0.5
        assert heatmap_z(app.map_pane).max() > 0


def test_head_changes_only_the_attention_view(app):
    shown_map, shown_attention = heatmap_z(app.map_pane), app.attention_pane.object
    app.head = 4
    assert torch.equal(heatmap_z(app.map_pane), shown_map)
    assert app.attention_pane.object is not shown_attention and "Head 4" in app.attention_pane.object.layout.title.text


@pytest.mark.parametrize("bad", ["", "   \n", "x" * (common.MAX_TEXT_CHARS + 1), "a fox\x00 jumps"])
def test_bad_text_shows_the_alert_and_keeps_the_views(app, bad):
    shown, text = app.map_pane.object, app.text
    app.text_input.value = bad
    app.run_button.clicks += 1
    assert app.message.visible and app.message.alert_type == "danger" and app.message.object.startswith("text ")
    assert app.map_pane.object is shown and app.text == text
    app.text = REPEATED
    assert not app.message.visible and app.map_pane.object is not shown


def test_validation_is_common_check_text(app, monkeypatch):
    seen = []
    monkeypatch.setattr(common, "check_text", lambda text, name="text", **kw: seen.append(text) or text.strip())
    app.text = REPEATED
    assert seen == [REPEATED]


def test_run_button_reads_the_text_box(app):
    app.text_input.value = "  " + REPEATED
    app.run_button.clicks += 1
    assert app.text == REPEATED.strip()
    assert app.map_pane.object.data[0].x[1].startswith("1:' quick'")


def test_novelty_view_responds_to_a_novel_word(app):
    def bars_of_last_sentence(last_word):
        app.text = REPEATED + f"The quick brown fox jumps over the lazy {last_word}."
        bars = app.novelty_pane.object.data[0]
        return bars.x[-10:], bars.y[-10:]

    labels, novel = bars_of_last_sentence("zebra")
    _, familiar = bars_of_last_sentence("dog")
    assert "zebra" in labels[-2] and novel[-2] == max(novel) and novel[-2] > 10 * familiar[-2]


def test_hooked_attention_equals_the_hooked_forward(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(REPEATED, return_tensors="pt").input_ids
    record = record_attention(model, ids, [3])[3]
    config = InferenceHookConfig(enable_habituation=True, habituation_rate=0.3, layers=[3])
    pipeline = InferenceHookPipeline(config)
    probs = hooked_attention(pipeline, record)
    forward = habituation_over_time(model, InferenceHookPipeline(config), ids, layer=3, every=ids.shape[1])
    assert torch.allclose(pipeline.habituation_map(3)[0], forward[-1][1], atol=1e-5)
    assert pipeline.habituation_map(3).max() > 0
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5)
    assert not torch.allclose(probs, record.probs, atol=1e-3)
    off = InferenceHookPipeline(InferenceHookConfig(enable_habituation=True, habituation_rate=0.0, layers=[3]))
    assert torch.allclose(hooked_attention(off, record), record.probs, atol=1e-6)
    with pytest.raises(ValueError, match="layer 3"):
        hooked_attention(InferenceHookPipeline(InferenceHookConfig(enable_habituation=True, layers=[4])), record)
    with pytest.raises(TypeError, match="pipeline"):
        hooked_attention(config, record)


def test_attention_before_after_figure():
    before = torch.eye(3)
    fig = attention_before_after_figure(before, before / 2, ["a", "b", "c"], title="t")
    assert [torch.tensor(t.z).tolist() for t in fig.data] == [before.tolist(), (before / 2).tolist()]
    assert fig.data[0].x == ("0:'a'", "1:'b'", "2:'c'")
    with pytest.raises(ValueError, match="one shape"):
        attention_before_after_figure(before, torch.eye(2))
