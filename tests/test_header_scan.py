"""The discovery header scan: ``read_dicom_headers`` gives, file by file, what
``read_dicom_header`` gives (every header field, every error reason), while reading files laid
out like one before from that layout; ``scan_header_files`` built on it."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.uid import ImplicitVRLittleEndian, RLELossless
from support import full_parses as _full_parses

from medflow.demo.dicom import (
    DEMO_PATIENT,
    ct_phantom,
    write_2d,
    write_ct_series,
    write_enhanced_ct,
    write_sr,
    write_truncated,
)
from medflow.readers.dicom import DicomHeader, headers, read_dicom_header, read_dicom_headers, scan
from medflow.reasons import ReasonCode, SourceError, unexpected
from medflow.storage.layout import Pseudonymizer
from medflow.tasks.ingest import HeaderScan, scan_header_files

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on odd test files

SPACING = (2.5, 0.6, 0.8)
ORIGIN = (-20.0, -15.0, 40.0)


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return ct_phantom((6, 24, 20))


def _outcome(o: object) -> tuple[object, ...]:
    """A header as all its fields, an error as its type and, for a SourceError, path, code,
    reason and detail."""
    if isinstance(o, DicomHeader):
        return ("header", {f.name: getattr(o, f.name) for f in dataclasses.fields(o)})
    if isinstance(o, SourceError):
        return ("SourceError", o.path, o.code, o.reason, o.detail)
    assert isinstance(o, Exception), o
    return (type(o).__name__, str(o))


def _single(path: str, require_image: bool = True) -> tuple[object, ...]:
    try:
        return _outcome(read_dicom_header(path, require_image=require_image))
    except Exception as e:
        return _outcome(e)


def _assert_same(paths: Sequence[str], require_image: bool = True) -> list[tuple[object, ...]]:
    """The batch reader's outcomes are the single-file reader's, path by path."""
    expected = [_single(p, require_image) for p in paths]
    got = [_outcome(o) for o in read_dicom_headers(paths, require_image=require_image)]
    assert len(got) == len(paths)
    for path, g, e in zip(paths, got, expected, strict=True):
        assert g == e, path
    return got


def _batch_parses(
    paths: Sequence[str], monkeypatch: pytest.MonkeyPatch, require_image: bool = True
) -> list[str]:
    """Check the batch reader against the single-file one; the paths it parsed in full."""
    expected = [_single(p, require_image) for p in paths]
    full = _full_parses(monkeypatch)
    got = [_outcome(o) for o in read_dicom_headers(paths, require_image=require_image)]
    monkeypatch.undo()
    assert got == expected
    return full


def _strs(paths: Sequence[Path]) -> list[str]:
    return [str(p) for p in paths]


def _as_implicit(paths: Sequence[Path]) -> list[str]:
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(p, implicit_vr=True, little_endian=True, enforce_file_format=True)
    return _strs(paths)


def _edit(path: str, **changes: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


def _add_private(path: str, n: int, group: int = 0x0009) -> None:
    """``n`` private elements of their own block: a layout no other file has."""
    ds = pydicom.dcmread(path)
    block = ds.private_block(group, f"MEDFLOW {n}", create=True)
    for k in range(n):
        block.add_new(k + 1, "LO", f"v{k}")
    ds.save_as(path, enforce_file_format=True)


# ---------------------------------------------------------------------------------------------
# the batch reader against the single-file reader


def test_interleaved_series_are_each_read_from_their_layout(
    tmp_path: Path, volume: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = _strs(write_ct_series(tmp_path / "a", volume, SPACING, ORIGIN, shuffle_names=False))
    dose = _strs(write_ct_series(tmp_path / "b", volume, SPACING, ORIGIN, ctdivol=7.5))
    implicit = _as_implicit(write_ct_series(tmp_path / "c", volume, SPACING, ORIGIN))
    rle = _strs(
        write_ct_series(tmp_path / "d", volume, SPACING, ORIGIN, transfer_syntax=RLELossless)
    )
    again = _strs(write_ct_series(tmp_path / "e", volume, SPACING, ORIGIN))  # laid out as plain
    enhanced = str(write_enhanced_ct(tmp_path / "enh.dcm", volume[:3], SPACING, ORIGIN))
    dx = str(write_2d(tmp_path / "dx.dcm", np.zeros((8, 6), np.uint16)))
    sr = str(write_sr(tmp_path / "sr.dcm"))
    series = [plain, dose, implicit, rle, again]
    paths = [p for row in zip(*series, strict=True) for p in row]  # one file of each in turn
    paths[7:7] = [enhanced, dx, sr]
    assert scan.LAYOUTS_KEPT >= 5  # the layouts here: plain, dose, implicit, enh, dx
    full = _batch_parses(paths, monkeypatch)
    # one parse per layout (the RLE files have none: each is parsed): the second series laid
    # out as the first is read from the first one's layout
    assert sorted(full) == sorted([plain[0], dose[0], implicit[0], *rle, enhanced, dx, sr])
    got = dict(zip(paths, _assert_same(paths), strict=True))
    uids = []
    for files in series:  # the files of a series have its UIDs, and no other series has them
        keys = set()
        for path in files:
            assert got[path][0] == "header"
            fields = got[path][1]
            assert isinstance(fields, dict)
            keys.add((fields["study_uid"], fields["series_uid"]))
        assert len(keys) == 1
        uids += keys
    assert len(set(uids)) == len(series)
    assert _single(sr)[2] == ReasonCode.NOT_AN_IMAGE
    assert str(_single(sr)[3]).startswith("not an image object: SOP class Basic Text SR")
    _assert_same(paths, require_image=False)


@pytest.mark.parametrize("require_image", [True, False])
def test_pydicom_test_files(
    tmp_path: Path, require_image: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pydicom's own test files (odd VRs, sequences, big endian, broken ones), each followed by
    a copy of itself, which is read from its layout where it has one."""
    paths: list[str] = []
    copies: list[str] = []
    for k, name in enumerate(sorted(get_testdata_files())):
        if not os.path.isfile(name):  # a folder (of a DICOMDIR): cannot be read, either way
            paths.append(name)
            continue
        copy = tmp_path / f"{k:03d}-{Path(name).name}"
        shutil.copyfile(name, copy)
        paths += [name, str(copy)]
        copies.append(str(copy))
    full = _batch_parses(paths, monkeypatch, require_image)
    matched = [c for c in copies if c not in full]
    assert len(matched) >= 20, len(matched)  # real files do get read from their layouts
    outcomes = _assert_same(paths, require_image)
    assert sum(o[0] == "header" for o in outcomes) >= 100
    assert sum(o[0] == "SourceError" for o in outcomes) >= 10


def _broken(tmp_path: Path, source: str, how: str) -> str:
    path = tmp_path / f"broken-{how.replace(' ', '-')}.dcm"
    data = Path(source).read_bytes()
    if how == "truncated pixels":
        write_truncated(path, source)
    elif how == "truncated header":
        path.write_bytes(data[:600])
    elif how == "zero bytes":
        path.write_bytes(b"")
    elif how == "not DICOM":
        path.write_bytes(b"hello, this is a text file\n" * 40)
    elif how == "random bytes":
        path.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, np.uint8).tobytes())
    elif how == "structured report":
        write_sr(path)
    elif how == "missing":
        pass
    else:
        path.write_bytes(data)
        if how == "no pixel data":
            ds = pydicom.dcmread(path)
            del ds.PixelData
            ds.save_as(path, enforce_file_format=True)
        elif how == "segmentation class":  # laid out as the others: fails only in its header
            _edit(str(path), SOPClassUID="1.2.840.10008.5.1.4.1.1.66.4")
        elif how == "no series UID":  # laid out as the others, the UID empty
            _edit(str(path), SeriesInstanceUID="")
        elif how == "pixel data too long":  # its length runs past the end of the file
            at = data.rfind(b"\xe0\x7f\x10\x00") + 8
            longer = int.from_bytes(data[at : at + 4], "little") + 2
            path.write_bytes(data[:at] + longer.to_bytes(4, "little") + data[at + 4 :])
        else:
            raise AssertionError(how)
    return str(path)


BROKEN = {  # how a file is broken: its error's code and what its reason says
    "truncated pixels": (ReasonCode.TRUNCATED, "truncated"),
    "truncated header": (ReasonCode.TRUNCATED, "truncated"),
    "zero bytes": (ReasonCode.EMPTY_FILE, "empty file (0 bytes)"),
    "not DICOM": (ReasonCode.NOT_DICOM, "not DICOM"),
    "random bytes": (ReasonCode.NOT_DICOM, "not DICOM"),
    "structured report": (
        ReasonCode.NOT_AN_IMAGE,
        "not an image object: SOP class Basic Text SR",
    ),
    "missing": (ReasonCode.IO_ERROR, "cannot read the file"),
    "no pixel data": (ReasonCode.TRUNCATED, "no pixel data in a CT Image Storage object"),
    "segmentation class": (ReasonCode.NOT_AN_IMAGE, "segmentation labels"),
    "no series UID": (ReasonCode.INVALID_HEADER, "no Series Instance UID"),
    "pixel data too long": (ReasonCode.TRUNCATED, "truncated: its pixel data needs"),
}


def test_broken_files_amid_matching_ones(
    tmp_path: Path, volume: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol = ct_phantom((len(BROKEN) + 3, 24, 20), seed=4)
    good = _strs(write_ct_series(tmp_path / "s", vol, SPACING, ORIGIN, shuffle_names=False))
    bad = [_broken(tmp_path, good[0], how) for how in BROKEN]
    paths = [good[0], good[1]]
    for b, g in zip(bad, good[2:], strict=False):
        paths += [b, g]
    full = _batch_parses(paths, monkeypatch)
    assert full == [good[0], *bad]  # every good file after the first is read from its layout
    got = _assert_same(paths)
    for path, how in zip(bad, BROKEN, strict=True):
        outcome = got[paths.index(path)]
        assert outcome[:2] == ("SourceError", path), how
        code, text = BROKEN[how]
        assert outcome[2] == code, (how, outcome)
        reason = str(outcome[3])
        assert text in reason, (how, outcome)
        # the public reason names neither the file nor its folder
        assert os.path.basename(path) not in reason and tmp_path.name not in reason, reason
    missing = got[paths.index(bad[list(BROKEN).index("missing")])]
    assert "No such file" in str(missing[4])  # the OS's message: in the restricted detail
    assert all(got[paths.index(g)][0] == "header" for g in good[: len(bad) + 1])


def test_reader_bug_is_yielded_and_the_scan_goes_on(
    tmp_path: Path, volume: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _strs(write_ct_series(tmp_path, volume, SPACING, ORIGIN, shuffle_names=False))
    real = scan.header_of

    def buggy(parsed: object, path: str, *, require_image: bool) -> DicomHeader:
        if path == paths[2]:
            raise RuntimeError("a bug")
        return real(parsed, path, require_image=require_image)  # type: ignore[arg-type]

    for module in (headers, scan):  # the single-file reader and the scan
        monkeypatch.setattr(module, "header_of", buggy)
    got = _assert_same(paths)
    assert got[2] == ("RuntimeError", "a bug")
    assert [o[0] for o in got].count("header") == len(paths) - 1


VARIATIONS = (  # changes to single files of a series: most give the file a layout of its own
    {},
    {"ContentTime": "101010"},  # an extra element
    {"ImagePositionPatient": ["-20.000000001", "-15.0", "45.0"]},  # a longer value: matches
    {"RescaleIntercept": "-1000"},  # another value: matches
    {"SpecificCharacterSet": "ISO_IR 192"},
    {"ContentTime": "101010", "ContentDate": "20200101"},
    {"BodyPartExamined": "ABDOMEN"},
    {"ReferencedImageSequence": "sequence"},
)


def test_series_whose_files_differ_in_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 3 * len(VARIATIONS)
    vol = ct_phantom((n, 24, 20), seed=5)
    paths = _strs(write_ct_series(tmp_path, vol, SPACING, ORIGIN, shuffle_names=False))
    for k, path in enumerate(paths):
        change = dict(VARIATIONS[k % len(VARIATIONS)])
        if change.get("ReferencedImageSequence"):
            ds = pydicom.dcmread(path)
            item = pydicom.Dataset()
            item.ReferencedSOPClassUID = ds.SOPClassUID
            item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            change["ReferencedImageSequence"] = [item]
        if change:
            _edit(path, **change)
        if k % 2 and k > len(VARIATIONS):
            _add_private(path, 2)  # and another layout again for every other file
    full = _batch_parses(paths, monkeypatch)
    assert len(full) < len(paths)  # files of a layout seen before match it
    assert paths[1] in full and paths[2] not in full and paths[3] not in full
    got = _assert_same(paths)
    assert all(o[0] == "header" for o in got)
    assert {o[1]["body_part"] for o in got if isinstance(o[1], dict)} == {"CHEST", "ABDOMEN"}


def test_alternating_layouts_are_each_learnt_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol = ct_phantom((12, 16, 16), seed=6)
    paths = _strs(write_ct_series(tmp_path, vol, SPACING, ORIGIN, shuffle_names=False))
    for path in paths[1::2]:
        _edit(path, ContentTime="101010")
    assert _batch_parses(paths, monkeypatch) == paths[:2]


def test_learning_backs_off_while_layouts_go_unused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files each laid out as no other: fewer and fewer of their layouts are learnt; a series
    after them is still read from its layout before long."""
    unique = _strs(
        write_ct_series(
            tmp_path / "u", ct_phantom((24, 8, 8)), SPACING, ORIGIN, shuffle_names=False
        )
    )
    for k, path in enumerate(unique):
        _add_private(path, k + 1)
    regular = _strs(
        write_ct_series(tmp_path / "r", ct_phantom((40, 8, 8)), SPACING, ORIGIN, ctdivol=3.0)
    )
    learnt: list[str] = []
    real = scan.learn_layout

    def spy(parsed: object, path: str, convert: frozenset[int] | None = None) -> object:
        learnt.append(path)
        return real(parsed, path, convert)  # type: ignore[arg-type]

    monkeypatch.setattr(scan, "learn_layout", spy)
    full = _batch_parses([*unique, *regular], monkeypatch)
    assert full[: len(unique)] == unique
    assert len(full) - len(unique) <= scan.LEARN_SKIP_MAX + 1
    assert regular[-1] not in full
    assert len([p for p in learnt if p in unique]) <= len(unique) // 2


# ---------------------------------------------------------------------------------------------
# the scan


def _old_scan(archive: str, relpaths: Sequence[str], keys: Pseudonymizer) -> list[HeaderScan]:
    """scan_header_files as it was before the batch reader: read_dicom_header per file."""
    out = []
    for rel in relpaths:
        path = os.path.join(archive, rel)
        try:
            if os.path.getsize(path) == 0:
                why = "empty file (0 bytes): not DICOM"
                out.append(HeaderScan(rel, None, None, ReasonCode.EMPTY_FILE, why))
                continue
        except OSError as e:
            why = f"cannot read the file ({type(e).__name__})"
            out.append(HeaderScan(rel, None, None, ReasonCode.IO_ERROR, why, str(e)))
            continue
        try:
            h = read_dicom_header(path)
            out.append(
                HeaderScan(
                    rel,
                    keys.dicom_series_key(*h.grouping_uids()),
                    keys.dicom_study_key(h.study_uid),
                    None,
                )
            )
        except SourceError as e:
            out.append(HeaderScan(rel, None, None, e.code, e.reason, e.detail))
        except Exception as e:
            code, reason, detail = unexpected(e, "while reading the DICOM header")
            out.append(HeaderScan(rel, None, None, code, reason, detail))
    return out


def test_scan_header_files(
    tmp_path: Path, volume: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "archive"
    a = write_ct_series(archive / "p1" / "a", volume, SPACING, ORIGIN)
    b = write_ct_series(archive / "p1" / "b", volume, SPACING, ORIGIN, ctdivol=5.0)
    c = _as_implicit(write_ct_series(archive / "p2" / "c", volume, SPACING, ORIGIN))
    write_enhanced_ct(archive / "p2" / "enh.dcm", volume[:3], SPACING, ORIGIN)
    write_sr(archive / "p2" / "a" / "sr.dcm")
    write_truncated(archive / "p1" / "a" / "cut.dcm", a[0])
    (archive / "p1" / "b" / "empty.dcm").write_bytes(b"")
    (archive / "p1" / "b" / "notes.dcm").write_bytes(b"hello, this is a text file\n" * 40)
    relpaths = sorted(str(p.relative_to(archive)) for p in archive.rglob("*.dcm"))
    relpaths.insert(5, "p1/a/gone.dcm")  # listed, then deleted before the scan
    keys = Pseudonymizer(secret=b"k" * 32)
    expected = _old_scan(str(archive), relpaths, keys)
    full = _full_parses(monkeypatch)
    scans = scan_header_files(str(archive), relpaths, keys)
    monkeypatch.undo()
    assert scans == expected
    assert len(full) <= 10 < len(relpaths)
    by_rel = {s.relpath: s for s in scans}
    empty, gone = by_rel["p1/b/empty.dcm"], by_rel["p1/a/gone.dcm"]
    assert (empty.code, empty.reason) == (ReasonCode.EMPTY_FILE, "empty file (0 bytes): not DICOM")
    assert (gone.code, gone.reason) == (
        ReasonCode.IO_ERROR,
        "cannot read the file (FileNotFoundError)",
    )
    assert "gone.dcm" in str(gone.detail)  # the OS's message, for the restricted table only
    cut, sr, notes = by_rel["p1/a/cut.dcm"], by_rel["p2/a/sr.dcm"], by_rel["p1/b/notes.dcm"]
    assert cut.code == ReasonCode.TRUNCATED and "truncated" in str(cut.reason)
    assert sr.code == ReasonCode.NOT_AN_IMAGE and "not an image object" in str(sr.reason)
    assert notes.code == ReasonCode.NOT_DICOM and "not DICOM" in str(notes.reason)
    for s in scans:  # no public reason names a file or a folder
        if s.reason is not None:
            assert Path(s.relpath).name not in s.reason, s
            assert str(archive) not in s.reason, s
    series = {s.series_key for s in scans if s.series_key is not None}
    assert len(series) == 4  # a, b, c, and the enhanced object on its own
    assert len({by_rel[str(Path(p).relative_to(archive))].series_key for p in c}) == 1
    assert sum(s.reason is None for s in scans) == len(a) + len(b) + len(c) + 1
    # nothing identifying in what the scan gives out
    forbidden = {DEMO_PATIENT.name, DEMO_PATIENT.patient_id, DEMO_PATIENT.accession_number}
    for p in archive.rglob("*.dcm"):
        if p.stat().st_size > 1000 and p.name != "notes.dcm":
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            forbidden |= {str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID")}
    forbidden.discard("")
    text = repr(scans)
    for secret in forbidden:
        assert secret not in text
