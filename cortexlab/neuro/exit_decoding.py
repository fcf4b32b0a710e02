"""Greedy decoding with early exits and a KV cache on a transformers decoder (Llama, e.g. SmolLM2).

The prompt runs through all L layers (the prefill) and gives the first new token at full depth. Each later
token x_t (at position t) runs the decoder layers one by one on its single position, reading and extending
each layer's KV cache; at an exit layer l < L the exit head decides, exactly as `EarlyExitEngine` does:

    z_l = head_l(h_l),  c_l = conf(softmax(z_l))  (max_prob: max_v p_v)   exit iff c_l >= tau
    x_{t+1} = argmax z_l on exit, else argmax lm_head(norm(h_L)) after the last layer

so a token that does not exit at l still pays for head_l (for SmolLM2 the 49152 x 576 output layer, about eight
decoder layers). With an `ExitClassifier` (CALM's early-exit classifier) the decision is c_l(h_l) >= tau with
c_l(h) = sigmoid(w_l . n(h) + b_l), 2d MACs, and the head runs once, at the layer the token leaves from; the
output layer then runs exactly once per token.

An exited token skips layers l+1..L, yet later tokens attend to its keys and values there. CALM's state
propagation (Schuster et al. 2022, "Confident Adaptive Language Modeling") fills them from the exit state:

    k_j = RoPE_t(k_norm_j(W_k^j RMSNorm_j(h_l))),   v_j = W_v^j RMSNorm_j(h_l)      for each skipped layer j

RMSNorm_j(h) = g_j * n(h) with n(h) = h / rms(h) shared by every layer, so the projections of all layers after
l are fused into one matrix [W_k^j diag(g_j); W_v^j diag(g_j)]_j (built once per call): propagation costs
one norm, one matmul, RoPE and one cache append per skipped layer. Layer indices are 1-based depths as in
`EarlyExitEngine` (exit layer l = after the l-th decoder layer). tau = None or tau >= 1 switches exits off
(the heads are never called), which reproduces `model.generate(do_sample=False)` token for token.

Memory: the usual KV cache, 2 L H_kv D per token (skipped layers included); the fused propagation weights,
2 H_kv D x hidden per layer after each exit layer (9.3M floats, 37 MB, for SmolLM2 with exits at 8/16/24);
one [V] logits row per head call. Batch size 1 (per-token exits differ between sequences).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.masking_utils import create_causal_mask

from cortexlab.checks import check_int, check_number

from .backbone import rotate_half
from .early_exit import EarlyExitConfig, EarlyExitEngine
from .exit_classifier import ExitClassifier
from .model import EXIT_DISTILL_WEIGHT

__all__ = ["ADAPTER_CARD", "ADAPTER_WEIGHTS", "CLASSIFIER_WEIGHTS", "generate_with_exits", "hf_exit_heads",
           "load_exit_classifier", "load_exit_heads", "propagate_exit_state", "save_exit_heads"]

ADAPTER_WEIGHTS = "exit_heads.safetensors"
CLASSIFIER_WEIGHTS = "exit_classifier.safetensors"
ADAPTER_CARD = "card.json"


def _decoder(model):
    """model.model (the decoder stack) after checking it has what the loop below uses."""
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, name) for name in needed) or not hasattr(model, "lm_head"):
        raise ValueError("model must be a transformers causal LM with model.embed_tokens/layers/norm/rotary_emb "
                         f"and lm_head (Llama-style), got {type(model).__name__}")
    layer_types = getattr(model.config, "layer_types", None) or ()
    if any(kind != "full_attention" for kind in layer_types):
        raise ValueError("model must use full attention in every layer (sliding-window layers are not supported)")
    return inner


def hf_exit_heads(model, exit_layers=(8, 16, 24), *, confidence_measure: str = "max_prob",
                  distill_weight: float = EXIT_DISTILL_WEIGHT) -> EarlyExitEngine:
    """An `EarlyExitEngine` whose heads share `model`'s final norm and lm_head through zero-initialised
    adapters, z_l = lm_head(norm(h_l + A_l h_l)) (the logit lens at init): the same parameters, under the
    same names ("heads.<l>.adapter.weight"), and the same exit loss (distill_weight) as the engine
    `from_hf_llama(model, enable_early_exit=True)` builds, so its trained state_dict loads here."""
    inner = _decoder(model)
    config = model.config
    layers = tuple(exit_layers) if isinstance(exit_layers, (list, tuple, range)) else exit_layers
    if not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise ValueError(f"exit_layers must be a non-empty sequence of ints, got {exit_layers!r}")
    exit_config = EarlyExitConfig(exit_layers=layers, min_layer=max(1, min(layers)),
                                  num_layers=config.num_hidden_layers, confidence_measure=confidence_measure,
                                  norm_eps=config.rms_norm_eps, distill_weight=distill_weight)
    weight = model.lm_head.weight
    engine = EarlyExitEngine(exit_config, config.hidden_size, weight.shape[0],
                             shared_head=lambda h: model.lm_head(inner.norm(h)))
    return engine.to(device=weight.device, dtype=weight.dtype)


def save_exit_heads(heads: EarlyExitEngine, path, card: dict | None = None, *,
                    classifier: ExitClassifier | None = None) -> Path:
    """Write the heads' parameters (safetensors) and a card.json (their layout + `card`) into folder `path`;
    with `classifier` (for the same exit layers) also its parameters and its layout under card["classifier"]."""
    if not isinstance(heads, EarlyExitEngine):
        raise ValueError(f"heads must be an EarlyExitEngine, got {type(heads).__name__}")
    if classifier is not None:
        _check_classifier(classifier, heads)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in heads.state_dict().items()}
    save_file(tensors, str(path / ADAPTER_WEIGHTS))
    layout = {"exit_layers": list(heads.exit_layers), "num_layers": heads.config.num_layers,
              "hidden_dim": heads.hidden_dim, "output_dim": heads.output_dim,
              "confidence_measure": heads.config.confidence_measure, "distill_weight": heads.config.distill_weight,
              "head": "z_l = lm_head(norm(h_l + A_l h_l)), the base model's own final norm and lm_head"}
    if classifier is not None:
        save_file({name: t.detach().cpu().contiguous() for name, t in classifier.state_dict().items()},
                  str(path / CLASSIFIER_WEIGHTS))
        layout["classifier"] = {"file": CLASSIFIER_WEIGHTS, "exit_layers": list(classifier.exit_layers),
                                "hidden_dim": classifier.hidden_dim, "eps": classifier.eps,
                                "rule": "c_l(h) = sigmoid(w_l . h / rms(h) + b_l); exit at the first l with c_l >= tau"}
    (path / ADAPTER_CARD).write_text(json.dumps({**layout, **(card or {})}, indent=2) + "\n")
    return path


def load_exit_heads(model, path) -> tuple[EarlyExitEngine, dict]:
    """(heads, card): the heads saved by `save_exit_heads` in folder `path`, bound to `model`'s own head."""
    path = Path(path)
    if not (path / ADAPTER_WEIGHTS).is_file() or not (path / ADAPTER_CARD).is_file():
        raise ValueError(f"path={str(path)!r} must hold {ADAPTER_WEIGHTS} and {ADAPTER_CARD}")
    card = json.loads((path / ADAPTER_CARD).read_text())
    config = model.config
    expected = {"num_layers": config.num_hidden_layers, "hidden_dim": config.hidden_size,
                "output_dim": model.lm_head.weight.shape[0]}
    wrong = {k: (card.get(k), v) for k, v in expected.items() if card.get(k) != v}
    if wrong:
        raise ValueError(f"model does not match the saved heads (saved, model): {wrong}")
    heads = hf_exit_heads(model, card["exit_layers"], confidence_measure=card["confidence_measure"],
                          distill_weight=card["distill_weight"])
    heads.load_state_dict(load_file(str(path / ADAPTER_WEIGHTS)), strict=True)
    return heads, card


def load_exit_classifier(path) -> ExitClassifier:
    """The `ExitClassifier` saved with the heads by `save_exit_heads(..., classifier=...)` in folder `path`."""
    path = Path(path)
    card_path = path / ADAPTER_CARD
    layout = json.loads(card_path.read_text()).get("classifier") if card_path.is_file() else None
    if layout is None or not (path / CLASSIFIER_WEIGHTS).is_file():
        raise ValueError(f"path={str(path)!r} must hold {CLASSIFIER_WEIGHTS} and a {ADAPTER_CARD} with its layout")
    classifier = ExitClassifier(layout["exit_layers"], layout["hidden_dim"], layout["eps"])
    classifier.load_state_dict(load_file(str(path / CLASSIFIER_WEIGHTS)), strict=True)
    return classifier


def _check_classifier(classifier, heads: EarlyExitEngine) -> None:
    if not isinstance(classifier, ExitClassifier):
        raise ValueError(f"classifier must be an ExitClassifier or None, got {type(classifier).__name__}")
    if classifier.exit_layers != tuple(heads.exit_layers) or classifier.hidden_dim != heads.hidden_dim:
        raise ValueError(f"classifier has exit layers {list(classifier.exit_layers)} on width {classifier.hidden_dim}; "
                         f"the heads have {list(heads.exit_layers)} on width {heads.hidden_dim}")


def _fused_kv(layers, start: int):
    """(W [n (2 H_kv D), hidden], bias or None) for layers[start:], input_layernorm gains folded in."""
    projections = [(proj, layer.input_layernorm.weight) for layer in layers[start:]
                   for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj)]
    weight = torch.cat([proj.weight * gain for proj, gain in projections])
    if all(proj.bias is None for proj, _ in projections):
        return weight, None
    bias = torch.cat([proj.bias if proj.bias is not None else proj.weight.new_zeros(proj.out_features)
                      for proj, _ in projections])
    return weight, bias


def propagate_exit_state(model, hidden: torch.Tensor, exit_layer: int, position_embeddings, cache,
                         fused=None) -> None:
    """Append the keys/values of layers exit_layer+1..L (1-based) computed from the exit state `hidden`
    [1, 1, hidden] to `cache` (CALM state propagation; see the module docstring). `fused` is `_fused_kv`'s
    result for start = exit_layer (computed here when None)."""
    layers = _decoder(model).layers
    skipped = layers[exit_layer:]
    if not skipped:
        return
    attn0 = skipped[0].self_attn
    head_dim, eps = attn0.head_dim, skipped[0].input_layernorm.variance_epsilon
    weight, bias = fused if fused is not None else _fused_kv(layers, exit_layer)
    h = hidden.float()
    normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype)
    kv = torch.nn.functional.linear(normed, weight, bias)                 # [1, 1, n * 2 * H_kv * D]
    kv = kv.view(len(skipped), 2, -1, head_dim)                           # [n, 2, H_kv, D]
    keys, values = kv[:, 0], kv[:, 1]
    if any(hasattr(layer.self_attn, "k_norm") for layer in skipped):
        keys = torch.stack([layer.self_attn.k_norm(k) for layer, k in zip(skipped, keys)])
    cos, sin = position_embeddings                                         # [1, 1, D]
    keys = keys * cos + rotate_half(keys) * sin
    for offset, (k, v) in enumerate(zip(keys, values)):
        cache.update(k[None, :, None], v[None, :, None], exit_layer + offset)


def _check_inputs(model, heads, input_ids, max_new_tokens, threshold, eos_token_id, classifier) -> bool:
    """Validate the arguments of `generate_with_exits`; True when exits are on."""
    _decoder(model)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("input_ids must be an integer tensor of token ids [1, T]")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape [1, T] with T >= 1 (batch size 1), got {tuple(input_ids.shape)}")
    check_int("max_new_tokens", max_new_tokens)
    if eos_token_id is not None and (not isinstance(eos_token_id, int) or isinstance(eos_token_id, bool)):
        raise ValueError(f"eos_token_id must be an int or None, got {eos_token_id!r}")
    # None, or >= 1 (inf included): no exit
    check_number("threshold", threshold, 0, low_open=True, allow_inf=True, allow_none=True)
    exits = threshold is not None and threshold < 1
    if heads is None:
        if exits:
            raise ValueError("heads must be given (an EarlyExitEngine) when threshold < 1")
        if classifier is not None:
            raise ValueError("classifier needs heads (an EarlyExitEngine) to decode the exiting tokens")
        return False
    if not isinstance(heads, EarlyExitEngine):
        raise ValueError(f"heads must be an EarlyExitEngine or None, got {type(heads).__name__}")
    if classifier is not None:
        _check_classifier(classifier, heads)
    config = model.config
    if heads.hidden_dim != config.hidden_size or heads.output_dim != model.lm_head.weight.shape[0]:
        raise ValueError(f"heads map {heads.hidden_dim} -> {heads.output_dim}; the model needs "
                         f"{config.hidden_size} -> {model.lm_head.weight.shape[0]}")
    if heads.exit_layers[-1] >= config.num_hidden_layers:
        raise ValueError(f"heads has exit layers {list(heads.exit_layers)}; each must be < the model's "
                         f"{config.num_hidden_layers} layers")
    return exits


def _decide(heads: EarlyExitEngine, classifier: ExitClassifier | None, hidden: torch.Tensor, layer: int,
            threshold: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(exit logits [1, 1, V], confidence [1, 1]) when the token leaves at `layer`, else None."""
    if classifier is None:
        return heads.process_layer_output(hidden, layer, threshold=threshold)
    confidence = classifier(hidden, layer)
    return (heads.exit_logits(hidden, layer), confidence) if confidence.item() >= threshold else None


@torch.no_grad()
def generate_with_exits(model, heads: EarlyExitEngine | None, input_ids: torch.Tensor, max_new_tokens: int,
                        threshold: float | None = None, *, classifier: ExitClassifier | None = None,
                        eos_token_id: int | None = None, return_logits: bool = False) -> dict:
    """Greedy decoding of `max_new_tokens` tokens after `input_ids` [1, T], exiting where a head is confident
    (its own confidence measure), or with `classifier` where c_l(h_l) >= threshold.

    Returns {"tokens": [1, n] new token ids (n < max_new_tokens only after eos_token_id), "exit_layers": the
    depth each token was decided at (the model's L for full depth; the first token always is), "confidence":
    the exit head's confidence (or c_l) per token (None at full depth), "seconds" and "prefill_seconds" (wall clock of
    the whole call and of the prompt's pass), "cpu_seconds" and "prefill_cpu_seconds" (the same in this process's
    CPU time, which other processes on the machine do not inflate; on a GPU it misses the device's work), "cache":
    the DynamicCache (every layer holds T + n - 1
    positions), and with return_logits the [n, V] logits each token was chosen from}.
    """
    exits = _check_inputs(model, heads, input_ids, max_new_tokens, threshold, eos_token_id, classifier)
    inner = _decoder(model)
    from transformers import DynamicCache

    layers, num_layers = inner.layers, model.config.num_hidden_layers
    device = model.lm_head.weight.device
    exit_layers = set(heads.exit_layers) if exits else set()
    fused = {layer: _fused_kv(layers, layer) for layer in exit_layers}
    cache = DynamicCache(config=model.config)
    ids = input_ids.to(device)
    tokens, depths, confidences, logits_rows = [], [], [], []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    prefill_seconds = prefill_cpu_seconds = None
    for step in range(max_new_tokens):
        past = cache.get_seq_length()
        position_ids = torch.arange(past, past + ids.shape[1], device=device)[None]
        hidden = inner.embed_tokens(ids)
        mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=None, cache=cache,
                                  position_ids=position_ids)
        position_embeddings = inner.rotary_emb(hidden, position_ids=position_ids)
        logits, depth, confidence = None, num_layers, None
        for index, layer in enumerate(layers):
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                           position_ids=position_ids, cache=cache, use_cache=True)
            if step > 0 and index + 1 in exit_layers:
                decided = _decide(heads, classifier, hidden, index + 1, threshold)
                if decided is not None:
                    logits, depth, confidence = decided[0][:, -1], index + 1, decided[1][0, -1].item()
                    propagate_exit_state(model, hidden, depth, position_embeddings, cache, fused[depth])
                    break
        if logits is None:
            logits = model.lm_head(inner.norm(hidden[:, -1:]))[:, -1]
        token = logits.argmax(-1, keepdim=True)                           # [1, 1]
        tokens.append(token)
        depths.append(depth)
        confidences.append(confidence)
        if return_logits:
            logits_rows.append(logits[0].float())
        if step == 0:
            sync()
            prefill_seconds, prefill_cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        if eos_token_id is not None and token.item() == eos_token_id:
            break
        ids = token
    sync()
    result = {"tokens": torch.cat(tokens, dim=1), "exit_layers": depths, "confidence": confidences,
              "seconds": time.perf_counter() - t0, "prefill_seconds": prefill_seconds,
              "cpu_seconds": time.process_time() - c0, "prefill_cpu_seconds": prefill_cpu_seconds, "cache": cache}
    if return_logits:
        result["logits"] = torch.stack(logits_rows)
    return result
