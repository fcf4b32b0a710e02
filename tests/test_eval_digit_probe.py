"""cortexlab.eval.digit_probe: what each layer's input says about a number's digits."""
import pytest
import torch

from cortexlab.data import RecallTask
from cortexlab.eval.digit_probe import digit_probe, nearest_mean_accuracy
from cortexlab.models import load_base_model


def test_nearest_mean_reads_labels_that_are_in_the_features_and_not_others():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (400,), generator=gen)
    means = torch.randn(10, 32, generator=gen)
    x = means[labels] + 0.3 * torch.randn(400, 32, generator=gen)
    assert nearest_mean_accuracy(x, labels, 200) > 0.95
    shuffled = labels[torch.randperm(400, generator=gen)]
    assert nearest_mean_accuracy(x, shuffled, 200) < 0.25          # chance is 0.1
    for bad in (0, 400):
        with pytest.raises(ValueError, match="train"):
            nearest_mean_accuracy(x, labels, bad)


@pytest.fixture(scope="module")
def smollm2():
    base, tokenizer = load_base_model()
    return base, RecallTask(tokenizer, "train", call_tokens=128, max_filler_chars=20_000)


def test_smollm2_names_the_digits_at_layer_6_and_blurs_them_at_layer_12(smollm2):
    base, task = smollm2
    early, middle = digit_probe(base, task, episodes=96, layers=[6, 12])
    assert early["layer"] == 6 and middle["layer"] == 12
    # measured (96 episodes, two filler pools): layer 6 digit 0.97-0.99, previous 0.93-0.95, place 0.94;
    # layer 12 digit 0.53-0.56, previous 0.40-0.44 (chance 0.1), place 0.97
    assert early["digit"] > 0.9 and early["previous"] > 0.85 and early["place"] > 0.8
    assert middle["digit"] < early["digit"] - 0.25 and middle["previous"] < early["previous"] - 0.25
    assert middle["shared"] > early["shared"] + 0.1            # every input at layer 12 looks alike


def test_digit_probe_refuses_bad_arguments(smollm2):
    base, task = smollm2
    for layers in ([30], [-1], [], ["6"], [True]):
        with pytest.raises(ValueError, match="layers"):
            digit_probe(base, task, episodes=8, layers=layers)
    with pytest.raises(ValueError, match="episodes"):
        digit_probe(base, task, episodes=2)
