"""Compaction: merge the small parts of each table partition into one part, atomically.

Every nightly batch adds a part to each table it touches, so after months a partition holds
thousands of small files and every query opens them all. :func:`compact` merges them.

**What a reader sees.** A partition's visible parts are its ``part-*.parquet`` files, less the
ones a *committed* compaction has superseded (``storage.tables.part_paths`` for Python and
``connect()``, and the same rule in SQL for the views of ``export_duckdb``). A compaction of
parts ``I`` in folder ``D`` goes through these steps, each one durable before the next begins:

1. **staged**: the rows of ``I`` are written to ``D/.tmp-compact-<id>-*.parquet`` (no reader
   looks at names that do not start with ``part-``); ``<id>`` is derived from the names in ``I``.
2. **marked**: one empty marker ``D/_compaction-<id>/superseded.<name>`` per part of ``I``. A
   marker means nothing while its merged part does not exist, so readers still see ``I``.
3. **committed**: the staged file is renamed to ``D/part-compacted-<id>.parquet``. From this
   instant readers see the merged part and no longer the parts of ``I``: one rename switches
   from the old rows to the same rows in one file.
4. **deleted**: each part of ``I`` is deleted (superseded already, so invisible).
5. **cleared**: the marker folder is removed.

A crash before step 3 leaves ``I`` visible and the staged file and markers inert; a crash after
it leaves the merged part visible and ``I`` hidden. Either way every row is seen exactly once.
The next compaction first finishes or discards what an interrupted one left (:func:`recover`):
it deletes the superseded parts of a committed compaction, and the markers and staged file of
an uncommitted one.

Rows are copied as they are (values, ``created_at``, ``run_id``): views that pick the newest
row per series (``catalog``, ``outcomes``) give the same answers. The restricted ``sources``
table is compacted in place, under ``restricted/``; its paths are never printed or logged (part
names are hashes). Partitions keep their folders (``encoder=/version=``): a merge never mixes
partitions. ``text_embeddings`` parts are looked up by name and are not compacted.

Compaction takes the output root's run lock (``storage.lock``), so it never runs while a
nightly, reprocess or prune run writes. A query already planned over a part list may still
find a merged part gone: connect again. A part rewritten by a retried batch after its
compaction completed is a new part (its batch is then counted twice, as for any re-run batch);
one rewritten between the listing and the deletion of step 4 is deleted, its rows being in the
merged part.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import strip_protocol

from medflow.storage.layout import OutputRoot
from medflow.storage.tables import (
    COMPACTED_PREFIX,
    MARKER_DIR_PREFIX,
    MARKER_PREFIX,
    part_id,
)

__all__ = [
    "COMPACTABLE",
    "DEFAULT_SMALL_BYTES",
    "DEFAULT_TARGET_BYTES",
    "CompactReport",
    "Merge",
    "PartitionReport",
    "compact",
    "plan_compaction",
    "recover",
]

COMPACTABLE = ("catalog", "runs", "embeddings", "findings", "sources")
DEFAULT_SMALL_BYTES = 64 * 2**20  # parts at least this large are left as they are
DEFAULT_TARGET_BYTES = 512 * 2**20  # a merged part holds at most about this much
_ROW_GROUP_ROWS = 128 * 1024
_TMP_PREFIX = ".tmp-compact-"

StepHook = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class Merge:
    """One planned merge: parts ``inputs`` (file names) of folder ``directory`` into one."""

    table: str
    directory: str
    relpath: str  # the folder relative to the output root, for display
    inputs: tuple[str, ...]
    nbytes: int
    rows: int

    @property
    def cid(self) -> str:
        return part_id("compact", sorted(self.inputs))

    @property
    def output(self) -> str:
        return f"{COMPACTED_PREFIX}{self.cid}.parquet"


@dataclass(slots=True)
class PartitionReport:
    """Parts of one partition folder before and after (or, in a dry run, as planned)."""

    table: str
    relpath: str
    parts_before: int
    parts_after: int
    rows: int
    bytes_before: int
    bytes_after: int
    merges: int


@dataclass(slots=True)
class CompactReport:
    root: str
    dry_run: bool
    partitions: list[PartitionReport] = field(default_factory=list)
    recovered: int = 0  # interrupted compactions finished (committed) or discarded (not)
    pending_recovery: int = 0  # dry run: interrupted compactions the next run would settle
    skipped: str | None = None  # another run held the root's lock: who
    seconds: float = 0.0

    @property
    def parts_before(self) -> int:
        return sum(p.parts_before for p in self.partitions)

    @property
    def parts_after(self) -> int:
        return sum(p.parts_after for p in self.partitions)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["parts_before"] = self.parts_before
        d["parts_after"] = self.parts_after
        return d


@dataclass(slots=True)
class _Folder:
    """What one partition folder holds: parts (name -> size), markers, staged leftovers."""

    table: str
    path: str
    parts: dict[str, int] = field(default_factory=dict)
    markers: dict[str, list[str]] = field(default_factory=dict)  # compaction id -> part names
    staged: list[str] = field(default_factory=list)


def _table_dir(root: OutputRoot, table: str) -> str:
    return root.sources_dir() if table == "sources" else root.table_dir(table)


def _tables(table: str | None) -> tuple[str, ...]:
    if table is None:
        return COMPACTABLE
    if table not in COMPACTABLE:
        raise ValueError(f"Expected a table in {COMPACTABLE}, got {table!r} instead.")
    return (table,)


def _strip(root: OutputRoot, path: str) -> str:
    """A path as fsspec lists it, with the protocol the root's URL has."""
    if root.is_local or "://" in path:
        return path
    return root.url.split("://", 1)[0] + "://" + path


def _rel(root: OutputRoot, path: str) -> str:
    return path[len(root.url) + 1 :] if path.startswith(root.url + "/") else path


def _scan_folders(root: OutputRoot, table: str) -> list[_Folder]:
    fs = root.fs
    base = _table_dir(root, table)
    if not fs.exists(base):
        return []
    folders: dict[str, _Folder] = {}
    for raw, info in fs.find(base, detail=True).items():
        path = _strip(root, raw)
        parent, name = path.rsplit("/", 1)
        grand, parent_name = parent.rsplit("/", 1)
        if parent_name.startswith(MARKER_DIR_PREFIX):
            if name.startswith(MARKER_PREFIX):
                f = folders.setdefault(grand, _Folder(table, grand))
                cid = parent_name[len(MARKER_DIR_PREFIX) :]
                f.markers.setdefault(cid, []).append(name[len(MARKER_PREFIX) :] + ".parquet")
            continue
        if name.startswith("part-") and name.endswith(".parquet"):
            folders.setdefault(parent, _Folder(table, parent)).parts[name] = int(info["size"])
        elif name.startswith(_TMP_PREFIX):
            folders.setdefault(parent, _Folder(table, parent)).staged.append(name)
    # a marker folder that lost all its markers (killed while clearing) is empty: find it too
    for raw in fs.glob(f"{strip_protocol(base)}/**/{MARKER_DIR_PREFIX}*") + fs.glob(
        f"{strip_protocol(base)}/{MARKER_DIR_PREFIX}*"
    ):
        path = _strip(root, raw)
        grand, dir_name = path.rsplit("/", 1)
        f = folders.setdefault(grand, _Folder(table, grand))
        f.markers.setdefault(dir_name[len(MARKER_DIR_PREFIX) :], [])
    return [folders[k] for k in sorted(folders)]


def _visible(folder: _Folder) -> dict[str, int]:
    hidden = {
        name
        for cid, names in folder.markers.items()
        if f"{COMPACTED_PREFIX}{cid}.parquet" in folder.parts
        for name in names
    }
    return {n: s for n, s in folder.parts.items() if n not in hidden}


def _num_rows(root: OutputRoot, path: str) -> int:
    with root.fs.open(path, "rb") as f:
        return int(pq.ParquetFile(f).metadata.num_rows)


def _plan_folder(
    root: OutputRoot, folder: _Folder, small_bytes: int, target_bytes: int
) -> list[Merge]:
    small = sorted((n, s) for n, s in _visible(folder).items() if s < small_bytes)
    groups: list[list[tuple[str, int]]] = []
    current: list[tuple[str, int]] = []
    for name, size in small:
        if current and sum(s for _, s in current) + size > target_bytes:
            groups.append(current)
            current = []
        current.append((name, size))
    groups.append(current)
    merges = []
    for g in groups:
        if len(g) < 2:
            continue
        rows = sum(_num_rows(root, f"{folder.path}/{n}") for n, _ in g)
        merges.append(
            Merge(
                folder.table,
                folder.path,
                _rel(root, folder.path),
                tuple(n for n, _ in g),
                sum(s for _, s in g),
                rows,
            )
        )
    return merges


def plan_compaction(
    root: OutputRoot | str,
    table: str | None = None,
    *,
    small_bytes: int = DEFAULT_SMALL_BYTES,
    target_bytes: int = DEFAULT_TARGET_BYTES,
) -> list[Merge]:
    """The merges :func:`compact` would make now (after settling interrupted compactions)."""
    out = root if isinstance(root, OutputRoot) else OutputRoot(root)
    merges: list[Merge] = []
    for t in _tables(table):
        for folder in _scan_folders(out, t):
            merges += _plan_folder(out, folder, small_bytes, target_bytes)
    return merges


def recover(
    root: OutputRoot | str, table: str | None = None, *, on_step: StepHook | None = None
) -> int:
    """Finish or discard what interrupted compactions left; returns how many there were.

    Call it only while holding the root's run lock (:func:`compact` does).
    """
    out = root if isinstance(root, OutputRoot) else OutputRoot(root)
    fs = out.fs
    settled = 0
    for t in _tables(table):
        for folder in _scan_folders(out, t):
            for cid, names in sorted(folder.markers.items()):
                if f"{COMPACTED_PREFIX}{cid}.parquet" in folder.parts:
                    for name in names:  # committed: its inputs are superseded, delete them
                        if name in folder.parts:
                            fs.rm(f"{folder.path}/{name}")
                            _step(on_step, "deleted", folder.path)
                fs.rm(f"{folder.path}/{MARKER_DIR_PREFIX}{cid}", recursive=True)
                _step(on_step, "cleared", folder.path)
                settled += 1
            for name in folder.staged:
                fs.rm(f"{folder.path}/{name}")
    return settled


def compact(
    root: OutputRoot | str,
    table: str | None = None,
    *,
    dry_run: bool = False,
    small_bytes: int = DEFAULT_SMALL_BYTES,
    target_bytes: int = DEFAULT_TARGET_BYTES,
    on_step: StepHook | None = None,
) -> CompactReport:
    """Merge each partition's small parts (under ``small_bytes``) into parts of at most about
    ``target_bytes``, for ``table`` or every table in :data:`COMPACTABLE`.

    ``dry_run``: report what would be merged and change nothing. ``on_step(step, folder)`` is
    called after each durable step (``staged``, ``marked``, ``committed``, ``deleted``,
    ``cleared``; see the module docstring). When another run holds the root's lock nothing is
    done and ``skipped`` says who holds it.
    """
    out = root if isinstance(root, OutputRoot) else OutputRoot(root)
    _tables(table)  # a bad table name fails before anything else
    if small_bytes <= 0 or target_bytes <= 0:
        raise ValueError(
            f"Expected small_bytes and target_bytes > 0, got {small_bytes} and {target_bytes}."
        )
    t0 = time.perf_counter()
    report = CompactReport(out.url, dry_run)
    if dry_run:
        report.pending_recovery = sum(
            len(f.markers) for t in _tables(table) for f in _scan_folders(out, t)
        )
        merges = plan_compaction(out, table, small_bytes=small_bytes, target_bytes=target_bytes)
        report.partitions = _reports(out, table, merges, planned=True)
        report.seconds = time.perf_counter() - t0
        return report
    from medflow.storage.lock import run_lock

    with run_lock(out.url, "compact") as lock:
        if not lock.acquired:
            report.skipped = lock.describe_holder()
            report.seconds = time.perf_counter() - t0
            return report
        report.recovered = recover(out, table, on_step=on_step)
        before = {
            (f.table, f.path): dict(_visible(f))
            for t in _tables(table)
            for f in _scan_folders(out, t)
        }
        merges = plan_compaction(out, table, small_bytes=small_bytes, target_bytes=target_bytes)
        for m in merges:
            _merge(out, m, on_step)
        report.partitions = _reports(out, table, merges, planned=False, before=before)
    report.seconds = time.perf_counter() - t0
    return report


def _reports(
    out: OutputRoot,
    table: str | None,
    merges: Sequence[Merge],
    *,
    planned: bool,
    before: dict[tuple[str, str], dict[str, int]] | None = None,
) -> list[PartitionReport]:
    reports = []
    for t in _tables(table):
        for folder in _scan_folders(out, t):
            now = _visible(folder)
            mine = [m for m in merges if m.directory == folder.path]
            if planned:
                parts_before, bytes_before = len(now), sum(now.values())
                parts_after = parts_before - sum(len(m.inputs) - 1 for m in mine)
                bytes_after = bytes_before
            else:
                old = (before or {}).get((t, folder.path), now)
                parts_before, bytes_before = len(old), sum(old.values())
                parts_after, bytes_after = len(now), sum(now.values())
            if not parts_before and not parts_after:
                continue
            rows = sum(_num_rows(out, f"{folder.path}/{n}") for n in now)
            reports.append(
                PartitionReport(
                    t,
                    _rel(out, folder.path),
                    parts_before,
                    parts_after,
                    rows,
                    bytes_before,
                    bytes_after,
                    len(mine),
                )
            )
    return reports


def _step(hook: StepHook | None, step: str, directory: str) -> None:
    if hook is not None:
        hook(step, directory)


def _merge(out: OutputRoot, m: Merge, on_step: StepHook | None) -> None:
    fs = out.fs
    d = m.directory
    staged = f"{d}/{_TMP_PREFIX}{m.cid}-{uuid.uuid4().hex[:8]}.parquet"
    rows = _write_merged(out, m, staged)
    if rows != m.rows:
        fs.rm(staged)
        raise RuntimeError(
            f"{m.relpath}: merging {len(m.inputs)} parts gave {rows} rows, expected {m.rows}; "
            "the parts changed while compacting. Nothing was replaced."
        )
    _step(on_step, "staged", d)
    marker_dir = f"{d}/{MARKER_DIR_PREFIX}{m.cid}"
    fs.makedirs(marker_dir, exist_ok=True)
    for name in m.inputs:
        fs.pipe_file(f"{marker_dir}/{MARKER_PREFIX}{name[: -len('.parquet')]}", b"")
    _step(on_step, "marked", d)
    final = f"{d}/{m.output}"
    if out.is_local:
        import os

        os.replace(staged, final)
    else:
        fs.mv(staged, final)
    _step(on_step, "committed", d)
    for name in m.inputs:
        path = f"{d}/{name}"
        if fs.exists(path):
            fs.rm(path)
        _step(on_step, "deleted", d)
    fs.rm(marker_dir, recursive=True)
    _step(on_step, "cleared", d)


def _write_merged(out: OutputRoot, m: Merge, staged: str) -> int:
    """Stream the inputs' rows, in name order, into one Parquet file; returns the row count."""
    fs = out.fs
    schemas = []
    for name in m.inputs:
        with fs.open(f"{m.directory}/{name}", "rb") as f:
            schemas.append(pq.read_schema(f))
    try:
        schema = pa.unify_schemas(schemas, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(
            f"{m.relpath}: its parts {list(m.inputs)} have conflicting schemas and cannot be "
            f"merged ({e})."
        ) from e
    meta = dict(schema.metadata or {})
    meta[b"medflow.compacted"] = json.dumps({"parts": len(m.inputs), "rows": m.rows}).encode()
    schema = schema.with_metadata(meta)
    written = 0
    pending: list[pa.Table] = []
    with fs.open(staged, "wb") as sink, pq.ParquetWriter(sink, schema, compression="zstd") as w:

        def flush() -> None:
            if pending:
                w.write_table(pa.concat_tables(pending), row_group_size=_ROW_GROUP_ROWS)
                pending.clear()

        for name in m.inputs:
            with fs.open(f"{m.directory}/{name}", "rb") as f:
                t = pq.read_table(f)
            pending.append(_conform(t, schema))
            written += t.num_rows
            if sum(p.num_rows for p in pending) >= _ROW_GROUP_ROWS:
                flush()
        flush()
    return written


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """``t`` with ``schema``'s columns in its order: missing ones null, others cast."""
    cols = []
    for f in schema:
        if f.name in t.column_names:
            c = t[f.name]
            cols.append(c if c.type == f.type else c.cast(f.type))
        else:
            cols.append(pa.nulls(t.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)
