"""The denoising stage in the nightly flow: raw projections ingested beside their DICOM series,
low-dose series denoised into a derived image that the encoders then use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from medflow.demo.dicom import ct_phantom, write_ct_series
from medflow.denoise import ParallelBeamGeometry, hu_to_mu, simulate_low_dose
from medflow.flows.cli import demo_encoder_specs
from medflow.flows.nightly import nightly
from medflow.storage.images import open_image
from medflow.storage.layout import OutputRoot
from medflow.storage.sinograms import Sinogram, write_sinogram
from medflow.storage.tables import connect
from medflow.tasks.preprocess import (
    DenoiseConfig,
    DenoiseItem,
    NoRawProjectionsError,
    denoise_series,
    require_raw_projections,
)

pytestmark = pytest.mark.usefixtures("prefect_api")

SIZE = 33
FAST = {"steps": 30, "n_average": 2}


def _scan(archive: Path, name: str, *, ctdivol: float, noisy: bool = True, link: bool = True):
    study, series = generate_uid(), generate_uid()
    hu = ct_phantom((3, SIZE, SIZE), seed=1)
    write_ct_series(
        archive / name,
        hu,
        spacing=(5.0, 8.0, 8.0),
        ctdivol=ctdivol,
        study_uid=study,
        series_uid=series,
    )
    geometry = ParallelBeamGeometry.for_image(SIZE, 8.0, n_views=60)
    mu = hu_to_mu(hu.astype(np.float32))
    scan = simulate_low_dose(mu, geometry, incident_photons=2e3, seed=3)
    data = scan.noisy_sinogram if noisy else scan.clean_sinogram
    sino = Sinogram(
        data=data,
        geometry=geometry.to_dict(),
        slice_spacing_mm=5.0,
        attrs={"ctdivol_mGy": ctdivol},
        link=(study, series) if link else None,
    )
    write_sinogram(str(archive / f"{name}.sino.zarr"), sino, include_link=link)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    base = tmp_path_factory.mktemp("pre")
    archive = base / "archive"
    _scan(archive, "lowdose", ctdivol=1.5)
    _scan(archive, "fulldose", ctdivol=12.0)
    _scan(archive, "reprojected", ctdivol=1.0, noisy=False)
    specs = [s for s in demo_encoder_specs(base / "models") if s["label"] == "merlin"]
    root = base / "out"
    summary = nightly(archive=str(archive), root=str(root), encoders=specs, denoise=FAST)
    return root, summary


def test_sinograms_join_their_series(run: tuple[Path, dict]) -> None:
    root, _ = run
    con = connect(OutputRoot(str(root)))
    joined = con.execute(
        "SELECT count(*) FROM outcomes s JOIN catalog c USING (series_key) "
        "WHERE s.stage = 'sinogram' AND s.status = 'ingested' AND c.status = 'ingested'"
    ).fetchone()
    assert joined == (3,)


def test_low_dose_series_denoised_and_used_by_encoders(run: tuple[Path, dict]) -> None:
    root, summary = run
    assert summary["denoised"] == {"denoised": 1, "refused": 1}
    con = connect(OutputRoot(str(root)))
    key, path, attrs = con.execute(
        "SELECT series_key, zarr_path, attrs_json FROM outcomes "
        "WHERE stage = 'preprocess' AND status = 'denoised'"
    ).fetchone()
    assert json.loads(attrs)["method"] == "flicking"
    img = open_image(str(root / path))
    assert img.levels[0].shape == (3, SIZE, SIZE)
    provenance = img.attrs["medflow"]["denoise"]
    assert provenance["seed"] == 0 and provenance["params"]["method"] == "flicking"
    original = con.execute("SELECT zarr_path FROM catalog WHERE series_key = ?", [key]).fetchone()
    np.testing.assert_allclose(
        img.meta.affine_array, open_image(str(root / original[0])).meta.affine_array
    )
    kinds = dict(con.execute("SELECT series_key, image_kind FROM embeddings").fetchall())
    assert kinds[key] == "denoised"
    assert sorted(kinds.values()) == ["denoised", "original", "original"]


def test_reprojected_image_is_refused_with_reason(run: tuple[Path, dict]) -> None:
    root, _ = run
    con = connect(OutputRoot(str(root)))
    (error,) = con.execute(
        "SELECT error FROM outcomes WHERE stage = 'preprocess' AND status = 'refused'"
    ).fetchone()
    assert "NotRawProjectionsError" in error and "raw projections" in error


def test_series_without_projections_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NoRawProjectionsError, match="no raw projection data"):
        require_raw_projections(OutputRoot(str(tmp_path)), "abc")


def test_denoising_is_deterministic_for_a_seed(run: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = run
    out = OutputRoot(str(root))
    con = connect(out)
    key, study, sino, fp = con.execute(
        "SELECT s.series_key, s.study_key, s.zarr_path, s.source_fingerprint FROM outcomes s "
        "JOIN outcomes p USING (series_key) "
        "WHERE s.stage = 'sinogram' AND p.stage = 'preprocess' AND p.status = 'denoised'"
    ).fetchone()
    item = DenoiseItem(key, study, sino, None, fp)
    cfg = DenoiseConfig.from_dict(FAST)
    first = denoise_series(out, item, cfg, "a")
    a = open_image(str(root / first["zarr_path"])).read(0)
    second = denoise_series(out, item, cfg, "b")
    b = open_image(str(root / second["zarr_path"])).read(0)
    np.testing.assert_array_equal(a, b)


def test_flicking_network_settings_are_checked_and_change_the_hash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import medflow.tasks.preprocess as preprocess

    with pytest.raises(ValueError, match="depth >= 2"):
        DenoiseConfig.from_dict({"depth": 1})
    shallow = DenoiseConfig.from_dict({"depth": 2, "channels": 48})
    settings = shallow.flicking_settings()
    assert (settings.depth, settings.channels) == (2, 48)
    assert DenoiseConfig().flicking_settings() is None  # the defaults
    with pytest.raises(ValueError, match=r"Expected domain in \('image', 'sinogram'\)"):
        DenoiseConfig.from_dict({"domain": "fourier"})
    on_sinogram = DenoiseConfig.from_dict({"domain": "sinogram"})
    assert on_sinogram.flicking_settings().domain == "sinogram"
    assert on_sinogram.params_hash() != DenoiseConfig().params_hash()
    assert shallow.params_hash() != DenoiseConfig().params_hash()
    # A new revision of flicking's defaults makes what the old one denoised stale; the other
    # methods keep their hashes.
    flicking, zsn2n = DenoiseConfig(), DenoiseConfig(method="zsn2n")
    before = flicking.params_hash(), zsn2n.params_hash()
    monkeypatch.setattr(preprocess, "FLICKING_REVISION", preprocess.FLICKING_REVISION + 1)
    assert flicking.params_hash() != before[0]
    assert zsn2n.params_hash() == before[1]
    # A new revision of the guard makes every denoiser's outputs stale, not plain FBP's.
    fbp_only = DenoiseConfig(method="fbp")
    before = flicking.params_hash(), zsn2n.params_hash(), fbp_only.params_hash()
    monkeypatch.setattr(preprocess, "GUARD_REVISION", preprocess.GUARD_REVISION + 1)
    after = flicking.params_hash(), zsn2n.params_hash(), fbp_only.params_hash()
    assert after[0] != before[0] and after[1] != before[1]
    assert after[2] == before[2]
