"""Measure a callable: wall time of forward and forward+backward, and peak memory.

Small building blocks used by `benchmarks/bench_gated_delta.py` and the notebooks:

- `time_call(fn)`: warm-up calls, then the median (and min) of `repeats` timed calls, with
  an optional thread count set for the duration (torch.set_num_threads) and CUDA
  synchronisation around each call.
- `peak_memory(fn)`: the extra memory a call needs at its peak. On CUDA this is
  `torch.cuda.max_memory_allocated` minus what was allocated before. On a CPU torch keeps
  no such counter, so on Linux we read the process's resident-set high-water mark: writing
  "5" to /proc/self/clear_refs resets VmHWM to the current RSS, and VmHWM - VmRSS(before)
  after the call is the peak growth. This counts pages actually touched (a torch.empty
  that is never written costs nothing) and anything else the process does meanwhile, so
  for a clean number run it in a fresh process (`benchmarks/` does).
- `gated_delta_inputs(...)`: standard random inputs for the gated delta rule.
- `gated_delta_fn(name)`: a uniform `fn(q, k, v, g, beta) -> o` for each cortexlab backend
  and for transformers' torch implementation (the peer we compare against).
- `time_backends_vs_length(...)`: rows of (backend, T, fwd_s, fwdbwd_s) for a plot.

Speed is never asserted in unit tests: these functions only report numbers.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from cortexlab.checks import check_int

# ---------------------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    """Wall-clock seconds of `repeats` calls (after warm-up)."""

    median_s: float
    min_s: float
    times_s: list[float]

    def as_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def num_threads(n: int | None):
    """Run the block with torch.set_num_threads(n) (no change when n is None), then restore."""
    check_int("num_threads", n, allow_none=True)
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5, threads: int | None = None,
              device: torch.device | str | None = None) -> Timing:
    """Call `fn()` `warmup` times untimed, then `repeats` times timed; median and min seconds.

    `threads`: torch.set_num_threads for the duration (restored after). `device`: pass the
    CUDA device when `fn` launches kernels, so that each call is timed to completion
    (torch.cuda.synchronize before and after).
    """
    return time_calls({"fn": fn}, warmup=warmup, repeats=repeats, threads=threads, device=device)["fn"]


def time_calls(calls: Mapping[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 5,
               threads: int | None = None, device: torch.device | str | None = None) -> dict[str, Timing]:
    """Time several callables round-robin (a, b, c, a, b, c, ...), so that a change in machine
    load during the measurement hits all of them alike and their ratios stay meaningful."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    times: dict[str, list[float]] = {name: [] for name in calls}
    with num_threads(threads):
        for _ in range(warmup):
            for fn in calls.values():
                fn()
        for _ in range(repeats):
            for name, fn in calls.items():
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - start)
    return {name: Timing(statistics.median(ts), min(ts), ts) for name, ts in times.items()}


def forward_call(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]) -> Callable[[], torch.Tensor]:
    """A no-argument closure running `fn(*inputs)` under torch.no_grad (inference forward)."""

    def call():
        with torch.no_grad():
            return fn(*inputs)

    return call


def forward_backward_call(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], *,
                          out_shape: Sequence[int] | None = None, seed: int = 0) -> Callable[[], None]:
    """A no-argument closure running forward + backward of `fn(*inputs)` against a fixed
    random output gradient, into fresh leaf copies of the floating inputs (so repeated calls
    never accumulate .grad and never share a graph).

    `out_shape`: the output's shape; when None, one untimed forward finds it (pass it when
    the first call itself is what you measure, e.g. peak memory in a fresh process).
    """
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    if out_shape is None:
        with torch.no_grad():
            out_shape = fn(*inputs).shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    grad_out = torch.randn(out_shape, generator=gen).to(device=inputs[0].device, dtype=inputs[-1].dtype)

    def call():
        for x in leaves:
            x.grad = None
        out = fn(*leaves)
        torch.autograd.backward(out, grad_out.to(out.dtype))

    return call


# ---------------------------------------------------------------------------------------
# peak memory

_PROC_STATUS = "/proc/self/status"
_PROC_CLEAR_REFS = "/proc/self/clear_refs"


def _proc_status_bytes(field: str) -> int:
    with open(_PROC_STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not found in {_PROC_STATUS}")


def cpu_peak_memory_supported() -> bool:
    """True on Linux when the resident-set high-water mark can be reset (see module doc)."""
    try:
        with open(_PROC_CLEAR_REFS, "w") as f:
            f.write("5")
        _proc_status_bytes("VmHWM")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], object], *, device: torch.device | str = "cpu") -> int:
    """Bytes of memory `fn()` needs at its peak beyond what was in use before the call.

    CUDA: torch.cuda.max_memory_allocated (torch's own allocations only).
    CPU (Linux): growth of the process's resident-set high-water mark (VmHWM) after
    resetting it through /proc/self/clear_refs, once the C allocator has returned its free pages
    to the system (memory freed earlier but kept resident would otherwise serve fn's allocations
    unseen). Raises RuntimeError where neither exists.
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    if not cpu_peak_memory_supported():
        raise RuntimeError("CPU peak memory needs Linux /proc/self/clear_refs and VmHWM")
    _release_free_heap()
    with open(_PROC_CLEAR_REFS, "w") as f:
        f.write("5")  # VmHWM := current VmRSS
    before = _proc_status_bytes("VmRSS")
    fn()
    return max(0, _proc_status_bytes("VmHWM") - before)


def _release_free_heap() -> None:
    """glibc's malloc_trim(0): give every arena's whole free pages back to the system (a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------------------------
# gated delta rule: inputs and a uniform call signature per implementation


class GatedDeltaInputs(NamedTuple):
    """Positional order shared by cortexlab and transformers: (q, k, v, g, beta)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor


def gated_delta_inputs(B: int, T: int, H: int, D: int, *, Dv: int | None = None, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu", seed: int = 0, decay: float = 1.0) -> GatedDeltaInputs:
    """Random gated-delta-rule inputs, layout [B, T, H, D] (g and beta [B, T, H]).

    q and k are L2-normalised over D (as Qwen3-Next / fla do before the kernel); v is
    standard normal; g = -decay * softplus(noise - 2) is a small negative log forget gate
    (about -0.13 on average for decay=1, i.e. a ~ 0.88); beta = sigmoid(noise) lies in (0, 1).
    Generated in fp32 on the CPU with `seed`, then cast and moved.
    """
    for name, val in (("B", B), ("T", T), ("H", H), ("D", D)):
        check_int(name, val)
    Dv = D if Dv is None else Dv
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1)
    v = torch.randn(B, T, H, Dv, generator=gen)
    g = -decay * F.softplus(torch.randn(B, T, H, generator=gen) - 2.0)
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen))
    return GatedDeltaInputs(*(x.to(device=device, dtype=dtype) for x in (q, k, v, g, beta)))


CORTEXLAB_BACKENDS = ("recurrent", "chunk", "triton")
PEERS = ("transformers", "fla")


def gated_delta_fn(name: str, *, chunk_size: int = 64) -> Callable[..., torch.Tensor]:
    """`fn(q, k, v, g, beta) -> o` for a cortexlab backend or a peer implementation.

    All compute the same thing: scale = D**-0.5, no extra normalisation of q/k inside (the
    inputs from `gated_delta_inputs` are already L2-normalised), zero initial state.
    Names: "recurrent", "chunk", "triton" (cortexlab backends), "transformers"
    (`torch_chunk_gated_delta_rule` of transformers' Qwen3-Next), "fla"
    (flash-linear-attention's `chunk_gated_delta_rule`, CUDA only).
    """
    if name in CORTEXLAB_BACKENDS:
        from cortexlab.ops import gated_delta_rule

        def fn(q, k, v, g, beta):
            return gated_delta_rule(q, k, v, g, beta, backend=name, chunk_size=chunk_size)[0]

        return fn
    if name == "transformers":
        import inspect

        from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

        # transformers swaps fla's kernel in under this name when fla is installed; the peer is its torch path
        torch_path = inspect.unwrap(torch_chunk_gated_delta_rule)

        def fn(q, k, v, g, beta):
            return torch_path(q, k, v, g, beta, chunk_size=chunk_size)[0]

        return fn
    if name == "fla":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        def fn(q, k, v, g, beta):
            return chunk_gated_delta_rule(q, k, v, g, beta, scale=q.shape[-1] ** -0.5)[0]

        return fn
    raise ValueError(f"unknown implementation {name!r}; expected one of {CORTEXLAB_BACKENDS + PEERS}")


def relative_rmse(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (the accuracy measure of DESIGN.md §5)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


GRAD_NAMES = ("q", "k", "v", "g", "beta")


def fp32_reference(inputs: Sequence[torch.Tensor], seed: int = 1) -> tuple[torch.Tensor, tuple]:
    """An output gradient and the torch "chunk" backend's fp32 answer on `inputs` (any dtype):
    (grad_out, (o, input gradients)). grad_out is drawn with `seed` and rounded to the inputs' dtype
    (returned in fp32), so the reference and a low-precision run see the same output gradient."""
    v = inputs[2]
    grad_out = torch.randn(v.shape, generator=torch.Generator().manual_seed(seed)).to(v.device, v.dtype).float()
    leaves = [x.detach().float().requires_grad_(True) for x in inputs]
    o = gated_delta_fn("chunk")(*leaves)
    return grad_out, (o.detach(), torch.autograd.grad(o, leaves, grad_out))


def accuracy_vs_reference(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], grad_out: torch.Tensor,
                          reference: tuple) -> dict:
    """Relative RMSE of fn's output ("out") and of each input gradient ("dq", ..., "dbeta") against
    `reference` from `fp32_reference`."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    o = fn(*leaves)
    grads = torch.autograd.grad(o, leaves, grad_out.to(o.dtype))
    return {"out": relative_rmse(o, reference[0]),
            **{f"d{name}": relative_rmse(g, r) for name, g, r in zip(GRAD_NAMES, grads, reference[1])}}


def backend_agreement(backend: str, T: int, *, reference: str = "recurrent", B: int = 1, H: int = 2, D: int = 16,
                      chunk_size: int = 64, initial_state: bool = True, dtype: torch.dtype = torch.float32,
                      seed: int = 0) -> dict:
    """Relative RMSE of `backend` against `reference` (cortexlab.ops.gated_delta_rule) on one
    random input: output, final state and the gradients of every input under a fixed random
    linear loss of (output, final state). Returns {"backend", "T", "chunk_size", "out", "state",
    "grad"} where "grad" is the worst input gradient."""
    from cortexlab.ops import gated_delta_rule

    x = gated_delta_inputs(B, T, H, D, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    h0 = torch.randn(B, H, D, D, generator=gen).to(dtype) if initial_state else None
    w_o = torch.randn(B, T, H, D, generator=gen)
    w_s = torch.randn(B, H, D, D, generator=gen)
    results = []
    for name in (reference, backend):
        leaves = [t.detach().clone().requires_grad_(True) for t in (*x, *(() if h0 is None else (h0,)))]
        o, s = gated_delta_rule(*leaves[:5], initial_state=leaves[5] if h0 is not None else None,
                                output_final_state=True, chunk_size=chunk_size, backend=name)
        loss = (o.float() * w_o).sum() + (s.float() * w_s).sum()
        results.append((o, s, torch.autograd.grad(loss, leaves)))
    (o_ref, s_ref, g_ref), (o, s, grads) = results
    return {"backend": backend, "T": T, "chunk_size": chunk_size, "out": relative_rmse(o, o_ref),
            "state": relative_rmse(s, s_ref), "grad": max(relative_rmse(a, b) for a, b in zip(grads, g_ref))}


def time_backends_vs_length(backends: Iterable[str] = ("recurrent", "chunk"), lengths: Iterable[int] = (64, 256, 1024),
                            *, B: int = 1, H: int = 2, D: int = 32, dtype: torch.dtype = torch.float32,
                            device: torch.device | str = "cpu", chunk_size: int = 64, warmup: int = 1,
                            repeats: int = 3, threads: int | None = None, backward: bool = True,
                            progress: bool = False) -> list[dict]:
    """Time each backend at each sequence length T; one row per (backend, T):

        {"backend", "T", "B", "H", "D", "fwd_s", "fwdbwd_s"}   (median seconds; fwdbwd_s is
        None when backward=False)
    """
    backends, lengths = list(backends), list(lengths)
    if not backends or not lengths:
        raise ValueError("backends and lengths must be non-empty")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(lengths), desc="timing vs T")
    rows = []
    for T in lengths:  # all backends at one T are timed round-robin (see time_calls)
        inputs = gated_delta_inputs(B, T, H, D, dtype=dtype, device=device, seed=T)
        fns = {name: gated_delta_fn(name, chunk_size=chunk_size) for name in backends}
        kw = dict(warmup=warmup, repeats=repeats, threads=threads, device=device)
        fwd = time_calls({n: forward_call(f, inputs) for n, f in fns.items()}, **kw)
        fwdbwd = (time_calls({n: forward_backward_call(f, inputs, out_shape=inputs.v.shape) for n, f in fns.items()},
                             **kw) if backward else {})
        for name in backends:
            bwd = fwdbwd.get(name)
            rows.append({"backend": name, "T": T, "B": B, "H": H, "D": D, "fwd_s": fwd[name].median_s,
                         "fwdbwd_s": None if bwd is None else bwd.median_s})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows


def speedups(rows: Sequence[dict], *, reference: str, metric: str = "fwdbwd_s") -> list[dict]:
    """For every row, `reference`'s time at the same T divided by the row's time (`speedup`).

    Rows at a T where the reference was not timed are dropped.
    """
    ref = {r["T"]: r[metric] for r in rows if r["backend"] == reference and r[metric]}
    return [{**r, "speedup": ref[r["T"]] / r[metric]} for r in rows if r["T"] in ref and r[metric]]


def environment_info() -> dict:
    """Versions and machine facts worth writing beside any timing."""
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info
