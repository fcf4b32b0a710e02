"""Associative-recall capacity of fast-weight write rules, and how long a forget gate keeps a fact.

Three write rules store the same random key-value pairs in a state S of shape [D_k, D_v]
(this repo's convention: the value read for a query q is S^T q):

    linear attention (Hebbian)  S_t = S_{t-1} + k_t v_t^T
    delta rule                  S_t = S_{t-1} + beta k_t (v_t - S_{t-1}^T k_t)^T          (beta = 1)
    gated delta rule            S_t = a S_{t-1} + beta k_t (v_t - a S_{t-1}^T k_t)^T      (g = ln a)

The delta and gated delta writes go through `cortexlab.ops.gated_delta_rule`; linear
attention has no erase term, so it is the three-line `write_linear_attention` below.
After all n writes every stored key is queried against the *final* state and the readout
is decoded to the nearest entry of a value codebook; accuracy is averaged over seeds and
reported beside the chance level 1 / codebook size.

The gate helpers quantify the Cortex design's "bias hack" (a = alpha_max sigmoid(+2) ~ 0.87
per token, half-life ~5 tokens) against cortexlab's log-space default
g = -softplus(w.x - 7) (a ~ 0.999 at w.x = 0, half-life ~760 tokens), and
`recall_after_filler` measures with the real recurrence how much of one stored fact
survives N later writes.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from cortexlab.checks import check_int, check_number
from cortexlab.ops import gated_delta_rule

RULES = ("linear_attention", "delta", "gated_delta")
RULE_LABELS = {
    "linear_attention": "linear attention (Hebbian)",
    "delta": "delta rule",
    "gated_delta": "gated delta rule",
    "chance": "chance",
}
KEY_MODES = ("random", "orthogonal")
VALUE_MODES = ("unit", "onehot")


# --------------------------------------------------------------------------- data


def make_recall_data(
    n: int,
    *,
    d_k: int = 64,
    d_v: int = 64,
    codebook_size: int = 64,
    n_seeds: int = 8,
    seed: int = 0,
    keys: str = "random",
    key_overlap: float = 0.0,
    values: str = "unit",
) -> dict[str, torch.Tensor]:
    """n random key-value pairs per seed, batched over seeds (fp32, CPU).

    keys: "random" = independent random unit vectors (pairwise cosine ~ 1/sqrt(d_k));
        "orthogonal" = the first min(n, d_k) keys orthonormal, any beyond that random.
    key_overlap: in [0, 1); mixes a direction shared by all keys of a seed into every key
        (k = normalize(sqrt(1 - rho) z + sqrt(rho) c) with unit z, c), so two keys have
        expected cosine ~ rho. Applied after `keys`.
    values: "unit" = a codebook of `codebook_size` random unit vectors in d_v;
        "onehot" = the d_v standard basis vectors (needs codebook_size == d_v).
    Each pair's value is a uniformly drawn codebook entry (labels index the codebook).

    Returns dict with keys [S, n, d_k], values [S, n, d_v], codebook [S, M, d_v],
    labels [S, n] (long), where S = n_seeds and M = codebook_size. `capacity_curve` draws
    the largest n once and slices prefixes, so every n shares its first pairs.
    """
    check_int("n", n)
    check_int("d_k", d_k)
    check_int("d_v", d_v)
    check_int("codebook_size", codebook_size)
    check_int("n_seeds", n_seeds)
    if keys not in KEY_MODES:
        raise ValueError(f"keys must be one of {KEY_MODES}, got {keys!r}")
    if values not in VALUE_MODES:
        raise ValueError(f"values must be one of {VALUE_MODES}, got {values!r}")
    if values == "onehot" and codebook_size != d_v:
        raise ValueError(f"values='onehot' needs codebook_size == d_v ({d_v}), got {codebook_size}")
    check_number("key_overlap", key_overlap, 0, 1, high_open=True)

    gen = torch.Generator().manual_seed(int(seed))
    S = n_seeds
    # draw in a fixed order so that the data for n is a prefix of the data for more pairs
    k = F.normalize(torch.randn(S, n, d_k, generator=gen), dim=-1)
    if keys == "orthogonal":
        m = min(n, d_k)
        basis, _ = torch.linalg.qr(torch.randn(S, d_k, d_k, generator=gen))  # orthonormal columns
        k = torch.cat([basis.transpose(1, 2)[:, :m], k[:, m:]], dim=1)
    if key_overlap > 0:
        common = F.normalize(torch.randn(S, 1, d_k, generator=gen), dim=-1)
        k = F.normalize(math.sqrt(1 - key_overlap) * k + math.sqrt(key_overlap) * common, dim=-1)
    if values == "onehot":
        codebook = torch.eye(d_v).expand(S, d_v, d_v).clone()
    else:
        codebook = F.normalize(torch.randn(S, codebook_size, d_v, generator=gen), dim=-1)
    labels = torch.randint(codebook_size, (S, n), generator=gen)
    v = torch.gather(codebook, 1, labels[..., None].expand(S, n, d_v))
    return {"keys": k, "values": v, "codebook": codebook, "labels": labels}


def mean_key_overlap(keys: torch.Tensor) -> float:
    """Mean |k_i . k_j| over ordered pairs of distinct keys i != j (the mean |cosine| for unit keys), the weight of
    each crosstalk term; keys [..., n, d_k] with n >= 2, averaged over the leading axes too."""
    if keys.dim() < 2 or keys.shape[-2] < 2:
        raise ValueError(f"keys must be [..., n, d_k] with n >= 2, got shape {tuple(keys.shape)}")
    n = keys.shape[-2]
    distinct = ~torch.eye(n, dtype=torch.bool, device=keys.device)
    return (keys @ keys.mT).abs()[..., distinct].float().mean().item()


# --------------------------------------------------------------------------- write and read


def write_linear_attention(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Hebbian linear attention: S_T = sum_t k_t v_t^T (no erase term, no gate).

    k: [B, T, H, D_k], v: [B, T, H, D_v] -> state [B, H, D_k, D_v] (fp32).
    """
    return torch.einsum("bthk,bthv->bhkv", k.float(), v.float())


def write_gated_delta(
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    a: float = 1.0,
    beta: float = 1.0,
    backend: str = "chunk",
) -> torch.Tensor:
    """Write all pairs with the (gated) delta rule via `cortexlab.ops.gated_delta_rule`.

    a = 1 (g = 0) is the plain delta rule. Returns the final state [B, H, D_k, D_v]: the
    library's per-token output o_t = S_t^T q_t reads *while* writing, so recall after all
    writes has to read the final state instead (`read_state`).
    """
    check_number("a", a, 0, 1, low_open=True)   # a per-token forget gate
    B, T, H, _ = k.shape
    g = torch.full((B, T, H), math.log(a), dtype=torch.float32)
    b = torch.full((B, T, H), float(beta), dtype=torch.float32)
    _, state = gated_delta_rule(k, k, v, g, b, scale=1.0, output_final_state=True, backend=backend)
    return state


def read_state(state: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """o = S^T q for every query: state [B, H, D_k, D_v], q [B, T, H, D_k] -> [B, T, H, D_v]."""
    return torch.einsum("bhkv,bthk->bthv", state, q.float())


def decode_nearest(readout: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the codebook entry nearest to each readout (largest dot product with the unit
    codebook; scaling a readout does not change its decoded label).

    readout [S, n, D_v], codebook [S, M, D_v] -> [S, n] long.
    """
    return torch.einsum("snv,smv->snm", readout, codebook).argmax(-1)


def write_and_read(rule: str, data: dict[str, torch.Tensor], *, a: float = 0.99,
                   beta: float = 1.0, backend: str = "chunk") -> torch.Tensor:
    """Write `data`'s pairs with `rule` (one head), then query every stored key on the final
    state. Returns the readouts [S, n, D_v] (o_i = S_n^T k_i)."""
    k = data["keys"][:, :, None]  # one head: [S, n, 1, D_k]
    v = data["values"][:, :, None]
    if rule == "linear_attention":
        state = write_linear_attention(k, v)
    elif rule == "delta":
        state = write_gated_delta(k, v, a=1.0, beta=beta, backend=backend)
    elif rule == "gated_delta":
        state = write_gated_delta(k, v, a=a, beta=beta, backend=backend)
    else:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    return read_state(state, k)[:, :, 0]


def recall_correct(rule: str, data: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    """[S, n] bool: is each stored pair's value decoded correctly after all writes?
    kwargs go to `write_and_read` (a, beta, backend)."""
    readout = write_and_read(rule, data, **kwargs)
    return decode_nearest(readout, data["codebook"]) == data["labels"]


def recall_accuracy(rule: str, data: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    """Per-seed recall accuracy [S] of nearest-codebook decoding (see `recall_correct`)."""
    return recall_correct(rule, data, **kwargs).float().mean(dim=1)


def readout_error(readout: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Relative L2 error ||o - v|| / ||v|| per pair: [S, n]. 0 is exact recall."""
    return (readout - values).norm(dim=-1) / values.norm(dim=-1).clamp_min(1e-12)


def capacity_curve(
    ns: Iterable[int] = (4, 8, 16, 32, 48, 64, 96, 128, 192),
    *,
    d_k: int = 64,
    d_v: int = 64,
    codebook_size: int = 64,
    n_seeds: int = 8,
    seed: int = 0,
    a: float = 0.99,
    beta: float = 1.0,
    rules: Sequence[str] = RULES,
    keys: str = "random",
    key_overlap: float = 0.0,
    values: str = "unit",
    backend: str = "chunk",
) -> list[dict]:
    """Recall accuracy vs number of stored pairs n for each write rule, plus a chance row.

    All rules see exactly the same keys, values and codebook for a given (n, seed); the data
    for a smaller n is a prefix of that for a larger one. `a` is the gated rule's per-token
    forget gate; `beta` the write strength of both delta rules.

    Returns one dict per (n, rule) with n, rule, label, accuracy (mean over seeds),
    accuracy_std (over seeds), readout_error (mean ||o - v|| / ||v||), n_seeds, d_k, d_v,
    codebook_size, keys, key_overlap, a (gated rule only, 1.0 for the delta rule, None
    otherwise) and beta; rule == "chance" rows carry
    accuracy = 1 / codebook_size.
    """
    ns = sorted({int(n) for n in ns})
    if not ns:
        raise ValueError("ns must hold at least one number of pairs")
    for name in rules:
        if name not in RULES:
            raise ValueError(f"rules must be drawn from {RULES}, got {name!r}")
    full = make_recall_data(ns[-1], d_k=d_k, d_v=d_v, codebook_size=codebook_size, n_seeds=n_seeds,
                            seed=seed, keys=keys, key_overlap=key_overlap, values=values)
    common = {"n_seeds": n_seeds, "d_k": d_k, "d_v": d_v, "codebook_size": codebook_size,
              "keys": keys, "key_overlap": key_overlap}
    rows = []
    for n in ns:
        check_int("n", n)
        data = {name: (x if name == "codebook" else x[:, :n]) for name, x in full.items()}
        for rule in rules:
            readout = write_and_read(rule, data, a=a, beta=beta, backend=backend)
            correct = decode_nearest(readout, data["codebook"]) == data["labels"]
            acc = correct.float().mean(dim=1)  # per seed
            rows.append({"n": n, "rule": rule, "label": RULE_LABELS[rule],
                         "accuracy": acc.mean().item(),
                         "accuracy_std": acc.std(unbiased=False).item(),
                         "readout_error": readout_error(readout, data["values"]).mean().item(),
                         "a": {"linear_attention": None, "delta": 1.0, "gated_delta": float(a)}[rule],
                         "beta": None if rule == "linear_attention" else float(beta), **common})
        rows.append({"n": n, "rule": "chance", "label": RULE_LABELS["chance"],
                     "accuracy": 1.0 / codebook_size, "accuracy_std": 0.0, "readout_error": None,
                     "a": None, "beta": None,
                     **common})
    return rows


def recall_by_position(
    n: int = 192,
    *,
    d_k: int = 64,
    d_v: int = 64,
    codebook_size: int = 64,
    n_seeds: int = 8,
    seed: int = 0,
    a: float = 0.99,
    beta: float = 1.0,
    rules: Sequence[str] = RULES,
    keys: str = "random",
    key_overlap: float = 0.0,
    values: str = "unit",
    backend: str = "chunk",
) -> list[dict]:
    """Which of n stored pairs are still recalled: accuracy by write position (0 = oldest),
    averaged over seeds, for each rule on the same data. Shows superposition (linear
    attention: every pair equally noisy) against overwriting (delta rules: recent pairs
    exact, old ones erased). One dict per (rule, position): rule, label, position, age
    (writes after it), accuracy."""
    data = make_recall_data(n, d_k=d_k, d_v=d_v, codebook_size=codebook_size, n_seeds=n_seeds,
                            seed=seed, keys=keys, key_overlap=key_overlap, values=values)
    rows = []
    for rule in rules:
        if rule not in RULES:
            raise ValueError(f"rules must be drawn from {RULES}, got {rule!r}")
        acc = recall_correct(rule, data, a=a, beta=beta, backend=backend).float().mean(dim=0)
        rows += [{"rule": rule, "label": RULE_LABELS[rule], "position": i, "age": n - 1 - i,
                  "accuracy": acc[i].item(), "n": n, "a": a if rule == "gated_delta" else None}
                 for i in range(n)]
    return rows


# --------------------------------------------------------------------------- forget gate


def half_life(a: float) -> float:
    """Tokens until a per-token decay a leaves half of the state: ln 0.5 / ln a (inf for a = 1)."""
    check_number("a", a, 0, 1, low_open=True)   # a per-token forget gate
    return math.inf if a == 1.0 else math.log(0.5) / math.log(a)


def retained_fraction(a: float, n_tokens: float) -> float:
    """Fraction of the state left after n_tokens of decay alone: a ** n_tokens."""
    check_number("a", a, 0, 1, low_open=True)   # a per-token forget gate
    check_number("n_tokens", n_tokens, 0, allow_inf=True)
    return a ** n_tokens


def bias_hack_gate(bias: float = 2.0, alpha_max: float = 0.99) -> float:
    """The Cortex design's gate at initialisation: a = alpha_max * sigmoid(bias).

    bias +2.0, alpha_max 0.99 -> a ~ 0.872 (0.881 without the cap), half-life ~5 tokens.
    """
    check_number("alpha_max", alpha_max, 0, 1, low_open=True)
    return alpha_max / (1.0 + math.exp(-bias))


def log_space_gate(wx: float = 0.0, offset: float = 7.0) -> float:
    """cortexlab's default gate: g = -softplus(w.x - offset), a = exp(g).

    At w.x = 0 with offset 7: g ~ -9.1e-4, a ~ 0.99909, half-life ~760 tokens.
    """
    return math.exp(-F.softplus(torch.tensor(float(wx) - offset, dtype=torch.float64)).item())


def gate_table(call_tokens: int = 48, long_tokens: int = 800) -> list[dict]:
    """The gates the notebook compares: a, g = ln a, half-life and the fraction retained
    after one call of `call_tokens` and after `long_tokens` (decay alone, no overwrites)."""
    gates = [
        ("bias hack: 0.99 sigmoid(+2)", bias_hack_gate(2.0, 0.99)),
        ("sigmoid(+2), no cap", bias_hack_gate(2.0, 1.0)),
        ("alpha_max cap 0.99", 0.99),
        ("log-space: exp(-softplus(0 - 7))", log_space_gate(0.0, 7.0)),
    ]
    return [{"gate": name, "a": a, "g": math.log(a), "half_life": half_life(a),
             f"retained_after_{call_tokens}": retained_fraction(a, call_tokens),
             f"retained_after_{long_tokens}": retained_fraction(a, long_tokens)}
            for name, a in gates]


def recall_after_filler(
    max_filler: int = 800,
    *,
    a: float,
    beta: float = 1.0,
    filler_beta: float | None = None,
    d_k: int = 64,
    d_v: int = 64,
    codebook_size: int = 64,
    n_seeds: int = 16,
    seed: int = 0,
    backend: str = "chunk",
) -> list[dict]:
    """Write one fact (k0, v0) with strength `beta`, then `max_filler` random writes (unit
    keys, unit values, strength `filler_beta`, default `beta`), all with forget gate `a`,
    and read k0 after every filler count N = 0 .. max_filler.

    Runs the real recurrence once: the query is k0 at every token, so the library's output
    o_t = S_t^T k0 is the readout after t filler writes.

    Returns one dict per N: n_filler, a, beta, filler_beta, retained (mean of <o, v0>, i.e. the
    coefficient of v0 in the readout; beta right after the write), retained_std, cosine
    (mean cos(o, v0)), accuracy (v0 decoded correctly among `codebook_size` random unit
    vectors; chance 1 / codebook_size) and gate_only = beta * a ** N (decay alone, ignoring
    erasure by the filler writes).
    """
    check_int("max_filler", max_filler, 0)
    check_number("a", a, 0, 1, low_open=True)   # a per-token forget gate
    filler_beta = beta if filler_beta is None else filler_beta
    gen = torch.Generator().manual_seed(int(seed))
    S, T = n_seeds, max_filler + 1
    k = F.normalize(torch.randn(S, T, 1, d_k, generator=gen), dim=-1)
    codebook = F.normalize(torch.randn(S, codebook_size, d_v, generator=gen), dim=-1)
    v = F.normalize(torch.randn(S, T, 1, d_v, generator=gen), dim=-1)
    v[:, 0, 0] = codebook[:, 0]  # the fact's value is codebook entry 0
    q = k[:, :1].expand(S, T, 1, d_k)
    g = torch.full((S, T, 1), math.log(a))
    b = torch.full((S, T, 1), float(filler_beta))
    b[:, 0] = float(beta)
    o, _ = gated_delta_rule(q, k, v, g, b, scale=1.0, backend=backend)
    o = o[:, :, 0].float()  # [S, T, D_v]
    v0 = codebook[:, :1]  # [S, 1, D_v]
    coef = (o * v0).sum(-1)  # [S, T]
    cos = F.cosine_similarity(o, v0.expand_as(o), dim=-1)
    correct = (torch.einsum("stv,smv->stm", o, codebook).argmax(-1) == 0).float()
    return [{"n_filler": t, "a": float(a), "beta": float(beta), "filler_beta": float(filler_beta),
             "retained": coef[:, t].mean().item(), "retained_std": coef[:, t].std(unbiased=False).item(),
             "cosine": cos[:, t].mean().item(), "accuracy": correct[:, t].mean().item(),
             "gate_only": float(beta) * a ** t, "d_k": d_k, "codebook_size": codebook_size}
            for t in range(T)]


# --------------------------------------------------------------------------- table


def capacity_table(rows: Sequence[Mapping], metric: str = "accuracy") -> str:
    """Plain-text pivot of `capacity_curve` rows: one line per n, one column per rule."""
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    ns = sorted({r["n"] for r in rows})
    cell = {(r["n"], r["rule"]): r.get(metric) for r in rows}
    width = max(len(rule) for rule in rules) + 2
    lines = ["n".rjust(5) + "".join(rule.rjust(width) for rule in rules)]
    for n in ns:
        vals = [cell.get((n, rule)) for rule in rules]
        lines.append(str(n).rjust(5) + "".join(("-" if v is None else f"{v:.3f}").rjust(width) for v in vals))
    return "\n".join(lines)
