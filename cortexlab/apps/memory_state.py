"""Memory state: what a trained Cortex sidecar writes while it reads your text, and what it recalls later.

SmolLM2-135M-Instruct with the committed recall sidecar (`cortexlab.results.RECALL_ADAPTER`: one
Gated DeltaNet memory of 4 heads x 64 x 64 on decoder layer 6, with its metacognitive
controller) reads each text as one call of a session. The page shows the memory S of a head
as a heatmap (the player scrubs through the tokens), its norm and effective rank, the gates
(write strength beta_t, forget gate a_t), the prediction error and the controller's signals.
The recall probe asks a question in a later call: the base model's context holds only the
question, so a right answer can only come from the memory; the same question with the
memory reset is the baseline beside it.
"""
from __future__ import annotations

import functools

import panel as pn
import param
import torch

from cortexlab.data.recall import filler_token_pool
from cortexlab.eval.session_view import read_call, recall_probe
from cortexlab.models import token_texts
from cortexlab.viz.controller import signals_figure
from cortexlab.viz.cortex import read_figure, state_heatmap, state_summary_figure, trace_figure

from . import APPS, common

__all__ = ["MemoryStateApp"]

TITLE = APPS["memory_state"][0]
INTRO = (
    f"A frozen **SmolLM2-135M-Instruct** with the committed Cortex sidecar (`results/{common.RECALL_ADAPTER}`, a "
    "Gated DeltaNet memory on layer 6, trained to carry a pass key across calls). **Read** a text into the "
    "session: each read is one call, and the model's own context restarts at every call, so only the memory "
    "S carries anything from one call to the next. **Ask** a question in a later call and compare the answer "
    "with the one given with the memory reset (the baseline). Each browser tab has its own sessions."
)
DEFAULT_TEXT = ("Alice moved to Lisbon in the spring. The pass key is 40213. Remember it. She found a small flat "
                "near the river and started a new job at the harbour office.")
DEFAULT_QUESTION = "What is the pass key? The pass key is"
SESSIONS = ("session 1", "session 2", "session 3")
FILLER_CALL_TOKENS = 128     # the call length the recall sidecar was trained on
MAX_QUESTION_CHARS = 300


@functools.cache
def _filler_pool(tokenizer) -> torch.Tensor:
    """Held-out stdlib docstrings as token ids (the recall task's held-out filler)."""
    return filler_token_pool(tokenizer, "heldout", 20_000)[0]


class MemoryStateApp(pn.viewable.Viewer):
    """The memory-state dashboard (see the module docstring); one instance per browser session."""

    session = param.Selector(default=SESSIONS[0], objects=list(SESSIONS))
    head = param.Integer(default=0, bounds=(0, None))
    token = param.Integer(default=0, bounds=(0, None), doc="checkpoint shown in the heatmap")

    def __init__(self, model=None, **params):
        self.model = model if model is not None else common.cortex_model()
        super().__init__(**params)
        self.tokenizer = self.model.tokenizer
        self.layer = self.model.layer_ids[0]       # the sidecar shown (the committed adapter has one, on layer 6)
        self.param.head.bounds = (0, self.model.config.num_heads - 1)
        self._prefix = common.browser_session_id()
        self.view = None          # the last CallView of the current session
        self.tokens: list[str] = []
        self.history: dict[str, list[str]] = {name: [] for name in SESSIONS}
        self.views: dict[str, tuple] = {}   # session -> (CallView, tokens) of its last call

        self.text_input = pn.widgets.TextAreaInput(label="text to read (one call)", value=DEFAULT_TEXT, height=160,
                                                   max_length=common.MAX_TEXT_CHARS)
        self.read_button = pn.widgets.Button(label="Read into memory", color="primary")
        self.filler_button = pn.widgets.Button(label="Read a filler call (128 tokens)")
        self.reset_button = pn.widgets.Button(label="Reset this session", color="warning")
        self.question_input = pn.widgets.TextInput(label="question (a later call)", value=DEFAULT_QUESTION,
                                                   max_length=MAX_QUESTION_CHARS)
        self.ask_button = pn.widgets.Button(label="Ask", color="success")
        self.player = pn.widgets.Player(label="token", start=0, end=1, value=0, interval=150, loop_policy="once",
                                        width=320)
        self.message = pn.pane.Alert("", alert_type="danger", visible=False)
        self.status = pn.pane.Markdown("")
        self.heatmap_pane = pn.pane.Plotly(height=440, sizing_mode="stretch_width")
        self.summary_pane = pn.pane.Plotly(height=440, sizing_mode="stretch_width")
        self.gates_pane = pn.pane.Plotly(height=700, sizing_mode="stretch_width")
        self.signals_pane = pn.pane.Plotly(height=560, sizing_mode="stretch_width")
        self.answer = pn.pane.Markdown("")
        self.read_pane = pn.pane.Plotly(height=340, sizing_mode="stretch_width", visible=False)

        self.read_button.on_click(lambda _: self.read(self.text_input.value))
        self.filler_button.on_click(lambda _: self.read_filler())
        self.reset_button.on_click(lambda _: self.reset())
        self.ask_button.on_click(lambda _: self.ask(self.question_input.value))
        self.player.param.watch(lambda event: setattr(self, "token", event.new), "value")
        if pn.state.curdoc is not None:          # served: free this tab's sessions when the tab goes away
            pn.state.on_session_destroyed(lambda context: self.close())
        self.read(DEFAULT_TEXT)

    # ------------------------------------------------------------------ actions
    def _session_id(self, session: str | None = None) -> str:
        return f"app-{self._prefix}-{SESSIONS.index(session or self.session) + 1}"

    def _fail(self, error: Exception) -> None:
        self.message.object = str(error)
        self.message.visible = True

    def read(self, text: str) -> bool:
        """Read `text` into the current session as one call; False (and a message) on bad input."""
        try:
            text = common.check_text(text, "text")
            ids = self.tokenizer(text, return_tensors="pt").input_ids
            common.check_tokens(ids, "text")
        except ValueError as error:
            self._fail(error)
            return False
        return self._read_ids(ids, text)

    def read_filler(self) -> None:
        """Read one call of held-out filler text (stdlib docstrings), pushing earlier calls further back."""
        pool = _filler_pool(self.tokenizer)
        generator = torch.Generator().manual_seed(len(self.history[self.session]) + 7919 * SESSIONS.index(self.session))
        start = int(torch.randint(len(pool) - FILLER_CALL_TOKENS, (1,), generator=generator))
        ids = pool[start:start + FILLER_CALL_TOKENS][None]
        self._read_ids(ids, "(filler) " + self.tokenizer.decode(ids[0]))

    def _read_ids(self, ids: torch.Tensor, text: str) -> bool:
        self.message.visible = False
        try:
            with self._busy():
                view = read_call(self.model, ids, self._session_id(), self.layer, every=max(1, ids.shape[1] // 256))
        except Exception as error:       # shown on the page; the session is stored back only after a whole call
            self._fail(error)
            return False
        self.history[self.session].append(text)
        self.views[self.session] = (view, token_texts(self.tokenizer, ids[0]))
        self._show()
        return True

    def close(self) -> None:
        """Delete this instance's sessions from the model's store (the browser tab has gone)."""
        for session in SESSIONS:
            self.model.sessions.delete(self._session_id(session))

    def reset(self) -> None:
        """Forget the current session's memory (the other sessions keep theirs)."""
        self.model.sessions.reset(self._session_id())
        self.history[self.session] = []
        self.views.pop(self.session, None)
        self.answer.object, self.read_pane.visible = "", False
        self._show()

    def ask(self, question: str) -> bool:
        """Ask `question` in a new call of the current session; shows both answers and the memory read."""
        try:
            question = common.check_text(question, "question", max_chars=MAX_QUESTION_CHARS)
            if not self.history[self.session]:
                raise ValueError("question: this session has read nothing yet; read a text first")
            ids = self.tokenizer(" " + question, return_tensors="pt", add_special_tokens=False).input_ids
            with self._busy():
                probe = recall_probe(self.model, ids, self._session_id(), self.layer)
        except Exception as error:       # bad input, or a session the store no longer holds: shown on the page
            self._fail(error)
            return False
        self.message.visible = False
        self.history[self.session].append("(question) " + question)
        self.answer.object = (f"**Q:** {common.escape_markdown(question)}\n\n"
                              f"**with the session's memory:** `{probe.answer.strip()}`  \n"
                              f"**with the memory reset:** `{probe.answer_without_memory.strip()}`  \n"
                              f"(memory from {len(self.history[self.session]) - 1} earlier call(s); the question "
                              "and the answer were written to memory too)")
        self.read_pane.object = read_figure(probe.trace, token_texts(self.tokenizer, ids[0]))
        self.read_pane.visible = True
        self._show_status()
        return True

    # ------------------------------------------------------------------ views
    def _busy(self):
        """Every view shows Panel's loading spinner while a call runs."""
        return pn.param.set_values(self.heatmap_pane, self.summary_pane, self.gates_pane, self.signals_pane,
                                   self.read_pane, loading=True)

    @param.depends("session", watch=True)
    def _switch_session(self) -> None:
        self.answer.object, self.read_pane.visible = "", False
        self._show()

    def _show(self) -> None:
        """Redraw every view from the current session's last call (blank figures for an empty session)."""
        view, self.tokens = self.views.get(self.session, (None, []))
        self.view = view
        if view is None:
            for pane in (self.heatmap_pane, self.summary_pane, self.gates_pane, self.signals_pane):
                pane.object = None
            self._show_status()
            return
        last = len(view.trace.checkpoints) - 1
        self.player.param.update(end=max(last, 1), value=last)
        self.token = last
        self._draw_state()
        self.gates_pane.object = trace_figure(view.trace, self.tokens, title="gates and prediction error per token")
        self.signals_pane.object = (signals_figure(view.signals, [], signals=[s for s in view.signals if s != "mix"],
                                                   title="controller signals per token (mean of heads)", height=130)
                                    if view.signals else None)
        self._show_status()

    @param.depends("token", "head", watch=True)
    def _draw_state(self) -> None:
        if self.view is None:
            return
        token = min(self.token, len(self.view.trace.checkpoints) - 1)
        self.heatmap_pane.object = state_heatmap(self.view.trace, token, self.head, tokens=self.tokens)
        self.summary_pane.object = state_summary_figure(self.view.trace, checkpoint=token)

    def _show_status(self) -> None:
        calls = self.history[self.session]
        lines = [f"**{self.session}**: {len(calls)} call(s) read."]
        first = len(calls) - len(calls[-6:])
        lines += [f"{first + i + 1}. {common.escape_markdown(text[:90])}{'…' if len(text) > 90 else ''}"
                  for i, text in enumerate(calls[-6:])]
        if self.view is not None:
            norm = self.view.trace.state_norm[0, -1]
            lines.append(f"\nlast text read: {len(self.tokens)} tokens; ‖S‖_F per head after it: "
                         + ", ".join(f"{v:.2f}" for v in norm.tolist()))
        self.status.object = "\n".join(lines)

    # ------------------------------------------------------------------ layout
    def controls(self) -> pn.Column:
        return pn.Column(
            pn.widgets.Select.from_param(self.param.session, label="session"),
            self.text_input, self.read_button, self.filler_button, self.reset_button,
            pn.layout.Divider(), self.question_input, self.ask_button, pn.layout.Divider(),
            pn.pane.Markdown(f"sidecar on decoder layer {self.layer}"),
            pn.widgets.IntSlider.from_param(self.param.head, label="head"),
        )

    def __panel__(self) -> pn.Column:
        return pn.Column(
            self.message, self.status,
            pn.Row(pn.Column(self.player, self.heatmap_pane, sizing_mode="stretch_width"), self.summary_pane,
                   sizing_mode="stretch_width"),
            pn.pane.Markdown("### Recall probe"), self.answer, self.read_pane,
            pn.pane.Markdown("### Gates, prediction error and controller signals of the last call"),
            self.gates_pane, self.signals_pane, sizing_mode="stretch_width")

    def page(self):
        return common.page(TITLE, INTRO, self, sidebar=[self.controls()])
