"""Population coding: heads vote, per token, on what the layer outputs (Georgopoulos et al. 1986).

In motor cortex each neuron fires most for its preferred movement direction, and the movement is
read out as the population vector: the firing-rate-weighted average of the neurons' votes. Here
the "neurons" are attention heads and their votes are their outputs o_h [B, T, H, D] (what is
concatenated before o_proj). Every voting rule produces per-token head weights w [B, T, H] that
sum to 1 over heads (or are all 0 when every head is silenced), and is used in one of two ways:

- aggregate=True:  the population vector  sum_h w_h o_h  [B, T, D]  (the design's output);
- aggregate=False: the heads re-weighted, o_h * (H w_h)  [B, T, H, D], which reshapes to
  [B, T, H*D] for an unchanged o_proj. Since o_proj(concat) = sum_h W_h o_h, this makes the layer
  output H * sum_h w_h (W_h o_h): the weighted average of each head's vote in hidden space, and
  uniform weights (w_h = 1/H) reproduce plain concatenation + o_proj exactly (the neutral setting).

`PopulationCodedAttention` packages the second form with its own output projection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cortexlab.checks import check_int, check_number

VOTING_METHODS = ("tuning_curve", "confidence", "entropy")


def _check_heads(head_outputs, num_heads: int, head_dim: int | None = None) -> None:
    if not isinstance(head_outputs, torch.Tensor) or not head_outputs.is_floating_point():
        raise TypeError("head_outputs must be a floating-point tensor [B, T, H, D]")
    if head_outputs.ndim != 4 or head_outputs.shape[2] != num_heads:
        raise ValueError(f"head_outputs must have shape [B, T, {num_heads}, D], got {tuple(head_outputs.shape)}")
    if head_dim is not None and head_outputs.shape[3] != head_dim:
        raise ValueError(f"head_outputs must have head_dim={head_dim}, got {head_outputs.shape[3]}")


def combine_heads(head_outputs: torch.Tensor, weights: torch.Tensor, aggregate: bool = True) -> torch.Tensor:
    """head_outputs [B, T, H, D], weights [B, T, H] -> sum_h w_h o_h [B, T, D] (aggregate) or o_h * H w_h."""
    w = weights.to(head_outputs.dtype)
    if aggregate:
        return torch.einsum("bth,bthd->btd", w, head_outputs)
    return head_outputs * (head_outputs.shape[2] * w)[..., None]


class ConfidenceWeightedVoting(nn.Module):
    """Learned per-head confidence; confident heads vote, heads under the threshold are silenced.

        c_th = sigmoid(u_h . o_th + b_h)                 confidence of head h at token t
        m_th = [c_th >= threshold]                       silencing (lateral inhibition)
        w_th = c_th m_th / sum_h' c_th' m_th'            (0 for every head when all are silenced)
        out_t = sum_h w_th o_th                          [B, T, D]  (aggregate=False: o_th * H w_th)

    u starts at 0 and b at 0, so every head starts with c = 0.5 and w = 1/H: the module is neutral
    at initialisation (aggregate=False returns the heads unchanged, up to rounding). Silenced heads
    get no gradient through their confidence (the mask is a hard step).

    Memory: parameters H x (D + 1); per forward [B, T, H] weights.

    Reference: Georgopoulos, Schwartz & Kettner (1986), Neuronal population coding of movement
    direction, Science 233:1416.
    """

    def __init__(self, num_heads: int, head_dim: int, threshold: float = 0.1):
        super().__init__()
        check_int("num_heads", num_heads)
        check_int("head_dim", head_dim)
        check_number("threshold", threshold, 0, 1, high_open=True)
        self.num_heads, self.head_dim, self.threshold = num_heads, head_dim, threshold
        self.weight = nn.Parameter(torch.zeros(num_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads))

    def confidence(self, head_outputs: torch.Tensor) -> torch.Tensor:
        """c [B, T, H] in (0, 1), fp32."""
        _check_heads(head_outputs, self.num_heads, self.head_dim)
        return torch.sigmoid(torch.einsum("bthd,hd->bth", head_outputs.float(), self.weight.float()) + self.bias)

    def head_weights(self, head_outputs: torch.Tensor) -> torch.Tensor:
        """w [B, T, H], fp32, summing to 1 over the heads that are not silenced."""
        c = self.confidence(head_outputs)
        votes = c * (c >= self.threshold)
        return votes / votes.sum(-1, keepdim=True).clamp_min(torch.finfo(votes.dtype).tiny)

    def forward(self, head_outputs: torch.Tensor, aggregate: bool = True) -> torch.Tensor:
        """head_outputs [B, T, H, D] -> [B, T, D] (aggregate) or re-weighted heads [B, T, H, D]."""
        return combine_heads(head_outputs, self.head_weights(head_outputs), aggregate)


def attention_entropy(attention_weights: torch.Tensor) -> torch.Tensor:
    """S_hi = -sum_j p_hij log p_hij, [B, H, Tq] from probabilities [B, H, Tq, Tk]; 0 log 0 = 0, no gradient,
    computed in fp32 at least (float64 stays float64)."""
    p = attention_weights.detach().to(torch.promote_types(attention_weights.dtype, torch.float32))
    return -torch.xlogy(p, p).sum(-1)


class EntropyBasedVoting(nn.Module):
    """Parameter-free voting: heads with sharper (lower-entropy) attention weigh more.

        S_hi = -sum_j p_hij log p_hij                    entropy of head h's attention at query i
        w_ih = softmax_h(-S_hi / temperature)
        out_i = sum_h w_ih o_ih                          [B, T, D]  (aggregate=False: o_ih * H w_ih)

    temperature -> inf (float("inf") is accepted) gives w = 1/H: the plain average, and with
    aggregate=False exactly the plain concatenation (neutral setting). Entropy uses 0 log 0 = 0, so
    masked keys (p = 0) contribute nothing. Weights carry no gradient to the attention
    probabilities (a confidence read-out, not a training signal for them).

    Memory: per forward [B, H, Tq] entropies; reads the [B, H, Tq, Tk] probabilities once.

    Reference: Georgopoulos, Schwartz & Kettner (1986), Science 233:1416.
    """

    def __init__(self, num_heads: int, temperature: float = 1.0):
        super().__init__()
        check_int("num_heads", num_heads)
        check_number("temperature", temperature, 0, low_open=True, allow_inf=True)
        self.num_heads, self.temperature = num_heads, temperature

    def head_weights(self, attention_weights: torch.Tensor) -> torch.Tensor:
        """attention_weights [B, H, Tq, Tk] -> w [B, Tq, H], fp32 (float64 for float64 weights)."""
        if not isinstance(attention_weights, torch.Tensor) or not attention_weights.is_floating_point():
            raise TypeError("attention_weights must be a floating-point tensor [B, H, Tq, Tk]")
        if attention_weights.ndim != 4 or attention_weights.shape[1] != self.num_heads:
            raise ValueError(f"attention_weights must have shape [B, {self.num_heads}, Tq, Tk], "
                             f"got {tuple(attention_weights.shape)}")
        return self.weights_from_entropy(attention_entropy(attention_weights))

    def weights_from_entropy(self, entropy: torch.Tensor) -> torch.Tensor:
        """S [B, H, Tq] (`attention_entropy`) -> w [B, Tq, H] = softmax_h(-S / temperature)."""
        return torch.softmax(-entropy / self.temperature, dim=1).transpose(1, 2)

    def forward(self, head_outputs: torch.Tensor, attention_weights: torch.Tensor,
                aggregate: bool = True) -> torch.Tensor:
        """head_outputs [B, T, H, D], attention_weights [B, H, T, Tk] -> [B, T, D] or [B, T, H, D]."""
        _check_heads(head_outputs, self.num_heads)
        weights = self.head_weights(attention_weights)
        if weights.shape[:2] != head_outputs.shape[:2]:
            raise ValueError(f"attention_weights has batch/queries {tuple(weights.shape[:2])}, head_outputs has "
                             f"batch/tokens {tuple(head_outputs.shape[:2])}")
        return combine_heads(head_outputs, weights, aggregate)


@dataclass
class PopulationConfig:
    """Settings of `PopulationCodedAttention` (validated on construction).

    voting_method: "tuning_curve" (Gaussian tuning of each head around a preferred direction),
    "confidence" (`ConfidenceWeightedVoting`) or "entropy" (`EntropyBasedVoting`).
    tuning_width sigma > 0 (inf: flat tuning curves, the neutral setting); confidence_threshold for
    "confidence"; temperature for "entropy".
    """

    num_heads: int
    head_dim: int
    hidden_dim: int
    voting_method: str = "tuning_curve"
    tuning_width: float = 1.0
    confidence_threshold: float = 0.1
    temperature: float = 1.0

    def __post_init__(self):
        for name in ("num_heads", "head_dim", "hidden_dim"):
            check_int(name, getattr(self, name))
        if self.voting_method not in VOTING_METHODS:
            raise ValueError(f"voting_method must be one of {VOTING_METHODS}, got {self.voting_method!r}")
        check_number("tuning_width", self.tuning_width, 0, low_open=True, allow_inf=True)
        check_number("temperature", self.temperature, 0, low_open=True, allow_inf=True)
        check_number("confidence_threshold", self.confidence_threshold, 0, 1, high_open=True)


class PopulationCodedAttention(nn.Module):
    """Head aggregation by population vote; replaces concat + o_proj of an attention layer.

    Tuning curves ("tuning_curve"): head h has a learned preferred direction p_h in hidden space.
    The stimulus is `head_contexts` x_t [B, T, hidden]: the hidden state the layer attends from
    (its normed input at token t), the same stimulus for every head. Each head's activation is a
    Gaussian of the distance between the unit stimulus and its unit preferred direction:

        a_th = exp(-||x^_t - p^_h||^2 / (2 sigma^2)) = exp((cos(x_t, p_h) - 1) / sigma^2)
        w_th = a_th / sum_h' a_th'                         (= softmax_h(cos / sigma^2))
        out_t = W_o concat_h(H w_th o_th) = H sum_h w_th (W_o,h o_th)     [B, T, hidden]

    i.e. the activation-weighted average of the heads' votes W_o,h o_th in hidden space (scaled by
    H). "confidence" and "entropy" take w from `ConfidenceWeightedVoting` / `EntropyBasedVoting`
    (the latter needs `attention_weights` [B, H, T, Tk]). Neutral setting: uniform weights
    (tuning_width = inf, temperature = inf, or the confidence voter at initialisation) give exactly
    W_o concat_h(o_th): copy the layer's o_proj weight into `out_proj` to start from the baseline.

    Memory: parameters H x hidden (preferred directions) + H*D x hidden (out_proj); per forward
    [B, T, H] weights.

    Reference: Georgopoulos, Schwartz & Kettner (1986), Science 233:1416.
    """

    def __init__(self, config: PopulationConfig):
        super().__init__()
        if not isinstance(config, PopulationConfig):
            raise TypeError(f"config must be a PopulationConfig, got {type(config).__name__}")
        self.config = config
        H, D = config.num_heads, config.head_dim
        self.out_proj = nn.Linear(H * D, config.hidden_dim, bias=False)
        if config.voting_method == "tuning_curve":
            self.preferred = nn.Parameter(torch.randn(H, config.hidden_dim))
        elif config.voting_method == "confidence":
            self.voter = ConfidenceWeightedVoting(H, D, config.confidence_threshold)
        else:
            self.voter = EntropyBasedVoting(H, config.temperature)

    def tuning_weights(self, head_contexts: torch.Tensor) -> torch.Tensor:
        """head_contexts [B, T, hidden] -> normalised tuning-curve activations w [B, T, H], fp32."""
        hidden = self.config.hidden_dim
        if not isinstance(head_contexts, torch.Tensor) or not head_contexts.is_floating_point():
            raise TypeError("head_contexts must be a floating-point tensor [B, T, hidden]")
        if head_contexts.ndim != 3 or head_contexts.shape[-1] != hidden:
            raise ValueError(f"head_contexts must have shape [B, T, {hidden}], got {tuple(head_contexts.shape)}")
        x = nn.functional.normalize(head_contexts.float(), dim=-1)
        p = nn.functional.normalize(self.preferred.float(), dim=-1)
        return torch.softmax((x @ p.T - 1.0) / self.config.tuning_width ** 2, dim=-1)

    def head_weights(self, head_outputs: torch.Tensor, head_contexts: torch.Tensor | None = None,
                     attention_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token head weights w [B, T, H] of the configured voting method."""
        method = self.config.voting_method
        if method == "tuning_curve":
            if head_contexts is None:
                raise ValueError("head_contexts [B, T, hidden] is required for voting_method='tuning_curve'")
            weights = self.tuning_weights(head_contexts)
        elif method == "confidence":
            weights = self.voter.head_weights(head_outputs)
        else:
            if attention_weights is None:
                raise ValueError("attention_weights [B, H, T, Tk] is required for voting_method='entropy'")
            weights = self.voter.head_weights(attention_weights)
        if weights.shape[:2] != head_outputs.shape[:2]:
            raise ValueError(f"head_outputs has batch/tokens {tuple(head_outputs.shape[:2])}, the voting input has "
                             f"{tuple(weights.shape[:2])}")
        return weights

    def forward(self, head_outputs: torch.Tensor, head_contexts: torch.Tensor | None = None,
                attention_weights: torch.Tensor | None = None) -> torch.Tensor:
        """head_outputs [B, T, H, D] (+ head_contexts or attention_weights) -> [B, T, hidden]."""
        cfg = self.config
        _check_heads(head_outputs, cfg.num_heads, cfg.head_dim)
        weights = self.head_weights(head_outputs, head_contexts, attention_weights)
        voted = combine_heads(head_outputs, weights, aggregate=False)
        return self.out_proj(voted.reshape(*head_outputs.shape[:2], cfg.num_heads * cfg.head_dim))
