"""What reading Merlin's input from a coarser pyramid level saves, on the CPU.

On a GPU host the encode stage is bound by reading (decompressing) full-resolution volumes,
not by the model (see ``benchmarks/results/encode.md``). This measures, for the same synthetic
CT volumes and in one run, Merlin with ``preprocess.input_level`` ``full`` (level 0) and
``pyramid`` (the coarsest level within its 1.5 x 1.5 x 3 mm grid):

* reading only, in worker processes as the streaming stage reads (series/s: the reader limit);
* seconds per series of reading and of Merlin's MONAI preprocessing on the CPU;
* how far the two preprocessed inputs differ (mean and largest absolute difference on the
  model's 0..1 scale, i.e. in units of the 2000 HU window).

No model is run. Results are appended to ``--out``::

    python benchmarks/encode_input.py                 # 512 x 512 x 192 at 0.7 mm, 1 worker
    python benchmarks/encode_input.py --workers 14    # a GPU host's reading processes
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from encode import loading_only, preprocess_timing, write_volumes

from medflow.encoders import create_encoder
from medflow.encoders._streaming import load_series


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-series", type=int, default=8, help="series read per measurement")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--shape", default="192,512,512", help="volume z,y,x voxels")
    p.add_argument("--spacing", default="2.5,0.7,0.7", help="voxel size z,y,x mm")
    p.add_argument("--data-dir", type=Path, default=None, help="where volumes are written")
    p.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "encode_input.md"
    )
    args = p.parse_args(argv)
    args.shape = tuple(int(v) for v in args.shape.split(","))
    args.spacing = tuple(float(v) for v in args.spacing.split(","))
    if len(args.shape) != 3 or len(args.spacing) != 3 or args.n_series < 1 or args.workers < 0:
        p.error("expected --shape and --spacing of three values, --n-series >= 1, --workers >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    encoders = {
        level: create_encoder("merlin", random_weights=True, device="cpu", input_level=level)
        for level in ("full", "pyramid")
    }
    root = args.data_dir or Path(tempfile.mkdtemp(prefix="medflow-bench-input-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = write_volumes(root, args.n_series, args.shape, args.spacing)
    print(f"volumes written in {time.perf_counter() - t0:.1f} s", flush=True)

    rows = []
    inputs = {}
    for level, enc in encoders.items():
        spacing = enc.input_spacing  # type: ignore[attr-defined]
        reading = loading_only(paths, args.workers, enc.device, spacing)
        timing = preprocess_timing(enc, paths[0])
        meta, volume = load_series(paths[0], ras_spacing=spacing)
        inputs[level] = enc.preprocess(meta, volume)
        rows.append((level, tuple(volume.shape), reading, timing))
        print(level, reading.series_per_s, timing, flush=True)
    diff = (inputs["full"] - inputs["pyramid"]).abs()

    base = rows[0][2].series_per_s
    lines = [
        "",
        f"## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"- command: `python benchmarks/encode_input.py {' '.join(sys.argv[1:])}`",
        f"- host: {platform.node()}, {os.cpu_count()} CPUs, load average "
        f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} at the end; torch {torch.__version__}",
        f"- volumes: synthetic CT {args.shape} (z, y, x) int16 at {args.spacing} mm; "
        f"{args.n_series} series read per row with {args.workers} worker process(es)",
        "",
        "| input_level | level read (shape) | reading only, series/s | x full | read s/series "
        "| CPU preprocess s/series |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for level, shape, reading, timing in rows:
        lines.append(
            f"| {level} | {shape} | {reading.series_per_s:.2f} | "
            f"{reading.series_per_s / base:.2f} | {timing['read']:.3f} | "
            f"{timing['preprocess_cpu']:.3f} |"
        )
    lines += [
        "",
        f"Preprocessed inputs (224 x 224 x 160, 0..1): mean absolute difference "
        f"{float(diff.mean()):.4f}, largest {float(diff.max()):.3f} (x 2000 for HU).",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.out.exists():
        args.out.write_text(
            "# Merlin input from a pyramid level (`benchmarks/encode_input.py`)\n\n"
            "Reading and CPU preprocessing of full-resolution volumes against the coarsest "
            "pyramid level within Merlin's grid; each run appends a section.\n"
        )
    with open(args.out, "a", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
