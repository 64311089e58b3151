"""`medflow demo` end to end (the new user's first command): every stage of the product runs
and shows -- ingest, denoising of the low-dose scan with raw projections, Merlin, CLIP and
M3Ret embeddings, findings and the report with the denoised image beside the noisy one."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from medflow.flows.cli import DEMO_DENOISE, app
from medflow.storage.images import open_image
from medflow.storage.layout import OutputRoot
from medflow.storage.tables import connect

pytestmark = pytest.mark.usefixtures("prefect_api")

STAGES = ("ingest", "denoise", "encode merlin", "encode clip", "encode m3ret", "findings")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    out = tmp_path_factory.mktemp("demo") / "demo"
    result = CliRunner().invoke(
        app, ["demo", "--out", str(out), "--size", "tiny"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output[-3000:]
    yield out, result.output


def _con(out: Path) -> Any:
    return connect(OutputRoot(str(out / "out")))


def _raw_series_key(out: Path) -> str:
    (key,) = (
        _con(out)
        .execute("SELECT series_key FROM outcomes WHERE stage = 'sinogram' AND status = 'ingested'")
        .fetchone()
    )
    return str(key)


def test_the_demo_says_its_models_are_random_and_its_denoising_reduced(
    demo: tuple[Path, str],
) -> None:
    _, output = demo
    text = " ".join(output.split())
    assert "RANDOM weights" in text and "M3Ret" in text
    assert "REDUCED settings" in text and f"steps {DEMO_DENOISE['steps']}" in text
    assert "the defaults: steps 2000" in text


def test_low_dose_scan_is_denoised_with_its_provenance(demo: tuple[Path, str]) -> None:
    out, _ = demo
    key = _raw_series_key(out)
    con = _con(out)
    status, path, attrs = con.execute(
        "SELECT status, zarr_path, attrs_json FROM outcomes "
        "WHERE series_key = ? AND stage = 'preprocess'",
        [key],
    ).fetchone()
    assert status == "denoised" and json.loads(attrs)["method"] == "flicking"
    denoised = open_image(str(out / "out" / path))
    prov = denoised.attrs["medflow"]["denoise"]
    settings = prov["params"]["settings"]
    assert prov["method"] == "flicking" and prov["seed"] == 0
    for k in ("steps", "n_average", "channels", "patch_size"):
        assert settings[k] == DEMO_DENOISE[k], k
    (noisy_path,) = con.execute(
        "SELECT zarr_path FROM catalog WHERE series_key = ?", [key]
    ).fetchone()
    noisy = open_image(str(out / "out" / noisy_path))
    assert denoised.levels[0].shape == noisy.levels[0].shape
    np.testing.assert_allclose(denoised.meta.affine_array, noisy.meta.affine_array)
    before = np.asarray(noisy.levels[0][...], dtype=np.float32)
    after = np.asarray(denoised.levels[0][...], dtype=np.float32)
    assert not np.array_equal(before, after)
    # the encoders used the denoised image in place of the noisy reconstruction
    kinds = {
        e: k
        for e, k in con.execute(
            "SELECT encoder, image_kind FROM embeddings WHERE series_key = ?", [key]
        ).fetchall()
    }
    assert kinds == {"merlin": "denoised", "m3ret": "denoised"}


def test_m3ret_embeds_every_series_it_accepts_and_similar_works(demo: tuple[Path, str]) -> None:
    from medflow.flows.cli import demo_encoder_specs
    from medflow.tasks.encode import EncoderSpec, accepts_row, get_encoder

    out, _ = demo
    (spec,) = [
        EncoderSpec.from_dict(s)
        for s in demo_encoder_specs(out / "models", m3ret=True)
        if s["label"] == "m3ret"
    ]
    info = get_encoder(spec, device="cpu").info
    con = _con(out)
    accepted = {
        key
        for key, modality, axes in con.execute(
            "SELECT series_key, modality, axes FROM catalog WHERE status = 'ingested'"
        ).fetchall()
        if accepts_row(info, modality, axes)
    }
    embedded = {
        r[0]
        for r in con.execute("SELECT series_key FROM embeddings WHERE encoder = 'm3ret'").fetchall()
    }
    assert len(accepted) >= 10 and embedded == accepted
    # volumes, pictures and videos alike: one model for every kind
    assert {"zyx", "yx", "tcyx"} <= {
        r[0]
        for r in con.execute(
            "SELECT DISTINCT c.axes FROM catalog c JOIN embeddings e USING (series_key) "
            "WHERE e.encoder = 'm3ret'"
        ).fetchall()
    }
    probe = sorted(embedded)[0]
    result = CliRunner().invoke(
        app,
        ["similar", probe, "--root", str(out / "out"), "--encoder", "m3ret", "--k", "3"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    listed = re.findall(r"\b[0-9a-f]{24}\b", result.output)
    assert probe in listed  # the title
    assert len([k for k in listed if k != probe]) == 3
    assert set(listed) <= embedded
    wrong = CliRunner().invoke(
        app, ["similar", probe, "--root", str(out / "out"), "--encoder", "m3rte"]
    )
    assert wrong.exit_code == 2
    assert "--encoder 'm3rte': no embeddings by that encoder; have: clip, m3ret, merlin" in (
        " ".join(wrong.output.split())
    )


def test_summary_lists_every_stage_with_count_and_time(demo: tuple[Path, str]) -> None:
    out, output = demo
    lines = {line.split("│")[1].strip(): line for line in output.splitlines() if "│" in line}
    for stage in (*STAGES, "report", "total"):
        assert stage in lines, stage
        assert re.search(r"\d+\.\d", lines[stage].split("│")[-2]), lines[stage]
    assert "1 series" in lines["denoise"] and "1 page" in lines["report"]
    (summary_json,) = _con(out).execute("SELECT summary_json FROM runs").fetchone()
    summary = json.loads(summary_json)
    m3ret = len(_con(out).execute("SELECT 1 FROM embeddings WHERE encoder = 'm3ret'").fetchall())
    assert f"{m3ret} series" in lines["encode m3ret"]
    assert f"{sum(summary['findings'].values())} scores" in lines["findings"]
    assert "m3ret" not in summary["findings"]  # no text tower: no findings


def _png(uri: str) -> np.ndarray:
    from PIL import Image

    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri[len(prefix) :]))))


def test_report_shows_the_denoised_pair_and_every_stage(demo: tuple[Path, str]) -> None:
    out, _ = demo
    key = _raw_series_key(out)
    page = (out / "out" / "reports" / "latest.html").read_text()
    pair = re.search(
        rf'<figure class="pair" data-series-key="{key}" data-method="flicking">(.*?)</figure>',
        page,
        re.S,
    )
    assert pair is not None
    pics = dict(re.findall(r'data-role="(noisy|denoised)" src="([^"]+)"', pair.group(1)))
    noisy, denoised = _png(pics["noisy"]), _png(pics["denoised"])
    assert noisy.shape == denoised.shape and not np.array_equal(noisy, denoised)
    caption = " ".join(re.sub(r"<[^>]+>", " ", pair.group(1)).split())
    assert "method flicking" in caption and f"steps {DEMO_DENOISE['steps']}" in caption
    assert "reduced from the defaults" in caption and "seed 0" in caption
    stages = re.findall(r'<tr data-stage="([^"]+)">', page)
    assert stages == [*STAGES, "report", "total"]
    counts = dict(
        re.findall(
            r'<tr data-stage="([^"]+)"><td>[^<]*</td><td class="n">[^<]*</td>'
            r'<td class="n">([^<]*)</td>',
            page,
        )
    )
    assert counts["denoise"] == "1 series" and counts["report"] == "1 page"
