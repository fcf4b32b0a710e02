"""`GatedDeltaNet`: the sidecar's memory layer, and `CortexBlock`, its per-token reference.

Per token x_t (the decoder layer's normalised input) and head h:

    q, k, v = silu(causal_conv([W_q x, W_k x, W_v x]))     q, k L2-normalised per head
    beta_t  = sigmoid(w_b . x_t)                            write strength in (0, 1)
    g_t     = log a_t  (the forget gate, see CortexWrapConfig)
    S_t     = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T        (gated delta rule)
    o_t     = RMSNorm(scale S_t^T q_t) * silu(W_o x_t)

A sequence runs through `cortexlab.ops.gated_delta_rule` (chunkwise parallel); a single
token (decoding) through the O(D^2) recurrent step, so nothing grows with the context.
State per layer: "S" [B, H, D, D] (fp32) and "conv" [B, K-1, 3HD], the conv's last inputs;
with the metacognitive controller (controller.py) also "S_probe" and "S_slow".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cortexlab.ops import gated_delta_rule, gated_delta_step

from .config import CortexWrapConfig
from .controller import MetacognitiveController, recall_error


def forget_gate_log(logits: torch.Tensor, cfg: CortexWrapConfig) -> torch.Tensor:
    """g_t = log a_t from the gate logits z = w.x + b, for the configured gate:

    "log":     g = log(alpha_max) - softplus(z),   z = w.x + b (b = -7: a ~ 0.999)
    "sigmoid": g = log(alpha_max) + logsigmoid(z)  (a = alpha_max sigmoid(z), b = +2: a ~ 0.88)
    """
    log_cap = torch.log(torch.tensor(cfg.alpha_max, dtype=logits.dtype, device=logits.device))
    if cfg.forget_gate == "log":
        return log_cap - F.softplus(logits)
    return log_cap + F.logsigmoid(logits)


class ShortConv(nn.Module):
    """Causal depthwise conv over time + SiLU: y_t = silu(sum_j w_j x_{t-K+1+j}).

    `tail` holds the K-1 inputs before this call (zeros for a fresh sequence), so a
    sequence split across calls gives exactly the outputs of one call.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Conv1d's default

    def forward(self, x: torch.Tensor, tail: torch.Tensor | None):
        B, T, C = x.shape
        K = self.kernel_size
        if tail is None:
            tail = x.new_zeros(B, K - 1, C)
        full = torch.cat([tail, x], dim=1)                   # [B, K-1+T, C]
        # K shifted multiply-adds in the [B, T, C] layout: on a CPU about 2x faster than conv1d, whose
        # channels-first output would also leave q, k, v strided along the head dimension
        w = self.weight[:, 0].t()                            # [K, C]: w[j] weighs x_{t-K+1+j}
        y = full[:, K - 1:] * w[K - 1]
        for j in range(K - 1):
            y.addcmul_(full[:, j:j + T], w[j])
        return F.silu(y), full[:, full.shape[1] - (K - 1):].clone()


class GatedDeltaNet(nn.Module):
    """Multi-head gated delta rule memory over a [B, T, d_model] stream (see module doc)."""

    def __init__(self, d_model: int, cfg: CortexWrapConfig):
        super().__init__()
        self.cfg = cfg
        H, D = cfg.num_heads, cfg.rank_fast
        self.num_heads, self.head_dim = H, D
        self.qkv_proj = nn.Linear(d_model, 3 * H * D, bias=False)
        self.conv = ShortConv(3 * H * D, cfg.conv_size)
        self.beta_proj = nn.Linear(d_model, H)
        self.gate_proj = nn.Linear(d_model, H)      # forget gate logits z = w.x + b
        self.out_gate_proj = nn.Linear(d_model, H * D, bias=False)
        self.out_norm = nn.RMSNorm(D, eps=cfg.norm_eps)
        nn.init.normal_(self.beta_proj.weight, std=0.02)
        nn.init.zeros_(self.beta_proj.bias)          # beta = 0.5 at the start
        nn.init.zeros_(self.gate_proj.weight)        # every token starts at the documented decay
        nn.init.constant_(self.gate_proj.bias, cfg.forget_bias)
        self.controller = MetacognitiveController(H) if cfg.controller else None
        if cfg.conv_init == "induction":
            self._induction_init()

    @torch.no_grad()
    def _induction_init(self):
        """W_k = W_q; the conv passes q and v through (lag 0) and delays k by one token (lag 1)."""
        HD, K = self.num_heads * self.head_dim, self.conv.kernel_size
        self.qkv_proj.weight[HD:2 * HD] = self.qkv_proj.weight[:HD]
        self.conv.weight.zero_()                     # weight[:, 0, j] weighs x_{t-K+1+j}
        self.conv.weight[:HD, 0, K - 1] = 1.0        # q_t <- x_t
        self.conv.weight[HD:2 * HD, 0, K - 2] = 1.0  # k_t <- x_{t-1}
        self.conv.weight[2 * HD:, 0, K - 1] = 1.0    # v_t <- x_t

    @torch.no_grad()
    def drop_shared_directions_(self, x: torch.Tensor, rank: int):
        """Project the top `rank` right-singular directions U [rank, d_model] of sample inputs x [N, d_model]
        out of the query and key projections:  W_q <- W_q (I - U^T U),  W_k <- W_k (I - U^T U).

        A frozen decoder's hidden states share a few large directions (its massive activations): at
        layer 12 of SmolLM2 two unrelated tokens' inputs have cosine ~0.8, and so do their keys, so
        every query matches every key alike. Without those directions a key matches the query it is
        meant for (see `CortexWrapConfig.conv_init`) and little else. W_v and the gates keep them.
        """
        d = self.qkv_proj.in_features
        if not (isinstance(rank, int) and 1 <= rank < d):
            raise ValueError(f"rank must be an int in [1, {d}), got {rank!r}")
        if x.dim() != 2 or x.shape[1] != d or len(x) < rank:
            raise ValueError(f"x must be [N >= rank, {d}] sample inputs, got shape {tuple(x.shape)}")
        U = torch.linalg.svd(x.float(), full_matrices=False).Vh[:rank]
        HD = self.num_heads * self.head_dim
        W = self.qkv_proj.weight
        W[:2 * HD] -= (W[:2 * HD].float() @ U.T @ U).to(W.dtype)

    def features(self, x, conv_tail, token_mask):
        """q, k, v [B,T,H,D] after the short conv (q, k not yet normalised), and the new tail."""
        if token_mask is not None:
            x = x * token_mask[..., None]  # a padded token enters the conv as zeros
        qkv, tail = self.conv(self.qkv_proj(x), conv_tail)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(dim=2)
        return q, k, v, tail

    def gate_logits(self, x):
        """(z_a, z_b) [B,T,H]: the forget-gate and write logits w.x + b, in one product."""
        weight = torch.cat([self.gate_proj.weight, self.beta_proj.weight])
        return F.linear(x, weight, torch.cat([self.gate_proj.bias, self.beta_proj.bias])).chunk(2, dim=-1)

    def gates(self, logits, token_mask, write=0.0, forget=0.0):
        """g (log forget gate) and beta, [B,T,H], from `gate_logits`; a padded token gets g = 0, beta = 0 (no-op).

        `write` and `forget` are the controller's offsets to the beta and gate logits.
        """
        z_a, z_b = logits
        g = forget_gate_log(z_a + forget, self.cfg)
        beta = torch.sigmoid(z_b + write)
        return _masked(g, token_mask), _masked(beta, token_mask)

    def memory(self, q, k, v, g, beta, S0):
        """The gated delta rule over the sequence; returns (o [B,T,H,D], final S fp32)."""
        if q.shape[1] == 1 and S0 is not None:  # decoding: one O(D^2) recurrent step
            o, S = gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], S0, self.head_dim ** -0.5)
            return o[:, None], S
        return gated_delta_rule(q, k, v, g, beta, initial_state=S0, output_final_state=True,
                                chunk_size=self.cfg.chunk_size, backend=self.cfg.backend)

    def forward(self, x, state=None, token_mask=None, entropy=None):
        """x [B,T,d_model] -> (o [B,T,H,D], new state, trace).

        entropy: [B, T] predictive entropy for the controller (ignored without one).
        trace: the pre-normalisation q, k, v, the gates g and beta actually used and, with a
        controller, its signals ("surprise", "entropy") and the consolidation strength "beta_slow".
        """
        state = state or {}
        q, k, v, tail = self.features(x, state.get("conv"), token_mask)
        qn, kn = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
        new_state, trace = {"conv": tail}, {"q": q, "k": k, "v": v}
        logits = self.gate_logits(x)
        if self.controller is None:
            g, beta = self.gates(logits, token_mask)
            o, new_state["S"] = self.memory(qn, kn, v, g, beta, state.get("S"))
        else:
            ctrl = self.controller
            g0, beta0 = self.gates(logits, token_mask)
            surprise, new_state["S_probe"] = recall_error(kn, v, g0, beta0, state.get("S_probe"), self.memory)
            f = ctrl.signals(_masked(surprise, token_mask), entropy)
            write, forget, consolidate = ctrl.modulations(f)
            g, beta = self.gates(logits, token_mask, write, forget)
            beta_slow = beta * torch.sigmoid(consolidate)
            g_slow = _masked(ctrl.slow_gate(g), token_mask)
            # the fast and the slow memory read the same q, k, v: one pass over 2H stacked heads
            H = self.num_heads
            S0 = torch.cat([state["S"], state["S_slow"]], dim=1) if "S" in state else None
            both, S_both = self.memory(*(_every_head_twice(t) for t in (qn, kn, v)),
                                       torch.cat([g, g_slow], dim=2), torch.cat([beta, beta_slow], dim=2), S0)
            o, o_slow = both.split(H, dim=2)
            new_state["S"], new_state["S_slow"] = S_both.split(H, dim=1)
            o = o + ctrl.slow_read[:, None] * o_slow
            trace.update(surprise=f[..., 0], entropy=f[..., 1], beta_slow=beta_slow)
        trace.update(g=g, beta=beta)
        gate = F.silu(self.out_gate_proj(x)).unflatten(-1, (self.num_heads, self.head_dim))
        o = self.out_norm(o.to(x.dtype)) * gate
        return o, new_state, trace


def _every_head_twice(t: torch.Tensor) -> torch.Tensor:
    """[B, T, H, D] -> [B, T, 2H, D] (heads 0..H-1, then again), stored head-major: the layout the
    chunked path needs, so it reads this without another copy."""
    t = t.transpose(1, 2)
    return torch.cat([t, t], dim=1).transpose(1, 2)


def _masked(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero a [B, T, ...] per-token quantity at padded tokens."""
    if token_mask is None:
        return x
    return x * token_mask.view(*token_mask.shape, *([1] * (x.dim() - 2)))


class CortexBlock(GatedDeltaNet):
    """Cortex v1: the same memory as `GatedDeltaNet`, written as a plain per-token loop.

    Kept as the readable reference (and tested equal to the chunked v2 path); it is
    O(T) sequential steps, so use it to read, not to train.
    """

    def memory(self, q, k, v, g, beta, S0):
        B, T, H, D = k.shape
        S = torch.zeros(B, H, D, v.shape[-1], dtype=torch.float32, device=k.device) if S0 is None else S0.float()
        scale = D ** -0.5
        outputs = []
        for t in range(T):
            a = g[:, t].float().exp()[..., None, None]                     # [B, H, 1, 1]
            k_t, v_t, q_t = k[:, t].float(), v[:, t].float(), q[:, t].float()
            recalled = torch.einsum("bhkv,bhk->bhv", a * S, k_t)            # a S^T k
            error = v_t - recalled                                          # what the memory got wrong
            S = a * S + beta[:, t].float()[..., None, None] * k_t[..., :, None] * error[..., None, :]
            outputs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q_t))
        return torch.stack(outputs, dim=1), S
