"""pelmark synth's writer thread: writes in order, errors reach the renderer, and the run reports its DRR rate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from cohort_fixtures import write_bead_cohort
from pelmark.cli import app
from pelmark.synth.pipeline import StoreWriter, run_synth


class _Refusing:
    """An array whose writes fail, as a full disk would."""

    def __setitem__(self, rows, values):
        raise OSError("No space left on device")


def test_writes_land_in_order_and_are_all_done_on_exit(tmp_path):
    array = zarr.create_array(str(tmp_path / "a.zarr"), shape=(12, 3), chunks=(1, 3), dtype="int32", fill_value=0)
    with StoreWriter(depth=1) as writer:
        for start in range(0, 12, 2):
            writer.put(array, slice(start, start + 2), np.full((2, 3), start // 2 + 1, dtype=np.int32))
        # The same rows again: the later write must win, as it would without the thread.
        writer.put(array, slice(0, 2), np.full((2, 3), 99, dtype=np.int32))
    expected = np.repeat(np.arange(1, 7, dtype=np.int32), 2)[:, None].repeat(3, axis=1)
    expected[:2] = 99
    np.testing.assert_array_equal(array[:], expected)


def test_a_failed_write_is_raised_in_the_rendering_thread():
    with pytest.raises(OSError, match="No space left"):
        with StoreWriter(depth=1) as writer:
            for _ in range(5):  # a later put or the exit raises it; the queue never blocks for good
                writer.put(_Refusing(), slice(0, 1), np.zeros(1))


def test_an_error_while_rendering_is_not_masked_by_the_writer():
    with pytest.raises(ValueError, match="renderer"):
        with StoreWriter() as writer:
            writer.put(_Refusing(), slice(0, 1), np.zeros(1))
            raise ValueError("renderer failed")


def test_the_run_reports_its_drr_rate_and_a_resumed_run_renders_none(tmp_path):
    cohort = write_bead_cohort(tmp_path / "cohort")
    store = tmp_path / "s.zarr"
    first = run_synth(cohort, store, {"scheduler": "sync"}, progress=False)
    assert first.rendered_images == first.n_images > 0
    assert first.seconds > 0 and first.drr_per_s == pytest.approx(first.n_images / first.seconds)
    again = run_synth(cohort, store, {"scheduler": "sync"}, progress=False)
    assert again.rendered_images == 0 and again.drr_per_s == 0.0


def test_the_cli_prints_the_drr_rate(tmp_path):
    cohort = write_bead_cohort(tmp_path / "cohort")
    result = CliRunner().invoke(app, ["synth", str(cohort), "--out", str(tmp_path / "s.zarr"), "--no-progress", "--scheduler", "sync"])
    assert result.exit_code == 0, result.output
    assert "DRR/s" in result.output
