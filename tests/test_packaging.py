"""`kernels/` ships as `cortexlab.kernels` from an editable install and from a built wheel,
never as a top-level `kernels` module, and never shadows the hub's `kernels` package."""
import json
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNEL_FILES = sorted(p.name for p in (REPO / "kernels").glob("*.py"))


def python(code: str, cwd, **env) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_editable_install_imports_kernels(tmp_path):
    direct_url = metadata.distribution("cortexlab").read_text("direct_url.json")
    if not direct_url or not json.loads(direct_url).get("dir_info", {}).get("editable"):
        pytest.skip("cortexlab is not installed in editable mode here")
    found = python("import cortexlab.kernels as k; print(k.__file__)", cwd=tmp_path)
    assert Path(found) == REPO / "kernels" / "__init__.py"
    for name in KERNEL_FILES:
        module = name.removesuffix(".py")
        if module != "__init__":
            python(f"import cortexlab.kernels.{module}", cwd=tmp_path)


def test_built_wheel_ships_kernels_under_cortexlab(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("cortexlab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("kernels/")], "a top-level kernels/ was packaged"
    for name in KERNEL_FILES:
        assert f"cortexlab/kernels/{name}" in names
    assert "cortexlab/data/prompts/repetition_prompts.json" in names      # package data (the hooks' prompt set)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    found = python(
        "import importlib.util, cortexlab.kernels as k; print(k.__file__); "
        "print(getattr(importlib.util.find_spec('kernels'), 'origin', None))",
        cwd=tmp_path, PYTHONPATH=str(site),
    ).splitlines()
    assert Path(found[0]) == site / "cortexlab" / "kernels" / "__init__.py"
    assert found[1] == "None" or site not in Path(found[1]).parents, "the wheel put a top-level `kernels` module"


def test_repository_root_does_not_shadow_the_hub_kernels_package():
    """A Python started in the repo root sees kernels/ as a top-level folder. Importing `kernels` there must
    still give the hub package transformers depends on (and transformers must load), or fail as not installed."""
    pytest.importorskip("transformers")
    try:
        hub = metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        hub = None
    if hub is None:   # transformers' probe sees no hub package, so it never imports this folder
        assert python("import transformers.modeling_utils, sys; print('kernels' in sys.modules)", cwd=REPO) == "False"
    else:
        found = python("import transformers.modeling_utils, kernels; print(kernels.__file__)", cwd=REPO)
        assert Path(found) == Path(hub.locate_file("kernels/__init__.py")).resolve()
    missing = python("import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
                     "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('missing', e.name)",
                     cwd=REPO)    # no hub package: "not installed", never this folder
    assert missing == "missing kernels"
