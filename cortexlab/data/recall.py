"""Recall across calls: a pass key given in call 1, filler in calls 2..N-1, the question in call N.

The base model's own context restarts at every call, so the only way to answer the
question in call N is through a memory that outlives a call (a Cortex sidecar's state).
One episode of N calls, each exactly `call_tokens` tokens long:

    call 1       [filler ...][ The pass key is 40213. Remember it.][filler ...]   (fact at a random place)
    calls 2..N-1 [filler ...]                                                     (real text only)
    call N       [filler ...][ What is the pass key? The pass key is][ ][4][0][2][1][3]

`conflict_batch` puts a second fact with another key in call 2: the answer stays the first key.

The *distance* of an episode is N - 1, the number of calls between the fact and the
question (N = 1 puts fact and question in one call: the in-context reference). Labels are
-100 everywhere except at the answer's digits, which are the last `key_digits` tokens of
call N (SmolLM2 writes a number as a space token, then one token per digit, ids 32-41).

Filler is real prose (`filler="stdlib"`, the default): the docstrings of the Python
standard library's top-level modules. `filler="repeat"` is the classic pass-key filler
instead (Mohtashami & Jaggi 2023: "The grass is green. The sky is blue. ..." repeated), an
easy warm-up: repeated text is predictable, so a delta-rule memory hardly writes it.
The modules are split by a hash of their file name into a training set and a held-out set
(about 1 in 5), so the two splits never share a source file; the fact and question
phrasings come from separate training and held-out template lists; and the random stream
of each split is seeded with the split's name, so the same seed gives different episodes
in the two splits. Everything is deterministic given (split, seed, num_calls, batch_size), the filler, the
templates and the phrasing: `phrasing=` takes the templates of the other split (the random stream stays the
split's), to tell a held-out gap in the filler text from one in the wording (`cortexlab.eval.recall_shift`).

Two options widen the *training* split (the held-out split never changes, so results stay comparable):
`filler="stdlib+packages"` adds the docstrings of the standard library's packages (`Lib/email/...`, tests
left out) to the training filler, about twice the tokens, without any docstring that shares a run of
`SHINGLE_WORDS` words with the held-out filler (forks such as lib2to3's tokenize.py); and
`templates="composed"` draws the fact and question from every combination of the parts in
`COMPOSED_FACT_PARTS` and `COMPOSED_QUESTION_PARTS` (448 facts, 66 questions, none a held-out template)
instead of the 8 and 6 listed ones; they include all 6 listed questions and 5 of the 8 listed facts (not
"Remember this: ...", "Note that ..." and "Please keep in mind that ..."). `templates="listed+direct"` adds
`DIRECT_FACT_TEMPLATES` to the 8 listed facts: every listed one puts "is" or ":" between "pass key" and the key,
these put the key right after the noun ("Store the pass key 40213 somewhere safe."), as one held-out fact does.
`templates="listed+direct-composed"` adds every combination of `DIRECT_FACT_PARTS` instead (6 verbs x 12 endings,
the 4 direct facts among them): what follows the key varies, so a memory cannot lean on the token after it. No
ending starts with " for", the word after the key in the held-out "Memorise the pass key {key} for later.".
`templates="listed+direct-bridged"` varies the words before the key as well: the same 72 verb-ending pairs, each
with one of the 7 `DIRECT_FACT_BRIDGES` between "pass key" and the key in turn ("Copy the pass key below: 40213
with care."), so every verb meets every bridge and every ending six of them; no bridge is " in memory:", the words
before the key in the held-out "Keep this pass key in memory: {key}.".

`distractors=p` puts other numbers stated like facts into the filler: each filler span (around the fact,
a whole filler call, before the question) is, with probability p, overwritten in one place per
`DISTRACTOR_SPACING` tokens (where the sentence fits) by a sentence of the split's `DISTRACTOR_TEMPLATES` ("The port
number is 8025.", ">>> x = 31337", "Your room code is 40213. Remember it."), numbers of 1 to 6 or 8 digits, never
naming a pass key. A doctest line ends on its number, so the filler token after it may run on ("31337ing"). The
answer stays the pass key, so a memory that keeps the last number it read fails. Held-out episodes use their own
distractor templates; p = 0 (the default) leaves every episode as it was. `distractor_kind="plain"` leaves out the
`FACT_FRAMED_DISTRACTORS`, those that state a number in a fact's own frame with another noun ("Remember this: the
door code is 4071."), and keeps the code and prose ones (">>> x = 31337", "Version 3 added this function.").
"""
from __future__ import annotations

import ast
import copy
import itertools
import random
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from cortexlab.checks import check_bool, check_int, check_number

from .corpus import SPLITS, check_split, stdlib_modules, stdlib_package_modules, stdlib_root

__all__ = [
    "COMPOSED_FACT_PARTS", "COMPOSED_QUESTION_PARTS", "DIRECT_FACTS", "DIRECT_FACT_BRIDGES", "DIRECT_FACT_PARTS",
    "DIRECT_FACT_TEMPLATES", "DISTRACTOR_KINDS", "DISTRACTOR_TEMPLATES", "FACT_FRAMED_DISTRACTORS", "FACT_TEMPLATES",
    "QUESTION_TEMPLATES", "SPLITS", "TEMPLATES",
    "RecallBatch", "RecallTask", "bridged_direct_templates", "composed_direct_templates", "composed_templates",
    "distractor_templates", "filler_files", "filler_token_pool", "filler_windows",
]

FILLERS = ("stdlib", "stdlib+packages", "repeat")
TEMPLATES = ("listed", "composed", "listed+direct", "listed+direct-composed", "listed+direct-bridged")
SHINGLE_WORDS = 10           # a package docstring sharing a run of this many words with held-out filler is dropped
REPEAT_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
MIN_DOCSTRING_CHARS = 80     # shorter docstrings are mostly one-liners ("Return x.")
DEFAULT_MAX_CHARS = {"train": 600_000, "heldout": 200_000, "train+packages": 1_500_000}

FACT_TEMPLATES = {
    "train": (
        "The pass key is {key}. Remember it.",
        "Remember this: the pass key is {key}.",
        "Your pass key is {key}. Keep it safe.",
        "Note that the pass key is {key}.",
        "Important: the pass key is {key}.",
        "The secret pass key is {key}. Do not forget it.",
        "Here is the pass key: {key}.",
        "Please keep in mind that the pass key is {key}.",
    ),
    "heldout": (
        "Memorise the pass key {key} for later.",
        "The pass key you will need is {key}.",
        "For later reference, the pass key is {key}.",
        "Keep this pass key in memory: {key}.",
    ),
}
DIRECT_FACT_TEMPLATES = (   # the key right after "pass key" (templates="listed+direct"; training only)
    "Store the pass key {key} somewhere safe.",
    "Write down the pass key {key} now.",
    "Use the pass key {key} when you are asked.",
    "Take note of the pass key {key}.",
)
DIRECT_FACT_PARTS = (   # "<verb> the pass key {key}<ending>": 6 x 12 facts (templates="listed+direct-composed")
    ("Store", "Write down", "Use", "Take note of", "Hold on to", "Copy"),
    (" somewhere safe.", " now.", " when you are asked.", ".", " and keep it.", " in your notes.", " until the end.",
     " before you go on.", " exactly as written.", " with care.", ", then read on.", " in a safe place."),
)
DIRECT_FACT_BRIDGES = ("", ":", ",", " here:", " below:", " that follows:", " number")   # "pass key<bridge> {key}"
QUESTION_TEMPLATES = {   # the answer " 40213" follows each of these directly
    "train": (
        "What is the pass key? The pass key is",
        "Question: what was the pass key? Answer:",
        "Do you remember the pass key? It is",
        "Recall the pass key. The pass key is",
        "What pass key were you given? The pass key is",
        "Tell me the pass key. It is",
    ),
    "heldout": (
        "Which pass key did I give you? The pass key is",
        "Please repeat the pass key. It was",
        "What was the pass key mentioned earlier? Answer:",
    ),
}

DISTRACTOR_TEMPLATES = {   # other numbers stated like facts or doctest results; none names a pass key
    "train": (
        "The port number is {n}.",
        "If no timeout is given then {n} is used.",
        "Error code {n} means that the file was not found.",
        "The default buffer size is {n} bytes.",
        ">>> x = {n}",
        ">>> len(data) {n}",
        "Version {n} added this function.",
        "Your room code is {n}. Remember it.",
        "Remember this: the door code is {n}.",
        "Note that the order number is {n}.",
        "The answer is {n}.",
        "Important: the limit is {n}.",
    ),
    "heldout": (
        "The server listens on port {n} by default.",
        ">>> int('{n}') {n}",
        "Keep this PIN in memory: {n}.",
        "Bug {n} was fixed in this release.",
        "The account number you will need is {n}.",
        "For later reference, the build number is {n}.",
    ),
}
FACT_FRAMED_DISTRACTORS = frozenset({   # a number in a fact's frame, another noun than "pass key"
    "The port number is {n}.", "Your room code is {n}. Remember it.", "Remember this: the door code is {n}.",
    "Note that the order number is {n}.", "The answer is {n}.", "Important: the limit is {n}.",
    "Keep this PIN in memory: {n}.", "The account number you will need is {n}.",
    "For later reference, the build number is {n}.",
})
DISTRACTOR_KINDS = ("all", "plain")   # plain: the split's distractors without the FACT_FRAMED_DISTRACTORS
DISTRACTOR_SPACING = 64      # one distractor per this many filler tokens (at least one try) in a distracted span
DISTRACTOR_DIGITS = (1, 2, 3, 4, 5, 5, 5, 6, 8)   # a distractor's length in digits, drawn uniformly (5: as a key)

COMPOSED_FACT_PARTS = (   # opener, statement, closer: 8 x 8 x 7 training facts (templates="composed")
    ("", "Note:", "Important:", "Listen carefully.", "By the way,", "For the record,", "One more thing:",
     "Attention:"),
    ("the pass key is {key}.", "your pass key is {key}.", "the secret pass key is {key}.",
     "today's pass key is {key}.", "the pass key for this session is {key}.", "here is the pass key: {key}.",
     "pass key = {key}.", "the pass key to remember is {key}."),
    ("", "Remember it.", "Do not forget it.", "Keep it safe.", "You will be asked for it.", "Write it down.",
     "It matters later."),
)
COMPOSED_QUESTION_PARTS = (   # question, lead-in to the answer: 11 x 6 training questions
    ("What is the pass key?", "Question: what was the pass key?", "Do you remember the pass key?",
     "Recall the pass key.", "What pass key were you given?", "Tell me the pass key.", "Can you tell me the pass key?",
     "Now, what is the pass key?", "Time to check your memory: what is the pass key?",
     "What was the secret pass key?", "State the pass key."),
    ("The pass key is", "It is", "Answer:", "The answer is", "Sure, the pass key is", "My answer:"),
)


def _sentence(*parts: str) -> str:
    """Join parts with spaces, capitalising a part that starts a sentence (the first, or one after "." or "?")."""
    out = []
    for part in filter(None, parts):
        if not out or out[-1].endswith((".", "?")):
            part = part[0].upper() + part[1:]
        out.append(part)
    return " ".join(out)


def _format_fields(template: str) -> list[str | None]:
    """The names of a template's {fields} ("{}" gives "")."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError:   # an unmatched brace
        return [None]


def distractor_templates(split: str, distractor_kind: str = "all") -> tuple[str, ...]:
    """The split's `DISTRACTOR_TEMPLATES`, all of them or the "plain" ones (without the `FACT_FRAMED_DISTRACTORS`)."""
    check_split(split)
    if distractor_kind not in DISTRACTOR_KINDS:
        raise ValueError(f"distractor_kind must be one of {DISTRACTOR_KINDS}, got {distractor_kind!r}")
    return tuple(t for t in DISTRACTOR_TEMPLATES[split]
                 if distractor_kind == "all" or t not in FACT_FRAMED_DISTRACTORS)


def composed_templates() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(fact templates, question templates): every combination of `COMPOSED_FACT_PARTS` and
    `COMPOSED_QUESTION_PARTS`, in a fixed order; training phrasings only (none is a held-out template)."""
    facts = tuple(_sentence(*parts) for parts in itertools.product(*COMPOSED_FACT_PARTS))
    questions = tuple(_sentence(*parts) for parts in itertools.product(*COMPOSED_QUESTION_PARTS))
    return facts, questions


def composed_direct_templates() -> tuple[str, ...]:
    """Every combination of `DIRECT_FACT_PARTS`, "<verb> the pass key {key}<ending>", in a fixed order."""
    return tuple(f"{verb} the pass key {{key}}{ending}" for verb, ending in itertools.product(*DIRECT_FACT_PARTS))


def bridged_direct_templates() -> tuple[str, ...]:
    """The verb-ending pairs of `composed_direct_templates()` in the same order, the i-th with the bridge
    `DIRECT_FACT_BRIDGES[i % 7]`: "<verb> the pass key<bridge> {key}<ending>". 7 is prime to 6 and 12, so each
    verb meets every bridge and each ending six of them."""
    bridges = itertools.cycle(DIRECT_FACT_BRIDGES)
    return tuple(f"{verb} the pass key{bridge} {{key}}{ending}"
                 for (verb, ending), bridge in zip(itertools.product(*DIRECT_FACT_PARTS), bridges))


DIRECT_FACTS = {   # the templates values that add direct facts, and the facts they add to the listed ones
    "listed+direct": DIRECT_FACT_TEMPLATES, "listed+direct-composed": composed_direct_templates(),
    "listed+direct-bridged": bridged_direct_templates(),
}


def filler_files(split: str) -> list[Path]:
    """The standard-library modules whose docstrings fill `split`: `corpus.stdlib_modules(split)`.

    A module belongs to "heldout" when the SHA-256 of its file name is divisible by 5,
    else to "train": the two lists are disjoint and do not depend on the machine's order.
    """
    return stdlib_modules(split)


def filler_windows(tokenizer, split: str, call_tokens: int) -> list[tuple[str, int, list[int]]]:
    """Every whole `call_tokens`-token window of each of the split's modules, its docstrings tokenized as
    `filler_token_pool` does: (file name, first token, ids), in `filler_files` order."""
    check_int("call_tokens", call_tokens, 16)
    windows = []
    for path in filler_files(split):
        ids = _docstring_tokens(tokenizer, _docstrings(path))
        windows += [(path.name, s, ids[s:s + call_tokens]) for s in range(0, len(ids) - call_tokens + 1, call_tokens)]
    return windows


def _docstring_tokens(tokenizer, docs: list[str]) -> list[int]:
    """The docstrings' token ids, each tokenized on its own with a space in front, concatenated."""
    return [i for doc in docs for i in tokenizer.encode(" " + doc, add_special_tokens=False)]


def _docstrings(path: Path) -> list[str]:
    """Docstrings of the module, its classes and functions, whitespace collapsed, long ones only."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                found.append(" ".join(doc.split()))
    return found


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i:i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1)}


def _package_docstrings() -> list[tuple[str, list[str]]]:
    """(relative path, docstrings) of each package module, without the docstrings that share a run of
    `SHINGLE_WORDS` words with any held-out module's docstrings."""
    heldout = set()
    for path in stdlib_modules("heldout"):
        for doc in _docstrings(path):
            heldout |= _shingles(doc)
    root = stdlib_root()
    return [(path.relative_to(root).as_posix(), [d for d in _docstrings(path) if not _shingles(d) & heldout])
            for path in stdlib_package_modules()]


_POOLS: dict[tuple, tuple[torch.Tensor, list[str]]] = {}


def filler_token_pool(tokenizer, split: str, max_chars: int | None = None, *,
                      packages: bool = False) -> tuple[torch.Tensor, list[str]]:
    """(token ids [n] int64, source names) of the split's filler text, cached per tokenizer.

    The split's modules are read in a fixed shuffled order (seeded with the split's name)
    until `max_chars` characters of docstrings are collected; each docstring is tokenized
    on its own, with a space in front, and the pieces are concatenated. packages: add the
    standard library's package modules (train split only; see the module docstring), shuffled
    with the top-level ones under their own seed, so the plain pool is unchanged. A source is named by its
    file name ("functools.py"), a package module by its path under `Lib/` ("email/utils.py").
    """
    check_split(split)
    check_bool("packages", packages)
    if packages and split != "train":
        raise ValueError(f"packages=True widens the training filler only; split must be 'train', got {split!r}")
    name = split + ("+packages" if packages else "")
    max_chars = DEFAULT_MAX_CHARS[name] if max_chars is None else max_chars
    check_int("max_chars", max_chars, 1000)
    key = (getattr(tokenizer, "name_or_path", None), len(tokenizer), name, max_chars)
    if key not in _POOLS:
        sources = [(path.name, _docstrings(path)) for path in filler_files(split)]
        if packages:
            sources += _package_docstrings()
        random.Random(f"cortexlab.recall.files/{name}").shuffle(sources)
        texts, used, chars = [], [], 0
        for source, docs in sources:
            if not docs:
                continue
            texts += docs
            used.append(source)
            chars += sum(map(len, docs))
            if chars >= max_chars:
                break
        ids = _docstring_tokens(tokenizer, texts)
        _POOLS[key] = torch.tensor(ids, dtype=torch.int64), sorted(used)
    return _POOLS[key]


@dataclass
class RecallBatch:
    """A batch of recall episodes.

    input_ids, labels: [B, N, T] (call c of example b is input_ids[b, c]); labels are -100
    except at the answer, the last P + A tokens of the last call: the task's `answer_prefix`
    (the space that starts the number, P tokens) and the A digits, the tokens a recall loss
    scores (labels[t] = input_ids[t]; a causal LM predicts each from the tokens before it).
    answer: [B, A], the digits' token ids. keys: the pass keys as strings. second: in a
    `conflict_batch`, [B, A] the digits of the conflicting key given in call 2 (None otherwise).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    answer: torch.Tensor
    keys: list[str]
    split: str
    seed: int
    second: torch.Tensor | None = None

    @property
    def num_calls(self) -> int:
        return self.input_ids.shape[1]

    @property
    def distance(self) -> int:
        """Calls between the fact (call 1) and the question (call N): N - 1."""
        return self.num_calls - 1

    def to(self, device) -> RecallBatch:
        return RecallBatch(self.input_ids.to(device), self.labels.to(device), self.answer.to(device),
                           self.keys, self.split, self.seed,
                           None if self.second is None else self.second.to(device))


class RecallTask:
    """Generator of recall-across-calls episodes for one split (see the module docstring).

    tokenizer: a Hugging Face tokenizer that writes each digit of a number as one token
    (SmolLM2, Llama 3 and Qwen2 do); call_tokens: T, the length of every call; key_digits:
    the pass key's length A; filler: "stdlib" (real text, split by source file), "stdlib+packages"
    (the train split's text plus the packages' docstrings; train only) or "repeat" (the classic repeated
    pass-key filler, the same for both splits); max_filler_chars: how much docstring text to tokenize;
    phrasing: the split whose fact and question templates are used (None: `split`), so that crossing filler
    and phrasing splits can tell which of the two a model's held-out gap comes from; templates: "listed"
    (`FACT_TEMPLATES`, `QUESTION_TEMPLATES`), "composed" (`composed_templates()`), "listed+direct" (the listed
    ones and `DIRECT_FACT_TEMPLATES`), "listed+direct-composed" (the listed ones and
    `composed_direct_templates()`) or "listed+direct-bridged" (the listed ones and `bridged_direct_templates()`),
    all but "listed" train phrasing only;
    distractors: the probability that a filler span carries other numbers stated like facts (the split's
    `DISTRACTOR_TEMPLATES`; see the module docstring); distractor_kind: "all" of them or the "plain" ones (without
    the `FACT_FRAMED_DISTRACTORS`).
    """

    def __init__(self, tokenizer, split: str = "train", *, call_tokens: int = 48, key_digits: int = 5,
                 filler: str = "stdlib", max_filler_chars: int | None = None, phrasing: str | None = None,
                 templates: str = "listed", distractors: float = 0.0, distractor_kind: str = "all"):
        check_split(split)
        check_number("distractors", distractors, 0, 1)
        phrasing = split if phrasing is None else phrasing
        if phrasing not in SPLITS:
            raise ValueError(f"phrasing must be one of {SPLITS} or None, got {phrasing!r}")
        if filler not in FILLERS:
            raise ValueError(f"filler must be one of {FILLERS}, got {filler!r}")
        if filler == "stdlib+packages" and split != "train":
            raise ValueError(f"filler='stdlib+packages' widens the training text only; split must be 'train', "
                             f"got {split!r}")
        if templates not in TEMPLATES:
            raise ValueError(f"templates must be one of {TEMPLATES}, got {templates!r}")
        if templates != "listed" and phrasing != "train":
            raise ValueError(f"templates={templates!r} are training phrasings; phrasing (which defaults to split) "
                             f"must be 'train', got {phrasing!r}")
        check_int("call_tokens", call_tokens, 16)
        check_int("key_digits", key_digits)
        if key_digits > 12:
            raise ValueError(f"key_digits must be at most 12, got {key_digits}")
        self.tokenizer, self.split, self.phrasing = tokenizer, split, phrasing
        self.call_tokens, self.key_digits = call_tokens, key_digits
        self.digit_ids, self.answer_prefix = self._digit_tokens(tokenizer)
        self.filler, self.templates, self.distractors = filler, templates, distractors
        self.distractor_kind = distractor_kind
        self.distractor_templates = distractor_templates(split, distractor_kind)
        if filler != "repeat":
            self.pool, self.source_files = filler_token_pool(tokenizer, split, max_filler_chars,
                                                             packages=filler == "stdlib+packages")
        else:
            unit = tokenizer.encode(REPEAT_FILLER, add_special_tokens=False)
            self.pool, self.source_files = torch.tensor(unit * (1 + 8 * call_tokens // len(unit))), []
        self.answer_tokens = len(self.answer_prefix) + key_digits
        facts = FACT_TEMPLATES[phrasing] + DIRECT_FACTS.get(templates, ())
        self._use_templates(*(composed_templates() if templates == "composed" else
                              (facts, QUESTION_TEMPLATES[phrasing])))
        if len(self.pool) < 4 * call_tokens:
            raise ValueError(f"only {len(self.pool)} filler tokens for split {split!r}; raise max_filler_chars")

    def _use_templates(self, facts: tuple[str, ...], questions: tuple[str, ...]) -> None:
        """Set the fact and question templates and the longest fact and question + answer they give."""
        longest_fact = max(len(self._encode(t.format(key="0" * self.key_digits))) for t in facts)
        longest_question = max(len(self._encode(t)) for t in questions)
        if longest_fact > self.call_tokens or longest_question + self.answer_tokens > self.call_tokens:
            raise ValueError(f"call_tokens={self.call_tokens} is too short: the longest fact takes {longest_fact} "
                             f"tokens and the longest question + answer {longest_question + self.answer_tokens}")
        self.fact_templates, self.question_templates = facts, questions
        self.max_fact_tokens = longest_fact
        self.max_tail_tokens = longest_question + self.answer_tokens   # question + answer, the end of call N

    def with_templates(self, facts=None, questions=None) -> RecallTask:
        """The same task (tokenizer, filler, distractors) with these fact templates (each with one "{key}") and
        question templates (None: the task's), e.g. one template at a time (`recall_shift --by-template`)."""
        checked = {}
        for name, given, fields in (("facts", facts, ["key"]), ("questions", questions, [])):
            if given is None:
                continue
            if not isinstance(given, (list, tuple)) or not given or not all(
                    isinstance(t, str) and t.strip() and _format_fields(t) == fields for t in given):
                raise ValueError(f"{name} must be a non-empty list or tuple of templates, each with "
                                 f"{'one {key} and no other field' if fields else 'no {field}'}, got {given!r}")
            checked[name] = tuple(given)
        task = copy.copy(self)
        task._use_templates(checked.get("facts", self.fact_templates),
                            checked.get("questions", self.question_templates))
        task.templates = task.phrasing = "given"   # describe() lists them
        return task

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(" " + text, add_special_tokens=False)

    @staticmethod
    def _digit_tokens(tokenizer) -> tuple[list[int], list[int]]:
        """Token id of each digit 0-9, and the tokens a number starts with after a space (e.g. [" "])."""
        digits = []
        for d in "0123456789":
            ids = tokenizer.encode(d, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"the tokenizer writes the digit {d!r} as {len(ids)} tokens; the recall task "
                                 "needs one token per digit")
            digits.append(ids[0])
        probe = "4071985623"
        ids = tokenizer.encode(" " + probe, add_special_tokens=False)
        expected = [digits[int(c)] for c in probe]
        if ids[len(ids) - len(probe):] != expected:
            raise ValueError(f"the tokenizer does not write ' {probe}' as one token per digit (got {ids}); "
                             "the recall task needs one token per digit")
        return digits, ids[:len(ids) - len(probe)]

    def describe(self) -> dict:
        """What the split is made of (for results files)."""
        filler = {"stdlib": "docstrings of Python stdlib top-level modules",
                  "stdlib+packages": "docstrings of Python stdlib top-level modules and package modules",
                  "repeat": REPEAT_FILLER}[self.filler]
        if self.templates == "composed":   # the parts, not the 448 + 66 combinations
            phrasings = {"fact_parts": COMPOSED_FACT_PARTS, "question_parts": COMPOSED_QUESTION_PARTS}
        else:
            phrasings = {"fact_templates": list(self.fact_templates),
                         "question_templates": list(self.question_templates)}
        return {"split": self.split, "phrasing": self.phrasing, "templates": self.templates,
                "call_tokens": self.call_tokens, "key_digits": self.key_digits, "filler": filler,
                "filler_files": self.source_files, "filler_tokens": len(self.pool), **phrasings,
                **({"distractors": self.distractors, "distractor_kind": self.distractor_kind,
                    "distractor_templates": list(self.distractor_templates)} if self.distractors else {})}

    def with_distractors(self, distractors: float, distractor_kind: str | None = None) -> RecallTask:
        """The same task (tokenizer, filler pool, templates) whose filler spans carry distractors with this
        probability, of this kind (None: the task's)."""
        check_number("distractors", distractors, 0, 1)
        kind = self.distractor_kind if distractor_kind is None else distractor_kind
        templates = distractor_templates(self.split, kind)
        task = copy.copy(self)
        task.distractors, task.distractor_kind, task.distractor_templates = distractors, kind, templates
        return task

    def _filler(self, rng: random.Random, n: int) -> list[int]:
        """n filler tokens; with probability `distractors`, one distractor per `DISTRACTOR_SPACING` tokens (at least
        one) overwrites them, each at a random place in its own stretch of the span where it fits (the stretches do
        not overlap; a stretch shorter than its sentence keeps its filler)."""
        if n == 0:
            return []
        start = rng.randrange(len(self.pool) - n + 1)
        span = self.pool[start:start + n].tolist()
        if self.distractors and rng.random() < self.distractors:
            stretches = max(1, n // DISTRACTOR_SPACING)
            for k in range(stretches):
                lo, hi = k * n // stretches, (k + 1) * n // stretches
                digits = rng.choice(DISTRACTOR_DIGITS)
                number = str(rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits))
                line = self._encode(rng.choice(self.distractor_templates).format(n=number))
                if len(line) <= hi - lo:
                    at = rng.randint(lo, hi - len(line))
                    span[at:at + len(line)] = line
        return span

    def example(self, num_calls: int, rng: random.Random, fact_at: int | None = None) -> tuple[list[list[int]], str]:
        """One episode: (N calls of T token ids, the pass key); fact_at: the fact's first token in call 1
        (None: a random place; N >= 2 only)."""
        T = self.call_tokens
        if fact_at is not None:
            room = T - self.max_fact_tokens
            if not isinstance(fact_at, int) or isinstance(fact_at, bool) or not 0 <= fact_at <= room:
                raise ValueError(f"fact_at must be an int in [0, {room}], got {fact_at!r}")
            if num_calls < 2:
                raise ValueError("fact_at needs num_calls >= 2 (one call holds the fact and the question)")
        key = str(rng.randrange(10 ** self.key_digits)).zfill(self.key_digits)
        fact = self._encode(rng.choice(self.fact_templates).format(key=key))
        tail = self._encode(rng.choice(self.question_templates)) + self.answer_prefix
        tail += [self.digit_ids[int(c)] for c in key]
        if num_calls == 1:
            free = T - len(fact) - len(tail)
            if free < 0:
                raise ValueError(f"call_tokens={T} cannot hold a fact and a question in one call (num_calls=1)")
            before = rng.randint(0, free)
            return [self._filler(rng, before) + fact + self._filler(rng, free - before) + tail], key
        before = rng.randint(0, T - len(fact)) if fact_at is None else fact_at
        calls = [self._filler(rng, before) + fact + self._filler(rng, T - len(fact) - before)]
        calls += [self._filler(rng, T) for _ in range(num_calls - 2)]
        calls.append(self._filler(rng, T - len(tail)) + tail)
        return calls, key

    def filler_calls(self, count: int, seed: int) -> torch.Tensor:
        """`count` calls of filler only, [count, T] token ids, determined by (split, seed, count)."""
        check_int("count", count)
        rng = random.Random(f"cortexlab.recall.filler/{self.split}/{self.filler}/{seed}/{count}/{self.call_tokens}")
        return torch.tensor([self._filler(rng, self.call_tokens) for _ in range(count)], dtype=torch.int64)

    def batch(self, num_calls: int, batch_size: int, seed: int, fact_at: int | None = None) -> RecallBatch:
        """`batch_size` episodes of `num_calls` calls, determined by (split, seed, num_calls, batch_size, fact_at).

        fact_at: put every episode's fact at this token of call 1, in [0, T - max_fact_tokens]
        (None: a random place per episode). Needs num_calls >= 2.
        """
        check_int("num_calls", num_calls)
        check_int("batch_size", batch_size)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an int, got {seed!r}")
        rng = random.Random(f"cortexlab.recall/{self.split}/{seed}/{num_calls}/{batch_size}/{self.call_tokens}"
                            + ("" if self.filler == "stdlib" else f"/{self.filler}"))
        episodes = [self.example(num_calls, rng, fact_at) for _ in range(batch_size)]
        input_ids = torch.tensor([calls for calls, _ in episodes], dtype=torch.int64)
        keys = [key for _, key in episodes]
        answer = torch.tensor([[self.digit_ids[int(c)] for c in key] for key in keys], dtype=torch.int64)
        labels = torch.full_like(input_ids, -100)
        scored = slice(self.call_tokens - self.answer_tokens, None)      # the space and the digits end call N
        labels[:, -1, scored] = input_ids[:, -1, scored]
        return RecallBatch(input_ids, labels, answer, keys, self.split, seed)

    def key_starts(self, batch: RecallBatch) -> list[int]:
        """Where each episode's key begins in its first call: the token index of the key's first digit
        (found with the space before it); ValueError if an episode states it anywhere but exactly once."""
        prefix = torch.tensor(self.answer_prefix, dtype=batch.answer.dtype, device=batch.answer.device)
        fact, P = batch.input_ids[:, 0], len(self.answer_prefix)
        starts = []
        for e, key in enumerate(batch.answer):
            stated = torch.cat([prefix, key])
            n = len(stated)
            found = [s for s in range(fact.shape[1] - n + 1) if torch.equal(fact[e, s:s + n], stated)]
            if len(found) != 1:
                raise ValueError(f"episode {e}: the key appears {len(found)} times in the fact call, expected once")
            starts.append(found[0] + P)
        return starts

    def conflict_batch(self, num_calls: int, batch_size: int, seed: int) -> RecallBatch:
        """Episodes with a conflicting fact: call 1 gives key A, call 2 another key B in a fact phrasing of the
        same split (at a random place, filler around it), calls 3..N-1 filler, and call N asks for the pass key,
        whose answer is A: the first key given counts. Call 2 reads exactly like call 1, so only a memory that
        compares it with what it holds can tell the two apart. `second` holds B's digits. Needs num_calls >= 3;
        determined by (split, seed, num_calls, batch_size)."""
        check_int("num_calls", num_calls, 3)
        plain = self.batch(num_calls, batch_size, seed)
        rng = random.Random(f"cortexlab.recall.conflict/{self.split}/{seed}/{num_calls}/{batch_size}/"
                            f"{self.call_tokens}" + ("" if self.filler == "stdlib" else f"/{self.filler}"))
        T, second = self.call_tokens, []
        for b, key in enumerate(plain.keys):
            other = key
            while other == key:
                other = str(rng.randrange(10 ** self.key_digits)).zfill(self.key_digits)
            fact = self._encode(rng.choice(self.fact_templates).format(key=other))
            before = rng.randint(0, T - len(fact))
            call = self._filler(rng, before) + fact + self._filler(rng, T - len(fact) - before)
            plain.input_ids[b, 1] = torch.tensor(call)
            second.append([self.digit_ids[int(c)] for c in other])
        plain.second = torch.tensor(second, dtype=torch.int64)
        return plain
