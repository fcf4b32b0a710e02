"""cortexlab.eval.recall_shift: the four crossings of filler and phrasing splits, each read as evaluate_recall does."""
import torch
from transformers import AutoTokenizer

from conftest import randomise_, tiny_cortex
from cortexlab.data import RecallTask
from cortexlab.eval.recall_shift import CROSSINGS, recall_shift
from cortexlab.models import default_model_path
from cortexlab.train import evaluate_recall


def test_each_crossing_is_evaluate_recall_on_that_task():
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    model = randomise_(tiny_cortex(tokenizer, controller=True))
    model.tokenizer = tokenizer
    digits = RecallTask(tokenizer, "train", call_tokens=48, max_filler_chars=20_000).digit_ids
    with torch.no_grad():   # the argmax falls on a digit that depends on the episode: readings differ by crossing
        model.base.get_output_embeddings().weight[digits] *= 50
    readings = recall_shift(model, call_tokens=48, distances=(1, 2), examples=8, batch_size=4, seed=3)
    assert sorted(CROSSINGS) == [("heldout", "heldout"), ("heldout", "train"), ("train", "heldout"), ("train", "train")]
    assert set(readings) == {f"filler={f},phrasing={p}" for f, p in CROSSINGS}
    for filler, phrasing in CROSSINGS:
        task = RecallTask(tokenizer, filler, call_tokens=48, phrasing=phrasing)
        ev = evaluate_recall(model, task, distances=(1, 2), examples=8, batch_size=4, seed=3, variants=("sidecar",))
        assert readings[f"filler={filler},phrasing={phrasing}"] == {
            d: {k: r[k] for k in ("exact_match", "digit_accuracy")} for d, r in ev["sidecar"].items()}
    # each crossing reads its own episodes: the two mixed ones differ from each other and from both pure ones
    mixed = [readings["filler=heldout,phrasing=train"], readings["filler=train,phrasing=heldout"]]
    pure = [readings["filler=train,phrasing=train"], readings["filler=heldout,phrasing=heldout"]]
    assert mixed[0] != mixed[1] and all(m != p for m in mixed for p in pure)


def test_distractors_and_a_choice_of_crossings():
    import pytest

    from cortexlab.eval.recall_shift import _crossings, crossing_tasks

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    model = randomise_(tiny_cortex(tokenizer, controller=True))
    model.tokenizer = tokenizer
    digits = RecallTask(tokenizer, "train", call_tokens=48, max_filler_chars=20_000).digit_ids
    with torch.no_grad():
        model.base.get_output_embeddings().weight[digits] *= 50
    readings = recall_shift(model, call_tokens=48, distances=(2,), examples=8, batch_size=4, seed=3,
                            distractors=1.0, crossings=[("heldout", "heldout")])
    task = RecallTask(tokenizer, "heldout", call_tokens=48, distractors=1.0)
    ev = evaluate_recall(model, task, distances=(2,), examples=8, batch_size=4, seed=3, variants=("sidecar",))
    assert readings == {"filler=heldout,phrasing=heldout": {
        d: {k: r[k] for k in ("exact_match", "digit_accuracy")} for d, r in ev["sidecar"].items()}}
    tasks = crossing_tasks(tokenizer, call_tokens=48, distractors=0.5, crossings=[("train", "heldout")])
    assert [(t.split, t.phrasing, t.distractors) for t in tasks.values()] == [("train", "heldout", 0.5)]
    assert _crossings("heldout/heldout,train/train") == (("heldout", "heldout"), ("train", "train"))
    for bad in ([], [("heldout", "test")], [("heldout",)], [5]):
        with pytest.raises(ValueError, match="crossings"):
            crossing_tasks(tokenizer, call_tokens=48, crossings=bad)


def test_by_template_reads_each_template_of_the_phrasing_split_on_its_own():
    from cortexlab.data.recall import FACT_TEMPLATES, QUESTION_TEMPLATES
    from cortexlab.eval.recall_shift import template_tasks

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    tasks = template_tasks(tokenizer, call_tokens=48, crossings=[("train", "heldout")])
    facts, questions = FACT_TEMPLATES["heldout"], QUESTION_TEMPLATES["heldout"]
    assert list(tasks) == ([f"filler=train,fact={t}" for t in facts] +
                           [f"filler=train,question={t}" for t in questions])
    for name, task in tasks.items():   # one held-out template, the other part from the training templates
        one = name.split(",", 1)[1].split("=", 1)[1]
        assert task.split == "train"
        if name.startswith("filler=train,fact="):
            assert task.fact_templates == (one,) and task.question_templates == QUESTION_TEMPLATES["train"]
        else:
            assert task.question_templates == (one,) and task.fact_templates == FACT_TEMPLATES["train"]
        episode = tokenizer.decode(task.batch(2, 2, seed=0).input_ids[0].flatten())
        assert one.split("{key}")[0].strip() in episode
        assert task.describe()["templates"] == task.describe()["phrasing"] == "given"
    model = randomise_(tiny_cortex(tokenizer, controller=True))
    model.tokenizer = tokenizer
    readings = recall_shift(model, call_tokens=48, distances=(1,), examples=4, batch_size=4, seed=3,
                            crossings=[("train", "heldout")], by_template=True)
    name = f"filler=train,fact={facts[0]}"
    ev = evaluate_recall(model, tasks[name], distances=(1,), examples=4, batch_size=4, seed=3, variants=("sidecar",))
    assert set(readings) == set(tasks)
    assert readings[name] == {d: {k: r[k] for k in ("exact_match", "digit_accuracy")} for d, r in ev["sidecar"].items()}


def test_facts_reads_the_given_fact_templates_on_each_filler_split():
    import pytest

    from cortexlab.data.recall import QUESTION_TEMPLATES
    from cortexlab.eval.recall_shift import fact_tasks, main

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    facts = ["Memorise the pass key {key}.", "Memorise the pass key {key} for later."]
    tasks = fact_tasks(tokenizer, facts, call_tokens=48, crossings=[("train", "heldout"), ("train", "train"),
                                                                    ("heldout", "train")])
    assert list(tasks) == [f"filler={f},fact={t}" for f in ("train", "heldout") for t in facts]
    for name, task in tasks.items():
        assert task.split == name[len("filler="):].split(",")[0]
        assert task.fact_templates == (name.split(",fact=")[1],)
        assert task.question_templates == QUESTION_TEMPLATES["train"]
    model = randomise_(tiny_cortex(tokenizer, controller=True))
    model.tokenizer = tokenizer
    readings = recall_shift(model, call_tokens=48, distances=(1,), examples=4, batch_size=4, seed=3,
                            crossings=[("train", "train")], facts=facts[1:])
    name = f"filler=train,fact={facts[1]}"
    ev = evaluate_recall(model, tasks[name], distances=(1,), examples=4, batch_size=4, seed=3, variants=("sidecar",))
    assert readings == {name: {d: {k: r[k] for k in ("exact_match", "digit_accuracy")}
                               for d, r in ev["sidecar"].items()}}
    for bad in (["no key here"], "Memorise the pass key {key}.", []):
        with pytest.raises(ValueError, match="facts"):
            fact_tasks(tokenizer, bad, call_tokens=48, crossings=[("train", "train")])
    with pytest.raises(ValueError, match="by_template"):
        recall_shift(model, call_tokens=48, by_template=True, facts=facts)
    with pytest.raises(SystemExit):   # refused before any model is loaded
        main(["--by-template", "--facts", facts[0]])


def test_with_templates_checks_its_templates():
    import pytest

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    task = RecallTask(tokenizer, "train", call_tokens=48, max_filler_chars=20_000)
    short = task.with_templates(questions=("Key?",))
    assert short.max_tail_tokens < task.max_tail_tokens and short.fact_templates == task.fact_templates
    assert task.templates == "listed"   # the original is untouched
    before = (task.fact_templates, task.question_templates, task.max_fact_tokens, task.max_tail_tokens)
    for bad in ("The pass key is {key}.", [], ["no key here"], ["{key} and {key}"], ["{key} {x}"], ["{key"], [3],
                (t for t in ["The pass key is {key}."]), {"The pass key is {key}."}):
        with pytest.raises(ValueError, match="facts"):
            task.with_templates(facts=bad)
    for bad in ([""], ["What is the {key}?"]):
        with pytest.raises(ValueError, match="questions"):
            task.with_templates(questions=bad)
    with pytest.raises(ValueError, match="call_tokens"):
        task.with_templates(facts=["The pass key is {key}. " + "Remember it well. " * 20])
    assert (task.fact_templates, task.question_templates, task.max_fact_tokens, task.max_tail_tokens) == before
