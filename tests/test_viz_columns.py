import torch

from cortexlab.viz import columns as vc


def test_figures_build():
    rows = [{"layer": i, "js_columns": 0.1 * i, "js_between": 0.2, "js_within": 0.1} for i in range(4)]
    fig = vc.specialization_figure(rows, ["syntactic", "syntactic", "semantic", "abstract"], distance=[1, 2, 3, 4])
    assert len(fig.data) == 4 and len(fig.layout.shapes) == 3
    result = {"W": torch.rand(3, 3), "corr_before": torch.eye(3), "corr_after": torch.eye(3)}
    assert len(vc.inhibition_figure(result).data) == 3
    assert len(vc.activity_figure(torch.rand(10, 3), torch.rand(10, 3)).data) == 6
