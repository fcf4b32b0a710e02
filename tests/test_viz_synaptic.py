import torch

from cortexlab.viz import synaptic as vs


def test_figures_build():
    ent = torch.rand(4, 3)
    fig = vs.entropy_alpha_figure([0.5, 1, 2, 4], ent, ceiling=2.0)
    assert len(fig.data) == 3 and list(fig.data[0].y) == ent[:, 0].tolist()
    fig = vs.attention_map_figure(torch.rand(5, 5), ["a", "b", "c", "d", "e"])
    assert fig.data[0].z is not None
    fig = vs.gate_figure(torch.tensor([1.1, 1.2]), 1.0, torch.tensor([0.3, 0.4]))
    assert len(fig.data) == 2 and abs(fig.data[0].y[1] - 0.2) < 1e-6
    fig = vs.memory_figure([{"T": 128, "band_bytes": 2**20, "dense_bytes": 2**21}])
    assert list(fig.data[1].y) == [2.0]
