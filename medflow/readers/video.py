"""Read videos (MP4, M4V, MOV, AVI) into a streamed :class:`~storage.images.DecodedImage`.

What comes out:

* blocks: slabs of consecutive frames, each ``(n, 3, height, width)`` uint8 RGB on axes
  ``("t", "c", "y", "x")``; a slab holds at most 64 frames and about 64 MiB (24 frames of 720p),
  so a long video is never whole in memory. Frames whose size changes mid-stream are scaled to
  the first frame's size.
* shape: ``(frames, 3, height, width)``, where ``frames`` is a hint: the container's frame count
  where it records one, else duration x frame rate (``attrs["frame_count_source"]`` says which).
* spacing: ``1 / fps`` seconds on ``t``, 1.0 on ``c``, ``y`` and ``x`` (pixel units:
  ``attrs["spacing_known"] = False``); identity affine, origin 0.
* attrs: ``fps`` (frames per second: the stream's average rate; 1.0 with ``fps_known``
  False when the stream gives none), ``duration_s`` (seconds), ``frame_count_hint`` and
  ``frame_count_source``, ``codec``, ``container``, ``width`` and ``height`` (pixels),
  ``slab_frames``.
* modality: ``"ES"`` (endoscopy) when the container or stream title, comment or description
  names an endoscopic procedure (endoscopy, colonoscopy, gastroscopy, bronchoscopy, ...);
  otherwise ``"XC"``. The metadata text itself is not kept (it may hold identifiers).

Unreadable input raises :class:`~tasks.SourceError` with a :class:`~medflow.reasons.ReasonCode`
and a reason that never quotes the path or the file's name (what FFmpeg said, which may quote
the path, goes to its ``detail`` only). At open time: ``unrecognised_format`` for a file that is
not an MP4, MOV or AVI container, ``truncated`` for an MP4/MOV whose index cannot be read (a
cut file), ``unsupported_content`` for one without a video stream, ``decode_error`` when its
first frame cannot be decoded, ``empty_file`` and ``io_error`` for a file of 0 bytes, missing or
unreadable. While streaming: ``decode_error`` for a decoding error, ``truncated`` when the
stream ends early (FFmpeg's end of file, or well short of the frame count its container
records). The writer then drops what it had written.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from medflow.readers import parse_source_path
from medflow.reasons import ReasonCode, SourceError
from medflow.storage.images import DecodedImage, ImageMeta

__all__ = [
    "MAX_SLAB_FRAMES",
    "SLAB_BYTES",
    "VIDEO_SUFFIXES",
    "VideoFacts",
    "parse_slab_frames",
    "parse_video_path",
    "read_video",
]

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi")
# FFmpeg demuxer names of those containers (it names the MP4/MOV family "mov,mp4,m4a,...")
_VIDEO_CONTAINERS = frozenset({"mov", "mp4", "avi"})
SLAB_BYTES = 64 * 2**20
MAX_SLAB_FRAMES = 64
_ENDOSCOPY_WORDS = (
    "endoscop",
    "colonoscop",
    "gastroscop",
    "duodenoscop",
    "bronchoscop",
    "laparoscop",
    "arthroscop",
    "cystoscop",
    "hysteroscop",
    "capsule endoscop",
)
_METADATA_KEYS = ("title", "comment", "description", "synopsis", "keywords")
# frames a video may fall short of its recorded count without being called truncated
_SHORTFALL_FRAMES = 2
_SHORTFALL_FRACTION = 0.05
# 8-bit YUV sources whose planar GBR conversion equals the packed RGB one; swscale leaves the
# columns past the last multiple of 16 unset in planar output, hence also the width check
_PLANAR_SAFE_FORMATS = frozenset(
    {"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p"}
)
_DECODE_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError, MemoryError)


@dataclass(frozen=True, slots=True)
class VideoFacts:
    """What the container says about its first video stream, and the first frame's size (px)."""

    width: int
    height: int
    fps: float
    fps_known: bool
    duration_s: float
    frame_count: int
    frame_count_source: str
    codec: str
    container: str


def parse_video_path(path: Any) -> str:
    """Check ``path`` names an existing, non-empty video file; return it as a string."""
    return parse_source_path(path, VIDEO_SUFFIXES, "video file")


def parse_slab_frames(slab_frames: Any, width: int, height: int) -> int:
    """Frames per slab: as given (1 to 64), or as many as fit in ``SLAB_BYTES`` (1 to 64)."""
    if slab_frames is None:
        n = max(1, min(MAX_SLAB_FRAMES, SLAB_BYTES // (3 * width * height)))
        # whole multiples of the image writer's 16-frame shards pass through without regrouping
        return n - n % 16 if n >= 16 else n
    if isinstance(slab_frames, bool) or not isinstance(slab_frames, int):
        raise TypeError(f"Expected slab_frames as an int, got {type(slab_frames).__name__}.")
    if not 1 <= slab_frames <= MAX_SLAB_FRAMES:
        raise ValueError(f"Expected slab_frames from 1 to {MAX_SLAB_FRAMES}, got {slab_frames}.")
    return slab_frames


def read_video(path: str, *, slab_frames: int | None = None) -> DecodedImage:
    """Open a video for streamed decoding as RGB frames (see the module docstring).

    The container is opened and the first frame decoded now (so a bad file fails here); the rest
    is decoded lazily as ``blocks`` is iterated, ``slab_frames`` frames at a time (default: up to
    64 frames, about 64 MiB). Raises :class:`SourceError` with its code and a reason that never
    quotes the path for unreadable input.
    """
    try:
        p = parse_video_path(path)
    except TypeError as e:  # our own text: it names the argument's type only
        raise SourceError(str(path), str(e), code=ReasonCode.IO_ERROR) from e
    try:
        container = av.open(p, mode="r")
    except _DECODE_ERRORS as e:
        if isinstance(e, av.InvalidDataError) and _is_iso_media(p):
            raise _failure(
                p,
                "not a readable video container: an MP4/MOV file whose index cannot be read "
                "(cut short, or never finalised)",
                e,
                ReasonCode.TRUNCATED,
            ) from e
        raise _failure(
            p, "not a readable video container", e, ReasonCode.UNRECOGNISED_FORMAT
        ) from e
    try:
        demuxer = str(container.format.name)
        if not set(demuxer.split(",")) & _VIDEO_CONTAINERS:
            raise SourceError(
                p,
                f"the content is {demuxer!r}, not an MP4, MOV or AVI video",
                code=ReasonCode.UNRECOGNISED_FORMAT,
            )
        if not container.streams.video:
            raise SourceError(
                p,
                "the file holds no video stream (audio only, or not a video)",
                code=ReasonCode.UNSUPPORTED_CONTENT,
            )
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame and slice threads: decoding is the bottleneck
        frames = container.decode(stream)
        try:
            first = next(frames)
        except StopIteration as e:
            raise SourceError(
                p, "the video stream holds no decodable frames", code=ReasonCode.DECODE_ERROR
            ) from e
        except _DECODE_ERRORS as e:
            raise _failure(
                p, "the first frame cannot be decoded", e, ReasonCode.DECODE_ERROR
            ) from e
        facts = _facts(container, stream, first)
        slab = parse_slab_frames(slab_frames, facts.width, facts.height)
        modality = "ES" if _says_endoscopy(container, stream) else "XC"
    except BaseException:
        container.close()
        raise
    attrs: dict[str, Any] = {
        "fps": facts.fps,
        "fps_known": facts.fps_known,
        "duration_s": facts.duration_s,
        "frame_count_hint": facts.frame_count,
        "frame_count_source": facts.frame_count_source,
        "codec": facts.codec,
        "container": facts.container,
        "width": facts.width,
        "height": facts.height,
        "slab_frames": slab,
        "spacing_known": False,
    }
    meta = ImageMeta(
        modality=modality,
        source_kind="video",
        axes=("t", "c", "y", "x"),
        spacing=(1.0 / facts.fps, 1.0, 1.0, 1.0),
        origin=(0.0, 0.0, 0.0, 0.0),
        affine=tuple(tuple(float(v) for v in row) for row in np.eye(4)),
        attrs=attrs,
    )
    return DecodedImage(
        meta=meta,
        blocks=_slabs(p, container, first, frames, facts, slab),
        shape=(max(1, facts.frame_count), 3, facts.height, facts.width),
        dtype=np.dtype(np.uint8),
    )


# ---------------------------------------------------------------------------------------------
# container facts


def _facts(container: Any, stream: Any, first: Any) -> VideoFacts:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    fps_known = math.isfinite(fps) and fps > 0
    if not fps_known:
        fps = 1.0  # a still-image stream or a broken header: one frame per second, flagged
    if stream.duration and stream.time_base:
        duration = float(stream.duration * Fraction(stream.time_base))
    elif container.duration:
        duration = float(container.duration) / av.time_base
    else:
        duration = 0.0
    if stream.frames and stream.frames > 0:
        count, source = int(stream.frames), "container"
    elif duration > 0 and fps_known:
        count, source = round(duration * fps), "estimated"
    else:
        count, source = 0, "unknown"
    return VideoFacts(
        width=int(first.width),
        height=int(first.height),
        fps=fps,
        fps_known=fps_known,
        duration_s=duration,
        frame_count=count,
        frame_count_source=source,
        codec=str(stream.codec_context.name),
        container=str(container.format.name),
    )


def _says_endoscopy(container: Any, stream: Any) -> bool:
    texts: list[str] = []
    for metadata in (container.metadata, stream.metadata):
        texts.extend(str(metadata.get(k, "")) for k in _METADATA_KEYS)
    joined = " ".join(texts).lower()
    return any(w in joined for w in _ENDOSCOPY_WORDS)


def _is_iso_media(path: str) -> bool:
    """Whether ``path`` starts with an ISO base media (MP4, MOV) ``ftyp`` box."""
    try:
        with open(path, "rb") as f:
            return f.read(8)[4:8] == b"ftyp"
    except OSError:
        return False


def _failure(path: str, what: str, e: BaseException, code: ReasonCode) -> SourceError:
    """A :class:`SourceError` for ``e`` (from FFmpeg or the OS): ``what`` went wrong, and ``e``'s
    kind, in the reason; its message, which may quote the path, in the detail only.

    ``code`` is the usual reading; whatever the step, an OS error with an errno (missing file,
    permissions, I/O) is ``io_error``, an end of file ``truncated`` and running out of memory
    ``too_large``.
    """
    kind = type(e).__name__
    detail = str(e) or kind
    if isinstance(e, MemoryError):
        code = ReasonCode.TOO_LARGE
    elif isinstance(e, EOFError):
        code = ReasonCode.TRUNCATED
    elif isinstance(e, OSError) and e.errno is not None:
        code = ReasonCode.IO_ERROR
    return SourceError(path, f"{what} ({kind})", code=code, detail=detail)


# ---------------------------------------------------------------------------------------------
# streaming


def _slabs(
    path: str,
    container: Any,
    first: Any,
    frames: Iterator[Any],
    facts: VideoFacts,
    slab: int,
) -> Iterator[np.ndarray]:
    """Yield ``(n, 3, h, w)`` uint8 RGB slabs; close the container when done or abandoned."""
    reformatter = VideoReformatter()  # reused: it keeps its colour converter between frames
    h, w = facts.height, facts.width
    decoded = 0
    try:
        buf = np.empty((slab, 3, h, w), dtype=np.uint8)
        filled = 0
        frame: Any = first
        while frame is not None:
            _planar_rgb(reformatter, frame, buf[filled], w, h)
            filled += 1
            decoded += 1
            if filled == slab:
                yield buf
                # a fresh buffer each time: the consumer may still hold the slab it was given
                buf = np.empty((slab, 3, h, w), dtype=np.uint8)
                filled = 0
            try:
                frame = next(frames, None)
            except _DECODE_ERRORS as e:
                raise _failure(
                    path, f"decoding failed after frame {decoded}", e, ReasonCode.DECODE_ERROR
                ) from e
        if filled:
            yield buf[:filled]
        expected = facts.frame_count if facts.frame_count_source == "container" else 0
        allowed = max(_SHORTFALL_FRAMES, math.ceil(_SHORTFALL_FRACTION * expected))
        if expected and decoded < expected - allowed:
            raise SourceError(
                path,
                f"the video ends after {decoded} of the {expected} frames its container "
                "records (truncated file?)",
                code=ReasonCode.TRUNCATED,
            )
    finally:
        container.close()


def _planar_rgb(reformatter: Any, frame: Any, out: np.ndarray, width: int, height: int) -> None:
    """Write ``frame`` into ``out`` (3, h, w) as RGB, the same values as av's ``rgb24``."""
    size = (
        {} if (frame.width, frame.height) == (width, height) else {"width": width, "height": height}
    )
    if frame.format.name in _PLANAR_SAFE_FORMATS and width % 16 == 0:
        # planar G, B, R planes copy straight into the (c, y, x) slab: no interleaved transpose
        gbr = reformatter.reformat(frame, format="gbrp", **size)
        for channel, plane in zip((1, 2, 0), gbr.planes, strict=True):
            rows = np.frombuffer(plane, dtype=np.uint8).reshape(plane.height, plane.line_size)
            out[channel] = rows[:, :width]
        return
    rgb = reformatter.reformat(frame, format="rgb24", **size).to_ndarray()
    out[...] = rgb.transpose(2, 0, 1)
