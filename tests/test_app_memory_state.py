"""The memory-state dashboard and the session inspection behind it (cortexlab.eval.session_view), on
SmolLM2 with the committed recall sidecar."""
import pytest
import torch

pytest.importorskip("panel")

from cortexlab.apps import common  # noqa: E402
from cortexlab.apps.memory_state import DEFAULT_TEXT, MemoryStateApp  # noqa: E402
from cortexlab.eval.session_view import read_call, recall_probe, session_memory  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return common.cortex_model()


@pytest.fixture(scope="module")
def layer(model):
    return model.layer_ids[0]          # the committed adapter's one sidecar


def test_read_call_traces_from_the_stored_state_and_stores_the_traced_final_state(model, layer):
    tok = model.tokenizer
    first, second = (tok(t, return_tensors="pt").input_ids for t in (DEFAULT_TEXT, "The weather was fine."))
    model.sessions.reset("t-read")
    view1 = read_call(model, first, "t-read", layer)
    assert view1.calls_before == 0 and view1.trace.tokens == first.shape[1]
    assert torch.count_nonzero(view1.trace.states[0, 0]) == 0            # a new session starts from S = 0
    stored = session_memory(model, "t-read")[layer]["S"]
    torch.testing.assert_close(view1.trace.final_state, stored, atol=1e-4, rtol=1e-4)
    view2 = read_call(model, second, "t-read", layer)
    assert view2.calls_before == 1
    torch.testing.assert_close(view2.trace.states[:, 0], stored, atol=1e-6, rtol=0)   # continues the session
    assert set(view2.signals) >= {"surprise", "entropy", "beta", "decay"}
    assert all(s.shape == (second.shape[1],) for s in view2.signals.values())
    with pytest.raises(ValueError, match="input_ids"):
        read_call(model, first[:, :0], "t-read", layer)


def test_recall_probe_recalls_the_key_only_with_the_memory(model, layer):
    tok = model.tokenizer
    model.sessions.reset("t-probe")
    read_call(model, tok(DEFAULT_TEXT, return_tensors="pt").input_ids, "t-probe", layer)
    question = tok(" What is the pass key? The pass key is", return_tensors="pt", add_special_tokens=False).input_ids
    probe = recall_probe(model, question, "t-probe", layer)
    assert probe.answer.strip().startswith("40213")                   # the key, read from memory only
    assert "40213" not in probe.answer_without_memory                 # the same model with the memory reset
    assert probe.trace.read_norm.shape[1] == question.shape[1]
    with pytest.raises(ValueError, match="read nothing"):
        recall_probe(model, question, "t-never-read", layer)


def test_app_scrubs_tokens_switches_sessions_and_keeps_state_on_bad_input(model):
    app = MemoryStateApp(model=model)
    assert "1 call(s)" in app.status.object and app.view is not None
    last = app.token
    app.player.value = 3                                              # the player scrubs the heatmap
    assert app.token == 3 and "after 3 tokens" in app.heatmap_pane.object.layout.title.text
    app.head = 2
    assert "head 2" in app.heatmap_pane.object.layout.title.text
    before = app.heatmap_pane.object
    for bad in ("", "x" * (common.MAX_TEXT_CHARS + 1), "a\x00b"):
        assert app.read(bad) is False and app.message.visible
        assert app.heatmap_pane.object is before and len(app.history["session 1"]) == 1
    app.session = "session 2"                                         # a fresh session: nothing drawn
    assert app.heatmap_pane.object is None and "0 call(s)" in app.status.object
    assert app.ask("What is the pass key?") is False and "read nothing" in app.message.object
    app.session = "session 1"
    assert app.token == last and len(app.history["session 1"]) == 1
    app.read_filler()
    assert len(app.tokens) == 128 and "2 call(s)" in app.status.object
    assert app.ask(app.question_input.value) and "40213" in app.answer.object.split("memory reset")[0]
    app.reset()
    assert app.view is None and model.sessions.get(app._session_id()) is None


def test_two_app_instances_never_share_memory(model, layer):
    one, two = MemoryStateApp(model=model), MemoryStateApp(model=model)
    assert one._session_id() != two._session_id()
    one.read("Completely different text about gardens and roses.")
    assert len(one.history["session 1"]) == 2 and len(two.history["session 1"]) == 1
    s_two = session_memory(model, two._session_id())[layer]["S"]
    torch.testing.assert_close(s_two, two.view.trace.final_state, atol=1e-4, rtol=1e-4)


def test_check_text_names_the_argument():
    assert common.check_text("  hi  ") == "hi"
    for bad, match in ((None, "question must be text"), ("   ", "question is empty"), ("a\x07", "control")):
        with pytest.raises(ValueError, match=match):
            common.check_text(bad, "question")
    with pytest.raises(ValueError, match="limit is 5"):
        common.check_text("abcdefg", "question", max_chars=5)


def test_too_many_tokens_and_closing_the_tab(model):
    app = MemoryStateApp(model=model)
    digits = " ".join(str(i) for i in range(400))                # < MAX_TEXT_CHARS characters, > MAX_TOKENS tokens
    assert len(digits) <= common.MAX_TEXT_CHARS
    assert app.read(digits) is False and "tokens long" in app.message.object
    assert len(app.history["session 1"]) == 1
    app.session = "session 2"
    app.read("Another session.")
    ids = [app._session_id(s) for s in ("session 1", "session 2")]
    assert all(model.sessions.get(i) is not None for i in ids)
    app.close()                                                   # what the served page does when the tab goes
    assert all(model.sessions.get(i) is None for i in ids)
    assert app.ask("What is the pass key?") is False               # the store lost the session: said on the page
    assert app.message.visible and "read nothing" in app.message.object


def test_user_text_is_shown_verbatim():
    assert common.escape_markdown("**x** <b>y</b> `z`") == r"\*\*x\*\* &lt;b&gt;y&lt;/b&gt; \`z\`"
