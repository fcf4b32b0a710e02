"""Predictive coding between consecutive layers, and contrastive predictive coding (InfoNCE).

References: Rao & Ballard (1999) "Predictive coding in the visual cortex", Nat. Neurosci. 2:79;
van den Oord, Li & Vinyals (2018) "Representation learning with contrastive predictive coding", arXiv:1807.03748.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cortexlab.checks import check_int, check_number


@dataclass
class PredictiveCodingConfig:
    """w = `prediction_weight` scales the error fed forward; `error_signal_decay` (gamma) is the
    per-call decay of the running mean surprise; `detach_target`: the surprise does not push the
    layer's own representation toward its prediction (stop-gradient, avoids collapse)."""

    prediction_weight: float = 0.1
    error_signal_decay: float = 0.9
    detach_target: bool = True

    def __post_init__(self):
        check_number("prediction_weight", self.prediction_weight, 0)
        check_number("error_signal_decay", self.error_signal_decay, 0, 1)


def _check_hidden(name: str, x, hidden_dim: int, like: torch.Tensor | None = None) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor")
    if x.dim() != 3 or x.shape[-1] != hidden_dim:
        raise ValueError(f"{name} must be [B, T, {hidden_dim}], got {tuple(x.shape)}")
    if like is not None and x.shape[:2] != like.shape[:2]:
        raise ValueError(f"{name} must share [B, T] = {tuple(like.shape[:2])}, got {tuple(x.shape[:2])}")


class PredictiveCodingLayer(nn.Module):
    """Error units between a layer and the layer above it (Rao & Ballard 1999).

    For this layer's representation x [B, T, hidden] and the prediction of it made by the layer above,
    p = prediction_from_above [B, T, hidden]:

        error             e_t = x_t - p_t
        output            y_t = x_t + w E e_t                  E zero-initialised -> y == x at the start
        prediction_below  u_t = P x_t + b                      P = I, b = 0 at the start (a layer's input
                                                               ~ its output in a residual stream)
        surprise          s_t = mean_d (sg(x_t) - p_t)_d^2     [B, T] fp32, mean over the hidden dim;
                                                               sg = stop-gradient if `detach_target`

    Every operation is per token, so the layer is causal. Without a prediction from above (the top
    layer) y = x and the surprise is None. After each forward with a prediction, a running surprise
    (the batch-and-token mean, decayed per call by gamma = `error_signal_decay`) is updated under
    no_grad for plots (`get_running_surprise`, `reset_state`). Neutral: at initialisation (E = 0) or
    with w = 0, y == x exactly. Memory: 2 hidden^2 + hidden parameters; O(B T hidden) per forward.

    Wiring between layers l and l+1 with hidden states x_l, x_{l+1} (one pass):
    ``y_l, _, s_l = pc[l](x_l, pc[l + 1].predict_below(x_{l+1}))`` gives layer l's surprise s_l.
    """

    def __init__(self, hidden_dim: int, config: PredictiveCodingConfig | None = None):
        super().__init__()
        check_int("hidden_dim", hidden_dim)
        self.hidden_dim = hidden_dim
        self.config = config or PredictiveCodingConfig()
        self.top_down = nn.Linear(hidden_dim, hidden_dim)
        self.error_proj = nn.Linear(hidden_dim, hidden_dim, bias=False)
        with torch.no_grad():
            self.top_down.weight.copy_(torch.eye(hidden_dim))
            self.top_down.bias.zero_()
            self.error_proj.weight.zero_()
        self.register_buffer("running_surprise", torch.zeros(()), persistent=False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor, prediction_from_above: torch.Tensor | None = None, *,
                update_state: bool = True):
        """Returns (output [B, T, hidden], prediction_for_below [B, T, hidden], surprise [B, T] or None)."""
        _check_hidden("x", x, self.hidden_dim)
        prediction_for_below = self.predict_below(x)
        if prediction_from_above is None:
            return x, prediction_for_below, None
        error, surprise = self.error_signal(x, prediction_from_above, update_state=update_state)
        return x + error, prediction_for_below, surprise

    def error_signal(self, x: torch.Tensor, prediction_from_above: torch.Tensor, *, update_state: bool = True):
        """(w E (x - p) [B, T, hidden], surprise [B, T]): the error term `forward` adds to x, and the surprise.

        A model that feeds the error of layer l forward into the stream of layer l+1 adds this term there.
        """
        _check_hidden("x", x, self.hidden_dim)
        _check_hidden("prediction_from_above", prediction_from_above, self.hidden_dim, like=x)
        target = x.detach() if self.config.detach_target else x
        surprise = (target.float() - prediction_from_above.float()).square().mean(-1)
        if update_state:
            self._update_running_surprise(surprise.detach())
        return self.config.prediction_weight * self.error_proj(x - prediction_from_above), surprise

    def predict_below(self, x: torch.Tensor) -> torch.Tensor:
        """u = P x + b: this layer's top-down prediction of the representation of the layer below."""
        return self.top_down(x)

    def get_running_surprise(self) -> float:
        return self.running_surprise.item()

    def reset_state(self) -> None:
        self.running_surprise.zero_()
        self.num_updates.zero_()

    @torch.no_grad()
    def _update_running_surprise(self, surprise: torch.Tensor) -> None:
        mean = surprise.mean()
        if not torch.isfinite(mean):
            raise ValueError("x / prediction_from_above are not finite: the running surprise would be corrupted")
        gamma = self.config.error_signal_decay if self.num_updates > 0 else 0.0
        self.running_surprise.mul_(gamma).add_((1 - gamma) * mean)
        self.num_updates += 1


class ContrastivePredictiveCoding(nn.Module):
    """InfoNCE loss of predicting a future target from the current context (van den Oord et al. 2018).

    With context c_t = hidden_states[:, t], targets z_t = target_embeddings[:, t], horizon k and a
    learned W_k:

        f(z, c_t) = z . (W_k c_t) / temperature
        L = mean_{b, t < T-k} -log( e^f(z_{b,t+k}, c_{b,t}) / (e^f(z_{b,t+k}, c_{b,t}) + sum_n e^f(z_n, c_{b,t})) )

    i.e. the cross-entropy of class 0 over the scores [positive, negative_1..N]. Negatives: for each
    anchor (b, t), `num_negatives` positions drawn uniformly with replacement from the other B*T - 1
    target positions (any batch element, any time step; the positive (b, t+k) itself is excluded, so
    identical content elsewhere can still appear as a negative, as in the paper). `sample_negatives`
    returns them as flat indices b*T + t; pass them (or a `generator`) to `compute_loss` to reproduce a
    loss. c_t sees only the causal hidden state at t. Memory: hidden x target_dim parameters;
    O(B T N target_dim) per call for the gathered negatives.
    """

    def __init__(self, hidden_dim: int, num_negatives: int = 16, prediction_horizon: int = 1,
                 target_dim: int | None = None, temperature: float = 1.0):
        super().__init__()
        check_int("hidden_dim", hidden_dim)
        check_int("target_dim", target_dim, allow_none=True)
        check_int("num_negatives", num_negatives)
        check_int("prediction_horizon", prediction_horizon)
        check_number("temperature", temperature, 0, low_open=True)
        self.hidden_dim, self.target_dim = hidden_dim, target_dim or hidden_dim
        self.num_negatives, self.prediction_horizon, self.temperature = num_negatives, prediction_horizon, temperature
        self.predictor = nn.Linear(hidden_dim, self.target_dim, bias=False)     # W_k

    def sample_negatives(self, batch_size: int, seq_len: int, generator: torch.Generator | None = None,
                         device=None) -> torch.Tensor:
        """Flat indices b*T + t of the negatives, [B, T-k, N], never the anchor's positive b*T + t + k."""
        pool, anchors = batch_size * seq_len, seq_len - self.prediction_horizon
        if anchors < 1 or pool < 2:
            raise ValueError(f"need seq_len > prediction_horizon={self.prediction_horizon}, got {seq_len}")
        sample_device = generator.device if generator is not None else device
        idx = torch.randint(0, pool - 1, (batch_size, anchors, self.num_negatives),
                            generator=generator, device=sample_device).to(device)
        positive = self._positive_indices(batch_size, seq_len, idx.device)
        return idx + (idx >= positive[..., None]).long()

    def compute_loss(self, hidden_states: torch.Tensor, target_embeddings: torch.Tensor, *,
                     negative_indices: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Scalar InfoNCE loss (mean over the B*(T-k) anchors)."""
        _check_hidden("hidden_states", hidden_states, self.hidden_dim)
        _check_hidden("target_embeddings", target_embeddings, self.target_dim, like=hidden_states)
        B, T, _ = hidden_states.shape
        if T <= self.prediction_horizon:
            raise ValueError(f"hidden_states needs T > prediction_horizon={self.prediction_horizon}, got T={T}")
        if negative_indices is None:
            negative_indices = self.sample_negatives(B, T, generator, hidden_states.device)
        self._check_negatives(negative_indices, B, T)
        logits = self.scores(hidden_states, target_embeddings, negative_indices)
        labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    def scores(self, hidden_states, target_embeddings, negative_indices) -> torch.Tensor:
        """Logits [B, T-k, 1+N]: column 0 the positive, then the negatives in `negative_indices` order."""
        k = self.prediction_horizon
        pred = self.predictor(hidden_states[:, :-k]).float()                         # W_k c_t
        targets = target_embeddings.float()
        negatives = targets.flatten(0, 1)[negative_indices]                           # [B, T-k, N, D]
        candidates = torch.cat([targets[:, k:, None], negatives], dim=2)
        return torch.einsum("btd,btnd->btn", pred, candidates) / self.temperature

    def _positive_indices(self, B: int, T: int, device) -> torch.Tensor:
        t = torch.arange(T - self.prediction_horizon, device=device)
        return torch.arange(B, device=device)[:, None] * T + t + self.prediction_horizon

    def _check_negatives(self, idx, B: int, T: int) -> None:
        expected = (B, T - self.prediction_horizon, self.num_negatives)
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long or tuple(idx.shape) != expected:
            raise ValueError(f"negative_indices must be a long tensor of shape {expected}")
        if idx.numel() and (idx.min() < 0 or idx.max() >= B * T):
            raise ValueError(f"negative_indices must lie in [0, {B * T})")
