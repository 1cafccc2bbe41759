"""files.py: the one atomic writer every file replora writes goes through."""
from __future__ import annotations

import os

import pytest

from replora.files import write_file, write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = write_text(tmp_path / "metrics.json", "old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_file(target, broken)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    assert write_text(target, "new").read_text() == "new"


def test_new_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = write_text(tmp_path / "sub" / "a.txt", "x")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600: others read the adapter too


def test_a_folder_is_not_overwritten_as_a_file(tmp_path):
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        write_text(tmp_path, "x")


def test_what_a_killed_writer_left_is_removed_and_nothing_else(tmp_path):
    from replora.files import remove_stale_temporaries

    (tmp_path / ".latest.123-ab12cd34.tmp").write_text("half")  # write_file's
    (tmp_path / ".epoch-2.tmp-xyz").mkdir()  # write_folder's
    (tmp_path / ".epoch-2.tmp-xyz" / "adapter_model.safetensors").write_text("half")
    (tmp_path / "epoch-1").mkdir()
    write_text(tmp_path / "latest", "epoch-1")
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-1", "latest"]
