"""Train the early-exit heads of a NeuroLlama model with its backbone frozen (e.g. SmolLM2 via `from_hf_llama`).

    for each step: a random batch of windows [b, T+1];  h_l = the backbone's hidden state after layer l (no grad)
    loss = mean over exit layers l of (1 - a) CE(head_l(h_l), x_{t+1}) + a T^2 KL(final || head_l)   (exit_loss)

Only the exit heads' parameters (their norms and the adapters in front of the shared output head) train;
every other parameter is left exactly as it was (its requires_grad flag is restored afterwards).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

__all__ = ["train_exit_heads"]


def train_exit_heads(model, windows: torch.Tensor, *, steps: int = 50, batch_size: int = 4, lr: float = 1e-3,
                     seed: int = 0, progress: bool = True) -> list[float]:
    """Train `model`'s exit heads on windows [n, T+1] of token ids; returns the exit loss at each step."""
    mech = getattr(model, "mechanisms", None)
    if mech is None or mech.early_exit is None:
        raise ValueError("model has no early exit: build it with enable_early_exit=True")
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be token ids [n, T+1] with T >= 1, got {getattr(windows, 'shape', windows)}")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    engine = mech.early_exit
    heads = {id(p) for p in engine.parameters()}
    frozen = {p: p.requires_grad for p in model.parameters() if id(p) not in heads}
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(engine.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = []
    try:
        for _ in tqdm(range(steps), desc="exit heads", disable=not progress):
            batch = windows[torch.randint(len(windows), (batch_size,), generator=generator)].to(device)
            inputs = batch[:, :-1]
            with torch.no_grad():   # labels given: the full pass, no exit
                out = model(inputs, labels=inputs, output_hidden_states=True)
            hidden = {layer: out["hidden_states"][layer] for layer in mech.exit_layers}
            loss = engine.exit_loss(hidden, batch[:, 1:], final_logits=out["logits"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return losses
