"""cortexlab.viz.experiments: each E1-E4 figure draws the numbers it is given, baselines included."""
import pytest

from cortexlab.viz import experiments as ex


def mqar_results():
    runs = []
    for mixer, acc in (("gdn", 0.99), ("sliding_window", 0.3)):
        for L, P in ((64, 16), (128, 16), (256, 16), (256, 4), (256, 64)):
            runs.append({"config": {"mixer": mixer, "d_model": 64, "num_heads": 2,
                                    "task": {"seq_len": L, "num_pairs": P}},
                         "state_size": 2048, "accuracy": acc - L / 1e4 - P / 1e3, "chance": 1 / 256,
                         "untrained_accuracy": 0.004, "steps": 100, "stopped": "steps"})
    return {"grid": {"fixed_pairs": 16, "fixed_len": 256}, "runs": runs}


def test_mqar_figure_has_both_sweeps_per_mixer():
    fig = ex.mqar_figure(mqar_results())
    gdn = [t for t in fig.data if t.name.startswith("gdn")]
    assert len(gdn) == 2                                             # length sweep and capacity sweep
    assert list(gdn[0].x) == [64, 128, 256] and list(gdn[1].x) == [4, 16, 64]
    assert gdn[0].y[0] == pytest.approx(0.99 - 64 / 1e4 - 16 / 1e3)
    assert any(s.y0 == pytest.approx(1 / 256) for s in fig.layout.shapes)   # chance
    with pytest.raises(ValueError, match="no runs"):
        ex.mqar_figure({"grid": {"fixed_pairs": 1, "fixed_len": 1}, "runs": []})


def test_mqar_merge_joins_runs_once_and_checks_the_axes():
    a, b = mqar_results(), mqar_results()
    a["command"], b["command"], a["complete"], b["complete"] = "length", "capacity", True, False
    extra = {**b["runs"][0], "config": {**b["runs"][0]["config"], "task": {"seq_len": 256, "num_pairs": 32}}}
    b["runs"] = b["runs"][:3] + [extra]                              # three shared runs and one new
    merged = ex.mqar_merge(a, b)
    assert len(merged["runs"]) == len(a["runs"]) + 1 and merged["runs"][-1] is extra
    assert merged["commands"] == ["length", "capacity"] and merged["complete"] is False
    assert merged["command"] == "length" and len(a["runs"]) == 10   # the inputs are left as they were
    gdn = [t for t in ex.mqar_figure(merged).data if t.name.startswith("gdn")]
    assert list(gdn[1].x) == [4, 16, 32, 64]
    with pytest.raises(ValueError, match="different axes"):
        ex.mqar_merge(a, {**b, "grid": {"fixed_pairs": 8, "fixed_len": 256}})


def test_recall_figure_draws_sidecar_and_baselines_from_distance_one():
    ev = {v: {d: {"exact_match": x} for d, x in zip(("0", "1", "4"), vals)}
          for v, vals in (("sidecar", (0.8, 0.9, 0.7)), ("reset", (0.8, 0.0, 0.0)), ("base", (0.7, 0.0, 0.0)))}
    ev["chance"] = {"exact_match": 1e-5}
    fig = ex.recall_figure(ev, call_tokens=128)
    assert [list(t.x) for t in fig.data] == [[1, 4]] * 3
    assert list(fig.data[0].y) == [0.9, 0.7] and list(fig.data[0].customdata) == [128, 512]


def test_position_loss_figure_bins_and_marks_segments():
    ev = {"positions": 8, "documents": ["a"],
          "per_position": {"base_segments": [4, 2, 4, 2, 4, 2, 4, 2], "sidecar_segments": [4, 2, 3, 1, 3, 1, 3, 1],
                           "base_full_context": [4, 2, 2, 1, 1, 1, 1, 1]}}
    fig = ex.position_loss_figure(ev, segment_tokens=2, bin_tokens=2)
    assert list(fig.data[0].y) == [3, 3, 3, 3] and list(fig.data[1].y) == [3, 2, 2, 2]
    assert list(fig.data[0].x) == [0.5, 2.5, 4.5, 6.5]
    assert len(fig.layout.shapes) == 3                               # boundaries at 2, 4, 6


def test_throughput_and_retention_figures():
    rows = [{"T": 128, "v1_tokens_per_s": 100.0, "v2_tokens_per_s": 2000.0, "speedup": 20.0},
            {"T": 512, "v1_tokens_per_s": 90.0, "v2_tokens_per_s": 4500.0, "speedup": 50.0}]
    fig = ex.throughput_figure(rows)
    assert list(fig.data[1].y) == [2000.0, 4500.0] and list(fig.data[1].text) == ["20.0x", "50.0x"]
    persistence = {"lags": [0, 1, 2, 4], "blocks": {"v2": {"curve": [1, 0.99, 0.98, 0.97],
                                                           "gate_only_curve": [1, 1, 1, 1]},
                                                    "v1": {"curve": [1, 0.8, 0.6, 0.3],
                                                           "gate_only_curve": [1, 0.88, 0.77, 0.6]}}}
    fig = ex.version_retention_figure(persistence)
    assert len(fig.data) == 4 and list(fig.data[2].x) == [1, 2, 4] and list(fig.data[2].y) == [0.8, 0.6, 0.3]


def recall_run(takeoff: int, steps: int = 100, easy: int = 20) -> dict:
    history = [{"step": s, "exact_match": float(s > takeoff)} for s in range(1, steps + 1)]
    return {"history": history, "data": {"easy": {"steps": easy}}}


def test_takeoff_figure_and_step_read_the_training_curve():
    from cortexlab.train import takeoff_step

    runs = {"early": recall_run(30), "late": recall_run(80), "never": recall_run(1000)}
    assert [takeoff_step(r["history"]) for r in runs.values()] == [50, 100, None]
    assert takeoff_step(runs["early"]["history"], threshold=0.9, window=10) == 40
    fig = ex.takeoff_figure(runs)
    assert [t.name for t in fig.data] == ["early", "late", "never"]
    assert list(fig.data[0].x) == [25, 50, 75, 100] and list(fig.data[0].y) == [0, pytest.approx(0.8), 1, 1]
    assert [s.x0 for s in fig.layout.shapes] == [20]                 # the easy stage's end
    with pytest.raises(ValueError, match="runs"):
        ex.takeoff_figure({})
    with pytest.raises(ValueError, match="window"):
        takeoff_step(runs["early"]["history"], window=0)


def test_digit_curves_show_what_the_plateau_learnt():
    """The first digit learnt alone at step 20, the others at step 60: the curves and the figure say so per digit;
    steps recorded before the field existed are left out."""
    from cortexlab.train import digit_curves

    history = [{"step": s, "exact_match": 0.0} for s in range(1, 11)]   # an older run's steps: no per-digit field
    history += [{"step": s, "digit_position_accuracy": [float(s > 20)] + [float(s > 60)] * 4}
                for s in range(11, 111)]
    curves = digit_curves(history, window=25)
    assert len(curves) == 5 and [step for step, _ in curves[0]] == [35, 60, 85, 110]
    assert [a for _, a in curves[0]] == [pytest.approx(0.6), 1, 1, 1]
    assert [a for _, a in curves[1]] == [0, 0, pytest.approx(1.0), 1]
    fig = ex.digit_takeoff_figure({"run": {"history": history}, "again": {"history": history}}, window=25)
    assert [t.name for t in fig.data] == [f"digit {i}" for i in range(1, 6)] * 2
    assert list(fig.data[1].y) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="digit_position_accuracy"):
        digit_curves(history[:10])
    with pytest.raises(ValueError, match="window"):
        digit_curves(history, window=0)
    with pytest.raises(ValueError, match="runs"):
        ex.digit_takeoff_figure({})


def test_digit_probe_figure_draws_each_reading_by_layer():
    rows = [{"layer": i, "digit": 0.5 + i / 10, "previous": 0.2 + i / 10, "place": 0.9, "shared": 0.6}
            for i in range(4)]
    fig = ex.digit_probe_figure(rows, marked=[1, 3])
    assert [t.name for t in fig.data] == ["the digit", "the digit before it", "its place", "mean cosine between inputs"]
    assert list(fig.data[0].x) == [0, 1, 2, 3]
    assert list(fig.data[1].y) == [pytest.approx(0.2 + i / 10) for i in range(4)]
    assert sum(shape["type"] == "line" and shape["x0"] == shape["x1"] for shape in fig.layout.shapes) == 2
    with pytest.raises(ValueError, match="rows"):
        ex.digit_probe_figure([])
