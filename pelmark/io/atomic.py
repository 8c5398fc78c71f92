"""Writes that a reader never sees half done: a temporary name beside the target, then a rename.

Every file pelmark writes goes through here (landmark files, manifests, CTs,
label volumes, checkpoints, ONNX models, run.json, reports), and so does
every output folder that is built aside and put in place at the end (an
import, an eval folder). ``os.replace`` is atomic within a file system, which
is why the temporary name always lies beside the target, never in /tmp. An
interrupted write leaves the old file (or folder) in place and removes its
temporary; one killed outright leaves at worst a dot-file ending in ``.tmp``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def temporary_path(path: Path, suffix: str = "") -> Path:
    """A fresh hidden name beside ``path``: ``.<name>.<random>.tmp<suffix>``.

    ``suffix`` is for writers that choose the format by the file name (SimpleITK).
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; rename it over ``path`` when the block succeeds.

    When the block raises, the temporary (if it was written) is removed and ``path`` is untouched.
    """
    path = Path(path)
    temporary = temporary_path(path, suffix)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path`` (``"w"``: UTF-8 text, ``"wb"``: bytes), fsync it, rename it over ``path``.

    The file is created with ``os.open``, so the result gets the usual umask
    permissions (``tempfile``'s would be 0600).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole file: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as temporary:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        text = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
        with open(fd, mode, **text) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` through a temporary file and a rename."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def publish_folder(staging: Path, out: Path) -> None:
    """Rename the finished folder ``staging`` to ``out``, replacing what is at ``out`` only now.

    ``out``'s old content is moved aside first and deleted only after the rename; if the
    rename fails it is put back. ``staging`` must lie beside ``out`` (same file system).
    """
    staging, out = Path(staging), Path(out)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:12]}"
        os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
