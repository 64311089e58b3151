"""Reading a coarser pyramid level for an encoder that resamples to a coarser grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medflow.demo.dicom import ct_phantom
from medflow.encoders import create_encoder, stream_encode
from medflow.encoders._streaming import load_series
from medflow.encoders.testing import write_random_checkpoint
from medflow.storage.images import DecodedImage, ImageMeta, OpenedImage, open_image, write_image

MERLIN_PIXDIM = (1.5, 1.5, 3.0)  # R, A, S


def _affine(directions: np.ndarray, spacing_xyz: tuple[float, float, float]) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = directions * np.array(spacing_xyz)
    a[:3, 3] = (-30.0, 12.5, 101.0)
    return a


def _write(
    tmp_path: Path,
    name: str,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    directions: np.ndarray | None = None,
    noise_hu: float = 0.0,
) -> str:
    dz, dy, dx = spacing
    affine = _affine(np.eye(3) if directions is None else directions, (dx, dy, dz))
    meta = ImageMeta(
        modality="CT",
        source_kind="nifti",
        axes=("z", "y", "x"),
        spacing=spacing,
        origin=tuple(float(v) for v in affine[:3, 3][::-1]),
        affine=tuple(tuple(float(v) for v in r) for r in affine),
    )
    path = str(tmp_path / f"{name}.zarr")
    write_image(
        DecodedImage(meta=meta, pixels=ct_phantom(shape, noise_hu=noise_hu)), path, name=name
    )
    return path


def _world(affine: np.ndarray, x: float, y: float, z: float) -> np.ndarray:
    return (affine @ np.array([x, y, z, 1.0]))[:3]


def test_level_meta_places_block_means_at_their_centres(tmp_path: Path) -> None:
    opened = open_image(_write(tmp_path, "ct", (40, 64, 64), (2.5, 0.7, 0.7)))
    a0 = opened.meta.affine_array
    for level in (1, 2):
        meta = opened.level_meta(level)
        factors = np.array(meta.spacing) / np.array(opened.meta.spacing)  # z, y, x
        fz, fy, fx = (round(float(f)) for f in factors)
        assert opened.levels[level].shape == tuple(
            -(-n // f) for n, f in zip(opened.levels[0].shape, (fz, fy, fx), strict=True)
        )
        # the level voxel (i, j, k) is the mean of level-0 voxels i*f .. i*f + f - 1
        for i, j, k in ((0, 0, 0), (3, 2, 1), (5, 7, 4)):
            centre = np.mean(
                [
                    _world(a0, i * fx + a, j * fy + b, k * fz + c)
                    for a in range(fx)
                    for b in range(fy)
                    for c in range(fz)
                ],
                axis=0,
            )
            np.testing.assert_allclose(_world(meta.affine_array, i, j, k), centre, atol=1e-9)
        # OME-Zarr translation and the affine agree on where the first voxel is
        np.testing.assert_allclose(meta.origin[::-1], meta.affine_array[:3, 3], atol=1e-9)


@pytest.mark.parametrize(
    ("spacing", "directions", "level"),
    [
        ((2.5, 0.7, 0.7), None, 1),  # axial 0.7 mm: level 1 is 1.4 mm in-plane <= 1.5
        ((2.5, 1.0, 1.0), None, 0),  # 1.0 mm: level 1 would be 2.0 mm > 1.5
        ((1.0, 0.7, 0.7), None, 1),  # z 1.0 mm is halved at level 1 (2.0 <= 3.0 along S)
        # sagittal: slices along R (2.5 mm, already coarser than 1.5), rows along S, columns A
        ((2.5, 0.7, 0.7), np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=float), 1),
    ],
)
def test_coarsest_level_within_the_resampling_grid(
    tmp_path: Path, spacing: tuple[float, float, float], directions: np.ndarray | None, level: int
) -> None:
    opened = open_image(_write(tmp_path, "ct", (24, 64, 64), spacing, directions))
    assert opened.coarsest_level_within(MERLIN_PIXDIM) == level
    assert opened.coarsest_level_within((0.1, 0.1, 0.1)) == 0
    with pytest.raises(ValueError, match="3 positive"):
        opened.coarsest_level_within((1.5, 0.0, 3.0))


def test_load_series_reads_the_chosen_level(tmp_path: Path) -> None:
    path = _write(tmp_path, "ct", (40, 64, 64), (2.5, 0.7, 0.7))
    opened = open_image(path)
    meta, array = load_series(path, ras_spacing=MERLIN_PIXDIM)
    np.testing.assert_array_equal(array, opened.read(1))
    assert meta == opened.level_meta(1)
    meta0, array0 = load_series(path)
    assert meta0 == opened.meta and array0.shape == (40, 64, 64)


def test_merlin_pyramid_input_is_close_and_versioned_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = write_random_checkpoint("merlin_tiny", tmp_path / "m.pt")
    full = create_encoder("merlin_tiny", ckpt, device="cpu")
    pyramid = create_encoder("merlin_tiny", ckpt, device="cpu", input_level="pyramid")
    explicit_full = create_encoder("merlin_tiny", ckpt, device="cpu", input_level="full")
    assert full.input_spacing is None and pyramid.input_spacing == MERLIN_PIXDIM
    assert pyramid.version.id != full.version.id == explicit_full.version.id
    with pytest.raises(ValueError, match="input_level"):
        create_encoder("merlin_tiny", ckpt, device="cpu", input_level="half")

    # a linear ramp in world coordinates: block means and bilinear resampling are exact on it,
    # so both paths agree to within the half-voxel offset of their resampling grids (MONAI
    # anchors the output grid on the first input voxel: 0.35 mm apart here, 0.7 HU on this ramp)
    shape, (dz, dy, dx) = (40, 96, 96), (2.5, 0.7, 0.7)
    affine = _affine(np.eye(3), (dx, dy, dz))
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    ramp = 6 * (x * dx + affine[0, 3]) - 4 * (y * dy + affine[1, 3]) + 3 * (z * dz - 50.0)
    meta = ImageMeta(
        modality="CT",
        source_kind="nifti",
        axes=("z", "y", "x"),
        spacing=(dz, dy, dx),
        origin=tuple(float(v) for v in affine[:3, 3][::-1]),
        affine=tuple(tuple(float(v) for v in r) for r in affine),
    )
    path = str(tmp_path / "ramp.zarr")
    write_image(DecodedImage(meta=meta, pixels=ramp.astype(np.float32)), path, name="ramp")
    opened = open_image(path)
    x0 = full.preprocess(opened.meta, opened.read(0))
    x1 = pyramid.preprocess(opened.level_meta(1), opened.read(1))
    assert x0.shape == x1.shape
    diff = (x0 - x1).abs()
    assert float(diff.max()) < 1.0 / 2000  # 1 HU on the 2000 HU window
    # and a level read with level 0's geometry would be off by far more
    wrong = pyramid.preprocess(
        ImageMeta(**{**opened.meta.to_dict(), "spacing": opened.level_meta(1).spacing}),
        opened.read(1),
    )
    assert wrong.shape != x0.shape or float((x0 - wrong).abs().max()) > 10.0 / 2000

    levels: list[int] = []
    read = OpenedImage.read

    def spy(self: OpenedImage, level: int = 0) -> np.ndarray:
        levels.append(level)
        return read(self, level)

    monkeypatch.setattr(OpenedImage, "read", spy)
    out = list(stream_encode(pyramid, [path], 1, 0))
    assert out[0].ok and levels == [1]
    levels.clear()
    out = list(stream_encode(full, [path], 1, 0))
    assert out[0].ok and levels == [0]
