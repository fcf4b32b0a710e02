"""cortexlab.train on tiny models: the fast paths equal the plain forward, training learns, checkpoints round-trip."""
import json
import os

import pytest
import torch
from transformers import AutoTokenizer

from cortexlab.data import RecallTask
from cortexlab.models import default_model_path
from conftest import randomise_, tiny_cortex

from cortexlab.train import (
    EVAL_SEED,
    RecallEvalSet,
    RecallTrainConfig,
    answer_loss,
    crop_plan,
    episode_forward,
    evaluate_generation,
    evaluate_recall,
    evaluation_mode,
    load_checkpoint,
    neutralise_controller_,
    parse_curriculum,
    save_adapter,
    save_checkpoint,
    score_answer,
    scored_prefix,
    sidecar_inputs,
    train_recall,
)

CHARS = 20_000


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def task(tokenizer):
    return RecallTask(tokenizer, "train", max_filler_chars=CHARS)


@pytest.mark.parametrize("controller, overrides", [(True, {}), (True, {"entropy_layer": 0}), (False, {})])
def test_fast_paths_equal_the_plain_forward(tokenizer, task, controller, overrides):
    """memory_only_depth and precomputed sidecar inputs give the logits of full forwards through every call."""
    model = randomise_(tiny_cortex(tokenizer, controller, **overrides), controller)
    batch = task.batch(4, 3, seed=1)
    memory = None
    for c in range(3):
        memory = model(batch.input_ids[:, c], memory=memory, use_cache=False).memory
    reference = model(batch.input_ids[:, -1], memory=memory, use_cache=False).logits[:, -6:-1]
    assert torch.equal(episode_forward(model, batch, fast=False), reference)
    assert torch.equal(episode_forward(model, batch, fast=True), reference)
    # prefix_tokens=1 adds the position that predicts the space before the number, first
    with_space = model(batch.input_ids[:, -1], memory=memory, use_cache=False).logits[:, -7:-1]
    assert torch.equal(episode_forward(model, batch, prefix_tokens=1), with_space)
    if overrides or not controller:
        return
    # two sidecar layers: no features path, still the plain result
    two = randomise_(tiny_cortex(tokenizer, controller, layers=(0, 1)), controller)
    memory = None
    for c in range(3):
        memory = two(batch.input_ids[:, c], memory=memory, use_cache=False).memory
    assert torch.equal(episode_forward(two, batch), two(batch.input_ids[:, -1], memory=memory).logits[:, -6:-1])
    with pytest.raises(ValueError, match="one sidecar layer"):
        sidecar_inputs(two, batch.input_ids[:, 0])


def test_training_steps_reduce_the_loss_on_a_fixed_batch(tokenizer, task):
    # a larger init range gives the tiny random base an output head that can express the digits
    model = tiny_cortex(tokenizer, controller=False, init_range=0.2)
    batch = task.batch(3, 4, seed=2)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(not p.requires_grad for p in model.base.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-2)
    with torch.no_grad():
        before = answer_loss(episode_forward(model, batch), batch.answer).item()
    for _ in range(15):
        loss = answer_loss(episode_forward(model, batch), batch.answer)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = answer_loss(episode_forward(model, batch), batch.answer).item()
    assert after < 0.5 * before, (before, after)


def test_gradient_reaches_the_first_call_through_the_memory(tokenizer, task):
    """Backprop through time: the question's loss depends on what the sidecar wrote in call 1."""
    model = randomise_(tiny_cortex(tokenizer, controller=False), controller=False)
    batch = task.batch(3, 2, seed=3)
    first = sidecar_inputs(model, batch.input_ids[:, 0])
    first["x"].requires_grad_(True)
    loss = answer_loss(episode_forward(model, batch, features=[first, None]), batch.answer)
    loss.backward()
    assert first["x"].grad is not None and first["x"].grad.abs().sum() > 0


def test_checkpoint_and_adapter_round_trip(tokenizer, tmp_path):
    model = randomise_(tiny_cortex(tokenizer, controller=True))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    sum(p.square().sum() for p in params).backward()
    optimizer.step()
    save_checkpoint(tmp_path / "ckpt", model, optimizer, 7, {"history": [{"step": 7}]})
    fresh = tiny_cortex(tokenizer, controller=True, seed=5)
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-3)
    state = load_checkpoint(tmp_path / "ckpt", fresh, fresh_opt)
    assert state["step"] == 7 and state["history"] == [{"step": 7}]
    for (name, a), b in zip(model.sidecars.state_dict().items(), fresh.sidecars.state_dict().values()):
        assert torch.equal(a, b), name
    saved, loaded = optimizer.state_dict(), fresh_opt.state_dict()
    assert saved["param_groups"] == loaded["param_groups"] and saved["state"].keys() == loaded["state"].keys()
    for i, s in saved["state"].items():
        assert s.keys() == loaded["state"][i].keys() and all(torch.equal(s[k], loaded["state"][i][k]) for k in s)
    save_adapter(model, tmp_path / "adapter", {"note": "card"})
    again = tiny_cortex(tokenizer, controller=True, seed=6).load_cortex(tmp_path / "adapter")
    assert all(torch.equal(a, b) for a, b in zip(model.sidecars.state_dict().values(),
                                                 again.sidecars.state_dict().values()))
    assert json.loads((tmp_path / "adapter" / "card.json").read_text()) == {"note": "card"}
    umask = os.umask(0)
    os.umask(umask)
    for path, mode in ((tmp_path / "adapter", 0o777), (tmp_path / "adapter" / "cortex.safetensors", 0o666)):
        assert path.stat().st_mode & 0o777 == mode & ~umask   # not tempfile's private 0700 / 0600
    assert load_checkpoint(tmp_path / "nothing", fresh, fresh_opt) is None


def test_eval_baselines_and_neutralised_controller(tokenizer, task):
    heldout = RecallTask(tokenizer, "heldout", max_filler_chars=CHARS)
    model = tiny_cortex(tokenizer, controller=True)
    # a freshly attached sidecar is a ghost: sidecar, reset and base all score the same
    ev = evaluate_recall(model, heldout, distances=(0, 1, 3), examples=4, batch_size=2)
    assert set(ev) == {"sidecar", "reset", "base", "chance"} and ev["chance"]["exact_match"] == 1e-5
    assert set(ev["sidecar"]) == {"0", "1", "3"} and ev["sidecar"]["3"]["examples"] == 4
    assert ev["sidecar"] == ev["reset"] == ev["base"]
    # the features path (single sidecar layer) equals the plain path (model without features)
    randomise_(model)
    eval_set = RecallEvalSet(model, heldout, distances=(1, 2), examples=3, batch_size=2)
    model.train()
    model.base.eval()   # as in training: the sidecars train, the frozen base stays in eval mode
    fast = evaluate_recall(model, eval_set)
    assert model.sidecars.training and not any(m.training for m in model.base.modules())
    eval_set.layer = None
    assert evaluate_recall(model, eval_set) == fast
    # neutralising the controller leaves exactly the controller-free sidecar with the same weights
    plain = tiny_cortex(tokenizer, controller=False)
    plain.sidecars.load_state_dict(model.sidecars.state_dict(), strict=False)
    assert neutralise_controller_(model) == 1 and neutralise_controller_(plain) == 0
    batch = heldout.batch(3, 2, seed=0)
    torch.testing.assert_close(episode_forward(model, batch), episode_forward(plain, batch), rtol=1e-5, atol=1e-5)


def test_evaluation_mode_restores_each_module_mode_also_on_error(tokenizer):
    model = tiny_cortex(tokenizer, controller=True)
    model.train()
    model.base.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    assert len(set(modes.values())) == 2   # mixed: the sidecars train, the base does not
    with pytest.raises(RuntimeError, match="inside"):
        with evaluation_mode(model) as inside:
            assert inside is model and not any(m.training for m in model.modules())
            raise RuntimeError("inside")
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_prefix_accuracy_reads_the_space_before_the_number():
    """prefix_accuracy scores the position before the digits, where the space that starts a number is written:
    on SmolLM2 it equals the bare model's argmax there, computed by hand, and one position later (the first digit's)
    the argmax is never the space."""
    from cortexlab.cortex import CortexWrapConfig, attach_cortex
    from cortexlab.models import load_base_model

    base, tokenizer = load_base_model()
    model = attach_cortex(base, CortexWrapConfig(layers=[12], controller=False, use_hybrid=False))
    heldout = RecallTask(tokenizer, "heldout", call_tokens=64, max_filler_chars=CHARS)
    try:
        ev = evaluate_recall(model, heldout, distances=(0, 1), examples=4, batch_size=4, variants=("base",))
        batch = heldout.batch(2, 4, seed=EVAL_SEED)   # the set's episode for distance 1
        logits = episode_forward(model, batch, prefix_tokens=1, disabled=True)
    finally:
        model.detach()
    assert heldout.answer_prefix == [tokenizer.encode(" 1", add_special_tokens=False)[0]]
    spaced = (logits[:, 0].argmax(-1) == heldout.answer_prefix[0]).float().mean().item()
    assert logits.shape[1] == 6 and ev["base"]["1"]["prefix_accuracy"] == spaced > 0
    assert not (logits[:, 1].argmax(-1) == heldout.answer_prefix[0]).any()


def test_score_answer_scores_the_space_and_the_digits(tokenizer, task):
    """score_answer's loss is the mean cross-entropy over [space, digits], read at the positions before them;
    with no prefix it is the digits-only loss, and the digits' logits are the same either way."""
    model = randomise_(tiny_cortex(tokenizer))
    batch = task.batch(3, 4, seed=2)
    prefix = scored_prefix(task, True)
    assert prefix.tolist() == task.answer_prefix and scored_prefix(task, False).numel() == 0
    with torch.no_grad():
        loss, digits, spaced = score_answer(model, batch, prefix)
        reference = episode_forward(model, batch, prefix_tokens=1)         # [B, 1 + A, V]
        targets = torch.cat([prefix.expand(4, -1), batch.answer], dim=1)
        torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(reference.flatten(0, 1), targets.flatten()))
        assert torch.equal(digits, reference[:, 1:])
        assert spaced == (reference[:, 0].argmax(-1) == prefix[0]).float().mean().item()
        loss0, digits0, spaced0 = score_answer(model, batch, scored_prefix(task, False))
    assert spaced0 is None and torch.equal(digits0, digits)
    torch.testing.assert_close(loss0, answer_loss(digits, batch.answer))
    assert not torch.allclose(loss0, loss)


def test_free_generation_writes_what_the_teacher_forced_argmax_reads():
    """With the committed E2 sidecar, greedy `generate` after the question writes the space and the key as often
    as the teacher-forced argmax gets all of them right on the same episodes (the memory carried between calls,
    and fed token by token while generating, gives the same outputs as the whole question call at once)."""
    from cortexlab.cortex import load_with_cortex
    from cortexlab.results import RECALL_ADAPTER, results_dir
    from cortexlab.train.recall import _generation_episodes

    model = load_with_cortex(adapter=results_dir() / RECALL_ADAPTER)
    heldout = RecallTask(model.tokenizer, "heldout", call_tokens=128, max_filler_chars=CHARS)
    generated = evaluate_generation(model, heldout, distances=(1,), examples=8, batch_size=8, seed=11)
    batch = heldout.batch(2, 8, seed=11)
    with torch.no_grad():
        logits = episode_forward(model, batch, prefix_tokens=1)
    target = torch.cat([torch.tensor(heldout.answer_prefix).expand(8, -1), batch.answer], dim=1)
    forced = (logits.argmax(-1) == target).all(-1).float().mean().item()
    assert generated == {"1": forced} and forced >= 0.75
    with pytest.raises(ValueError, match="distances"):
        evaluate_generation(model, heldout, distances=(0,))
    # on a RecallEvalSet: the very episodes evaluate_recall reads (from precomputed sidecar inputs), same answer
    eval_set = RecallEvalSet(model, heldout, distances=(1, 3), examples=8, batch_size=4, seed=11)
    before, question, features = next(_generation_episodes(model, eval_set, 1, 8, 4, 11))
    episode = eval_set.chunks[0]["episode"].input_ids   # the fact call, two filler calls, the question call
    assert torch.equal(before, episode[:, :1]) and torch.equal(question, episode[:, 3])
    assert features is eval_set.chunks[0]["features"]
    forced = evaluate_recall(model, eval_set, variants=("sidecar",))["sidecar"]
    assert all(forced[d]["prefix_accuracy"] == 1.0 for d in ("1", "3"))   # so exact match is prefix and digits
    expected = {d: round(forced[d]["exact_match"], 4) for d in ("1", "3")}   # generation rounds to 4 places
    assert evaluate_generation(model, eval_set, distances=(1, 3)) == expected
    eval_set.layer = None   # the plain path through the calls' token ids gives the same
    assert next(_generation_episodes(model, eval_set, 1, 8, 4, 11))[2] is None
    assert evaluate_generation(model, eval_set, distances=(3,)) == {"3": expected["3"]}
    with pytest.raises(ValueError, match=r"distances \[2\] are not in the eval set"):
        evaluate_generation(model, eval_set, distances=(2,))
    with pytest.raises(TypeError, match="data must be"):
        evaluate_generation(model, "heldout")


def test_cropped_episode_is_the_same_episode_with_shorter_fact_and_question_calls(tokenizer, task):
    """crop_plan keeps the fact, the question and the answer; the cropped run equals the plain forward on the
    calls cut by hand, and a crop with all the room equals the whole-call episode."""
    model = randomise_(tiny_cortex(tokenizer))
    T = task.call_tokens
    for seed in range(20):
        plan = crop_plan(task, 8, seed)
        assert 0 <= plan.fact_at <= 8 and plan.fact_at + task.max_fact_tokens <= plan.fact_end <= T
        assert plan.fact_end - plan.fact_at - task.max_fact_tokens <= 8
        assert 0 <= T - task.max_tail_tokens - plan.question_start <= 8
    plan = crop_plan(task, 8, seed=3)
    batch = task.batch(3, 2, seed=4, fact_at=plan.fact_at)
    for b, key in enumerate(batch.keys):
        assert key in tokenizer.decode(batch.input_ids[b, 0, :plan.fact_end])
        assert tokenizer.decode(batch.input_ids[b, -1, plan.question_start:]).endswith(key)
    cropped = episode_forward(model, batch, crop=plan)
    memory = None
    for ids in (batch.input_ids[:, 0, :plan.fact_end], batch.input_ids[:, 1]):
        memory = model(ids, memory=memory, use_cache=False).memory
    by_hand = model(batch.input_ids[:, 2, plan.question_start:], memory=memory, use_cache=False).logits
    torch.testing.assert_close(cropped, by_hand[:, -task.key_digits - 1:-1].float(), rtol=1e-5, atol=1e-5)
    whole = type(plan)(plan.fact_at, T, 0)
    torch.testing.assert_close(episode_forward(model, batch, crop=whole), episode_forward(model, batch))


def test_train_recall_end_to_end_and_resume(tokenizer, tmp_path):
    cfg = RecallTrainConfig(steps=3, batch_size=2, controller=False, layers=[1], rank_fast=16, num_heads=2,
                            curriculum="0:2-3,0.5:3-4", filler_pool=8, easy_fraction=0.5, easy_call_tokens=24,
                            eval_distances=(0, 2), eval_examples=2, eval_batch_size=2, checkpoint_every=2, lr=1e-2,
                            crop_filler=8, min_lr_ratio=0.5, warmup_steps=1, generation_distances=(1,),
                            generation_examples=2)
    first = train_recall(cfg, model=tiny_cortex(tokenizer, controller=False), tokenizer=tokenizer,
                         checkpoint_dir=tmp_path, progress=False)
    assert [h["step"] for h in first["history"]] == [1, 2, 3]
    assert all(0 <= h["prefix_accuracy"] <= 1 for h in first["history"])   # the space before the digits is scored
    assert [h["stage"] for h in first["history"]] == ["easy", "easy", "main"]
    assert [h["lr"] for h in first["history"]] == pytest.approx([1e-2, 1e-2, 0.75e-2])   # cosine towards 0.5 lr
    assert first["data"]["easy"]["call_tokens"] == 24 and first["data"]["train"]["call_tokens"] == 48
    assert set(first["eval"]) == {"sidecar", "reset", "base", "chance"}
    assert set(first["generation"]["exact_match"]) == {"1"} and 0 <= first["generation"]["exact_match"]["1"] <= 1
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 3
    # resume from step 2 (drop the last checkpoint): the same data stream gives the same step 3
    import shutil

    shutil.rmtree(tmp_path / "step-000003")
    (tmp_path / "latest.json").write_text(json.dumps({"checkpoint": "step-000002", "step": 2}))
    resumed = train_recall(cfg, model=tiny_cortex(tokenizer, controller=False), tokenizer=tokenizer,
                           checkpoint_dir=tmp_path, resume=True, progress=False, evaluate=False)
    assert resumed["history"][:2] == first["history"][:2] and len(resumed["history"]) == 3
    assert resumed["history"][2]["calls"] == first["history"][2]["calls"]
    assert resumed["history"][2]["loss"] == pytest.approx(first["history"][2]["loss"], rel=1e-4)
    with pytest.raises(ValueError, match="different config"):
        train_recall(RecallTrainConfig(**{**cfg.__dict__, "lr": 5e-3}), model=tiny_cortex(tokenizer, False),
                     tokenizer=tokenizer, checkpoint_dir=tmp_path, resume=True, progress=False, evaluate=False)


def test_a_run_stopped_early_resumes_to_the_same_run(tokenizer, tmp_path):
    """stop_at probes a run's start: no evaluation, a checkpoint at the stop, and --resume finishes it as one
    uninterrupted run would; the history records each answer digit's accuracy."""
    cfg = RecallTrainConfig(steps=4, batch_size=2, controller=False, layers=[1], rank_fast=16, num_heads=2,
                            curriculum="0:2-3", filler_pool=4, easy_fraction=0, eval_distances=(1,), eval_examples=2,
                            eval_batch_size=2, checkpoint_every=10, lr=1e-2, generation_distances=())
    whole = train_recall(cfg, model=tiny_cortex(tokenizer, controller=False), tokenizer=tokenizer, progress=False,
                         evaluate=False)
    probe = train_recall(cfg, model=tiny_cortex(tokenizer, controller=False), tokenizer=tokenizer, progress=False,
                         checkpoint_dir=tmp_path, stop_at=2)
    assert probe["stopped_at"] == 2 and len(probe["history"]) == 2 and "eval" not in probe
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 2
    finished = train_recall(cfg, model=tiny_cortex(tokenizer, controller=False), tokenizer=tokenizer, progress=False,
                            checkpoint_dir=tmp_path, resume=True)
    assert "stopped_at" not in finished and set(finished["eval"]) == {"sidecar", "reset", "base", "chance"}
    assert [h["loss"] for h in finished["history"]] == pytest.approx([h["loss"] for h in whole["history"]], rel=1e-4)
    for h in whole["history"]:
        assert len(h["digit_position_accuracy"]) == cfg.key_digits
        assert sum(h["digit_position_accuracy"]) / cfg.key_digits == pytest.approx(h["digit_accuracy"], abs=1e-3)
    with pytest.raises(ValueError, match="stop_at"):
        train_recall(cfg, model=tiny_cortex(tokenizer, controller=False), tokenizer=tokenizer, progress=False,
                     stop_at=0)


def test_draw_filler_calls_takes_the_hard_fraction_from_the_hard_calls():
    from cortexlab.train.recall import draw_filler_calls, hard_filler_calls

    hard = hard_filler_calls(torch.arange(64.0))                     # the most damaging eighth: calls 56..63
    assert sorted(hard.tolist()) == list(range(56, 64))
    uniform = draw_filler_calls(64, (30, 40), seed=3)
    assert torch.equal(uniform, draw_filler_calls(64, (30, 40), seed=3, hard=hard, hard_fraction=0.0))
    assert torch.isin(draw_filler_calls(64, (30, 40), seed=3, hard=hard, hard_fraction=1.0), hard).all()
    mixed = draw_filler_calls(64, (30, 40), seed=3, hard=hard, hard_fraction=0.5)
    assert 0.5 < torch.isin(mixed, hard).float().mean().item() < 0.6   # half swapped + an eighth of the rest
    assert torch.equal(mixed, draw_filler_calls(64, (30, 40), seed=3, hard=hard, hard_fraction=0.5))
    with pytest.raises(ValueError, match="hard_fraction"):
        draw_filler_calls(64, (3, 4), seed=3, hard=hard, hard_fraction=1.5)


def test_filler_damage_is_the_read_out_change_of_running_the_calls_by_hand(tokenizer):
    """damage(c) = mean_e |o_e(M_e + c) - o_e(M_e)|^2 / |o_e(M_e)|^2 over the answer-predicting positions."""
    from cortexlab.train.recall import filler_damage, sidecar_inputs

    model = tiny_cortex(tokenizer, controller=True)
    randomise_(model, controller=True)
    task = RecallTask(tokenizer, "train", call_tokens=32)
    ids = task.filler_calls(5, seed=1)
    pool = {"ids": ids, **sidecar_inputs(model, ids)}
    damage = filler_damage(model, pool, task, episodes=3, seed=7, chunk=2)
    block = model.sidecars["1"]
    episodes = task.batch(2, 3, seed=7).input_ids
    fact, question = (sidecar_inputs(model, episodes[:, c]) for c in (0, 1))
    reads = len(task.answer_prefix) + task.key_digits
    with torch.no_grad():
        _, after_fact = block(fact["x"], None, None, fact["entropy"])
        before = block(question["x"], after_fact, None, question["entropy"])[0][:, -reads - 1:-1]
        for c in range(5):
            x, entropy = pool["x"][c:c + 1].expand(3, -1, -1), pool["entropy"][c:c + 1].expand(3, -1)
            _, after_call = block(x, after_fact, None, entropy)
            after = block(question["x"], after_call, None, question["entropy"])[0][:, -reads - 1:-1]
            by_hand = ((after - before).pow(2).sum((1, 2)) / before.pow(2).sum((1, 2))).mean()
            assert damage[c].item() == pytest.approx(by_hand.item(), rel=1e-4)
    assert (damage > 0).all() and damage.std() > 0
    with pytest.raises(ValueError, match="episodes"):
        filler_damage(model, pool, task, episodes=0)
    with pytest.raises(ValueError, match="one sidecar layer"):
        filler_damage(tiny_cortex(tokenizer, controller=True, layers=(0, 1)), pool, task)


def test_hard_filler_resumes_exactly(tokenizer, tmp_path):
    """The ranked hard calls travel in the checkpoint: a run resumed after a ranking draws the same calls."""
    cfg = RecallTrainConfig(steps=6, batch_size=2, controller=False, layers=[1], rank_fast=16, num_heads=2,
                            curriculum="0:5-5", filler_pool=16, easy_fraction=0.2, easy_call_tokens=24,
                            crop_filler=8, hard_filler=0.7, hard_every=2, checkpoint_every=2, lr=1e-2)
    first = train_recall(cfg, model=tiny_cortex(tokenizer, controller=False), tokenizer=tokenizer,
                         checkpoint_dir=tmp_path, progress=False, evaluate=False)
    state = json.loads((tmp_path / "step-000004" / "trainer_state.json").read_text())
    assert len(state["hard_calls"]) == 2                              # ranked at step 4 (16 / HARD_SHARE calls)
    import shutil

    shutil.rmtree(tmp_path / "step-000006")
    (tmp_path / "latest.json").write_text(json.dumps({"checkpoint": "step-000004", "step": 4}))
    resumed = train_recall(cfg, model=tiny_cortex(tokenizer, controller=False), tokenizer=tokenizer,
                           checkpoint_dir=tmp_path, resume=True, progress=False, evaluate=False)
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in first["history"]], rel=1e-4)
    with pytest.raises(ValueError, match="hard_filler"):
        RecallTrainConfig(hard_filler=1.5)
    with pytest.raises(ValueError, match="filler_pool"):
        RecallTrainConfig(hard_filler=0.5, filler_pool=0)
    with pytest.raises(ValueError, match="layers"):
        RecallTrainConfig(hard_filler=0.5, layers=[4, 8])


def test_distractors_start_at_their_step_in_the_batches_and_the_pool(tokenizer, monkeypatch):
    from conftest import distractor_pattern
    from cortexlab.train import recall

    pooled, batches = [], []
    real_pool, real_score = recall.call_pool, recall.score_answer
    monkeypatch.setattr(recall, "call_pool", lambda model, ids, **kw: pooled.append(ids) or real_pool(model, ids, **kw))
    monkeypatch.setattr(recall, "score_answer",
                        lambda model, batch, *a, **kw: batches.append(batch.input_ids.clone()) or
                        real_score(model, batch, *a, **kw))
    cfg = RecallTrainConfig(steps=4, batch_size=2, controller=False, layers=[1], rank_fast=16, num_heads=2,
                            curriculum="0:3-3", filler_pool=8, easy_fraction=0.25, easy_call_tokens=24,
                            distractors=0.5, distractors_from=0.5)
    result = train_recall(cfg, model=tiny_cortex(tokenizer, controller=False), tokenizer=tokenizer, progress=False,
                          evaluate=False)
    pattern = distractor_pattern("train")
    distracted = [[bool(pattern.search(tokenizer.decode(call))) for call in ids.flatten(0, 1)] for ids in batches]
    easy, main = (next(ids for ids in pooled if ids.shape[1] == t) for t in (24, 48))
    assert [bool(pattern.search(tokenizer.decode(call))) for call in main] == [False] * 8 + [True] * 8   # 8 added
    assert not any(pattern.search(tokenizer.decode(call)) for call in easy)      # the easy stage has none
    assert [any(step) for step in distracted] == [False, False, True, True]    # easy, main, then from step 2
    assert result["data"]["distracted"]["from_step"] == 2 and result["data"]["distracted"]["pool_calls"] == 8
    early = RecallTrainConfig(**{**cfg.__dict__, "steps": 2, "easy_fraction": 0.5, "distractors_from": 0.0})
    result = train_recall(early, model=tiny_cortex(tokenizer, controller=False), tokenizer=tokenizer, progress=False,
                          evaluate=False)
    assert result["data"]["distracted"]["from_step"] == 1   # a start inside the easy stage waits for its end
    with pytest.raises(ValueError, match="distractors"):
        RecallTrainConfig(distractors=1.0)
    with pytest.raises(ValueError, match="distractors_from"):
        RecallTrainConfig(distractors=0.2, distractors_from=-1)
    with pytest.raises(ValueError, match="hard_filler"):
        RecallTrainConfig(distractors=0.2, hard_filler=0.3)
    with pytest.raises(ValueError, match="distractors_from"):
        RecallTrainConfig(distractors_from=0.5)   # without distractors it would do nothing


def test_direct_facts_join_at_their_step(tokenizer, monkeypatch):
    from cortexlab.data.recall import DIRECT_FACT_TEMPLATES
    from cortexlab.train import recall

    facts = []
    real_score = recall.score_answer
    monkeypatch.setattr(recall, "score_answer", lambda model, batch, *a, **kw: facts.append(
        [tokenizer.decode(call) for call in batch.input_ids[:, 0]]) or real_score(model, batch, *a, **kw))
    cfg = RecallTrainConfig(steps=6, batch_size=8, controller=False, layers=[1], rank_fast=16, num_heads=2,
                            curriculum="0:2-2", filler_pool=0, easy_fraction=1 / 6, easy_call_tokens=24,
                            templates="listed+direct", direct_from=0.5)
    result = train_recall(cfg, model=tiny_cortex(tokenizer, controller=False), tokenizer=tokenizer, progress=False,
                          evaluate=False)
    starts = [t.split("{key}")[0].strip() for t in DIRECT_FACT_TEMPLATES]
    direct = [sum(any(s in text for s in starts) for text in step) for step in facts]
    assert direct[:3] == [0, 0, 0] and all(direct[3:])   # easy, listed facts, then the direct ones join at step 3
    assert result["data"]["direct_from_step"] == 3
    assert set(DIRECT_FACT_TEMPLATES) <= set(result["data"]["train"]["fact_templates"])
    with pytest.raises(ValueError, match="direct_from"):
        RecallTrainConfig(direct_from=0.5)   # the listed templates have no direct facts to add
    with pytest.raises(ValueError, match="direct_from"):
        RecallTrainConfig(templates="listed+direct", direct_from=1.5)
    assert RecallTrainConfig(templates="listed+direct-composed", direct_from=0.5).direct_from == 0.5
    assert RecallTrainConfig(templates="listed+direct-bridged", direct_from=0.5).direct_from == 0.5


def test_shared_directions_are_found_in_the_filler_pool_before_training(tokenizer, monkeypatch):
    from cortexlab.cortex.gdn import GatedDeltaNet

    seen, real_drop = [], GatedDeltaNet.drop_shared_directions_
    monkeypatch.setattr(GatedDeltaNet, "drop_shared_directions_",
                        lambda self, x, rank: seen.append((x.clone(), rank)) or real_drop(self, x, rank))
    cfg = RecallTrainConfig(steps=1, batch_size=2, controller=False, layers=[1], rank_fast=16, num_heads=2,
                            curriculum="0:2-3", filler_pool=4, easy_fraction=0, conv_init="induction",
                            shared_directions=2, lr=1e-9)
    model = tiny_cortex(tokenizer, controller=False, conv_init="induction")
    result = train_recall(cfg, model=model, tokenizer=tokenizer, progress=False, evaluate=False)
    (x, rank), = seen
    assert rank == 2 and x.shape == (4 * cfg.call_tokens, model.base.config.hidden_size)   # the 4 pool calls
    top = torch.linalg.svd(x, full_matrices=False).Vh[:2]
    w_qk = model.sidecars["1"].gdn.qkv_proj.weight[:2 * 32]
    assert (w_qk @ top.T).abs().max() < 1e-4 * w_qk.abs().max()   # one step at lr 1e-9 later: still gone
    assert result["config"]["shared_directions"] == 2


def test_plain_distractors_reach_the_pool_and_the_results(tokenizer, monkeypatch):
    from conftest import distractor_pattern
    from cortexlab.train import recall

    pooled = []
    real_pool = recall.call_pool
    monkeypatch.setattr(recall, "call_pool", lambda model, ids, **kw: pooled.append(ids) or real_pool(model, ids, **kw))
    cfg = RecallTrainConfig(steps=2, batch_size=2, controller=False, layers=[1], rank_fast=16, num_heads=2,
                            curriculum="0:3-3", filler_pool=8, easy_fraction=0.0, distractors=0.5,
                            distractor_kind="plain")
    result = train_recall(cfg, model=tiny_cortex(tokenizer, controller=False), tokenizer=tokenizer, progress=False,
                          evaluate=False)
    plain, every = distractor_pattern("train", "plain"), distractor_pattern("train")
    added = [tokenizer.decode(call) for call in pooled[0][8:]]
    assert len(added) == 8 and all(plain.search(t) for t in added)
    assert sum(len(every.findall(t)) for t in added) == sum(len(plain.findall(t)) for t in added)   # no framed one
    assert result["data"]["distracted"]["distractor_kind"] == "plain"
    with pytest.raises(ValueError, match="distractor_kind"):
        RecallTrainConfig(distractor_kind="plain")   # without distractors it would do nothing
    with pytest.raises(ValueError, match="distractor_kind"):
        RecallTrainConfig(distractors=0.2, distractor_kind="facts")


def test_config_and_curriculum_validation():
    assert parse_curriculum("0:2-4,0.5:2-8") == [(0.0, 2, 4), (0.5, 2, 8)]
    for bad in ("", "0.5:2-4", "0:1-4", "0:4-2", "0:2-4,0.5", "0:2-4,0:2-8"):
        with pytest.raises(ValueError):
            parse_curriculum(bad)
    with pytest.raises(ValueError, match="steps"):
        RecallTrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        RecallTrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="easy_filler"):
        RecallTrainConfig(easy_filler="lorem")
    with pytest.raises(ValueError, match="filler"):
        RecallTrainConfig(filler="lorem")
    with pytest.raises(ValueError, match="templates"):
        RecallTrainConfig(templates="random")
    with pytest.raises(ValueError, match="easy_fraction"):
        RecallTrainConfig(easy_fraction=1.5)
    with pytest.raises(ValueError, match="crop_filler"):
        RecallTrainConfig(crop_filler=-1)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        RecallTrainConfig(min_lr_ratio=2.0)
    with pytest.raises(ValueError, match="score_prefix"):
        RecallTrainConfig(score_prefix=1)
    with pytest.raises(ValueError, match="generation_distances"):
        RecallTrainConfig(generation_distances=(0,))
    with pytest.raises(ValueError, match="conv_init"):
        RecallTrainConfig(conv_init="identity")
    assert RecallTrainConfig(conv_init="induction").cortex_config().conv_init == "induction"
    assert RecallTrainConfig(conv_size=8).cortex_config().conv_size == 8
    with pytest.raises(ValueError, match="conv_size"):
        RecallTrainConfig(conv_size=0)
    with pytest.raises(ValueError, match="shared_directions"):
        RecallTrainConfig(shared_directions=1, filler_pool=0)
    with pytest.raises(ValueError, match="shared_directions"):
        RecallTrainConfig(shared_directions=-1)
    # a run saved before score_prefix existed scored the digits alone: it matches False, not the new default
    from cortexlab.train.recall import _same_config

    added = ("score_prefix", "generation_distances", "generation_examples")     # fields newer than such a run
    old = {k: v for k, v in json.loads(json.dumps(RecallTrainConfig().__dict__)).items() if k not in added}
    old["eval_distances"] = list(old["eval_distances"])
    assert _same_config(old, RecallTrainConfig(score_prefix=False))
    assert not _same_config(old, RecallTrainConfig())
    # what is measured after training is not part of the run: free generation elsewhere, or none, is the same run
    assert _same_config(old, RecallTrainConfig(score_prefix=False, generation_distances=(), generation_examples=4))
    assert not _same_config(old, RecallTrainConfig(score_prefix=False, steps=401))


def test_ablation_over_seeds_reuses_finished_runs_and_averages_them(tmp_path, monkeypatch):
    """recall-ablation --seeds 0,1,2 --reuse: runs and evaluations on disk are kept (a config written before
    newer fields existed still matches), a run whose config differs is trained and evaluated again, the bare
    model's row reaches every run file, and the table is the mean over seeds."""
    import argparse

    import cortexlab.models
    from cortexlab.train import recall

    out, adapters = tmp_path / "r_ablation.json", tmp_path / "adapters"
    parser = argparse.ArgumentParser()
    recall.add_cli(parser.add_subparsers(dest="recipe"))
    argv = ["recall-ablation", "--seeds", "0,1,2", "--steps", "7", "--eval-distances", "0,2", "--eval-examples", "4",
            "--out", str(out), "--adapters", str(adapters), "--reuse"]
    args = parser.parse_args(argv)
    eval_set = {"split": "heldout", "examples": 4, "seed": recall.EVAL_SEED, "distances": [0, 2], "layout": "-"}

    def table(value, base=True):
        per = {d: {"exact_match": value, "digit_accuracy": value, "examples": 4} for d in ("0", "2")}
        return {"sidecar": per, "reset": per, **({"base": per} if base else {})}

    def write_run(seed, name, controller, value, evaluated=True, **config_changes):
        file, adapter = recall.ablation_paths(out, adapters, name, seed)
        config = json.loads(json.dumps(recall.asdict(recall._config_from(args, controller, seed)), default=list))
        config.update(config_changes)
        adapter.mkdir(parents=True, exist_ok=True)
        (adapter / "cortex.safetensors").write_bytes(b"")
        run = {"config": config, "seeds": {"init": seed}, "train_seconds": 1.0, "command": "cmd", "git": {},
               "history": [{"step": 1, "calls": 2, "loss": 2.3, "exact_match": 0.0, "seconds": 1.0}]}
        if evaluated:   # seed 1 was evaluated by a version that left the bare model out of later runs' files
            run.update(eval=table(value, base=seed != 1), eval_neutralised=table(value, base=seed != 1),
                       eval_set=eval_set)
        file.write_text(json.dumps(run))

    for seed in (0, 1, 2):
        for name, controller in recall.ABLATION_RUNS:
            value = 0.5 + 0.25 * seed if controller else 0.1 * seed
            extra = {"lr": 1.0} if (seed, name) == (2, "noctrl") else {}   # trained with another lr: redone
            write_run(seed, name, controller, value, **extra)
    config = json.loads((tmp_path / "r_ctrl.json").read_text())["config"]
    del config["crop_filler"]                       # written before that field existed: counts as its default
    (tmp_path / "r_ctrl.json").write_text(json.dumps({**json.loads((tmp_path / "r_ctrl.json").read_text()),
                                                      "config": config}))
    trained, evaluated = [], []

    def fake_run_one(args, controller, file, adapter, command, evaluate=True, seed=None):
        trained.append((seed, controller, evaluate))
        write_run(seed, "ctrl" if controller else "noctrl", controller, 0.0, evaluated=False)
        return json.loads(file.read_text())

    class FakeSidecar:
        def load_cortex(self, path):
            evaluated.append(path.name)

        def detach(self):
            pass

    monkeypatch.setattr(recall, "_run_one", fake_run_one)
    monkeypatch.setattr(cortexlab.models, "load_base_model", lambda: (None, None))
    monkeypatch.setattr(recall, "RecallTask", lambda *a, **k: None)
    monkeypatch.setattr(recall, "attach_cortex", lambda base, cfg: FakeSidecar())
    monkeypatch.setattr(recall, "RecallEvalSet", lambda *a, **k: type("S", (), {"describe": lambda self: eval_set})())
    monkeypatch.setattr(recall, "evaluate_recall", lambda model, data, variants, progress: {
        v: table(0.4)["sidecar"] for v in variants})

    combined = recall.run_cli(args, "cmd")
    assert trained == [(2, False, False)] and evaluated == ["recall_noctrl_seed2"]
    assert recall.ablation_paths(out, adapters, "ctrl", 1) == (tmp_path / "r_ctrl_seed1.json",
                                                               adapters / "recall_ctrl_seed1")
    assert combined["controller_trained"]["sidecar"]["2"] == pytest.approx(0.75)      # (0.5 + 0.75 + 1.0) / 3
    assert combined["no_controller_trained"]["sidecar"]["2"] == pytest.approx(0.5 / 3)  # (0 + 0.1 + 0.4) / 3
    saved = json.loads(out.read_text())
    assert saved["exact_match_by_seed"]["1"]["controller_trained"]["sidecar"]["0"] == 0.75
    assert saved["seeds"]["init"] == [0, 1, 2] and len(saved["curves"]) == 6
    for seed in (0, 1, 2):
        for name, _ in recall.ABLATION_RUNS:
            run = json.loads(recall.ablation_paths(out, adapters, name, seed)[0].read_text())
            assert run["eval"]["base"] == table(0.5)["base"]      # the bare model (first measured) everywhere
    assert not recall._same_eval_set({"split": "heldout"}, recall._config_from(args, True))
    wide = parser.parse_args(argv + ["--filler", "stdlib+packages", "--templates", "composed"])
    config = recall._config_from(wide, True)
    assert (config.filler, config.templates, config.easy_filler) == ("stdlib+packages", "composed", "stdlib")
