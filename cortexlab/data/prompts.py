"""Shipped prompt sets, fixed in advance, and how a prompt becomes the token ids a model reads.

A prompt set is a JSON file in `cortexlab/data/prompts/` (`{"name", "description", "prompts":
[{"id", "kind", "text"}, ...]}`), written once before any measurement and never tuned on results:

- "repetition_prompts": 20 user requests (5 stories, 5 explanations, 5 lists, 5 code tasks) for
  measuring degenerate repetition in greedy decoding (`cortexlab.eval.repetition`).

`prompt_token_ids(text, tokenizer)` wraps the text as one user turn of the tokenizer's chat template
(with the assistant's generation prompt), or tokenises it plainly with `chat=False`;
`tokenizer=None` gives the UTF-8 bytes (ids < 256, for the tiny random test models).
"""
from __future__ import annotations

import json
from importlib import resources
from typing import NamedTuple

__all__ = ["PROMPT_SETS", "Prompt", "load_prompts", "prompt_token_ids"]

PROMPT_SETS = ("repetition_prompts",)


class Prompt(NamedTuple):
    id: str
    kind: str
    text: str


def load_prompts(name: str = "repetition_prompts") -> list[Prompt]:
    """The prompts of the shipped set `name`, in file order."""
    if name not in PROMPT_SETS:
        raise ValueError(f"name must be one of {PROMPT_SETS}, got {name!r}")
    data = json.loads(resources.files("cortexlab.data").joinpath("prompts", f"{name}.json").read_text("utf-8"))
    return [Prompt(p["id"], p["kind"], p["text"]) for p in data["prompts"]]


def prompt_token_ids(text: str, tokenizer=None, *, chat: bool = True) -> list[int]:
    """Token ids of `text`: one user turn of the chat template plus the generation prompt (`chat=True`),
    the plain text (`chat=False`), or its UTF-8 bytes when `tokenizer` is None."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"text must be a non-empty str, got {text!r}")
    if tokenizer is None:
        return list(text.encode("utf-8"))
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
