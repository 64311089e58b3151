"""PACS benchmark: a CT series from Orthanc's DICOMweb endpoint, retrieved and ingested.

One run starts a local Orthanc with its DICOMweb plugin (as the tests do: Debian packages
``orthanc`` and ``orthanc-dicomweb``), uploads a generated CT series (``--slices`` files of
``--size`` x ``--size`` 16-bit pixels, uncompressed), and measures, each case in a process of its
own so that its peak resident memory is its own, ``--repeat`` times (the median is reported):

1. ``curl``: the series' WADO-RS multipart response (``Accept: multipart/related;
   type="application/dicom"; transfer-syntax=*``) to a file: the transfer baseline;
2. ``retrieve``: medflow's WADO-RS retrieval (dicomweb-client, streamed, one file per instance
   into a cache folder, as the nightly does);
3. ``pacs ingest``: retrieval and medflow's ingest (header scan, planning, DICOM reader, OME-Zarr
   writer) of the retrieved files: the nightly's DICOMweb path without Prefect's overhead;
4. ``disk ingest``: the same ingest of the same files read from a folder: the file baseline.

Throughput is the series' size on the wire (the multipart response's bytes) over wall time, in
MiB/s; ratios are against ``curl`` and ``disk ingest``. The markdown table goes to ``--out``.

Usage::

    python -m benchmarks.pacs --slices 300 --size 512 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import load_text, machine_summary, utc_now

MIB = 2**20
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "pacs.md"
STUDY = "1.2.826.0.1.3680043.8.498.5005"
SERIES = f"{STUDY}.1"
ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; its wall time, CPU time, peak RSS and last stdout line (JSON, if any).

    The peak comes from GNU time when installed: a child forked from this (large) Python
    process would otherwise report this process's pages as its own peak.
    """
    gnu_time = shutil.which("time") or (
        "/usr/bin/time" if os.path.exists("/usr/bin/time") else None
    )
    stats = Path(tempfile.mkstemp(prefix="medflow-bench-time-")[1])
    full = [gnu_time, "-o", str(stats), "-f", "%M %U %S", *cmd] if gnu_time else cmd
    t0 = time.perf_counter()
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out_b, err_b = proc.communicate()
    wall = time.perf_counter() - t0
    out, err = out_b.decode(), err_b.decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {err[-2000:]}")
    if gnu_time:
        kib, user, system = stats.read_text().split()[-3:]
        peak, cpu = int(kib) / 1024, float(user) + float(system)
    else:
        ru = __import__("resource").getrusage(__import__("resource").RUSAGE_CHILDREN)
        peak, cpu = ru.ru_maxrss / 1024, float("nan")
    stats.unlink(missing_ok=True)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_mib": peak,
        "inner": json.loads(lines[-1]) if lines else {},
    }


def _ingest_folder(archive: str, root: str) -> dict[str, Any]:
    """medflow's ingest of a folder, as the nightly runs it, without Prefect."""
    from medflow.storage.layout import OutputRoot
    from medflow.tasks.discover import discover
    from medflow.tasks.ingest import ingest_series, plan_jobs, scan_header_files

    out = OutputRoot(root)
    out.ensure()
    keys = out.pseudonymizer()
    disc, known = discover.fn(archive, out.url)
    scans = scan_header_files(archive, [f.relpath for f in disc.pending], keys)
    jobs, rejected = plan_jobs(disc, known, scans, keys)
    assert not rejected and len(jobs) == 1, (len(jobs), len(rejected))
    outcome = ingest_series(archive, out, jobs[0], "bench")
    assert outcome.catalog["status"] == "ingested", outcome.catalog.get("reason")
    return {"shape": outcome.catalog["shape"]}


def case_main(case: str, url: str, work: str) -> None:
    """One case in this process: prints a JSON line of its inner timings (imports excluded)."""
    from medflow.pacs.dicomweb import DicomwebServer, list_series, retrieve_series_files

    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    if case in ("retrieve", "pacs-ingest"):
        server = DicomwebServer.parse(f"dicomweb+{url}")
        client = server.client()
        (facts,) = [f for f in list_series(client) if f.series_uid == SERIES]
        cache = os.path.join(work, "cache")
        n, nbytes = retrieve_series_files(client, facts, cache)
        info.update(instances=n, file_bytes=nbytes, retrieve_s=time.perf_counter() - t0)
        if case == "pacs-ingest":
            t1 = time.perf_counter()
            info.update(_ingest_folder(cache, os.path.join(work, "out")))
            info["ingest_s"] = time.perf_counter() - t1
    elif case == "disk-ingest":
        info.update(_ingest_folder(os.path.join(work, "disk"), os.path.join(work, "out")))
        info["ingest_s"] = time.perf_counter() - t0
    else:
        raise SystemExit(f"unknown case {case!r}")
    print(json.dumps(info))


def _fmt(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.case:
        case_main(a.case, a.url, a.work)
        return 0

    import numpy as np

    from medflow.demo.dicom import ct_phantom, write_ct_series
    from tests.orthanc_server import Orthanc  # the test suite's Orthanc, run the same way

    base = Path(tempfile.mkdtemp(prefix="medflow-bench-pacs-"))
    server = Orthanc(base / "orthanc")
    env = {**os.environ, "MEDFLOW_DICOMWEB_USER": server.auth[0]}
    env["MEDFLOW_DICOMWEB_PASSWORD"] = server.auth[1]
    env["MEDFLOW_KEY_SECRET"] = "bench"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    try:
        vol = ct_phantom((a.slices, a.size, a.size), seed=0)
        files = write_ct_series(base / "disk", vol, study_uid=STUDY, series_uid=SERIES)
        del vol
        disk_bytes = sum(f.stat().st_size for f in files)
        server.start()
        t0 = time.perf_counter()
        assert server.upload(files) == len(files)
        upload_s = time.perf_counter() - t0
        wado = f"{server.dicomweb}/studies/{STUDY}/series/{SERIES}"
        rows: dict[str, list[dict[str, Any]]] = {}
        wire_bytes = 0
        for _ in range(a.repeat):
            body = base / "curl.multipart"
            r = _run_measured(
                [
                    "curl",
                    "-sS",
                    "--fail",
                    "-u",
                    f"{server.auth[0]}:{server.auth[1]}",
                    "-H",
                    f"Accept: {ACCEPT}",
                    "-o",
                    str(body),
                    wado,
                ]
            )
            wire_bytes = body.stat().st_size
            body.unlink()
            rows.setdefault("curl (WADO-RS multipart to a file)", []).append(r)
            for case, label in (
                ("retrieve", "medflow retrieve (WADO-RS, one file per instance)"),
                ("pacs-ingest", "medflow retrieve + ingest (DICOMweb path)"),
                ("disk-ingest", "medflow ingest of the same files on disk"),
            ):
                work = base / f"work-{case}"
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir()
                if case == "disk-ingest":
                    (work / "disk").symlink_to(base / "disk")
                cmd = [
                    sys.executable,
                    "-m",
                    "benchmarks.pacs",
                    "--case",
                    case,
                    "--url",
                    server.dicomweb,
                    "--work",
                    str(work),
                ]
                rows.setdefault(label, []).append(_run_measured(cmd, env))
                shutil.rmtree(work, ignore_errors=True)
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)

    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[label])

    def inner(label: str, key: str) -> float:
        vals = [r["inner"][key] for r in rows[label] if key in r["inner"]]
        return statistics.median(vals) if vals else float("nan")

    curl_label = "curl (WADO-RS multipart to a file)"
    disk_label = "medflow ingest of the same files on disk"

    def works(label: str) -> list[float]:
        """Seconds of work: curl's wall time; a medflow case's own timing, imports excluded."""
        if label == curl_label:
            return [r["wall_s"] for r in rows[label]]
        return [
            r["inner"].get("retrieve_s", 0.0) + r["inner"].get("ingest_s", 0.0) for r in rows[label]
        ]

    def work(label: str) -> float:
        return statistics.median(works(label))

    curl_s, disk_s = work(curl_label), work(disk_label)
    mib = wire_bytes / MIB
    version = "dpkg-query -W -f ${Version} "
    orthanc_v = subprocess.run((version + "orthanc").split(), capture_output=True, text=True).stdout
    plugin_v = subprocess.run(
        (version + "orthanc-dicomweb").split(), capture_output=True, text=True
    ).stdout
    lines = [
        "# PACS benchmark: a CT series from Orthanc's DICOMweb endpoint",
        "",
        f"{utc_now()}; {machine_summary()}; load {load_text()} at the end (1, 5, 15 min); "
        f"Orthanc {orthanc_v} with orthanc-dicomweb "
        f"{plugin_v}; `python -m benchmarks.pacs --slices {a.slices} --size {a.size} "
        f"--repeat {a.repeat}`.",
        "",
        f"Series: {a.slices} slices of {a.size} x {a.size} int16, uncompressed: "
        f"{disk_bytes / MIB:.1f} MiB of files, {mib:.1f} MiB as the WADO-RS multipart "
        f"response; upload to Orthanc (REST, not timed below) {upload_s:.1f} s. Median of "
        f"{a.repeat}; each case in its own process. Work s: curl's wall time, or a medflow "
        "case's own timing without Python's start and imports (process wall s has them); "
        "MiB/s is the response's size over work s; peak RSS from GNU time.",
        "",
        "| case | work s | best work s | MiB/s | x curl | x disk ingest | process wall s | CPU s "
        "| peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in rows:
        w = work(label)
        lines.append(
            f"| {label} | {_fmt(w)} | {_fmt(min(works(label)))} | {_fmt(mib / w, 1)} | "
            f"{_fmt(w / curl_s)} | "
            f"{_fmt(w / disk_s)} | {_fmt(med(label, 'wall_s'))} | {_fmt(med(label, 'cpu_s'))} | "
            f"{_fmt(med(label, 'peak_rss_mib'), 0)} |"
        )
    pacs_label = "medflow retrieve + ingest (DICOMweb path)"
    lines += [
        "",
        "Inside the processes (median s): retrieve alone "
        f"{_fmt(inner('medflow retrieve (WADO-RS, one file per instance)', 'retrieve_s'))}; "
        f"in the DICOMweb path retrieve {_fmt(inner(pacs_label, 'retrieve_s'))} + ingest "
        f"{_fmt(inner(pacs_label, 'ingest_s'))}; disk ingest {_fmt(inner(disk_label, 'ingest_s'))}.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    a.out.with_suffix(".json").write_text(
        json.dumps(
            {"slices": a.slices, "size": a.size, "wire_bytes": wire_bytes, "rows": rows}, indent=1
        )
    )
    del np
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
