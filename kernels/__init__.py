"""Triton kernels for the gated delta rule, shipped as `cortexlab.kernels`.

Import through `cortexlab.kernels` (or `cortexlab.ops.gated_delta_rule(backend="triton")`).
No top-level `kernels` module is installed. But a Python started in the repository root
(`python -m ...`, `python -c ...`) sees this folder as a top-level `kernels`, which would
shadow the hub's `kernels` package, a dependency of recent transformers. Imported under that
name, this file hands over to the installed hub package; with none installed it stays an
empty module without a version, which transformers' probe reads as "not installed"
(tests/test_packaging.py).
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _elsewhere(entry) -> bool:
        """Whether a sys.path entry is not the folder that holds this one (the repository root)."""
        try:
            return not os.path.samefile(entry or ".", os.path.dirname(os.path.dirname(__file__)))
        except (TypeError, ValueError, OSError):   # not a path, or not there: PathFinder skips it as well
            return True

    _spec = importlib.machinery.PathFinder.find_spec("kernels", [p for p in sys.path if _elsewhere(p)])
    if _spec is not None and _spec.origin and not os.path.samefile(_spec.origin, __file__):
        _hub = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _hub     # the import system returns what sys.modules holds once this file has run
        _spec.loader.exec_module(_hub)
