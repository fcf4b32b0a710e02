"""Real text for language modelling: the Python standard library's sources, split by file.

Every machine with Python has these long, real documents. A module belongs to the held-out
split when the SHA-256 of its file name is divisible by 5 (`HELDOUT_EVERY`), so train and
held-out are disjoint and identical on every machine with the same Python.

- `stdlib_modules(split)`: the top-level `Lib/*.py` files of a split; `stdlib_module(split, name)` one of them.
- `stdlib_package_modules()`: the modules inside the standard library's packages (`Lib/email/...`), tests
  left out; no split holds them (the recall task's training filler can add them).
- `stdlib_tokenizer(vocab_size)`: a byte-level BPE trained locally (with the `tokenizers`
  library) on the *train* split only, cached in cortexlab's cache folder.
- `TokenCorpus(tokenizer, split)`: the split as one stream of token ids (files joined by an
  end-of-text token), with seeded random training windows and the sequential, non-overlapping
  windows used for held-out evaluation.
- `stdlib_documents`, `module_windows`: the modules tokenised by a Hugging Face tokenizer, whole or one
  window per module.
"""
from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

from cortexlab.checks import check_int

SPLITS = ("train", "heldout")
HELDOUT_EVERY = 5
END_OF_TEXT = "<|endoftext|>"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def stdlib_root() -> Path:
    """The folder of the standard library's sources (`Lib/`)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_modules(split: str) -> list[Path]:
    """The standard-library modules (`Lib/*.py`, top level) of `split`, sorted by name.

    "heldout" holds the modules whose file name's SHA-256 is divisible by `HELDOUT_EVERY`.
    """
    check_split(split)
    root = stdlib_root()
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no standard-library source files found in {root}")
    held = [int(hashlib.sha256(p.name.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0 for p in files]
    return [p for p, h in zip(files, held) if h == (split == "heldout")]


def stdlib_package_modules() -> list[Path]:
    """The `.py` files inside the standard library's packages (`Lib/<package>/**/*.py`), sorted by path.

    Left out: `site-packages` (not the standard library) and tests (any folder named `test`, `tests` or
    `idle_test`). Neither split of `stdlib_modules` holds these files.
    """
    root = stdlib_root()
    skip = {"test", "tests", "idle_test"}
    packages = [d for d in root.iterdir() if d.is_dir() and d.name != "site-packages" and d.name not in skip]
    return sorted(p for d in packages for p in d.rglob("*.py")
                  if p.is_file() and not skip & set(p.relative_to(root).parts))


def stdlib_module(split: str, name: str) -> Path:
    """The module file `name` (e.g. "functools.py") of `split`; ValueError when that split does not hold it."""
    for path in stdlib_modules(split):
        if path.name == name:
            return path
    raise ValueError(f"name={name!r} is not a module of the {split!r} split (see stdlib_modules({split!r}))")


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def stdlib_tokenizer(vocab_size: int = 2048, *, cache: bool = True):
    """A byte-level BPE (`tokenizers.Tokenizer`) with `vocab_size` entries, trained on the train split.

    Byte-level: every string encodes (no unknown token). Id 0 is `END_OF_TEXT`. Training takes a
    few seconds; the result is cached as JSON in `cortexlab.models.cache_dir()/tokenizers`, per Python version.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not 260 <= vocab_size <= 65536:
        raise ValueError(f"vocab_size must be an int in [260, 65536] (256 bytes + merges), got {vocab_size!r}")
    from cortexlab.models import cache_dir

    version = f"py{sys.version_info.major}{sys.version_info.minor}"   # each Python has its own stdlib
    path = cache_dir() / "tokenizers" / f"stdlib-bpe-{vocab_size}-{version}.json"
    if cache and path.is_file():
        return Tokenizer.from_file(str(path))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((_read(p) for p in stdlib_modules("train")), trainer)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        tokenizer.save(tmp)
        os.replace(tmp, path)   # atomic: a concurrent reader sees the old file or the new one
    return tokenizer


class TokenCorpus:
    """One split of the stdlib sources as a stream of token ids [N] (int64).

    `max_files` keeps only the first files (quick runs); `describe()` lists the files used.
    """

    def __init__(self, tokenizer, split: str = "train", *, max_files: int | None = None):
        check_split(split)
        check_int("max_files", max_files, allow_none=True)
        self.split = split
        self.files = stdlib_modules(split)[:max_files]
        eot = tokenizer.token_to_id(END_OF_TEXT)
        if eot is None:
            raise ValueError(f"tokenizer has no {END_OF_TEXT!r} token (use stdlib_tokenizer())")
        ids: list[int] = []
        for encoding in tokenizer.encode_batch([_read(p) for p in self.files]):
            ids.extend(encoding.ids)
            ids.append(eot)
        self.ids = torch.tensor(ids, dtype=torch.int64)
        self.vocab_size = tokenizer.get_vocab_size()

    def __len__(self) -> int:
        return self.ids.numel()

    def _check_len(self, seq_len: int) -> None:
        if not isinstance(seq_len, int) or seq_len < 1 or seq_len + 1 > len(self):
            raise ValueError(f"seq_len must be an int in [1, {len(self) - 1}], got {seq_len!r}")

    def random_batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """[batch_size, seq_len + 1] windows at uniformly random offsets (inputs = [:, :-1], targets = [:, 1:])."""
        self._check_len(seq_len)
        check_int("batch_size", batch_size)
        starts = torch.randint(0, len(self) - seq_len, (batch_size,), generator=generator)
        return torch.stack([self.ids[s:s + seq_len + 1] for s in starts.tolist()])

    def eval_windows(self, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
        """Consecutive non-overlapping [n, seq_len + 1] windows from the start of the split (deterministic)."""
        self._check_len(seq_len)
        n = (len(self) - 1) // seq_len
        n = n if max_windows is None else min(n, max_windows)
        return torch.stack([self.ids[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)])

    def describe(self) -> dict:
        return {"split": self.split, "source": "Python standard library, top-level Lib/*.py",
                "tokens": len(self), "vocab_size": self.vocab_size, "files": [p.name for p in self.files]}


def stdlib_documents(tokenizer, split: str, *, min_tokens: int = 2,
                     max_docs: int | None = None) -> dict[str, torch.Tensor]:
    """The split's modules as whole documents: {file name: [n] int64 token ids} for each file with at
    least `min_tokens` tokens, in file-name order (the first `max_docs` of them).

    tokenizer: a Hugging Face tokenizer (no special tokens are added), e.g. SmolLM2's.
    """
    check_split(split)
    check_int("min_tokens", min_tokens, 2)
    check_int("max_docs", max_docs, allow_none=True)
    docs = {}
    for path in stdlib_modules(split):
        ids = tokenizer(_read(path), add_special_tokens=False)["input_ids"]
        if len(ids) >= min_tokens:
            docs[path.name] = torch.tensor(ids, dtype=torch.int64)
            if max_docs is not None and len(docs) == max_docs:
                break
    if not docs:
        raise ValueError(f"no {split!r} module has {min_tokens} tokens or more")
    return docs


def module_windows(tokenizer, split: str, *, names=None, count: int | None = None, start: int = 0,
                   length: int = 128) -> torch.Tensor:
    """One window per module: tokens [start, start + length) of each module of `split` (those in `names`,
    all when None) that is long enough, in file-name order, the first `count` of them: [N, length] int64.

    tokenizer: a Hugging Face tokenizer (no special tokens are added), e.g. SmolLM2's.
    """
    check_split(split)
    check_int("start", start, 0)
    check_int("length", length)
    check_int("count", count, allow_none=True)
    if isinstance(names, str):
        raise ValueError(f"names must be a collection of module file names, not one string ({names!r})")
    paths = stdlib_modules(split) if names is None else sorted(stdlib_module(split, name) for name in set(names))
    windows = []
    for path in paths:
        ids = tokenizer(_read(path), add_special_tokens=False)["input_ids"][start:start + length]
        if len(ids) == length:
            windows.append(torch.tensor(ids, dtype=torch.int64))
            if count is not None and len(windows) == count:
                break
    if not windows:
        raise ValueError(f"no {split!r} module has {start + length} tokens (start={start}, length={length})")
    return torch.stack(windows)
