import pytest
import torch
import torch.nn.functional as F

from cortexlab.cortex import CortexWrapConfig, attach_cortex
from cortexlab.models import tiny_model


def rrmse(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative root-mean-square error ||actual - expected|| / ||expected||."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def make_inputs(B=2, T=65, H=3, Dk=16, Dv=8, *, decay=1.0, dtype=torch.float32, seed=0,
                initial_state=True, requires_grad=True, device="cpu"):
    """Random gated-delta inputs: L2-normalised keys, g = -decay * softplus(noise), beta in (0, 1).

    `decay` scales the log gate from weak (0.01) to strong (10); decay=0 gives g == 0 exactly.
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, Dk, generator=gen)
    k = F.normalize(torch.randn(B, T, H, Dk, generator=gen), dim=-1)
    v = torch.randn(B, T, H, Dv, generator=gen)
    g = -decay * F.softplus(torch.randn(B, T, H, generator=gen) - 2.0)
    beta = torch.rand(B, T, H, generator=gen)
    h0 = torch.randn(B, H, Dk, Dv, generator=gen) if initial_state else None
    tensors = [x.to(dtype=dtype, device=device) if x is not None else None for x in (q, k, v, g, beta, h0)]
    if requires_grad:
        for x in tensors:
            if x is not None:
                x.requires_grad_(True)
    return tensors


@pytest.fixture
def inputs():
    return make_inputs


def trained_block(cfg, d_model=32, seed=0):
    """A HybridCortexBlock with every matrix non-zero (as after training), so no path hides behind a zero."""
    from cortexlab.cortex import HybridCortexBlock

    torch.manual_seed(seed)
    block = HybridCortexBlock(d_model, cfg)
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() > 1:
                p.normal_(std=0.3)
    return block


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waits on a shared 2-core machine (100x slower otherwise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cortex(tokenizer, controller=True, layers=(1,), seed=0, init_range=0.02, **overrides):
    """A 3-layer tiny Llama with a small sidecar (on layer 1 by default) for `tokenizer`'s vocabulary."""
    base = tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=3, seed=seed, initializer_range=init_range)
    torch.manual_seed(seed)
    cfg = CortexWrapConfig(layers=list(layers), rank_fast=16, num_heads=2, controller=controller, **overrides)
    return attach_cortex(base, cfg)


def randomise_(model, controller=True):
    """A non-trivial sidecar: random output projection (and controller), so memory shows in the logits."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.sidecars.values():
            block.out_proj.weight.copy_(torch.randn(block.out_proj.weight.shape, generator=gen) * 0.5)
            ctrl = block.gdn.controller
            if controller and ctrl is not None:
                for p in (ctrl.write, ctrl.forget, ctrl.consolidate, ctrl.slow_read):
                    p.copy_(torch.randn(p.shape, generator=gen))
    return model


def distractor_pattern(split: str, kind: str = "all"):
    """A regular expression matching any of the split's distractor sentences of this kind, whatever their number."""
    import re

    from cortexlab.data.recall import distractor_templates

    return re.compile("|".join(re.escape(t).replace(re.escape("{n}"), r"\d+")
                               for t in distractor_templates(split, kind)))
