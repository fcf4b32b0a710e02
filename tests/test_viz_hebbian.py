"""cortexlab.viz.hebbian builders return figures with the expected traces."""
import plotly.graph_objects as go
import pytest
import torch

from cortexlab.viz import hebbian as vh


def test_bias_heatmap_blanks_the_future():
    fig = vh.bias_heatmap(torch.arange(9.0).view(3, 3), ["a", "b", "c"], spans=[(0, 1)])
    z = fig.data[0].z
    assert isinstance(fig, go.Figure) and z[0][1] is None and z[2][0] == 6.0   # blank above the diagonal
    with pytest.raises(ValueError):
        vh.bias_heatmap(torch.zeros(2, 3))


def test_bars_sweeps_and_traces():
    assert len(vh.head_bars({"plain": [0.1, 0.2], "hebbian": [0.2, 0.3]}, title="t", yaxis="y").data) == 2
    fig = vh.sweep_figure([0.1, 1.0], {"a": [1, 2]}, title="t", xaxis="eta", yaxis="y", baseline=1.0)
    assert len(fig.data) == 1 and fig.layout.xaxis.type == "log"
    fig = vh.norm_trace_figure({"run": torch.rand(5, 3)}, clip=1.0, tokens=list("abcde"))
    assert len(fig.data) == 2
    with pytest.raises(ValueError):
        vh.norm_trace_figure({})
