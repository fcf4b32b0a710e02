"""Train early-exit heads with the backbone frozen: NeuroLlama's own heads (`train_exit_heads`) or an
`EarlyExitEngine` beside a Hugging Face model such as SmolLM2 (`train_hf_exit_heads` in smollm2_exits.py).

    for each step: a batch of windows [b, T+1];  h_l = the backbone's hidden state after layer l (no grad)
    loss = mean over exit layers l of (1 - a) CE(head_l(h_l), x_{t+1}) + a T^2 KL(final || head_l)   (exit_loss)

Only the exit heads' parameters (their norms and the adapters in front of the shared output head) train;
every other parameter is left exactly as it was (its requires_grad flag is restored afterwards). Batches walk
seeded permutations of the windows, so every window is used once before any is used again.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from cortexlab.checks import check_int

__all__ = ["fit_exit_heads", "train_exit_heads"]


def train_exit_heads(model, windows: torch.Tensor, *, steps: int = 50, batch_size: int = 4, lr: float = 1e-3,
                     seed: int = 0, progress: bool = True) -> list[float]:
    """Train a NeuroLlama `model`'s exit heads on windows [n, T+1] of token ids; returns the exit loss at each step."""
    mech = getattr(model, "mechanisms", None)
    if mech is None or mech.early_exit is None:
        raise ValueError("model has no early exit: build it with enable_early_exit=True")

    def backbone(inputs):   # labels given: the full pass, no exit
        out = model(inputs, labels=inputs, output_hidden_states=True)
        return out["hidden_states"], out["logits"]

    was_training = model.training
    model.eval()
    try:
        return fit_exit_heads(model, mech.early_exit, windows, backbone, steps=steps, batch_size=batch_size, lr=lr,
                              seed=seed, progress=progress)
    finally:
        model.train(was_training)


def fit_exit_heads(model, heads, windows: torch.Tensor, backbone: Callable, *, steps: int, batch_size: int,
                   lr: float, seed: int = 0, progress: bool = True) -> list[float]:
    """The shared loop: `backbone(inputs [b, T])` gives (hidden states indexed by layer, final logits) of the
    frozen `model`; `heads` (an `EarlyExitEngine`) trains on them with AdamW. Returns the exit loss of each step."""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be token ids [n, T+1] with T >= 1, got {getattr(windows, 'shape', windows)}")
    check_int("steps", steps)
    check_int("batch_size", batch_size)
    if len(windows) < batch_size:
        raise ValueError(f"windows holds {len(windows)} windows, fewer than batch_size={batch_size}")
    own = {id(p) for p in heads.parameters()}
    frozen = {p: p.requires_grad for p in model.parameters() if id(p) not in own}
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    device = next(heads.parameters()).device
    order: list[int] = []
    losses = []
    try:
        for _ in tqdm(range(steps), desc="exit heads", disable=not progress):
            if len(order) < batch_size:
                order = torch.randperm(len(windows), generator=generator).tolist()
            batch = windows[[order.pop() for _ in range(batch_size)]].to(device)
            with torch.no_grad():
                hidden, logits = backbone(batch[:, :-1])
            loss = heads.exit_loss({layer: hidden[layer] for layer in heads.exit_layers}, batch[:, 1:],
                                   final_logits=logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return losses
