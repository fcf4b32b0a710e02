"""cortexlab.eval.attention: the recorded q, k, v, probabilities and head outputs are the model's own."""
import pytest
import torch

from cortexlab.eval.attention import record_attention
from cortexlab.models import tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_record_equals_the_models_eager_attention(arch):
    model = tiny_model(arch, seed=1)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                             # left padding in the second row
    records = record_attention(model, ids, [0, 1], attention_mask=mask)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    outputs = {}
    hooks = [model.model.layers[i].self_attn.register_forward_hook(
        lambda m, a, o, i=i: outputs.__setitem__(i, o[0])) for i in (0, 1)]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    for i, rec in records.items():
        real = mask.bool()[:, None, :, None].expand_as(rec.probs)   # rows of padded queries are undefined
        assert torch.allclose(rec.probs[real], out.attentions[i][real], atol=1e-6)
        assert rec.q.shape == (2, 4, 12, 16) and rec.k.shape == rec.v.shape == (2, 2, 12, 16)
        assert torch.isinf(rec.scores[0, :, 0, 1:]).all()         # causal
        o_proj = model.model.layers[i].self_attn.o_proj
        rows = mask.bool()
        assert torch.allclose(o_proj(rec.heads.flatten(-2))[rows], outputs[i][rows], atol=1e-5)


def test_bad_arguments():
    model = tiny_model("llama")
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="layers"):
        record_attention(model, ids, [5])
    with pytest.raises(ValueError, match="input_ids"):
        record_attention(model, ids.float(), [0])
