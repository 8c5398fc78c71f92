"""The built wheel holds, and imports, every module of the source tree.

An editable install finds any sub-folder, so a package missing from the wheel shows only
after a real install. This builds the wheel from a copy of the checkout, unpacks it, and
imports every module from the unpacked copy in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Import name -> source folder: the stages install under the pelmark namespace.
PACKAGE_ROOTS = {"pelmark": "pelmark", "pelmark.synth": "synth", "pelmark.train": "train", "pelmark.evaluate": "evaluate"}

IMPORT_ALL = """
import importlib, json, sys
found, failed = {}, {}
for name in json.loads(sys.argv[1]):
    try:
        found[name] = importlib.import_module(name).__file__
    except Exception as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"found": found, "failed": failed}))
"""


def source_modules() -> set[str]:
    """Every module of the checkout, by the name it imports as."""
    modules = set()
    for package, folder in PACKAGE_ROOTS.items():
        for path in (REPO_ROOT / folder).rglob("*.py"):
            parts = path.relative_to(REPO_ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules.add(".".join((package, *parts)))
    return modules


def wheel_modules(wheel: Path) -> set[str]:
    modules = set()
    for name in zipfile.ZipFile(wheel).namelist():
        if name.endswith(".py"):
            parts = Path(name).with_suffix("").parts
            modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built, without network or build isolation, from a clean copy of the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    # A copy, so that the build's egg-info and build/ folders never land in the checkout.
    shutil.copytree(
        REPO_ROOT,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "outputs", "runs", "*.egg-info", "*.zarr", "__pycache__", ".pytest_cache"),
    )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(source)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp / "dist").glob("pelmark-*.whl")
    return wheel


@pytest.mark.slow
def test_the_wheel_holds_every_module_of_the_source_tree(wheel):
    missing = source_modules() - wheel_modules(wheel)
    assert not missing, f"not in the wheel: {sorted(missing)}"
    entry_points = zipfile.ZipFile(wheel).read(f"pelmark-{version('pelmark')}.dist-info/entry_points.txt")
    assert "pelmark = pelmark.cli:app" in entry_points.decode()


@pytest.mark.slow
def test_every_module_imports_from_the_installed_wheel(wheel, tmp_path):
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    modules = sorted(source_modules())
    # cwd and -P keep the checkout off sys.path. The checkout's editable finder stays installed,
    # so where each module came from is checked below.
    done = subprocess.run(
        [sys.executable, "-P", "-c", IMPORT_ALL, json.dumps(modules)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["failed"] == {}
    outside = {name: file for name, file in result["found"].items() if not Path(file).is_relative_to(target)}
    assert outside == {}, "imported from outside the wheel"
    assert sorted(result["found"]) == modules
