"""The run report: a real nightly run (real Prefect API, Zarr, Parquet, DuckDB, tiny random
encoders) writes an HTML page that a real headless Chromium opens, with its thumbnails and
findings plots decoded, and a Prefect markdown artifact."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medflow.demo.archive import chest_radiograph, endoscopy_frames, write_mp4
from medflow.demo.dicom import DemoPatient, ct_phantom, write_ct_series
from medflow.flows.cli import demo_encoder_specs
from medflow.flows.nightly import nightly
from medflow.reasons import MAX_EXAMPLE_KEYS, ReasonCode, tally_add, tally_groups
from medflow.report import REPORT_ARTIFACT_KEY, build_report, thumbnail
from medflow.storage.images import DecodedImage, ImageMeta, write_image
from medflow.storage.layout import OutputRoot
from medflow.storage.tables import connect
from medflow.tasks.report import publish_report

PATIENT = DemoPatient(
    name="REPORTTEST^JANE^Q",
    patient_id="RPT-PID-424242",
    birth_date="19610203",
    accession_number="RPTACC424242",
    institution="Report Test Infirmary",
    referring_physician="REPORTTEST^REFERRER",
)
FOLDER = "Jane_Reporttest_19610203"  # an identifying folder name, as archives often have


# ---------------------------------------------------------------------------------------------
# a tiny archive: a CT series, a radiograph PNG, an endoscopy video and a broken picture


def _make_archive(archive: Path) -> dict[str, list[str]]:
    """Write the sources; return the identifying strings a report must never show."""
    base = archive / FOLDER
    ct_paths = write_ct_series(
        base / "chest_ct",
        ct_phantom((8, 48, 48), seed=3),
        spacing=(3.0, 1.0, 1.0),
        patient=PATIENT,
        ctdivol=9.0,
    )
    png = base / "radiograph_left.png"
    Image.fromarray(chest_radiograph((64, 56), seed=4, label="sphere")).save(png)
    video = base / "scope_clip.mp4"
    write_mp4(video, endoscopy_frames(6, (32, 48), seed=5, label="cube"), 5)
    broken = base / "broken_scan.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not really a picture" * 4)
    uids: set[str] = set()
    for p in ct_paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        uids |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
    relpaths = [p.relative_to(archive).as_posix() for p in [*ct_paths, png, video, broken]]
    identities = [
        PATIENT.name,
        PATIENT.name.replace("^", " "),
        PATIENT.patient_id,
        PATIENT.accession_number,
        PATIENT.institution,
        PATIENT.referring_physician,
        FOLDER,
        str(archive),
    ]
    return {"uids": sorted(uids), "relpaths": relpaths, "identities": identities}


@dataclass(frozen=True)
class Run:
    archive: Path
    root: Path
    summary: dict
    needles: dict[str, list[str]]

    @property
    def html_path(self) -> Path:
        return self.root / "reports" / f"{self.summary['run_id']}.html"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, prefect_api: None) -> Iterator[Run]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CI machine; tiny models need no more
    try:
        base = tmp_path_factory.mktemp("report")
        archive = base / "archive"
        needles = _make_archive(archive)
        specs = demo_encoder_specs(base / "models")
        root = base / "out"
        summary = nightly(archive=str(archive), root=str(root), batch_size=4, encoders=specs)
    finally:
        torch.set_num_threads(threads)
    yield Run(archive, root, summary, needles)


# ---------------------------------------------------------------------------------------------
# reading the page back


class _Page(HTMLParser):
    """The parts of a report page the tests look at: body attributes, tables, images."""

    def __init__(self) -> None:
        super().__init__()
        self.body: dict[str, str] = {}
        self.images: list[dict[str, str]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = a
        elif tag == "img":
            self.images.append(a)
        elif tag == "table":
            self._table = a.get("class", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def imgs(self, cls: str) -> list[dict[str, str]]:
        return [i for i in self.images if cls in i.get("class", "").split()]


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def _png(uri: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix), uri[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri[len(prefix) :]))))


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail(
            "chromium is not installed: the report test needs a real headless browser. "
            "`make test` installs it (tests/debian-packages.txt), or: "
            "sudo apt-get install -y chromium"
        )
    return exe


def _chromium_run(page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    profile = tmp / f"chromium-profile-{len(list(tmp.iterdir()))}"
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *extra,
        page.resolve().as_uri(),
    ]
    env = {**os.environ, "HOME": str(tmp)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc


# ---------------------------------------------------------------------------------------------
# the nightly run's report


def test_report_written_per_run_and_as_latest(run: Run) -> None:
    reports = run.root / "reports"
    assert run.html_path.is_file()
    assert (reports / "latest.html").read_bytes() == run.html_path.read_bytes()
    assert sorted(p.name for p in reports.iterdir()) == sorted(
        [run.html_path.name, "latest.html"]
    ), "a temporary file was left behind"


def test_report_shows_counts_stages_and_quarantine(run: Run) -> None:
    page = _parse(run.html_path.read_text())
    s = run.summary
    assert s["status"] == {"ingested": 3, "quarantined": 1}
    counts = {r[0]: r[1] for r in page.tables["counts"][1:]}
    assert counts["series ingested"] == str(s["status"]["ingested"])
    assert counts["series quarantined"] == str(s["status"]["quarantined"])
    for encoder, n in s["encoded"].items():
        assert counts[f"embedded by {encoder}"] == str(n)
    for encoder, n in s["findings"].items():
        assert counts[f"finding scores by {encoder}"] == str(n)
    stages = {r[0]: float(r[1]) for r in page.tables["stages"][1:]}
    assert set(stages) == {*s["stage_seconds"], "total"}
    assert {"ingest", "encode merlin", "encode clip"} <= set(stages)
    for name, secs in s["stage_seconds"].items():
        assert stages[name] == pytest.approx(secs, abs=0.006)
    quarantined = page.tables["quarantined"][1:]
    groups = tally_groups(s["quarantined"])
    assert len(quarantined) == len(groups) == 1
    stage, status, code, count, reason, keys = quarantined[0]
    assert (stage, status, count) == ("ingest", "quarantined", "1")
    assert code == groups[0]["reason_code"] and code in {c.value for c in ReasonCode}
    assert keys == groups[0]["example_keys"][0]
    assert reason and reason == groups[0]["example_reason"]


def test_report_thumbnails_are_the_runs_new_series(run: Run) -> None:
    page = _parse(run.html_path.read_text())
    con = connect(OutputRoot(str(run.root)))
    new = dict(
        con.execute(
            "SELECT series_key, modality FROM catalog WHERE status = 'ingested' AND run_id = ?",
            [run.summary["run_id"]],
        ).fetchall()
    )
    assert len(new) == 3
    thumbs = page.imgs("thumb")
    assert page.body["data-thumbnails"] == str(len(thumbs))
    assert {t["data-series-key"] for t in thumbs} == set(new)
    by_modality = {new[t["data-series-key"]]: _png(t["src"]) for t in thumbs}
    for modality, pic in by_modality.items():
        assert max(pic.shape[:2]) == 128, (modality, pic.shape)
        assert pic.std() > 5, f"{modality} thumbnail is flat"
    ct = by_modality["CT"]
    assert ct.ndim == 2  # grey, in the soft-tissue window: air black, bone white
    assert ct.min() == 0 and ct.max() == 255
    colour = [p for p in by_modality.values() if p.ndim == 3]
    assert len(colour) == 1, "the video's first frame keeps its colour"
    r, g, b = (colour[0][..., i].astype(float).mean() for i in range(3))
    assert r > g and r > b  # pink mucosa


def test_report_plots_findings_per_encoder(run: Run) -> None:
    page = _parse(run.html_path.read_text())
    plots = page.imgs("plot")
    assert page.body["data-plots"] == str(len(plots))
    assert sorted(p["data-encoder"] for p in plots) == sorted(run.summary["findings"])
    for p in plots:
        pic = _png(p["src"])
        assert pic.shape[0] > 100 and pic.shape[1] > 300
        rgb = pic[..., :3].astype(np.int64)
        colours = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
        assert colours.size > 20  # drawn, not blank


def test_report_holds_no_identifiers(run: Run) -> None:
    text = run.html_path.read_text()
    needles = [*run.needles["identities"], *run.needles["uids"], *run.needles["relpaths"]]
    assert len(needles) > 10
    for needle in needles:
        assert needle not in text, f"{needle!r} is in the report"
    assert "broken_scan.png" not in text


def test_chromium_renders_thumbnails_and_plots(run: Run, tmp_path: Path) -> None:
    dom = _parse(_chromium_run(run.html_path, tmp_path, "--dump-dom").stdout)
    thumbs, plots = dom.imgs("thumb"), dom.imgs("plot")
    assert len(thumbs) == 3 and len(plots) == 2
    # the page's own script marks every picture the browser decoded (naturalWidth > 0)
    assert dom.body.get("data-images-decoded") == str(len(thumbs) + len(plots)), dom.body
    assert dom.body.get("data-images-broken") == "0"
    assert all(i.get("data-decoded") == "1" for i in [*thumbs, *plots])
    shot = tmp_path / "report.png"
    _chromium_run(run.html_path, tmp_path, f"--screenshot={shot}", "--window-size=1200,1800")
    blocks = _dark_blocks(np.asarray(Image.open(shot).convert("RGB")), 16)
    assert blocks > 0, "the screenshot shows no thumbnail (no black block of air or background)"


def test_chromium_check_sees_a_broken_picture(run: Run, tmp_path: Path) -> None:
    text = run.html_path.read_text()
    start = text.index('src="data:image/png;base64,') + len('src="data:image/png;base64,')
    broken = tmp_path / "broken.html"
    broken.write_text(text[:start] + "AAAA" + text[start + 4 :])
    dom = _parse(_chromium_run(broken, tmp_path, "--dump-dom").stdout)
    assert dom.body.get("data-images-broken") == "1", dom.body
    assert dom.body.get("data-images-decoded") == str(len(dom.images) - 1)


def _dark_blocks(pixels: np.ndarray, n: int) -> int:
    """How many n x n windows of the picture are entirely near-black."""
    dark = (pixels.astype(np.int32).sum(axis=-1) < 60).astype(np.int64)
    ii = np.pad(dark.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = ii[n:, n:] - ii[:-n, n:] - ii[n:, :-n] + ii[:-n, :-n]
    return int((sums == n * n).sum())


def test_markdown_artifact_is_published(run: Run) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read() -> list:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[REPORT_ARTIFACT_KEY]))
            )

    arts = [a for a in asyncio.run(read()) if run.summary["run_id"] in str(a.data)]
    assert len(arts) == 1
    art = arts[0]
    assert art.type == "markdown"
    md = str(art.data)
    assert str(run.html_path) in md
    assert "## Counts" in md and "| series ingested | 3 |" in md
    assert "## Time per stage" in md and "| encode merlin |" in md
    group = tally_groups(run.summary["quarantined"])[0]
    assert group["example_keys"][0] in md and f"`{group['reason_code']}`" in md
    needles = [*run.needles["identities"], *run.needles["uids"], *run.needles["relpaths"]]
    for needle in needles:
        if needle != str(run.archive):
            assert needle not in md, f"{needle!r} is in the artifact"


# ---------------------------------------------------------------------------------------------
# thumbnails, failures and bad input


def _ct_image(path: Path, values: list[float], spacing: tuple[float, float, float]) -> None:
    vol = np.zeros((5, 32, 32), dtype=np.int16)
    for i, v in enumerate(values):  # vertical bands of known HU
        vol[:, :, i * 32 // len(values) : (i + 1) * 32 // len(values)] = v
    meta = ImageMeta(
        modality="CT",
        source_kind="nifti",
        axes=("z", "y", "x"),
        spacing=spacing,
        origin=(0.0, 0.0, 0.0),
        affine=np.diag([spacing[2], spacing[1], spacing[0], 1.0]).tolist(),
    )
    write_image(DecodedImage(meta=meta, pixels=vol), str(path), name="t")


def test_ct_thumbnail_window_and_aspect(tmp_path: Path) -> None:
    path = tmp_path / "ct.zarr"
    _ct_image(path, [-1000.0, 40.0, 1000.0, -160.0], spacing=(2.0, 2.0, 1.0))
    pic = np.asarray(Image.open(io.BytesIO(thumbnail(str(path), size=64))))
    assert pic.shape == (64, 32)  # 32 rows of 2 mm over 32 columns of 1 mm
    row = pic[32]
    assert row[2] == 0 and row[13] == 128 and row[18] == 255 and row[29] == 0
    wide = np.asarray(Image.open(io.BytesIO(thumbnail(str(path), size=64, ct_window=(0, 2000)))))
    assert wide[32, 2] == 0 and wide[32, 13] == 133 and wide[32, 29] == 107


@pytest.mark.usefixtures("prefect_api")
def test_report_failure_never_fails_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    Image.fromarray(chest_radiograph((40, 40), seed=1)).save(archive / "one.png")
    root = tmp_path / "out"
    root.mkdir()
    (root / "reports").write_text("a file where the reports folder belongs")
    summary = nightly(archive=str(archive), root=str(root))
    assert summary["status"] == {"ingested": 1}
    con = connect(OutputRoot(str(root)))
    assert con.execute("SELECT count(*) FROM runs").fetchone() == (1,)
    # the same failure, outside a flow: a warning naming the cause, and no exception
    with caplog.at_level("WARNING", logger="medflow.report"):
        assert publish_report(str(root), summary) is None
    assert any("run report not written" in r.getMessage() for r in caplog.records)


def test_bad_summary_is_refused_with_reason(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="run_id"):
        build_report(str(tmp_path), {"run_id": "../../etc/passwd"})
    with pytest.raises(ValueError, match="quarantine tally"):
        build_report(str(tmp_path), {"run_id": "r1", "quarantined": [{"reason": "x"}]})
    with pytest.raises(ValueError, match="with a count"):
        build_report(str(tmp_path), {"run_id": "r1", "quarantined": {"a|b|c": {"n": 1}}})


def test_report_of_a_run_with_nothing_new(tmp_path: Path) -> None:
    summary = {"run_id": "quiet-night", "discovered": {"unchanged": 4}, "seconds": 0.4}
    report = build_report(str(tmp_path), summary)
    assert (report.new_series, report.thumbnails, report.plots) == (0, 0, 0)
    page = _parse(Path(report.html_path).read_text())
    assert page.images == []
    assert {r[0]: r[1] for r in page.tables["counts"][1:]}["discovered unchanged"] == "4"
    assert "No new series" in "".join(page.text)


def _summary_with(n_series: int) -> dict:
    tally: dict[str, dict] = {}
    codes = ["truncated", "empty_file", "not_dicom", "missing_slices", "decode_error"]
    for i in range(n_series):
        tally_add(
            tally,
            stage="ingest",
            status="quarantined",
            code=codes[i % len(codes)],
            series_key=f"{i:024x}",
            reason=f"reason of kind {codes[i % len(codes)]}",
        )
    return {"run_id": f"r{n_series}", "status": {"quarantined": n_series}, "quarantined": tally}


def test_report_size_does_not_grow_with_the_archive(tmp_path: Path) -> None:
    """Quarantined series are grouped by reason code: 50 or 100,000 make the same page."""
    small = build_report(str(tmp_path / "a"), _summary_with(50))
    large = build_report(str(tmp_path / "b"), _summary_with(100_000))
    sizes = [Path(r.html_path).stat().st_size for r in (small, large)]
    assert abs(sizes[1] - sizes[0]) < 200, sizes  # the counts' digits and the run id differ
    assert abs(len(large.markdown) - len(small.markdown)) < 200
    rows = _parse(Path(large.html_path).read_text()).tables["quarantined"][1:]
    assert [r[3] for r in rows] == ["20000"] * 5
    assert all(len(r[5].split()) == MAX_EXAMPLE_KEYS for r in rows)
