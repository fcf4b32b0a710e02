"""cortexlab.eval.key_lookup: whether the query before each answer digit finds the key written at that digit."""
import pytest
from transformers import AutoTokenizer

from conftest import tiny_cortex
from cortexlab.data import RecallTask
from cortexlab.eval.key_lookup import key_lookup
from cortexlab.models import default_model_path


@pytest.fixture(scope="module")
def task():
    return RecallTask(AutoTokenizer.from_pretrained(default_model_path()), "heldout", max_filler_chars=20_000)


def test_the_induction_init_finds_the_key_and_the_random_one_does_not(task):
    lookups = {init: key_lookup(tiny_cortex(task.tokenizer, controller=False, conv_init=init), task, episodes=8)
               for init in ("random", "induction")}
    induction, random = lookups["induction"], lookups["random"]
    assert induction["queries"] == random["queries"] == 8 * task.key_digits
    # a tiny model's layer-1 states are mostly the token: a repeated digit ties two keys (SmolLM2: 0.95-0.97)
    assert induction["hit_rate"] >= 0.6 and induction["matched"] > 0.9 > induction["others"] + 0.5
    assert random["hit_rate"] < 0.3 and abs(random["matched"] - random["others"]) < 0.3


def test_key_lookup_refuses_what_it_cannot_read(task):
    with pytest.raises(ValueError, match="one sidecar layer"):
        key_lookup(tiny_cortex(task.tokenizer, layers=(0, 1)), task)
    with pytest.raises(ValueError, match="episodes"):
        key_lookup(tiny_cortex(task.tokenizer), task, episodes=0)
