"""The columns dashboard (real SmolLM2, a tiny NeuroLlama saved and reloaded), the NeuroLlama export behind it,
and the column measurements it added to cortexlab.eval.columns / cortexlab.viz.columns."""
import json

import pytest
import torch

from cortexlab.apps import columns as app_columns
from cortexlab.apps import common
from cortexlab.data.corpus import stdlib_tokenizer
from cortexlab.eval import columns as ec
from cortexlab.neuro.backbone import create_neurollama
from cortexlab.neuro.config import NeuroLlamaConfig
from cortexlab.train.lm import load_neurollama, load_neurollama_tokenizer, save_neurollama
from cortexlab.viz import columns as vc

TINY = dict(num_layers=2, hidden_dim=64, num_heads=8, num_kv_heads=4, ffn_dim=128, vocab_size=2048, max_seq_len=64,
            enable_cortical_columns=True, enable_lateral_inhibition=True)


def tiny_neurollama(**overrides):
    torch.manual_seed(0)
    model = create_neurollama(NeuroLlamaConfig.from_preset("small", **{**TINY, **overrides})).eval()
    for layer in model.layers:
        if layer.self_attn.mechanisms.lateral_inhibition is not None:
            layer.self_attn.mechanisms.lateral_inhibition.update_inhibition(torch.rand(1, 5, 4) + 0.1, lr=0.2)
    return model


@pytest.fixture(scope="module")
def neuro(tmp_path_factory):
    """A tiny random NeuroLlama with columns and a non-zero W, through save_neurollama / load_neurollama."""
    folder = save_neurollama(tiny_neurollama(), tmp_path_factory.mktemp("neuro") / "model", {"command": "test"})
    return load_neurollama(folder), stdlib_tokenizer(2048)


@pytest.fixture(scope="module")
def app(neuro):
    return app_columns.ColumnsApp(*common.base_model(), *neuro)


# --- export ------------------------------------------------------------------------------


def test_save_and_load_neurollama(tmp_path):
    model = tiny_neurollama()
    save_neurollama(model, tmp_path, {"command": "x", "heldout_loss": 1.5})
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "config.json", "card.json"}
    assert load_neurollama_tokenizer(tmp_path).get_vocab_size() == 2048   # no tokenizer.json: rebuilt
    assert json.loads((tmp_path / "card.json").read_text())["heldout_loss"] == 1.5
    loaded = load_neurollama(tmp_path)
    assert loaded.config == model.config and not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert b.dtype == torch.float32 and torch.equal(a.half().float(), b), name
    assert ec.learned_inhibition(loaded)[1].abs().sum() > 0           # the learnt W travels with the weights
    ids = torch.randint(0, 2048, (1, 12))
    assert torch.allclose(model(ids)["logits"], loaded(ids)["logits"], atol=2e-2)


def test_command_line_model_out(tmp_path):
    from cortexlab.train.__main__ import main

    main(["neuro-lm", "--out", str(tmp_path / "r.json"), "--model-out", str(tmp_path / "m"), "--steps", "2",
          "--seq-len", "16", "--batch-size", "2", "--eval-windows", "2", "--max-train-files", "2", "--no-progress",
          "--checkpoint-dir", str(tmp_path / "ck")] + [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()
                                                        if k not in ("vocab_size", "max_seq_len")])
    card = json.loads((tmp_path / "m" / "card.json").read_text())
    assert card["heldout_loss"] == json.loads((tmp_path / "r.json").read_text())["heldout"]["loss"]
    assert card["command"].startswith("python -m cortexlab.train neuro-lm") and "commit" in card["git"]
    assert load_neurollama(tmp_path / "m").config.num_kv_heads == 4
    saved = load_neurollama_tokenizer(tmp_path / "m")                  # the tokenizer travels with the model
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    assert saved.encode("def f(x):").ids == stdlib_tokenizer(2048).encode("def f(x):").ids


# --- measurements ------------------------------------------------------------------------


def test_record_neuro_attention_is_the_models_attention():
    model = tiny_neurollama(enable_lateral_inhibition=False)
    ids = torch.randint(0, 2048, (2, 10))
    outputs = {}
    model.layers[1].self_attn.register_forward_hook(lambda m, args, out: outputs.setdefault(1, out))
    records = ec.record_neuro_attention(model, ids, [0, 1])
    rec = records[1]
    assert torch.allclose(model.layers[1].self_attn.o_proj(rec.heads.flatten(2)), outputs[1], atol=1e-5)
    rows = ec.layer_specialization(records, 4)
    assert max(r["max_out_err"] for r in rows) < 1e-5
    matrix = ec.column_js_matrix(rec.probs, 4)
    upper = matrix[torch.triu_indices(4, 4, 1).unbind()]
    assert torch.allclose(matrix, matrix.T) and (matrix.diagonal() == 0).all()
    assert upper.mean().item() == pytest.approx(rows[1]["js_columns"], rel=1e-4)
    with pytest.raises(ValueError, match="Hebbian|hebbian"):
        ec.record_neuro_attention(tiny_neurollama(enable_hebbian_attention=True), ids, [0])


def test_inhibition_effect():
    heads = torch.rand(1, 12, 8, 4)
    none = ec.inhibition_effect(heads, torch.zeros(4, 4), 4)
    assert torch.equal(none["activity_before"], none["activity_after"])
    some = ec.inhibition_effect(heads, torch.full((4, 4), 0.2).fill_diagonal_(0), 4)
    assert (some["mean_after"] < some["mean_before"]).all() and some["corr_after"].shape == (4, 4)
    assert len(vc.inhibition_figure(some).data) == 3
    assert len(vc.column_js_figure(torch.rand(4, 4)).data[0].z) == 4


# --- the app -----------------------------------------------------------------------------


def test_layer_changes_matrix(app):
    assert app.model_name == app_columns.SMOL and app.param.layer.bounds == (0, 29)
    assert len(app.specialization_pane.object.data) == 4          # three JS curves + the attention distance
    z0 = app.matrix_pane.object.data[0].z
    assert len(z0) == 3                                           # SmolLM2: 3 GQA groups
    app.layer = 20
    z20 = app.matrix_pane.object.data[0].z
    assert z20 != z0 and "layer 20" in app.matrix_pane.object.layout.title.text
    assert "layer 20" in app.inhibition_pane.object.layout.title.text.lower()


def test_switch_to_neurollama(app):
    slider = app.controls()[3]                                    # the slider already on the page
    app.layer = 25
    app.model_name = app_columns.NEURO
    assert app.param.layer.bounds == (0, 1) and app.layer == 1 and (slider.end, slider.value) == (1, 1)
    assert len(app.matrix_pane.object.data[0].z) == 4
    assert "learnt W" in app.inhibition_pane.object.layout.title.text
    assert [round(x) for x in app.specialization_pane.object.data[0].x] == [0, 1]
    app.text_input.value = "x = [i * i for i in range(10)]\n" * 8               # > 64 tokens: truncated, said so
    app.run_button.clicks += 1
    assert app.note.visible and "first 64" in app.note.object
    app.model_name = app_columns.SMOL
    assert app.param.layer.bounds == (0, 29)


def test_bad_text_keeps_views(app):
    shown, figure = app.text, app.matrix_pane.object
    for bad in ("   ", "a\x00b", "y" * (common.MAX_TEXT_CHARS + 1)):
        app.text_input.value = bad
        app.run_button.clicks += 1
        assert app.message.visible and app.message.object
        assert app.text == shown and app.matrix_pane.object is figure
    app.text = "Columns compete."
    assert not app.message.visible and app.matrix_pane.object is not figure


def test_failed_model_switch_puts_the_select_back(neuro, monkeypatch):
    app = app_columns.ColumnsApp(*common.base_model(), *neuro, text="Columns compete for tokens.")
    select, analyse = app.controls()[0], app._analyse

    def refuse_neurollama(name, text):
        if name == app_columns.NEURO:
            raise RuntimeError("this model cannot be analysed")
        return analyse(name, text)

    monkeypatch.setattr(app, "_analyse", refuse_neurollama)
    figure = app.specialization_pane.object
    select.value = app_columns.NEURO
    assert app.model_name == app_columns.SMOL and select.value == app_columns.SMOL
    assert app.message.visible and "cannot be analysed" in app.message.object
    assert app.specialization_pane.object is figure and not app.matrix_pane.loading


def test_missing_neurollama_still_shows_smollm2(tmp_path, monkeypatch):
    monkeypatch.setenv("CORTEXLAB_RESULTS", str(tmp_path))
    missing = app_columns.ColumnsApp(*common.base_model(), text="Hello there, columns.")
    assert missing.notice.visible and app_columns.NEURO_DIR in missing.notice.object
    assert missing.param.model_name.objects == [app_columns.SMOL] and missing.matrix_pane.object is not None
    assert app_columns.ColumnsApp.param.model_name.objects == [app_columns.SMOL, app_columns.NEURO]


def test_committed_neurollama():
    model, tokenizer = app_columns.neuro_model()
    card = json.loads((common.results_dir() / app_columns.NEURO_DIR / "card.json").read_text())
    assert model.config.enable_cortical_columns and model.config.enable_lateral_inhibition
    assert card["heldout_loss"] < 6
    ids = torch.tensor([tokenizer.encode("def add(a, b):\n    return a + b\n").ids])
    records = ec.record_neuro_attention(model, ids, list(range(model.config.num_layers)))
    for rec in records.values():
        matrix = ec.column_js_matrix(rec.probs, model.config.num_kv_heads)
        assert torch.allclose(matrix, matrix.T) and (matrix.diagonal() == 0).all() and matrix.sum() > 0
