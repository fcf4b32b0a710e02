"""The recall-across-calls data: layout, labels, determinism, disjoint train / held-out sources."""
import random
import re

import pytest
import torch
from transformers import AutoTokenizer

from cortexlab.data import FACT_TEMPLATES, QUESTION_TEMPLATES, RecallTask, filler_files, filler_token_pool
from cortexlab.data.corpus import stdlib_modules, stdlib_package_modules, stdlib_root
from cortexlab.data.recall import SHINGLE_WORDS, _docstrings, composed_templates
from cortexlab.models import default_model_path

CHARS = 20_000   # a small filler pool keeps the tests fast


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def tasks(tokenizer):
    return {split: RecallTask(tokenizer, split, max_filler_chars=CHARS) for split in ("train", "heldout")}


def test_smollm2_digits_are_single_tokens_after_a_space(tasks):
    task = tasks["train"]
    assert task.digit_ids == list(range(32, 42))
    assert len(task.answer_prefix) == 1 and task.tokenizer.decode(task.answer_prefix) == " "


@pytest.mark.parametrize("num_calls", [1, 2, 5])
def test_layout_and_labels_only_at_the_answer(tasks, num_calls):
    task = tasks["train"]
    batch = task.batch(num_calls, 4, seed=3)
    B, N, T, A, P = 4, num_calls, task.call_tokens, task.key_digits, len(task.answer_prefix)
    assert batch.input_ids.shape == batch.labels.shape == (B, N, T) and batch.answer.shape == (B, A)
    assert batch.distance == N - 1
    answer_mask = torch.zeros(B, N, T, dtype=torch.bool)
    answer_mask[:, -1, T - A - P:] = True                              # the space before the digits, and the digits
    assert (batch.labels[~answer_mask] == -100).all()
    assert torch.equal(batch.labels[:, -1, T - A:], batch.answer)
    assert (batch.labels[:, -1, T - A - P:T - A] == torch.tensor(task.answer_prefix)).all()
    assert torch.equal(batch.input_ids[:, -1, T - A:], batch.answer)   # teacher forcing: the answer is in the input
    for b, key in enumerate(batch.keys):
        assert len(key) == A and key.isdigit()
        assert batch.answer[b].tolist() == [32 + int(c) for c in key]
        texts = [task.tokenizer.decode(batch.input_ids[b, c]) for c in range(N)]
        assert key in texts[0] and "pass key" in texts[0]                # the fact is in call 1
        assert texts[-1].endswith(key) and "pass key" in texts[-1]       # the question ends call N
        assert all("pass key" not in t for t in texts[1:-1])             # filler only in between


def test_conflict_batch_gives_a_second_key_in_call_two_and_asks_for_the_first(tasks):
    task = tasks["heldout"]
    batch, plain = task.conflict_batch(4, 5, seed=2), task.batch(4, 5, seed=2)
    # the same episodes as the plain batch, but call 2 now states another key in a fact phrasing of the split
    assert torch.equal(batch.input_ids[:, [0, 2, 3]], plain.input_ids[:, [0, 2, 3]]) and batch.keys == plain.keys
    assert torch.equal(batch.answer, plain.answer) and torch.equal(batch.labels, plain.labels)
    for b, key in enumerate(batch.keys):
        second = "".join(str(task.digit_ids.index(t)) for t in batch.second[b].tolist())
        assert second != key and len(second) == task.key_digits
        text = task.tokenizer.decode(batch.input_ids[b, 1])
        assert second in text and any(t.format(key=second) in text for t in task.fact_templates)
    assert torch.equal(batch.to("cpu").second, batch.second)
    assert torch.equal(task.conflict_batch(4, 5, seed=2).input_ids, batch.input_ids)
    with pytest.raises(ValueError, match="num_calls"):
        task.conflict_batch(2, 5, seed=2)


def test_deterministic_and_seeded_per_split(tasks, tokenizer):
    a = tasks["train"].batch(3, 4, seed=7)
    again = RecallTask(tokenizer, "train", max_filler_chars=CHARS).batch(3, 4, seed=7)
    assert torch.equal(a.input_ids, again.input_ids) and a.keys == again.keys
    assert not torch.equal(a.input_ids, tasks["train"].batch(3, 4, seed=8).input_ids)
    assert not torch.equal(a.input_ids, tasks["heldout"].batch(3, 4, seed=7).input_ids)
    assert torch.equal(tasks["train"].filler_calls(5, seed=1), tasks["train"].filler_calls(5, seed=1))


def test_train_and_heldout_sources_and_phrasings_are_disjoint(tasks, tokenizer):
    train, held = filler_files("train"), filler_files("heldout")
    assert train and held and not {p.name for p in train} & {p.name for p in held}
    assert not set(tasks["train"].source_files) & set(tasks["heldout"].source_files)
    assert set(tasks["heldout"].source_files) <= {p.name for p in held}
    assert not set(FACT_TEMPLATES["train"]) & set(FACT_TEMPLATES["heldout"])
    assert not set(QUESTION_TEMPLATES["train"]) & set(QUESTION_TEMPLATES["heldout"])
    pool, files = filler_token_pool(tokenizer, "heldout", CHARS)
    assert pool.dtype == torch.int64 and len(pool) > 1000 and files == tasks["heldout"].source_files


def test_phrasing_takes_the_templates_of_another_split(tasks, tokenizer):
    """phrasing="train" on the held-out split: held-out filler, the training templates."""
    crossed = RecallTask(tokenizer, "heldout", max_filler_chars=CHARS, phrasing="train")
    assert crossed.source_files == tasks["heldout"].source_files and crossed.phrasing == "train"
    assert crossed.fact_templates == FACT_TEMPLATES["train"]
    assert crossed.question_templates == QUESTION_TEMPLATES["train"]
    assert crossed.describe()["phrasing"] == "train" and tasks["heldout"].describe()["phrasing"] == "heldout"
    cross = crossed.batch(3, 8, seed=5)
    facts = [tokenizer.decode(call) for call in cross.input_ids[:, 0]]
    assert all(any(t.format(key=key) in text for t in FACT_TEMPLATES["train"]) for text, key in zip(facts, cross.keys))
    windows = tasks["heldout"].pool.unfold(0, crossed.call_tokens, 1)   # every run of T held-out filler tokens
    for call in cross.input_ids[:, 1]:   # the call between fact and question: a run of held-out filler
        assert (windows == call).all(-1).any()
    with pytest.raises(ValueError, match="phrasing"):
        RecallTask(tokenizer, "heldout", max_filler_chars=CHARS, phrasing="test")


def test_composed_templates_are_many_well_formed_training_phrasings(tokenizer):
    facts, questions = composed_templates()
    assert len(set(facts)) == len(facts) == 448 and len(set(questions)) == len(questions) == 66
    assert set(FACT_TEMPLATES["train"]) & set(facts) and set(QUESTION_TEMPLATES["train"]) & set(questions)
    held = FACT_TEMPLATES["heldout"] + QUESTION_TEMPLATES["heldout"]
    assert not any(h.replace(" {key}", "") in t.replace(" {key}", "") for h in held for t in facts + questions)
    for fact in facts:
        assert fact.count("{key}") == 1 and fact.endswith(".")
    for text in facts + questions:   # each sentence starts with a capital
        assert all(sentence[0].isupper() for sentence in re.split(r"(?<=[.?]) ", text))
    task = RecallTask(tokenizer, "train", max_filler_chars=CHARS, templates="composed")
    assert task.fact_templates == facts and task.describe()["templates"] == "composed"
    batch = task.batch(2, 16, seed=4)
    for b, key in enumerate(batch.keys):
        assert any(t.format(key=key) in tokenizer.decode(batch.input_ids[b, 0]) for t in facts)
        assert any(tokenizer.decode(batch.input_ids[b, 1]).endswith(q + " " + key) for q in questions)
    with pytest.raises(ValueError, match="templates"):
        RecallTask(tokenizer, "heldout", max_filler_chars=CHARS, templates="composed")   # held-out stays listed
    with pytest.raises(ValueError, match="templates"):
        RecallTask(tokenizer, "train", max_filler_chars=CHARS, templates="random")
    with pytest.raises(ValueError, match="call_tokens"):   # the longest composed fact takes 25 tokens
        RecallTask(tokenizer, "train", max_filler_chars=CHARS, templates="composed", call_tokens=24)


def test_direct_templates_add_facts_with_the_key_right_after_the_noun(tokenizer):
    from cortexlab.data.recall import DIRECT_FACT_TEMPLATES

    assert all(t.count("pass key {key}") == 1 for t in DIRECT_FACT_TEMPLATES)
    assert not any("pass key {key}" in t for t in FACT_TEMPLATES["train"])   # what the listed facts lack
    assert not set(DIRECT_FACT_TEMPLATES) & set(FACT_TEMPLATES["heldout"])
    task = RecallTask(tokenizer, "train", max_filler_chars=CHARS, templates="listed+direct")
    assert task.fact_templates == FACT_TEMPLATES["train"] + DIRECT_FACT_TEMPLATES
    assert task.question_templates == QUESTION_TEMPLATES["train"]
    batch = task.batch(2, 64, seed=0)
    drawn = {t for b, key in enumerate(batch.keys) for t in DIRECT_FACT_TEMPLATES
             if t.format(key=key) in tokenizer.decode(batch.input_ids[b, 0])}
    assert drawn == set(DIRECT_FACT_TEMPLATES)
    with pytest.raises(ValueError, match="templates"):
        RecallTask(tokenizer, "heldout", max_filler_chars=CHARS, templates="listed+direct")


def test_composed_direct_templates_vary_what_follows_the_key(tokenizer):
    from cortexlab.data.recall import DIRECT_FACT_PARTS, DIRECT_FACT_TEMPLATES, composed_direct_templates

    facts = composed_direct_templates()
    assert len(set(facts)) == len(DIRECT_FACT_PARTS[0]) * len(DIRECT_FACT_PARTS[1]) == 72
    assert set(DIRECT_FACT_TEMPLATES) <= set(facts)
    assert all(t.count("pass key {key}") == 1 for t in facts)
    endings = {t.split("{key}")[1] for t in facts}
    assert len(endings) == 12 and not any(e.startswith(" for") for e in endings)   # the held-out ending stays unseen
    assert not set(facts) & set(FACT_TEMPLATES["heldout"])
    task = RecallTask(tokenizer, "train", max_filler_chars=CHARS, templates="listed+direct-composed")
    assert task.fact_templates == FACT_TEMPLATES["train"] + facts
    batch = task.batch(2, 64, seed=0)
    text = [tokenizer.decode(batch.input_ids[b, 0]) for b in range(64)]
    drawn = {t.split("{key}")[1] for b, key in enumerate(batch.keys) for t in facts if t.format(key=key) in text[b]}
    assert len(drawn) >= 8   # many endings, not only the four direct facts'
    with pytest.raises(ValueError, match="templates"):
        RecallTask(tokenizer, "heldout", max_filler_chars=CHARS, templates="listed+direct-composed")


def test_bridged_direct_templates_vary_the_words_before_the_key(tokenizer):
    from cortexlab.data.recall import DIRECT_FACT_BRIDGES, bridged_direct_templates, composed_direct_templates

    facts = bridged_direct_templates()
    assert len(set(facts)) == len(composed_direct_templates()) == 72
    parts = [(t.split(" the pass key")[0], t.split(" the pass key")[1].split(" {key}")[0], t.split("{key}")[1])
             for t in facts]
    assert [f"{verb} the pass key {{key}}{ending}" for verb, _, ending in parts] == list(composed_direct_templates())
    for verb in {v for v, _, _ in parts}:   # every verb meets every bridge, every ending six of the seven
        assert {b for v, b, _ in parts if v == verb} == set(DIRECT_FACT_BRIDGES)
    for ending in {e for _, _, e in parts}:
        assert len({b for _, b, e in parts if e == ending}) == 6
    assert not any(b.strip(" :") == "in memory" for b in DIRECT_FACT_BRIDGES)   # the held-out bridge stays unseen
    assert not set(facts) & set(FACT_TEMPLATES["heldout"])
    task = RecallTask(tokenizer, "train", max_filler_chars=CHARS, templates="listed+direct-bridged")
    assert task.fact_templates == FACT_TEMPLATES["train"] + facts
    batch = task.batch(2, 64, seed=0)
    text = [tokenizer.decode(batch.input_ids[b, 0]) for b in range(64)]
    drawn = {t.split(" {key}")[0].split("pass key")[1] for b, key in enumerate(batch.keys) for t in facts
             if t.format(key=key) in text[b]}
    assert len(drawn) >= 5   # many bridges drawn, not only the bare "pass key {key}"
    with pytest.raises(ValueError, match="templates"):
        RecallTask(tokenizer, "heldout", max_filler_chars=CHARS, templates="listed+direct-bridged")


def test_package_filler_widens_training_text_without_heldout_overlap(tokenizer, tasks):
    root = stdlib_root()
    packages = stdlib_package_modules()
    assert len(packages) > 100 and not {p.parent for p in packages} & {root}
    parts = {part for p in packages for part in p.relative_to(root).parts}
    assert not {"test", "tests", "idle_test", "site-packages"} & parts
    wide = RecallTask(tokenizer, "train", filler="stdlib+packages", max_filler_chars=3 * CHARS)
    assert any("/" in f for f in wide.source_files) and wide.describe()["filler"].endswith("package modules")
    with pytest.raises(ValueError, match="filler"):
        RecallTask(tokenizer, "heldout", filler="stdlib+packages")
    with pytest.raises(ValueError, match="split"):
        filler_token_pool(tokenizer, "heldout", packages=True)
    with pytest.raises(ValueError, match="packages"):
        filler_token_pool(tokenizer, "train", packages="yes")


def test_package_docstrings_sharing_a_run_of_heldout_words_are_dropped(tmp_path, monkeypatch):
    import cortexlab.data.recall as recall_data

    words = next(d for p in stdlib_modules("heldout") for d in _docstrings(p)
                 if len(d.split()) >= 12 and not set(d) & set("\"'\\")).split()
    pad = "Some words of padding that make this docstring long enough to be kept as filler text here."

    def shares(n):   # a docstring with a run of n words of held-out text
        return " ".join(["Unrelated opening"] + words[:n] + [pad])

    (tmp_path / "pkg").mkdir()
    module = f'"""{shares(SHINGLE_WORDS)}"""\n\ndef f():\n    """{shares(SHINGLE_WORDS - 1)}"""\n'
    (tmp_path / "pkg" / "mod.py").write_text(module)
    monkeypatch.setattr(recall_data, "stdlib_root", lambda: tmp_path)
    monkeypatch.setattr(recall_data, "stdlib_package_modules", lambda: [tmp_path / "pkg" / "mod.py"])
    assert recall_data._package_docstrings() == [("pkg/mod.py", [shares(SHINGLE_WORDS - 1)])]


def test_the_plain_training_pool_is_unchanged_by_the_package_option(tokenizer):
    """Runs before the option existed used this pool: the training modules in the order seeded by the split's name."""
    plain, files = filler_token_pool(tokenizer, "train", 3 * CHARS)
    order = filler_files("train")
    random.Random("cortexlab.recall.files/train").shuffle(order)
    ids, used, chars = [], [], 0
    for path in order:
        docs = _docstrings(path)
        if docs:
            ids += [i for d in docs for i in tokenizer.encode(" " + d, add_special_tokens=False)]
            used.append(path.name)
            chars += sum(map(len, docs))
            if chars >= 3 * CHARS:
                break
    assert plain.tolist() == ids and files == sorted(used)


def test_repeat_filler_is_the_classic_passkey_text(tokenizer):
    task = RecallTask(tokenizer, "heldout", filler="repeat", call_tokens=32)
    batch = task.batch(3, 2, seed=0)
    assert "The grass is green." in tokenizer.decode(batch.input_ids[0, 1]) or \
        "The sky is blue." in tokenizer.decode(batch.input_ids[0, 1])
    assert task.source_files == [] and batch.input_ids.shape == (2, 3, 32)
    with pytest.raises(ValueError, match="filler"):
        RecallTask(tokenizer, "train", filler="lorem")


def test_bad_arguments_raise_value_error(tokenizer, tasks):
    with pytest.raises(ValueError, match="split"):
        RecallTask(tokenizer, "test")
    with pytest.raises(ValueError, match="call_tokens"):
        RecallTask(tokenizer, "train", call_tokens=16, max_filler_chars=CHARS)
    with pytest.raises(ValueError, match="num_calls"):
        tasks["train"].batch(0, 2, seed=0)
    with pytest.raises(ValueError, match="seed"):
        tasks["train"].batch(2, 2, seed=1.5)


def test_fact_at_places_every_fact_at_that_token(tasks):
    task = tasks["train"]
    batch = task.batch(3, 4, seed=5, fact_at=7)
    for b in range(4):
        fact_tokens = [t for t in task.fact_templates
                       if task._encode(t.format(key=batch.keys[b])) == batch.input_ids[b, 0, 7:7 + len(
                           task._encode(t.format(key=batch.keys[b])))].tolist()]
        assert fact_tokens, f"episode {b}: no fact starts at token 7"
    assert batch.input_ids.shape == (4, 3, task.call_tokens)
    room = task.call_tokens - task.max_fact_tokens
    for bad in (-1, room + 1, 2.0):
        with pytest.raises(ValueError, match="fact_at"):
            task.batch(3, 2, seed=0, fact_at=bad)
    with pytest.raises(ValueError, match="fact_at"):
        task.batch(1, 2, seed=0, fact_at=0)


def test_key_starts_finds_the_first_digit_of_each_key_in_call_one(tasks):
    task = tasks["train"]
    batch = task.batch(3, 6, seed=11)
    starts = task.key_starts(batch)
    for e, start in enumerate(starts):
        assert batch.input_ids[e, 0, start:start + task.key_digits].tolist() == batch.answer[e].tolist()
        assert batch.input_ids[e, 0, start - 1].item() in task.answer_prefix
    twice = batch.input_ids.clone()       # the key stated again at the end of episode 2's first call
    twice[2, 0, -1 - task.key_digits:] = torch.tensor(task.answer_prefix + batch.answer[2].tolist())
    copied = type(batch)(twice, batch.labels, batch.answer, batch.keys, batch.split, batch.seed)
    with pytest.raises(ValueError, match="episode 2: the key appears 2 times"):
        task.key_starts(copied)


def test_distractors_put_other_numbers_stated_like_facts_into_the_filler(tokenizer):
    from conftest import distractor_pattern
    from cortexlab.data.recall import DISTRACTOR_SPACING, DISTRACTOR_TEMPLATES

    plain = RecallTask(tokenizer, "train", call_tokens=128, max_filler_chars=CHARS)
    always = RecallTask(tokenizer, "train", call_tokens=128, max_filler_chars=CHARS, distractors=1.0)
    ids = plain.batch(4, 4, seed=2).input_ids   # p = 0: the episodes the code before distractors drew (checksums)
    assert int((ids * torch.arange(ids.numel()).view_as(ids)).sum()) == 7690564956
    assert int(plain.filler_calls(3, seed=0).sum()) == 1603002
    assert int(always.filler_calls(3, seed=0).sum()) == 1365643   # p = 1, all kinds: as drawn before kinds existed
    train, heldout = (distractor_pattern(s) for s in ("train", "heldout"))
    for call in always.filler_calls(8, seed=0):
        text = tokenizer.decode(call)
        assert len(train.findall(text)) == 128 // DISTRACTOR_SPACING and not heldout.search(text)
        assert "pass key" not in text
    batch = always.batch(4, 8, seed=1)   # the answer is still the pass key, written at the end of the last call
    assert all(tokenizer.decode(batch.input_ids[b, -1, -5:]) == key for b, key in enumerate(batch.keys))
    middle = [tokenizer.decode(call) for episode in batch.input_ids[:, 1:-1] for call in episode]
    assert all(train.search(text) for text in middle)
    assert all(t.count("pass key") == 0 for t in middle)
    held = RecallTask(tokenizer, "heldout", call_tokens=128, max_filler_chars=CHARS, distractors=1.0)
    text = tokenizer.decode(held.filler_calls(1, seed=0)[0])
    assert heldout.search(text) and not train.search(text)
    half = RecallTask(tokenizer, "train", call_tokens=128, max_filler_chars=CHARS, distractors=0.5)
    share = sum(bool(train.search(tokenizer.decode(c))) for c in half.filler_calls(200, seed=0)) / 200
    assert 0.38 < share < 0.62
    assert held.describe()["distractor_templates"] == list(DISTRACTOR_TEMPLATES["heldout"])


def test_plain_distractors_leave_out_the_ones_framed_like_facts(tokenizer):
    import re

    from conftest import distractor_pattern
    from cortexlab.data.recall import FACT_FRAMED_DISTRACTORS, distractor_templates

    assert distractor_templates("train", "plain") == (
        "If no timeout is given then {n} is used.", "Error code {n} means that the file was not found.",
        "The default buffer size is {n} bytes.", ">>> x = {n}", ">>> len(data) {n}", "Version {n} added this function.")
    assert distractor_templates("heldout", "plain") == (
        "The server listens on port {n} by default.", ">>> int('{n}') {n}", "Bug {n} was fixed in this release.")
    assert FACT_FRAMED_DISTRACTORS <= set(distractor_templates("train")) | set(distractor_templates("heldout"))
    framed = re.compile("|".join(re.escape(t).replace(re.escape("{n}"), r"\d+") for t in FACT_FRAMED_DISTRACTORS))
    plain = RecallTask(tokenizer, "train", call_tokens=128, max_filler_chars=CHARS, distractors=1.0,
                       distractor_kind="plain")
    texts = [tokenizer.decode(call) for call in plain.filler_calls(40, seed=0)]
    assert all(distractor_pattern("train", "plain").search(t) for t in texts)
    assert not any(framed.search(t) for t in texts)
    every = RecallTask(tokenizer, "train", call_tokens=128, max_filler_chars=CHARS, distractors=1.0)
    assert any(framed.search(tokenizer.decode(c)) for c in every.filler_calls(40, seed=0))   # "all" has them
    copied = every.with_distractors(1.0, "plain")   # the copy draws what the plain task draws
    assert torch.equal(copied.filler_calls(5, seed=3), plain.filler_calls(5, seed=3))
    assert copied.with_distractors(0.5).distractor_kind == "plain" and every.distractor_kind == "all"
    assert plain.describe()["distractor_kind"] == "plain"
    with pytest.raises(ValueError, match="distractor_kind"):
        RecallTask(tokenizer, "train", max_filler_chars=CHARS, distractors=0.2, distractor_kind="facts")
    with pytest.raises(ValueError, match="distractor_kind"):
        every.with_distractors(0.2, "facts")


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.2", None])
def test_distractors_outside_zero_one_are_refused(tokenizer, bad):
    with pytest.raises(ValueError, match="distractors"):
        RecallTask(tokenizer, "train", max_filler_chars=CHARS, distractors=bad)
