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
    return {name: t[0] for name, t in controller_signals(traces[layer][0]).items()}


def controller_signals(trace: dict) -> dict[str, torch.Tensor]:
    """The controller's signals and gates in one recorded sidecar call (`CortexModel.recording`),
    averaged over heads: [B,T] tensors surprise, entropy, beta, decay = exp(g), beta_slow and mix
    (the last only with a window branch)."""
    names = {"surprise": "surprise", "entropy": "entropy", "beta": "beta", "decay": "g", "beta_slow": "beta_slow",
             "mix": "mix"}
    missing = [key for name, key in names.items() if key not in trace and name != "mix"]
    if missing:
        raise ValueError(f"trace has no {missing}: record a sidecar that has a controller")
    out = {name: trace[key].float() for name, key in names.items() if key in trace}
    out["decay"] = out["decay"].exp()
    return {name: t.mean(-1) for name, t in out.items()}


def event_mask(length: int, spans) -> torch.Tensor:
    mask = torch.zeros(length, dtype=torch.bool)
    for start, end in spans:
        mask[start:end] = True
    return mask


def event_contrast(values: torch.Tensor, spans, skip: int = 0) -> dict[str, float]:
    """Mean of a per-token signal on the event tokens E vs the rest R of the text, and their ratio
    mean_{t in E} v_t / mean_{t in R} v_t; the first `skip` tokens belong to neither (e.g. position 0,
    which has no context)."""
    if not isinstance(skip, int) or isinstance(skip, bool) or not 0 <= skip < len(values):
        raise ValueError(f"skip must be an int in [0, {len(values)}), got {skip!r}")
    mask = event_mask(len(values), spans)
    counted = torch.arange(len(values)) >= skip
    if not (mask & counted).any() or not (~mask & counted).any():
        raise ValueError(f"spans must cover some but not all of the tokens from position skip={skip} on")
    on, off = values[mask & counted].mean().item(), values[~mask & counted].mean().item()
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


def controller_equivalence(base, input_ids: torch.Tensor, layer: int, *, std: float = 0.02, seed: int = 0,
                           **cfg_kwargs) -> dict:
    """Is a sidecar with a controller at initialisation the same sidecar without one?

    Attaches a sidecar on `layer` with a controller, gives it a random readout (`random_readout_`, a zero
    one would hide any difference), copies its weights into a sidecar without a controller and compares
    the logits on input_ids. Returns "max_diff" max |logits_ctrl - logits_plain|, "sidecar_effect"
    max |logits_plain - logits_base| (how much the sidecar changes the base; > 0 makes the check mean
    something) and "controller_only", the weights only the controller sidecar has. `seed` sets the sidecar's
    initialisation and readout (the global RNG is untouched); `base` is left as it was.
    """
    from cortexlab.cortex import CortexWrapConfig, attach_cortex
    from cortexlab.eval.sessions import random_readout_

    cfg = dict(cfg_kwargs, layers=[layer])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with_ctrl = attach_cortex(base, CortexWrapConfig(controller=True, **cfg))
    try:
        random_readout_(with_ctrl, std=std, seed=seed)
        state = with_ctrl.sidecars[str(layer)].state_dict()
        with torch.no_grad():
            logits_ctrl = with_ctrl(input_ids).logits
    finally:
        with_ctrl.detach()
    without = attach_cortex(base, CortexWrapConfig(controller=False, **cfg))
    try:
        missing, unexpected = without.sidecars[str(layer)].load_state_dict(state, strict=False)
        if missing:
            raise RuntimeError(f"the controller sidecar lacks weights of the plain one: {missing}")
        with torch.no_grad():
            logits_plain = without(input_ids).logits
            with without.disabled():
                logits_base = without(input_ids).logits
    finally:
        without.detach()
    return {"max_diff": (logits_ctrl - logits_plain).abs().max().item(),
            "sidecar_effect": (logits_plain - logits_base).abs().max().item(),
            "controller_only": sorted(unexpected)}


def conflict_surprise(model, task, layer: int, *, episodes: int = 16, seed: int = 11) -> dict[str, list[float]]:
    """Mean surprise per head at the pass-key digits of call 1 (the first key) and of call 2 (a conflicting key)
    in `task.conflict_batch(3, episodes, seed)`, the memory carried from call 1 into call 2:
    {"first": [per head], "second": [per head]}. Does a second key look more surprising than the first?"""
    if not model.config.controller:
        raise ValueError("the model's sidecars have no controller (CortexWrapConfig(controller=False))")
    if str(layer) not in model.sidecars:
        raise ValueError(f"layer {layer} has no sidecar; wrapped layers are {model.layer_ids}")
    batch = task.conflict_batch(3, episodes, seed)
    memory, out = None, {}
    with torch.no_grad():
        for call, (name, key) in enumerate((("first", batch.answer), ("second", batch.second))):
            ids = batch.input_ids[:, call]
            with model.recording() as traces:
                memory = model(ids, memory=memory, use_cache=False, logits_to_keep=1).memory
            # the key's digits: the first window of A tokens equal to them
            A = key.shape[1]
            found = (ids.unfold(1, A, 1) == key[:, None, :]).all(-1)                           # [B, T - A + 1]
            if not found.any(1).all():
                raise ValueError(f"call {call + 1} of some episode does not hold its key's digit tokens")
            surprise = traces[layer][0]["surprise"].float()                                    # [B, T, H]
            starts = found.float().argmax(1)                                                   # the first match
            where = (starts[:, None] + torch.arange(A, device=starts.device)).to(surprise.device)   # [B, A]
            picked = surprise.gather(1, where[..., None].expand(-1, -1, surprise.shape[-1]))
            out[name] = [round(x, 4) for x in picked.mean((0, 1)).tolist()]
    return out
