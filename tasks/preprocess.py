"""Preprocess: denoise low-dose CT from its raw projections before the encoders see it.

A series is denoised when it has raw projections (a ``sinogram`` outcome, see
``storage/sinograms.py``) and is low-dose by the configured rule: the projections' explicit
``low_dose`` flag when present, else CTDIvol (from the projections or the reconstructed series)
at or below ``ctdivol_max_mGy``. The result is a derived image ``images/<key>.denoised.zarr``
with its provenance (method, parameters, seed) in its attributes and in a catalog row
(``stage = 'preprocess'``, ``status = 'denoised'``); the encode stage then uses it in place of the
noisy reconstruction. Sinogram flicking needs raw projections: an image without them is refused.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from prefect import task

from medflow.reasons import ReasonCode, clip_text, shielded
from medflow.storage.images import DecodedImage, ImageMeta, open_image, write_image
from medflow.storage.layout import OutputRoot
from medflow.storage.queries import denoised_with, raw_projections, sinogram_sources
from medflow.storage.sinograms import read_sinogram
from medflow.storage.tables import connect, utcnow
from medflow.tasks.options import task_options

__all__ = [
    "FLICKING_REVISION",
    "GUARD_REVISION",
    "DenoiseConfig",
    "DenoiseItem",
    "NoRawProjectionsError",
    "denoise_batch",
    "denoise_series",
    "is_low_dose",
    "pending_denoise",
    "require_raw_projections",
]


FLICKING_REVISION = 5
"""Bumped when flicking's defaults change what it computes, so that its outputs are redone."""

GUARD_REVISION = 2
"""Bumped when the no-worse-than-FBP guard changes what a denoiser returns (2: the blend with FBP
it chooses per slice), so that the outputs of every denoiser are redone."""

_NETWORK_SETTINGS = ("channels", "depth", "patch_size", "domain")  # flicking's, None: default


class NoRawProjectionsError(ValueError):
    """A series asked to be denoised by flicking has no raw projection data."""


@dataclass(frozen=True, slots=True)
class DenoiseConfig:
    """How the stage runs: method and its settings, and the low-dose rule."""

    enabled: bool = True
    method: str = "flicking"  # flicking | zsn2n | fbp
    steps: int | None = None  # training steps (None: the method's default)
    n_average: int | None = None  # flicked inferences averaged (None: default)
    channels: int | None = None  # flicking network width (None: default)
    depth: int | None = None  # flicking network's 3x3 convolutions (None: default)
    patch_size: int | None = None  # flicking training patch (None: default)
    domain: str | None = None  # flicking network's domain: image | sinogram (None: default)
    seed: int = 0
    ctdivol_max_mGy: float = 5.0
    series_per_task: int = 1
    device: str | None = None  # None: cuda when present

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> DenoiseConfig:
        if d is None:
            return cls()
        known = set(cls.__dataclass_fields__)
        if unknown := set(d) - known:
            raise ValueError(
                f"Unknown denoise setting(s) {sorted(unknown)}; expected {sorted(known)}."
            )
        cfg = cls(**dict(d))
        cfg.flicking_settings()  # a bad network setting is an error here, before any work
        return cfg

    def flicking_settings(self) -> Any:
        """Flicking's settings when ``channels``, ``depth``, ``patch_size`` or ``domain`` change
        its defaults, else None (the method's defaults, with ``steps`` and ``n_average`` applied by
        the caller)."""
        changes = {k: getattr(self, k) for k in _NETWORK_SETTINGS if getattr(self, k) is not None}
        if self.method != "flicking" or not changes:
            return None
        from medflow.denoise import FlickingSettings

        return FlickingSettings(**changes)

    def params_hash(self) -> str:
        keep = {k: v for k, v in asdict(self).items() if k not in ("enabled", "series_per_task")}
        keep.pop("device")
        keep.pop("ctdivol_max_mGy")
        for name in _NETWORK_SETTINGS:  # newer settings: unset, the hash is as before
            if keep[name] is None:
                keep.pop(name)
        if self.method == "flicking":
            # Bumped when the defaults change what flicking computes (2: four convolutions of
            # 32 maps; 3: the network trained on half-turn images; 4: its inference over eight
            # orientations; 5: five convolutions on the half-turn images): older outputs are stale.
            keep["flicking_revision"] = FLICKING_REVISION
        if self.method != "fbp":
            keep["guard_revision"] = GUARD_REVISION
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class DenoiseItem:
    series_key: str
    study_key: str
    sinogram_path: str  # relative to the root
    image_path: str | None  # the reconstructed series, when ingested
    source_fingerprint: str


def is_low_dose(
    sino_attrs: Mapping[str, Any], image_attrs: Mapping[str, Any], cfg: DenoiseConfig
) -> bool:
    """The low-dose rule: an explicit flag wins; else CTDIvol at or below the threshold."""
    if "low_dose" in sino_attrs:
        return bool(sino_attrs["low_dose"])
    for attrs in (sino_attrs, image_attrs):
        for key in ("ctdivol_mGy", "ctdivol_mgy"):
            value = attrs.get(key)
            if value is not None:
                return float(value) <= cfg.ctdivol_max_mGy
    return False


def pending_denoise(root: OutputRoot, cfg: DenoiseConfig) -> list[DenoiseItem]:
    """Low-dose series with raw projections and no denoised image at these settings yet."""
    con = connect(root)
    rows = sinogram_sources(con)
    done = denoised_with(con, cfg.params_hash())
    out = []
    for key, study, sino_path, sino_attrs, fp, image_path, image_attrs in rows:
        if (key, fp) in done:
            continue
        if not is_low_dose(json.loads(sino_attrs or "{}"), json.loads(image_attrs or "{}"), cfg):
            continue
        out.append(DenoiseItem(key, study, sino_path, image_path, fp))
    return out


def require_raw_projections(root: OutputRoot, series_key: str) -> str:
    """The stored sinogram of ``series_key``, or a clear refusal when it has none."""
    path = raw_projections(connect(root), series_key)
    if path is None:
        raise NoRawProjectionsError(
            f"series {series_key} has no raw projection data (sinogram): sinogram flicking "
            "denoises raw projections only; a reconstructed image re-projected has identical "
            "conjugate rays and cannot be denoised this way. Add its projections as a "
            ".sino.zarr source (see storage/sinograms.py)."
        )
    return path


def _derived_meta(
    root: OutputRoot, item: DenoiseItem, shape: tuple[int, ...], sino_attrs: Mapping[str, Any]
) -> ImageMeta:
    """Geometry of the denoised stack: the reconstructed series' when the grids agree."""
    if item.image_path is not None:
        base = open_image(root.join(item.image_path))
        if tuple(base.levels[0].shape) == shape and base.meta.axes == ("z", "y", "x"):
            return ImageMeta(
                modality="CT",
                source_kind="denoised",
                axes=base.meta.axes,
                spacing=base.meta.spacing,
                origin=base.meta.origin,
                affine=base.meta.affine,
                attrs=dict(base.meta.attrs),
            )
    geometry = sino_attrs["geometry"]
    px = float(geometry["pixel_spacing_mm"])
    dz = float(sino_attrs["slice_spacing_mm"])
    return ImageMeta(
        modality="CT",
        source_kind="denoised",
        axes=("z", "y", "x"),
        spacing=(dz, px, px),
        origin=(0.0, 0.0, 0.0),
        affine=tuple(tuple(float(v) for v in r) for r in np.diag([px, px, dz, 1.0])),
        attrs={"geometry": "reconstruction grid only"},
    )


def denoise_series(
    root: OutputRoot, item: DenoiseItem, cfg: DenoiseConfig, run_id: str
) -> dict[str, Any]:
    """Denoise one series from its projections; returns its catalog row (never raises)."""
    from medflow.denoise import WATER_MU_PER_MM, ParallelBeamGeometry, denoise_sinogram
    from medflow.tasks.ingest import medflow_version

    t0 = time.perf_counter()
    row: dict[str, Any] = {
        "series_key": item.series_key,
        "study_key": item.study_key,
        "stage": "preprocess",
        "modality": "CT",
        "source_kind": "sinogram",
        "source_fingerprint": item.source_fingerprint,
        "medflow_version": medflow_version(),
        "run_id": run_id,
    }
    try:
        sino = read_sinogram(root.join(item.sinogram_path))
        geometry = ParallelBeamGeometry.from_dict(sino.geometry)
        result = denoise_sinogram(
            sino.data,
            geometry,
            method=cfg.method,
            seed=cfg.seed,
            steps=cfg.steps,
            n_average=cfg.n_average,
            device=cfg.device,
            settings=cfg.flicking_settings(),
        )
        water = float(sino.attrs.get("mu_water_per_mm", WATER_MU_PER_MM))
        hu = np.rint(result.to_hu(water)).clip(-32768, 32767).astype(np.int16)
        meta = _derived_meta(root, item, hu.shape, sino.public_attrs())
        provenance = {
            "method": result.method,
            "params": json.loads(json.dumps(result.params, default=str)),
            "seed": cfg.seed,
            "slice_methods": list(result.slice_methods),
            "params_hash": cfg.params_hash(),
        }
        stored = write_image(
            DecodedImage(meta, pixels=hu),
            root.image_path(item.series_key, derived="denoised"),
            name=f"{item.series_key} denoised",
            medflow_attrs={"series_key": item.series_key, "denoise": provenance},
        )
        row.update(
            status="denoised",
            axes="zyx",
            shape=list(stored.shape),
            dtype=stored.dtype,
            spacing=list(meta.spacing),
            zarr_path=root.image_relpath(item.series_key, derived="denoised"),
            nbytes_stored=stored.nbytes_stored,
            attrs_json=json.dumps(
                {
                    "method": result.method,
                    "seed": cfg.seed,
                    "params_hash": cfg.params_hash(),
                    "fallback_slices": sum(m != result.method for m in result.slice_methods),
                },
                sort_keys=True,
            ),
        )
    except Exception as e:  # a scan that cannot be denoised keeps its noisy reconstruction
        # the images read live under the output root, not the archive: the message names no
        # source file, and says what was refused (a geometry, a size)
        row.update(
            status="refused" if isinstance(e, ValueError) else "failed",
            reason_code=ReasonCode.DENOISE_ERROR.value,
            reason=clip_text(f"{type(e).__name__}: {e}"),
            attrs_json=json.dumps({"params_hash": cfg.params_hash()}),
        )
    row["seconds"] = time.perf_counter() - t0
    row["created_at"] = utcnow()
    return row


@task(**task_options("denoise-batch", retries=1, retry_delays_s=(10,)))
@shielded("denoise-batch")
def denoise_batch(
    root: str, items: list[DenoiseItem], cfg: DenoiseConfig, run_id: str
) -> list[dict[str, Any]]:
    """Denoise a batch of low-dose series from their raw projections.

    The device work holds a slot of the device's concurrency limit (see tasks.device_slots).
    """
    from medflow.tasks.device_slots import device_slot

    out = OutputRoot(root)
    with device_slot(cfg.device):
        return [denoise_series(out, item, cfg, run_id) for item in items]
