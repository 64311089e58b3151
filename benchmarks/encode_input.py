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

    python -m benchmarks.encode_input                 # 512 x 512 x 192 at 0.7 mm, 1 worker
    python -m benchmarks.encode_input --workers 14    # a GPU host's reading processes
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from benchmarks.encode import loading_only, preprocess_timing, write_volumes
from benchmarks.harness import (
    command_line,
    load_text,
    machine_facts,
    results_path,
    timed,
    utc_now,
    write_report,
)
from medflow.encoders import create_encoder
from medflow.encoders._streaming import load_series


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-series", type=int, default=8, help="series read per measurement")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--shape", default="192,512,512", help="volume z,y,x voxels")
    p.add_argument("--spacing", default="2.5,0.7,0.7", help="voxel size z,y,x mm")
    p.add_argument("--data-dir", type=Path, default=None, help="where volumes are written")
    p.add_argument("--out", type=Path, default=results_path("encode_input"))
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
    with timed() as clock:
        paths = write_volumes(root, args.n_series, args.shape, args.spacing)
    print(f"volumes written in {clock.wall_s:.1f} s", flush=True)

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
    facts = machine_facts(device="cpu")
    lines = [
        "",
        f"## {utc_now()}",
        "",
        f"- command: `{command_line('encode_input')}`",
        f"- host: {facts['node']}, {facts['cores']} CPUs, load average {load_text()} at the "
        f"end; torch {facts['torch']['version']}",
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
    write_report(
        args.out,
        "\n".join(lines),
        append=True,
        preamble="# Merlin input from a pyramid level (`benchmarks/encode_input.py`)\n\n"
        "Reading and CPU preprocessing of full-resolution volumes against the coarsest "
        "pyramid level within Merlin's grid; each run appends a section.\n",
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
