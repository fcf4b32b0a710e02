"""cortexlab.data.corpus: disjoint stdlib splits, a locally trained BPE, token windows."""
import os
import sys
from pathlib import Path

import pytest
import torch

from cortexlab.data import END_OF_TEXT, TokenCorpus, filler_files, stdlib_modules, stdlib_tokenizer
from cortexlab.data.corpus import module_windows, stdlib_module


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    os.environ["CORTEXLAB_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield stdlib_tokenizer(512)
    finally:
        del os.environ["CORTEXLAB_CACHE"]


def test_splits_are_disjoint_and_cover_the_stdlib():
    train, heldout = stdlib_modules("train"), stdlib_modules("heldout")
    assert train and heldout and not set(train) & set(heldout)
    assert len(heldout) < len(train)
    assert filler_files("heldout") == heldout       # the recall task's filler uses the same split
    with pytest.raises(ValueError, match="split"):
        stdlib_modules("test")


def test_tokenizer_round_trips_any_text_and_is_cached(tokenizer):
    text = "def f(x):\n    return x ** 2  # ünïcode ✓\n"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert tokenizer.get_vocab_size() == 512 and tokenizer.token_to_id(END_OF_TEXT) == 0
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    cached = Path(os.environ["CORTEXLAB_CACHE"]) / "tokenizers" / f"stdlib-bpe-512-{version}.json"
    assert cached.is_file()
    assert stdlib_tokenizer(512).to_str() == tokenizer.to_str()     # read back from the cache
    with pytest.raises(ValueError, match="vocab_size"):
        stdlib_tokenizer(100)


def test_corpus_windows(tokenizer):
    corpus = TokenCorpus(tokenizer, "heldout", max_files=3)
    assert corpus.describe()["files"] == [p.name for p in stdlib_modules("heldout")[:3]]
    assert (corpus.ids == 0).sum() == 3                           # one end-of-text per file
    assert int(corpus.ids.max()) < 512
    windows = corpus.eval_windows(64, max_windows=5)
    assert windows.shape == (5, 65) and torch.equal(windows[1, 0], corpus.ids[64])
    assert torch.equal(windows[0, 1:], corpus.ids[1:65])
    a = corpus.random_batch(4, 32, torch.Generator().manual_seed(0))
    b = corpus.random_batch(4, 32, torch.Generator().manual_seed(0))
    assert a.shape == (4, 33) and torch.equal(a, b)               # seeded
    with pytest.raises(ValueError, match="seq_len"):
        corpus.random_batch(2, len(corpus), torch.Generator())
    with pytest.raises(ValueError, match="batch_size"):
        corpus.random_batch(0, 8, torch.Generator())


class _BytesTokenizer:
    """A Hugging Face-style tokenizer call: UTF-8 bytes as ids."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}


def test_stdlib_module_finds_a_module_of_its_split_only():
    train, heldout = stdlib_modules("train"), stdlib_modules("heldout")
    assert stdlib_module("heldout", heldout[2].name) == heldout[2]
    assert stdlib_module("train", train[0].name) == train[0]
    with pytest.raises(ValueError, match="name="):
        stdlib_module("train", heldout[2].name)
    with pytest.raises(ValueError, match="split"):
        stdlib_module("test", heldout[2].name)


def test_module_windows_are_slices_of_each_module():
    tok = _BytesTokenizer()
    heldout = stdlib_modules("heldout")
    names = {heldout[1].name, heldout[0].name}
    windows = module_windows(tok, "heldout", names=names, start=100, length=32)
    assert windows.shape == (2, 32) and windows.dtype == torch.int64
    for row, path in zip(windows, heldout[:2]):                    # file-name order
        assert row.tolist() == list(path.read_text().encode()[100:132])
    first = module_windows(tok, "train", count=3, length=16)
    long_enough = [p.read_text().encode() for p in stdlib_modules("train") if len(p.read_text().encode()) >= 16][:3]
    assert first.tolist() == [list(b[:16]) for b in long_enough]
    with pytest.raises(ValueError, match="name="):
        module_windows(tok, "train", names=[heldout[0].name])
    with pytest.raises(ValueError, match="tokens"):
        module_windows(tok, "heldout", names=names, start=10**9)
    with pytest.raises(ValueError, match="count"):
        module_windows(tok, "heldout", count=0)
