"""captioner.files: atomic writes with the modes a plain open()/mkdir() would give."""

from __future__ import annotations

import json
import os

import pytest

from captioner import files
from captioner.files import atomic_dir, write_bytes_atomic, write_json_atomic, write_text_atomic
from tests.conftest import assert_umask_modes


def test_umask_is_read_without_changing_it(umask, monkeypatch):
    assert files.umask() == umask
    assert os.umask(umask) == umask  # still set: nothing changed it
    monkeypatch.setattr(files, "_PROC_STATUS", "/nonexistent/status")  # not Linux: the probe
    assert files.umask() == umask
    assert os.umask(umask) == umask


def test_writers_give_the_modes_the_umask_implies(tmp_path, umask):
    out = tmp_path / "out"
    write_bytes_atomic(out / "a.bin", b"\x00\x01")
    write_text_atomic(out / "b.txt", "héllo\n")
    write_json_atomic(out / "sub" / "c.json", {"x": [1, 2]})  # the folders are created too
    write_json_atomic(out / "c.json", {"again": True})
    write_json_atomic(out / "c.json", {"again": 2})  # replacing a file: the same
    assert (out / "a.bin").read_bytes() == b"\x00\x01"
    assert (out / "b.txt").read_bytes() == "héllo\n".encode()
    assert (out / "c.json").read_text() == '{\n  "again": 2\n}\n'  # indent 2, final newline
    assert json.loads((out / "sub" / "c.json").read_text()) == {"x": [1, 2]}
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", "b.txt", "c.json", "sub"]
    assert_umask_modes(umask, out)


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"v": 1})
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "m.json", {"v": object()})  # fails before the temp file
    with pytest.raises(TypeError):
        write_bytes_atomic(tmp_path / "m.json", "not bytes")  # fails inside the temp file
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
    assert json.loads((tmp_path / "m.json").read_text()) == {"v": 1}


def test_atomic_dir_appears_whole_with_the_modes_the_umask_implies(tmp_path, umask):
    target = tmp_path / "parent" / "model"
    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent
        assert tmp.name.startswith(".model.tmp-")  # what checkpoint.recover_model_dir deletes
        assert_umask_modes(umask, tmp)
        (tmp / "weights.bin").write_bytes(b"w")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.json").write_text("{}")
        assert not target.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]
    assert (target / "weights.bin").read_bytes() == b"w"
    assert_umask_modes(umask, target.parent)


def test_atomic_dir_that_fails_leaves_nothing_and_the_old_folder(tmp_path):
    with atomic_dir(tmp_path / "m") as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError, match="midway"), atomic_dir(tmp_path / "m") as tmp:
        (tmp / "v").write_text("2")
        raise RuntimeError("midway")
    with pytest.raises(OSError), atomic_dir(tmp_path / "m") as tmp:  # os.replace: not empty
        (tmp / "v").write_text("3")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert (tmp_path / "m" / "v").read_text() == "1"
