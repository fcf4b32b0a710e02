"""Habituation dashboard: SmolLM2 reads the user's text with the habituation hook on one layer.

Views: the habituation map h (heads x key tokens) the hook leaves after the text, the novelty boost of each
token (`NoveltyDetector` on the layer's input), and one head's attention before vs after habituation.

The layer's attention is recorded once per (text, layer) (`record_attention`, one forward) and kept in a
small cache; the hook then runs on the recorded scores (`hooked_attention`), so moving the rate or the head
costs milliseconds and only a new text or layer runs the model.
"""
from __future__ import annotations

from collections import OrderedDict

import panel as pn
import param

from cortexlab.apps import APPS, common
from cortexlab.eval import habituation as eval_habituation
from cortexlab.eval.attention import AttentionRecord, record_attention
from cortexlab.eval.hook_maps import hooked_attention
from cortexlab.models import token_texts
from cortexlab.neuro.hooks import InferenceHookConfig, InferenceHookPipeline
from cortexlab.viz import habituation as viz

__all__ = ["DEFAULT_TEXT", "HabituationApp", "INTRO", "TITLE"]

TITLE = APPS["habituation"][0]
INTRO = (
    "SmolLM2-135M reads your text with the **habituation hook** on one layer: keys that keep drawing attention "
    "build up a suppression *h* (at most 0.9) that lowers the attention later queries pay them; the first token "
    "(the attention sink) is shielded. Below: the map *h* the hook leaves after the text (heads x key tokens), "
    "the **novelty boost** of each token (how unlike the earlier tokens the layer's input is), and one head's "
    "attention **before vs after** habituation. Press *Run* after editing the text."
)
DEFAULT_TEXT = ("Read the following text.\n" + "The quick brown fox jumps over the lazy dog. " * 3
                + "The quick brown fox jumps over the lazy zebra.")
MAX_TOKENS = 256     # the before/after view draws two T x T heatmaps
RECORDS_KEPT = 8      # (text, layer) attention records in memory, each [H, T, T] scores and probabilities


class HabituationApp(pn.viewable.Viewer):
    """The habituation map, novelty boosts and attention before/after habituation of the user's text."""

    text = param.String(default=DEFAULT_TEXT, doc="the text SmolLM2 reads (validated by common.check_text)")
    layer = param.Integer(default=17, bounds=(0, 29), doc="decoder layer the hook acts on")
    habituation_rate = param.Number(default=0.1, bounds=(0.0, 1.0), step=0.01, doc="suppression per unit exposure")
    head = param.Integer(default=0, bounds=(0, 8), doc="attention head of the before/after view")

    def __init__(self, model=None, tokenizer=None, **params):
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer, or neither")
        if model is None:
            model, tokenizer = common.base_model()
        self.model, self.tokenizer = model, tokenizer
        self._records: OrderedDict[tuple[str, int], AttentionRecord] = OrderedDict()
        self.message = pn.pane.Alert("", alert_type="danger", visible=False)
        self.map_pane = pn.pane.Plotly(height=380, sizing_mode="stretch_width")
        self.novelty_pane = pn.pane.Plotly(height=340, sizing_mode="stretch_width")
        self.attention_pane = pn.pane.Plotly(height=440, sizing_mode="stretch_width")
        super().__init__(**params)
        self.param.layer.bounds = (0, model.config.num_hidden_layers - 1)   # this instance's copies of the parameters
        self.param.head.bounds = (0, model.config.num_attention_heads - 1)
        with param.parameterized.discard_events(self):
            self.text = self._shown_text = common.check_text(self.text)
        self.text_input = pn.widgets.TextAreaInput(label="text", value=self.text, height=180,
                                                   max_length=common.MAX_TEXT_CHARS)
        self.run_button = pn.widgets.Button(label="Run", color="primary")
        self.run_button.on_click(lambda _: setattr(self, "text", self.text_input.value))
        self._show()

    def controls(self) -> pn.Column:
        """The sidebar: the text with its Run button, and the layer, rate and head sliders."""
        return pn.Column(
            self.text_input, self.run_button,
            pn.widgets.IntSlider.from_param(self.param.layer, label="layer"),
            pn.widgets.FloatSlider.from_param(self.param.habituation_rate, label="habituation rate"),
            pn.widgets.IntSlider.from_param(self.param.head, label="head"),
        )

    def __panel__(self) -> pn.Column:
        return pn.Column(self.message, self.map_pane, self.novelty_pane, self.attention_pane,
                         sizing_mode="stretch_width")

    def page(self) -> pn.template.FastListTemplate:
        return common.page(TITLE, INTRO, self, sidebar=[self.controls()])

    @param.depends("text", watch=True)
    def _new_text(self):
        try:
            text = common.check_text(self.text)
            common.check_tokens(self._tokens(text)[0], "text", max_tokens=MAX_TOKENS)
        except ValueError as error:
            self.message.object, self.message.visible = str(error), True
            with param.parameterized.discard_events(self):
                self.text = self._shown_text          # the views keep showing the last good text
            return
        with param.parameterized.discard_events(self):
            self.text = text
        self._show()

    @param.depends("layer", "habituation_rate", "head", watch=True)
    def _show(self):
        """Recompute and redraw the three views for the current text, layer, rate and head."""
        panes = (self.map_pane, self.novelty_pane, self.attention_pane)
        for pane in panes:
            pane.loading = True
        try:
            ids, tokens = self._tokens(self.text)
            record = self._record(self.text, ids, self.layer)
            pipeline = InferenceHookPipeline(InferenceHookConfig(
                enable_habituation=True, habituation_rate=self.habituation_rate, layers=[self.layer]))
            habituated = hooked_attention(pipeline, record)
            where = f"layer {self.layer}, rate {self.habituation_rate:g}"
            self.map_pane.object = viz.habituation_map_figure(
                pipeline.habituation_map(self.layer)[0], tokens, zmax=pipeline.config.max_habituation,
                title=f"Habituation map after the text ({where})")
            self.novelty_pane.object = viz.token_bars(
                eval_habituation.novelty(record)[0], tokens, yaxis="novelty boost n",
                title=f"Novelty of each token at the input of layer {self.layer}")
            self.attention_pane.object = viz.attention_before_after_figure(
                record.probs[0, self.head], habituated[0, self.head], tokens,
                title=f"Head {self.head}: attention before vs after habituation ({where})")
            self._shown_text = self.text
            self.message.visible = False
        finally:
            for pane in panes:
                pane.loading = False

    def _tokens(self, text: str):
        ids = self.tokenizer(text, return_tensors="pt").input_ids
        return ids, token_texts(self.tokenizer, ids[0])

    def _record(self, text: str, ids, layer: int) -> AttentionRecord:
        """The layer's attention record for the text: one forward, kept for the last RECORDS_KEPT (text, layer)."""
        key = (text, layer)
        if key not in self._records:
            self._records[key] = record_attention(self.model, ids, [layer])[layer]
            if len(self._records) > RECORDS_KEPT:
                self._records.popitem(last=False)
        self._records.move_to_end(key)
        return self._records[key]
