"""Reprocess what a new encoder checkpoint or prompt bank made stale, and prune old versions.

**What is stale.** Every output row carries its provenance: the encoder label, the ``version``
partition (weights and configuration digests, see :func:`tasks.encode.version_tag`), the full
``weights_sha256`` and, for findings, the prompt bank version. The *registered current* versions
are those of the configured encoders (the same ``encoders`` / ``encoder_config`` settings as the
nightly flow). For each configured encoder, :func:`plan_reprocess` lists:

* **re-embed** pairs (series, encoder): an ingested series the encoder accepts with no
  embedding at the current version for its current sources and image -- exactly what the
  encode stage would pick (:func:`tasks.encode.pending_items`). Each says why: ``older
  version`` (embedded, but only at another version), ``changed source`` (embedded for other
  sources or another image of the series, e.g. before it was denoised) or ``missing`` (never
  embedded). A pair that already failed at the current version is not retried (as in nightly).
* **findings-only** pairs: an embedding at the current version without findings of the current
  prompt bank version (``older bank`` when it has findings of another bank version, ``missing``
  otherwise). These are rescored from the stored embeddings: the image tower does not run.

Old rows are never rewritten: they stay queryable (each in its own ``version=`` partition, or
with its own ``bank_version``) until :func:`prune` drops them.

**Estimated time.** From the ``runs`` table (nightly and reprocess runs record, per encoder,
the seconds of its encode stage and how many series it embedded / finding scores it wrote):

* re-embed: seconds per series = total stage seconds / total series embedded over the
  :data:`HISTORY_RUNS` most recent runs that embedded with that encoder label;
* findings-only: seconds per finding score = total stage seconds / total scores written over
  the most recent runs that only rescored (embedded nothing) with that label, times the
  current bank's number of findings per pair.

With no history the defaults are :data:`DEFAULT_EMBED_SECONDS` per series (a 3D CT model on two
CPU cores; a GPU is much faster) and :data:`DEFAULT_SCORE_SECONDS` per finding score. The stage
seconds include loading the model, so estimates lean high for small runs.

**Pruning.** :func:`prune` keeps, per encoder label, one version -- the configured one
(``keep`` = the encoder specs) or the most recently written (``keep="latest"``) -- and drops:

* ``embeddings``, ``findings`` and ``text_embeddings`` partitions (``encoder=<label>/
  version=<v>``) of every other version of that label;
* within the kept version, findings of other prompt bank versions (whole parts; a part mixing
  bank versions is rewritten with the kept rows only) and text embeddings of other banks or
  bank versions. With specs, an encoder configured without a prompt bank keeps its findings.

Encoder labels that are not configured are left alone when ``keep`` is a list of specs. The
catalog, images and runs tables are never touched. On a local root each partition is first
renamed out of the table into ``<root>/.pruned/`` (one atomic rename: a query sees all of it
or none of it) and then deleted (what a killed prune leaves there, the next one deletes); on an
object store, parts are deleted one by one (a query meanwhile may see some of an old version's
parts, never half a part). Prune takes the root's run lock (:mod:`storage.lock`): while a
nightly or reprocess run writes there, it refuses to start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import strip_protocol

from medflow.storage.atomic import atomic_file
from medflow.storage.layout import OutputRoot
from medflow.storage.queries import (
    embedding_history,
    embeddings_without_findings,
    latest_banks,
    latest_versions,
    stored_groups,
)
from medflow.storage.tables import RUNS_SCHEMA, connect, read_table
from medflow.tasks.encode import (
    EncoderSpec,
    forget_encoder,
    get_encoder,
    pending_items,
    version_tag,
)

if TYPE_CHECKING:
    from medflow.encoders import Encoder

__all__ = [
    "DEFAULT_EMBED_SECONDS",
    "DEFAULT_SCORE_SECONDS",
    "HISTORY_RUNS",
    "EncoderPlan",
    "PartitionState",
    "PruneResult",
    "PruneTarget",
    "ReprocessPlan",
    "StalePair",
    "current_encoder",
    "estimate_rates",
    "plan_reprocess",
    "prune",
    "select_specs",
]

DEFAULT_EMBED_SECONDS = 10.0  # per series, with no history
DEFAULT_SCORE_SECONDS = 1e-4  # per finding score, with no history
HISTORY_RUNS = 10  # most recent runs used for a rate


# ---------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True, slots=True)
class StalePair:
    """One (series, encoder) pair to recompute, and why (pseudonymous keys only)."""

    series_key: str
    encoder: str  # output label
    reason: str  # older version | changed source | missing | older bank
    stored: str | None = None  # the stored version (re-embed) or bank version (findings-only)


@dataclass(frozen=True, slots=True)
class PartitionState:
    """One group of stored rows (table, encoder, version[, bank version]) against the current."""

    table: str  # embeddings | findings
    encoder: str
    version: str
    bank_version: str | None
    weights_sha256: str
    rows: int
    series: int
    status: str  # current | stale | not configured


@dataclass(slots=True)
class EncoderPlan:
    """What one configured encoder needs, and roughly how long it takes."""

    encoder: str  # output label
    version: str  # current version tag
    weights_sha256: str
    bank: str | None = None
    bank_version: str | None = None
    n_findings: int = 0  # findings in the current bank
    embed: list[StalePair] = field(default_factory=list)
    findings_only: list[StalePair] = field(default_factory=list)
    embed_seconds_per_series: float = DEFAULT_EMBED_SECONDS
    score_seconds: float = DEFAULT_SCORE_SECONDS  # per finding score
    rate_basis: str = "default (no history)"

    @property
    def est_seconds(self) -> float:
        scores = (len(self.embed) + len(self.findings_only)) * self.n_findings
        return len(self.embed) * self.embed_seconds_per_series + scores * self.score_seconds

    @property
    def stale(self) -> bool:
        return bool(self.embed or self.findings_only)

    def reasons(self) -> dict[str, int]:
        """Pairs by action and reason, e.g. ``{"embed: older version": 3}``."""
        out: dict[str, int] = {}
        for what, pairs in (("embed", self.embed), ("findings", self.findings_only)):
            for p in pairs:
                k = f"{what}: {p.reason}"
                out[k] = out.get(k, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["est_seconds"] = self.est_seconds
        d["reasons"] = self.reasons()
        return d


@dataclass(slots=True)
class ReprocessPlan:
    """Per configured encoder, the stale pairs; and every stored partition's state."""

    encoders: list[EncoderPlan] = field(default_factory=list)
    partitions: list[PartitionState] = field(default_factory=list)

    @property
    def n_embed(self) -> int:
        return sum(len(e.embed) for e in self.encoders)

    @property
    def n_findings_only(self) -> int:
        return sum(len(e.findings_only) for e in self.encoders)

    @property
    def est_seconds(self) -> float:
        return sum(e.est_seconds for e in self.encoders)

    def to_dict(self) -> dict[str, Any]:
        return {
            "encoders": [e.to_dict() for e in self.encoders],
            "partitions": [asdict(p) for p in self.partitions],
            "n_embed": self.n_embed,
            "n_findings_only": self.n_findings_only,
            "est_seconds": self.est_seconds,
        }


def select_specs(specs: Sequence[EncoderSpec], encoder: str | None = None) -> list[EncoderSpec]:
    """The configured specs, or only the one whose label (or, if unique, registry name) is
    ``encoder``."""
    if not specs:
        raise ValueError(
            "No encoders configured: pass encoder specs (a config file, --config) to compare "
            "the stored outputs with."
        )
    if encoder is None:
        return list(specs)
    by_label = [s for s in specs if s.output_name == encoder]
    if by_label:
        return by_label
    by_name = [s for s in specs if s.name == encoder]
    if len(by_name) == 1:
        return by_name
    labels = sorted(s.output_name for s in specs)
    what = "is ambiguous (several labels use it)" if by_name else "is not configured"
    raise ValueError(f"Encoder {encoder!r} {what}; configured encoder labels: {labels}.")


def current_encoder(spec: EncoderSpec, device: str | None = None) -> Encoder:
    """The encoder of ``spec`` as its checkpoint file is *now*.

    Encoders are built once per process (:func:`tasks.encode.get_encoder`); a checkpoint
    replaced in place since then would otherwise keep its old weights and version here.
    """
    from medflow.encoders import sha256_file

    enc = get_encoder(spec, device)
    if spec.random_weights or not spec.checkpoint or not os.path.isfile(spec.checkpoint):
        return enc
    if sha256_file(spec.checkpoint) == enc.version.weights_sha256:
        return enc
    forget_encoder(spec, device)
    return get_encoder(spec, device)


def _check_root(out: OutputRoot) -> None:
    if not out.fs.exists(out.table_dir("catalog")):
        raise ValueError(
            f"{out.url}: no medflow catalog under this root (tables/catalog is missing); "
            "check --root, or run the nightly job first."
        )


def plan_reprocess(
    root: OutputRoot | str, specs: Sequence[EncoderSpec], encoder: str | None = None
) -> ReprocessPlan:
    """Compare the stored outputs with the configured encoders: what to recompute, and how
    long that should take (see the module docstring for the rules)."""
    from medflow.encoders.findings import load_prompt_bank

    out = root if isinstance(root, OutputRoot) else OutputRoot(root)
    _check_root(out)
    chosen = select_specs(specs, encoder)
    con = connect(out)
    rates = estimate_rates(out)
    plan = ReprocessPlan()
    current: dict[str, tuple[str, str, str | None]] = {}  # label -> (version, weights, bank v)
    for spec in chosen:
        enc = current_encoder(spec)
        tag = version_tag(enc)
        ep = EncoderPlan(spec.output_name, tag, enc.version.weights_sha256)
        scores = spec.bank is not None and getattr(enc, "has_text", True)
        if scores:
            assert spec.bank is not None
            bank = load_prompt_bank(spec.bank)
            ep.bank, ep.bank_version, ep.n_findings = bank.name, bank.version, len(bank.findings)
        ep.embed = _embed_pairs(con, out, enc, spec, tag)
        if scores and ep.bank_version is not None:
            ep.findings_only = _findings_pairs(con, spec.output_name, tag, ep.bank_version)
        rate = rates.get(spec.output_name)
        if rate is not None:
            embed_rate, score_rate, basis = rate
            ep.embed_seconds_per_series = embed_rate or DEFAULT_EMBED_SECONDS
            ep.score_seconds = score_rate or DEFAULT_SCORE_SECONDS
            ep.rate_basis = basis
        plan.encoders.append(ep)
        current[spec.output_name] = (tag, ep.weights_sha256, ep.bank_version)
    plan.partitions = _partitions(con, current, encoder is not None)
    return plan


def _embed_pairs(
    con: Any, out: OutputRoot, enc: Any, spec: EncoderSpec, tag: str
) -> list[StalePair]:
    """The series the encode stage would embed, each with why."""
    items = pending_items(out, enc, spec)
    if not items:
        return []
    stored = embedding_history(con, spec.output_name)
    pairs = []
    for item in items:
        rows = stored.get(item.series_key, [])
        older = [
            v for v, fp, kind in rows if (fp, kind) == (item.source_fingerprint, item.image_kind)
        ]
        older = [v for v in older if v != tag]
        if older:
            pairs.append(StalePair(item.series_key, spec.output_name, "older version", older[-1]))
        elif rows:
            pairs.append(
                StalePair(item.series_key, spec.output_name, "changed source", rows[-1][0])
            )
        else:
            pairs.append(StalePair(item.series_key, spec.output_name, "missing"))
    return pairs


def _findings_pairs(con: Any, label: str, tag: str, bank_version: str) -> list[StalePair]:
    """Embeddings at the current version without findings of the current bank version (the
    rows :func:`tasks.encode.recompute_findings` rescores)."""
    rows = embeddings_without_findings(con, label, tag, bank_version)
    return [StalePair(k, label, "older bank" if prev else "missing", prev) for k, prev in rows]


def _partitions(
    con: Any,
    current: Mapping[str, tuple[str, str, str | None]],
    only_current: bool,
) -> list[PartitionState]:
    """Every stored (table, encoder, version[, bank version]) group, against the current ones;
    with ``only_current``, those of the planned encoders only."""
    out: list[PartitionState] = []
    for group in stored_groups(con):
        table, label, version, bank_version, weights, rows, series = group
        if label not in current:
            if only_current:
                continue
            status = "not configured"
        else:
            tag, sha, bank = current[label]
            ok = version == tag and weights == sha
            if table == "findings" and bank is not None:
                ok = ok and bank_version == bank
            status = "current" if ok else "stale"
        out.append(
            PartitionState(table, label, version, bank_version, weights or "", rows, series, status)
        )
    return out


def estimate_rates(root: OutputRoot) -> dict[str, tuple[float | None, float | None, str]]:
    """Per encoder label: (seconds per embedded series, seconds per finding score, basis), from
    the most recent runs in the ``runs`` table (see the module docstring)."""
    t = read_table(root.table_dir("runs"), RUNS_SCHEMA, columns=["finished_at", "summary_json"])
    if t.num_rows == 0:
        return {}
    t = t.sort_by([("finished_at", "descending")])
    embed: dict[str, list[tuple[float, int]]] = {}
    score: dict[str, list[tuple[float, int]]] = {}
    for text in t["summary_json"].to_pylist():
        try:
            s = json.loads(text or "{}")
        except json.JSONDecodeError:
            continue  # a run row this version cannot read says nothing about rates
        stage = s.get("stage_seconds") or {}
        encoded = s.get("encoded") or {}
        written = s.get("findings") or {}
        for label in set(encoded) | set(written):
            secs = stage.get(f"encode {label}")
            if not isinstance(secs, int | float):
                continue
            n_embed, n_scores = int(encoded.get(label, 0)), int(written.get(label, 0))
            if n_embed > 0 and len(embed.setdefault(label, [])) < HISTORY_RUNS:
                embed[label].append((float(secs), n_embed))
            elif n_embed == 0 and n_scores > 0 and len(score.setdefault(label, [])) < HISTORY_RUNS:
                score[label].append((float(secs), n_scores))
    out: dict[str, tuple[float | None, float | None, str]] = {}
    for label in set(embed) | set(score):
        e, s = embed.get(label, []), score.get(label, [])
        e_rate = sum(x for x, _ in e) / sum(n for _, n in e) if e else None
        s_rate = sum(x for x, _ in s) / sum(n for _, n in s) if s else None
        out[label] = (e_rate, s_rate, f"history: {len(e)} encode and {len(s)} rescoring runs")
    return out


# ---------------------------------------------------------------------------------------------
# prune


@dataclass(frozen=True, slots=True)
class PruneTarget:
    """One thing prune drops: a whole partition folder, or one part file."""

    table: str  # embeddings | findings | text_embeddings
    encoder: str
    version: str
    what: str  # partition | part | bank
    detail: str  # e.g. the bank version of a dropped findings part
    files: int
    rows: int
    path: str  # relative to the root (never shown in Prefect: it is printed by the CLI only)
    keep_rows: int = 0  # a part mixing bank versions is rewritten with these rows kept


@dataclass(slots=True)
class PruneResult:
    keep: dict[str, dict[str, str | None]] = field(default_factory=dict)  # label -> kept
    targets: list[PruneTarget] = field(default_factory=list)
    dry_run: bool = True

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.targets)

    @property
    def files(self) -> int:
        return sum(t.files for t in self.targets)

    def to_dict(self) -> dict[str, Any]:
        return {
            "keep": self.keep,
            "targets": [asdict(t) for t in self.targets],
            "dry_run": self.dry_run,
            "rows": self.rows,
            "files": self.files,
        }


def _kept_versions(
    out: OutputRoot, keep: Sequence[EncoderSpec] | Literal["latest"]
) -> dict[str, dict[str, str | None]]:
    """label -> {"version": v, "bank": name or None, "bank_version": v or None}."""
    from medflow.encoders.findings import load_prompt_bank

    if isinstance(keep, str):
        if keep != "latest":
            raise ValueError(f"Expected keep='latest' or a list of encoder specs, got {keep!r}.")
        con = connect(out)
        kept: dict[str, dict[str, str | None]] = {
            label: {"version": version, "bank": None, "bank_version": None}
            for label, version in latest_versions(con).items()
        }
        for label, version, bank_name, bank_version in latest_banks(con):
            if label in kept and kept[label]["version"] == version:
                kept[label].update(bank=bank_name, bank_version=bank_version)
        return kept
    kept = {}
    for spec in select_specs(keep):
        enc = current_encoder(spec)
        entry: dict[str, str | None] = {"version": version_tag(enc), "bank": None}
        entry["bank_version"] = None
        if spec.bank is not None and getattr(enc, "has_text", True):
            bank = load_prompt_bank(spec.bank)
            entry.update(bank=bank.name, bank_version=bank.version)
        kept[spec.output_name] = entry
    return kept


def _rel(out: OutputRoot, path: str) -> str:
    """``path`` (with or without its protocol) relative to the root."""
    base, p = strip_protocol(out.url), strip_protocol(path)
    return p[len(base) + 1 :] if p.startswith(base + "/") else p


def _list_dirs(fs: Any, path: str, prefix: str) -> list[tuple[str, str]]:
    """(value, path) of the ``<prefix>=<value>`` folders directly under ``path``."""
    if not fs.exists(path):
        return []
    found = []
    for p in fs.ls(path, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(prefix + "=") and fs.isdir(p):
            found.append((name.split("=", 1)[1], p))
    return sorted(found)


def _part_files(out: OutputRoot, path: str) -> list[str]:
    """The parts under ``path`` that queries see (as the tables' readers list them: parts that
    a committed compaction merged are left out), as paths of ``out.fs``."""
    from medflow.storage.tables import part_paths

    return sorted(strip_protocol(p) for p in part_paths(out.join(_rel(out, path))))


def _count_rows(fs: Any, files: Sequence[str]) -> int:
    n = 0
    for f in files:
        with fs.open(f, "rb") as h:
            n += pq.ParquetFile(h).metadata.num_rows
    return n


def plan_prune(
    root: OutputRoot | str, keep: Sequence[EncoderSpec] | Literal["latest"] = "latest"
) -> PruneResult:
    """What :func:`prune` would drop, without dropping anything."""
    out = root if isinstance(root, OutputRoot) else OutputRoot(root)
    _check_root(out)
    kept = _kept_versions(out, keep)
    result = PruneResult(keep=kept, dry_run=True)
    fs = out.fs
    tables = ("findings", "text_embeddings", "embeddings")
    base = {t: strip_protocol(out.table_dir(t)) for t in tables}
    for table in tables:  # findings first: no finding outlives its embedding
        for label, label_dir in _list_dirs(fs, base[table], "encoder"):
            k = kept.get(label)
            if k is None:
                continue  # not configured (specs) or nothing to compare with: left alone
            for version, vdir in _list_dirs(fs, label_dir, "version"):
                if version != k["version"]:
                    files = _part_files(out, vdir)
                    rows = _count_rows(fs, files)
                    result.targets.append(
                        PruneTarget(
                            table,
                            label,
                            version,
                            "partition",
                            "",
                            len(files),
                            rows,
                            _rel(out, vdir),
                        )
                    )
                elif table == "findings" and k["bank_version"] is not None:
                    result.targets += _stale_findings_parts(out, fs, label, version, vdir, k)
                elif table == "text_embeddings" and k["bank_version"] is not None:
                    result.targets += _stale_text_parts(out, fs, label, version, vdir, k)
    return result


def _stale_findings_parts(
    out: OutputRoot, fs: Any, label: str, version: str, vdir: str, k: Mapping[str, str | None]
) -> list[PruneTarget]:
    targets = []
    for f in _part_files(out, vdir):
        with fs.open(f, "rb") as h:
            banks = pq.read_table(h, columns=["bank_version"])["bank_version"]
        n = len(banks)
        n_keep = int(pc.sum(pc.equal(banks, k["bank_version"])).as_py() or 0)
        if n_keep == n:
            continue
        old = sorted({b for b in banks.to_pylist() if b != k["bank_version"]})
        targets.append(
            PruneTarget(
                "findings",
                label,
                version,
                "part",
                "bank " + ", ".join(old),
                1,
                n - n_keep,
                _rel(out, f),
                keep_rows=n_keep,
            )
        )
    return targets


def _stale_text_parts(
    out: OutputRoot, fs: Any, label: str, version: str, vdir: str, k: Mapping[str, str | None]
) -> list[PruneTarget]:
    targets = []
    for bank, bdir in _list_dirs(fs, vdir, "bank"):
        files = _part_files(out, bdir)
        if bank != k["bank"]:
            rows = _count_rows(fs, files)
            targets.append(
                PruneTarget(
                    "text_embeddings",
                    label,
                    version,
                    "bank",
                    bank,
                    len(files),
                    rows,
                    _rel(out, bdir),
                )
            )
            continue
        for f in files:
            if f.rsplit("/", 1)[-1] != f"part-{k['bank_version']}.parquet":
                targets.append(
                    PruneTarget(
                        "text_embeddings",
                        label,
                        version,
                        "part",
                        f"bank {bank} " + f.rsplit("/", 1)[-1][5:-8],
                        1,
                        _count_rows(fs, [f]),
                        _rel(out, f),
                    )
                )
    return targets


def prune(
    root: OutputRoot | str,
    keep: Sequence[EncoderSpec] | Literal["latest"] = "latest",
    *,
    dry_run: bool = False,
) -> PruneResult:
    """Drop the stored outputs of versions other than the kept ones (see the module docstring).

    Returns what was (or, with ``dry_run``, would be) dropped.
    """
    from medflow.storage.lock import run_lock

    out = root if isinstance(root, OutputRoot) else OutputRoot(root)
    if dry_run:
        return plan_prune(out, keep)
    with run_lock(out.url, "prune") as lock:
        if not lock.acquired:
            raise RuntimeError(
                f"{out.url}: not pruned, another run is writing here "
                f"({lock.describe_holder()}); try again when it has finished."
            )
        result = plan_prune(out, keep)
        result.dry_run = False
        _drop(out, result)
    return result


def _drop(out: OutputRoot, result: PruneResult) -> None:
    fs = out.fs
    trash = out.trash_dir(uuid.uuid4().hex[:12])
    for i, t in enumerate(result.targets):
        path = out.join(t.path)
        if t.keep_rows:
            _rewrite_part(out, path, result.keep[t.encoder]["bank_version"])
        elif out.is_local:
            os.makedirs(trash, exist_ok=True)
            os.rename(path, os.path.join(trash, str(i)))  # atomic: all of it leaves the table
        elif fs.isdir(path):
            for f in _part_files(out, path):  # what queries see goes first
                fs.rm(f)
            # then what is left (compaction markers); the folder may be gone with its last part
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path, recursive=True)
        else:
            fs.rm(path)
    if out.is_local:
        _empty_trash(out)


def _rewrite_part(out: OutputRoot, path: str, bank_version: str | None) -> None:
    """Replace a findings part with its rows of ``bank_version`` only, atomically."""
    fs = out.fs
    with fs.open(path, "rb") as h:
        table = pq.read_table(h)
    kept: pa.Table = table.filter(pc.equal(table["bank_version"], bank_version))
    if not out.is_local:  # one PUT: the object is replaced whole (no rename there)
        buf = pa.BufferOutputStream()
        pq.write_table(kept, buf, compression="zstd")
        fs.pipe_file(path, buf.getvalue().to_pybytes())
        return
    with atomic_file(path) as f:
        pq.write_table(kept, f, compression="zstd")


def _empty_trash(out: OutputRoot) -> None:
    """Delete what earlier prunes moved out of the tables (also what a killed prune left)."""
    shutil.rmtree(out.trash_dir(), ignore_errors=True)
