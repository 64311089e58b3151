"""A night where almost everything is quarantined: report and summary at archive scale.

Synthesises an archive of ``--good`` small CT series (4 slices of 32 x 32, one DICOM file per
slice) under patient folders, plus ``--bad`` files that must all end quarantined (not DICOM,
empty, truncated DICOM, broken NIfTI and PNG), spread over identifying-looking folders. Then runs
``medflow nightly ARCHIVE --root R`` in a fresh process (fresh Prefect home, no API URL, so it pays
for Prefect's temporary server as a user does):

1. on the good series alone: the baseline night;
2. on the good series plus each step of bad files (``--steps``: e.g. 25,000 and 50,000), so
   seconds per file show whether the night is O(files).

For each night: wall time, the peak memory of the command's process tree, the stage times the
run recorded, and the run report rebuilt in this process from the recorded summary (time and
HTML size), plus the printed run summary (lines). Generation is not timed.

Usage::

    python -m benchmarks.quarantine_scale --good 100 --bad 50000 --workdir /tmp/mfq
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    REPO,
    PeakMemory,
    generated_line,
    markdown_table,
    results_path,
    timed,
    write_report,
)

DEFAULT_OUT = results_path("quarantine_scale")
REPORT_GOAL_S = 5.0
COLUMNS = (
    "night",
    "files",
    "quarantined",
    "night (s)",
    "s per 1,000 files",
    "vs baseline",
    "ingest stage (s)",
    "report (s)",
    "report size (KiB)",
    "summary lines",
    "peak memory (MiB)",
)
PER_FOLDER = 200


@dataclass(slots=True)
class Night:
    label: str
    files: int
    bad: int
    seconds: float
    peak_rss_mb: float
    stage_seconds: dict[str, float]
    quarantined: int
    report_seconds: float
    report_kb: float
    summary_lines: int


def write_good_series(archive: Path, n: int) -> int:
    """``n`` small CT series of 4 slices each; the number of files."""
    import numpy as np

    from medflow.demo.dicom import DemoPatient, write_ct_series

    rng = np.random.default_rng(0)
    files = 0
    for i in range(n):
        patient = DemoPatient(name=f"GOOD^PATIENT^{i:04d}", patient_id=f"GOOD{i:06d}")
        vol = rng.integers(-500, 500, (4, 32, 32)).astype(np.int16)
        files += len(
            write_ct_series(
                archive / f"GOOD_{i:04d}_PID{i:06d}" / "ct", vol, patient=patient, seed=i
            )
        )
    return files


def write_bad_files(archive: Path, n: int, template: Path) -> None:
    """``n`` files that must be quarantined, five kinds in turn, ``PER_FOLDER`` per folder."""
    from medflow.demo.dicom import write_truncated

    truncated = archive / ".truncated-template.dcm"
    write_truncated(truncated, template, keep=0.5)
    blob = truncated.read_bytes()
    truncated.unlink()
    kinds = [
        (".dcm", b"not a DICOM file at all " * 8),
        (".dcm", b""),
        (".dcm", blob),
        (".nii.gz", b"\x1f\x8b\x08\x00" + b"\x07" * 200),
        (".png", b"\x89PNG\r\n\x1a\n" + b"\x01" * 200),
    ]
    for i in range(n):
        folder = archive / f"BAD_{i // PER_FOLDER:04d}_MRN{i // PER_FOLDER:06d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
        suffix, data = kinds[i % len(kinds)]
        (folder / f"ACC{i:07d}{suffix}").write_bytes(data)


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        OMP_NUM_THREADS="1",
        COLUMNS="160",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )
    return env


def run_night(label: str, archive: Path, root: Path, files: int, bad: int) -> Night:
    from medflow.flows.cli import _print_summary, console
    from medflow.report import build_report
    from medflow.storage.layout import OutputRoot
    from medflow.storage.tables import RUNS_SCHEMA, read_table

    medflow = str(Path(sys.executable).with_name("medflow"))
    with tempfile.TemporaryDirectory(prefix="medflow-bench-home-") as home, timed() as clock:
        proc = subprocess.Popen(
            [medflow, "nightly", str(archive), "--root", str(root)],
            env=_env(Path(home)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
        # the command's process tree (with Prefect's temporary server), RSS every 0.2 s
        with PeakMemory(pid=proc.pid, interval_s=0.2, pss=False) as memory:
            output, _ = proc.communicate()
    seconds = clock.wall_s
    if proc.returncode != 0:
        raise RuntimeError(f"{label}: medflow nightly failed:\n{output[-4000:]}")
    runs = read_table(OutputRoot(str(root)).table_dir("runs"), RUNS_SCHEMA).to_pylist()
    summary: dict[str, Any] = json.loads(runs[-1]["summary_json"])
    t1 = time.perf_counter()
    report = build_report(str(root), summary)
    report_seconds = time.perf_counter() - t1
    with console.capture() as captured:
        _print_summary(summary, str(root))
    return Night(
        label=label,
        files=files,
        bad=bad,
        seconds=seconds,
        peak_rss_mb=memory.peak / 2**20 if memory.peak else float("nan"),
        stage_seconds={k: float(v) for k, v in summary.get("stage_seconds", {}).items()},
        quarantined=sum(int(g["count"]) for g in summary.get("quarantined", {}).values()),
        report_seconds=report_seconds,
        report_kb=os.path.getsize(report.html_path) / 1024,
        summary_lines=len(captured.get().splitlines()),
    )


def render(nights: list[Night], good: int) -> str:
    base = nights[0]
    lines = [
        "# Quarantine at scale",
        "",
        generated_line("quarantine_scale"),
        "",
        f"Each night: `medflow nightly` in a fresh process and Prefect home, on {good} good CT "
        "series (4 DICOM slices each) plus the bad files (not DICOM, empty, truncated DICOM, "
        "broken NIfTI and PNG, in turn). Report: rebuilt in-process from the run's recorded "
        "summary. Peak memory: the command's process tree (with Prefect's temporary server).",
        "",
        *markdown_table(
            COLUMNS,
            (
                [
                    n.label,
                    f"{n.files:,}",
                    f"{n.quarantined:,}",
                    f"{n.seconds:.1f}",
                    f"{1000 * n.seconds / n.files:.2f}",
                    f"{n.seconds / base.seconds:.2f}x",
                    f"{n.stage_seconds.get('ingest', float('nan')):.1f}",
                    f"{n.report_seconds:.2f}",
                    f"{n.report_kb:.0f}",
                    n.summary_lines,
                    f"{n.peak_rss_mb:.0f}",
                ]
                for n in nights
            ),
            "l" + "r" * 10,
        ),
    ]
    worst = max(n.report_seconds for n in nights[1:]) if len(nights) > 1 else float("nan")
    lines += [
        "",
        f"Report time added by the quarantined files: {worst - base.report_seconds:+.2f} s "
        f"(goal: under {REPORT_GOAL_S:.0f} s).",
    ]
    if len(nights) > 2:
        a, b = nights[-2], nights[-1]
        extra = (b.seconds - a.seconds) / max(1, b.bad - a.bad) * 1000
        per = (a.seconds - base.seconds) / max(1, a.bad) * 1000
        lines.append(
            f"Marginal cost per 1,000 bad files: {per:.2f} s up to {a.bad:,}, {extra:.2f} s "
            f"from {a.bad:,} to {b.bad:,} (equal when the night is linear in files)."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--good", type=int, default=100)
    p.add_argument("--bad", type=int, default=50_000)
    p.add_argument("--steps", type=int, default=2, help="bad-file steps up to --bad")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)
    if args.good < 1 or args.bad < 0 or args.steps < 1:
        p.error("expected --good >= 1, --bad >= 0, --steps >= 1")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="medflow-quarantine-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        good_dir = work / "good"
        shutil.rmtree(good_dir, ignore_errors=True)
        n_good_files = write_good_series(good_dir, args.good)
        template = next(good_dir.rglob("*.dcm"))
        nights = [run_night("good series only", good_dir, work / "out-0", n_good_files, 0)]
        print(render(nights, args.good), flush=True)
        for step in range(1, args.steps + 1):
            bad = args.bad * step // args.steps
            archive = work / f"archive-{bad}"
            shutil.copytree(good_dir, archive / "good")
            write_bad_files(archive / "bad", bad, template)
            nights.append(
                run_night(
                    f"+ {bad:,} bad files", archive, work / f"out-{bad}", n_good_files + bad, bad
                )
            )
            shutil.rmtree(archive, ignore_errors=True)
            print(render(nights, args.good), flush=True)
        text = render(nights, args.good)
        write_report(args.out, text)
        print(f"written to {args.out}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
