"""What every benchmark shares: machine facts, timing, peak memory and report writing.

Importing this module is cheap: the standard library only, so that a benchmark whose child
processes must stay small (see ``benchmarks/ingest.py``) can use it. ``psutil`` is imported when
memory is sampled, and torch is described only where the benchmark has imported it already.

The benchmarks run as modules from the repository root, e.g. ``python -m benchmarks.encode``.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"

# ---------------------------------------------------------------------------------------------
# machine facts


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where readable, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> tuple[float, float, float]:
    """The machine's 1-, 5- and 15-minute load averages (zeros where the OS has none)."""
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


def load_text() -> str:
    """The three load averages as ``"1.2, 0.8, 0.5"``."""
    return ", ".join(f"{v:.1f}" for v in load_average())


def ram_bytes() -> int:
    """Physical memory of the machine, in bytes (0 where unknown)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (OSError, ValueError, AttributeError):
        return 0


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed versions of the distributions ``names`` ("?" where missing), from their
    metadata: nothing is imported."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "?"
    return out


def torch_facts(device: Any = None) -> dict[str, Any] | None:
    """torch's version, CPU threads and, for a CUDA ``device`` (or any visible one when
    ``device`` is None), the GPU's name; None where the benchmark has not imported torch."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    facts: dict[str, Any] = {"version": torch.__version__, "threads": torch.get_num_threads()}
    facts["cuda"] = None
    kind = getattr(device, "type", device)
    wants_cuda = kind is None or str(kind).startswith("cuda")
    if wants_cuda and torch.cuda.is_available():
        facts["cuda"] = torch.cuda.get_device_name(device if kind is not None else None)
    return facts


def machine_facts(packages: Sequence[str] = (), device: Any = None) -> dict[str, Any]:
    """Facts about this machine and run: host, OS, CPU model and cores, load, RAM (bytes),
    Python, the versions of ``packages``, and torch (see :func:`torch_facts`)."""
    return {
        "node": platform.node(),
        "system": platform.system(),
        "arch": platform.machine(),
        "cpu": cpu_name(),
        "cores": os.cpu_count() or 0,
        "load": load_average(),
        "ram": ram_bytes(),
        "python": platform.python_version(),
        "versions": package_versions(packages),
        "torch": torch_facts(device),
    }


def machine_summary(facts: dict[str, Any] | None = None) -> str:
    """One line naming the machine: ``node (N cores, load X)``."""
    f = facts or machine_facts()
    return f"{f['node']} ({f['cores']} cores, load {f['load'][0]:.1f})"


# ---------------------------------------------------------------------------------------------
# timing


def cpu_seconds(children: bool = False) -> float:
    """User plus system CPU time of this process so far, all threads, in seconds; with
    ``children``, that of its waited-for child processes too."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    if children:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        total += kids.ru_utime + kids.ru_stime
    return total


@dataclass(slots=True)
class Timing:
    """Wall and CPU seconds of a block, filled in when it ends."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    load: float = field(default_factory=lambda: load_average()[0])


@contextmanager
def timed(children: bool = False) -> Iterator[Timing]:
    """Time the block: ``with timed() as t: ...`` then ``t.wall_s``, ``t.cpu_s`` (this process,
    and its waited-for children with ``children``) and ``t.load`` (1-minute load at the start)."""
    t = Timing()
    cpu0 = cpu_seconds(children)
    wall0 = time.perf_counter()
    try:
        yield t
    finally:
        t.wall_s = time.perf_counter() - wall0
        t.cpu_s = cpu_seconds(children) - cpu0


# ---------------------------------------------------------------------------------------------
# memory


def rss_now() -> int:
    """This process's resident set size now, in bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def rss_peak() -> int:
    """This process's peak resident set size so far (``ru_maxrss``), in bytes.

    Linux reports KiB, and counts the parent's resident size at fork time too (until the
    child's exec).
    """
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class PeakMemory:
    """Peak memory of a process and its child process tree, sampled in a thread, in bytes.

    ``pid`` is the process to watch (default: this one). With ``pss``, each process counts its
    proportional set size where the OS reports it, so pages that forked workers share count
    once; otherwise (or where PSS is unavailable) its resident set size, which counts shared
    pages in every process. Use as a context manager; ``peak`` holds the largest sum seen.
    """

    def __init__(self, pid: int | None = None, interval_s: float = 0.1, pss: bool = True) -> None:
        self.pid = os.getpid() if pid is None else pid
        self.interval_s = interval_s
        self.pss = pss
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _one(self, proc: Any) -> int:
        import psutil

        if self.pss:
            with suppress(AttributeError, psutil.AccessDenied):
                return int(proc.memory_full_info().pss)
        return int(proc.memory_info().rss)

    def sample(self) -> int:
        """The watched tree's memory now (0 once the watched process is gone)."""
        import psutil

        try:
            root = psutil.Process(self.pid)
            total = self._one(root)
            children = root.children(recursive=True)
        except psutil.Error:
            return 0
        for child in children:
            with suppress(psutil.Error):  # a worker that just ended
                total += self._one(child)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self.peak = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------
# reports


def utc_now(fmt: str = "%Y-%m-%d %H:%M UTC") -> str:
    """The time now in UTC, formatted."""
    return datetime.now(UTC).strftime(fmt)


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """How this run was started, as a user would type it: ``python -m benchmarks.NAME ARGS``
    (``argv`` defaults to the process's own arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", "-m", f"benchmarks.{script}", *args])


def generated_line(script: str, machine: str | None = None) -> str:
    """The header line of a report: ``Generated <UTC time> on <machine> by `benchmarks/<script>.py`.``"""
    return f"Generated {utc_now()} on {machine or machine_summary()} by `benchmarks/{script}.py`."


def results_path(name: str) -> Path:
    """``benchmarks/results/NAME.md``."""
    return RESULTS / f"{name}.md"


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None
) -> list[str]:
    """A markdown table as lines. ``align`` holds one letter per column: ``l`` (``---``), ``r``
    (``---:``) or ``c`` (``:---:``); all ``l`` by default."""
    spec = align or "l" * len(header)
    if len(spec) != len(header):
        raise ValueError(f"Expected {len(header)} alignment letters, got {len(spec)}.")
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in spec) + "|"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"Expected rows of {len(header)} cells, got {len(row)}.")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return lines


def write_report(
    path: Path, text: str, *, append: bool = False, preamble: str | None = None
) -> Path:
    """Write ``text`` to the markdown file ``path`` (its folder created), or with ``append`` add
    it at the end; ``preamble`` starts a file that does not exist yet. Returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not append:
        path.write_text(text, encoding="utf-8")
        return path
    if preamble is not None and not path.exists():
        path.write_text(preamble, encoding="utf-8")
    with path.open("a", encoding="utf-8") as f:
        f.write(text)
    return path
