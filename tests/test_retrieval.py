"""Retrieval evaluation: Recall@k and mAP by hand, scopes by modality, label sources, the
command function."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from medflow.evaluation.retrieval import (
    eval_retrieval,
    evaluate_retrieval,
    load_labels,
    retrieval_scores,
)
from medflow.storage.layout import OutputRoot
from medflow.storage.tables import CATALOG_SCHEMA, embeddings_schema, utcnow, write_part


def test_scores_by_hand() -> None:
    # 1-d directions: a and b are near each other, c is far; d is alone in its class
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    labels = ["x", "x", "y", "y"]
    keys = ["a", "b", "c", "d"]
    s = retrieval_scores(emb, labels, keys, ks=(1, 2))
    # a: b first (hit). b: a first (hit). c: b, a, d -> first relevant (d) at rank 3.
    # d: c first? cos(d,c)=0, cos(d,b)<0, cos(d,a)=-1 -> c at rank 1 (hit).
    assert s.n_queries == 4 and s.n_skipped == 0
    assert s.recall[1] == pytest.approx(3 / 4)
    assert s.recall[2] == pytest.approx(3 / 4)
    assert s.map == pytest.approx((1 + 1 + 1 / 3 + 1) / 4)


def test_ties_break_by_key_and_lonely_queries_are_skipped() -> None:
    emb = np.ones((3, 4))
    s = retrieval_scores(emb, ["p", "q", "p"], ["k2", "k1", "k3"], ks=(1,))
    # all similarities tie: k1 (q) ranks first by key, so k2's and k3's hits are at rank 2
    assert s.n_skipped == 1  # k1 has no other "q"
    assert s.recall[1] == 0.0
    assert s.map == pytest.approx(0.5)
    with pytest.raises(ValueError, match="positive integer cut-offs"):
        retrieval_scores(emb, ["p"] * 3, ["a", "b", "c"], ks=(0,))


@pytest.fixture()
def root(tmp_path: Path) -> OutputRoot:
    out = OutputRoot(str(tmp_path / "out"))
    out.ensure()
    rng = np.random.default_rng(0)
    centres = {"sphere": rng.normal(size=8), "cube": rng.normal(size=8)}
    cat, rows = [], []
    for i in range(12):
        key, modality = f"s{i:02d}", ("CT" if i < 6 else "DX")
        label = "sphere" if i % 2 else "cube"
        vec = centres[label] + 0.05 * rng.normal(size=8)
        common = {"series_key": key, "study_key": "st", "modality": modality}
        cat.append({**common, "stage": "ingest", "status": "ingested", "created_at": utcnow()})
        rows.append(
            {
                **common,
                "image_kind": "original",
                "embedding": vec.astype(np.float32).tolist(),
                "weights_sha256": "w",
                "config_hash": "c",
                "source_fingerprint": "f",
                "created_at": utcnow(),
            }
        )
    write_part(out.table_dir("catalog"), cat, CATALOG_SCHEMA, "cat")
    schema = embeddings_schema(8)
    schema = schema.remove(schema.get_field_index("encoder"))
    schema = schema.remove(schema.get_field_index("version"))
    write_part(out.table_dir("embeddings", encoder="enc", version="v1"), rows, schema, "p1")
    return out


def test_evaluate_from_a_mapping_and_a_csv(root: OutputRoot, tmp_path: Path) -> None:
    labels = {f"s{i:02d}": ("sphere" if i % 2 else "cube") for i in range(12)}
    report = evaluate_retrieval(root.url, "enc", labels)
    assert report.version == "v1" and report.n_labelled == 12
    assert [s.scope for s in report.scopes] == ["all", "within CT", "within DX", "cross-modality"]
    for s in report.scopes:
        assert s.recall[1] == 1.0 and s.map == pytest.approx(1.0)
    assert report.scope("within CT").n_queries == 6
    assert report.scope("cross-modality").n_candidates == 6
    csv = tmp_path / "labels.csv"
    csv.write_text("series_key,label\n" + "".join(f"{k},{v}\n" for k, v in labels.items()))
    assert evaluate_retrieval(root.url, "enc", csv).to_dict() == report.to_dict()
    assert "| within CT | 6 |" in report.markdown()


def test_catalog_labels_and_errors(root: OutputRoot, tmp_path: Path) -> None:
    assert load_labels(root.url, "catalog:modality")["s07"] == "DX"
    report = evaluate_retrieval(root.url, "enc", "catalog:modality", ks=(1,))
    assert report.labels == {"CT": 6, "DX": 6}
    with pytest.raises(ValueError, match="catalog column"):
        load_labels(root.url, "catalog:nope")
    bad = tmp_path / "bad.csv"
    bad.write_text("key,label\n")
    with pytest.raises(ValueError, match="series_key and label"):
        load_labels(root.url, bad)
    with pytest.raises(LookupError, match="No embeddings by encoder 'other'"):
        evaluate_retrieval(root.url, "other", {})


def test_command_function(root: OutputRoot) -> None:
    app = typer.Typer()
    app.command("eval-retrieval")(eval_retrieval)
    res = CliRunner().invoke(app, ["--encoder", "enc", "--root", root.url, "--json", "--k", "1"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["scopes"][0]["scope"] == "all" and doc["labels"] == {"CT": 6, "DX": 6}
    res = CliRunner().invoke(app, ["--encoder", "missing", "--root", root.url])
    assert res.exit_code == 1 and "No embeddings" in res.output
