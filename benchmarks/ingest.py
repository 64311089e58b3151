"""Ingest benchmark: medflow's DICOM, video and no-op nightly paths against simple baselines.

One run measures, each case in a fresh Python (or tool) process of its own so that its peak
resident memory is its own:

1. a generated CT series (``--slices`` files of ``--size`` x ``--size`` 16-bit pixels, one
   uncompressed DICOM file per slice): medflow's ``read_dicom_series`` + ``write_image``; a naive
   pydicom + ``np.stack`` + ``np.save`` baseline; ``dcm2niix -z n`` and ``dcm2niix -z y``;
2. a generated 720p H.264 MP4 of ``--video-seconds`` seconds at 30 fps: medflow's streamed
   ``read_video`` + ``write_image``, and a PyAV decode-only baseline;
3. a generated fMRI series (``--fmri-volumes`` volumes of ``--fmri-size`` x ``--fmri-size`` x
   ``--fmri-slices``, one classic MR file per slice per volume): medflow's header scan,
   ``read_dicom_parts`` (one 4D image) and ``write_image``, against ``dcm2niix -z n`` and
   ``dcm2niix -z y`` on the same files;
4. ``medflow nightly`` on an archive of ``--noop-series`` tiny NIfTI series: a first run that
   ingests them and a second run with nothing new (the no-op), timed as a whole command and by
   the flow's own ``seconds`` from the ``runs`` table; then, for comparison, the no-op against a
   Prefect server started beforehand instead of Prefect's temporary one.

Generated inputs are kept under ``--workdir`` and reused by later runs with the same settings;
generating them is not timed. Sizes are in MiB (2**20 bytes), throughput in MiB/s, times in
seconds (wall clock and CPU). Each case also records the machine's 1-minute load average when it
started, since other work on the machine inflates wall times. The results are printed as
markdown and written to ``--out``.

Usage::

    python -m benchmarks.ingest --slices 300 --size 512 --video-seconds 60 --noop-series 2000 \
        --fmri-volumes 300
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import os
import pstats
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.harness import command_line, cpu_seconds, machine_facts, rss_now, rss_peak

if TYPE_CHECKING:
    import numpy as np

MIB = 2**20
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "ingest.md"
CT_SPACING = (2.5, 0.7, 0.7)  # z, y, x in mm: demo_dicom's default chest series
VIDEO_FPS = 30
VIDEO_SIZE = (720, 1280)  # height, width in pixels
NOOP_GOAL_S = 10.0
NIGHTLY_RUNS = (
    ("first", "first run (ingests everything)"),
    ("noop", "no-op rerun"),
    ("noop_server", "no-op rerun, `PREFECT_API_URL` = a running server"),
)
SERVER_START_TIMEOUT_S = 180.0
CT_CASES = ("medflow", "naive", "dcm2niix_zn", "dcm2niix_zy")
FMRI_CASES = ("medflow", "dcm2niix_zn", "dcm2niix_zy")
FMRI_SPACING = (3.0, 3.0, 3.0)  # z, y, x in mm
FMRI_TR_S = 2.0
CASE_TIMEOUT_S = 3600.0

Work = Callable[[], dict[str, Any]]


# ---------------------------------------------------------------------------------------------
# settings and paths


@dataclass(frozen=True, slots=True)
class Config:
    """The benchmark's settings: sizes of the generated inputs and what to run."""

    workdir: Path
    slices: int
    size: int
    video_seconds: int
    noop_series: int
    repeat: int
    skip_video: bool
    skip_noop: bool
    profile: bool
    fmri_volumes: int = 300
    fmri_size: int = 64
    fmri_slices: int = 36
    skip_fmri: bool = False

    @property
    def fmri_dicom(self) -> Path:
        return (
            self.workdir / "fmri" / f"dicom-{self.fmri_volumes}x{self.fmri_slices}x{self.fmri_size}"
        )

    @property
    def fmri_out(self) -> Path:
        return self.workdir / "fmri" / "out"

    @property
    def ct_dicom(self) -> Path:
        return self.workdir / "ct" / f"dicom-{self.slices}x{self.size}"

    @property
    def ct_out(self) -> Path:
        return self.workdir / "ct" / "out"

    @property
    def video(self) -> Path:
        return self.workdir / "video" / f"synthetic-720p-{self.video_seconds}s.mp4"

    @property
    def video_out(self) -> Path:
        return self.workdir / "video" / "out"

    @property
    def noop_archive(self) -> Path:
        return self.workdir / "noop" / f"archive-{self.noop_series}"

    @property
    def noop_out(self) -> Path:
        return self.workdir / "noop" / "out"

    @property
    def prefect_home(self) -> Path:
        return self.workdir / "noop" / "prefect-home"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @property
    def results(self) -> Path:
        return self.workdir / "results"

    @property
    def profiles(self) -> Path:
        return self.workdir / "profiles"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line options (internal ones, for the per-case subprocesses, are hidden)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slices", type=int, default=300, help="CT slices (files); default 300")
    p.add_argument("--size", type=int, default=512, help="CT rows = columns; default 512")
    p.add_argument("--video-seconds", type=int, default=60, help="video length (s); default 60")
    p.add_argument("--noop-series", type=int, default=2000, help="series in the no-op archive")
    p.add_argument("--repeat", type=int, default=3, help="runs per CT case (median); default 3")
    p.add_argument("--skip-video", action="store_true", help="skip the video cases")
    p.add_argument("--skip-noop", action="store_true", help="skip the nightly no-op cases")
    p.add_argument("--fmri-volumes", type=int, default=300, help="fMRI volumes; default 300")
    p.add_argument("--fmri-size", type=int, default=64, help="fMRI rows = columns; default 64")
    p.add_argument("--fmri-slices", type=int, default=36, help="fMRI slices; default 36")
    p.add_argument("--skip-fmri", action="store_true", help="skip the 4D fMRI cases")
    p.add_argument("--workdir", type=Path, default=None, help="inputs and outputs (default: temp)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown results file")
    p.add_argument(
        "--profile",
        action="store_true",
        help="cProfile each case's main thread into WORKDIR/profiles (timings inflated)",
    )
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in (
        "slices", "size", "video_seconds", "noop_series", "repeat", "fmri_volumes", "fmri_size",
        "fmri_slices",
    ):  # fmt: skip
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def make_config(args: argparse.Namespace) -> Config:
    """The :class:`Config` for parsed options (the work folder must be set by then)."""
    return Config(
        workdir=Path(args.workdir).resolve(),
        slices=args.slices,
        size=args.size,
        video_seconds=args.video_seconds,
        noop_series=args.noop_series,
        repeat=args.repeat,
        skip_video=args.skip_video,
        skip_noop=args.skip_noop,
        profile=args.profile,
        fmri_volumes=args.fmri_volumes,
        fmri_size=args.fmri_size,
        fmri_slices=args.fmri_slices,
        skip_fmri=args.skip_fmri,
    )


# ---------------------------------------------------------------------------------------------
# measuring, inside a case's own process


def tree_size(path: Path) -> int:
    """Total size in bytes of the files under ``path`` (or of the file ``path``)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def level_sizes(image: Path, levels: int) -> list[int]:
    """Bytes on disk of each pyramid level (``0``, ``1``, ...) of an OME-Zarr image."""
    return [tree_size(image / str(i)) for i in range(levels)]


def fresh_dir(path: Path) -> Path:
    """``path`` as an empty folder (removed first when it exists)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def measure(work: Work, profile_to: Path | None) -> dict[str, Any]:
    """Run ``work`` once and return its figures plus wall time (s) and memory (bytes).

    ``baseline_rss`` is the resident size right before the work (after imports and setup);
    ``peak_rss`` is the process's ``ru_maxrss`` after it; ``cpu_s`` the work's CPU time.
    """
    gc.collect()
    baseline = rss_now()
    prof = cProfile.Profile() if profile_to else None
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    figures = work()
    if prof:
        prof.disable()
    wall = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    peak = rss_peak()
    if prof and profile_to:
        save_profile(prof, profile_to)
    return {"wall_s": wall, "cpu_s": cpu, "baseline_rss": baseline, "peak_rss": peak, **figures}


def save_profile(prof: cProfile.Profile, path: Path, top: int = 40) -> None:
    """Write ``prof`` as ``path`` (pstats) and its top functions by cumulative time as .txt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.dump_stats(path)
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text).strip_dirs()
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    path.with_suffix(".txt").write_text(text.getvalue())


# ---------------------------------------------------------------------------------------------
# generated inputs (not timed)


def _marker_ok(folder: Path, settings: dict[str, Any]) -> bool:
    marker = folder / ".complete.json"
    return marker.is_file() and json.loads(marker.read_text()) == settings


def _mark(folder: Path, settings: dict[str, Any]) -> None:
    (folder / ".complete.json").write_text(json.dumps(settings))


def gen_ct(cfg: Config) -> Work:
    """Write the CT series: demo_dicom's HU phantom, one uncompressed DICOM file per slice."""

    def work() -> dict[str, Any]:
        settings = {"slices": cfg.slices, "size": cfg.size, "spacing": list(CT_SPACING)}
        if _marker_ok(cfg.ct_dicom, settings):
            return {"reused": True}
        from medflow.demo.dicom import ct_phantom, write_ct_series

        folder = fresh_dir(cfg.ct_dicom)
        volume = ct_phantom((cfg.slices, cfg.size, cfg.size))
        write_ct_series(folder, volume, spacing=CT_SPACING)
        _mark(folder, settings)
        return {"reused": False}

    return work


def gen_fmri(cfg: Config) -> Work:
    """Write the fMRI series: classic MR Image Storage files, one per slice per volume, as a
    scanner exports a BOLD run (AcquisitionNumber and InstanceNumber per volume, slice-timed
    AcquisitionTime), from demo_dicom's phantom with a small signal change per volume."""

    def work() -> dict[str, Any]:
        import numpy as np
        import pydicom
        from pydicom.uid import generate_uid

        settings = {
            "volumes": cfg.fmri_volumes,
            "slices": cfg.fmri_slices,
            "size": cfg.fmri_size,
            "spacing": list(FMRI_SPACING),
        }
        if _marker_ok(cfg.fmri_dicom, settings):
            return {"reused": True}
        from medflow.demo.dicom import ct_phantom, write_ct_series

        folder = fresh_dir(cfg.fmri_dicom)
        nz, n = cfg.fmri_slices, cfg.fmri_size
        base = (ct_phantom((nz, n, n)).astype(np.int32) + 1024).clip(0, 4000).astype(np.int16)
        template = write_ct_series(
            folder / "template", base[:1], spacing=FMRI_SPACING, rescale=(1.0, 0.0)
        )[0]
        ds = pydicom.dcmread(template)
        shutil.rmtree(folder / "template")
        ds.Modality = "MR"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.Manufacturer = "medflow-benchmark"
        ds.SeriesNumber = 5
        ds.RepetitionTime = f"{FMRI_TR_S * 1000:g}"
        ds.EchoTime = "30"
        for keyword in ("RescaleType", "RescaleSlope", "RescaleIntercept", "WindowCenter",
                        "WindowWidth", "KVP"):  # fmt: skip
            if keyword in ds:
                delattr(ds, keyword)
        ds.SeriesInstanceUID = generate_uid()
        first = np.array([float(v) for v in ds.ImagePositionPatient])
        rng = np.random.default_rng(0)
        for t in range(cfg.fmri_volumes):
            vol = base + rng.integers(-20, 20, size=base.shape, dtype=np.int16)
            for k in range(nz):
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                ds.InstanceNumber = t * nz + k + 1
                ds.AcquisitionNumber = t + 1
                when = 36000.0 + t * FMRI_TR_S + k * FMRI_TR_S / nz
                hh, rem = divmod(when, 3600)
                mm, ss = divmod(rem, 60)
                ds.AcquisitionTime = f"{int(hh):02d}{int(mm):02d}{ss:09.6f}"
                ds.ImagePositionPatient = [float(first[0]), float(first[1]),
                                           float(first[2] + k * FMRI_SPACING[0])]  # fmt: skip
                ds.SliceLocation = float(first[2] + k * FMRI_SPACING[0])
                ds.PixelData = vol[k].tobytes()
                ds.save_as(folder / f"MR{t:04d}_{k:03d}.dcm")
        _mark(folder, settings)
        return {"reused": False}

    return work


def _smooth(a: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """Box filter of half-width ``radius`` along ``axis`` (edge-padded), via a cumulative sum."""
    import numpy as np

    pad = [(0, 0)] * a.ndim
    pad[axis] = (radius + 1, radius)
    c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis, dtype=np.float32)
    n = a.shape[axis]
    hi = np.take(c, np.arange(2 * radius + 1, 2 * radius + 1 + n), axis=axis)
    lo = np.take(c, np.arange(0, n), axis=axis)
    return (hi - lo) / (2 * radius + 1)


def video_texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A ``(height, width, 3)`` uint8 RGB texture: smooth blobs, fine stripes and sharp discs."""
    import numpy as np

    rng = np.random.default_rng(seed)
    low = rng.random((height // 32 + 1, width // 32 + 1, 3), dtype=np.float32)
    blobs = np.repeat(np.repeat(low, 32, axis=0), 32, axis=1)[:height, :width]
    for axis in (0, 1):
        blobs = _smooth(_smooth(blobs, 12, axis), 12, axis)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    stripes = 0.08 * np.sin(x / 3.0 + 0.5 * np.sin(y / 40.0))[..., None]
    tex = 0.25 + 0.6 * blobs + stripes
    for _ in range(60):  # sharp-edged discs of solid colour
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        r = rng.integers(8, 60)
        disc = (y - cy) ** 2 + (x - cx) ** 2 <= r * r
        tex[disc] = rng.random(3, dtype=np.float32)
    return np.clip(tex * 255.0, 0, 255).astype(np.uint8)


def video_frames(n: int, height: int, width: int) -> Iterator[np.ndarray]:
    """``n`` RGB frames ``(height, width, 3)``: a texture panned along a Lissajous path, with a
    moving bright disc and a slow brightness change."""
    import numpy as np

    margin = 160
    tex = video_texture(height + 2 * margin, width + 2 * margin)
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(n):
        t = i / VIDEO_FPS
        dy = int(margin + (margin - 1) * np.sin(0.31 * t))
        dx = int(margin + (margin - 1) * np.sin(0.47 * t + 1.0))
        frame = tex[dy : dy + height, dx : dx + width].copy()
        cy = height / 2 + height / 3 * np.sin(1.3 * t)
        cx = width / 2 + width / 3 * np.cos(0.9 * t)
        frame[(yy - cy) ** 2 + (xx - cx) ** 2 <= 40**2] = (250, 240, 200)
        gain = 0.85 + 0.15 * np.sin(0.2 * t)
        yield (frame * gain).astype(np.uint8)


def gen_video(cfg: Config) -> Work:
    """Write the H.264 MP4 (yuv420p, 30 fps, libx264 ``ultrafast``, crf 23) with PyAV."""

    def work() -> dict[str, Any]:
        if cfg.video.is_file() and cfg.video.stat().st_size > 0:
            return {"reused": True}
        import av

        cfg.video.parent.mkdir(parents=True, exist_ok=True)
        tmp = cfg.video.with_name(cfg.video.stem + ".tmp.mp4")
        height, width = VIDEO_SIZE
        with av.open(str(tmp), mode="w") as container:
            stream = container.add_stream("libx264", rate=VIDEO_FPS)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"preset": "ultrafast", "crf": "23"}
            for rgb in video_frames(cfg.video_seconds * VIDEO_FPS, height, width):
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        os.replace(tmp, cfg.video)
        return {"reused": False}

    return work


def gen_noop(cfg: Config) -> Work:
    """Write the no-op archive: tiny 16x16x4 int16 NIfTI files, 10 per patient folder, 20
    patients per site folder."""

    def work() -> dict[str, Any]:
        settings = {"series": cfg.noop_series}
        if _marker_ok(cfg.noop_archive, settings):
            return {"reused": True}
        import nibabel as nib
        import numpy as np

        root = fresh_dir(cfg.noop_archive)
        rng = np.random.default_rng(0)
        for i in range(cfg.noop_series):
            folder = root / f"site{i // 200:02d}" / f"patient{i // 10:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            data = rng.integers(-1000, 1000, size=(16, 16, 4), dtype=np.int16)
            nib.save(nib.Nifti1Image(data, np.eye(4)), folder / f"series{i:05d}.nii")
        _mark(root, settings)
        return {"reused": False}

    return work


# ---------------------------------------------------------------------------------------------
# measured cases, each run in a process of its own


def _dicom_paths(cfg: Config) -> list[str]:
    return sorted(str(p) for p in cfg.ct_dicom.glob("*.dcm"))


def ct_medflow(cfg: Config) -> Work:
    """medflow as the nightly flow runs it on a new series: discovery's header scan
    (``read_dicom_headers``, what ``tasks.ingest.scan_header_files`` runs: every file's header
    read to group the files into series, as dcm2niix does inside its run), then the ingest
    task's ``read_dicom_series(stream=True)`` (every header read and checked, then slabs of
    slices decoded as the writer takes them) and ``write_image`` (OME-Zarr, sharded, blosc
    zstd), which overlaps decoding and compression. Walking the folder, fingerprinting files
    for the incremental catalog and pseudonymising keys are not counted, nor is importing
    Prefect (the scan is called below the task module so that the baseline memory is the
    reader's, not the orchestrator's)."""
    import numpy as np

    from medflow.readers.dicom import read_dicom_headers, read_dicom_series
    from medflow.storage.images import write_image

    paths = _dicom_paths(cfg)
    out = fresh_dir(cfg.ct_out) / "ct.zarr"

    def work() -> dict[str, Any]:
        ts = time.perf_counter()
        groups: dict[tuple[str, ...], list[str]] = {}
        for path, header in zip(paths, read_dicom_headers(paths), strict=True):
            if isinstance(header, Exception):
                raise header
            groups.setdefault(tuple(header.grouping_uids()), []).append(path)
        if len(groups) != 1:
            raise RuntimeError(f"expected one series from the header scan, got {len(groups)}")
        t0 = time.perf_counter()
        image = read_dicom_series(paths, stream=True)
        t1 = time.perf_counter()
        read_peak = rss_peak()
        stored = write_image(image, str(out), name="ct-benchmark")
        t2 = time.perf_counter()
        assert image.shape is not None and image.dtype is not None
        return {
            "scan_s": t0 - ts,
            "read_s": t1 - t0,
            "write_s": t2 - t1,
            "read_peak_rss": read_peak,
            "decoded_bytes": int(np.prod(image.shape)) * np.dtype(image.dtype).itemsize,
            "dtype": str(np.dtype(image.dtype)),
            "shape": list(image.shape),
            "levels": stored.n_levels,
            "level_bytes": level_sizes(out, stored.n_levels),
            "output_bytes": stored.nbytes_stored,
        }

    return work


def fmri_medflow(cfg: Config) -> Work:
    """medflow on the fMRI series as the nightly flow runs it: the header scan, then
    ``read_dicom_parts`` (every header read, the planes grouped into volumes: one 4D image)
    and ``write_image``."""
    import numpy as np

    from medflow.readers.dicom import read_dicom_headers, read_dicom_parts
    from medflow.storage.images import write_image

    paths = sorted(str(p) for p in cfg.fmri_dicom.glob("*.dcm"))
    out = fresh_dir(cfg.fmri_out) / "fmri.zarr"

    def work() -> dict[str, Any]:
        ts = time.perf_counter()
        groups: dict[tuple[str, ...], list[str]] = {}
        for path, header in zip(paths, read_dicom_headers(paths), strict=True):
            if isinstance(header, Exception):
                raise header
            groups.setdefault(tuple(header.grouping_uids()), []).append(path)
        if len(groups) != 1:
            raise RuntimeError(f"expected one series from the header scan, got {len(groups)}")
        t0 = time.perf_counter()
        parts = read_dicom_parts(paths, stream=True)
        if len(parts.parts) != 1:
            raise RuntimeError(f"expected one image, got {len(parts.parts)} parts")
        image = parts.parts[0].image
        t1 = time.perf_counter()
        read_peak = rss_peak()
        stored = write_image(image, str(out), name="fmri-benchmark")
        t2 = time.perf_counter()
        shape = image.pixels.shape if image.pixels is not None else image.shape
        dtype = image.pixels.dtype if image.pixels is not None else image.dtype
        assert shape is not None and dtype is not None
        return {
            "scan_s": t0 - ts,
            "read_s": t1 - t0,
            "write_s": t2 - t1,
            "read_peak_rss": read_peak,
            "decoded_bytes": int(np.prod(shape)) * np.dtype(dtype).itemsize,
            "dtype": str(np.dtype(dtype)),
            "shape": list(shape),
            "streamed": image.blocks is not None,
            "axes": "".join(image.meta.axes),
            "t_scale_s": image.meta.spacing[0],
            "levels": stored.n_levels,
            "output_bytes": stored.nbytes_stored,
            "files": len(paths),
        }

    return work


def ct_naive(cfg: Config) -> Work:
    """Naive: ``dcmread`` every file, sort by ImagePositionPatient z, ``np.stack``, ``np.save``."""
    import numpy as np
    import pydicom

    paths = _dicom_paths(cfg)
    out = fresh_dir(cfg.ct_out) / "ct.npy"

    def work() -> dict[str, Any]:
        datasets = [pydicom.dcmread(p) for p in paths]
        datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
        volume = np.stack([ds.pixel_array for ds in datasets])
        np.save(out, volume)
        return {
            "decoded_bytes": int(volume.nbytes),
            "dtype": str(volume.dtype),
            "shape": list(volume.shape),
            "output_bytes": out.stat().st_size,
        }

    return work


def video_medflow(cfg: Config) -> Work:
    """medflow: streamed ``read_video`` then ``write_image`` (OME-Zarr, t/c/y/x)."""
    import numpy as np

    from medflow.readers.video import read_video
    from medflow.storage.images import write_image

    out = fresh_dir(cfg.video_out) / "video.zarr"

    def work() -> dict[str, Any]:
        image = read_video(str(cfg.video))
        stored = write_image(image, str(out), name="video-benchmark")
        frames = int(stored.shape[0])
        return {
            "frames": frames,
            "decoded_bytes": int(np.prod(stored.shape)) * np.dtype(stored.dtype).itemsize,
            "shape": list(stored.shape),
            "levels": stored.n_levels,
            "level_bytes": level_sizes(out, stored.n_levels),
            "output_bytes": stored.nbytes_stored,
        }

    return work


def video_decode(cfg: Config) -> Work:
    """Baseline: PyAV decode of every frame to an RGB ndarray (threaded decoder), discarded."""
    import av

    def work() -> dict[str, Any]:
        frames = nbytes = 0
        with av.open(str(cfg.video)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                nbytes += frame.to_ndarray(format="rgb24").nbytes
                frames += 1
        return {"frames": frames, "decoded_bytes": nbytes, "output_bytes": 0}

    return work


def cases() -> dict[str, Callable[[Config], Work]]:
    """Every case a child process can run, by name."""
    return {
        "gen_ct": gen_ct,
        "gen_video": gen_video,
        "gen_noop": gen_noop,
        "gen_fmri": gen_fmri,
        "fmri_medflow": fmri_medflow,
        "ct_medflow": ct_medflow,
        "ct_naive": ct_naive,
        "video_medflow": video_medflow,
        "video_decode": video_decode,
        "read_runs": read_runs,
    }


def run_case_here(cfg: Config, name: str, result: Path) -> None:
    """Set up case ``name``, measure it and write its figures as JSON to ``result``."""
    work = cases()[name](cfg)
    profile_to = cfg.profiles / f"{name}.prof" if cfg.profile else None
    figures = measure(work, profile_to)
    result.write_text(json.dumps(figures, indent=1))


# ---------------------------------------------------------------------------------------------
# processes, from the parent


@dataclass(slots=True)
class ProcRun:
    """One finished child process: exit code, wall and CPU time (s), peak RSS (bytes), and the
    1-minute load average of the machine when it started."""

    returncode: int
    wall_s: float
    cpu_s: float
    peak_rss: int
    load: float
    log: Path


def run_process(
    cmd: Sequence[str], log: Path, env: dict[str, str] | None = None, timeout: float = 3600.0
) -> ProcRun:
    """Run ``cmd`` with its output in ``log``; time it and read its own ``ru_maxrss`` (wait4)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    with log.open("wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return ProcRun(proc.returncode, wall, cpu, int(usage.ru_maxrss) * 1024, load, log)


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a text file."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def case_command(cfg: Config, name: str, result: Path) -> list[str]:
    """The command line that runs case ``name`` in a fresh interpreter."""
    cmd = [
        sys.executable, "-m", "benchmarks.ingest",
        "--case", name,
        "--result", str(result),
        "--workdir", str(cfg.workdir),
        "--slices", str(cfg.slices),
        "--size", str(cfg.size),
        "--video-seconds", str(cfg.video_seconds),
        "--noop-series", str(cfg.noop_series),
        "--fmri-volumes", str(cfg.fmri_volumes),
        "--fmri-size", str(cfg.fmri_size),
        "--fmri-slices", str(cfg.fmri_slices),
    ]  # fmt: skip
    return [*cmd, "--profile"] if cfg.profile else cmd


def run_case(cfg: Config, name: str, tag: str | None = None) -> dict[str, Any]:
    """Run case ``name`` in its own process; its figures, or ``{"error": ...}`` on failure.

    On Linux a child's ``ru_maxrss`` also counts the memory of the parent it was forked from
    (until its exec), so this process imports nothing heavy: numpy, pyarrow, Prefect and the
    readers are imported only in the children.
    """
    tag = tag or name
    result = cfg.results / f"{tag}.json"
    result.unlink(missing_ok=True)
    result.parent.mkdir(parents=True, exist_ok=True)
    print(f"-- {tag} ...", flush=True)
    proc = run_process(
        case_command(cfg, name, result), cfg.logs / f"{tag}.log", None, CASE_TIMEOUT_S
    )
    if proc.returncode != 0 or not result.is_file():
        print(f"   failed (exit {proc.returncode}), log {proc.log}:\n{tail(proc.log)}", flush=True)
        return {"error": f"exit {proc.returncode}; see {proc.log}"}
    figures = json.loads(result.read_text())
    figures["process_wall_s"] = proc.wall_s
    figures["load"] = proc.load
    print(f"   {figures['wall_s']:.2f} s", flush=True)
    return figures


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One figure set from repeated runs: median times, worst memory, the first run's sizes."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    for key in ("wall_s", "cpu_s", "scan_s", "read_s", "write_s"):
        if key in out:
            out[key] = statistics.median(r[key] for r in ok)
    for key in ("peak_rss", "read_peak_rss"):
        if key in out:
            out[key] = max(r[key] for r in ok)
    out["rss_increase"] = max(r["peak_rss"] - r["baseline_rss"] for r in ok)
    out["walls"] = [r["wall_s"] for r in ok]
    out["load"] = max(r.get("load", 0.0) for r in ok)
    return out


def with_increase(figures: dict[str, Any]) -> dict[str, Any]:
    """``figures`` plus ``rss_increase`` (peak minus baseline, bytes) when both are known."""
    if "peak_rss" in figures and "baseline_rss" in figures:
        figures["rss_increase"] = figures["peak_rss"] - figures["baseline_rss"]
    return figures


def dcm2niix_exe() -> str | None:
    """The ``dcm2niix`` next to this interpreter (the PyPI wheel's) or on PATH, or None."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("dcm2niix", path=path)


def dcm2niix_run(
    cfg: Config, compress: str, tag: str, *, source: Path | None = None, out_dir: Path | None = None
) -> dict[str, Any]:
    """One ``dcm2niix -z <compress>`` of the CT folder (or ``source``): wall and CPU (s),
    output size and dcm2niix's own peak RSS (bytes)."""
    exe = dcm2niix_exe()
    if exe is None:
        return {"error": "dcm2niix not found"}
    out = fresh_dir((out_dir or cfg.ct_out) / tag)
    # -b n: no BIDS sidecar; -d 0: this folder only; -w 1: overwrite; -v 0: least output
    cmd = [exe, "-z", compress, "-b", "n", "-d", "0", "-w", "1", "-v", "0"]
    cmd += ["-f", "ct", "-o", str(out), str(source or cfg.ct_dicom)]
    print(f"-- {tag} ...", flush=True)
    proc = run_process(cmd, cfg.logs / f"{tag}.log", None, CASE_TIMEOUT_S)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}; see {proc.log}"}
    print(f"   {proc.wall_s:.2f} s", flush=True)
    return {
        "wall_s": proc.wall_s,
        "cpu_s": proc.cpu_s,
        "peak_rss": proc.peak_rss,
        "baseline_rss": 0,
        "load": proc.load,
        "output_bytes": tree_size(out),
        "files": sorted(p.name for p in out.iterdir()),
        "command": shlex.join(cmd),
    }


def run_ct(cfg: Config) -> dict[str, dict[str, Any]]:
    """The four CT cases, ``cfg.repeat`` rounds of each in turn (so that a change in the
    machine's load falls on all of them alike), combined per case."""
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in CT_CASES}
    for i in range(cfg.repeat):
        runs["medflow"].append(run_case(cfg, "ct_medflow", f"ct_medflow-{i}"))
        runs["naive"].append(run_case(cfg, "ct_naive", f"ct_naive-{i}"))
        runs["dcm2niix_zn"].append(dcm2niix_run(cfg, "n", f"dcm2niix_zn-{i}"))
        runs["dcm2niix_zy"].append(dcm2niix_run(cfg, "y", f"dcm2niix_zy-{i}"))
    shutil.rmtree(cfg.ct_out, ignore_errors=True)
    return {k: combine(v) for k, v in runs.items()}


def run_fmri(cfg: Config) -> dict[str, dict[str, Any]]:
    """The three fMRI cases, ``cfg.repeat`` rounds in turn, combined per case."""
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in FMRI_CASES}
    src, out = cfg.fmri_dicom, cfg.fmri_out
    for i in range(cfg.repeat):
        runs["medflow"].append(run_case(cfg, "fmri_medflow", f"fmri_medflow-{i}"))
        for key, z in (("dcm2niix_zn", "n"), ("dcm2niix_zy", "y")):
            runs[key].append(dcm2niix_run(cfg, z, f"fmri_{key}-{i}", source=src, out_dir=out))
    shutil.rmtree(cfg.fmri_out, ignore_errors=True)
    return {k: combine(v) for k, v in runs.items()}


def dcm2niix_version() -> str:
    """dcm2niix's version line, or "?"."""
    exe = dcm2niix_exe()
    if exe is None:
        return "?"
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    for line in (done.stdout + done.stderr).splitlines():
        if "version" in line:
            return line.strip()
    return "?"


# ---------------------------------------------------------------------------------------------
# the nightly no-op


def nightly_env(cfg: Config) -> dict[str, str]:
    """The environment of ``medflow nightly``: a Prefect home of its own, no analytics, and no
    API URL, so Prefect starts its temporary local server as a plain run does."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(cfg.prefect_home)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["DO_NOT_TRACK"] = "1"
    return env


def medflow_command() -> list[str]:
    """The ``medflow`` console script of this interpreter's environment."""
    exe = Path(sys.executable).parent / "medflow"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "medflow.flows.cli"]


def read_runs(cfg: Config) -> Work:
    """The ``runs`` table under the no-op output root, oldest first (``rows``, JSON-ready)."""

    def work() -> dict[str, Any]:
        import pyarrow.parquet as pq

        folder = cfg.noop_out / "tables" / "runs"
        if not folder.is_dir():
            return {"rows": []}
        rows = sorted(pq.read_table(folder).to_pylist(), key=lambda r: r["finished_at"])
        return {"rows": [{k: _jsonable(v) for k, v in r.items()} for r in rows]}

    return work


def _jsonable(v: Any) -> Any:
    return v.isoformat() if isinstance(v, datetime) else v


_LOG_MARKS = {
    "server_start": "Starting temporary server",
    "flow_begin": "Beginning flow run",
    "flow_end": "Finished in state",
    "server_stop": "Stopping temporary server",
}


def timeline(log: Path, started: float, ended: float) -> dict[str, float]:
    """Seconds from the command's start to each mark in its Prefect log (local HH:MM:SS.mmm
    timestamps), and to its exit; ``started``/``ended`` are epoch seconds."""
    day = datetime.fromtimestamp(started).date()
    marks: dict[str, float] = {"exit": ended - started}
    for line in log.read_text(errors="replace").splitlines():
        stamp = line[:12]
        for key, text in _LOG_MARKS.items():
            if text in line and stamp.count(":") == 2:
                clock = datetime.strptime(stamp, "%H:%M:%S.%f").time()
                at = datetime.combine(day, clock).timestamp() - started
                if key == "flow_end" or key not in marks:  # the flow's own end comes last
                    marks[key] = at
    return marks


PHASES = (
    "interpreter, imports and flow setup",
    "temporary server start",
    "flow run (Prefect's begin to end)",
    "after the flow (summary printed)",
    "temporary server stop and exit",
)


def phases(marks: dict[str, float]) -> dict[str, float]:
    """Durations (s) of :data:`PHASES` from the timeline's marks (a phase without its marks,
    e.g. the server's with ``PREFECT_API_URL`` set, is left out)."""
    first = marks.get("server_start", marks.get("flow_begin"))
    if first is None or "flow_begin" not in marks or "flow_end" not in marks:
        return {}
    after_end = marks.get("server_stop", marks["exit"])
    out = {PHASES[0]: first, PHASES[2]: marks["flow_end"] - marks["flow_begin"]}
    if "server_start" in marks:
        out[PHASES[1]] = marks["flow_begin"] - marks["server_start"]
    out[PHASES[3]] = after_end - marks["flow_end"]
    if "server_stop" in marks:
        out[PHASES[4]] = marks["exit"] - marks["server_stop"]
    return out


def nightly_run(cfg: Config, tag: str, cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """One ``medflow nightly`` command: CLI wall (s), peak RSS, its runs-table row and phases."""
    print(f"-- nightly {tag} ...", flush=True)
    started = time.time()
    proc = run_process(cmd, cfg.logs / f"nightly-{tag}.log", env, CASE_TIMEOUT_S)
    if proc.returncode != 0:
        print(f"   failed (exit {proc.returncode}):\n{tail(proc.log)}", flush=True)
        return {"error": f"exit {proc.returncode}; see {proc.log}"}
    rows = run_case(cfg, "read_runs", f"read_runs-{tag}").get("rows") or [{}]
    row = rows[-1]
    summary = json.loads(row.get("summary_json") or "{}")
    print(f"   CLI {proc.wall_s:.2f} s, in flow {row.get('seconds') or 0:.2f} s", flush=True)
    return {
        "cli_wall_s": proc.wall_s,
        "cpu_s": proc.cpu_s,
        "load": proc.load,
        "flow_s": row.get("seconds"),
        "peak_rss": proc.peak_rss,
        "discovered": summary.get("discovered", {}),
        "status": summary.get("status", {}),
        "planned": summary.get("series_planned"),
        "phases": phases(timeline(proc.log, started, started + proc.wall_s)),
    }


def nightly_cases(cfg: Config) -> dict[str, Any]:
    """``medflow nightly`` twice on the generated archive (ingest, then no-op): CLI wall (s),
    in-flow ``seconds`` and what each run counted; a third, profiled no-op with ``--profile``."""
    shutil.rmtree(cfg.noop_out, ignore_errors=True)
    shutil.rmtree(cfg.prefect_home, ignore_errors=True)
    cfg.prefect_home.mkdir(parents=True)
    env = nightly_env(cfg)
    base = [str(cfg.noop_archive), "--root", str(cfg.noop_out)]
    cmd = [*medflow_command(), "nightly", *base]
    out: dict[str, Any] = {"command": shlex.join(["medflow", "nightly", *base])}
    for tag in ("first", "noop"):
        out[tag] = nightly_run(cfg, tag, cmd, env)
        if "error" in out[tag]:
            return out
    out["noop_server"] = noop_with_server(cfg, cmd, env)
    if cfg.profile:
        prof = cfg.profiles / "nightly_noop.prof"
        prof.parent.mkdir(parents=True, exist_ok=True)
        pcmd = [
            sys.executable,
            "-m",
            "cProfile",
            "-o",
            str(prof),
            "-m",
            "medflow",
            "nightly",
        ]
        run_process([*pcmd, *base], cfg.logs / "nightly-profiled.log", env, CASE_TIMEOUT_S)
        text = io.StringIO()
        pstats.Stats(str(prof), stream=text).strip_dirs().sort_stats("cumulative").print_stats(60)
        prof.with_suffix(".txt").write_text(text.getvalue())
    out["import_s"] = import_time(env)
    return out


def start_prefect_server(cfg: Config, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``prefect server start`` (own home, own session) and wait until it answers; return
    the process and its API URL."""
    import urllib.request

    home = cfg.workdir / "noop" / "prefect-server-home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    from medflow.flows.cli_serve import free_port

    port = free_port()
    prefect = Path(sys.executable).parent / "prefect"
    cmd = [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    log = (cfg.logs / "prefect-server.log").open("wb")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, "PREFECT_HOME": str(home)},
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    stop_prefect_server(proc)
    raise RuntimeError(f"the Prefect server did not answer at {url}; see {log.name}")


def stop_prefect_server(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server started by :func:`start_prefect_server` (its whole process group)."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def noop_with_server(cfg: Config, cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """The no-op again with ``PREFECT_API_URL`` set to a Prefect server started beforehand (its
    start is not timed): how long a nightly takes where a server runs all the time."""
    try:
        server, url = start_prefect_server(cfg, env)
    except RuntimeError as e:
        return {"error": str(e)}
    try:
        return nightly_run(cfg, "noop_server", cmd, {**env, "PREFECT_API_URL": url})
    finally:
        stop_prefect_server(server)


def import_time(env: dict[str, str]) -> float:
    """Wall time (s) of a fresh interpreter that only imports the CLI module and the flow."""
    code = "import medflow.flows.cli, medflow.flows.nightly"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=False)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# report


def machine() -> dict[str, Any]:
    """Cores, memory (bytes), CPU model and the versions that matter here (no imports: this
    process must stay small, see run_case)."""
    facts = machine_facts(("zarr", "numcodecs", "pydicom", "av", "nibabel", "prefect"))
    return {**facts, "dcm2niix": dcm2niix_version()}


@dataclass(slots=True)
class Report:
    """Everything measured in one benchmark run."""

    command: str
    cfg: Config
    machine: dict[str, Any]
    started: str
    total_s: float = 0.0
    ct: dict[str, dict[str, Any]] = field(default_factory=dict)
    video: dict[str, dict[str, Any]] = field(default_factory=dict)
    nightly: dict[str, Any] = field(default_factory=dict)
    fmri: dict[str, dict[str, Any]] = field(default_factory=dict)


def mib(n: float | None) -> str:
    """Bytes as MiB with one decimal, or "–"."""
    return "–" if n is None else f"{n / MIB:,.1f}"


def secs(s: float | None) -> str:
    """Seconds with two decimals, or "–"."""
    return "–" if s is None else f"{s:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    """``a / b`` as e.g. ``1.23x``, or "–"."""
    return "–" if a is None or not b else f"{a / b:.2f}x"


def load(d: dict[str, Any]) -> str:
    """The 1-minute load average when a case started (the largest over its repeats)."""
    return "–" if d.get("load") is None else f"{d['load']:.1f}"


def verdict(ok: bool | None) -> str:
    """A goal's outcome in a word."""
    return "–" if ok is None else ("**met**" if ok else "**missed**")


def _get(d: dict[str, Any], key: str) -> Any:
    return None if "error" in d else d.get(key)


def ct_rows(report: Report) -> list[str]:
    """Markdown lines for the CT section."""
    cfg = report.cfg
    med, naive = report.ct.get("medflow", {}), report.ct.get("naive", {})
    zn, zy = report.ct.get("dcm2niix_zn", {}), report.ct.get("dcm2niix_zy", {})
    stored16 = cfg.slices * cfg.size * cfg.size * 2
    lines = [
        f"## 1. CT series: {cfg.slices} slices of {cfg.size}x{cfg.size}, one uncompressed DICOM "
        f"file per slice",
        "",
        f"Spacing {' x '.join(f'{v:g}' for v in CT_SPACING)} mm (z, y, x). "
        f"Decoded series: {mib(stored16)} MiB as 16-bit pixels (the stored values); "
        f"medflow's decoded array: {mib(_get(med, 'decoded_bytes'))} MiB "
        f"({_get(med, 'dtype') or '?'}). Source: {mib(tree_size(cfg.ct_dicom))} MiB of DICOM "
        f"(page cache warm). {cfg.repeat} rounds of the four cases in turn; medians of wall and "
        "CPU, the largest peak RSS.",
        "",
        "| case | wall (s) | CPU (s) | MiB/s (decoded / wall) | output (MiB) | peak RSS (MiB) "
        "| RSS increase (MiB) | peak RSS / decoded | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cases = [
        (
            "medflow header scan + `read_dicom_series` + `write_image` (OME-Zarr, sharded, zstd)",
            med,
        ),
        ("naive: pydicom `dcmread` + `np.stack` + `np.save`", naive),
        ("`dcm2niix -z n` (uncompressed NIfTI)", zn),
        ("`dcm2niix -z y` (gzip NIfTI)", zy),
    ]
    for label, d in cases:
        if "error" in d or not d:
            lines.append(f"| {label} | failed: {d.get('error', 'not run')} | | | | | | | |")
            continue
        wall = d["wall_s"]
        inc = d.get("rss_increase") if d.get("baseline_rss") else None
        lines.append(
            f"| {label} | {secs(wall)} | {secs(d.get('cpu_s'))} | {stored16 / MIB / wall:,.0f} "
            f"| {mib(d['output_bytes'])} | {mib(d['peak_rss'])} | {mib(inc)} "
            f"| {ratio(d['peak_rss'], stored16)} | {load(d)} |"
        )
    lines += ["", *ct_details(med, stored16), *dcm2niix_note(zy), ""]
    lines += ct_goals(med, naive, zn, zy, stored16)
    return lines


def ct_details(med: dict[str, Any], stored16: int) -> list[str]:
    """The medflow CT run split into read and write, and its memory after the read."""
    if "error" in med or not med:
        return []
    return [
        f"medflow split: discovery's header scan {secs(med.get('scan_s'))} s, the series' "
        f"headers read and checked {secs(med.get('read_s'))} s, then pixels "
        f"decoded and written {secs(med.get('write_s'))} s "
        f"({med.get('levels')} pyramid levels: {_levels(med)} MiB); peak RSS after the headers "
        f"{mib(med.get('read_peak_rss'))} MiB, baseline before the work "
        f"{mib(med.get('baseline_rss'))} MiB; walls {', '.join(secs(w) for w in med['walls'])} s.",
    ]


def dcm2niix_note(zy: dict[str, Any]) -> list[str]:
    """The dcm2niix command line, and which gzip it used."""
    if "command" not in zy:
        return []
    gz = "pigz" if shutil.which("pigz") else "its internal zlib (no pigz on PATH), one thread"
    return ["", f"dcm2niix: `{zy['command']}` (and `-z n`); `-z y` compressed with {gz}."]


def _levels(d: dict[str, Any]) -> str:
    return " + ".join(mib(b) for b in d.get("level_bytes", []))


def ct_goals(
    med: dict[str, Any],
    naive: dict[str, Any],
    zn: dict[str, Any],
    zy: dict[str, Any],
    stored16: int,
) -> list[str]:
    """Ratios and goals of the CT section."""
    mw, mo, mp = _get(med, "wall_s"), _get(med, "output_bytes"), _get(med, "peak_rss")
    mi = _get(med, "rss_increase")
    znw, zno = _get(zn, "wall_s"), _get(zn, "output_bytes")
    zyw, zyo = _get(zy, "wall_s"), _get(zy, "output_bytes")

    def cmp(a: float | None, b: float | None, limit: float) -> bool | None:
        return None if a is None or b is None else a < limit * b

    return [
        "| ratio | value |",
        "|---|---:|",
        f"| wall: medflow / dcm2niix -z n | {ratio(mw, znw)} |",
        f"| wall: medflow / dcm2niix -z y | {ratio(mw, zyw)} |",
        f"| wall: medflow / naive | {ratio(mw, _get(naive, 'wall_s'))} |",
        f"| output: medflow / dcm2niix -z n | {ratio(mo, zno)} |",
        f"| output: medflow / dcm2niix -z y | {ratio(mo, zyo)} |",
        f"| output: medflow / naive .npy | {ratio(mo, _get(naive, 'output_bytes'))} |",
        f"| medflow peak RSS / decoded (16-bit) | {ratio(mp, stored16)} |",
        f"| medflow RSS increase / decoded (16-bit) | {ratio(mi, stored16)} |",
        f"| naive peak RSS / decoded (16-bit) | {ratio(_get(naive, 'peak_rss'), stored16)} |",
        "",
        "| goal | measured | outcome |",
        "|---|---|---|",
        f"| medflow faster than dcm2niix -z y | {secs(mw)} s vs {secs(zyw)} s "
        f"| {verdict(cmp(mw, zyw, 1.0))} |",
        f"| medflow output smaller than dcm2niix -z y | {mib(mo)} vs {mib(zyo)} MiB "
        f"| {verdict(cmp(mo, zyo, 1.0))} |",
        f"| medflow within 2x of dcm2niix -z n | {ratio(mw, znw)} | {verdict(cmp(mw, znw, 2.0))} |",
        f"| medflow peak RSS (whole process) under 2x the decoded series | {mib(mp)} MiB vs "
        f"2 x {mib(stored16)} MiB | {verdict(cmp(mp, stored16, 2.0))} |",
        f"| medflow RSS increase (the work alone) under 2x the decoded series | {mib(mi)} MiB vs "
        f"2 x {mib(stored16)} MiB | {verdict(cmp(mi, stored16, 2.0))} |",
    ]


def fmri_rows(report: Report) -> list[str]:
    """Markdown lines for the 4D fMRI section."""
    cfg = report.cfg
    med = report.fmri.get("medflow", {})
    zn, zy = report.fmri.get("dcm2niix_zn", {}), report.fmri.get("dcm2niix_zy", {})
    n = cfg.fmri_volumes * cfg.fmri_slices
    stored16 = n * cfg.fmri_size * cfg.fmri_size * 2
    lines = [
        f"## 2. fMRI series (4D): {cfg.fmri_volumes} volumes of {cfg.fmri_size}x{cfg.fmri_size}"
        f"x{cfg.fmri_slices}, one classic MR file per slice per volume ({n} files)",
        "",
        f"Decoded series: {mib(stored16)} MiB as 16-bit pixels; source "
        f"{mib(tree_size(cfg.fmri_dicom))} MiB of DICOM (page cache warm). medflow's image: "
        f"axes {_get(med, 'axes') or '?'}, shape {_get(med, 'shape') or '?'}, t scale "
        f"{_get(med, 't_scale_s') or '?'} s. {cfg.repeat} rounds of the three cases in turn; "
        "medians of wall and CPU, the largest peak RSS.",
        "",
        "| case | wall (s) | CPU (s) | files/s | output (MiB) | peak RSS (MiB) | vs dcm2niix -z n "
        "| vs dcm2niix -z y | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base_n, base_y = _get(zn, "wall_s"), _get(zy, "wall_s")
    cases = [
        ("medflow header scan + `read_dicom_parts` + `write_image`", med),
        ("`dcm2niix -z n` (uncompressed NIfTI)", zn),
        ("`dcm2niix -z y` (gzip NIfTI)", zy),
    ]
    for label, d in cases:
        if "error" in d or not d:
            lines.append(f"| {label} | failed: {d.get('error', 'not run')} | | | | | | | |")
            continue
        wall = d["wall_s"]
        lines.append(
            f"| {label} | {secs(wall)} | {secs(d.get('cpu_s'))} | {n / wall:,.0f} "
            f"| {mib(d['output_bytes'])} | {mib(d['peak_rss'])} | {ratio(wall, base_n)} "
            f"| {ratio(wall, base_y)} | {load(d)} |"
        )
    if med and "error" not in med:
        lines += [
            "",
            f"medflow split: header scan {secs(med.get('scan_s'))} s, headers read and grouped "
            f"into volumes {secs(med.get('read_s'))} s, pixels decoded and written "
            f"{secs(med.get('write_s'))} s ({'slabs of volumes decoded while written' if med.get('streamed') else 'decoded whole, then written'}); "
            f"peak RSS after the headers {mib(med.get('read_peak_rss'))} MiB; walls "
            f"{', '.join(secs(w) for w in med['walls'])} s.",
        ]
    return lines


def video_rows(report: Report) -> list[str]:
    """Markdown lines for the video section."""
    cfg = report.cfg
    med, dec = report.video.get("medflow", {}), report.video.get("decode", {})
    h, w = VIDEO_SIZE
    size = tree_size(cfg.video) if cfg.video.is_file() else None
    lines = [
        f"## 3. Video: {cfg.video_seconds} s of {w}x{h} H.264 at {VIDEO_FPS} fps "
        f"(MP4, {mib(size)} MiB)",
        "",
        "| case | wall (s) | CPU (s) | frames/s | MiB/s (decoded RGB) | output (MiB) "
        "| peak RSS (MiB) | RSS increase (MiB) | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cases = [
        ("medflow `read_video` + `write_image` (streamed OME-Zarr)", med),
        ("PyAV decode only (rgb24 ndarray per frame, discarded)", dec),
    ]
    for label, d in cases:
        if "error" in d or not d:
            lines.append(f"| {label} | failed: {d.get('error', 'not run')} | | | | | | | |")
            continue
        wall = d["wall_s"]
        out = mib(d["output_bytes"]) if d["output_bytes"] else "–"
        lines.append(
            f"| {label} | {secs(wall)} | {secs(d.get('cpu_s'))} | {d['frames'] / wall:,.0f} "
            f"| {d['decoded_bytes'] / MIB / wall:,.0f} | {out} | {mib(d['peak_rss'])} "
            f"| {mib(d.get('rss_increase'))} | {load(d)} |"
        )
    decoded = _get(med, "decoded_bytes") or _get(dec, "decoded_bytes")
    inc = _get(med, "rss_increase")
    lines += [
        "",
        "| ratio / goal | value |",
        "|---|---:|",
        f"| wall: medflow / decode only | {ratio(_get(med, 'wall_s'), _get(dec, 'wall_s'))} |",
        f"| output: medflow / MP4 | {ratio(_get(med, 'output_bytes'), size)} |",
        f"| medflow output per pyramid level (MiB) | {_levels(med)} |",
        f"| decoded video (RGB uint8) | {mib(decoded)} MiB |",
        f"| medflow RSS increase / decoded video | {ratio(inc, decoded)} |",
        f"| medflow does not hold the whole decoded video (RSS increase < 1/4 of it) | "
        f"{verdict(None if inc is None or not decoded else inc < 0.25 * decoded)} |",
    ]
    return lines


def nightly_rows(report: Report) -> list[str]:
    """Markdown lines for the nightly no-op section."""
    cfg, n = report.cfg, report.nightly
    lines = [
        f"## 4. Nightly on an archive of {cfg.noop_series} tiny series (16x16x4 int16 NIfTI, "
        "nested folders)",
        "",
        f"Command: `{n.get('command', '?')}`, with `PREFECT_HOME` in a fresh temporary folder, "
        "`PREFECT_SERVER_ANALYTICS_ENABLED=false` and no `PREFECT_API_URL` (Prefect starts its "
        "temporary local server, as a plain run does). CLI wall = the whole command; in flow = "
        "the run's `seconds` in the `runs` table. The last row, for comparison only, repeats "
        "the no-op with `PREFECT_API_URL` pointing at a `prefect server start` launched "
        "beforehand (its start not timed).",
        "",
        "| run | CLI wall (s) | CPU (s) | in flow (s) | outside the flow (s) "
        "| CLI peak RSS (MiB) | discovered | series status | load |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for tag, label in NIGHTLY_RUNS:
        d = n.get(tag, {"error": "not run"})
        if "error" in d:
            lines.append(f"| {label} | failed: {d['error']} | | | | | | | |")
            continue
        flow = d.get("flow_s")
        outside = None if flow is None else d["cli_wall_s"] - flow
        lines.append(
            f"| {label} | {secs(d['cli_wall_s'])} | {secs(d.get('cpu_s'))} | {secs(flow)} "
            f"| {secs(outside)} | {mib(d['peak_rss'])} | {_counts(d['discovered'])} "
            f"| {_counts(d['status'])} | {load(d)} |"
        )
    noop = n.get("noop", {})
    wall = _get(noop, "cli_wall_s")
    server_wall = _get(n.get("noop_server", {}), "cli_wall_s")
    lines += ["", *phase_rows(n)]
    lines += [
        "",
        f"Fresh interpreter importing `flows.cli` and `flows.nightly` only: "
        f"{secs(n.get('import_s'))} s.",
        "",
        "| goal | measured | outcome |",
        "|---|---|---|",
        f"| no-op nightly under {NOOP_GOAL_S:.0f} s (whole command) | {secs(wall)} s "
        f"| {verdict(None if wall is None else wall < NOOP_GOAL_S)} |",
        f"| no-op nightly under {NOOP_GOAL_S:.0f} s (in flow) | {secs(_get(noop, 'flow_s'))} s "
        f"| {verdict(None if _get(noop, 'flow_s') is None else noop['flow_s'] < NOOP_GOAL_S)} |",
        f"| (for comparison) with a running Prefect server | {secs(server_wall)} s "
        f"| {verdict(None if server_wall is None else server_wall < NOOP_GOAL_S)} |",
    ]
    return lines


def phase_rows(n: dict[str, Any]) -> list[str]:
    """Where each nightly command's wall time went, from its Prefect log's timestamps."""
    runs = [(label, n.get(tag, {})) for tag, label in NIGHTLY_RUNS]
    runs = [(label, d["phases"]) for label, d in runs if d.get("phases")]
    if not runs:
        return []
    lines = [
        "Where the command's time goes (s; from the log's timestamps):",
        "",
        "| phase | " + " | ".join(label for label, _ in runs) + " |",
        "|---|" + "---:|" * len(runs),
    ]
    for name in PHASES:
        lines.append(f"| {name} | " + " | ".join(secs(p.get(name)) for _, p in runs) + " |")
    return lines


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items() if v) or "none"


def render(report: Report) -> str:
    """The whole report as markdown."""
    m, cfg = report.machine, report.cfg
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = [
        "# medflow ingest benchmark",
        "",
        f"- Command: `{report.command}`",
        f"- Started {report.started}; whole benchmark {report.total_s:.0f} s (inputs generated "
        f"or reused, not timed); work folder `{cfg.workdir}`",
        f"- Machine: {m['cores']} cores, {m['ram'] / 2**30:.1f} GiB RAM, CPU {m['cpu']}",
        f"- Python {m['python']}; {versions}; {m['dcm2niix']}",
        "- Units: sizes in MiB (2^20 bytes), throughput in MiB/s, times in seconds (wall). "
        "Each case runs in a fresh process; peak RSS = that process's `ru_maxrss`; RSS increase "
        "= peak minus the RSS right before the measured work (after imports); CPU = user + "
        "system time of the work (all threads; for tools and the CLI, the whole process and "
        "its children); load = the machine's 1-minute load average when the case started "
        f"(this machine has {m['cores']} cores: a load above that means other work competed "
        "for the CPUs and wall times are inflated).",
    ]
    if cfg.profile:
        lines.append(f"- **Profiled run** (cProfile): timings are inflated; profiles in "
                     f"`{cfg.profiles}`.")  # fmt: skip
    lines += ["", *ct_rows(report)]
    if not cfg.skip_fmri:
        lines += ["", *fmri_rows(report)]
    if not cfg.skip_video:
        lines += ["", *video_rows(report)]
    if not cfg.skip_noop:
        lines += ["", *nightly_rows(report)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# main


def run_all(cfg: Config, report: Report) -> None:
    """Generate the inputs, then run every case, filling ``report``."""
    for name in ("gen_ct", *(() if cfg.skip_video else ("gen_video",)),
                 *(() if cfg.skip_noop else ("gen_noop",)),
                 *(() if cfg.skip_fmri else ("gen_fmri",))):  # fmt: skip
        if "error" in run_case(cfg, name):
            raise SystemExit(f"could not generate the inputs ({name}); see {cfg.logs}")
    report.ct = run_ct(cfg)
    if not cfg.skip_fmri:
        report.fmri = run_fmri(cfg)
    if not cfg.skip_video:
        report.video["medflow"] = with_increase(run_case(cfg, "video_medflow"))
        report.video["decode"] = with_increase(run_case(cfg, "video_decode"))
        shutil.rmtree(cfg.video_out, ignore_errors=True)
    if not cfg.skip_noop:
        report.nightly = nightly_cases(cfg)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark (or, with the hidden ``--case``, one case in this process)."""
    args = parse_args(argv)
    if args.case is not None:
        run_case_here(make_config(args), args.case, args.result)
        return
    temp = args.workdir is None
    if temp:
        args.workdir = Path(tempfile.mkdtemp(prefix="medflow-bench-"))
    cfg = make_config(args)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    command = command_line("ingest", [shlex.quote(a) for a in sys.argv[1:]])
    report = Report(command, cfg, machine(), datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    t0 = time.perf_counter()
    try:
        run_all(cfg, report)
    finally:
        report.total_s = time.perf_counter() - t0
    text = render(report)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}")
    if cfg.profile:
        print(f"profiles in {cfg.profiles}")
    elif temp:
        shutil.rmtree(cfg.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
