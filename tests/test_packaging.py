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


def test_repository_root_does_not_shadow_the_hub_kernels_package(tmp_path):
    """A Python started in the repo root sees kernels/ as a top-level folder. transformers must still load there:
    with the hub's `kernels` package installed, `kernels` is that package; without it, the probe says "not
    installed" (the folder stays an empty module without a version)."""
    transformers = pytest.importorskip("transformers")
    probe = ("import sys, transformers.modeling_utils\n"
             "from transformers.utils.import_utils import is_kernels_available\n"
             "print(is_kernels_available()); print(getattr(sys.modules.get('kernels'), '__file__', None))")
    try:
        hub = metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        hub = None
    if hub is not None:
        found = python(probe, cwd=REPO).splitlines()[-1]
        assert Path(found).resolve() == Path(hub.locate_file("kernels/__init__.py")).resolve()
    # the same packages without the hub's: a view of site-packages without it, read with python -S
    site = Path(transformers.__file__).resolve().parent.parent
    view = tmp_path / "site"
    view.mkdir()
    for entry in site.iterdir():
        if entry.name != "kernels" and not entry.name.startswith("kernels-"):
            (view / entry.name).symlink_to(entry)
    result = subprocess.run([sys.executable, "-S", "-c", probe], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(view)}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ["False", str(REPO / "kernels" / "__init__.py")]
