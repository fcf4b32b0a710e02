"""cortexlab.train.mqar: causal mixers, state sizes, a learned recall effect and the grid recipe's JSON."""
import json
import os
import subprocess
from dataclasses import asdict, replace

import pytest
import torch

import cortexlab.train.mqar as train_mqar_module
from cortexlab.data.mqar import MQARTask, split_seed
from cortexlab.train.__main__ import main
from cortexlab.train.mqar import (
    MIXERS,
    MQARModel,
    MQARModelConfig,
    MQARTrainConfig,
    _config_key,
    evaluate_mqar,
    mqar_grid,
    train_mqar,
)
from cortexlab.train import common
from cortexlab.train.common import jsonable


def random_model(mixer: str, seed: int = 0, **kw) -> MQARModel:
    """A model with every matrix random (the sidecar block's output projection starts at zero: no path may hide)."""
    torch.manual_seed(seed)
    model = MQARModel(MQARModelConfig(mixer=mixer, vocab_size=64, d_model=32, num_heads=2, window_size=8, **kw))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.3)
    return model.eval()


@pytest.mark.parametrize("mixer", MIXERS)
def test_every_mixer_is_causal(mixer, one_thread):
    model = random_model(mixer)
    ids = torch.randint(64, (2, 80), generator=torch.Generator().manual_seed(0))   # 80 > one 64-token chunk
    changed = ids.clone()
    changed[:, 70:] = (changed[:, 70:] + 1) % 64
    with torch.no_grad():
        before, after = model(ids), model(changed)
    assert before.shape == (2, 80, 64)
    torch.testing.assert_close(before[:, :70], after[:, :70], rtol=0, atol=1e-5)
    assert (before[:, 70:] - after[:, 70:]).abs().max() > 1e-2                     # later logits do move


def test_window_sees_only_its_window(one_thread):
    """One sliding-window layer: token 0 reaches positions < W + K - 1 (the window, widened by the short conv's
    K - 1 = 3 earlier inputs) and no further; full attention and the GDN core carry it to the end."""
    ids = torch.randint(64, (1, 40), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, 0] = (changed[0, 0] + 1) % 64
    reach = 8 + train_mqar_module.CONV_SIZE - 1
    for mixer, reaches_end in (("sliding_window", False), ("attention", True), ("gdn", True), ("hybrid", True)):
        model = random_model(mixer, num_layers=1)
        with torch.no_grad():
            moved = (model(ids) - model(changed)).abs().amax(-1)[0]
        assert moved[:reach].min() > 1e-4, mixer
        assert (moved[reach:].max() > 1e-4) == reaches_end, mixer


def test_state_size():
    cfg = MQARModelConfig(mixer="gdn", d_model=64, num_heads=4)
    assert cfg.dim == 16 and cfg.state_size(256) == 4 * 16 * 16 == cfg.state_size(512)    # H Dk Dv, length-free
    attention = replace(cfg, mixer="attention")
    assert attention.state_size(512) == 2 * attention.state_size(256) == 2 * 2 * 256 * 64
    window = replace(cfg, mixer="sliding_window", window_size=32)
    assert window.state_size(64) == window.state_size(512) == 2 * 31 * 64
    assert replace(window, mixer="hybrid").state_size(64) == cfg.state_size(64) + window.state_size(64)
    assert replace(cfg, head_dim=32).state_size(100) == 4 * 32 * 32


def test_answer_logits_match_the_full_forward(one_thread):
    model = random_model("gdn")
    ids, labels = MQARTask(vocab_size=64, seq_len=32, num_pairs=4).sample(3, seed=0)
    with torch.no_grad():
        logits, targets = model(ids, labels)
        full = model(ids)
    mask = labels != -100
    torch.testing.assert_close(logits, full[mask])
    assert torch.equal(targets, labels[mask]) and logits.shape == (12, 64)
    hits = (full.argmax(-1) == labels) & mask
    assert evaluate_mqar(model, ids, labels, batch_size=2)["accuracy"] == hits.sum().item() / 12
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels[:, :5])
    with pytest.raises(ValueError, match="input_ids"):
        model(ids.float())


TINY = MQARTrainConfig(task=MQARTask(vocab_size=64, seq_len=32, num_pairs=4), d_model=64, num_heads=2,
                       window_size=8, steps=300, batch_size=32, lr=3e-3, warmup_steps=10, test_size=128,
                       eval_every=25, stop_accuracy=0.95)


@pytest.mark.parametrize("mixer", ["attention", "gdn", "hybrid"])
def test_attention_gdn_and_hybrid_learn_recall(mixer, one_thread):
    """Each learns held-out recall to 95% (the hybrid only with its window read normalised: 0.71 after 300 steps
    without, see cortexlab.cortex.hybrid)."""
    result = train_mqar(replace(TINY, mixer=mixer), progress=False)
    assert result["untrained_accuracy"] < 3 * result["chance"]     # before training: chance (1/32)
    assert result["accuracy"] >= 0.9                                 # held-out keys and values, after training
    assert result["steps"] < TINY.steps and result["stopped"] == "target"   # stopped early at stop_accuracy
    assert result["evals"][-1]["train_loss"] < result["evals"][0]["train_loss"]


def test_sliding_window_cannot_reach_old_pairs(one_thread):
    """Each window layer passes information back at most (W - 1) + (K - 1) tokens (the window, then the short conv's
    K - 1 earlier inputs), two layers twice that: answers whose value sits further back are out of reach, and the
    same training that teaches attention and the GDN core leaves the window model below that."""
    task, W, K = TINY.task, 4, train_mqar_module.CONV_SIZE
    inputs, labels = task.sample(TINY.test_size, split_seed("test", TINY.seed))
    rows, positions = (labels != -100).nonzero(as_tuple=True)
    block = inputs[rows, : 2 * task.num_pairs : 2]
    value_pos = 2 * (block == inputs[rows, positions][:, None]).int().argmax(1) + 1
    reachable = (positions - value_pos <= 2 * (W - 1 + K - 1)).double().mean().item()
    assert reachable < 0.8
    result = train_mqar(replace(TINY, mixer="sliding_window", window_size=W), progress=False)
    assert result["accuracy"] < reachable + 0.1 and result["steps"] == TINY.steps


def test_training_is_reproducible(one_thread):
    cfg = replace(TINY, mixer="hybrid", steps=6, eval_every=3, test_size=16)
    first, second = train_mqar(cfg, progress=False), train_mqar(cfg, progress=False)
    assert first["evals"] == second["evals"]
    assert first["state_size"] == 2 * 32 * 32 + 2 * 7 * 64 and first["steps"] == 6


def test_grid_covers_both_sweeps_once():
    grid = mqar_grid(mixers=("gdn", "attention"), seq_lens=(64, 256), fixed_pairs=16, pairs=(8, 16),
                     fixed_len=256, sizes=((32, 2), (64, 4)))
    settings = {(c.task.seq_len, c.task.num_pairs) for c in grid}
    assert settings == {(64, 16), (256, 16), (256, 8)}                 # (256, 16) is in both sweeps
    assert len(grid) == len(settings) * 2 * 2 == len(set(grid))
    assert {(c.d_model, c.num_heads) for c in grid} == {(32, 2), (64, 4)}


@pytest.mark.parametrize("kwargs, name", [({"mixer": "mamba"}, "mixer"), ({"d_model": 30, "num_heads": 4}, "d_model"),
                                          ({"mixer": "attention", "head_dim": 7}, "head_dim"),
                                          ({"window_size": 1, "mixer": "hybrid"}, "window_size"),
                                          ({"mixer": "attention", "controller": True}, "controller")])
def test_bad_model_settings_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MQARModelConfig(**kwargs)


def test_results_saved_before_a_config_field_existed_still_match_on_resume():
    """Fields added later (layers, controller, the task's conflicts) count at their defaults, which is what ran."""
    cfg = jsonable(asdict(TINY))
    old = json.loads(json.dumps(cfg))
    del old["num_layers"], old["controller"], old["task"]["conflicts"]
    assert _config_key(old) == _config_key(cfg)
    assert _config_key(old) != _config_key(jsonable(asdict(replace(TINY, controller=True))))


def test_bad_train_settings_raise():
    with pytest.raises(ValueError, match="stop_accuracy"):
        replace(TINY, stop_accuracy=1.5)
    with pytest.raises(ValueError, match="mixer"):
        replace(TINY, mixer="rnn")
    with pytest.raises(ValueError, match="task"):
        replace(TINY, task={"vocab_size": 64})


def test_results_name_the_revision_the_run_started_from(tmp_path, one_thread, monkeypatch):
    """HEAD moves on while a run trains: the results file still names the commit it started from."""
    heads = iter(f"commit-{i}" for i in range(100))

    def fake_git(cmd, **kwargs):
        out = next(heads) if "rev-parse" in cmd else ""
        return subprocess.CompletedProcess(cmd, 0, stdout=out + "\n", stderr="")

    monkeypatch.setattr(common.subprocess, "run", fake_git)
    try:
        common.git_revision(refresh=True)                         # an earlier revision, cached before the run
        main(["mqar", "--quick", "--out", str(tmp_path / "mqar.json"), "--no-progress"])
        assert next(heads) == "commit-2"                          # asked again as the run started, not at its end
    finally:
        common._revision_at_first_call.cache_clear()                # forget the fake revisions
    assert json.loads((tmp_path / "mqar.json").read_text())["git"] == {"commit": "commit-1", "dirty": False}


def test_quick_recipe_writes_and_resumes(tmp_path, one_thread, monkeypatch):
    out = tmp_path / "mqar.json"
    main(["mqar", "--quick", "--out", str(out), "--no-progress"])
    result = json.loads(out.read_text())
    assert result["complete"] and result["command"].startswith("python -m cortexlab.train mqar --quick")
    assert {"commit", "dirty"} <= set(result["git"]) and result["environment"]["torch"] == torch.__version__
    runs = result["runs"]
    assert {r["config"]["mixer"] for r in runs} == set(MIXERS)
    assert {(r["config"]["task"]["seq_len"], r["config"]["task"]["num_pairs"]) for r in runs} == \
        {(32, 4), (64, 8)}
    for r in runs:
        assert 0 <= r["accuracy"] <= 1 and r["steps"] >= 1 and r["state_size"] > 0 and r["chance"] == 1 / 32
    # --resume keeps every finished run: nothing is trained again
    real_train_mqar = train_mqar_module.train_mqar
    monkeypatch.setattr(train_mqar_module, "train_mqar", lambda *a, **k: pytest.fail("retrained a finished run"))
    main(["mqar", "--quick", "--out", str(out), "--no-progress", "--resume"])
    assert json.loads(out.read_text())["runs"] == runs
    # ... unless the model's architecture changed since: a run of an older revision is trained again
    monkeypatch.setattr(train_mqar_module, "train_mqar", real_train_mqar)
    monkeypatch.setattr(train_mqar_module, "MODEL_REVISION", train_mqar_module.MODEL_REVISION + 1)
    main(["mqar", "--quick", "--out", str(out), "--no-progress", "--resume"])
    assert {r["model_revision"] for r in json.loads(out.read_text())["runs"]} == {train_mqar_module.MODEL_REVISION}
    # a subset of the grid with --resume keeps the other settings' runs
    runs = json.loads(out.read_text())["runs"]
    monkeypatch.setattr(train_mqar_module, "train_mqar", lambda *a, **k: pytest.fail("retrained a finished run"))
    main(["mqar", "--quick", "--out", str(out), "--no-progress", "--resume", "--mixers", "gdn"])
    kept = json.loads(out.read_text())["runs"]
    assert [r["config"]["mixer"] for r in kept[:2]] == ["gdn", "gdn"]
    assert sorted(map(json.dumps, kept)) == sorted(map(json.dumps, runs))
    with pytest.raises(ValueError, match="--mixers"):
        main(["mqar", "--quick", "--out", str(out), "--mixers", "gdn,lstm"])
    with pytest.raises(SystemExit):
        main(["mqar", "--out", str(out), "--sizes", "64-2"])


def test_parallel_jobs_give_the_sequential_results(tmp_path, one_thread):
    """--jobs 2 trains runs in worker processes: the same numbers as one after another, saved in grid order."""
    grid = mqar_grid(mixers=("gdn", "sliding_window"), seq_lens=(32,), fixed_pairs=4, pairs=(4,), fixed_len=32,
                     sizes=((32, 2),), base=replace(TINY, steps=4, eval_every=2))
    saved = []
    parallel = train_mqar_module.train_mqar_grid(grid, progress=False, jobs=2, on_run=saved.append)
    sequential = train_mqar_module.train_mqar_grid(grid, progress=False)
    strip = [{k: v for k, v in r.items() if k != "train_seconds"} for r in parallel]
    assert strip == [{k: v for k, v in r.items() if k != "train_seconds"} for r in sequential]
    assert [r["config"]["mixer"] for r in saved[-1]] == ["gdn", "sliding_window"] and len(saved) == 2
    with pytest.raises(ValueError, match="jobs"):
        train_mqar_module.train_mqar_grid(grid, jobs=0)


def test_patience_stops_a_run_that_plateaus(one_thread):
    """A window of 2 cannot see a key 30 tokens back: its accuracy stays flat, and patience ends the run early."""
    cfg = replace(TINY, mixer="sliding_window", window_size=2, steps=400, eval_every=10, patience=3, min_delta=0.2)
    result = train_mqar(cfg, progress=False)
    assert result["stopped"] == "plateau" and result["steps"] == 30
    floored = train_mqar(replace(cfg, min_steps=55), progress=False)    # no plateau stop before min_steps
    assert floored["stopped"] == "plateau" and floored["steps"] == 60
    assert train_mqar(replace(TINY, steps=5, eval_every=5), progress=False)["stopped"] == "steps"
    with pytest.raises(ValueError, match="patience"):
        replace(TINY, patience=0)


def test_a_grid_worker_exits_when_its_parent_is_gone():
    """`--jobs` workers watch the process that started them: a killed grid leaves no run training."""
    import subprocess
    import sys

    code = ("import os, time; from cortexlab.train.mqar import _start_worker; "
            "_start_worker(1, int(os.environ['PARENT'])); time.sleep(20)")
    orphan = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PARENT": "1"}, timeout=60)
    assert orphan.returncode == 1                     # its "parent" (pid 1 here) is not its parent: it exits


def test_a_plateau_on_the_last_evaluation_counts_as_running_out_of_steps(one_thread):
    cfg = replace(TINY, mixer="sliding_window", window_size=2, steps=30, eval_every=10, patience=3, min_delta=0.2)
    assert train_mqar(cfg, progress=False)["stopped"] == "steps"
