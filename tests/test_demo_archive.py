"""The demo archive holds what its manifest says, and the manifest says what the readers do."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from medflow.demo.archive import (
    LABELS,
    DemoEntry,
    DemoManifest,
    draw_label_2d,
    draw_label_3d,
    make_demo_archive,
    parse_seed,
    parse_size,
)
from medflow.readers.image import read_image
from medflow.readers.nifti import read_nifti
from medflow.readers.video import read_video
from medflow.reasons import SourceError

_READERS = {"nifti": read_nifti, "image": read_image, "video": read_video}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoManifest]:
    root = tmp_path_factory.mktemp("demo") / "archive"
    return root, make_demo_archive(root, seed=3, size="tiny")


def _files_under(root: Path) -> set[str]:
    return {
        (Path(d) / f).relative_to(root).as_posix() for d, _, files in os.walk(root) for f in files
    }


def test_manifest_lists_exactly_the_files_written(archive: tuple[Path, DemoManifest]) -> None:
    root, manifest = archive
    assert _files_under(root) == set(manifest.relpaths)
    assert len(manifest.relpaths) == len(set(manifest.relpaths))  # no file in two entries
    # no manifest in the archive (a zarr group's own metadata is zarr.json)
    assert not any(p.endswith(".json") and not p.endswith("zarr.json") for p in manifest.relpaths)


def test_manifest_covers_the_required_kinds(archive: tuple[Path, DemoManifest]) -> None:
    _, m = archive
    names = {e.name for e in m.entries}
    assert {
        "ct_thin",
        "ct_standard",
        "ct_thick",
        "ct_oblique",
        "ct_enhanced",
        "ct_compressed",
        "ct_low_dose",
        "dx_chest",
        "cr_chest",
        "png_chest",
        "nifti_3d",
        "nifti_4d",
        "video_endoscopy",
    } <= {e.name for e in m.ingested}
    assert {
        "dicom_truncated",
        "dicom_empty",
        "nifti_bad_header",
        "sr_report",
        "png_corrupt",
        "ct_missing_slice",
    } == {e.name for e in m.quarantined}
    assert len(names) == len(m.entries)
    spacings = {tuple(m.entry(n).facts["spacing"]) for n in ("ct_thin", "ct_standard", "ct_thick")}
    assert spacings == {(1.25, 0.7, 0.7), (2.5, 0.8, 0.8), (5.0, 1.0, 1.0)}


def test_labels_are_balanced(archive: tuple[Path, DemoManifest]) -> None:
    _, m = archive
    counts = Counter(e.label for e in m.ingested)
    assert set(counts) == set(LABELS)
    assert min(counts.values()) >= 4
    assert all(e.label is None for e in m.quarantined if e.name != "ct_missing_slice")


def test_dicom_files_parse_with_the_fake_identity(archive: tuple[Path, DemoManifest]) -> None:
    root, m = archive
    for entry in m.entries:
        if entry.kind != "dicom" or entry.name in ("dicom_empty", "dicom_truncated"):
            continue
        for rel in entry.relpaths:
            ds = pydicom.dcmread(root / rel)
            assert str(ds.PatientName) == entry.patient
            assert str(ds.PatientName) in m.identities and str(ds.PatientID) in m.identities
            if entry.modality:
                assert ds.Modality == entry.modality


def test_ct_series_facts(archive: tuple[Path, DemoManifest]) -> None:
    root, m = archive
    for entry in m.entries:
        if entry.kind != "dicom" or entry.modality != "CT" or entry.name == "ct_enhanced":
            continue
        facts = entry.facts
        assert len(entry.relpaths) == facts["shape"][0] - len(facts["missing_slices"])
        datasets = [pydicom.dcmread(root / rel) for rel in entry.relpaths]
        assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
        ds = datasets[0]
        assert [ds.Rows, ds.Columns] == facts["shape"][1:]
        assert [float(v) for v in ds.PixelSpacing] == facts["spacing"][1:]
        assert float(ds.CTDIvol) == facts["ctdivol_mgy"]
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert hu.min() >= -1024 and -1100 < np.median(hu) < 200
        if entry.name == "ct_compressed":
            assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
        if entry.name == "ct_oblique":
            assert abs(float(ds.ImageOrientationPatient[5])) > 0.3
    low = m.entry("ct_low_dose").facts
    assert low["low_dose"] and low["ctdivol_mgy"] == 1.5
    assert not m.entry("ct_thin").facts["low_dose"]
    assert m.entry("ct_missing_slice").facts["missing_slices"]


def test_enhanced_ct_and_radiographs(archive: tuple[Path, DemoManifest]) -> None:
    root, m = archive
    enhanced = pydicom.dcmread(root / m.entry("ct_enhanced").relpaths[0])
    assert int(enhanced.NumberOfFrames) == m.entry("ct_enhanced").facts["shape"][0]
    for name in ("dx_chest", "cr_chest"):
        ds = pydicom.dcmread(root / m.entry(name).relpaths[0])
        assert list(ds.pixel_array.shape) == m.entry(name).facts["shape"]
        assert ds.PhotometricInterpretation == m.entry(name).facts["photometric"]


def test_broken_dicom_files(archive: tuple[Path, DemoManifest]) -> None:
    root, m = archive
    assert (root / m.entry("dicom_empty").relpaths[0]).stat().st_size == 0
    truncated = pydicom.dcmread(root / m.entry("dicom_truncated").relpaths[0])
    with pytest.raises(Exception):  # noqa: B017  # pydicom's error type varies by version
        _ = truncated.pixel_array
    sr = pydicom.dcmread(root / m.entry("sr_report").relpaths[0])
    assert "PixelData" not in sr and sr.Modality == "SR"


def test_non_dicom_entries_read_as_the_manifest_says(archive: tuple[Path, DemoManifest]) -> None:
    root, m = archive
    for entry in m.entries:
        if entry.kind == "dicom":
            continue
        path = str(root / entry.relpaths[0])
        read = _READERS[entry.kind]
        if entry.expected_status == "quarantined":
            with pytest.raises(SourceError) as err:
                read(path)
            assert entry.reason_matches(err.value.reason), (entry.name, err.value.reason)
            continue
        image = read(path)
        assert image.meta.modality == entry.modality, entry.name
        assert list(image.meta.axes) == entry.facts["axes"]
        assert list(image.shape or ()) == entry.facts["shape"]
        assert image.meta.spacing == pytest.approx(entry.facts["spacing"], rel=1e-5)
        if image.blocks is not None:
            assert sum(b.shape[0] for b in image.blocks) == entry.facts["shape"][0]


def test_nifti_3d_keeps_its_rotated_affine(archive: tuple[Path, DemoManifest]) -> None:
    root, m = archive
    entry = m.entry("nifti_3d")
    image = read_nifti(str(root / entry.relpaths[0]))
    np.testing.assert_allclose(image.meta.affine_array, entry.facts["affine"], atol=1e-4)


def test_manifest_round_trips_through_json(
    archive: tuple[Path, DemoManifest], tmp_path: Path
) -> None:
    _, m = archive
    text = json.dumps(m.to_dict())
    back = json.loads(text)
    assert [e["name"] for e in back["entries"]] == [e.name for e in m.entries]
    assert back["identities"][0] == "DEMO^PATIENT^001"
    out = tmp_path / "other"
    written = make_demo_archive(out, size="tiny", manifest_path=tmp_path / "manifest.json")
    assert json.loads((tmp_path / "manifest.json").read_text()) == json.loads(
        json.dumps(written.to_dict())
    )


def test_same_seed_same_pixels(archive: tuple[Path, DemoManifest], tmp_path: Path) -> None:
    root, m = archive
    again = make_demo_archive(tmp_path / "again", seed=3, size="tiny")
    assert again.relpaths == m.relpaths
    for name in ("png_chest", "nifti_4d"):
        rel = m.entry(name).relpaths[0]
        first = _READERS[m.entry(name).kind](str(root / rel)).pixels
        second = _READERS[m.entry(name).kind](str(tmp_path / "again" / rel)).pixels
        np.testing.assert_array_equal(first, second)


def test_refusals(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="empty folder"):
        make_demo_archive(tmp_path / "full")
    with pytest.raises(ValueError, match="outside the archive"):
        make_demo_archive(tmp_path / "a", manifest_path=tmp_path / "a" / "m.json")
    with pytest.raises(ValueError, match="size"):
        parse_size("huge")
    with pytest.raises(TypeError):
        parse_seed("1")
    with pytest.raises(ValueError, match="expected_status"):
        DemoEntry(name="x", kind="image", relpaths=("a.png",), expected_status="done")
    with pytest.raises(ValueError, match="reason keywords"):
        DemoEntry(name="x", kind="image", relpaths=("a.png",), expected_status="quarantined")


@pytest.mark.parametrize("label", LABELS)
def test_label_shapes_have_the_same_size_whatever_the_spacing(label: str) -> None:
    fine = np.zeros((40, 40, 40), np.float32)
    coarse = np.zeros((8, 40, 40), np.float32)
    v_fine = draw_label_3d(fine, (1.0, 1.0, 1.0), label, (20, 20, 20), 10.0).sum() * 1.0
    v_coarse = draw_label_3d(coarse, (5.0, 1.0, 1.0), label, (4, 20, 20), 10.0).sum() * 5.0
    assert v_coarse == pytest.approx(v_fine, rel=0.3)
    image = np.zeros((32, 32), np.float32)
    assert draw_label_2d(image, label, (16, 16), 8, 1.0).any() and image.max() == 1.0


def test_low_dose_scan_has_raw_projections_linked_to_its_series(tmp_path: Path) -> None:
    from medflow.storage.sinograms import read_sinogram

    root = tmp_path / "archive"
    m = make_demo_archive(root, seed=3, size="tiny", raw_projections=True)
    plain = make_demo_archive(tmp_path / "plain", seed=3, size="tiny")
    assert [e.name for e in m.entries] == [*(e.name for e in plain.entries), "ct_low_dose_raw"]
    assert _files_under(root) == set(m.relpaths)
    entry = m.entry("ct_low_dose_raw")
    assert entry.expected_status == "ingested" and entry.facts["low_dose"]
    (group,) = {p.split(".sino.zarr/")[0] + ".sino.zarr" for p in entry.projections}
    sino = read_sinogram(str(root / group))
    ds = pydicom.dcmread(root / entry.relpaths[0])
    assert sino.link == (ds.StudyInstanceUID, ds.SeriesInstanceUID)
    assert sino.attrs["low_dose"] is True
    raw = entry.facts["raw_projections"]
    assert sino.data.shape == (entry.facts["shape"][0], raw["views"], raw["bins"])
    assert sino.geometry["angular_range_deg"] == 360.0 and raw["views"] % 2 == 0
    facts = entry.facts
    assert len(entry.relpaths) == facts["shape"][0] and facts["ctdivol_mgy"] < 1.5
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert list(hu.shape) == facts["shape"][1:] and hu.min() >= -1024
