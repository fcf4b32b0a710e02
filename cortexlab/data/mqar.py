"""Multi-query associative recall (MQAR), following Zoology (Arora et al. 2023, `multiquery_ar`).

A sequence of length L over a vocabulary of V tokens holds P key-value pairs, then every key
once more as a query, in random order, at power-law gaps; the model must answer each query
with the value bound to that key:

    keys   k_1..k_P  distinct, from [0, V/2)          values v_1..v_P  distinct, from [V/2, V)
    x[2j] = k_j,  x[2j+1] = v_j                        (the key-value block, positions 0..2P-1)
    gap_j in {0, .., S-1},  S = (L - 2P) // 2,  drawn without replacement with
        p(gap = i) ~ (i + 1)^(a - 1)                   (a = 0.01: near queries are far more likely)
    x[2P + 2 gap_j] = k_j,  label[2P + 2 gap_j] = v_j   (the answer is the next token; 2(P + R) with conflicts)
    every other position after the block: a uniform random token from [0, V); its label -100.

With `conflicts` = R > 0, R of the P keys (chosen at random) are bound a second time right after the block, to
values the row has not used, and the queries still ask for the *first* binding (write protection: a memory must
refuse to overwrite what it already holds, which a gate that sees one token at a time cannot decide):

    x[2P + 2i] = k_{c_i},  x[2P + 2i + 1] = v'_i   (i < R, the conflicting block)   S = (L - 2P - 2R) // 2

Labels are aligned with the inputs (the logits at position t are scored against label[t]).
Sampling without replacement uses the Gumbel-top-k trick (the top P of log p_i + Gumbel noise),
which has the distribution of drawing the gaps one by one (numpy's `choice(replace=False, p=..)`).
Train and test sets come from `split_seed`, whose train and test seeds never coincide.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cortexlab.checks import check_int, check_number

IGNORE = -100
SPLITS = ("train", "test")
__all__ = ["IGNORE", "SPLITS", "MQARTask", "chance_accuracy", "split_seed"]

_ROW_BLOCK = 4096   # rows generated at once: bounds the [rows, V/2] scratch used to draw distinct keys


@dataclass(frozen=True)
class MQARTask:
    """One MQAR setting; invalid combinations raise ValueError on construction."""

    vocab_size: int = 512
    seq_len: int = 256
    num_pairs: int = 16
    power_a: float = 0.01
    conflicts: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "num_pairs"):
            check_int(name, getattr(self, name))
        check_int("conflicts", self.conflicts, 0)
        if self.conflicts > self.num_pairs:
            raise ValueError(f"conflicts={self.conflicts} cannot exceed num_pairs={self.num_pairs}")
        check_number("power_a", self.power_a, 0, 1, low_open=True)   # 1: uniform gaps
        if self.num_pairs > self.vocab_size // 2:
            raise ValueError(f"num_pairs={self.num_pairs} distinct keys need vocab_size >= {2 * self.num_pairs}, "
                             f"got vocab_size={self.vocab_size}")
        if self.num_pairs + self.conflicts > self.vocab_size - self.vocab_size // 2:
            raise ValueError(f"num_pairs + conflicts = {self.num_pairs + self.conflicts} distinct values need "
                             f"vocab_size - vocab_size // 2 >= {self.num_pairs + self.conflicts} (the value half), "
                             f"got vocab_size={self.vocab_size}")
        if self.query_slots < self.num_pairs:
            block = 2 * (self.num_pairs + self.conflicts)
            raise ValueError(f"seq_len={self.seq_len} holds the key-value blocks ({block} tokens) "
                             f"and {self.query_slots} query slots, fewer than num_pairs={self.num_pairs}; "
                             f"need seq_len >= {block + 2 * self.num_pairs}")

    @property
    def query_slots(self) -> int:
        """S = (L - 2P - 2R) // 2: the even positions after the key-value blocks where a query may sit."""
        return (self.seq_len - 2 * (self.num_pairs + self.conflicts)) // 2

    def gap_probs(self) -> torch.Tensor:
        """p(gap = i) ~ (i + 1)^(a - 1), i < S (float64, sums to 1)."""
        p = torch.arange(1, self.query_slots + 1, dtype=torch.float64) ** (self.power_a - 1)
        return p / p.sum()

    def sample(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n sequences from a generator seeded with `seed`: (input ids, labels), both int64 [n, L]."""
        check_int("n", n)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        generator = torch.Generator().manual_seed(seed)
        blocks = [self._block(min(_ROW_BLOCK, n - s), generator) for s in range(0, n, _ROW_BLOCK)]
        return torch.cat([b[0] for b in blocks]), torch.cat([b[1] for b in blocks])

    def _block(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        V, L, P, R, half = self.vocab_size, self.seq_len, self.num_pairs, self.conflicts, self.vocab_size // 2
        # P distinct keys and P + R distinct values per row: the first of a random order of each half
        keys = torch.rand(n, half, generator=generator).argsort(dim=1)[:, :P]
        values = half + torch.rand(n, V - half, generator=generator).argsort(dim=1)[:, :P + R]
        values, second = values[:, :P], values[:, P:]
        # P distinct gaps per row, drawn by the power law (Gumbel-top-k)
        gumbel = -torch.log(-torch.log(torch.rand(n, self.query_slots, generator=generator, dtype=torch.float64)))
        gaps = (self.gap_probs().log() + gumbel).topk(P, dim=1).indices
        inputs = torch.randint(V, (n, L), generator=generator)
        labels = torch.full((n, L), IGNORE, dtype=torch.int64)
        inputs[:, 0:2 * P:2], inputs[:, 1:2 * P:2] = keys, values
        if R:   # drawn last, so that a task without conflicts samples exactly what it did before they existed
            rebound = torch.rand(n, P, generator=generator).argsort(dim=1)[:, :R]
            inputs[:, 2 * P:2 * (P + R):2], inputs[:, 2 * P + 1:2 * (P + R):2] = keys.gather(1, rebound), second
        query_pos = 2 * (P + R) + 2 * gaps
        inputs.scatter_(1, query_pos, keys)
        labels.scatter_(1, query_pos, values)
        return inputs, labels

    def conflicting_values(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[n, L] int64 from `sample`'s output: at each answer position whose key was bound a second time, the
        value of that second (conflicting) binding; IGNORE elsewhere."""
        if inputs.shape != labels.shape or inputs.dim() != 2:
            raise ValueError(f"inputs and labels must be [n, L] of one shape, got {tuple(inputs.shape)} and "
                             f"{tuple(labels.shape)}")
        P, R = self.num_pairs, self.conflicts
        rebound_keys = inputs[:, 2 * P:2 * (P + R):2, None]                  # [n, R, 1]
        second = inputs[:, 2 * P + 1:2 * (P + R):2, None]
        match = (inputs[:, None, :] == rebound_keys) & (labels != IGNORE)[:, None, :]    # [n, R, L]
        found = torch.where(match, second, 0).sum(1)                          # keys are distinct: <= 1 match
        return torch.where(match.any(1), found, IGNORE)


def split_seed(split: str, seed: int, index: int = 0) -> int:
    """The generator seed of batch `index` of a split: 2 (seed * 1_000_003 + index) + (0 train, 1 test).

    The parity bit keeps every train seed apart from every test seed.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for name, value in (("seed", seed), ("index", index)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return (2 * (seed * 1_000_003 + index) + SPLITS.index(split)) % (2 ** 63)


def chance_accuracy(task: MQARTask) -> float:
    """Accuracy of a guess that knows the answer is a value but not which: 1 / (V - V/2)."""
    return 1.0 / (task.vocab_size - task.vocab_size // 2)


