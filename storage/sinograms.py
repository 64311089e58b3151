"""Raw CT projection data (sinograms): the documented layout, in the archive and under the root.

A sinogram source is a zarr v3 group named ``<name>.sino.zarr`` (or a NumPy ``<name>.sino.npz``
holding the same two things) with:

``sinogram``
    float32 array ``(slices, views, bins)``: line integrals ``-ln(I / I0)`` (dimensionless),
    one parallel-beam sinogram per axial slice.
attributes ``medflow_sinogram`` (in the npz: a JSON string array named ``meta``)
    ``geometry``: ``{"kind": "parallel", "n_views", "n_bins", "bin_spacing_mm", "image_size",
    "pixel_spacing_mm", "angular_range_deg" (360 for flicking), "start_angle_deg"}``;
    ``slice_spacing_mm``; optional ``study_instance_uid`` and ``series_instance_uid`` of the
    reconstructed series these projections belong to (they link the two; they are hashed into
    its series key and never stored); optional ``low_dose`` (bool), ``ctdivol_mGy``,
    ``incident_photons`` (I0 per ray) and ``mu_water_per_mm`` (to express the result in HU).

Under the output root the sinogram is stored as ``images/<series_key>.sino.zarr`` in the same
layout, without the UIDs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

__all__ = [
    "SINOGRAM_ATTR",
    "SINOGRAM_SUFFIXES",
    "Sinogram",
    "read_sinogram",
    "write_sinogram",
]

SINOGRAM_ATTR = "medflow_sinogram"
SINOGRAM_SUFFIXES = (".sino.zarr", ".sino.npz")
_LINK_KEYS = ("study_instance_uid", "series_instance_uid")


@dataclass(frozen=True, slots=True)
class Sinogram:
    """Projection data of one series: line integrals ``(slices, views, bins)`` and metadata."""

    data: np.ndarray
    geometry: Mapping[str, Any]
    slice_spacing_mm: float
    attrs: Mapping[str, Any] = field(default_factory=dict)  # low_dose, ctdivol_mGy, ...
    link: tuple[str, str] | None = None  # (study UID, series UID): in memory only

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise ValueError(
                f"Expected a sinogram (slices, views, bins), got shape {self.data.shape} instead."
            )
        n_views, n_bins = self.geometry.get("n_views"), self.geometry.get("n_bins")
        if self.data.shape[1:] != (n_views, n_bins):
            raise ValueError(
                f"Expected (views, bins) = ({n_views}, {n_bins}) from the geometry, got "
                f"{self.data.shape[1:]} instead."
            )
        if not (math.isfinite(self.slice_spacing_mm) and self.slice_spacing_mm > 0):
            raise ValueError(f"Expected slice_spacing_mm > 0, got {self.slice_spacing_mm}.")
        if not np.all(np.isfinite(self.data)):
            raise ValueError("Expected finite line integrals, got NaN or infinity.")

    def public_attrs(self) -> dict[str, Any]:
        """Everything but the linking UIDs, for storage under the output root."""
        return {
            "geometry": dict(self.geometry),
            "slice_spacing_mm": self.slice_spacing_mm,
            **{k: v for k, v in self.attrs.items() if k not in _LINK_KEYS},
        }


def _parse_meta(meta: Any) -> dict[str, Any]:
    if not isinstance(meta, Mapping):
        raise ValueError(f"expected '{SINOGRAM_ATTR}' attributes, found none.")
    for key in ("geometry", "slice_spacing_mm"):
        if key not in meta:
            raise ValueError(f"'{SINOGRAM_ATTR}' lacks {key!r}.")
    if not isinstance(meta["geometry"], Mapping):
        raise ValueError(
            f"expected 'geometry' as a mapping, got {type(meta['geometry']).__name__}."
        )
    return dict(meta)


def read_sinogram(path: str) -> Sinogram:
    """Read a ``.sino.zarr`` group or ``.sino.npz`` file; ValueError names what is wrong.

    The error's text never quotes the path (it may reach public tables): the caller knows which
    file it gave. When a library failed, the text names the exception's kind only; the
    exception itself (whose message may quote the path) is the error's ``__cause__``.
    """
    p = os.fspath(path).rstrip("/")
    try:
        if p.endswith(".npz"):
            with np.load(p, allow_pickle=False) as f:
                if "sinogram" not in f or "meta" not in f:
                    raise ValueError("expected arrays 'sinogram' and 'meta' in the npz.")
                data = np.asarray(f["sinogram"], dtype=np.float32)
                meta = _parse_meta(json.loads(str(f["meta"])))
        else:
            group = zarr.open_group(p, mode="r")
            meta = _parse_meta(group.attrs.get(SINOGRAM_ATTR))
            if "sinogram" not in group:
                raise ValueError("expected an array named 'sinogram' in the group.")
            arr = group["sinogram"]
            if not isinstance(arr, zarr.Array):
                raise ValueError("expected 'sinogram' to be an array, found a group.")
            data = np.asarray(arr[...], dtype=np.float32)
    except (OSError, json.JSONDecodeError, KeyError, zarr.errors.BaseZarrError) as e:
        raise ValueError(f"unreadable sinogram ({type(e).__name__}).") from e
    link = None
    if all(meta.get(k) for k in _LINK_KEYS):
        link = (str(meta[_LINK_KEYS[0]]), str(meta[_LINK_KEYS[1]]))
    attrs = {k: v for k, v in meta.items() if k not in ("geometry", "slice_spacing_mm")}
    try:
        return Sinogram(
            data=data,
            geometry=dict(meta["geometry"]),
            slice_spacing_mm=float(meta["slice_spacing_mm"]),
            attrs=attrs,
            link=link,
        )
    except ValueError as e:
        raise ValueError(f"invalid sinogram: {e}") from e


def write_sinogram(path: str, sino: Sinogram, *, include_link: bool = False) -> None:
    """Write ``sino`` as a ``.sino.zarr`` group (the UIDs only when ``include_link``)."""
    group = zarr.open_group(path, mode="w", zarr_format=3)
    n_slices, n_views, n_bins = sino.data.shape
    arr = group.create_array(
        name="sinogram",
        shape=sino.data.shape,
        dtype=np.float32,
        chunks=(1, n_views, n_bins),
        shards=(min(n_slices, 16), n_views, n_bins),
        compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
        dimension_names=["slice", "view", "bin"],
    )
    arr[...] = sino.data
    meta = sino.public_attrs()
    if include_link and sino.link is not None:
        meta.update(dict(zip(_LINK_KEYS, sino.link, strict=True)))
    group.attrs[SINOGRAM_ATTR] = json.loads(json.dumps(meta, default=float))
