"""benchmarks/bench_hooks.py --quick: the JSON it writes and the variants it times (never a speed threshold)."""
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_hooks", REPO / "benchmarks" / "bench_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_enable_one_hook_each_then_all(bench):
    configs = bench.variants()
    assert list(configs) == ["unhooked", "eager", "disabled", *bench.HOOKS, "all"]
    assert configs["unhooked"] is None and configs["eager"] == "eager" and not configs["disabled"].any_enabled
    for hook in bench.HOOKS:
        enabled = {h for h in bench.HOOKS if getattr(configs[hook], f"enable_{h}")}
        assert enabled == {hook}
    assert all(getattr(configs["all"], f"enable_{h}") for h in bench.HOOKS)


def test_quick_benchmark_writes_expected_json(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    assert "vs unhooked" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["command"] == f"python benchmarks/bench_hooks.py --quick --out {out}"
    assert res["quick"] is True and res["plan"] == bench.QUICK and "cortexlab/neuro/hooks.py" in res["hook_sources"]
    assert res["environment"]["threads"] == 1 and res["environment"]["torch_threads"] == 1
    rows = res["variants"]
    assert list(rows) == ["unhooked", "eager", "disabled", *bench.HOOKS, "all"]
    for name, row in rows.items():
        assert len(row["times_s"]) == bench.QUICK["repeats"] and row["median_s"] > 0
        assert row["vs_unhooked"] == pytest.approx(row["median_s"] / rows["unhooked"]["median_s"])
        assert row["vs_eager"] == pytest.approx(row["median_s"] / rows["eager"]["median_s"])
    assert rows["unhooked"]["vs_unhooked"] == 1.0 and rows["unhooked"]["config"] is None
    assert rows["all"]["config"]["enable_voting"] is True
    assert res["attach_detach_s"] > 0
