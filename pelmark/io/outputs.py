"""Where a command may write: the checks that keep ``--out`` and ``--overwrite`` off the user's own files.

Every command that writes a folder checks, before it touches anything, that
its output is not one of its own inputs (nor holds one, nor lies inside one),
and each stage replaces an existing output only when it carries that stage's
own mark (a store's ``format`` attribute, an eval folder's marker file, a
run's ``run.json``). These are the shared pieces of those checks.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pelmark.errors import PelmarkError


def overlaps(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` are the same path or one lies inside the other (links resolved)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


def refuse_inputs(out: Path, inputs: Iterable[tuple[str, Path]]) -> None:
    """Refuse an output that is, holds, or lies inside one of the command's inputs.

    Args:
        out: the output path the command would write.
        inputs: (what it is, path) pairs, e.g. ``("the store", store)``.

    Raises:
        PelmarkError: naming ``out`` and the input it collides with.
    """
    for what, path in inputs:
        if overlaps(out, path):
            relation = "be or hold" if Path(path).is_file() else "be, hold or lie inside"
            raise PelmarkError(f"--out must not {relation} {what} ({path}); choose another --out", out)


def is_empty_folder(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and not any(path.iterdir())
