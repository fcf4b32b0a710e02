"""habituation_over_time: chunked reading with the KV cache reproduces one forward's map; validation."""
import pytest
import torch

from cortexlab.eval.hook_maps import habituation_over_time
from cortexlab.models import tiny_model
from cortexlab.neuro.hooks import InferenceHookConfig, InferenceHookPipeline


def test_snapshots_grow_and_the_last_equals_one_forward():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 21), generator=torch.Generator().manual_seed(0))
    pipe = InferenceHookPipeline(InferenceHookConfig(enable_habituation=True, attention_threshold=0.0,
                                                     habituation_rate=0.5))
    snaps = habituation_over_time(model, pipe, ids, layer=1, every=8)
    assert [n for n, _ in snaps] == [8, 16, 21]
    assert [tuple(m.shape) for _, m in snaps] == [(4, 8), (4, 16), (4, 21)]
    assert not pipe.is_attached and model.config._attn_implementation == "eager"
    with torch.no_grad(), pipe.attached(model):
        pipe.reset()
        model(ids)
        whole = pipe.habituation_map(1)[0]
    torch.testing.assert_close(snaps[-1][1], whole, rtol=1e-5, atol=1e-6)
    assert float(snaps[-1][1].max()) > 0


def test_validation():
    model = tiny_model("llama")
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="enable_habituation"):
        habituation_over_time(model, InferenceHookPipeline(), ids, 0)
    pipe = InferenceHookPipeline(InferenceHookConfig(enable_habituation=True, layers=[1]))
    with pytest.raises(ValueError, match="layer_idx"):
        habituation_over_time(model, pipe, ids, 0)
    with pytest.raises(ValueError, match="every"):
        habituation_over_time(model, pipe, ids, 1, every=0)
    with pytest.raises(ValueError, match="input_ids"):
        habituation_over_time(model, pipe, torch.zeros(2, 4, dtype=torch.long), 1)
