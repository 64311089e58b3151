"""Storage: OME-Zarr round trips and validation, keys, atomic table parts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import zarr
from ome_zarr_models.v05.image import Image as OmeImage

from medflow.storage.images import DecodedImage, ImageMeta, open_image, parse_axes, write_image
from medflow.storage.layout import KEY_SECRET_ENV, OutputRoot
from medflow.storage.tables import CATALOG_SCHEMA, connect, part_id, read_table, utcnow, write_part


def _meta(axes: tuple[str, ...], spacing: tuple[float, ...], **kw: object) -> ImageMeta:
    affine = np.diag([*(spacing[::-1][:3]), 1.0]) if len(spacing) >= 3 else np.eye(4)
    return ImageMeta(
        modality=str(kw.get("modality", "CT")),
        source_kind="test",
        axes=axes,
        spacing=spacing,
        origin=tuple(float(i) for i in range(len(axes))),
        affine=affine,
    )


@pytest.mark.parametrize(
    ("axes", "shape", "dtype", "spacing"),
    [
        (("z", "y", "x"), (40, 70, 90), np.int16, (2.5, 0.7, 0.7)),
        (("z", "y", "x"), (12, 33, 17), np.float32, (1.0, 1.0, 1.0)),
        (("y", "x"), (300, 200), np.uint16, (0.2, 0.2)),
        (("c", "y", "x"), (3, 64, 48), np.uint8, (1.0, 0.5, 0.5)),
        (("t", "z", "y", "x"), (3, 8, 16, 16), np.int16, (2.0, 3.0, 2.0, 2.0)),
    ],
)
def test_image_round_trip_validates_as_ome_zarr_05(
    tmp_path: Path, axes: tuple[str, ...], shape: tuple[int, ...], dtype: type, spacing: tuple
) -> None:
    rng = np.random.default_rng(0)
    pixels = (rng.normal(100, 50, shape)).astype(dtype)
    meta = _meta(axes, spacing)
    path = str(tmp_path / "images" / "k.zarr")
    stored = write_image(DecodedImage(meta, pixels=pixels), path, name="k")
    assert stored.shape == shape
    assert stored.n_levels >= 3
    opened = open_image(path)
    np.testing.assert_array_equal(opened.read(0), pixels)
    assert opened.meta == meta
    # an independent reader validates the OME-Zarr 0.5 metadata and the arrays behind it
    ome = OmeImage.from_zarr(zarr.open_group(path, mode="r"))
    ms = ome.ome_attributes.multiscales[0]
    assert [a.name for a in ms.axes] == list(axes)
    first = ms.datasets[0].coordinateTransformations[0]
    assert list(first.scale) == pytest.approx(list(spacing))
    # each coarser level halves y and x, with the scale doubling to match
    lvl1 = open_image(path).levels[1]
    assert lvl1.shape[-1] == -(-shape[-1] // 2)
    assert list(lvl1.metadata.dimension_names) == list(axes)
    # nothing is left in staging
    assert not any((tmp_path / "images" / ".staging").glob("*"))


def test_pyramid_level_is_block_mean(tmp_path: Path) -> None:
    pixels = np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    path = str(tmp_path / "a.zarr")
    write_image(
        DecodedImage(_meta(("z", "y", "x"), (1.0, 1.0, 1.0)), pixels=pixels), path, name="a"
    )
    lvl1 = open_image(path).read(1)
    expected = pixels.reshape(2, 2, 4, 2, 4, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(lvl1, expected)


def test_streamed_video_written_in_slabs(tmp_path: Path) -> None:
    frames = np.random.default_rng(1).integers(0, 255, (37, 3, 24, 40), dtype=np.uint8)

    def slabs():
        for i in range(0, 37, 5):
            yield frames[i : i + 5]

    meta = _meta(("t", "c", "y", "x"), (0.04, 1.0, 1.0, 1.0), modality="XC")
    # the frame count hint is wrong on purpose: the writer trusts what arrives
    img = DecodedImage(meta, blocks=slabs(), shape=(20, 3, 24, 40), dtype=np.dtype(np.uint8))
    path = str(tmp_path / "v.zarr")
    stored = write_image(img, path, name="v")
    assert stored.shape == (37, 3, 24, 40)
    opened = open_image(path)
    np.testing.assert_array_equal(opened.read(0), frames)
    assert all(lv.shape[0] == 37 for lv in opened.levels)
    OmeImage.from_zarr(zarr.open_group(path, mode="r"))


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    def broken():
        yield np.zeros((4, 3, 8, 8), np.uint8)
        raise RuntimeError("decoder died")

    meta = _meta(("t", "c", "y", "x"), (0.04, 1.0, 1.0, 1.0))
    img = DecodedImage(meta, blocks=broken(), shape=(8, 3, 8, 8), dtype=np.dtype(np.uint8))
    path = tmp_path / "images" / "x.zarr"
    with pytest.raises(RuntimeError, match="decoder died"):
        write_image(img, str(path), name="x")
    assert not path.exists()
    assert not any((tmp_path / "images" / ".staging").glob("*"))


def test_rewrite_replaces_whole_image(tmp_path: Path) -> None:
    path = str(tmp_path / "r.zarr")
    meta = _meta(("y", "x"), (1.0, 1.0))
    write_image(DecodedImage(meta, pixels=np.ones((64, 64), np.uint8)), path, name="r")
    write_image(DecodedImage(meta, pixels=np.full((32, 16), 7, np.uint8)), path, name="r")
    got = open_image(path).read(0)
    assert got.shape == (32, 16) and (got == 7).all()


@pytest.mark.parametrize(
    ("axes", "message"),
    [
        (("x", "y"), "order"),
        (("z", "x"), "space axes"),
        (("t", "c", "q", "y", "x"), "drawn once"),
    ],
)
def test_parse_axes_rejects(axes: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_axes(axes)


def test_meta_rejects_bad_spacing_and_affine() -> None:
    with pytest.raises(ValueError, match="spacing > 0"):
        ImageMeta("CT", "t", ("y", "x"), (1.0, -1.5), (0, 0), np.eye(4))
    with pytest.raises(ValueError, match="4x4"):
        ImageMeta("CT", "t", ("y", "x"), (1.0, 1.0), (0, 0), np.eye(3))


def test_keys_stable_per_root_and_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_SECRET_ENV, raising=False)
    a = OutputRoot(str(tmp_path / "a"))
    k1 = a.pseudonymizer().dicom_series_key("1.2.3", "1.2.3.4")
    k2 = OutputRoot(str(tmp_path / "a")).pseudonymizer().dicom_series_key("1.2.3", "1.2.3.4")
    assert k1 == k2 and len(k1) == 24 and "1.2.3" not in k1
    assert oct(os.stat(a.secret_path()).st_mode & 0o777) == "0o600"
    other = OutputRoot(str(tmp_path / "b")).pseudonymizer().dicom_series_key("1.2.3", "1.2.3.4")
    assert other != k1  # a different root draws its own secret
    monkeypatch.setenv(KEY_SECRET_ENV, "shared-secret")
    assert a.pseudonymizer().dicom_series_key("1.2.3", "1.2.3.4") == OutputRoot(
        str(tmp_path / "b")
    ).pseudonymizer().dicom_series_key("1.2.3", "1.2.3.4")


def _catalog_row(key: str, status: str, when_offset: int = 0) -> dict:
    import datetime as dt

    return {
        "series_key": key,
        "study_key": "s",
        "stage": "ingest",
        "status": status,
        "source_fingerprint": f"fp-{key}-{when_offset}",
        "run_id": f"run{when_offset}",
        "created_at": utcnow() + dt.timedelta(seconds=when_offset),
    }


def test_parts_are_atomic_and_idempotent(tmp_path: Path) -> None:
    root = OutputRoot(str(tmp_path))
    d = root.table_dir("catalog")
    rows = [_catalog_row("a", "ingested"), _catalog_row("b", "quarantined")]
    name = part_id("ingest", ["a", "b"])
    write_part(d, rows, CATALOG_SCHEMA, name)
    write_part(d, rows, CATALOG_SCHEMA, name)  # a retried batch overwrites its own part
    assert len(list(Path(d).glob("part-*.parquet"))) == 1
    assert not list(Path(d).glob(".tmp-*"))
    assert read_table(d, CATALOG_SCHEMA).num_rows == 2
    assert write_part(d, [], CATALOG_SCHEMA, "empty") is None


def test_catalog_view_is_newest_row_per_series(tmp_path: Path) -> None:
    root = OutputRoot(str(tmp_path))
    d = root.table_dir("catalog")
    write_part(d, [_catalog_row("a", "quarantined", 0)], CATALOG_SCHEMA, "p1")
    write_part(
        d,
        [_catalog_row("a", "ingested", 5), _catalog_row("b", "ingested", 1)],
        CATALOG_SCHEMA,
        "p2",
    )
    con = connect(root)
    got = con.execute("SELECT series_key, status FROM catalog ORDER BY 1").fetchall()
    assert got == [("a", "ingested"), ("b", "ingested")]
    assert con.execute("SELECT count(*) FROM catalog_history").fetchone() == (3,)


def test_empty_root_has_empty_catalog_view(tmp_path: Path) -> None:
    con = connect(OutputRoot(str(tmp_path)))
    assert con.execute("SELECT count(*) FROM catalog").fetchone() == (0,)
    cols = [d[0] for d in con.execute("SELECT * FROM catalog").description]
    assert cols == [*CATALOG_SCHEMA.names, "error"]  # error: a deprecated alias of reason
    assert isinstance(CATALOG_SCHEMA.field("shape").type, pa.ListType)


def test_object_stores_are_listed_fresh_without_changing_fsspec_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import copy

    import fsspec

    from medflow.storage.layout import storage_options

    before = copy.deepcopy(fsspec.config.conf)
    assert storage_options("s3://bucket/out") == {"use_listings_cache": False}
    assert storage_options("/data/out") == {}
    # the user's own fsspec configuration wins
    monkeypatch.setitem(fsspec.config.conf, "gs", {"use_listings_cache": True})
    assert storage_options("gs://bucket/out") == {}
    monkeypatch.undo()
    assert fsspec.config.conf == before  # importing or using medflow's storage changed nothing


def test_atomic_writes_leave_the_old_file_whole_when_a_writer_fails(tmp_path: Path) -> None:
    from medflow.storage.atomic import atomic_file, atomic_path, publish_dir, write_atomic

    target = tmp_path / "sub" / "data.json"
    write_atomic(target, '{"v": 1}')
    assert target.read_text() == '{"v": 1}'

    class Boom(Exception):
        pass

    with pytest.raises(Boom), atomic_file(target, "w") as f:
        f.write('{"v": 2, "half')
        raise Boom
    assert target.read_text() == '{"v": 1}'  # the old content, whole
    with pytest.raises(Boom), atomic_path(tmp_path / "db.duckdb") as tmp:
        Path(tmp).write_bytes(b"x")
        Path(f"{tmp}.wal").write_bytes(b"y")
        raise Boom
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["data.json", "sub"]  # no leftovers

    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "w.bin").write_bytes(b"1")
    assert publish_dir(staging, tmp_path / "v1") and (tmp_path / "v1" / "w.bin").is_file()
    again = tmp_path / "again"
    again.mkdir()
    assert not publish_dir(again, tmp_path / "v1") and not again.exists()
