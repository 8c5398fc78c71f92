"""pelmark.io.atomic: a write or a folder publish either completes or leaves the old content and no temporary."""

from __future__ import annotations

import pytest

from pelmark.io.atomic import atomic_open, atomic_path, publish_folder, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "run.json"
    write_text_atomic(path, "old\n")
    with pytest.raises(RuntimeError, match="disk"):
        with atomic_open(path, "wb") as handle:
            handle.write(b"half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_a_written_path_replaces_the_file_under_a_temporary_name_with_the_suffix(tmp_path):
    path = tmp_path / "ct.nii.gz"
    with atomic_path(path, ".nii.gz") as temporary:
        assert temporary.parent == tmp_path and temporary.name.startswith(".ct.nii.gz.") and temporary.name.endswith(".tmp.nii.gz")
        temporary.write_bytes(b"voxels")
        assert not path.exists()
    assert path.read_bytes() == b"voxels" and [p.name for p in tmp_path.iterdir()] == ["ct.nii.gz"]


def test_publish_folder_replaces_an_old_folder_only_at_the_end(tmp_path):
    out, staging = tmp_path / "out", tmp_path / ".out.staging"
    out.mkdir()
    (out / "old.txt").write_text("old")
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    publish_folder(staging, out)
    assert [p.name for p in out.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]
