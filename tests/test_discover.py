"""Discovery: listing, classification, and the new / changed / touched / unchanged diff."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medflow.tasks.discover import (
    KnownSource,
    classify_name,
    content_hash,
    diff_sources,
    list_archive,
)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("a/b/IM0001", "dicom"),
        ("x.dcm", "dicom"),
        ("v.nii.gz", "nifti"),
        ("v.NII", "nifti"),
        ("p.PNG", "image"),
        ("p.tiff", "image"),
        ("clip.mp4", "video"),
        ("clip.MOV", "video"),
        ("README.txt", "other"),
    ],
)
def test_classify_name(name: str, kind: str) -> None:
    assert classify_name(name) == kind


def _write(p: Path, data: bytes) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def _known(archive: Path, rel: str) -> KnownSource:
    st = (archive / rel).stat()
    return KnownSource(
        relpath=rel,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        content_hash=content_hash(str(archive), rel, st.st_size),
        kind=classify_name(rel),
        series_key="k",
        status="ingested",
        error=None,
    )


def test_list_skips_hidden_and_sorts(tmp_path: Path) -> None:
    _write(tmp_path / "b" / "2.dcm", b"x")
    _write(tmp_path / "a.nii", b"y")
    _write(tmp_path / ".hidden" / "z.dcm", b"z")
    _write(tmp_path / "b" / ".DS_Store", b"z")
    assert [f.relpath for f in list_archive(str(tmp_path))] == ["a.nii", "b/2.dcm"]


def test_list_missing_folder_is_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such folder"):
        list_archive(str(tmp_path / "nope"))


def test_diff_new_changed_touched_unchanged_missing(tmp_path: Path) -> None:
    for name in ("same.dcm", "touch.dcm", "edit.dcm", "gone.dcm"):
        _write(tmp_path / name, name.encode() * 1000)
    known = {r: _known(tmp_path, r) for r in ("same.dcm", "touch.dcm", "edit.dcm", "gone.dcm")}
    os.remove(tmp_path / "gone.dcm")
    st = (tmp_path / "touch.dcm").stat()
    os.utime(tmp_path / "touch.dcm", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _write(tmp_path / "edit.dcm", b"different content" * 500)
    _write(tmp_path / "new.nii", b"n")
    _write(tmp_path / "notes.txt", b"t")
    d = diff_sources(str(tmp_path), list_archive(str(tmp_path)), known)
    assert [f.relpath for f in d.new] == ["new.nii"]
    assert [f.relpath for f in d.changed] == ["edit.dcm"]
    assert [f.relpath for f, _ in d.touched] == ["touch.dcm"]
    assert d.unchanged == 1
    assert d.missing == ["gone.dcm"]
    assert d.ignored == 1
    assert set(d.hashes) == {"new.nii", "edit.dcm"}


def test_content_hash_sees_tail_change_of_large_file(tmp_path: Path) -> None:
    body = bytearray(os.urandom(300_000))
    _write(tmp_path / "big.dcm", bytes(body))
    h1 = content_hash(str(tmp_path), "big.dcm", len(body))
    body[-10] ^= 0xFF
    _write(tmp_path / "big.dcm", bytes(body))
    assert content_hash(str(tmp_path), "big.dcm", len(body)) != h1
