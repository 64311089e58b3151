"""The benchmarks import without running, and their shared harness works on real files."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import harness

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(
    p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem not in ("__init__", "harness")
)


def test_every_benchmark_is_listed() -> None:
    assert set(SCRIPTS) >= {
        "denoise",
        "encode",
        "encode_input",
        "ingest",
        "nightly_scale",
        "quarantine_scale",
        "retrieval",
        "tables",
    }


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_imports_without_running(name: str) -> None:
    argv = list(sys.argv)
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(module.main)
    assert sys.argv == argv  # importing parsed nothing and ran nothing
    source = (REPO / "benchmarks" / f"{name}.py").read_text(encoding="utf-8")
    assert "sys.path" not in source
    assert f"python -m benchmarks.{name}" in (module.__doc__ or "")


def test_benchmark_help_runs_as_a_module() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.encode_input", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--n-series" in proc.stdout


def test_machine_facts() -> None:
    facts = harness.machine_facts(packages=("numpy", "no-such-distribution-here"))
    assert facts["cores"] == os.cpu_count()
    assert facts["cpu"] and facts["cpu"] == harness.cpu_name()
    assert facts["ram"] > 2**28
    assert len(facts["load"]) == 3 and all(v >= 0 for v in facts["load"])
    assert re.fullmatch(r"3\.\d+\.\d+.*", facts["python"])
    import numpy

    assert facts["versions"] == {"numpy": numpy.__version__, "no-such-distribution-here": "?"}
    import torch

    described = harness.torch_facts("cpu")
    assert described is not None
    assert described["version"] == torch.__version__
    assert described["threads"] == torch.get_num_threads()
    assert described["cuda"] is None


def test_timing_and_memory_of_a_child_tree() -> None:
    code = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"
    with harness.timed(children=True) as clock:
        proc = subprocess.Popen([sys.executable, "-c", code])
        with harness.PeakMemory(pid=proc.pid, interval_s=0.05, pss=False) as memory:
            proc.wait()
    assert proc.returncode == 0
    assert clock.wall_s >= 1.5
    assert clock.cpu_s > 0
    assert memory.peak > 200 * 2**20  # the child's 200 MiB were seen
    own = harness.PeakMemory()
    with own:
        pass
    assert own.peak > 0
    now = harness.rss_now()
    assert now > 2**20
    assert harness.rss_peak() > now // 2  # ru_maxrss: the kernel's high-water mark, in bytes


def test_markdown_report_on_disk(tmp_path: Path) -> None:
    table = harness.markdown_table(["case", "seconds"], [["a", "1.00"], ["b", 2]], "lr")
    assert table == ["| case | seconds |", "|---|---:|", "| a | 1.00 |", "| b | 2 |"]
    with pytest.raises(ValueError, match="2 cells"):
        harness.markdown_table(["case", "seconds"], [["a"]])
    header = harness.generated_line("demo_bench")
    assert re.fullmatch(
        r"Generated \d{4}-\d\d-\d\d \d\d:\d\d UTC on .+ \(\d+ cores, load \d+\.\d\) "
        r"by `benchmarks/demo_bench\.py`\.",
        header,
    )
    out = tmp_path / "results" / "demo_bench.md"
    body = "\n".join([header, "", *table, ""])
    harness.write_report(out, body, append=True, preamble="# Demo\n")
    harness.write_report(out, "\n## second run\n", append=True, preamble="# never written\n")
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# Demo\nGenerated ")
    assert text.count("# Demo") == 1 and "never written" not in text
    assert text.endswith("| b | 2 |\n\n## second run\n")
    harness.write_report(out, "replaced\n")
    assert out.read_text(encoding="utf-8") == "replaced\n"
    assert harness.results_path("x") == REPO / "benchmarks" / "results" / "x.md"
    assert harness.command_line("x", ["--quick"]) == "python -m benchmarks.x --quick"


@pytest.mark.parametrize("name", ["ct-small", "ect", "ct-693", "pancreas", "neck"])
def test_denoise_benchmark_reads_every_real_ct_slice(name: str) -> None:
    from benchmarks import denoise
    from medflow.denoise import mu_to_hu

    slc = denoise.load_slice(name, 64)
    assert slc.mu.shape == (64, 64) and slc.mu.dtype.name == "float32"
    hu = mu_to_hu(slc.mu)
    assert hu.min() >= -1025 and 50 < hu.max() < 3000  # air outside, tissue or bone inside
    body = denoise.body_mask(slc.mu)
    assert 0.05 < body.mean() < 1.0
    # Resizing keeps the field of view.
    native = denoise.load_slice(name, 128)
    assert abs(native.pixel_spacing_mm * 128 - slc.pixel_spacing_mm * 64) < 1e-6
    body_psnr, _, _ = denoise.score(slc.mu, slc.mu + 1e-4)
    assert body_psnr == pytest.approx(
        10 * np.log10(float(slc.mu.max() - slc.mu.min()) ** 2 / 1e-8), abs=1e-3
    )
