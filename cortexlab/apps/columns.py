"""Cortical columns dashboard: how differently the columns of a model attend, and how they inhibit each other.

Two models: SmolLM2-135M, whose grouped-query attention groups (3 per layer, 3 query heads each) are read as
columns, and the NeuroLlama trained with cortical columns and lateral inhibition on
(`results/models/neurollama_columns`, `python -m cortexlab.train neuro-lm --model-out ...`). Views: the
Jensen-Shannon specialisation per layer with the hierarchical tiers (`specialization_figure`), the JS matrix
between the columns of one layer (`column_js_matrix`), and lateral inhibition on that layer: NeuroLlama's learnt
W applied to the text's column outputs (`inhibition_effect`), or for SmolLM2 a W learnt on the text by 20
anti-Hebbian steps (`inhibition_run`, as in notebook 08).

Everything but the inhibition is computed once per (model, text) -- one forward of at most MAX_TOKENS tokens
-- and kept in a small cache; the inhibition of a layer is computed the first time it is shown (milliseconds), so
moving the layer only redraws two figures.
"""
from __future__ import annotations

import functools
import time
from collections import OrderedDict

import panel as pn
import param
import torch

from cortexlab.apps import APPS, common
from cortexlab.eval import columns as ec
from cortexlab.eval.attention import record_attention
from cortexlab.neuro import HierarchicalColumnOrganizer
from cortexlab.viz import columns as viz

__all__ = ["DEFAULT_TEXT", "INTRO", "NEURO", "NEURO_DIR", "SMOL", "TITLE", "ColumnsApp", "neuro_model"]

TITLE = APPS["columns"][0]
INTRO = (
    "**Cortical columns** are groups of attention heads that share their keys and values (the KV groups of "
    "grouped-query attention). For each layer, the **Jensen-Shannon divergence** between the columns' attention "
    "(each column: the mean of its heads) says how differently they read your text; the shading gives the "
    "layer's **hierarchical tier** (syntactic, semantic, abstract by relative depth). For the chosen layer: the "
    "divergence between every pair of columns, and **lateral inhibition**, where columns that fire together "
    "inhibit each other (correlation of the columns' activity across tokens, before and after, and the weights "
    "W). Compare SmolLM2's GQA groups with the small NeuroLlama trained with columns and inhibition on. Press "
    "*Run* after editing the text."
)
SMOL = "SmolLM2 (GQA groups)"
NEURO = "NeuroLlama (trained columns)"
NEURO_DIR = "models/neurollama_columns"          # inside common.results_dir()
NEURO_COMMAND = ("python -m cortexlab.train neuro-lm --out results/neurollama_columns.json --model-out "
                 "results/models/neurollama_columns --set enable_cortical_columns=true "
                 "--set enable_lateral_inhibition=true --set num_kv_heads=4 ...")
DEFAULT_TEXT = ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n"
                "    for _ in range(n):\n        a, b = b, a + b\n    return a\n")
MAX_TOKENS = 256                # tokens analysed: the recorded attention and its JS cost grow as T^2
RESULTS_KEPT = 4                # (model, text) analyses in memory; each holds the per-head outputs [T, H, D] per layer
RECORD_BYTES = 300 * 2 ** 20    # recorded attention per forward (scores + probabilities of the layers recorded)
INHIBITION_STEPS = 20           # anti-Hebbian steps of SmolLM2's W, learnt on the text (notebook 08)


@functools.cache
def _neuro_model(path: str):
    from cortexlab.train.lm import load_neurollama, load_neurollama_tokenizer

    model = load_neurollama(path)
    return model, load_neurollama_tokenizer(path)


def neuro_model():
    """(the committed trained NeuroLlama, its stdlib BPE tokenizer), once per process; None when it is absent."""
    path = common.results_dir() / NEURO_DIR
    if not (path / "model.safetensors").is_file():
        return None
    return _neuro_model(str(path))


class ColumnsApp(pn.viewable.Viewer):
    """Column specialisation, the JS matrix between columns and lateral inhibition, for SmolLM2 or NeuroLlama."""

    model_name = param.Selector(default=SMOL, objects=[SMOL, NEURO], doc="whose columns are shown")
    text = param.String(default=DEFAULT_TEXT, doc="the text the model reads (validated by common.check_text)")
    layer = param.Integer(default=0, bounds=(0, 29), doc="layer of the column matrix and inhibition views")

    def __init__(self, base=None, tokenizer=None, neuro=None, neuro_tokenizer=None, **params):
        """base/tokenizer: SmolLM2 (default `common.base_model()`); neuro/neuro_tokenizer: a NeuroLlama with
        cortical columns and its tokenizer (default the committed one, `neuro_model()`, if present)."""
        if (base is None) != (tokenizer is None) or (neuro is None) != (neuro_tokenizer is None):
            raise ValueError("pass each model together with its tokenizer, or neither")
        if base is None:
            base, tokenizer = common.base_model()
        if neuro is None:
            neuro, neuro_tokenizer = neuro_model() or (None, None)
        self.models = {SMOL: (base, tokenizer)}
        if neuro is not None:
            self.models[NEURO] = (neuro, neuro_tokenizer)
        self._results: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self.compute_seconds = 0.0     # wall clock of the last (model, text) analysis (0 when cached)
        self.message = pn.pane.Alert("", alert_type="danger", visible=False)
        self.notice = pn.pane.Alert(
            f"No trained NeuroLlama in `results/{NEURO_DIR}`: only SmolLM2 is shown. Train one with "
            f"`{NEURO_COMMAND}`.", alert_type="warning", visible=neuro is None)
        self.note = pn.pane.Markdown("", visible=False)
        self.specialization_pane = pn.pane.Plotly(height=420, sizing_mode="stretch_width")
        self.matrix_pane = pn.pane.Plotly(height=380, sizing_mode="stretch_width")
        self.inhibition_pane = pn.pane.Plotly(height=360, sizing_mode="stretch_width")
        super().__init__(**params)
        self.param.model_name.objects = list(self.models)    # after __init__: this instance's copy of the parameter
        if self.model_name not in self.models:
            raise ValueError(f"model_name must be one of {list(self.models)}, got {self.model_name!r}")
        with param.parameterized.discard_events(self):
            self.text = common.check_text(self.text)
        self._shown = None             # the (model, text) on display
        self.text_input = pn.widgets.TextAreaInput(label="text", value=self.text, height=200,
                                                   max_length=common.MAX_TEXT_CHARS)
        self.run_button = pn.widgets.Button(label="Run", color="primary")
        self.run_button.on_click(lambda _: setattr(self, "text", self.text_input.value))
        self._new_input()

    def controls(self) -> pn.Column:
        """The sidebar: the model, the text with its Run button, and the layer."""
        return pn.Column(
            pn.widgets.Select.from_param(self.param.model_name, label="model"),
            self.text_input, self.run_button,
            pn.widgets.IntSlider.from_param(self.param.layer, label="layer"),
        )

    def __panel__(self) -> pn.Column:
        return pn.Column(self.notice, self.message, self.note, self.specialization_pane, self.matrix_pane,
                         self.inhibition_pane, sizing_mode="stretch_width")

    def page(self) -> pn.template.FastListTemplate:
        return common.page(TITLE, INTRO, self, sidebar=[self.controls()])

    @param.depends("model_name", "text", watch=True)
    def _new_input(self):
        """Analyse (model, text) -- or show why not, keeping the last good views -- and redraw everything."""
        if (self.model_name, self.text) == self._shown:
            return
        panes = (self.specialization_pane, self.matrix_pane, self.inhibition_pane)
        try:
            for pane in panes:
                pane.loading = True
            text = common.check_text(self.text)
            result = self._result(self.model_name, text)
        except Exception as error:        # shown on the page; the last good (model, text) comes back, widgets too
            if self._shown is None:
                raise
            self.param.update(model_name=self._shown[0], text=self._shown[1])   # no redraw: they are on display
            self.message.object, self.message.visible = str(error), True
            return
        finally:
            for pane in panes:
                pane.loading = False
        with param.parameterized.discard_events(self):
            self.text = text
            self.layer = min(self.layer, result["num_layers"] - 1)
        self._shown = (self.model_name, text)
        self.param.layer.bounds = (0, result["num_layers"] - 1)     # with events: the slider on the page follows
        self.param.trigger("layer")   # _show_layer redraws the layer views
        self.message.visible = False
        self.note.object, self.note.visible = result["note"], bool(result["note"])
        self.specialization_pane.object = result["figure"]

    @param.depends("layer", watch=True)
    def _show_layer(self):
        """Redraw the column JS matrix and the inhibition view of the chosen layer from the cached analysis."""
        result = self._results[self._shown]
        layer, tier = self.layer, result["tiers"][self.layer]
        self.matrix_pane.object = viz.column_js_figure(
            result["matrices"][layer], title=f"{self._shown[0]}, layer {layer} ({tier}): JS between columns")
        heads, learnt, groups = result["heads"][layer], result["learnt"].get(layer), result["num_groups"]
        if layer not in result["inhibition"]:
            result["inhibition"][layer] = (
                ec.inhibition_run(heads, heads, groups, steps=INHIBITION_STEPS) if learnt is None
                else ec.inhibition_effect(heads, learnt, groups))
        how = "learnt W" if learnt is not None else f"W learnt on this text ({INHIBITION_STEPS} anti-Hebbian steps)"
        self.inhibition_pane.object = viz.inhibition_figure(
            result["inhibition"][layer], title=f"Layer {layer}: lateral inhibition, {how}")

    def _result(self, name: str, text: str) -> dict:
        """The analysis of (model, text), computed once and kept for the last RESULTS_KEPT pairs."""
        key = (name, text)
        if key not in self._results:
            start = time.perf_counter()
            self._results[key] = self._analyse(name, text)
            self.compute_seconds = time.perf_counter() - start
            if len(self._results) > RESULTS_KEPT:
                self._results.popitem(last=False)
        else:
            self.compute_seconds = 0.0
        self._results.move_to_end(key)
        return self._results[key]

    def _analyse(self, name: str, text: str) -> dict:
        """Per layer: specialisation row, column JS matrix, attention distance, head outputs; the tiers' figure."""
        model, tokenizer = self.models[name]
        if name == SMOL:
            ids = tokenizer(text, return_tensors="pt").input_ids
            num_layers, num_groups = model.config.num_hidden_layers, model.config.num_key_value_heads
            heads, record, limit = model.config.num_attention_heads, record_attention, MAX_TOKENS
            learnt = {}
        else:
            ids = torch.tensor([tokenizer.encode(text).ids])
            num_layers, num_groups, heads = model.config.num_layers, model.config.num_kv_heads, model.config.num_heads
            record, learnt = ec.record_neuro_attention, ec.learned_inhibition(model)
            limit = min(MAX_TOKENS, model.config.max_seq_len)
        note = ""
        if ids.shape[1] > limit:
            note = f"{name.split()[0]} analyses at most {limit} tokens here: the first {limit} of your {ids.shape[1]}."
            ids = ids[:, :limit]
        if ids.shape[1] < 2:
            raise ValueError("text is a single token: enter a few words")
        per_forward = max(1, RECORD_BYTES // (8 * heads * ids.shape[1] ** 2))
        rows, matrices, head_outputs, distance = [], {}, {}, []
        for start in range(0, num_layers, per_forward):
            records = record(model, ids, list(range(start, min(num_layers, start + per_forward))))
            rows += ec.layer_specialization(records, num_groups)
            for layer, rec in records.items():
                matrices[layer] = ec.column_js_matrix(rec.probs, num_groups)
                distance.append(ec.attention_distance(rec.probs))
                head_outputs[layer] = rec.heads
        organizer = HierarchicalColumnOrganizer(num_layers, num_groups)
        tiers = [organizer.get_tier(layer) for layer in range(num_layers)]
        figure = viz.specialization_figure(
            rows, tiers, distance=distance,
            title=f"{name}: column specialisation per layer ({num_groups} columns, {ids.shape[1]} tokens)")
        return {"num_layers": num_layers, "num_groups": num_groups, "tiers": tiers, "matrices": matrices,
                "heads": head_outputs, "learnt": learnt, "inhibition": {}, "figure": figure, "note": note}
