"""cortexlab.data.mqar: Zoology's MQAR layout, power-law query gaps, seeding and the settings it refuses."""
import numpy as np
import pytest
import torch

import cortexlab.data.mqar as mqar
from cortexlab.data.mqar import IGNORE, MQARTask, chance_accuracy, split_seed


def check_structure(task: MQARTask, inputs: torch.Tensor, labels: torch.Tensor) -> None:
    """Every property of the layout in the module docstring, row by row."""
    V, L, P, half = task.vocab_size, task.seq_len, task.num_pairs, task.vocab_size // 2
    assert inputs.shape == labels.shape and inputs.shape[1] == L and inputs.dtype == labels.dtype == torch.int64
    assert ((inputs >= 0) & (inputs < V)).all()
    for x, y in zip(inputs.tolist(), labels.tolist()):
        keys, values = x[0:2 * P:2], x[1:2 * P:2]
        assert len(set(keys)) == P and all(0 <= k < half for k in keys)          # distinct, first half
        assert len(set(values)) == P and all(half <= v < V for v in values)      # distinct, second half
        binding = dict(zip(keys, values))
        answers = [t for t, label in enumerate(y) if label != IGNORE]
        assert len(answers) == P                                                  # -100 everywhere else
        assert all(t >= 2 * P and (t - 2 * P) % 2 == 0 for t in answers)         # query slots only
        assert sorted(x[t] for t in answers) == sorted(keys)                     # every key queried once
        assert all(y[t] == binding[x[t]] for t in answers)                       # the value bound to that key


def test_layout_follows_zoology():
    task = MQARTask(vocab_size=64, seq_len=64, num_pairs=8)
    inputs, labels = task.sample(300, seed=3)
    check_structure(task, inputs, labels)
    # with labels aligned to inputs, the answer at t is the token that followed the key in the block
    row, t = 0, int((labels[0] != IGNORE).nonzero()[0])
    j = inputs[0, :16].tolist().index(int(inputs[row, t]))
    assert labels[row, t] == inputs[row, j + 1]


def test_conflicts_rebind_keys_and_the_queries_ask_for_the_first_binding():
    task = MQARTask(vocab_size=64, seq_len=64, num_pairs=8, conflicts=3)
    inputs, labels = task.sample(200, seed=5)
    second = task.conflicting_values(inputs, labels)
    P, R = 8, 3
    for x, y, s in zip(inputs.tolist(), labels.tolist(), second.tolist()):
        keys, values = x[0:2 * P:2], x[1:2 * P:2]
        again, new_values = x[2 * P:2 * (P + R):2], x[2 * P + 1:2 * (P + R):2]
        assert len(set(again)) == R and set(again) <= set(keys)                  # R of the keys, once each
        assert len(set(values + new_values)) == P + R                            # values never reused
        answers = [t for t, label in enumerate(y) if label != IGNORE]
        assert len(answers) == P and all(t >= 2 * (P + R) for t in answers)
        assert all(y[t] == dict(zip(keys, values))[x[t]] for t in answers)       # the first binding
        assert [t for t, v in enumerate(s) if v != IGNORE] == [t for t in answers if x[t] in again]
        assert all(s[t] == dict(zip(again, new_values))[x[t]] for t in answers if x[t] in again)
    # without conflicts the generator draws exactly what it drew before they existed (taken from that revision),
    # and nothing is conflicted
    plain = MQARTask(vocab_size=64, seq_len=64, num_pairs=8)
    inputs, labels = plain.sample(3, seed=5)
    check_structure(plain, inputs, labels)
    assert inputs[:, :12].tolist() == [[8, 48, 22, 37, 18, 52, 12, 39, 25, 38, 5, 42],
                                       [0, 59, 10, 61, 5, 41, 25, 38, 29, 44, 28, 34],
                                       [30, 47, 21, 46, 0, 55, 5, 49, 26, 53, 22, 52]]
    assert labels.sum(1).tolist() == [-5243, -5237, -5208]
    assert (plain.conflicting_values(inputs, labels) == IGNORE).all()
    with pytest.raises(ValueError, match="labels"):
        task.conflicting_values(inputs, labels[:, :10])


def test_fillers_are_uniform_over_the_whole_vocabulary():
    task = MQARTask(vocab_size=32, seq_len=128, num_pairs=4)
    inputs, labels = task.sample(400, seed=0)
    filler = inputs[:, 2 * task.num_pairs:][labels[:, 2 * task.num_pairs:] == IGNORE]
    counts = torch.bincount(filler, minlength=32).double()
    expected = filler.numel() / 32
    assert counts.min() > 0.85 * expected and counts.max() < 1.15 * expected   # both halves, no favourites


def gap_occupancy_numpy(task: MQARTask, n: int, seed: int) -> np.ndarray:
    """Zoology's sampler: numpy's sequential choice without replacement, slot occupancy frequencies."""
    rng = np.random.default_rng(seed)
    p = task.gap_probs().numpy()
    hits = np.zeros(task.query_slots)
    for _ in range(n):
        hits[rng.choice(task.query_slots, size=task.num_pairs, replace=False, p=p)] += 1
    return hits / n


def gap_occupancy(task: MQARTask, n: int, seed: int) -> np.ndarray:
    _, labels = task.sample(n, seed)
    answers = labels[:, 2 * task.num_pairs::2] != IGNORE          # [n, S]: slot i holds a query
    return answers.double().mean(0).numpy()


def test_gaps_follow_the_power_law():
    task = MQARTask(vocab_size=64, seq_len=64, num_pairs=6)
    p = task.gap_probs()
    assert p.sum().item() == pytest.approx(1.0)
    assert p[0] / p[-1] == pytest.approx(task.query_slots ** (1 - task.power_a))   # p_i ~ (i+1)^(a-1)
    n = 4000
    ours, reference = gap_occupancy(task, n, 0), gap_occupancy_numpy(task, n, 0)
    se = np.sqrt(reference * (1 - reference) / n) * np.sqrt(2)
    assert np.all(np.abs(ours - reference) < 5 * se + 1e-3)     # the same distribution as sequential sampling
    assert ours[:3].mean() > 3 * ours[-3:].mean()                # near queries far more likely than far ones
    uniform = MQARTask(vocab_size=64, seq_len=64, num_pairs=6, power_a=1.0)
    occupancy = gap_occupancy(uniform, n, 1)
    assert np.abs(occupancy - 6 / uniform.query_slots).max() < 0.05


def test_seeded_and_train_test_disjoint():
    task = MQARTask(vocab_size=64, seq_len=32, num_pairs=4)
    a, b = task.sample(50, seed=7), task.sample(50, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], task.sample(50, seed=8)[0])
    train = {split_seed("train", s, i) for s in range(20) for i in range(200)}
    test = {split_seed("test", s, i) for s in range(20) for i in range(200)}
    assert len(train) == len(test) == 4000 and not train & test
    train_rows = {tuple(r) for i in range(5) for r in task.sample(64, split_seed("train", 0, i))[0].tolist()}
    test_rows = {tuple(r) for r in task.sample(256, split_seed("test", 0))[0].tolist()}
    assert not train_rows & test_rows


def test_generation_in_row_blocks(monkeypatch):
    monkeypatch.setattr(mqar, "_ROW_BLOCK", 3)
    task = MQARTask(vocab_size=16, seq_len=16, num_pairs=4)   # the tightest fit: L = 4P, P = V/2 keys
    inputs, labels = task.sample(10, seed=1)
    check_structure(task, inputs, labels)
    assert len({tuple(r) for r in inputs.tolist()}) == 10


def test_chance_level():
    assert chance_accuracy(MQARTask(vocab_size=512)) == 1 / 256
    assert chance_accuracy(MQARTask(vocab_size=65, seq_len=64)) == 1 / 33


@pytest.mark.parametrize("kwargs, name", [
    ({"seq_len": 60, "num_pairs": 16}, "seq_len"),          # 2P + P query slots need L >= 4P
    ({"vocab_size": 30, "num_pairs": 16, "seq_len": 64}, "vocab_size"),
    ({"power_a": 0.0}, "power_a"),
    ({"power_a": 1.5}, "power_a"),
    ({"num_pairs": 0}, "num_pairs"),
    ({"seq_len": 2.5}, "seq_len"),
    ({"num_pairs": 4, "conflicts": 5, "seq_len": 64}, "conflicts"),
    ({"num_pairs": 4, "conflicts": -1, "seq_len": 64}, "conflicts"),
    ({"num_pairs": 16, "conflicts": 8, "seq_len": 64}, "seq_len"),        # 2(P+R) + P slots need L >= 64 + 32
    ({"vocab_size": 40, "num_pairs": 16, "conflicts": 8, "seq_len": 128}, "vocab_size"),   # P + R values
])
def test_impossible_settings_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MQARTask(**kwargs)


def test_bad_sample_arguments_raise():
    task = MQARTask(vocab_size=64, seq_len=32, num_pairs=4)
    with pytest.raises(ValueError, match="n must"):
        task.sample(0, seed=0)
    with pytest.raises(ValueError, match="seed must"):
        task.sample(4, seed=-1)
    with pytest.raises(ValueError, match="split must"):
        split_seed("validation", 0)
    with pytest.raises(ValueError, match="index must"):
        split_seed("train", 0, -2)
