"""Experiments behind notebook 05: the metacognitive controller's signals on real text.

A real text (Python standard-library docstrings) gets out-of-place sentences inserted at
known places ("surprising events"); a wrapped model reads it once while its sidecar
records, per token, the controller's signals (memory surprise, logit-lens entropy) and the
gates it sets. `event_contrast` compares the signals on the events with the rest of the
text; `repetition_effect` measures how the memory's surprise changes when a passage
comes back.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

DEFAULT_MODULES = ("collections", "argparse", "difflib", "textwrap", "json", "calendar")
DEFAULT_EVENTS = (
    "The secret pass key is 7 3 9 1 4.",
    "Elephants painted the moon purple last Tuesday.",
    "Bonjour, je m'appelle Marie et j'habite à Paris.",
    "Quantum bananas sing loudly inside the volcano.",
)


@dataclass
class EventText:
    """Token ids [1, T] of a text with inserted events, and each event's [start, end) token span."""

    input_ids: torch.Tensor
    spans: list[tuple[int, int]]
    paragraphs: int


def stdlib_paragraphs(modules=DEFAULT_MODULES) -> list[str]:
    """Prose paragraphs of the modules' docstrings (present on every Python install)."""
    paragraphs = []
    for name in modules:
        doc = importlib.import_module(name).__doc__ or ""
        paragraphs += [p.strip() for p in doc.split("\n\n") if len(p.split()) >= 5]
    if not paragraphs:
        raise ValueError(f"no docstring prose found in modules {modules}")
    return paragraphs


def text_with_events(tokenizer, *, max_tokens: int = 1024, every: int = 4, events=DEFAULT_EVENTS,
                     modules=DEFAULT_MODULES) -> EventText:
    """Docstring paragraphs with one event sentence after every `every`-th paragraph."""
    if every < 1 or max_tokens < 16:
        raise ValueError(f"every must be >= 1 and max_tokens >= 16, got {every}, {max_tokens}")
    ids: list[int] = []
    spans = []
    paragraphs = stdlib_paragraphs(modules)
    used = 0
    for i, paragraph in enumerate(paragraphs):
        piece = tokenizer(paragraph + "\n\n").input_ids
        if len(ids) + len(piece) > max_tokens:
            break
        ids += piece
        used += 1
        if (i + 1) % every == 0:
            event = tokenizer(events[len(spans) % len(events)]).input_ids
            gap = tokenizer("\n\n").input_ids
            if len(ids) + len(event) + len(gap) > max_tokens:
                break
            spans.append((len(ids), len(ids) + len(event)))
            ids += event + gap
    return EventText(torch.tensor([ids]), spans, used)


def signal_trace(model, input_ids: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """One forward of a wrapped model; per-token signals and gates of `layer`'s sidecar, head-averaged.

    Returns [T] tensors: surprise, entropy, beta (write), decay a = exp(g), beta_slow (consolidation)
    and mix (weight of the memory against the window).
    """
    if str(layer) not in model.sidecars:
        raise ValueError(f"layer {layer} has no sidecar; wrapped layers are {model.layer_ids}")
    if not model.config.controller:
        raise ValueError("the model's sidecars have no controller (CortexWrapConfig(controller=False))")
    with torch.no_grad(), model.recording() as traces:
        model(input_ids)
    trace = traces[layer][0]
    out = {"surprise": trace["surprise"], "entropy": trace["entropy"], "beta": trace["beta"],
           "decay": trace["g"].exp(), "beta_slow": trace["beta_slow"]}
    if "mix" in trace:
        out["mix"] = trace["mix"]
    return {name: t[0].float().mean(-1) for name, t in out.items()}


def event_mask(length: int, spans) -> torch.Tensor:
    mask = torch.zeros(length, dtype=torch.bool)
    for start, end in spans:
        mask[start:end] = True
    return mask


def event_contrast(values: torch.Tensor, spans) -> dict[str, float]:
    """Mean of a per-token signal on the event tokens vs the rest of the text, and their ratio."""
    mask = event_mask(len(values), spans)
    if not mask.any() or mask.all():
        raise ValueError("spans must cover some but not all tokens")
    on, off = values[mask].mean().item(), values[~mask].mean().item()
    return {"events": on, "rest": off, "ratio": on / off}


def layer_sweep(base, text: EventText, layers, **cfg_kwargs) -> list[dict]:
    """`event_contrast` of surprise and entropy for a fresh sidecar at each layer of `base`.

    Each sidecar is attached, read and detached again, so `base` is left as it was.
    """
    from cortexlab.cortex import CortexWrapConfig, attach_cortex

    rows = []
    for layer in layers:
        model = attach_cortex(base, CortexWrapConfig(layers=[layer], **cfg_kwargs))
        try:
            trace = signal_trace(model, text.input_ids, layer)
        finally:
            model.detach()
        rows.append({"layer": layer, **{f"{signal}_{key}": value
                                        for signal in ("surprise", "entropy")
                                        for key, value in event_contrast(trace[signal], text.spans).items()}})
    return rows


def repetition_effect(model, tokenizer, layer: int, *, passage_tokens: int = 120, gap_tokens: int = 50,
                      skip: int = 4) -> dict[str, float]:
    """Mean surprise on a passage and on its second copy after a gap of other text.

    The first `skip` tokens of each copy are left out (the short conv still sees the gap there).
    """
    paragraphs = stdlib_paragraphs()
    passage = tokenizer("\n\n".join(paragraphs[1:4])).input_ids[:passage_tokens]
    gap = tokenizer("\n\n".join(paragraphs[5:7])).input_ids[:gap_tokens]
    if len(passage) < passage_tokens or len(gap) < gap_tokens:
        raise ValueError("not enough docstring text for the requested lengths")
    ids = torch.tensor([passage + gap + passage])
    surprise = signal_trace(model, ids, layer)["surprise"]
    second = passage_tokens + gap_tokens
    first_mean = surprise[skip:passage_tokens].mean().item()
    second_mean = surprise[second + skip:].mean().item()
    return {"first": first_mean, "second": second_mean, "ratio": second_mean / first_mean}
