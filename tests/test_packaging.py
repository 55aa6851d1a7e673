"""Packaging guards: the explicit ``packages`` list, the framework-free core, a regular wheel's contents."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _packages_on_disk() -> set[str]:
    """Every folder with an ``__init__.py`` under ``gradwatch/`` and ``integrations/``, as import names."""
    found: set[str] = set()
    for top, name in ((ROOT / "gradwatch", "gradwatch"), (ROOT / "integrations", "gradwatch.integrations")):
        for init in top.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(top).parts
            found.add(".".join((name, *rel)))
    return found


def test_every_subpackage_on_disk_is_listed_in_pyproject() -> None:
    listed = set(_setuptools_config()["packages"])
    missing = sorted(_packages_on_disk() - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages (and package-dir) in pyproject.toml"


def test_package_dir_maps_every_listed_package_to_an_existing_folder() -> None:
    config = _setuptools_config()
    mapping = config["package-dir"]
    assert mapping["gradwatch.integrations"] == "integrations"
    for package in config["packages"]:
        assert package in mapping, f"{package} has no package-dir entry"
        assert (ROOT / mapping[package] / "__init__.py").is_file(), package


def test_the_core_does_not_import_lightning() -> None:
    code = (
        "import importlib, pkgutil, sys\n"
        "import gradwatch\n"
        "for m in pkgutil.walk_packages(gradwatch.__path__, 'gradwatch.'):\n"
        "    if not m.name.startswith('gradwatch.integrations') and not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate'))\n"
        "print(len(bad), bad[:5])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("0 "), f"the core imported lightning or transformers/accelerate: {result.stdout}"


def test_integration_is_importable_under_its_public_name() -> None:
    pytest.importorskip("lightning")
    from gradwatch.integrations.lightning import GradWatchCallback

    assert Path(sys.modules[GradWatchCallback.__module__].__file__).resolve() == ROOT / "integrations" / "lightning.py"


@pytest.mark.slow
def test_regular_wheel_contains_the_integration(tmp_path: Path) -> None:
    # Build from a copy so the shared checkout gets no build/ or *.egg-info folders.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "gradwatch", src / "gradwatch", ignore=ignore)
    shutil.copytree(ROOT / "integrations", src / "integrations", ignore=ignore)
    out = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = out.glob("gradwatch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("gradwatch/__init__.py", "gradwatch/py.typed", "gradwatch/fixes/__init__.py",
                     "gradwatch/integrations/__init__.py", "gradwatch/integrations/lightning.py"):
        assert required in names, f"{required} missing from {wheel.name}"
    assert not any(n.startswith(("integrations/", "tests/")) for n in names)
