"""CALM's early-exit classifier: a d-parameter probe per exit layer decides whether a token leaves there, so a
token that stays pays 2d MACs per check instead of the output head (Schuster et al. 2022, "Confident Adaptive
Language Modeling", section 3.3):

    c_l(h) = sigmoid(w_l . n(h) + b_l),   n(h) = h / sqrt(mean_i h_i^2 + eps)        exit at l iff c_l(h_l) >= tau

trained with the backbone and the exit heads frozen, by binary cross-entropy on the consistency label

    y_l(t) = [argmax head_l(h_l(t)) == argmax z_L(t)]     (leaving at l keeps the full model's next token)

so c_l estimates P(y_l = 1 | h_l), and the exit head (and its output layer) runs only where the token leaves.
An RMSNorm gain g folds into w (w . (g * n(h)) = (g * w) . n(h)), hence n has none. Layer indices are 1-based
depths as in `EarlyExitEngine`. Memory: E (d + 1) parameters for E exit layers.
"""
from __future__ import annotations

import torch
from torch import nn

from cortexlab.checks import check_int, check_number

from .early_exit import EarlyExitEngine

__all__ = ["ExitClassifier", "consistency_examples"]


class ExitClassifier(nn.Module):
    """One logistic probe c_l(h) = sigmoid(w_l . n(h) + b_l) per exit layer l (zero-initialised: c_l = 1/2)."""

    def __init__(self, exit_layers, hidden_dim: int, eps: float = 1e-5):
        super().__init__()
        layers = tuple(exit_layers) if isinstance(exit_layers, (list, tuple, range)) else ()
        if not layers or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in layers) \
                or any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"exit_layers must be a non-empty increasing sequence of ints >= 1, got {exit_layers!r}")
        check_int("hidden_dim", hidden_dim)
        check_number("eps", eps, 0, 1, low_open=True, high_open=True)
        self.exit_layers, self.hidden_dim, self.eps = layers, hidden_dim, float(eps)
        self.weight = nn.Parameter(torch.zeros(len(layers), hidden_dim))
        self.bias = nn.Parameter(torch.zeros(len(layers)))

    def logit(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """w_l . n(h) + b_l for hidden [..., d] -> [...] (fp32)."""
        if layer not in self.exit_layers:
            raise ValueError(f"layer={layer!r} is not an exit layer {list(self.exit_layers)}")
        if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() \
                or hidden.shape[-1] != self.hidden_dim:
            raise ValueError(f"hidden must be a floating-point tensor [..., {self.hidden_dim}], "
                             f"got {getattr(hidden, 'shape', hidden)}")
        index = self.exit_layers.index(layer)
        h = hidden.float()
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed @ self.weight[index].float() + self.bias[index].float()

    def forward(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """c_l(h) in (0, 1), shape hidden.shape[:-1]."""
        return torch.sigmoid(self.logit(hidden, layer))


@torch.no_grad()
def consistency_examples(model, heads: EarlyExitEngine, windows: torch.Tensor, *,
                         batch_size: int = 4) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{l: (h_l [N, d] fp32 on the CPU, y_l [N] bool)} for every exit layer of `heads` over the N = n T positions
    of windows [n, T+1] (inputs [:, :-1]): the hidden state after layer l and whether the exit head's argmax
    there equals the full model's argmax (the classifier's training target)."""
    if not isinstance(heads, EarlyExitEngine):
        raise ValueError(f"heads must be an EarlyExitEngine, got {type(heads).__name__}")
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[1] < 2 or len(windows) < 1:
        raise ValueError(f"windows must be token ids [n, T+1] with T >= 1, got {getattr(windows, 'shape', windows)}")
    check_int("batch_size", batch_size)
    device = model.lm_head.weight.device
    hidden: dict[int, list] = {layer: [] for layer in heads.exit_layers}
    labels: dict[int, list] = {layer: [] for layer in heads.exit_layers}
    for s in range(0, len(windows), batch_size):
        out = model(windows[s:s + batch_size, :-1].to(device), output_hidden_states=True)
        final = out.logits.argmax(-1).flatten()
        for layer in heads.exit_layers:
            h = out.hidden_states[layer]
            hidden[layer].append(h.flatten(0, 1).float().cpu())
            labels[layer].append((heads.exit_logits(h, layer).argmax(-1).flatten() == final).cpu())
    return {layer: (torch.cat(hidden[layer]), torch.cat(labels[layer])) for layer in heads.exit_layers}
