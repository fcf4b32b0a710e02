"""Cortex on the bundled SmolLM2-135M-Instruct: ghost start and decoding through the sidecars."""
import pytest
import torch

from cortexlab.cortex import CortexWrapConfig, attach_cortex
from cortexlab.models import load_base_model


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_base_model()
    return model, tokenizer


@pytest.fixture(scope="module")
def prompt(smollm2):
    _, tokenizer = smollm2
    text = "The quick brown fox jumps over the lazy dog. The pass key is 4 1 7 2 9. Remember it."
    return tokenizer(text, return_tensors="pt").input_ids


def test_fresh_sidecars_on_every_layer_are_a_ghost(smollm2, prompt):
    base, _ = smollm2
    with torch.no_grad():
        reference = base(prompt).logits
        model = attach_cortex(base, CortexWrapConfig())        # default: every one of the 30 layers
        logits = model(prompt).logits
    assert len(model.sidecars) == 30
    assert (logits - reference).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="already has Cortex"):
        attach_cortex(base, CortexWrapConfig())
    model.detach()


def test_trained_sidecar_decodes_like_the_parallel_forward(smollm2, prompt):
    base, _ = smollm2
    cfg = CortexWrapConfig(layers=[4, 12], window_size=16)
    model = attach_cortex(base, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.sidecars.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        out = model.generate(prompt, max_new_tokens=24, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, attention_mask=torch.ones_like(prompt))
        steps = torch.stack(out.logits, dim=1)
        T = prompt.shape[1]
        parallel = model(out.sequences).logits[:, T - 1:-1]
        with model.disabled():
            bare = model(out.sequences).logits[:, T - 1:-1]
    assert (steps - parallel).abs().max().item() <= 1e-4
    assert (parallel - bare).abs().max().item() > 0.1


def test_load_with_cortex_restores_a_saved_adapter(tmp_path, prompt):
    from cortexlab.cortex import load_qwen_with_cortex, load_with_cortex

    cfg = CortexWrapConfig(layers=[3], rank_fast=16, num_heads=2)
    first = load_with_cortex(cortex_cfg=cfg)
    with torch.no_grad():
        first.sidecars["3"].out_proj.weight.normal_(std=0.05)
        expected = first(prompt).logits
    first.save_cortex(tmp_path)
    again = load_with_cortex(adapter=tmp_path)
    assert again.config == cfg and again.tokenizer is not None
    with torch.no_grad():
        assert torch.equal(again(prompt).logits, expected)
    with pytest.raises(ValueError, match="differs"):
        load_with_cortex(cortex_cfg=CortexWrapConfig(), adapter=tmp_path)
    with pytest.raises(FileNotFoundError, match="hf download"):
        load_qwen_with_cortex("cortexlab-tests/no-such-model", cfg)
