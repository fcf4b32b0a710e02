from cortexlab.viz import predictive as vp


def test_figures_build():
    fig = vp.training_figure([3.0, 2.0, 1.0], {"mean": 2.5})
    assert len(fig.data) == 1 and len(fig.layout.shapes) == 1
    fig = vp.training_figure([3.0, 2.0, 1.0], {"mean": 2.5}, heldout=[3.0, 2.5, 2.2])
    assert len(fig.data) == 2 and list(fig.data[1].y) == [3.0, 2.5, 2.2]
    fig = vp.surprise_figure({"a": [float("nan"), 1.0, 2.0, 4.0]}, ["x", "y", "z", "w"], span=(1, 3))
    assert fig.data[0].y[2] == 1.0 and len(fig.layout.shapes) == 1
    fig = vp.cpc_figure([{"label": "L5 k=1", "trained": 1.0, "untrained": 2.7}], chance=2.77)
    assert len(fig.data) == 2
