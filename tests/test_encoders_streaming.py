"""Streaming encode: workers load and preprocess, results in order, errors per series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medflow.encoders import Encoder, create_encoder
from medflow.encoders._streaming import EncodedSeries, load_series, stream_encode
from medflow.encoders.testing import TINY_CLIP_CONFIG, synthetic_ct, write_random_checkpoint
from medflow.storage.images import DecodedImage, ImageMeta, write_image


@pytest.fixture(scope="module")
def merlin_tiny(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    root = tmp_path_factory.mktemp("stream")
    ckpt = write_random_checkpoint("merlin_tiny", root / "m.pt")
    return create_encoder("merlin_tiny", ckpt, device="cpu")


def _write_cts(root: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        meta, ct = synthetic_ct((12 + 2 * i, 40, 36), (4.0, 2.0, 2.2), seed=i)
        path = str(root / f"ct{i}.zarr")
        write_image(DecodedImage(meta, pixels=ct), path, name=f"ct{i}")
        paths.append(path)
    return paths


@pytest.mark.parametrize(("num_workers", "mode"), [(0, "workers"), (2, "workers"), (2, "device")])
def test_stream_matches_one_at_a_time(
    merlin_tiny: Encoder, tmp_path: Path, num_workers: int, mode: str
) -> None:
    paths = _write_cts(tmp_path, 5)
    bad = str(tmp_path / "missing.zarr")
    items = [*paths[:2], bad, *paths[2:]]
    results = list(
        stream_encode(merlin_tiny, items, batch_size=2, num_workers=num_workers, preprocess_on=mode)
    )
    assert [r.item for r in results] == items
    assert (
        not results[2].ok
        and results[2].embeddings is None
        and "missing.zarr" in str(results[2].error)
    )
    for r in (r for r in results if r.ok):
        assert isinstance(r, EncodedSeries) and r.embeddings is not None
        meta, ct = load_series(r.item)
        expected = merlin_tiny.encode_series(meta, ct)
        for key, value in expected.items():
            np.testing.assert_allclose(r.embeddings[key], value, rtol=1e-4, atol=1e-5)


def test_stream_video_and_images_with_clip(tmp_path: Path) -> None:
    kw = {"arch_config": str(TINY_CLIP_CONFIG)}
    ckpt = write_random_checkpoint("clip2d", tmp_path / "c.pt", **kw)
    enc = create_encoder("clip2d", ckpt, device="cpu", video_fps=2.0, **kw)
    video_meta = ImageMeta(
        "US", "test", ("t", "c", "y", "x"), (0.1, 1.0, 0.5, 0.5), (0, 0, 0, 0), np.eye(4)
    )
    video = np.random.default_rng(0).integers(0, 255, (25, 3, 30, 40)).astype(np.uint8)
    vpath = str(tmp_path / "v.zarr")
    write_image(DecodedImage(video_meta, pixels=video), vpath, name="v")
    image_meta = ImageMeta("CR", "test", ("y", "x"), (0.2, 0.2), (0, 0), np.eye(4))
    image = np.random.default_rng(1).integers(0, 4000, (50, 40)).astype(np.uint16)
    items = [vpath, (image_meta, image), vpath]
    results = list(stream_encode(enc, items, batch_size=2, num_workers=1))
    assert all(r.ok for r in results)
    assert [r.n_samples for r in results] == [5, 1, 5]
    np.testing.assert_allclose(
        results[0].embeddings["image"], enc.encode_series(video_meta, video)["image"], atol=1e-5
    )
    np.testing.assert_allclose(
        results[1].embeddings["image"], enc.encode_series(image_meta, image)["image"], atol=1e-5
    )


def test_stream_arguments_are_checked(merlin_tiny: Encoder) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        list(stream_encode(merlin_tiny, [], batch_size=0))
    with pytest.raises(ValueError, match="preprocess_on"):
        list(stream_encode(merlin_tiny, [], preprocess_on="gpu"))
    with pytest.raises(TypeError, match="image path"):
        load_series(42)


def test_stream_without_threads_and_stopping_early(merlin_tiny: Encoder, tmp_path: Path) -> None:
    paths = _write_cts(tmp_path, 3)
    results = list(stream_encode(merlin_tiny, paths, batch_size=2, num_workers=0, device_threads=0))
    assert [r.item for r in results] == paths and all(r.ok for r in results)
    stream = stream_encode(merlin_tiny, paths * 3, batch_size=1, num_workers=2)
    first = next(stream)
    stream.close()  # workers and threads are shut down, nothing hangs
    assert first.item == paths[0] and first.ok
