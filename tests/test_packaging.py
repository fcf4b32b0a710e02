"""`kernels/` ships as `cortexlab.kernels` from an editable install and from a built wheel,
and never as a top-level `kernels` module."""
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
        "import importlib.util, cortexlab.kernels as k; print(k.__file__); print(importlib.util.find_spec('kernels'))",
        cwd=tmp_path, PYTHONPATH=str(site),
    ).splitlines()
    assert Path(found[0]) == site / "cortexlab" / "kernels" / "__init__.py"
    assert found[1] == "None", "a top-level `kernels` module is importable"


def test_repository_root_does_not_fool_transformers_kernels_probe():
    """Even with the repo root on sys.path, transformers must not think the hub `kernels` package exists."""
    pytest.importorskip("transformers")
    out = python("from transformers.utils.import_utils import is_kernels_available as f; print(f())", cwd=REPO)
    assert out == "False"
