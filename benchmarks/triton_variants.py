"""Time settings of the Triton kernels on a CUDA GPU: dot precision, value columns per program, chunk cap.

    python benchmarks/triton_variants.py                      # bf16 B=1 T=8192 H=16 D=128
    python benchmarks/triton_variants.py --T 2048 --D 64 --out results/triton_variants.json

Each variant is timed with `triton.testing.do_bench` (forward under no_grad, forward+backward) and
its output and input-gradient errors are measured against the torch "chunk" backend in fp32 on the
same inputs and output gradient. The variants set the backend's private knobs
(`_dot_precision`, `_MAX_BV`, `_MAX_CHUNK_WIDE_KEYS`); this is a tuning tool, not an API.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import traceback

import torch

from cortexlab.eval.speed import (
    accuracy_vs_reference,
    forward_backward_call,
    forward_call,
    fp32_reference,
    gated_delta_fn,
    gated_delta_inputs,
)
from cortexlab.ops import triton_backend


def timed(fn, inputs) -> dict:
    """Median milliseconds of the forward (no_grad) and of forward+backward, by triton.testing.do_bench."""
    import triton

    return {"fwd_ms": triton.testing.do_bench(forward_call(fn, inputs), warmup=10, rep=60),
            "fwdbwd_ms": triton.testing.do_bench(forward_backward_call(fn, inputs, out_shape=inputs[2].shape),
                                                 warmup=10, rep=60)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("B", 1), ("T", 8192), ("H", 16), ("D", 128)):
        parser.add_argument("--" + name, type=int, default=default)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--precisions", default="tf32,ieee")
    parser.add_argument("--max-bv", default="32,64", help="value columns per program")
    parser.add_argument("--chunks", default="32,64", help="chunk_size values asked for")
    parser.add_argument("--wide-caps", default="32", help="chunk caps for head dims above 64")
    parser.add_argument("--out", help="JSON written after every variant")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to time")
        return 0
    cfg = {"B": args.B, "T": args.T, "H": args.H, "D": args.D, "dtype": args.dtype}
    inputs = gated_delta_inputs(args.B, args.T, args.H, args.D, dtype=getattr(torch, args.dtype), device="cuda")
    grad_out, reference = fp32_reference(inputs)
    split = lambda text, kind: [kind(x) for x in text.split(",") if x]  # noqa: E731
    rows = []
    for prec, bv, chunk, cap in itertools.product(split(args.precisions, str), split(args.max_bv, int),
                                                  split(args.chunks, int), split(args.wide_caps, int)):
        row = {"precision": prec, "max_bv": bv, "chunk_size": chunk, "wide_cap": cap}
        triton_backend._dot_precision = lambda *dtypes, p=prec: p
        triton_backend._MAX_BV, triton_backend._MAX_CHUNK_WIDE_KEYS = bv, cap
        try:
            fn = gated_delta_fn("triton", chunk_size=chunk)
            row.update(timed(fn, inputs))
            row["rrmse_vs_chunk_fp32"] = accuracy_vs_reference(fn, inputs, grad_out, reference)
        except Exception:
            row["error"] = traceback.format_exc()[-1500:]
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"config": cfg, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                           "command": " ".join(["python", *sys.argv]), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
