"""cortexlab.eval.speed and benchmarks/bench_gated_delta.py: behaviour only, never wall-clock thresholds."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cortexlab.eval import speed

REPO = Path(__file__).resolve().parents[1]


def test_time_call_counts_calls_and_reports_median():
    calls = []
    t = speed.time_call(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7
    assert len(t.times_s) == 5
    assert t.min_s <= t.median_s
    assert all(x >= 0 for x in t.times_s)


def test_time_calls_round_robin_order():
    order = []
    speed.time_calls({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, warmup=1, repeats=2)
    assert order == ["a", "b"] * 3


def test_threads_are_set_during_the_call_and_restored():
    before = torch.get_num_threads()
    seen = []
    speed.time_call(lambda: seen.append(torch.get_num_threads()), warmup=0, repeats=1, threads=1)
    assert seen == [1]
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads"):
        speed.time_call(lambda: None, threads=0)


def test_bad_repeats_rejected():
    with pytest.raises(ValueError, match="repeats"):
        speed.time_call(lambda: None, repeats=0)


@pytest.mark.skipif(not speed.cpu_peak_memory_supported(), reason="needs Linux /proc/self/clear_refs")
def test_cpu_peak_memory_reads_a_200mb_allocation():
    def allocate():
        x = torch.ones(50_000_000)  # 200 MB, written so that every page is resident
        del x

    peak = speed.peak_memory(allocate)
    assert 190e6 <= peak <= 260e6, peak
    # the peak is measured per call: a small call afterwards reads small
    assert speed.peak_memory(lambda: torch.ones(1000)) < 50e6


def test_cpu_peak_memory_sees_allocations_served_from_freed_heap_memory():
    """Memory freed earlier but kept resident by the C allocator must not hide an allocation: force big blocks onto
    glibc's heap (as a library setting M_MMAP_THRESHOLD may), free 240 MB, then measure a 200 MB allocation (in a
    child process, so the allocator setting does not leak into the other tests)."""
    script = """
import ctypes, torch
from cortexlab.eval import speed
ctypes.CDLL("libc.so.6").mallopt(-3, 512 * 1024 * 1024)   # M_MMAP_THRESHOLD
x = torch.ones(60_000_000)
del x
def allocate():
    y = torch.ones(50_000_000)
    del y
print(speed.peak_memory(allocate))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    assert 190e6 <= int(out.stdout.split()[-1]) <= 260e6, out.stdout


def test_gated_delta_inputs_satisfy_the_constraints():
    x = speed.gated_delta_inputs(2, 50, 3, 16, Dv=8, seed=1)
    assert x.q.shape == x.k.shape == (2, 50, 3, 16)
    assert x.v.shape == (2, 50, 3, 8)
    assert x.g.shape == x.beta.shape == (2, 50, 3)
    torch.testing.assert_close(x.k.norm(dim=-1), torch.ones(2, 50, 3))
    torch.testing.assert_close(x.q.norm(dim=-1), torch.ones(2, 50, 3))
    assert (x.g < 0).all() and (x.g > -5).all()
    assert (x.beta > 0).all() and (x.beta < 1).all()
    again = speed.gated_delta_inputs(2, 50, 3, 16, Dv=8, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(x, again))
    half = speed.gated_delta_inputs(1, 4, 1, 8, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in half)
    with pytest.raises(ValueError, match="T must be a positive int"):
        speed.gated_delta_inputs(1, 0, 1, 8)


def test_peers_compute_the_same_thing():
    pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    x = speed.gated_delta_inputs(1, 70, 2, 16)
    ref = speed.gated_delta_fn("recurrent")(*x)
    for name in ("chunk", "transformers"):
        torch.testing.assert_close(speed.gated_delta_fn(name)(*x), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown implementation"):
        speed.gated_delta_fn("nope")


def test_forward_backward_call_does_not_accumulate_into_the_inputs():
    x = speed.gated_delta_inputs(1, 10, 1, 8)
    call = speed.forward_backward_call(speed.gated_delta_fn("chunk"), x)
    call()
    call()
    assert all(t.grad is None and not t.requires_grad for t in x)


def test_time_backends_vs_length_rows():
    rows = speed.time_backends_vs_length(["recurrent", "chunk"], [8, 20], B=1, H=1, D=8, warmup=0, repeats=1)
    assert [(r["backend"], r["T"]) for r in rows] == [("recurrent", 8), ("chunk", 8), ("recurrent", 20), ("chunk", 20)]
    for r in rows:
        assert set(r) == {"backend", "T", "B", "H", "D", "fwd_s", "fwdbwd_s"}
        assert r["fwd_s"] > 0 and r["fwdbwd_s"] > 0
    ups = speed.speedups(rows, reference="recurrent")
    assert len(ups) == 4
    assert all(u["speedup"] == 1.0 for u in ups if u["backend"] == "recurrent")
    fwd_only = speed.time_backends_vs_length(["chunk"], [8], B=1, H=1, D=8, warmup=0, repeats=1, backward=False)
    assert fwd_only[0]["fwdbwd_s"] is None


def test_speed_figure_builds():
    pytest.importorskip("plotly")
    from cortexlab.viz.speed import speed_vs_length_figure

    rows = [{"backend": b, "T": T, "fwd_s": t, "fwdbwd_s": 2 * t}
            for b, f in (("recurrent", 1e-3), ("chunk", 1e-4)) for T, t in ((64, f), (128, 2 * f))]
    fig = speed_vs_length_figure(rows, reference="recurrent")
    names = {tr.name for tr in fig.data}
    assert {"recurrent", "chunk"} <= names
    with pytest.raises(ValueError, match="reference"):
        speed_vs_length_figure(rows, reference="triton")


@pytest.mark.slow
def test_benchmark_quick_run_writes_ratios(tmp_path):
    pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gated_delta.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Ratios" in proc.stdout
    result = json.loads(out.read_text())
    for key in ("command", "git", "environment", "targets", "check_max_abs_diff", "cpu_rows", "memory", "gpu"):
        assert key in result
    ratio = result["ratios"][0]
    for key in ("fwd_speedup_vs_transformers", "fwdbwd_speedup_vs_transformers", "fwd_speedup_vs_recurrent",
                "fwdbwd_speedup_vs_recurrent"):
        assert ratio[key] > 0
    assert result["memory"]["fwdbwd_memory_ratio_vs_transformers"] > 0
    assert result["check_max_abs_diff"]["chunk_vs_transformers"]["out"] < 1e-4
    assert "--quick" in result["command"]


@pytest.mark.parametrize("T", [1, 50, 130])
def test_backend_agreement_chunk_vs_recurrent(T):
    row = speed.backend_agreement("chunk", T, chunk_size=32)
    assert set(row) == {"backend", "T", "chunk_size", "out", "state", "grad"}
    assert row["out"] <= 1e-5 and row["state"] <= 1e-5 and row["grad"] <= 1e-5


def test_relative_rmse():
    x = torch.ones(10)
    assert speed.relative_rmse(x, x) == 0.0
    assert speed.relative_rmse(1.1 * x, x) == pytest.approx(0.1)


def test_accuracy_vs_an_fp32_reference():
    from cortexlab.eval.speed import accuracy_vs_reference, fp32_reference, gated_delta_fn, gated_delta_inputs

    inputs = gated_delta_inputs(1, 40, 2, 16, seed=3)
    grad_out, reference = fp32_reference(inputs)
    same = accuracy_vs_reference(gated_delta_fn("chunk"), inputs, grad_out, reference)
    assert set(same) == {"out", "dq", "dk", "dv", "dg", "dbeta"} and max(same.values()) < 1e-6
    other = accuracy_vs_reference(gated_delta_fn("recurrent"), inputs, grad_out, reference)
    assert max(other.values()) < 1e-5          # another backend, the same numbers
    half = [x.bfloat16() for x in inputs]
    grad_half, reference_half = fp32_reference(half)
    assert torch.equal(grad_half, grad_half.bfloat16().float())   # the output gradient is bf16-exact
    rounded = accuracy_vs_reference(gated_delta_fn("chunk"), half, grad_half, reference_half)
    assert 1e-4 < rounded["out"] < 1e-2        # bf16 output rounding, nothing more
