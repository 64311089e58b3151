"""Image-to-image retrieval quality of stored embeddings: Recall@k and mAP by label.

:func:`evaluate_retrieval` reads one encoder's embeddings (newest per series, one version) from
the ``embeddings`` table, ranks every other series by cosine similarity for each query series,
and scores the rankings against labels (a series is relevant to a query when their labels are
equal):

* ``Recall@k``: share of queries with at least one relevant series among their k nearest
  (the hit rate used in retrieval papers such as M3Ret);
* ``mAP``: mean over queries of the average precision of the whole ranking.

Queries without any relevant candidate are left out (and counted). Scopes: ``all`` (every
labelled series against every other), ``within <modality>`` (queries and candidates of one
modality) and ``cross-modality`` (candidates of other modalities than the query's only).
Ties in similarity are broken by series key, so results repeat.

Labels come from a mapping ``series_key -> label``, a CSV file with ``series_key`` and
``label`` columns, or a catalog column named as ``"catalog:<column>"`` (e.g.
``"catalog:modality"``).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

__all__ = [
    "RetrievalReport",
    "RetrievalScores",
    "eval_retrieval",
    "evaluate_retrieval",
    "load_embeddings",
    "load_labels",
    "parse_ks",
    "retrieval_scores",
]

_CATALOG_PREFIX = "catalog:"
_BLOCK = 512  # query rows per similarity block: bounds memory to 512 x n floats


@dataclass(frozen=True, slots=True)
class RetrievalScores:
    """Scores of one scope: queries scored and skipped, Recall@k by k, mAP (all 0..1)."""

    scope: str
    n_queries: int
    n_skipped: int
    n_candidates: int
    recall: Mapping[int, float]
    map: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["recall"] = {str(k): v for k, v in self.recall.items()}
        return d


@dataclass(frozen=True, slots=True)
class RetrievalReport:
    """Retrieval scores of one encoder version over its labelled series."""

    encoder: str
    version: str
    n_series: int
    n_labelled: int
    labels: Mapping[str, int]  # series per label
    scopes: tuple[RetrievalScores, ...]

    def scope(self, name: str) -> RetrievalScores:
        """The scores of scope ``name`` (e.g. ``"all"``, ``"within CT"``)."""
        for s in self.scopes:
            if s.scope == name:
                return s
        raise KeyError(f"No scope {name!r}; have {[s.scope for s in self.scopes]}.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "encoder": self.encoder,
            "version": self.version,
            "n_series": self.n_series,
            "n_labelled": self.n_labelled,
            "labels": dict(self.labels),
            "scopes": [s.to_dict() for s in self.scopes],
        }

    def markdown(self) -> str:
        """The scopes as a markdown table."""
        ks = sorted(self.scopes[0].recall) if self.scopes else []
        head = "| scope | queries | " + " | ".join(f"R@{k}" for k in ks) + " | mAP |"
        rule = "|---|---:|" + "---:|" * len(ks) + "---:|"
        rows = [
            f"| {s.scope} | {s.n_queries} | "
            + " | ".join(f"{s.recall[k]:.3f}" for k in ks)
            + f" | {s.map:.3f} |"
            for s in self.scopes
        ]
        return "\n".join([head, rule, *rows])


def parse_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """Distinct positive cut-offs, sorted."""
    if isinstance(ks, str | bytes) or not isinstance(ks, Sequence) or not ks:
        raise ValueError(f"Expected a non-empty list of cut-offs k, got {ks!r}.")
    if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"Expected positive integer cut-offs k, got {list(ks)}.")
    return tuple(sorted(set(ks)))


def retrieval_scores(
    embeddings: np.ndarray,
    labels: Sequence[str],
    keys: Sequence[str],
    *,
    query_mask: np.ndarray | None = None,
    candidate_mask: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10),
    scope: str = "all",
) -> RetrievalScores:
    """Recall@k and mAP of cosine rankings (see the module docstring).

    ``embeddings`` ``[n, dim]``; ``query_mask`` ``[n]`` (which rows query, default all);
    ``candidate_mask`` ``[n, n]`` (which rows each query may retrieve, default all; a query
    never retrieves itself).
    """
    ks = parse_ks(ks)
    x = np.asarray(embeddings, dtype=np.float64)
    n = x.shape[0]
    if x.ndim != 2 or len(labels) != n or len(keys) != n:
        raise ValueError(
            f"Expected [n, dim] embeddings with n labels and keys, got {x.shape}, "
            f"{len(labels)} labels and {len(keys)} keys."
        )
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    lab = np.asarray(labels, dtype=object)
    tie = np.argsort(np.argsort(np.asarray(keys, dtype=object)))  # rank of each key
    queries = np.arange(n) if query_mask is None else np.flatnonzero(query_mask)
    hits = {k: 0 for k in ks}
    ap_sum, scored, skipped = 0.0, 0, 0
    n_cand = 0
    for start in range(0, len(queries), _BLOCK):
        block = queries[start : start + _BLOCK]
        sims = x[block] @ x.T
        for row, q in enumerate(block):
            allowed = np.ones(n, dtype=bool) if candidate_mask is None else candidate_mask[q].copy()
            allowed[q] = False
            cand = np.flatnonzero(allowed)
            n_cand = max(n_cand, cand.size)
            relevant = lab[cand] == lab[q]
            if not relevant.any():
                skipped += 1
                continue
            order = np.lexsort((tie[cand], -sims[row, cand]))
            rel = relevant[order]
            for k in ks:
                hits[k] += bool(rel[:k].any())
            ranks = np.flatnonzero(rel) + 1
            ap_sum += float(np.mean(np.arange(1, ranks.size + 1) / ranks))
            scored += 1
    return RetrievalScores(
        scope=scope,
        n_queries=scored,
        n_skipped=skipped,
        n_candidates=n_cand,
        recall={k: (hits[k] / scored if scored else float("nan")) for k in ks},
        map=ap_sum / scored if scored else float("nan"),
    )


def load_embeddings(
    root: Any, encoder: str, version: str | None = None
) -> tuple[str, list[str], list[str], np.ndarray]:
    """``(version, keys, modalities, [n, dim] float32)``: newest embedding per series.

    ``version`` ``None`` takes the encoder's most recently written version.
    """
    from medflow.storage.layout import OutputRoot
    from medflow.storage.queries import (
        encoders_with_embeddings,
        latest_embedding_version,
        latest_embeddings,
    )
    from medflow.storage.tables import connect

    out = root if isinstance(root, OutputRoot) else OutputRoot(os.fspath(root))
    con = connect(out)
    known = encoders_with_embeddings(con)
    if not known:
        raise LookupError(f"No embeddings written under {out.url} yet.")
    if version is None:
        version = latest_embedding_version(con, encoder)
        if version is None:
            raise LookupError(f"No embeddings by encoder {encoder!r}; have {known}.")
    table = latest_embeddings(con, encoder, version)
    if table.num_rows == 0:
        raise LookupError(f"No embeddings by encoder {encoder!r} at version {version!r}.")
    emb = table.column("embedding").combine_chunks()
    values = np.asarray(emb.flatten(), dtype=np.float32).reshape(table.num_rows, -1)
    return (
        version,
        [str(k) for k in table.column("series_key").to_pylist()],
        [str(m) for m in table.column("modality").to_pylist()],
        values,
    )


def load_labels(root: Any, labels: Mapping[str, str] | str | os.PathLike[str]) -> dict[str, str]:
    """Labels by series key from a mapping, a CSV path, or ``"catalog:<column>"``."""
    if isinstance(labels, Mapping):
        return {str(k): str(v) for k, v in labels.items() if v is not None and str(v) != ""}
    if not isinstance(labels, str | os.PathLike):
        raise TypeError(
            f"Expected labels as a mapping, a CSV path or 'catalog:<column>', got "
            f"{type(labels).__name__}."
        )
    text = os.fspath(labels)
    if text.startswith(_CATALOG_PREFIX):
        return _catalog_labels(root, text[len(_CATALOG_PREFIX) :])
    path = Path(text)
    if not path.is_file():
        raise ValueError(
            f"Expected a labels CSV file (series_key,label) or 'catalog:<column>', got {text!r}."
        )
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if "series_key" not in fields or "label" not in fields:
            raise ValueError(
                f"Expected columns series_key and label in {path}, got {list(fields)}."
            )
        return {r["series_key"]: r["label"] for r in reader if r["series_key"] and r["label"]}


def _catalog_labels(root: Any, column: str) -> dict[str, str]:
    from medflow.storage.layout import OutputRoot
    from medflow.storage.queries import catalog_values
    from medflow.storage.tables import connect

    out = root if isinstance(root, OutputRoot) else OutputRoot(os.fspath(root))
    return catalog_values(connect(out), column)


def evaluate_retrieval(
    root: Any,
    encoder_label: str,
    labels: Mapping[str, str] | str | os.PathLike[str],
    *,
    version: str | None = None,
    ks: Sequence[int] = (1, 5, 10),
    min_group: int = 2,
) -> RetrievalReport:
    """Recall@k and mAP of ``encoder_label``'s stored embeddings against ``labels``.

    ``root``: output root (path, URL or ``OutputRoot``); ``labels``: see :func:`load_labels`;
    ``version``: the encoder version (default: the newest written); ``min_group``: a
    modality gets a ``within`` scope only with at least this many labelled series.
    """
    ks = parse_ks(ks)
    version, keys, modalities, emb = load_embeddings(root, encoder_label, version)
    by_key = load_labels(root, labels)
    keep = [i for i, k in enumerate(keys) if k in by_key]
    keys = [keys[i] for i in keep]
    mods = np.asarray([modalities[i] for i in keep], dtype=object)
    lab = [by_key[k] for k in keys]
    emb = emb[keep]
    scopes = [retrieval_scores(emb, lab, keys, ks=ks, scope="all")] if keys else []
    for modality in sorted(set(mods.tolist())):
        member = mods == modality
        if member.sum() < min_group:
            continue
        scopes.append(
            retrieval_scores(
                emb,
                lab,
                keys,
                query_mask=member,
                candidate_mask=np.outer(member, member),
                ks=ks,
                scope=f"within {modality}",
            )
        )
    if len(set(mods.tolist())) > 1:
        scopes.append(
            retrieval_scores(
                emb,
                lab,
                keys,
                candidate_mask=mods[:, None] != mods[None, :],
                ks=ks,
                scope="cross-modality",
            )
        )
    counts: dict[str, int] = {}
    for label in lab:
        counts[label] = counts.get(label, 0) + 1
    return RetrievalReport(
        encoder=encoder_label,
        version=version,
        n_series=len(modalities),
        n_labelled=len(keys),
        labels=dict(sorted(counts.items())),
        scopes=tuple(scopes),
    )


def eval_retrieval(
    encoder: Annotated[str, typer.Option(help="Encoder label whose embeddings to score.")],
    root: Annotated[
        str, typer.Option("--root", "-r", help="Output root (folder or fsspec URL).")
    ] = "medflow-out",
    labels: Annotated[
        str | None, typer.Option(help="CSV of series_key,label (default: --label-column).")
    ] = None,
    label_column: Annotated[
        str, typer.Option(help="Catalog column used as the label when no CSV is given.")
    ] = "modality",
    version: Annotated[str | None, typer.Option(help="Encoder version (default newest).")] = None,
    k: Annotated[list[int] | None, typer.Option("--k", help="Recall cut-offs.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead.")] = False,
) -> None:
    """Retrieval quality (Recall@k, mAP) of one encoder's embeddings, by label and modality."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    source: str = labels if labels is not None else f"{_CATALOG_PREFIX}{label_column}"
    try:
        report = evaluate_retrieval(root, encoder, source, version=version, ks=k or [1, 5, 10])
    except (LookupError, ValueError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from e
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    ks = sorted(report.scopes[0].recall) if report.scopes else []
    t = Table(
        "scope",
        "queries",
        *(f"R@{x}" for x in ks),
        "mAP",
        title=f"retrieval by {source}: {report.encoder} {report.version}",
    )
    for s in report.scopes:
        t.add_row(s.scope, str(s.n_queries), *(f"{s.recall[x]:.3f}" for x in ks), f"{s.map:.3f}")
    console.print(t)
    console.print(
        f"{report.n_labelled} of {report.n_series} series labelled; labels {dict(report.labels)}"
    )
