"""What each decoder layer's input says about a number's digits: where a recall sidecar can read them.

A recall sidecar stores the pass key digit by digit, and the question call reads it back one digit at a
time: the query at answer digit i-1 must find the key written at digit i. So the layer a sidecar sits on
should name, at each digit of the number, the digit itself (the value to store), the digit before it
(what that key must match) and its place in the number. `digit_probe` measures all three at every layer
of a frozen decoder, on the fact calls of recall episodes, with x_L = the layer's normalised input (what
a sidecar there reads, `cortexlab.train.recall.sidecar_inputs`):

    accuracy(label) = how often  argmax_c cos(x_L - m, mu_c - m) = label     (nearest class mean)

with the class means mu_c and the centre m taken from the first half of the episodes and scored on the
second half. Labels: "digit" (10 classes, chance 0.1), "previous" (the digit before, or none for the
first digit: 11 classes) and "place" (1..key_digits). "shared" is the mean cosine between the raw inputs
at two digits, any two: near 1, every key a sidecar computes there looks like every other.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cortexlab.checks import check_int
from cortexlab.cortex.wrap import decoder_layers
from cortexlab.data.recall import RecallTask

__all__ = ["digit_probe", "nearest_mean_accuracy"]


def nearest_mean_accuracy(x: torch.Tensor, labels: torch.Tensor, train: int) -> float:
    """Accuracy on rows train: of the nearest class mean (by cosine, centred) fitted on rows :train."""
    if not 0 < train < len(x):
        raise ValueError(f"train must split the {len(x)} rows in two, got {train}")
    centre = x[:train].mean(0)
    x = x - centre
    classes = labels[:train].unique()
    means = torch.stack([x[:train][labels[:train] == c].mean(0) for c in classes])
    guess = classes[(F.normalize(x[train:], dim=-1) @ F.normalize(means, dim=-1).T).argmax(-1)]
    return (guess == labels[train:]).float().mean().item()


@torch.no_grad()
def digit_probe(base, task: RecallTask, *, episodes: int = 96, seed: int = 0,
                layers: list[int] | None = None) -> list[dict]:
    """[{"layer", "digit", "previous", "place", "shared"}] for each layer of the frozen causal LM `base`
    (default: every layer), over the fact calls of `episodes` two-call episodes of `task` (module doc)."""
    check_int("episodes", episodes, 4)
    blocks = decoder_layers(base)
    layers = list(range(len(blocks))) if layers is None else list(layers)
    bad = [i for i in layers if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(blocks))]
    if bad or not layers:
        raise ValueError(f"layers must be decoder-layer indices in [0, {len(blocks)}), got {layers!r}")
    device = next(base.parameters()).device
    batch = task.batch(2, episodes, seed=seed).to(device)
    fact, n = batch.input_ids[:, 0], task.key_digits
    rows = [(e, start + i) for e, start in enumerate(task.key_starts(batch)) for i in range(n)]
    ep, pos = torch.tensor(rows, device=device).T
    value_of = torch.full((int(fact.max()) + 1,), -1, device=device)     # token id -> digit (or -1)
    value_of[torch.tensor(task.digit_ids, device=device)] = torch.arange(10, device=device)
    place = torch.arange(n, device=device).repeat(episodes)
    labels = {"digit": value_of[fact[ep, pos]],
              "previous": torch.where(place == 0, 10, value_of[fact[ep, pos - 1]]),
              "place": place}
    hidden = base(fact, output_hidden_states=True).hidden_states     # hidden[L]: the residual entering layer L
    train = (episodes // 2) * n
    result = []
    for layer in layers:
        x = blocks[layer].input_layernorm(hidden[layer])[ep, pos].float()
        unit = F.normalize(x, dim=-1)
        pairs = unit @ unit.T
        shared = (pairs.sum() - pairs.diagonal().sum()) / (len(x) * (len(x) - 1))
        result.append({"layer": layer, "shared": shared.item(),
                       **{name: nearest_mean_accuracy(x, y, train) for name, y in labels.items()}})
    return result
