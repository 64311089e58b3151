"""Bad arguments and configuration are found before any work starts: the command line prints
one line naming what is wrong and exits with status 2, having started nothing (no Prefect
server, no database) and written nothing (no output root). A traceback only with --debug."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from medflow.reasons import InputError, TaskFailure, retry_transient

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Site:
    base: Path
    archive: Path  # a real (tiny) archive folder
    models: Path

    @property
    def out(self) -> Path:
        return self.base / "out"  # never created by a failing command


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    base = tmp_path_factory.mktemp("cli-errors")
    archive = base / "archive"
    archive.mkdir()
    (archive / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    models = base / "models"
    (models / "a-folder.pt").mkdir(parents=True)
    (models / "weights.pt").write_bytes(b"not really weights, never loaded by the checks")
    return Site(base, archive, models)


def _config(site: Site, name: str, text: str) -> str:
    path = site.base / name
    path.write_text(text)
    return str(path)


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(home), COLUMNS="200", PYTHONPATH=str(REPO))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(args: list[str], home: Path, *, debug: bool = False) -> tuple[int, str, str]:
    """The command line in a process of its own, as a user runs it."""
    cmd = [sys.executable, "-m", "medflow", *(["--debug"] if debug else []), *args]
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(home), capture_output=True, text=True, timeout=120, check=False
    )
    return proc.returncode, proc.stdout, proc.stderr


def _run_many(
    cases: list[list[str]], home: Path, work: Path, prefix: Sequence[str] = ()
) -> list[tuple[int, str, str]]:
    """Each argument list through the real entry point, each in a process forked from one warm
    interpreter (tests/cli_fork_runner.py): the checks, not the imports, are what is timed."""
    cases_path, results_path = work / "cases.json", work / "results.json"
    cases_path.write_text(json.dumps(cases))
    os.chmod(cases_path, 0o644)
    if prefix:  # the runner writes its results as another user
        results_path.write_text("")
        os.chmod(results_path, 0o666)
    cmd = [*prefix, sys.executable, str(REPO / "tests" / "cli_fork_runner.py")]
    proc = subprocess.run(
        [*cmd, str(cases_path), str(results_path)],
        cwd=work,
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [(int(c), o, e) for c, o, e in json.loads(results_path.read_text())]


def _assert_one_line(code: int, out: str, err: str, *needles: str) -> str:
    assert code == 2, (code, out[-2000:], err[-2000:])
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith("medflow: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    assert "Traceback" not in line and "np.float64" not in line
    return line


def _assert_nothing_started(site: Site, home: Path) -> None:
    assert not site.out.exists(), "the output root was created"
    # Prefect's database and any server log live in PREFECT_HOME: a run would create them
    assert not home.exists() or not any(home.rglob("*.db")), list(home.rglob("*"))


Case = Callable[[Site], tuple[list[str], tuple[str, ...]]]

CASES: dict[str, Case] = {
    "missing archive folder": lambda s: (
        ["nightly", str(s.base / "no-such-archive"), "--root", str(s.out)],
        ("archive", "no-such-archive", "no such folder"),
    ),
    "archive that is a file": lambda s: (
        ["nightly", str(s.archive / "picture.png"), "--root", str(s.out)],
        ("archive", "is a file, expected a folder"),
    ),
    "root that is a file": lambda s: (
        ["nightly", str(s.archive), "--root", str(s.archive / "picture.png")],
        ("--root", "is a file, expected a folder"),
    ),
    "root under a file": lambda s: (
        ["nightly", str(s.archive), "--root", str(s.archive / "picture.png" / "out")],
        ("--root", "cannot be created", "is a file"),
    ),
    "missing config": lambda s: (
        ["nightly", str(s.archive), "--root", str(s.out), "--config", str(s.base / "no.toml")],
        ("--config", "no.toml", "no such file"),
    ),
    "config that is a folder": lambda s: (
        ["nightly", str(s.archive), "--root", str(s.out), "--config", str(s.models)],
        ("--config", "is a folder"),
    ),
    "malformed TOML config": lambda s: (
        [
            "nightly",
            str(s.archive),
            "--root",
            str(s.out),
            "--config",
            _config(s, "bad.toml", '[[encoders]]\nname = "merlin\n'),
        ],
        ("--config", "bad.toml", "not valid toml"),
    ),
    "malformed JSON config": lambda s: (
        [
            "nightly",
            str(s.archive),
            "--root",
            str(s.out),
            "--config",
            _config(s, "bad.json", '{"encoders": [{"name": "merlin",}'),
        ],
        ("--config", "bad.json", "not valid json"),
    ),
    "config without an encoder list": lambda s: (
        [
            "nightly",
            str(s.archive),
            "--root",
            str(s.out),
            "--config",
            _config(s, "nolist.json", json.dumps({"encoder": []})),
        ],
        ("--config", "expected a list under 'encoders'"),
    ),
    "unknown encoder name": lambda s: (
        [
            "nightly",
            str(s.archive),
            "--root",
            str(s.out),
            "--config",
            _config(
                s,
                "unknown.toml",
                f'[[encoders]]\nname = "merlyn"\ncheckpoint = "{s.models / "weights.pt"}"\n',
            ),
        ],
        ("unknown encoder name 'merlyn'", "registered:", "merlin"),
    ),
    "unknown encoder setting": lambda s: (
        [
            "nightly",
            str(s.archive),
            "--root",
            str(s.out),
            "--config",
            _config(s, "setting.toml", '[[encoders]]\nname = "merlin"\ncheckpont = "x.pt"\n'),
        ],
        ("--config", "Unknown encoder setting", "checkpont"),
    ),
    "checkpoint that is a folder": lambda s: (
        [
            "nightly",
            str(s.archive),
            "--root",
            str(s.out),
            "--config",
            _config(
                s,
                "folder.toml",
                f'[[encoders]]\nname = "m3ret_tiny"\ncheckpoint = "{s.models / "a-folder.pt"}"\n',
            ),
        ],
        ("encoder 'm3ret_tiny'", "checkpoint", "a-folder.pt", "is a folder"),
    ),
    "missing checkpoint": lambda s: (
        [
            "nightly",
            str(s.archive),
            "--root",
            str(s.out),
            "--config",
            _config(
                s, "missing.toml", '[[encoders]]\nname = "m3ret_tiny"\ncheckpoint = "/no.pt"\n'
            ),
        ],
        ("encoder 'm3ret_tiny'", "checkpoint '/no.pt'", "no such file"),
    ),
    "unknown prompt bank": lambda s: (
        [
            "nightly",
            str(s.archive),
            "--root",
            str(s.out),
            "--config",
            _config(
                s,
                "bank.toml",
                f'[[encoders]]\nname = "m3ret_tiny"\ncheckpoint = "{s.models / "weights.pt"}"\n'
                'bank = "no_such_bank"\n',
            ),
        ],
        ("Unknown prompt bank 'no_such_bank'",),
    ),
    "unknown encoder option": lambda s: (
        [
            "nightly",
            str(s.archive),
            "--root",
            str(s.out),
            "--config",
            _config(
                s,
                "option.toml",
                f'[[encoders]]\nname = "m3ret_tiny"\ncheckpoint = "{s.models / "weights.pt"}"\n'
                'options = { text_model_dir = "/x" }\n',
            ),
        ],
        ("unknown option 'text_model_dir'",),
    ),
    "duplicate encoder labels": lambda s: (
        [
            "nightly",
            str(s.archive),
            "--root",
            str(s.out),
            "--config",
            _config(
                s,
                "twice.json",
                json.dumps(
                    {"encoders": [{"name": "m3ret_tiny", "random_weights": True}] * 2},
                ),
            ),
        ],
        ("labels must be distinct", "m3ret_tiny"),
    ),
    "batch size zero": lambda s: (
        ["nightly", str(s.archive), "--root", str(s.out), "--batch-size", "0"],
        ("--batch-size", "at least 1, got 0"),
    ),
    "dask workers zero": lambda s: (
        ["nightly", str(s.archive), "--root", str(s.out), "--dask-workers", "0"],
        ("--dask-workers", "at least 1 Dask worker"),
    ),
    "both dask options": lambda s: (
        [
            "nightly",
            str(s.archive),
            "--root",
            str(s.out),
            "--dask-workers",
            "2",
            "--dask-address",
            "tcp://127.0.0.1:1",
        ],
        ("Dask scheduler address or a number of local Dask workers",),
    ),
    "value of the wrong type": lambda s: (
        ["nightly", str(s.archive), "--root", str(s.out), "--workers", "many"],
        ("--workers", "see: medflow nightly --help"),
    ),
    "unknown option": lambda s: (
        ["nightly", str(s.archive), "--root", str(s.out), "--encoders", "merlin"],
        ("No such option: --encoders",),
    ),
    "missing archive argument": lambda s: (
        ["nightly", "--root", str(s.out)],
        ("Missing argument", "archive"),
    ),
    "unknown URL protocol": lambda s: (
        ["nightly", "nosuchproto://bucket/archive", "--root", str(s.out)],
        ("archive", "unknown protocol 'nosuchproto'"),
    ),
    "demo into a file": lambda s: (
        ["demo", "--out", str(s.archive / "picture.png")],
        ("--out", "is a file, expected a folder"),
    ),
    "demo of an unknown size": lambda s: (
        ["demo", "--out", str(s.out), "--size", "huge"],
        ("--size", "tiny, small, medium", "huge"),
    ),
    "status of a missing root": lambda s: (
        ["status", "--root", str(s.out)],
        ("--root", "no such folder"),
    ),
    "similar with k zero": lambda s: (
        ["similar", "abc", "--root", str(s.archive), "--k", "0"],
        ("--k", "at least 1, got 0"),
    ),
    "encoders with a malformed config": lambda s: (
        ["encoders", "--config", _config(s, "enc.toml", "[[encoders]\n")],
        ("--config", "not valid toml"),
    ),
}


@pytest.fixture(scope="module")
def outcomes(site: Site) -> dict[str, tuple[int, str, str]]:
    built = {name: CASES[name](site) for name in sorted(CASES)}
    home = site.base / "prefect-home"
    results = _run_many([args for args, _ in built.values()], home, site.base)
    _assert_nothing_started(site, home)  # after every case: no output root, no database
    return dict(zip(built, results, strict=True))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_argument_is_one_line_exit_2_and_nothing_starts(
    case: str, site: Site, outcomes: dict[str, tuple[int, str, str]]
) -> None:
    _, needles = CASES[case](site)
    code, out, err = outcomes[case]
    _assert_one_line(code, out, err, *needles)
    assert "Starting temporary server" not in out + err


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """A folder another user can enter (pytest's own are private to this user)."""
    with tempfile.TemporaryDirectory(prefix="medflow-cli-") as d:
        os.chmod(d, 0o755)
        yield Path(d)


def test_unreadable_root_and_archive(site: Site, world_readable_dir: Path) -> None:
    """As a user without rights on them (root reads everything: then run as nobody)."""
    base = world_readable_dir
    locked = base / "locked"
    locked.mkdir(mode=0o700)
    archive = base / "archive"
    shutil.copytree(site.archive, archive)
    os.chmod(archive, 0o755)
    home = base / "prefect-home"
    home.mkdir(mode=0o777)
    os.chmod(home, 0o777)
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv is needed to run as a user without rights")
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    cases = [
        ["nightly", str(archive), "--root", str(locked)],
        ["nightly", str(archive), "--root", str(locked / "out")],
        ["nightly", str(locked), "--root", str(base / "out")],
        ["status", "--root", str(locked)],
    ]
    results = _run_many(cases, home, base, prefix)
    _assert_one_line(*results[0], "--root", "permission denied")
    _assert_one_line(*results[1], "--root", "locked/out", "permission denied")
    _assert_one_line(*results[2], "archive", "permission denied")
    _assert_one_line(*results[3], "--root", "permission denied")
    assert not (base / "out").exists() and not any(home.rglob("*.db"))


def test_debug_shows_the_traceback_then_the_line(site: Site, tmp_path: Path) -> None:
    home = tmp_path / "prefect-home"
    code, _, err = _run(
        ["nightly", str(site.base / "nope"), "--root", str(site.out)], home, debug=True
    )
    assert code == 2
    assert "Traceback (most recent call last)" in err and "ArgumentError" in err
    assert err.strip().splitlines()[-1] == (
        f"medflow: error: archive '{site.base / 'nope'}': no such folder."
    )
    _assert_nothing_started(site, home)


def test_help_texts_read_as_plain_text() -> None:
    import typer
    from typer.testing import CliRunner

    from medflow.flows.cli import app

    commands = list(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert {"nightly", "demo", "similar", "reprocess"} <= set(commands)
    for args in ([], *([c] for c in commands)):
        result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (args, result.output)
        for markup in ("``", ":func:", ":class:", ":mod:", ":meth:", "**", "`"):
            assert markup not in result.output, (args, markup)
    top = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert "--debug" in top and "medflow demo" in top


def test_retries_are_for_transient_errors_only() -> None:
    class State:
        def __init__(self, data: object) -> None:
            self.data = data

    def failure(retryable: bool) -> TaskFailure:
        f = TaskFailure("discover failed: unexpected OSError (incident x)")
        f.retryable = retryable
        return f

    assert not retry_transient(None, None, State(InputError("no such folder")))
    assert not retry_transient(None, None, State(ValueError("bad value")))
    assert not retry_transient(None, None, State(failure(False)))
    assert retry_transient(None, None, State(failure(True)))
    assert retry_transient(None, None, State(OSError("disk went away")))
    assert retry_transient(None, None, State(TimeoutError()))


@pytest.mark.usefixtures("prefect_api")
def test_a_missing_archive_is_not_retried(tmp_path: Path) -> None:
    """Past the command line's checks (the flow called from Python), a missing archive fails
    the discover task at its first try: no retries for an argument that cannot change."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from medflow.flows.nightly import ingest_archive

    state = ingest_archive(
        archive=str(tmp_path / "nope"), root=str(tmp_path / "out"), return_state=True
    )
    assert state.is_failed()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    (found,) = [r for r in runs if r.name.startswith("discover")]
    assert found.run_count == 1 and found.state is not None and found.state.is_failed()
    assert "no such folder" in str(found.state.message)
