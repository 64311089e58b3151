"""How long `make demo` (``medflow demo --out DIR``) takes, against a baseline checkout.

Runs the demo of each source tree in turn (baseline, candidate, baseline, ...), each time into
a fresh folder with a fresh PREFECT_HOME, as a new user's first run does (archive written,
models written, Prefect's temporary server started), and reports the wall time and peak
memory of each run, their medians, and the candidate-to-baseline ratio. The machine is shared:
alternating the two keeps their conditions alike.

    python -m benchmarks.demo --baseline-src /tmp/base --candidate-src . --repeats 2 \\
        --result benchmarks/results/demo.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import load_text, machine_summary


def run_demo(src: Path, work: Path) -> tuple[float, float, int]:
    """Wall seconds, peak resident memory (MiB) and exit status of one demo run."""
    out = work / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PYTHONPATH=str(src), PREFECT_HOME=str(work / "prefect-home"), COLUMNS="120")
    cmd = [
        sys.executable,
        "-c",
        "from medflow.flows.cli import main; main()",
        "demo",
        "--out",
        str(out),
    ]
    log_path = work / "demo.log"
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=src, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:  # what went wrong, for the operator of the benchmark
        print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
    return seconds, usage.ru_maxrss / 1024.0, proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-src", type=Path, required=True)
    parser.add_argument("--candidate-src", type=Path, default=Path.cwd())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--result", type=Path)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats: expected at least 1")
    runs: dict[str, list[tuple[float, float, int]]] = {"baseline": [], "candidate": []}
    for _ in range(args.repeats):
        for name, src in (("baseline", args.baseline_src), ("candidate", args.candidate_src)):
            work = Path(tempfile.mkdtemp(prefix=f"medflow-demo-bench-{name}-"))
            try:
                runs[name].append(run_demo(src.resolve(), work))
            finally:
                shutil.rmtree(work, ignore_errors=True)
            print(name, runs[name][-1], flush=True)
    lines = [
        "# `make demo` wall time (`medflow demo --out DIR`, size small)",
        "",
        f"Machine: {machine_summary()}, shared; load average at the end {load_text()} "
        "(1, 5, 15 min). Runs alternate baseline and candidate, "
        "each from nothing (archive, models, Prefect's temporary server).",
        "",
        "| tree | run | seconds | peak RSS MiB | exit |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rs in runs.items():
        lines += [
            f"| {name} | {i + 1} | {s:.1f} | {m:.0f} | {c} |" for i, (s, m, c) in enumerate(rs)
        ]
    med = {n: statistics.median(s for s, _, _ in rs) for n, rs in runs.items()}
    peak = {n: max(m for _, m, _ in rs) for n, rs in runs.items()}
    lines += [
        "",
        f"Median: baseline {med['baseline']:.1f} s, candidate {med['candidate']:.1f} s "
        f"(ratio {med['candidate'] / med['baseline']:.2f}); peak RSS baseline "
        f"{peak['baseline']:.0f} MiB, candidate {peak['candidate']:.0f} MiB.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.result:
        args.result.write_text(text)
    failed = any(c != 0 for rs in runs.values() for _, _, c in rs)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
