"""cortexlab.viz.population builders return figures with the expected traces."""
import pytest
import torch

from cortexlab.viz import population as vp


def test_builders():
    fig = vp.head_weight_heatmap(torch.full((5, 3), 1 / 3), list("abcde"))
    assert len(fig.data[0].z) == 3 and len(fig.data[0].z[0]) == 5
    with pytest.raises(ValueError):
        vp.head_weight_heatmap(torch.rand(5, 3), list("ab"))
    fig = vp.grouped_bars([1, 2], {"a": [1, 2], "b": [3, 4]}, title="t", xaxis="x", yaxis="y", baseline=1.0)
    assert len(fig.data) == 2
