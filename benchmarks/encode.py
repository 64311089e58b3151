"""Encode throughput of the full-size Merlin image tower (random weights, nothing downloaded).

Three measurements, in series (CT volumes) per second:

(a) model only: ``encode_images`` on input batches already on the device (the device limit);
(b) naive loop: one series at a time -- read the OME-Zarr volume, preprocess on the CPU,
    encode;
(c) streaming: :func:`encoders._streaming.stream_encode`, loading (and, in ``workers`` mode,
    preprocessing on the CPU) in worker threads overlapped with batched device compute;
    on cuda also ``device`` mode (workers only load; MONAI preprocessing on the GPU).

Inputs are synthetic torso phantoms written with :func:`storage.images.write_image`
(full size: 192 x 512 x 512 int16 at 2.5 x 0.78 x 0.78 mm, preprocessed to 224 x 224 x 160;
``--quick``: 48 x 128 x 128 at 3 x 2 x 2 mm, cropped to 96 x 96 x 48). At most 8 distinct
volumes are written and cycled through. Peak memory: resident set size of this process plus
its children (PSS where available, sampled every 100 ms), and
``torch.cuda.max_memory_allocated`` on GPUs.

Results are appended to ``--out`` as a markdown section. Examples::

    python -m benchmarks.encode --quick                     # CPU, a minute or two
    python -m benchmarks.encode --device cpu --n-series 4   # CPU, full size (slow)
    python -m benchmarks.encode --device cuda               # GPU, full size (a few minutes)
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import (
    PeakMemory,
    command_line,
    load_text,
    machine_facts,
    results_path,
    timed,
    utc_now,
    write_report,
)
from medflow.encoders import Encoder, create_encoder
from medflow.encoders._streaming import load_series, stream_encode
from medflow.encoders.testing import synthetic_ct
from medflow.storage.images import DecodedImage, write_image

FULL = {"volume": (192, 512, 512), "spacing": (2.5, 0.78125, 0.78125), "roi": None}
QUICK = {"volume": (48, 128, 128), "spacing": (3.0, 2.0, 2.0), "roi": (96, 96, 48)}
MAX_DISTINCT = 8


@dataclass(frozen=True, slots=True)
class Row:
    """One measurement."""

    name: str
    n_series: int
    batch_size: int
    workers: int
    seconds: float
    peak_mem_gb: float
    peak_gpu_gb: float | None
    note: str = ""

    @property
    def series_per_s(self) -> float:
        return self.n_series / self.seconds if self.seconds > 0 else float("nan")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if present)")
    p.add_argument("--n-series", type=int, default=None, help="series per measurement")
    p.add_argument(
        "--naive-series", type=int, default=None, help="series for (b), default min(n, 4)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="series per device batch")
    p.add_argument("--num-workers", type=int, default=None, help="reading processes for (c)")
    p.add_argument("--device-threads", type=int, default=4, help="staging threads for (c)")
    p.add_argument("--quick", action="store_true", help="reduced volume and input size")
    p.add_argument(
        "--input-level",
        choices=("full", "pyramid"),
        default="full",
        help="Merlin's preprocess.input_level: read level 0, or the coarsest pyramid level "
        "within its 1.5 x 1.5 x 3 mm grid (everywhere: naive loop, reading only, streaming)",
    )
    p.add_argument(
        "--spacing",
        default=None,
        help="voxel size of the synthetic volumes, z,y,x mm (default 2.5,0.78125,0.78125; "
        "0.7 mm in-plane lets pyramid level 1 qualify)",
    )
    p.add_argument("--out", type=Path, default=results_path("encode"))
    p.add_argument("--data-dir", type=Path, default=None, help="where volumes are written (kept)")
    p.add_argument(
        "--modes",
        default="auto",
        help="comma list of streaming modes: workers, device (default: both on cuda, workers on cpu)",
    )
    args = p.parse_args(argv)
    if args.spacing is not None:
        try:
            args.spacing = tuple(float(v) for v in args.spacing.split(","))
        except ValueError:
            p.error(f"--spacing expects three numbers z,y,x, got {args.spacing!r}")
        if len(args.spacing) != 3 or min(args.spacing) <= 0:
            p.error(f"--spacing expects three positive numbers z,y,x, got {args.spacing}")
    for name in ("n_series", "naive_series", "batch_size", "num_workers"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "num_workers" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    return args


@contextmanager
def measured(device: torch.device) -> Iterator[dict[str, float | None]]:
    """Wall time, peak host memory and peak GPU memory of the block."""
    result: dict[str, float | None] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with PeakMemory() as mem, timed() as clock:
        yield result
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    result["seconds"] = clock.wall_s
    result["mem_gb"] = mem.peak / 1e9
    result["gpu_gb"] = (
        torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    )


def write_volumes(
    root: Path, n: int, shape: tuple[int, ...], spacing: tuple[float, ...]
) -> list[str]:
    """Write ``min(n, MAX_DISTINCT)`` synthetic CT volumes; return ``n`` paths cycling them."""
    distinct = min(n, MAX_DISTINCT)

    def one(i: int) -> str:
        path = root / f"ct{i}.zarr"
        if not path.exists():
            meta, ct = synthetic_ct(shape, spacing, seed=i)  # type: ignore[arg-type]
            write_image(DecodedImage(meta, pixels=ct), str(path), name=f"ct{i}")
        return str(path)

    with ThreadPoolExecutor(max_workers=min(distinct, os.cpu_count() or 1)) as pool:
        paths = list(pool.map(one, range(distinct)))
    return [paths[i % distinct] for i in range(n)]


def model_only(enc: Encoder, n: int, batch_size: int, note: str = "") -> Row:
    """(a): encode pre-made batches already on the device."""
    shape = (batch_size, *enc.info.extra["input_shape"])
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(enc.input_dtype)
    x = x.to(enc.device)
    enc.encode_images(x)  # warm-up: kernels chosen, memory pools filled
    n_batches = max(1, -(-n // batch_size))
    with measured(enc.device) as m:
        for _ in range(n_batches):
            enc.encode_images(x)
    return Row(
        "(a) model only",
        n_batches * batch_size,
        batch_size,
        0,
        m["seconds"] or 0.0,
        m["mem_gb"] or 0.0,
        m["gpu_gb"],
        note,
    )


def naive_loop(enc: Encoder, paths: list[str]) -> Row:
    """(b): read, preprocess on the CPU, encode; one series at a time."""

    def one(path: str) -> None:
        meta, volume = load_series(path, ras_spacing=getattr(enc, "input_spacing", None))
        x = enc.preprocess(meta, volume)
        enc.encode_images(x)

    one(paths[0])  # warm-up
    with measured(enc.device) as m:
        for path in paths:
            one(path)
    return Row(
        "(b) naive loop", len(paths), 1, 0, m["seconds"] or 0.0, m["mem_gb"] or 0.0, m["gpu_gb"]
    )


def _read_nbytes(item: tuple[str, Any]) -> Any:
    path, ras_spacing = item
    return int(load_series(str(path), ras_spacing=ras_spacing)[1].nbytes)


def loading_only(
    paths: list[str], workers: int, device: torch.device, ras_spacing: Any = None
) -> Row:
    """Reading the volumes alone, in as many worker processes as (c) uses (the reader limit)."""
    reader: torch.utils.data.DataLoader[Any] = torch.utils.data.DataLoader(
        [(p, ras_spacing) for p in paths],  # type: ignore[arg-type]  # a map-style dataset
        batch_size=None,
        num_workers=workers,
        collate_fn=_read_nbytes,  # type: ignore[arg-type]  # batch_size None: one item each
        prefetch_factor=2 if workers else None,
    )
    with measured(device) as m:
        total = sum(reader)
    note = f"{total / 1e9 / max(m['seconds'] or 1e-9, 1e-9):.1f} GB/s of int16 voxels"
    return Row(
        "(c0) reading only",
        len(paths),
        0,
        workers,
        m["seconds"] or 0.0,
        m["mem_gb"] or 0.0,
        m["gpu_gb"],
        note,
    )


def streaming(
    enc: Encoder, paths: list[str], batch_size: int, workers: int, mode: str, threads: int
) -> Row:
    """(c): stream_encode with reading processes and staging threads."""
    list(
        stream_encode(enc, paths[: min(len(paths), batch_size)], batch_size, 0, preprocess_on=mode)
    )
    with measured(enc.device) as m:
        results = list(
            stream_encode(
                enc, paths, batch_size, workers, preprocess_on=mode, device_threads=threads
            )
        )
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"streaming failed on {len(failed)} series: {failed[0]}")
    return Row(
        f"(c) streaming, preprocess on {mode}",
        len(paths),
        batch_size,
        workers,
        m["seconds"] or 0.0,
        m["mem_gb"] or 0.0,
        m["gpu_gb"],
    )


def preprocess_timing(enc: Encoder, path: str, repeats: int = 3) -> dict[str, float]:
    """Seconds per series for reading, CPU preprocessing and (cuda) GPU preprocessing."""
    out: dict[str, float] = {}
    t = time.perf_counter()
    ras_spacing = getattr(enc, "input_spacing", None)
    for _ in range(repeats):
        meta, array = load_series(path, ras_spacing=ras_spacing)
    out["read"] = (time.perf_counter() - t) / repeats
    enc.preprocess(meta, array)  # warm-up (imports, allocator)
    t = time.perf_counter()
    for _ in range(repeats):
        enc.preprocess(meta, array)
    out["preprocess_cpu"] = (time.perf_counter() - t) / repeats
    if enc.device.type == "cuda" and hasattr(enc, "preprocess_on_device"):
        vol = torch.from_numpy(array).to(enc.device)
        enc.preprocess_on_device(meta, vol)
        torch.cuda.synchronize(enc.device)
        t = time.perf_counter()
        for _ in range(repeats):
            enc.preprocess_on_device(meta, vol)
        torch.cuda.synchronize(enc.device)
        out["preprocess_gpu"] = (time.perf_counter() - t) / repeats
    return out


def markdown(args: argparse.Namespace, enc: Encoder, rows: list[Row], extra: dict[str, Any]) -> str:
    base = next((r.series_per_s for r in rows if r.name.startswith("(a)") and not r.note), None)
    dev = enc.device
    facts = machine_facts(device=dev)
    gpu = facts["torch"]["cuda"]
    cfg = FULL if not args.quick else QUICK
    if args.spacing is not None:
        cfg = {**cfg, "spacing": args.spacing}
    lines = [
        f"## {utc_now()} -- {gpu or 'CPU'}{' (--quick)' if args.quick else ''}",
        "",
        f"- command: `{command_line('encode')}`",
        f"- host: {facts['node']}, {facts['cores']} CPUs, load average {load_text()} at the end",
        f"- torch {facts['torch']['version']}; device {dev}"
        + ("; bf16 autocast, channels-last 3D" if dev.type == "cuda" else "; float32"),
        f"- model: full-size Merlin image tower (ResNet152-I3D, random weights), input "
        f"{enc.info.extra['input_shape']}; preprocess.input_level "
        f"{getattr(getattr(enc, 'config', None), 'input_level', 'full')}",
        f"- volumes: synthetic CT {cfg['volume']} (z, y, x) int16 at {cfg['spacing']} mm, "
        f"{MAX_DISTINCT} distinct at most, cycled",
        "- per series: " + ", ".join(f"{k} {v:.3f} s" for k, v in extra["timing"].items()),
        "",
        "| measurement | series | batch | workers | seconds | series/s | x model-only "
        "| peak memory GB (PSS) | peak GPU GB | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = f"{r.series_per_s / base:.2f}" if base and not r.name.startswith("(c0)") else "-"
        gpu_gb = f"{r.peak_gpu_gb:.1f}" if r.peak_gpu_gb is not None else "-"
        lines.append(
            f"| {r.name} | {r.n_series} | {r.batch_size} | {r.workers} | {r.seconds:.1f} "
            f"| {r.series_per_s:.3f} | {ratio} | {r.peak_mem_gb:.1f} | {gpu_gb} | {r.note} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = QUICK if args.quick else FULL
    enc = create_encoder(
        "merlin",
        random_weights=True,
        device=args.device,
        roi_size=cfg["roi"],
        input_level=args.input_level,
    )
    if args.spacing is not None:
        cfg = {**cfg, "spacing": args.spacing}
    cuda = enc.device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its kernels
    n = args.n_series or (64 if cuda else 4)
    batch = args.batch_size or (8 if cuda else (2 if args.quick else 1))
    cores = os.cpu_count() or 2
    # reading processes: all cores but two on a GPU host (main + staging), one core left on CPU
    default_workers = max(1, cores - 2) if cuda else max(1, cores - 1)
    workers = args.num_workers if args.num_workers is not None else default_workers
    modes = (
        ["workers", "device"]
        if (args.modes == "auto" and cuda)
        else (["workers"] if args.modes == "auto" else args.modes.split(","))
    )
    naive_n = args.naive_series or min(n, 4)
    print(
        f"device {enc.device}, {n} series, batch {batch}, {workers} workers, modes {modes}",
        flush=True,
    )

    tmp = None
    root = args.data_dir
    if root is None:
        tmp = tempfile.mkdtemp(prefix="medflow-bench-")
        root = Path(tmp)
    root.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        paths = write_volumes(root, n, cfg["volume"], cfg["spacing"])  # type: ignore[arg-type]
        print(f"volumes written in {time.perf_counter() - t:.1f} s", flush=True)
        rows: list[Row] = []
        timing = preprocess_timing(enc, paths[0])
        print(f"per series: {timing}", flush=True)
        rows.append(model_only(enc, n, batch))
        print(rows[-1], flush=True)
        if cuda:
            enc.set_channels_last(False)  # type: ignore[attr-defined]
            rows.append(model_only(enc, n, batch, note="contiguous layout, for comparison"))
            print(rows[-1], flush=True)
            enc.set_channels_last(True)  # type: ignore[attr-defined]
        rows.append(naive_loop(enc, paths[:naive_n]))
        print(rows[-1], flush=True)
        rows.append(loading_only(paths, workers, enc.device, getattr(enc, "input_spacing", None)))
        print(rows[-1], flush=True)
        for mode in modes:
            rows.append(streaming(enc, paths, batch, workers, mode, args.device_threads))
            print(rows[-1], flush=True)
        text = markdown(args, enc, rows, {"timing": timing})
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    write_report(args.out, "\n" + text, append=True)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
