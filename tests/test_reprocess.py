"""Reprocess and prune on a real Prefect API, real Parquet, DuckDB and Zarr: a tiny archive (three
CT volumes, two pictures) embedded by tiny random-weight Merlin and CLIP checkpoints, then a
checkpoint swapped in place, a prompt bank edited, or nothing changed."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from medflow.flows.cli import app, demo_encoder_specs
from medflow.flows.nightly import nightly
from medflow.flows.reprocess import reprocess
from medflow.storage.layout import OutputRoot
from medflow.storage.tables import connect
from medflow.tasks.reprocess import DEFAULT_EMBED_SECONDS, plan_reprocess, prune

pytestmark = pytest.mark.usefixtures("prefect_api")

N_CT, N_PICTURES = 3, 2


def _archive(base: Path) -> Path:
    for i in range(N_CT):
        data = np.random.default_rng(i).integers(-1000, 1000, (24, 20, 8)).astype(np.int16)
        img = nib.Nifti1Image(data, np.diag([1.5, 1.5, 3.0, 1.0]))
        img.header["descrip"] = b"CT abdomen"
        (base / f"study{i}").mkdir(parents=True, exist_ok=True)
        nib.save(img, str(base / f"study{i}" / "ct.nii.gz"))
    for i in range(N_PICTURES):
        pixels = np.random.default_rng(10 + i).integers(0, 255, (40, 48)).astype(np.uint8)
        (base / f"photo{i}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(base / f"photo{i}" / "xray.png")
    return base


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One nightly run with both encoders; each test works on its own copy of its outputs."""
    base = tmp_path_factory.mktemp("reprocess")
    archive = _archive(base / "archive")
    specs = demo_encoder_specs(base / "models")
    summary = nightly(archive=str(archive), root=str(base / "out"), encoders=specs)
    assert summary["encoded"] == {"merlin": N_CT, "clip": N_PICTURES}
    return base


@dataclass
class Site:
    root: Path
    models: Path
    specs: list[dict[str, Any]]
    config: Path

    @property
    def out(self) -> OutputRoot:
        return OutputRoot(str(self.root))

    def sql(self, query: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = connect(self.out).execute(query, params or []).fetchall()
        return rows

    def write_config(self) -> None:
        self.config.write_text(json.dumps({"encoders": self.specs}))


@pytest.fixture
def site(encoded: Path, tmp_path: Path) -> Site:
    shutil.copytree(encoded / "out", tmp_path / "out")
    shutil.copytree(encoded / "models", tmp_path / "models")
    s = Site(
        tmp_path / "out", tmp_path / "models", demo_encoder_specs(tmp_path / "models"), tmp_path
    )
    s.config = tmp_path / "medflow.json"
    s.write_config()
    return s


def _digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _rows_per_version(site: Site, table: str) -> dict[tuple[str, str], int]:
    return {
        (e, v): n
        for e, v, n in site.sql(f"SELECT encoder, version, count(*) FROM {table} GROUP BY ALL")
    }


def _cli(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def _ct_keys(site: Site) -> set[str]:
    return {k for (k,) in site.sql("SELECT series_key FROM catalog WHERE modality = 'CT'")}


def test_swapped_checkpoint_recomputes_exactly_the_stale_pairs(site: Site) -> None:
    from medflow.encoders.testing import write_random_checkpoint

    before = _rows_per_version(site, "embeddings")
    (old_merlin,) = [v for e, v in before if e == "merlin"]
    (clip_version,) = [v for e, v in before if e == "clip"]
    clip_parts = _digest(site.root / "tables" / "embeddings" / "encoder=clip")
    merlin = site.specs[0]
    write_random_checkpoint(  # new weights, same file: what replacing a checkpoint looks like
        "merlin_tiny", merlin["checkpoint"], seed=1, **merlin["options"]
    )

    plan = plan_reprocess(site.out, [_spec(s) for s in site.specs])
    by_label = {e.encoder: e for e in plan.encoders}
    stale = by_label["merlin"].embed
    assert {p.series_key for p in stale} == _ct_keys(site)
    assert {(p.reason, p.stored) for p in stale} == {("older version", old_merlin)}
    assert by_label["merlin"].version != old_merlin
    assert by_label["merlin"].findings_only == []
    assert by_label["clip"].embed == [] and by_label["clip"].findings_only == []
    states = {(p.table, p.encoder, p.version): p.status for p in plan.partitions}
    assert states[("embeddings", "merlin", old_merlin)] == "stale"
    assert states[("embeddings", "clip", clip_version)] == "current"

    # dry run, as a flow and on the command line: the same pairs, nothing written
    tables = _digest(site.root / "tables")
    dry = reprocess(root=str(site.root), encoders=site.specs, dry_run=True)
    assert dry["plan"]["n_embed"] == N_CT and dry["plan"]["n_findings_only"] == 0
    out = _cli("reprocess", "--root", str(site.root), "--config", str(site.config), "--dry-run")
    assert f"{N_CT} (series, encoder) pairs to embed" in out.output and "estimated" in out.output
    listed = json.loads(
        _cli(
            "reprocess",
            "--root",
            str(site.root),
            "--config",
            str(site.config),
            "--dry-run",
            "--json",
        ).output
    )
    assert {p["series_key"] for e in listed["encoders"] for p in e["embed"]} == _ct_keys(site)
    assert _digest(site.root / "tables") == tables

    only_clip = reprocess(root=str(site.root), encoders=site.specs, encoder="clip")
    assert only_clip["encoded"] == {} and only_clip["plan"]["n_embed"] == 0

    result = reprocess(root=str(site.root), encoders=site.specs)
    assert result["encoded"] == {"merlin": N_CT}
    artifact = _newest_artifact("reprocess-summary")
    assert {"encoder": "merlin", "what": "embedded", "value": N_CT} in artifact
    text = json.dumps(artifact) + json.dumps(_newest_artifact("reprocess-pairs"))
    assert str(site.root) not in text and "ct.nii.gz" not in text and "/" not in text
    new_merlin = by_label["merlin"].version
    after = _rows_per_version(site, "embeddings")
    assert after == {**before, ("merlin", new_merlin): N_CT}  # old version still queryable
    assert _digest(site.root / "tables" / "embeddings" / "encoder=clip") == clip_parts
    findings = _rows_per_version(site, "findings")
    assert findings[("merlin", new_merlin)] == N_CT * 30
    assert findings[("merlin", old_merlin)] == N_CT * 30
    assert site.sql("SELECT count(*) FROM runs WHERE flow = 'reprocess'") == [(2,)]
    again = plan_reprocess(site.out, [_spec(s) for s in site.specs])
    assert again.n_embed == 0 and again.n_findings_only == 0

    # prune: the dry run lists the old version's partitions; prune drops exactly those
    latest = json.loads(_cli("prune", "--root", str(site.root), "--dry-run", "--json").output)
    planned = prune(site.root, [_spec(s) for s in site.specs], dry_run=True)
    assert sorted((t["table"], t["version"]) for t in latest["targets"]) == sorted(
        (t.table, t.version) for t in planned.targets
    )
    assert {(t.table, t.encoder, t.version, t.what) for t in planned.targets} == {
        (table, "merlin", old_merlin, "partition")
        for table in ("embeddings", "findings", "text_embeddings")
    }
    assert _rows_per_version(site, "embeddings") == after  # a dry run drops nothing
    _cli("prune", "--root", str(site.root), "--config", str(site.config))
    assert _rows_per_version(site, "embeddings") == {
        ("merlin", new_merlin): N_CT,
        ("clip", clip_version): N_PICTURES,
    }
    assert set(_rows_per_version(site, "findings")) == {
        ("merlin", new_merlin),
        ("clip", clip_version),
    }
    assert not (site.root / ".pruned").exists()
    assert prune(site.root, [_spec(s) for s in site.specs]).targets == []


def test_bank_change_recomputes_only_findings(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medflow.encoders._base import Encoder
    from medflow.encoders.findings import PROMPT_DIR

    bank = json.loads((PROMPT_DIR / "merlin_ct_findings.json").read_text())
    bank["findings"] = bank["findings"][:3]
    bank["findings"][0]["positive"] = [*bank["findings"][0]["positive"], "a large effusion"]
    bank_path = tmp_path / "merlin_bank.json"
    bank_path.write_text(json.dumps(bank))
    site.specs[0] = {**site.specs[0], "bank": str(bank_path)}
    site.write_config()

    calls: list[int] = []

    def no_image_tower(self: Encoder, batch: Any) -> Any:
        calls.append(1)
        raise AssertionError("the image tower ran")

    monkeypatch.setattr(Encoder, "encode_images_on_device", no_image_tower)
    embeddings = _digest(site.root / "tables" / "embeddings")
    old_findings = _rows_per_version(site, "findings")
    (merlin_version,) = [v for e, v in old_findings if e == "merlin"]
    (old_bank,) = site.sql("SELECT DISTINCT bank_version FROM findings WHERE encoder = 'merlin'")

    plan = plan_reprocess(site.out, [_spec(s) for s in site.specs])
    by_label = {e.encoder: e for e in plan.encoders}
    assert by_label["merlin"].embed == []
    assert {p.series_key for p in by_label["merlin"].findings_only} == _ct_keys(site)
    assert {(p.reason, p.stored) for p in by_label["merlin"].findings_only} == {
        ("older bank", old_bank[0])
    }
    assert by_label["clip"].embed == [] and by_label["clip"].findings_only == []

    result = reprocess(root=str(site.root), encoders=site.specs)
    assert calls == []
    assert result["encoded"].get("merlin", 0) == 0 and "clip" not in result["encoded"]
    assert result["findings"] == {"merlin": N_CT * 3}
    assert _digest(site.root / "tables" / "embeddings") == embeddings
    banks = dict(
        site.sql(
            "SELECT bank_version, count(*) FROM findings WHERE encoder = 'merlin' GROUP BY ALL"
        )
    )
    assert banks == {old_bank[0]: N_CT * 30, by_label["merlin"].bank_version: N_CT * 3}

    # prune keeps the current bank's findings and text embeddings of the same encoder version
    new_bank = by_label["merlin"].bank_version
    planned = prune(site.root, [_spec(s) for s in site.specs], dry_run=True)
    assert sorted((t.table, t.what, t.rows, t.keep_rows) for t in planned.targets) == [
        ("findings", "part", N_CT * 30, 0),
        ("text_embeddings", "part", 2 * 30, 0),  # positive and negative per finding
    ]
    assert {t.version for t in planned.targets} == {merlin_version}
    # parts merged across bank versions (as compaction may leave them) are rewritten instead
    vdir = site.root / "tables" / "findings" / "encoder=merlin" / f"version={merlin_version}"
    parts = sorted(vdir.glob("part-*.parquet"))
    merged = pa.concat_tables([pq.read_table(p) for p in parts])
    pq.write_table(merged, vdir / "part-merged.parquet")
    for p in parts:
        p.unlink()
    dropped = prune(site.root, [_spec(s) for s in site.specs])
    assert sorted((t.table, t.what, t.rows, t.keep_rows) for t in dropped.targets) == [
        ("findings", "part", N_CT * 30, N_CT * 3),
        ("text_embeddings", "part", 2 * 30, 0),
    ]
    assert [p.name for p in vdir.glob("*")] == ["part-merged.parquet"]
    assert dict(
        site.sql(
            "SELECT bank_version, count(*) FROM findings WHERE encoder = 'merlin' GROUP BY ALL"
        )
    ) == {new_bank: N_CT * 3}
    assert _rows_per_version(site, "findings")[("clip", next(iter(_clip_versions(site))))] > 0
    # and the pruned root is up to date: nothing stale
    assert plan_reprocess(site.out, [_spec(s) for s in site.specs]).n_findings_only == 0


def test_nothing_stale_recomputes_nothing(site: Site) -> None:
    tables = _digest(site.root / "tables")
    plan = plan_reprocess(site.out, [_spec(s) for s in site.specs])
    assert plan.n_embed == 0 and plan.n_findings_only == 0 and plan.est_seconds == 0
    assert {p.status for p in plan.partitions} == {"current"}
    result = reprocess(root=str(site.root), encoders=site.specs)
    assert result["encoded"] == {} and result["findings"] == {}
    changed = {k for k, v in _digest(site.root / "tables").items() if tables.get(k) != v}
    assert changed and all(k.startswith("runs/") for k in changed)  # only the run's record
    assert prune(site.root, [_spec(s) for s in site.specs]).targets == []
    # a newly configured encoder has every series it accepts missing
    extra = {**site.specs[1], "label": "clip_b"}
    plan = plan_reprocess(site.out, [_spec(s) for s in [*site.specs, extra]], encoder="clip_b")
    assert [e.encoder for e in plan.encoders] == ["clip_b"]
    assert [p.reason for p in plan.encoders[0].embed] == ["missing"] * N_PICTURES


def test_prune_on_an_object_store_root(site: Site) -> None:
    import fsspec

    current = _rows_per_version(site, "embeddings")
    (version,) = _clip_versions(site)
    n_findings = _rows_per_version(site, "findings")[("clip", version)]
    old = "0ld0ld0ld0ld.000000000000"
    # an older version's partitions beside the current ones, on an fsspec (non-local) root
    for table in ("embeddings", "findings"):
        d = site.root / "tables" / table / "encoder=clip"
        shutil.copytree(d / f"version={version}", d / f"version={old}")
    mem = fsspec.filesystem("memory")
    url = f"memory://prune-{site.root.parent.name}"
    for p in site.root.rglob("*"):
        if p.is_file():
            mem.pipe_file(f"{url}/{p.relative_to(site.root)}", p.read_bytes())
    try:
        out = OutputRoot(url)
        specs = [_spec(s) for s in site.specs]
        planned = prune(out, specs, dry_run=True)
        assert sorted((t.table, t.version, t.rows) for t in planned.targets) == [
            ("embeddings", old, N_PICTURES),
            ("findings", old, n_findings),
        ]
        assert _versions(out) == {**current, ("clip", old): N_PICTURES}
        prune(out, specs)
        assert _versions(out) == current
        assert prune(out, specs).targets == []
    finally:
        mem.rm(url, recursive=True)


def _versions(out: OutputRoot) -> dict[tuple[str, str], int]:
    rows = connect(out).execute("SELECT encoder, version, count(*) FROM embeddings GROUP BY ALL")
    return {(e, v): n for e, v, n in rows.fetchall()}


def test_estimate_comes_from_past_runs(site: Site) -> None:
    from medflow.encoders.testing import write_random_checkpoint

    clip = site.specs[1]
    write_random_checkpoint("clip2d", clip["checkpoint"], seed=2, **clip["options"])
    ((stage, n),) = site.sql(
        "SELECT json_extract(summary_json, '$.stage_seconds.\"encode clip\"')::DOUBLE, "
        "json_extract(summary_json, '$.encoded.clip')::INT FROM runs WHERE flow = 'nightly'"
    )
    plan = plan_reprocess(site.out, [_spec(s) for s in site.specs], encoder="clip")
    (ep,) = plan.encoders
    assert len(ep.embed) == N_PICTURES
    assert ep.embed_seconds_per_series == pytest.approx(stage / n)
    assert ep.rate_basis.startswith("history")
    shutil.rmtree(site.root / "tables" / "runs")
    (ep,) = plan_reprocess(site.out, [_spec(s) for s in site.specs], encoder="clip").encoders
    assert ep.embed_seconds_per_series == DEFAULT_EMBED_SECONDS
    assert ep.est_seconds >= N_PICTURES * DEFAULT_EMBED_SECONDS


def test_bad_input_is_named(site: Site, tmp_path: Path) -> None:
    specs = [_spec(s) for s in site.specs]
    with pytest.raises(ValueError, match=r"'ct_model' is not configured.*merlin"):
        plan_reprocess(site.out, specs, encoder="ct_model")
    with pytest.raises(ValueError, match="no medflow catalog"):
        plan_reprocess(OutputRoot(str(tmp_path / "nowhere")), specs)
    with pytest.raises(ValueError, match="No encoders configured"):
        plan_reprocess(site.out, [])
    with pytest.raises(ValueError, match="keep='latest'"):
        prune(site.root, "oldest")  # type: ignore[arg-type]
    bad = CliRunner().invoke(
        app, ["reprocess", "--root", str(site.root), "--config", str(tmp_path / "none.toml")]
    )
    assert bad.exit_code == 2 and "no such encoder config file" in " ".join(bad.output.split())


def _newest_artifact(key: str) -> Any:
    import asyncio

    from prefect.client.orchestration import get_client

    async def read() -> list[Any]:
        async with get_client() as client:
            return list(await client.read_artifacts())

    newest = max((a for a in asyncio.run(read()) if a.key == key), key=lambda a: a.created)
    return json.loads(newest.data) if isinstance(newest.data, str) else newest.data


def _spec(d: dict[str, Any]) -> Any:
    from medflow.tasks.encode import EncoderSpec

    return EncoderSpec.from_dict(d)


def _clip_versions(site: Site) -> set[str]:
    return {
        v for (v,) in site.sql("SELECT DISTINCT version FROM embeddings WHERE encoder = 'clip'")
    }
