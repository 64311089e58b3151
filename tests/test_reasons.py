"""Reason codes, the quarantine tally, shielded tasks and the views over older catalog parts."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medflow.reasons import (
    MAX_EXAMPLE_KEYS,
    REASON_DESCRIPTIONS,
    InputError,
    ReasonCode,
    SourceError,
    TaskFailure,
    format_values,
    parse_reason_code,
    shielded,
    tally_add,
    tally_groups,
    unexpected,
)
from medflow.storage.layout import OutputRoot
from medflow.storage.tables import (
    CATALOG_SCHEMA,
    INCIDENTS_SCHEMA,
    SOURCES_SCHEMA,
    connect,
    quarantine_listing,
    read_table,
    write_part,
)

SECRET_PATH = "/archive/DOE_JOHN_1961/MRN778899/IM0001.dcm"


def test_every_code_is_described_and_documented() -> None:
    schemas = (Path(__file__).parent.parent / "docs" / "SCHEMAS.md").read_text()
    for code in ReasonCode:
        assert REASON_DESCRIPTIONS[code]
        assert f"| `{code.value}` |" in schemas, f"{code.value} missing from docs/SCHEMAS.md"


def test_parse_reason_code() -> None:
    assert parse_reason_code(" Truncated ") is ReasonCode.TRUNCATED
    with pytest.raises(ValueError, match=r"Expected a reason code .*empty_file.*got 'nope'"):
        parse_reason_code("nope")


def test_source_error_text_holds_no_path() -> None:
    e = SourceError(SECRET_PATH, "truncated pixel data", code=ReasonCode.TRUNCATED, detail="x")
    assert str(e) == "truncated: truncated pixel data"
    assert SECRET_PATH not in str(e) and SECRET_PATH not in repr(e)
    assert e.path == SECRET_PATH and e.restricted_text == "truncated pixel data [x]"
    assert isinstance(e, ValueError)


def test_unexpected_keeps_the_message_restricted() -> None:
    code, reason, detail = unexpected(OSError(f"cannot open {SECRET_PATH}"), "while reading")
    assert code is ReasonCode.INTERNAL_ERROR
    assert reason == "unexpected OSError while reading"
    assert SECRET_PATH in detail
    assert unexpected(MemoryError(), "while decoding")[0] is ReasonCode.TOO_LARGE


@pytest.mark.parametrize(
    ("values", "text"),
    [
        ([-0.7, 0.7], "-0.7 x 0.7"),
        (__import__("numpy").array([0.5, 2.0]), "0.5 x 2"),
        ("", "(empty)"),
        (None, "(empty)"),
        ([], "(empty)"),
        (3.0, "3"),
    ],
)
def test_format_values_is_plain_text(values: object, text: str) -> None:
    assert format_values(values) == text


def test_tally_is_bounded_and_linear() -> None:
    tally: dict[str, dict] = {}
    for i in range(10_000):
        code = "truncated" if i % 3 else "empty_file"
        tally_add(
            tally, stage="ingest", status="quarantined", code=code, series_key=f"k{i}", reason="r"
        )
    tally_add(tally, stage="encode x", status="failed", code=None, series_key="e", reason=None)
    groups = tally_groups(tally)
    assert [g["reason_code"] for g in groups] == ["truncated", "empty_file", "unknown"]
    assert sum(g["count"] for g in groups) == 10_001
    assert all(len(g["example_keys"]) <= MAX_EXAMPLE_KEYS for g in groups)
    assert groups[0]["example_keys"] == ["k1", "k2", "k4", "k5", "k7"]
    with pytest.raises(ValueError, match="Expected a quarantine tally"):
        tally_groups([{"series_key": "k"}])


def test_shielded_records_an_incident_and_raises_public_text(tmp_path: Path) -> None:
    root = str(tmp_path / "out")

    @shielded("demo-task")
    def fails(root: str, how: str) -> None:
        if how == "public":
            raise SourceError(SECRET_PATH, "empty file", code=ReasonCode.EMPTY_FILE)
        if how == "input":
            raise InputError("Expected an archive folder, got '/no/such': no such folder.")
        raise FileNotFoundError(2, "No such file", SECRET_PATH)

    with pytest.raises(TaskFailure) as err:
        fails(root, "private")
    assert SECRET_PATH not in str(err.value)
    assert err.value.__suppress_context__  # the original is not chained into tracebacks
    assert "FileNotFoundError" in str(err.value)
    incidents = read_table(OutputRoot(root).incidents_dir(), INCIDENTS_SCHEMA).to_pylist()
    assert len(incidents) == 1
    assert incidents[0]["incident_id"] in str(err.value)
    assert SECRET_PATH in incidents[0]["message"] and "Traceback" in incidents[0]["traceback"]
    with pytest.raises(SourceError):  # public errors pass as they are
        fails(root, "public")
    with pytest.raises(InputError, match="no such folder"):
        fails(root, "input")
    with pytest.raises(TypeError, match="expected a 'root' parameter"):
        shielded("x")(lambda archive: None)


@pytest.mark.usefixtures("prefect_api")
def test_prefect_never_sees_the_text_of_a_task_failure(tmp_path: Path) -> None:
    """A task that fails with a path in its exception: Prefect's states and logs hold neither
    the path nor the original message, the incident table holds both."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    root = str(tmp_path / "out")

    @task(name="leaky-task", retries=0)
    @shielded("leaky-task")
    def leaky(root: str) -> None:
        raise PermissionError(13, "Permission denied", SECRET_PATH)

    @flow(name="leaky-flow")
    def run(root: str) -> str:
        from prefect.context import get_run_context

        fut = leaky.submit(root)
        fut.wait()
        return str(get_run_context().flow_run.id)  # type: ignore[union-attr]

    state = run(root, return_state=True)
    flow_run_id = state.state_details.flow_run_id

    async def collect() -> str:
        async with get_client() as client:
            runs = await client.read_task_runs()
            logs = await client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
            mine = [r for r in runs if r.flow_run_id == flow_run_id]
            assert mine and all(r.state is not None for r in mine)
            return " ".join(
                [str(r.state.message) for r in mine if r.state] + [lg.message for lg in logs]
            )

    text = asyncio.run(collect())
    assert "TaskFailure" in text and "PermissionError" in text
    assert SECRET_PATH not in text and "DOE_JOHN" not in text
    incidents = read_table(OutputRoot(root).incidents_dir(), INCIDENTS_SCHEMA).to_pylist()
    assert any(SECRET_PATH in i["message"] for i in incidents)


def _old_catalog_part(root: OutputRoot) -> None:
    """A catalog part as medflow wrote it before reason codes: an ``error`` text with a path."""
    old = pa.schema([f for f in CATALOG_SCHEMA if f.name not in ("reason_code", "reason")])
    old = old.append(pa.field("error", pa.string()))
    now = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [
        {"series_key": "old1", "stage": "ingest", "status": "quarantined", "created_at": now,
         "run_id": "r0", "error": f"two slices at the same position, also {SECRET_PATH}"},
        {"series_key": "old2", "stage": "ingest", "status": "ingested", "created_at": now,
         "run_id": "r0", "error": None},
    ]  # fmt: skip
    path = Path(root.table_dir("catalog"))
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=old), path / "part-old.parquet")


def test_views_over_old_parts_hide_their_text(tmp_path: Path) -> None:
    root = OutputRoot(str(tmp_path / "out"))
    _old_catalog_part(root)
    con = connect(root)
    rows = con.execute(
        "SELECT series_key, status, reason_code, reason, error FROM catalog ORDER BY 1"
    ).fetchall()
    assert rows == [
        ("old1", "quarantined", "unknown", None, None),
        ("old2", "ingested", None, None, None),
    ]
    # a new part beside the old one: both read through one schema
    write_part(
        root.table_dir("catalog"),
        [{"series_key": "new1", "stage": "ingest", "status": "quarantined",
          "reason_code": "truncated", "reason": "truncated: short pixel data", "run_id": "r1",
          "created_at": datetime(2026, 2, 1, tzinfo=UTC)}],
        CATALOG_SCHEMA,
        "new",
    )  # fmt: skip
    con = connect(root)
    got = con.execute(
        "SELECT series_key, reason_code, error FROM catalog_history ORDER BY 1"
    ).fetchall()
    assert got == [
        ("new1", "truncated", "truncated: short pixel data"),
        ("old1", "unknown", None),
        ("old2", None, None),
    ]
    text = str(con.execute("SELECT * FROM catalog_history").fetchall())
    assert SECRET_PATH not in text


def test_quarantine_listing_reads_old_and_new_sources(tmp_path: Path) -> None:
    root = OutputRoot(str(tmp_path / "out"))
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    old = pa.schema([f for f in SOURCES_SCHEMA if f.name != "reason_code"])
    base = {"size": 1, "mtime_ns": 1, "content_hash": "h", "kind": "dicom", "observed_at": t0}
    src = Path(root.sources_dir())
    src.mkdir(parents=True)
    rows = [
        {**base, "source_key": "a", "relpath": "P1/a.dcm", "series_key": "s1",
         "status": "quarantined", "error": "old text", "run_id": "r0"},
        {**base, "source_key": "b", "relpath": "P1/b.dcm", "series_key": "s2",
         "status": "quarantined", "error": "old text", "run_id": "r0"},
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema=old), src / "part-old.parquet")
    later = datetime(2026, 2, 1, tzinfo=UTC)
    write_part(
        root.sources_dir(),
        [
            # b is ingested now; c and d are one series, c at fault
            {**base, "source_key": "b", "relpath": "P1/b.dcm", "series_key": "s2",
             "status": "ingested", "run_id": "r1", "observed_at": later},
            {**base, "source_key": "c", "relpath": "P2/c.dcm", "series_key": "s3",
             "status": "quarantined", "reason_code": "missing_slices", "error": "gap",
             "run_id": "r1", "observed_at": later},
            {**base, "source_key": "d", "relpath": "P2/d.dcm", "series_key": "s3",
             "status": "quarantined", "run_id": "r1", "observed_at": later},
        ],
        SOURCES_SCHEMA,
        "new",
    )  # fmt: skip
    listed = quarantine_listing(root).to_pylist()
    assert [(r["relpath"], r["reason_code"], r["at_fault"]) for r in listed] == [
        ("P2/c.dcm", "missing_slices", True),
        ("P2/d.dcm", "missing_slices", False),
        ("P1/a.dcm", "unknown", True),
    ]
    assert [r["relpath"] for r in quarantine_listing(root, code="unknown").to_pylist()] == [
        "P1/a.dcm"
    ]
    assert quarantine_listing(root, run_id="r1").num_rows == 2
