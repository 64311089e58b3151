"""The video reader against PyAV's own decoding: frames, rate, streaming in slabs, refusals."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest

from medflow.readers.video import read_video
from medflow.reasons import ReasonCode, SourceError


def _write(
    path: Path,
    n_frames: int,
    size: tuple[int, int],
    *,
    fps: int = 25,
    codec: str = "libx264",
    comment: str | None = None,
    container_options: dict[str, str] | None = None,
) -> Path:
    """Encode ``n_frames`` frames of moving noise at ``size`` (height, width)."""
    h, w = size
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (h, 2 * w, 3), dtype=np.uint8)
    with av.open(str(path), "w", options=container_options or {}) as c:
        if comment:
            c.metadata["comment"] = comment
        s = c.add_stream(codec, rate=fps)
        assert isinstance(s, av.VideoStream)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            s.options = {"preset": "ultrafast"}
        for i in range(n_frames):
            frame = np.ascontiguousarray(base[:, i % w : i % w + w])
            for packet in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


def _av_frames(path: Path) -> list[np.ndarray]:
    """PyAV's own decode: (y, x, 3) RGB per frame."""
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _collect(blocks: Iterator[np.ndarray] | None) -> list[np.ndarray]:
    assert blocks is not None
    return list(blocks)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("video") / "clip.mp4", 70, (48, 64))


# ---------------------------------------------------------------------------------------------
# round trips


def test_mp4_frames_rate_and_pixels(clip: Path) -> None:
    image = read_video(str(clip), slab_frames=16)
    meta = image.meta
    assert meta.axes == ("t", "c", "y", "x")
    assert image.shape == (70, 3, 48, 64)
    assert image.dtype == np.uint8
    assert meta.attrs["fps"] == pytest.approx(25.0)
    assert meta.attrs["duration_s"] == pytest.approx(70 / 25, abs=0.05)
    assert meta.spacing[0] == pytest.approx(1 / 25)
    assert meta.modality == "XC"
    assert meta.source_kind == "video"

    blocks = _collect(image.blocks)
    assert [b.shape[0] for b in blocks] == [16, 16, 16, 16, 6]
    assert all(b.shape[1:] == (3, 48, 64) and b.dtype == np.uint8 for b in blocks)
    frames = np.concatenate(blocks)
    reference = _av_frames(clip)
    assert len(reference) == frames.shape[0] == 70
    np.testing.assert_array_equal(frames[0], reference[0].transpose(2, 0, 1))
    np.testing.assert_array_equal(frames[-1], reference[-1].transpose(2, 0, 1))
    np.testing.assert_array_equal(frames, np.stack(reference).transpose(0, 3, 1, 2))


@pytest.mark.parametrize(
    ("name", "size", "codec"),
    [
        ("odd.mp4", (38, 50), "libx264"),  # width not a multiple of 16: packed RGB path
        ("clip.avi", (48, 64), "mpeg4"),
        ("clip.mov", (40, 80), "libx264"),
    ],
)
def test_other_sizes_and_containers_match_av(
    tmp_path: Path, name: str, size: tuple[int, int], codec: str
) -> None:
    path = _write(tmp_path / name, 20, size, codec=codec)
    image = read_video(str(path))
    frames = np.concatenate(_collect(image.blocks))
    reference = np.stack(_av_frames(path)).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(frames, reference)
    assert image.shape == (20, 3, *size)


def test_blocks_are_lazy_and_bounded(tmp_path: Path) -> None:
    # 240 frames of 240 x 320 RGB are 55 MB whole; the reader holds a slab or two at a time
    path = _write(tmp_path / "long.mp4", 240, (240, 320), fps=30)
    slab_bytes = 16 * 3 * 240 * 320
    tracemalloc.start()
    try:
        image = read_video(str(path), slab_frames=16)
        assert image.blocks is not None
        count = 0
        for block in image.blocks:
            assert block.shape[0] <= 16
            count += block.shape[0]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 240
    assert peak < 4 * slab_bytes  # the whole video is 15 slabs


def test_endoscopy_metadata_gives_es(tmp_path: Path) -> None:
    path = _write(tmp_path / "scope.mp4", 5, (32, 32), comment="Colonoscopy, withdrawal")
    image = read_video(str(path))
    assert image.meta.modality == "ES"
    _collect(image.blocks)


def test_abandoned_stream_closes_cleanly(clip: Path) -> None:
    image = read_video(str(clip), slab_frames=8)
    assert image.blocks is not None
    first = next(image.blocks)
    assert first.shape[0] == 8
    image.blocks.close()  # type: ignore[attr-defined]  # a generator: closes the container


# ---------------------------------------------------------------------------------------------
# bad input


def test_garbage_empty_and_wrong_name(tmp_path: Path) -> None:
    (tmp_path / "noise.mp4").write_bytes(bytes(range(256)) * 20)
    with pytest.raises(SourceError, match="not a readable video container") as err:
        read_video(str(tmp_path / "noise.mp4"))
    assert err.value.code is ReasonCode.UNRECOGNISED_FORMAT
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(SourceError, match="empty") as err:
        read_video(str(tmp_path / "empty.mp4"))
    assert err.value.code is ReasonCode.EMPTY_FILE
    (tmp_path / "clip.mkv").write_bytes(b"x")
    with pytest.raises(SourceError, match="not a video file name") as err:
        read_video(str(tmp_path / "clip.mkv"))
    assert err.value.code is ReasonCode.UNRECOGNISED_FORMAT
    with pytest.raises(SourceError, match="does not exist") as err:
        read_video(str(tmp_path / "absent.mp4"))
    assert err.value.code is ReasonCode.IO_ERROR


def test_truncated_mp4_fails_at_open(tmp_path: Path, clip: Path) -> None:
    data = clip.read_bytes()  # the index (moov) is at the end: cut, nothing is playable
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="not a readable video container") as err:
        read_video(str(tmp_path / "cut.mp4"))
    assert err.value.code is ReasonCode.TRUNCATED  # an MP4 (ftyp box) whose index is lost


def test_truncated_streamable_mp4_fails_while_streaming(tmp_path: Path) -> None:
    path = _write(tmp_path / "fast.mp4", 60, (48, 64), container_options={"movflags": "faststart"})
    data = path.read_bytes()
    cut = tmp_path / "fast_cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    image = read_video(str(cut), slab_frames=8)  # the index is whole: it opens
    with pytest.raises(SourceError, match="truncated") as err:
        _collect(image.blocks)
    assert err.value.code is ReasonCode.TRUNCATED
    assert err.value.path == str(cut)


def test_audio_only_and_picture_named_mp4(tmp_path: Path) -> None:
    path = tmp_path / "voice.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    with pytest.raises(SourceError, match="no video stream") as err:
        read_video(str(path))
    assert err.value.code is ReasonCode.UNSUPPORTED_CONTENT

    from PIL import Image

    picture = tmp_path / "still.mp4"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(picture, format="PNG")
    with pytest.raises(SourceError, match="not an MP4, MOV or AVI") as err:
        read_video(str(picture))
    assert err.value.code is ReasonCode.UNRECOGNISED_FORMAT


def test_slab_frames_is_checked(clip: Path) -> None:
    with pytest.raises(ValueError, match="slab_frames"):
        read_video(str(clip), slab_frames=0)
    with pytest.raises(TypeError, match="slab_frames"):
        read_video(str(clip), slab_frames=2.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# no path, file name or library message in a public reason

_PATIENT_DIR = "DOE_JOHN_123456"
_PATIENT_STEM = "SMITH_ACC998877"


def _assert_path_free(e: SourceError, path: Path) -> None:
    assert e.path == str(path)
    for text in (e.reason, str(e), *(str(a) for a in e.args)):
        for name in (_PATIENT_DIR, _PATIENT_STEM, path.name, str(path.parent)):
            assert name not in text, (name, text)


def _refusal(path: Path, code: ReasonCode) -> SourceError:
    """read_video's SourceError for ``path`` at open: its code, and no name in its texts."""
    with pytest.raises(SourceError) as err:
        read_video(str(path))
    assert err.value.code is code, (err.value.code, err.value.reason)
    _assert_path_free(err.value, path)
    return err.value


def test_reasons_hold_no_path(tmp_path: Path, clip: Path) -> None:
    folder = tmp_path / _PATIENT_DIR
    folder.mkdir()
    stem = folder / _PATIENT_STEM
    data = clip.read_bytes()

    wrong = Path(f"{stem}.mkv")
    wrong.write_bytes(data)
    _refusal(wrong, ReasonCode.UNRECOGNISED_FORMAT)

    empty = Path(f"{stem}.mp4")
    empty.write_bytes(b"")
    _refusal(empty, ReasonCode.EMPTY_FILE)
    _refusal(Path(f"{stem}_absent.mov"), ReasonCode.IO_ERROR)

    garbage = Path(f"{stem}.avi")
    garbage.write_bytes(bytes(range(256)) * 20)
    e = _refusal(garbage, ReasonCode.UNRECOGNISED_FORMAT)
    assert e.reason == "not a readable video container (InvalidDataError)"
    # FFmpeg's message quotes the path: it stays in the restricted detail
    assert e.detail is not None and _PATIENT_STEM in e.detail and _PATIENT_DIR in e.detail
    assert _PATIENT_STEM in e.restricted_text

    cut = Path(f"{stem}.mp4")
    cut.write_bytes(data[: len(data) // 2])
    e = _refusal(cut, ReasonCode.TRUNCATED)
    assert e.detail is not None and _PATIENT_STEM in e.detail


def test_streaming_failure_holds_no_path(tmp_path: Path) -> None:
    folder = tmp_path / _PATIENT_DIR
    folder.mkdir()
    path = _write(folder / "whole.mp4", 60, (48, 64), container_options={"movflags": "faststart"})
    data = path.read_bytes()
    cut = folder / f"{_PATIENT_STEM}.m4v"
    cut.write_bytes(data[: len(data) // 2])
    image = read_video(str(cut), slab_frames=8)
    with pytest.raises(SourceError) as err:
        _collect(image.blocks)
    assert err.value.code is ReasonCode.TRUNCATED
    _assert_path_free(err.value, cut)
