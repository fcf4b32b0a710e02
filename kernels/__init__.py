"""Triton kernels for the gated delta rule, shipped as `cortexlab.kernels`.

Import through `cortexlab.kernels` (or `cortexlab.ops.gated_delta_rule(backend="triton")`).
No top-level `kernels` module is installed: a PyPI package of that name exists and
transformers probes for it. This file stays free of imports and side effects, so that even
a Python started in the repository root, where `kernels/` is visible as a top-level
folder, leaves transformers' probe answering "not installed" (tests/test_packaging.py).
"""
