"""Triton kernels for the gated delta rule, shipped as `cortexlab.kernels`.

Import through `cortexlab.kernels` (or `cortexlab.ops.gated_delta_rule(backend="triton")`).
No top-level `kernels` module is installed. But a Python started in the repository root
(`python -m ...`, `python -c ...`) sees this folder as a top-level `kernels`, which would
shadow the hub's `kernels` package, a dependency of transformers. Imported under that name,
this file therefore hands over to the installed hub package, or fails as "not installed"
when there is none (tests/test_packaging.py).
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    _root = Path(__file__).resolve().parents[1]
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if Path(p or ".").resolve() != _root])
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (the repository's kernels/ folder is cortexlab.kernels)",
                                  name="kernels")
    _hub = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _hub        # the import system returns what sys.modules holds once this file has run
    _spec.loader.exec_module(_hub)
