"""Measurements behind notebook 09 (predictive coding) on a real model's hidden states.

- `layer_states` / `normed_states`: the residual stream of a decoder (input of every layer and the last output),
  and a layer's normalised input (what its attention reads), no grad.
- `fit_top_down`: train the top-down prediction P x_{l+1} + b of `PredictiveCodingLayer` (layer l+1's prediction of
  layer l) by gradient descent on the surprise, starting from the module's identity initialisation.
- `surprise_of`: the per-token surprise of layer l given a prediction (any tensor: the trained top-down
  prediction, the identity at initialisation, or a constant such as the training mean -- the baselines).
- `token_surprisal`: the language model's own -log p(token), the reference for "is this token unexpected".
- `fit_cpc` / `cpc_loss`: train `ContrastivePredictiveCoding`'s W_k briefly and evaluate InfoNCE on other text,
  beside chance ln(1 + N).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cortexlab.cortex.wrap import decoder_layers
from cortexlab.neuro import ContrastivePredictiveCoding, PredictiveCodingConfig, PredictiveCodingLayer


@torch.no_grad()
def layer_states(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """hidden_states[l] [B, T, d]: the residual stream entering decoder layer l (0 = the embeddings); the last
    entry is the final norm's output, as transformers returns it."""
    out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    return tuple(h.float() for h in out.hidden_states)


@torch.no_grad()
def states_and_surprisal(model, input_ids: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """One forward: (`layer_states`, `token_surprisal`)."""
    out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    return tuple(h.float() for h in out.hidden_states), _surprisal(out.logits, input_ids)


@torch.no_grad()
def token_surprisal(model, input_ids: torch.Tensor) -> torch.Tensor:
    """-log p(token_t | tokens < t) in nats, [B, T]; token 0 (no context) is NaN."""
    return _surprisal(model(input_ids=input_ids, use_cache=False).logits, input_ids)


def _surprisal(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
    return torch.cat([torch.full_like(nll[:, :1], float("nan")), nll], dim=1)


@torch.no_grad()
def normed_states(model, states: tuple[torch.Tensor, ...], layer: int) -> torch.Tensor:
    """x_l = the decoder layer's own input norm applied to hidden_states[l] [B, T, d]: what layer l's attention
    reads (RMSNorm tames the model's few "massive" residual dimensions, which would dominate a squared error)."""
    return decoder_layers(model)[layer].input_layernorm(states[layer]).float()


def surprise_of(lower: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """Surprise [B, T] of a layer with representation `lower` [B, T, d] given `prediction` (broadcast to it),
    computed by `PredictiveCodingLayer` itself: mean_d (x - p)^2."""
    layer = PredictiveCodingLayer(lower.shape[-1])
    with torch.no_grad():
        _, _, surprise = layer(lower, prediction.expand_as(lower), update_state=False)
    return surprise


def fit_top_down(lower: torch.Tensor, upper: torch.Tensor, *, steps: int = 100, lr: float = 1e-3,
                 weight_decay: float = 0.0, seed: int = 0, heldout: tuple[torch.Tensor, torch.Tensor] | None = None,
                 ) -> tuple[PredictiveCodingLayer, list[float], list[float]]:
    """Train the upper layer's top-down prediction of the lower layer: minimise mean surprise(lower, P upper + b).

    lower, upper [B, T, d] (hidden states of layers l and l+1 on training text). Full-batch Adam for `steps`
    steps from the identity initialisation (P = I, b = 0). Returns (the upper layer's PredictiveCodingLayer,
    the training loss before each step and after the last, the same on `heldout` = (lower, upper) of other text,
    or [] without it).
    """
    if lower.shape != upper.shape or lower.dim() != 3:
        raise ValueError(f"lower and upper must both be [B, T, d], got {tuple(lower.shape)}, {tuple(upper.shape)}")
    torch.manual_seed(seed)
    hidden = lower.shape[-1]
    pc_lower = PredictiveCodingLayer(hidden, PredictiveCodingConfig())
    pc_upper = PredictiveCodingLayer(hidden, PredictiveCodingConfig())
    opt = torch.optim.AdamW(pc_upper.top_down.parameters(), lr=lr, weight_decay=weight_decay)
    lower, upper = lower.detach(), upper.detach()
    losses, heldout_losses = [], []
    for _ in range(steps):
        if heldout is not None:
            with torch.no_grad():
                heldout_losses.append(surprise_of(heldout[0], pc_upper.predict_below(heldout[1])).mean().item())
        _, _, surprise = pc_lower(lower, pc_upper.predict_below(upper), update_state=False)
        loss = surprise.mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        losses.append(surprise_of(lower, pc_upper.predict_below(upper)).mean().item())
        if heldout is not None:
            heldout_losses.append(surprise_of(heldout[0], pc_upper.predict_below(heldout[1])).mean().item())
    return pc_upper.eval(), losses, heldout_losses


def cpc_chance(num_negatives: int) -> float:
    """InfoNCE of a predictor that cannot tell the positive from N negatives: ln(1 + N)."""
    return math.log(1 + num_negatives)


def cpc_loss(cpc: ContrastivePredictiveCoding, context: torch.Tensor, targets: torch.Tensor, seed: int = 0) -> float:
    """InfoNCE (nats) with negatives drawn by a seeded generator, no grad."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return cpc.compute_loss(context, targets, generator=generator).item()


def fit_cpc(context: torch.Tensor, targets: torch.Tensor, *, num_negatives: int = 15, horizon: int = 1,
            steps: int = 100, lr: float = 1e-3, seed: int = 0,
            heldout: tuple[torch.Tensor, torch.Tensor] | None = None,
            ) -> tuple[ContrastivePredictiveCoding, list[float], list[float]]:
    """Train W_k of `ContrastivePredictiveCoding` on (context [B, T, d], targets [B, T, d_t]) for `steps`
    full-batch Adam steps, fresh negatives each step. Returns (the module, the training loss per step, the
    held-out loss (`cpc_loss`, fixed negatives) before each step and after the last on `heldout` = (context,
    targets) of other text, or [] without it)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    cpc = ContrastivePredictiveCoding(context.shape[-1], num_negatives=num_negatives, prediction_horizon=horizon,
                                      target_dim=targets.shape[-1])
    opt = torch.optim.Adam(cpc.parameters(), lr=lr)
    context, targets = context.detach(), targets.detach()
    losses, heldout_losses = [], []
    for _ in range(steps):
        if heldout is not None:
            heldout_losses.append(cpc_loss(cpc, *heldout))
        loss = cpc.compute_loss(context, targets, generator=generator)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    if heldout is not None:
        heldout_losses.append(cpc_loss(cpc, *heldout))
    return cpc.eval(), losses, heldout_losses
