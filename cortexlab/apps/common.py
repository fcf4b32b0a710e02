"""What every cortexlab dashboard shares: the models (loaded once per server process), input
checks, where the committed results live, and the page frame.

Models are loaded lazily and cached per process (`base_model`, `cortex_model`), so the first
page of a freshly started server pays the load (well under a second from the warm cache)
and every later page reuses them. Panel runs every callback on its one server thread, so
callbacks of different browser sessions never overlap on the shared models (do not serve with
`--num-threads`: the hook pipelines attach to the shared base model). The one exception is the
live MQAR run of `inverse_scaling`, which trains its own small models in a worker thread. Memory
state is never shared between browser sessions: each app instance namespaces its Cortex session
ids with its own random `browser_session_id` and deletes them when its session ends.

The pages accept text only: no file paths, no code. Text goes through `check_text`.
"""
from __future__ import annotations

import functools
import threading
import unicodedata
import uuid

import panel as pn

from cortexlab.results import RECALL_ADAPTER, results_dir

__all__ = [
    "MAX_TEXT_CHARS", "MAX_TOKENS", "RECALL_ADAPTER", "base_model", "browser_session_id", "check_text", "check_tokens",
    "cortex_model", "escape_markdown", "page",
    "results_dir",
]

MAX_TEXT_CHARS = 2000          # about 500 SmolLM2 tokens of English prose
MAX_TOKENS = 512               # what any view reads at once: keeps every view interactive on a 2-core CPU
MARKDOWN_SPECIAL = set("\\`*_{}[]()#+-.!|~")
_LOCK = threading.Lock()


def check_text(text: object, name: str = "text", *, max_chars: int = MAX_TEXT_CHARS) -> str:
    """`text` stripped, or ValueError naming `name`: not a string, empty, longer than `max_chars`
    characters, or holding control characters other than newline and tab."""
    if not isinstance(text, str):
        raise ValueError(f"{name} must be text, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise ValueError(f"{name} is empty: enter some text")
    if len(text) > max_chars:
        raise ValueError(f"{name} has {len(text)} characters; the limit is {max_chars}")
    bad = sorted({repr(c) for c in text if unicodedata.category(c) == "Cc" and c not in "\n\t"})
    if bad:
        raise ValueError(f"{name} holds control characters {', '.join(bad[:5])}")
    return text


def escape_markdown(text: str) -> str:
    """`text` with Markdown and HTML markup escaped, to show user input verbatim in a Markdown pane."""
    return "".join("\\" + c if c in MARKDOWN_SPECIAL else {"<": "&lt;", ">": "&gt;", "&": "&amp;"}.get(c, c)
                   for c in text)


def check_tokens(ids, name: str = "text", *, max_tokens: int = MAX_TOKENS) -> None:
    """ValueError naming `name` when the token ids [..., T] are more than `max_tokens` (digits and non-Latin
    scripts take many more tokens per character than English)."""
    if ids.shape[-1] > max_tokens:
        raise ValueError(f"{name} is {ids.shape[-1]} tokens long; the limit here is {max_tokens} tokens")


@functools.cache
def _base_model():
    from cortexlab.models import load_base_model

    return load_base_model()


def base_model():
    """(SmolLM2-135M-Instruct, its tokenizer), loaded once per process; shared by the hook and column apps."""
    with _LOCK:
        return _base_model()


@functools.cache
def _cortex_model(adapter: str):
    from cortexlab.cortex import SessionStore, load_with_cortex

    return load_with_cortex(adapter=str(results_dir() / adapter), sessions=SessionStore(capacity=1024))


def cortex_model(adapter: str = RECALL_ADAPTER):
    """SmolLM2 + the committed sidecar in `results/<adapter>` (a separate copy of the base), once per process."""
    with _LOCK:
        return _cortex_model(adapter)


def browser_session_id() -> str:
    """A fresh random id; an app instance prefixes its Cortex session ids with it."""
    return uuid.uuid4().hex[:12]


def page(title: str, intro: str, *objects, sidebar=()) -> pn.template.FastListTemplate:
    """The frame every app uses: a title, a one-paragraph introduction, the views and a sidebar of controls."""
    return pn.template.FastListTemplate(
        title=f"cortexlab · {title}", sidebar=list(sidebar), main=[pn.pane.Markdown(intro), *objects],
        header_background="#2f4f6f", accent="#2f4f6f", sidebar_width=330)
