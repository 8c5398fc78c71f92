"""What a run or a store records about the software that made it: git revision, package versions, time."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path


def git_revision() -> str | None:
    """The pelmark checkout's git revision (with '+dirty' for local changes), or None outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def package_versions() -> dict[str, str]:
    """Versions of pelmark and the packages that decide its results ("not installed" for a missing one)."""
    from importlib import metadata

    versions = {}
    for name in ("pelmark", "diffdrr", "torch", "numpy", "zarr", "SimpleITK", "dask"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def now_utc() -> str:
    """The time now, UTC, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
