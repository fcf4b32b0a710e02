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

For a transformers decoder (SmolLM2) with `EarlyExitEngine` heads (`cortexlab.neuro.exit_decoding`),
`hf_exit_tradeoff` is the same per-token trade-off, and `exit_decode_wall_clock` times real token-by-token
greedy decoding with a KV cache, where each token does leave at its exit layer (CALM state propagation),
against full-depth decoding: tokens/s, speed-up, mean exit layer, and how often the generated tokens agree
with the full model's greedy tokens. Both take an optional `ExitClassifier` (CALM's early-exit classifier,
`cortexlab.neuro.exit_classifier`): the exit rule then reads c_l(h_l) >= tau instead of the heads' confidence,
and `exit_classifier_accuracy` scores its decisions against the consistency labels.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from cortexlab.checks import check_int
from cortexlab.neuro.early_exit import exit_confidence

__all__ = ["adapt_threshold", "decode_token_macs", "exit_classifier_accuracy", "exit_decode_wall_clock",
           "exit_threshold", "exit_tradeoff", "exit_wall_clock", "hf_exit_tradeoff"]


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
        for store, value in zip((nll, conf, agree), _per_token(per_exit, final, targets, measure)):
            store.append(value)
    model.train(was_training)
    return _tradeoff_summary(nll, conf, agree, layers, L, measure, thresholds)


def _per_token(per_exit: list, final: torch.Tensor, targets: torch.Tensor, measure: str, conf=None):
    """[E+1, N] cross-entropies, [E, N] confidences, [E+1, N] argmax agreement with `final` of exit logits [N, V]
    (conf: given [E, N] confidences instead of `measure` on the exit logits)."""
    nll = torch.stack([F.cross_entropy(z, targets, reduction="none") for z in per_exit + [final]])
    if conf is None:
        conf = torch.stack([exit_confidence(z, measure) for z in per_exit])
    agree = torch.stack([(z.argmax(-1) == final.argmax(-1)).float() for z in per_exit + [final]])
    return nll, conf, agree


def _tradeoff_summary(nll: list, conf: list, agree: list, layers, L: int, measure: str, thresholds) -> dict:
    """The per-threshold rows of the trade-off from per-batch [E+1, N], [E, N], [E+1, N] tensors."""
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
                     "early_fraction": round(1.0 - exits[-1].item(), 5),
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



def _check_classifier(classifier, heads) -> None:
    from cortexlab.neuro.exit_classifier import ExitClassifier

    if classifier is not None and (not isinstance(classifier, ExitClassifier)
                                   or classifier.exit_layers != tuple(heads.exit_layers)):
        raise ValueError(f"classifier must be None or an ExitClassifier for the heads' exit layers "
                         f"{list(heads.exit_layers)}, got {classifier!r}")


@torch.no_grad()
def hf_exit_tradeoff(model, heads, windows: torch.Tensor, thresholds=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95), *,
                     classifier=None, batch_size: int = 4) -> dict:
    """`exit_tradeoff` for a transformers causal LM with `EarlyExitEngine` heads on its hidden states
    (`cortexlab.neuro.exit_decoding.hf_exit_heads`): one full forward per batch of windows [n, T+1].
    With `classifier` the confidence is c_l(h_l) (confidence "classifier"), else the heads' own measure."""
    from cortexlab.neuro.early_exit import EarlyExitEngine

    if not isinstance(heads, EarlyExitEngine):
        raise ValueError(f"heads must be an EarlyExitEngine, got {type(heads).__name__}")
    _check_classifier(classifier, heads)
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be token ids [n, T+1] with T >= 1, got {getattr(windows, 'shape', windows)}")
    layers, L = heads.exit_layers, model.config.num_hidden_layers
    measure = heads.config.confidence_measure if classifier is None else "classifier"
    if layers[-1] >= L:
        raise ValueError(f"heads has exit layers {list(layers)}; each must be < the model's {L} layers")
    device = model.lm_head.weight.device
    nll, conf, agree = [], [], []
    for s in range(0, len(windows), batch_size):
        batch = windows[s:s + batch_size].to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:].flatten()
        out = model(inputs, output_hidden_states=True)
        final = out.logits.float().flatten(0, 1)
        per_exit = [heads.exit_logits(out.hidden_states[layer], layer).float().flatten(0, 1) for layer in layers]
        probe = None if classifier is None else torch.stack(
            [classifier(out.hidden_states[layer], layer).flatten() for layer in layers])
        for store, value in zip((nll, conf, agree), _per_token(per_exit, final, targets, measure, probe)):
            store.append(value)
    return _tradeoff_summary(nll, conf, agree, layers, L, measure, thresholds)


@torch.no_grad()
def exit_classifier_accuracy(classifier, examples: dict) -> dict:
    """Per exit layer, how well c_l separates the consistency labels of `examples` ({l: (h_l [N, d], y_l [N])},
    `consistency_examples`): accuracy of [c_l >= 1/2] vs the majority-class rate max(p, 1 - p), p = mean y_l
    (the share of tokens whose exit-head argmax is the full model's), and the mean binary cross-entropy."""
    result = {}
    for layer, (hidden, labels) in examples.items():
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.bool or labels.shape != hidden.shape[:-1]:
            raise ValueError(f"examples[{layer}] must be (hidden [N, d], labels [N] bool)")
        logit = classifier.logit(hidden, layer)
        positive = labels.float().mean().item()
        result[str(layer)] = {
            "tokens": int(labels.numel()), "positive_rate": round(positive, 5),
            "majority_rate": round(max(positive, 1.0 - positive), 5),
            "accuracy": round(((logit >= 0) == labels).float().mean().item(), 5),
            "bce": round(F.binary_cross_entropy_with_logits(logit, labels.float()).item(), 5)}
    return result


def _agreement(tokens: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(fraction of positions where tokens == reference, fraction of the sequence before the first difference)."""
    same = (tokens == reference).flatten()
    first_difference = int((~same).float().argmax()) if not bool(same.all()) else same.numel()
    return same.float().mean().item(), first_difference / same.numel()


def decode_token_macs(model, heads, depth: int, *, exits: bool = True, classifier=None) -> int:
    """Multiply-accumulates of the weight matmuls one decoded token costs when decided at `depth` (1-based; the
    model's L = full depth), with the heads of `heads` asked at every exit layer it passed (exits=False: none):

        sum_{i <= depth} layer_i + (#exit layers asked) head + (sum_{j > depth} (W_k^j + W_v^j) if depth < L
                                                                 else lm_head)

    With `classifier` each exit layer passed costs its probe's d weights and only the exit layer's head runs:

        sum_{i <= depth} layer_i + (#exit layers asked) d + (head_depth + sum_{j > depth} (W_k^j + W_v^j)
                                                              if depth < L else lm_head)

    layer_i counts every 2-D weight of decoder layer i, a head its adapter (or projection) plus the shared
    lm_head. Attention over the cache, norms and softmax are left out (small at short contexts)."""
    layers, L = model.model.layers, model.config.num_hidden_layers
    lm_head = model.lm_head.weight.numel()
    weights = lambda module: sum(p.numel() for p in module.parameters() if p.dim() == 2)    # noqa: E731
    head = lambda layer: (weights(heads.heads[str(layer)])                                # noqa: E731
                          + (lm_head if hasattr(heads.heads[str(layer)], "adapter") else 0))
    macs = sum(weights(layer) for layer in layers[:depth])
    if exits and heads is not None:
        asked = [layer for layer in heads.exit_layers if layer <= depth]
        if classifier is None:
            macs += sum(head(layer) for layer in asked)
        else:
            macs += len(asked) * classifier.hidden_dim + (head(depth) if depth < L else 0)
    if depth < L:
        return macs + sum(layer.self_attn.k_proj.weight.numel() + layer.self_attn.v_proj.weight.numel()
                          for layer in layers[depth:])
    return macs + lm_head


@torch.no_grad()
def exit_decode_wall_clock(model, heads, prompts, thresholds=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95), *,
                           classifier=None, max_new_tokens: int = 32, repeats: int = 3) -> dict:
    """Greedy decoding with a KV cache, full depth vs early exits at each tau, on `prompts` (each [1, T] or [T]).

    Variants: "hf_generate" (`model.generate(do_sample=False)`, the library's loop), "full"
    (`generate_with_exits` without exits: the same loop as the exit variants, so the fair baseline), one per
    tau ("<tau>": the heads' own confidence) and with `classifier` also one per tau with its rule
    ("classifier@<tau>"). Each variant decodes every prompt to exactly `max_new_tokens` tokens (no
    end-of-sequence stop); round-robin over the variants after one warm-up pass, `repeats` times; seconds are the
    median over repeats of the sum over prompts. "decode" excludes the prompt's pass (the same full-depth prefill in
    every variant): decode tokens/s = prompts x (max_new_tokens - 1) / decode seconds, speedup = full's
    decode seconds / the variant's; cpu_speedup is the same ratio of this process's CPU time (decode_cpu_seconds,
    robust to other processes sharing the CPU; meaningless on a GPU). mean_exit_layer and exit_share are over
    the decoded tokens (the first token of each prompt always comes from the full-depth prefill);
    token_agreement = fraction of the generated tokens equal to the full model's greedy tokens at the same
    position, matching_prefix = the mean fraction generated before the first difference. macs_ratio = the mean
    `decode_token_macs` of the decoded tokens over that of a full-depth token without heads (what the arithmetic
    alone would predict).
    """
    from transformers import GenerationConfig

    from cortexlab.neuro.exit_decoding import generate_with_exits

    check_int("repeats", repeats)
    check_int("max_new_tokens", max_new_tokens, 2)
    _check_classifier(classifier, heads)
    prompts = [p if p.dim() == 2 else p[None] for p in prompts]
    if not prompts:
        raise ValueError("prompts must hold at least one prompt")
    device = model.lm_head.weight.device
    L = model.config.num_hidden_layers
    greedy = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def hf_generate():
        seconds, tokens = 0.0, []
        for p in prompts:
            sync()
            t0 = time.perf_counter()
            out = model.generate(p.to(device), generation_config=greedy)
            sync()
            seconds += time.perf_counter() - t0
            tokens.append(out[:, p.shape[1]:].cpu())
        return {"seconds": seconds, "tokens": tokens}

    def ours(tau, probe=None):
        runs = [generate_with_exits(model, heads, p, max_new_tokens, tau, classifier=probe) for p in prompts]
        return {"seconds": sum(r["seconds"] for r in runs),
                "decode_seconds": sum(r["seconds"] - r["prefill_seconds"] for r in runs),
                "decode_cpu_seconds": sum(r["cpu_seconds"] - r["prefill_cpu_seconds"] for r in runs),
                "tokens": [r["tokens"].cpu() for r in runs], "exit_layers": [r["exit_layers"][1:] for r in runs]}

    rules = [(str(tau), tau, None) for tau in thresholds]
    if classifier is not None:
        rules += [(f"classifier@{tau}", tau, classifier) for tau in thresholds]
    variants = {"hf_generate": hf_generate, "full": lambda: ours(None),
                **{name: (lambda tau=tau, probe=probe: ours(tau, probe)) for name, tau, probe in rules}}
    ours(None)                                                               # warm-up
    times: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            times[name].append(run())
    median = lambda xs: sorted(xs)[len(xs) // 2]                             # noqa: E731
    decoded = len(prompts) * (max_new_tokens - 1)
    result = {}
    for name, runs in times.items():
        row = {"seconds": round(median([r["seconds"] for r in runs]), 4)}
        row["tokens_per_s"] = round(sum(t.shape[1] for t in runs[0]["tokens"]) / row["seconds"], 3)
        if name != "hf_generate":
            row["decode_seconds"] = round(median([r["decode_seconds"] for r in runs]), 4)
            row["decode_cpu_seconds"] = round(median([r["decode_cpu_seconds"] for r in runs]), 4)
            row["decode_tokens_per_s"] = round(decoded / row["decode_seconds"], 3)
        result[name] = row
    full_runs = times["full"][0]
    cost: dict[tuple, int] = {}
    macs = lambda d, exits, probe: cost.setdefault(                                          # noqa: E731
        (d, exits, probe is None), decode_token_macs(model, heads, d, exits=exits, classifier=probe))
    full_macs = macs(L, False, None)
    for name, tau, probe in [("full", None, None), *rules]:
        row, first, exits = result[name], times[name][0], tau is not None and tau < 1
        depths = torch.tensor([d for seq in first["exit_layers"] for d in seq], dtype=torch.float32)
        pairs = [_agreement(t, ref) for t, ref in zip(first["tokens"], full_runs["tokens"])]
        row.update({"speedup": round(result["full"]["decode_seconds"] / row["decode_seconds"], 4),
                    "cpu_speedup": round(result["full"]["decode_cpu_seconds"] / row["decode_cpu_seconds"], 4),
                    "speedup_with_prefill": round(result["full"]["seconds"] / row["seconds"], 4),
                    "mean_exit_layer": round(depths.mean().item(), 4),
                    "layers_fraction": round(depths.mean().item() / L, 4),
                    "macs_ratio": round(sum(macs(int(d), exits, probe) for d in depths) / len(depths) / full_macs,
                                        4),
                    "exit_share": {str(d): round((depths == d).float().mean().item(), 4)
                                   for d in sorted(set(depths.int().tolist()))},
                    "token_agreement": round(sum(a for a, _ in pairs) / len(pairs), 4),
                    "matching_prefix": round(sum(b for _, b in pairs) / len(pairs), 4)})
    hf_pairs = [_agreement(t, ref) for t, ref in zip(times["hf_generate"][0]["tokens"], full_runs["tokens"])
                if t.shape == ref.shape]
    result["hf_generate"]["token_agreement_with_full"] = (
        round(sum(a for a, _ in hf_pairs) / len(prompts), 4))          # our full-depth loop reproduces generate
    return {"prompts": len(prompts), "prompt_tokens": [int(p.shape[1]) for p in prompts],
            "new_tokens": max_new_tokens, "repeats": repeats, "device": device.type,
            "torch_threads": torch.get_num_threads(), "num_layers": L,
            "exit_layers": list(heads.exit_layers) if heads is not None else [], "variants": result}
