"""cortexlab.eval.repetition and cortexlab.data.prompts: hand-computed metrics, reference-equal decoding."""
import math

import pytest
import torch

from cortexlab.data.prompts import PROMPT_SETS, load_prompts, prompt_token_ids
from cortexlab.eval.repetition import (
    continuation_nll,
    distinct_n,
    greedy_continuations,
    greedy_repetition,
    repeated_ngram_rate,
)
from cortexlab.models import tiny_model
from cortexlab.neuro.hooks import InferenceHookConfig, InferenceHookPipeline

CYCLE = [1, 2, 3, 1, 2, 3, 1, 2]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_hidden_layers=3)


@pytest.fixture(scope="module")
def prompts():
    return [prompt_token_ids(p.text) for p in load_prompts()[:3]]


def test_repeated_ngram_rate_by_hand():
    # 4-grams of CYCLE: 1231, 2312, 3123, 1231 (seen), 2312 (seen) -> 2 of 5
    assert repeated_ngram_rate(CYCLE, 4) == pytest.approx(2 / 5)
    # bigrams: 12, 23, 31, 12, 23, 31, 12 -> the last four recur
    assert repeated_ngram_rate(CYCLE, 2) == pytest.approx(4 / 7)
    assert repeated_ngram_rate([5, 5, 5, 5, 5]) == pytest.approx(1 / 2)
    assert repeated_ngram_rate(list(range(10))) == 0.0
    assert repeated_ngram_rate(torch.tensor(CYCLE), 4) == pytest.approx(2 / 5)


def test_distinct_n_by_hand():
    assert distinct_n(CYCLE, 1) == pytest.approx(3 / 8)
    assert distinct_n(CYCLE, 2) == pytest.approx(3 / 7)
    assert distinct_n(CYCLE, 4) == pytest.approx(3 / 5)
    assert distinct_n(list(range(6)), 3) == 1.0


def test_rate_is_one_minus_distinct_and_short_texts_are_nan():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        tokens = torch.randint(0, 4, (40,), generator=gen).tolist()
        for n in (1, 2, 3, 4):
            assert repeated_ngram_rate(tokens, n) == pytest.approx(1 - distinct_n(tokens, n))
    assert math.isnan(repeated_ngram_rate([1, 2, 3], 4)) and math.isnan(distinct_n([], 1))


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="n must be a positive int"):
        repeated_ngram_rate(CYCLE, 0)
    with pytest.raises(ValueError, match="n must be a positive int"):
        distinct_n(CYCLE, 1.5)
    with pytest.raises(TypeError, match="tokens must be a sequence"):
        distinct_n("abc", 1)
    with pytest.raises(ValueError, match="tokens must be 1-D"):
        repeated_ngram_rate(torch.zeros(2, 3, dtype=torch.long))


def test_shipped_prompts_are_fixed_and_varied():
    assert PROMPT_SETS == ("repetition_prompts",)
    prompts = load_prompts()
    assert 16 <= len(prompts) <= 24
    assert len({p.id for p in prompts}) == len(prompts)
    assert {p.kind for p in prompts} == {"story", "explanation", "list", "code"}
    assert prompt_token_ids("hé") == list("hé".encode())
    with pytest.raises(ValueError, match="name must be one of"):
        load_prompts("nope")
    with pytest.raises(ValueError, match="text must be a non-empty str"):
        prompt_token_ids("")


def test_prompt_token_ids_use_the_chat_template():
    class Tok:  # the two calls prompt_token_ids makes, recorded
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt is True
            return f"<user>{messages[0]['content']}</user><assistant>"

        def __call__(self, text, add_special_tokens):
            assert add_special_tokens is False
            return {"input_ids": [ord(c) for c in text]}

    assert prompt_token_ids("hi", Tok()) == [ord(c) for c in "<user>hi</user><assistant>"]
    assert prompt_token_ids("hi", Tok(), chat=False) == [ord("h"), ord("i")]


def one(model, prompt, max_new_tokens, **kw):
    return greedy_continuations(model, [prompt], max_new_tokens, **kw)[0]


def test_greedy_continuation_equals_generate(model, prompts):
    out = one(model, prompts[0], 10)
    ref = model.generate(torch.tensor([prompts[0]]), max_new_tokens=10, do_sample=False, min_new_tokens=10,
                         eos_token_id=None, pad_token_id=0)
    assert out == ref[0, len(prompts[0]):].tolist()
    stop = one(model, prompts[0], 10, eos_token_id=out[2])
    assert stop == out[:out.index(out[2]) + 1]  # stops right after the first EOS, which it keeps
    with pytest.raises(ValueError, match="max_new_tokens"):
        one(model, prompts[0], 0)
    with pytest.raises(ValueError, match="prompt must hold"):
        one(model, [], 3)
    with pytest.raises(ValueError, match="prompts must not be empty"):
        greedy_continuations(model, [], 3)


@pytest.mark.parametrize("keep_first", [1, 3])
def test_a_padded_batch_decodes_each_prompt_as_alone(model, prompts, keep_first):
    batch = [prompts[0], prompts[1][:7], prompts[2][:20]]        # three lengths: padding in two rows
    alone = [one(model, p, 12) for p in batch]
    assert greedy_continuations(model, batch, 12, keep_first=keep_first) == alone
    eos = alone[1][3]                                             # one row ends early, the others go on
    ended = greedy_continuations(model, batch, 12, eos_token_id=eos, keep_first=keep_first)
    assert ended == [one(model, p, 12, eos_token_id=eos) for p in batch]
    assert len(ended[1]) < 12


def test_continuation_nll_is_the_models_log_likelihood(model, prompts):
    p, c = prompts[0], [10, 20, 30, 40]
    nll = continuation_nll(model, p, c)
    with torch.no_grad():
        logp = model(torch.tensor([p + c])).logits[0].double().log_softmax(-1)
    expected = torch.stack([-logp[len(p) - 1 + i, t] for i, t in enumerate(c)])
    torch.testing.assert_close(nll, expected)
    assert continuation_nll(model, p, []).numel() == 0


def test_greedy_repetition_reports_each_prompt_and_the_pooled_guard(model, prompts):
    res = greedy_repetition(model, prompts, 16, distinct=(1, 2))
    assert len(res["per_prompt"]) == 3 and res["n"] == 4
    for p, row in zip(prompts, res["per_prompt"]):
        cont = row["continuation"]
        assert cont == one(model, p, 16) and row["new_tokens"] == 16 and not row["eos"]
        assert row["repeated_ngram_rate"] == repeated_ngram_rate(cont, 4)
        assert row["distinct_2"] == distinct_n(cont, 2)
        assert row["guard_perplexity"] == pytest.approx(math.exp(continuation_nll(model, p, cont).mean()))
    mean = res["mean"]
    assert mean["distinct_1"] == pytest.approx(sum(r["distinct_1"] for r in res["per_prompt"]) / 3)
    assert mean["new_tokens"] == 16 and mean["eos_fraction"] == 0
    pooled = sum(r["guard_nll_sum"] for r in res["per_prompt"]) / 48
    assert res["guard_perplexity"] == pytest.approx(math.exp(pooled))


def test_eos_ends_a_continuation_and_is_left_out_of_the_metrics(model, prompts):
    first = one(model, prompts[1], 16)
    eos = first[5]
    res = greedy_repetition(model, prompts[1:2], 16, eos_token_id=eos)
    row = res["per_prompt"][0]
    cut = first.index(eos)
    assert row["eos"] and row["continuation"] == first[:cut + 1] and row["new_tokens"] == cut + 1
    assert row["distinct_1"] == pytest.approx(distinct_n(first[:cut], 1))   # EOS excluded
    nll = continuation_nll(model, prompts[1], first[:cut + 1])                # guard: EOS included
    assert row["guard_nll_sum"] == pytest.approx(float(nll.sum()))


def test_disabled_pipeline_decodes_like_the_model(model, prompts):
    base = greedy_repetition(model, prompts, 12)
    pipe = InferenceHookPipeline(InferenceHookConfig())
    hooked = greedy_repetition(model, prompts, 12, pipeline=pipe, batch_size=3)
    assert [r["continuation"] for r in hooked["per_prompt"]] == [r["continuation"] for r in base["per_prompt"]]
    assert not pipe.is_attached


def test_habituation_pipeline_acts_resets_per_prompt_and_scores_unhooked(model, prompts):
    attn = model.config._attn_implementation
    base = greedy_repetition(model, prompts, 24)
    pipe = InferenceHookPipeline(InferenceHookConfig(enable_habituation=True, enable_hebbian=True,
                                                     habituation_rate=2.0, hebbian_eta=5.0))
    forward = greedy_repetition(model, prompts, 24, pipeline=pipe)
    backward = greedy_repetition(model, prompts[::-1], 24, pipeline=pipe)
    conts = [r["continuation"] for r in forward["per_prompt"]]
    assert conts != [r["continuation"] for r in base["per_prompt"]]                  # the hooks act
    assert conts == [r["continuation"] for r in backward["per_prompt"]][::-1]        # reset between prompts
    assert not pipe.is_attached and model.config._attn_implementation == attn
    for p, row in zip(prompts, forward["per_prompt"]):   # the guard is the unhooked model's likelihood
        assert row["guard_nll_sum"] == pytest.approx(float(continuation_nll(model, p, row["continuation"]).sum()))
    with pytest.raises(ValueError, match="batch_size must be 1 with the Hebbian or temperature"):
        greedy_repetition(model, prompts, 4, pipeline=pipe, batch_size=2)


@pytest.mark.parametrize("sinks", [1, 2])
def test_habituation_in_a_padded_batch_equals_one_prompt_at_a_time(model, prompts, sinks):
    batch = [prompts[0], prompts[1][:7], prompts[2][:20]]
    pipe = InferenceHookPipeline(InferenceHookConfig(enable_habituation=True, enable_voting=True,
                                                     habituation_rate=2.0, sink_tokens=sinks))
    alone = greedy_repetition(model, batch, 16, pipeline=pipe)
    together = greedy_repetition(model, batch, 16, pipeline=pipe, batch_size=3)
    assert [r["continuation"] for r in together["per_prompt"]] == [r["continuation"] for r in alone["per_prompt"]]
    assert together["mean"] == alone["mean"]
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        greedy_repetition(model, batch, 4, batch_size=0)


def test_batched_habituation_without_a_sink_shield_is_refused():
    pipe = InferenceHookPipeline(InferenceHookConfig(enable_habituation=True, sink_tokens=0))
    with pytest.raises(ValueError, match="sink_tokens=0"):
        greedy_repetition(tiny_model("llama"), [[1, 2, 3], [4, 5]], 4, pipeline=pipe, batch_size=2)
