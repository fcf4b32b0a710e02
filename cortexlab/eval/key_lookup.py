"""How sharply a recall sidecar's memory finds the key it needs: the induction lookup.

In a recall episode the answer's digit i is predicted at the question call's position t_i (the token
before the digit: the space, then digit i-1). The memory can answer there if the query q_{t_i} matches
the key the fact call wrote at the digit itself, s_i: a key whose short conv read the token before s_i,
the same token as at t_i (an induction head). `key_lookup` compares each such query with every key of
the fact call,

    sim(t, s) = mean over heads of  q_t . k_s / (|q_t| |k_s|)

and reports how often the right key s_i scores highest ("hit_rate"), its mean similarity ("matched")
and the mean over the other keys ("others"). A lookup that recall can use has a high hit rate and a
wide gap between the two. It reads the sidecar's projections only (no memory, no gates), so it
describes a fresh sidecar's starting point (`CortexWrapConfig.conv_init`,
`GatedDeltaNet.drop_shared_directions_`) as well as a trained one's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cortexlab.checks import check_int
from cortexlab.data.recall import RecallTask

__all__ = ["key_lookup"]


@torch.no_grad()
def key_lookup(model, task: RecallTask, *, episodes: int = 16, seed: int = 0) -> dict:
    """{"hit_rate", "matched", "others", "queries"} of the induction lookup (module doc) over `episodes`
    two-call episodes of `task` (fact call, question call), for a model with one sidecar layer."""
    from cortexlab.train.recall import _unwrap, sidecar_inputs, single_sidecar_layer

    check_int("episodes", episodes)
    layer = single_sidecar_layer(model)
    if layer is None:
        raise ValueError(f"key_lookup needs a model with one sidecar layer, this one has {_unwrap(model).layer_ids}")
    gdn = _unwrap(model).sidecars[str(layer)].gdn
    device = next(gdn.parameters()).device
    batch = task.batch(2, episodes, seed=seed).to(device)
    fact, question = batch.input_ids[:, 0], batch.input_ids[:, 1]
    T = fact.shape[1]
    x = torch.cat([sidecar_inputs(model, ids, entropy=False)["x"] for ids in (fact, question)], dim=1)
    q, k, _, _ = gdn.features(x, None, None)     # one stream: the conv carries across the calls, as in a session
    q, k = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
    hits, matched, others = [], [], []
    for e, start in enumerate(task.key_starts(batch)):
        for i in range(task.key_digits):         # the digits (the prefix is the base model's to predict)
            t, s = T + T - task.key_digits + i - 1, start + i   # query before digit i (question), digit i (fact)
            sims = torch.einsum("hd,shd->s", q[e, t], k[e, :T]) / q.shape[2]
            hits.append(float(sims.argmax() == s))
            matched.append(sims[s].item())
            others.append(torch.cat([sims[:s], sims[s + 1:]]).mean().item())
    count = len(hits)
    return {"hit_rate": sum(hits) / count, "matched": sum(matched) / count, "others": sum(others) / count,
            "queries": count}
