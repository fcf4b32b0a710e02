"""cortexlab.viz.habituation builders return figures with the expected traces."""
import pytest
import torch

from cortexlab.viz import habituation as vh


def test_builders():
    fig = vh.habituation_map_figure(torch.rand(3, 5), list("abcde"))
    assert len(fig.data[0].z) == 3 and len(fig.data[0].x) == 5
    with pytest.raises(ValueError):
        vh.habituation_map_figure(torch.rand(5))
    assert len(vh.lines_figure([1, 2], {"a": [1, 2], "b": [2, 3]}, title="t", xaxis="x", yaxis="y",
                               dashed=["b"]).data) == 2
    assert len(vh.token_bars(torch.rand(3), list("abc"), title="t", yaxis="y", highlight=[1]).data) == 1
    rows = [dict(layer=i, sink_plain=0.5, sink_decayed=0.4, entropy_plain=1.0, entropy_decayed=1.2) for i in range(3)]
    assert len(vh.layer_decay_figure(rows).data) == 4
