"""How much an early-exit NeuroLlama saves, and what it costs: the trade-off behind the early-exit results.

`exit_tradeoff(model, windows, thresholds)` reads one full forward per batch (every exit head's
logits at once) and applies the exit rule per token: token t leaves at the first exit layer l
whose confidence c_l(t) >= tau, else runs all L layers. For each tau it reports

    layers_fraction  = mean_t l(t) / L                     (1 - the compute skipped in the layer stack)
    loss             = mean_t CE(logits_{l(t)}(t), x_{t+1})  vs  full_loss with every token at L
    agreement        = mean_t [argmax logits_{l(t)}(t) == argmax logits_L(t)]

This per-token rule is what a decoder with a KV cache could realise token by token; the model's
own forward (`NeuroLlamaModel`) exits a whole sequence on its last token's confidence, and
`exit_wall_clock` times that real skipping against the full pass.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from cortexlab.neuro.early_exit import exit_confidence

__all__ = ["adapt_threshold", "exit_threshold", "exit_tradeoff", "exit_wall_clock"]


def _engine(model):
    mech = getattr(model, "mechanisms", None)
    if mech is None or mech.early_exit is None:
        raise ValueError("model has no early exit: build it with enable_early_exit=True")
    return mech


@contextmanager
def exit_threshold(model, tau: float):
    """Run the model with exit threshold `tau`, then restore the controller's state."""
    controller = _engine(model).exit_controller
    saved = controller.base_threshold
    controller.set_threshold(tau)
    try:
        yield
    finally:
        controller.set_threshold(saved)


@torch.no_grad()
def exit_tradeoff(model, windows: torch.Tensor, thresholds=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95), *,
                  batch_size: int = 16) -> dict:
    """The per-token exit trade-off on windows [n, T+1] (inputs [:, :-1], next tokens [:, 1:]); see module doc."""
    mech = _engine(model)
    engine, layers, L = mech.early_exit, mech.exit_layers, model.config.num_layers
    measure = engine.config.confidence_measure
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, conf, agree = [], [], []          # per batch: [E+1, N] (exits then the final layer), [E, N], [E+1, N]
    for s in range(0, len(windows), batch_size):
        batch = windows[s:s + batch_size].to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:].flatten()
        out = model(inputs, labels=inputs, output_hidden_states=True)     # labels: the full pass, no exit
        final = out["logits"].float().flatten(0, 1)
        per_exit = [engine.exit_logits(out["hidden_states"][layer], layer).float().flatten(0, 1) for layer in layers]
        nll.append(torch.stack([F.cross_entropy(z, targets, reduction="none") for z in per_exit + [final]]))
        conf.append(torch.stack([exit_confidence(z, measure) for z in per_exit]))
        agree.append(torch.stack([(z.argmax(-1) == final.argmax(-1)).float() for z in per_exit + [final]]))
    model.train(was_training)
    nll, conf, agree = torch.cat(nll, 1), torch.cat(conf, 1), torch.cat(agree, 1)
    depth = torch.tensor(list(layers) + [L], dtype=torch.float32, device=nll.device)
    full_loss = nll[-1].mean().item()
    rows = []
    for tau in thresholds:
        passed = torch.cat([conf >= tau, torch.ones_like(conf[:1], dtype=torch.bool)])   # the last layer always
        choice = passed.float().argmax(0)                                                  # first exit that passes
        pick = lambda m: m.gather(0, choice[None])[0]                                      # noqa: E731
        exits = torch.bincount(choice, minlength=len(layers) + 1) / choice.numel()
        rows.append({"threshold": tau, "layers_fraction": round(depth[choice].mean().item() / L, 5),
                     "loss": round(pick(nll).mean().item(), 5),
                     "loss_increase": round(pick(nll).mean().item() - full_loss, 5),
                     "agreement": round(pick(agree).mean().item(), 5),
                     "exit_share": {str(layer): round(x, 5) for layer, x in zip(list(layers) + [L], exits.tolist())}})
    return {"exit_layers": list(layers), "num_layers": L, "confidence": measure, "tokens": int(nll.shape[1]),
            "full_loss": round(full_loss, 5), "by_threshold": rows}


@torch.no_grad()
def exit_wall_clock(model, windows: torch.Tensor, thresholds=(0.5, 0.7, 0.9), *, repeats: int = 3) -> dict:
    """Seconds to run the model over `windows` one sequence at a time, with exits at each tau vs the full pass.

    Round-robin over the variants, `repeats` times; the median of each. Returns the times, the ratio
    to the full pass and the mean exit layer the model's own (last-token) rule took.
    """
    _engine(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    inputs = [w[None, :-1].to(device) for w in windows]

    def run(tau):       # tau None: the full pass (labels given switch exits off; it adds one cross-entropy)
        layers = []
        with exit_threshold(model, 1.0 if tau is None else tau):
            t0 = time.perf_counter()
            for x in inputs:
                layers.append(model(x, labels=x if tau is None else None)["exit_layer"])
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0, sum(layers) / len(layers)

    variants = {"full": None, **{str(tau): tau for tau in thresholds}}
    run(None)                                                            # warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    depth = {}
    for _ in range(repeats):
        for name, tau in variants.items():
            seconds, depth[name] = run(tau)
            times[name].append(seconds)
    model.train(was_training)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"sequences": len(inputs), "tokens_each": int(windows.shape[1] - 1), "repeats": repeats,
            "device": device.type, "seconds": median,
            "ratio_to_full": {k: round(v / median["full"], 4) for k, v in median.items()},
            "mean_exit_layer": depth}


@torch.no_grad()
def adapt_threshold(model, windows: torch.Tensor) -> dict:
    """Run the model's own exits window by window and feed their correctness back to its controller.

    For each window [T+1] the model answers the next token after window[:-1] (exiting where confident);
    an early answer counts as correct when it equals the full model's argmax. The controller
    (`AdaptiveComputationController.update`) then moves tau. Returns the threshold after each step, the
    running error rate of the early answers, and the exit layer of each step.
    """
    mech = _engine(model)
    controller = mech.exit_controller
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    thresholds, error_rates, exit_layers, errors, exits = [], [], [], 0, 0
    for window in windows:
        x = window[None, :-1].to(device)
        out = model(x)
        correct = None
        if out["system_type"] == "system1":
            full = model(x, labels=x)["logits"][0, -1].argmax()
            correct = bool(out["logits"][0, -1].argmax() == full)
            exits += 1
            errors += not correct
        controller.update(correct)
        thresholds.append(controller.threshold)
        error_rates.append(errors / exits if exits else 0.0)
        exit_layers.append(out["exit_layer"])
    model.train(was_training)
    return {"threshold": thresholds, "error_rate": error_rates, "exit_layer": exit_layers,
            "target_error_rate": controller.config.target_error_rate}

