"""One atomic writer: whole files or none, synced, with the umask's permissions."""

import os

import pytest

from layerscope.probes.files import atomic_path, build_dir_atomic, safe_name, write_atomic


def test_write_atomic_replaces_whole_and_respects_the_umask(tmp_path):
    target = tmp_path / "table.json"
    target.write_text("old")
    before = os.umask(0o027)
    try:
        write_atomic(target, "new")
    finally:
        os.umask(before)
    assert target.read_text() == "new"
    assert oct(target.stat().st_mode & 0o777) == oct(0o640)
    assert [p.name for p in tmp_path.iterdir()] == ["table.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_folder_is_published_whole_or_not_at_all(tmp_path):
    def build(staging):
        (staging / "a").write_text("1")
        (staging / "b").write_text("2")

    build_dir_atomic(tmp_path / "model", build)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["a", "b"]

    def broken(staging):
        (staging / "a").write_text("1")
        raise OSError("disk full")

    with pytest.raises(OSError):
        build_dir_atomic(tmp_path / "other", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_safe_name():
    assert safe_name("/models/My Model@peri") == "My_Model_peri"
    assert safe_name("org/name") == "name"
