"""Safe folder reading: symlinks never followed, undecodable names skipped, huge files read head + tail."""

from __future__ import annotations

import os

import pytest

from validator.folder import open_folder


def test_symlink_outside_is_an_error_and_never_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    folder = tmp_path / "sub"
    folder.mkdir()
    (folder / "ok.log").write_text("x")
    os.symlink(secret, folder / "train_seed1.log")
    os.symlink(folder / "ok.log", folder / "inside.log")
    listed = open_folder(folder)
    assert set(listed.files) == {"ok.log"}
    codes = {f.code: f.severity.value for f in listed.findings}
    assert codes["SYMLINK_OUTSIDE_FOLDER"] == "error" and codes["SYMLINK"] == "note"
    assert listed.read_text("train_seed1.log") is None
    assert listed.read_text("../secret.txt") is None


def test_non_utf8_name_is_reported(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    os.close(os.open(os.path.join(os.fsencode(folder), b"bad\xff.log"), os.O_CREAT | os.O_WRONLY, 0o644))
    listed = open_folder(folder)
    assert listed.files == {}
    assert [f.code for f in listed.findings] == ["NAME_NOT_UTF8"]


def test_large_file_is_read_as_head_and_tail(tmp_path, monkeypatch):
    import validator.folder as vf

    monkeypatch.setattr(vf, "READ_CAP_BYTES", 1000)
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "big.log").write_bytes(b"HEAD" + b"x" * 5000 + b"TAIL")
    listed = vf.open_folder(folder)
    data = listed.read_bytes("big.log")
    assert data.startswith(b"HEAD") and data.endswith(b"TAIL") and len(data) <= 1001
    assert any(f.code == "FILE_LARGE" for f in listed.findings)


def test_folder_argument_errors(tmp_path):
    with pytest.raises(NotADirectoryError, match="not a directory"):
        open_folder(tmp_path / "missing")
    os.symlink(tmp_path, tmp_path / "link")
    with pytest.raises(NotADirectoryError, match="symlink"):
        open_folder(tmp_path / "link")
