"""The data-directory lock `serve` holds around its embedded Redis (no Redis started here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from queueservice_server.embedded import DataDirError, DataDirLock


def test_one_holder_at_a_time_and_free_again_once_released(tmp_path: Path) -> None:
    data = tmp_path / "data"
    held = r"QUEUE_DATA_DIR=.*another queue-service holds it \(pid \d+\)"
    # flock is per open file, so a second lock in this process conflicts like another process's would.
    with DataDirLock(data), pytest.raises(DataDirError, match=held):
        DataDirLock(data).acquire()
    with DataDirLock(data):
        pass


def test_a_file_where_the_directory_should_be_is_named(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("")
    with pytest.raises(DataDirError, match="not a directory"):
        DataDirLock(tmp_path / "data").acquire()
