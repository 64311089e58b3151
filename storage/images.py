"""OME-Zarr 0.5 (zarr v3) images: the decoded-image contract and its writer and reader.

Array order is C order over ``axes`` (a subset of ``t, c, z, y, x`` in that order, as OME-Zarr
requires). The affine maps a voxel index ``(x, y, z, 1)`` -- column, row, slice, i.e. the array
indices along the ``x``, ``y`` and ``z`` axes -- to RAS+ world coordinates in millimetres, the
same convention as NIfTI's ``sform``. Spacing is per axis: millimetres for ``z, y, x``, seconds
for ``t``, 1 for ``c``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

__all__ = [
    "AXIS_ORDER",
    "DecodedImage",
    "ImageMeta",
    "OpenedImage",
    "StoredImage",
    "open_image",
    "parse_axes",
    "write_image",
]

AXIS_ORDER = ("t", "c", "z", "y", "x")
_AXIS_TYPE = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
_AXIS_UNIT = {"t": "second", "z": "millimeter", "y": "millimeter", "x": "millimeter"}
MIN_LEVELS = 3
_SPATIAL = ("z", "y", "x")


def parse_axes(axes: Iterable[str]) -> tuple[str, ...]:
    """Validate axis names: a subset of t, c, z, y, x, in that order, with 2 or 3 space axes."""
    out = tuple(axes)
    if any(a not in AXIS_ORDER for a in out) or len(set(out)) != len(out):
        raise ValueError(f"Expected axes drawn once each from {AXIS_ORDER}, got {out} instead.")
    if list(out) != [a for a in AXIS_ORDER if a in out]:
        raise ValueError(f"Expected axes in the order t, c, z, y, x, got {out} instead.")
    n_space = sum(a in _SPATIAL for a in out)
    if n_space not in (2, 3) or "y" not in out or "x" not in out:
        raise ValueError(f"Expected y, x and optionally z as space axes, got {out} instead.")
    return out


def _parse_affine(affine: Any) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"Expected a finite 4x4 affine, got shape {a.shape} instead.")
    return a


@dataclass(frozen=True, slots=True)
class ImageMeta:
    """What a reader knows about one decoded series, without its pixels and without identifiers."""

    modality: str
    source_kind: str
    axes: tuple[str, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    affine: tuple[tuple[float, ...], ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        axes = parse_axes(self.axes)
        object.__setattr__(self, "axes", axes)
        if len(self.spacing) != len(axes) or len(self.origin) != len(axes):
            raise ValueError(
                f"Expected one spacing and one origin per axis {axes}, got spacing "
                f"{self.spacing} and origin {self.origin} instead."
            )
        for name, s in zip(axes, self.spacing, strict=True):
            if not (math.isfinite(s) and s > 0):
                raise ValueError(f"Expected spacing > 0 on axis {name!r}, got {s} instead.")
        aff = _parse_affine(self.affine)
        object.__setattr__(self, "affine", tuple(tuple(float(v) for v in row) for row in aff))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))

    @property
    def affine_array(self) -> np.ndarray:
        return np.array(self.affine, dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "modality": self.modality,
            "source_kind": self.source_kind,
            "axes": list(self.axes),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "affine": [list(r) for r in self.affine],
            "attrs": dict(self.attrs),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageMeta:
        return cls(
            modality=d["modality"],
            source_kind=d["source_kind"],
            axes=tuple(d["axes"]),
            spacing=tuple(d["spacing"]),
            origin=tuple(d["origin"]),
            affine=tuple(tuple(r) for r in d["affine"]),
            attrs=dict(d.get("attrs", {})),
        )


@dataclass(slots=True)
class DecodedImage:
    """A decoded series: its metadata and its pixels, whole or as slabs along the first axis.

    ``blocks`` yields consecutive slabs along axis 0 (used for video, which is never whole in
    memory); ``shape`` then gives the other axes and ``shape[0]`` is a hint that may be wrong.
    """

    meta: ImageMeta
    pixels: np.ndarray | None = None
    blocks: Iterator[np.ndarray] | None = None
    shape: tuple[int, ...] | None = None
    dtype: np.dtype | None = None

    def __post_init__(self) -> None:
        if (self.pixels is None) == (self.blocks is None):
            raise ValueError("Expected exactly one of pixels or blocks.")
        if self.pixels is not None:
            if self.pixels.ndim != len(self.meta.axes):
                raise ValueError(
                    f"Expected a {len(self.meta.axes)}-d array for axes {self.meta.axes}, "
                    f"got shape {self.pixels.shape} instead."
                )
            self.shape = tuple(self.pixels.shape)
            self.dtype = self.pixels.dtype
        elif self.shape is None or self.dtype is None:
            raise ValueError("A streamed image needs its shape and dtype up front.")


@dataclass(frozen=True, slots=True)
class StoredImage:
    """Where and what an image was written as (small: it travels between tasks)."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    n_levels: int
    nbytes_stored: int


# ---------------------------------------------------------------------------------------------
# chunking and pyramid


def _chunk_and_shard(axes: tuple[str, ...], shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
    chunks: list[int] = []
    shards: list[int] = []
    for ax, n in zip(axes, shape, strict=True):
        n = max(int(n), 1)
        if ax == "c":
            c, s = n, n
        elif ax == "t":
            c, s = min(n, 4), min(n, 4) * 4
        elif ax == "z":
            c = min(n, 16)
            s = c * min(4, math.ceil(n / c))
        else:  # y, x
            c = min(n, 256)
            s = c * min(4, math.ceil(n / c))
        chunks.append(c)
        shards.append(s)
    return chunks, shards


def _pyramid_factors(
    axes: tuple[str, ...], shape: tuple[int, ...], spacing: tuple[float, ...]
) -> list[tuple[int, ...]]:
    """Per-level downsampling factors relative to the previous level (first entry: level 1)."""
    factors: list[tuple[int, ...]] = []
    shp = list(shape)
    sp = list(spacing)
    while True:
        inplane = [sp[i] for i, a in enumerate(axes) if a in ("y", "x")]
        f = []
        for i, a in enumerate(axes):
            if a in ("y", "x"):
                f.append(2 if shp[i] > 1 else 1)
            elif a == "z":
                # keep z when it is already much coarser than the in-plane spacing
                f.append(2 if shp[i] > 1 and sp[i] < 2 * min(inplane) else 1)
            else:
                f.append(1)
        big = max(shp[i] for i, a in enumerate(axes) if a in ("y", "x"))
        if len(factors) + 1 >= MIN_LEVELS and (big <= 256 or all(x == 1 for x in f)):
            break
        if len(factors) + 1 >= 8:
            break
        factors.append(tuple(f))
        shp = [math.ceil(n / k) for n, k in zip(shp, f, strict=True)]
        sp = [s * k for s, k in zip(sp, f, strict=True)]
    return factors


def _downsample(a: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Block mean by integer factors, edge-padding odd sizes; integer types are rounded back."""
    if all(f == 1 for f in factors):
        return a
    pad = [(0, (-n) % f) for n, f in zip(a.shape, factors, strict=True)]
    if any(p[1] for p in pad):
        a = np.pad(a, pad, mode="edge")
    new_shape: list[int] = []
    for n, f in zip(a.shape, factors, strict=True):
        new_shape.extend([n // f, f])
    red = tuple(range(1, 2 * a.ndim, 2))
    m = a.reshape(new_shape).mean(axis=red, dtype=np.float32)
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        return np.clip(np.rint(m), info.min, info.max).astype(a.dtype)
    return m.astype(a.dtype)


def _downsample_slabwise(a: np.ndarray, factors: tuple[int, ...], slab: int = 32) -> np.ndarray:
    """Downsample in slabs along axis 0 to bound float temporaries to a few slabs."""
    f0 = factors[0]
    step = max(f0, slab - slab % f0)
    out = [_downsample(a[i : i + step], factors) for i in range(0, a.shape[0], step)]
    return np.concatenate(out, axis=0)


def _ome_attrs(meta: ImageMeta, level_scales: list[list[float]], name: str) -> dict[str, Any]:
    axes = [
        {"name": a, "type": _AXIS_TYPE[a], **({"unit": _AXIS_UNIT[a]} if a in _AXIS_UNIT else {})}
        for a in meta.axes
    ]
    datasets = [
        {
            "path": str(i),
            "coordinateTransformations": [
                {"type": "scale", "scale": scale},
                {"type": "translation", "translation": _level_translation(meta, scale)},
            ],
        }
        for i, scale in enumerate(level_scales)
    ]
    return {"version": "0.5", "multiscales": [{"name": name, "axes": axes, "datasets": datasets}]}


def _level_translation(meta: ImageMeta, scale: list[float]) -> list[float]:
    # a block-mean voxel's centre sits half a (coarse - fine) voxel further along each axis
    return [
        o + (s - s0) / 2.0 if a in _SPATIAL else o
        for a, o, s, s0 in zip(meta.axes, meta.origin, scale, meta.spacing, strict=True)
    ]


# ---------------------------------------------------------------------------------------------
# writing


def _compressor() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def _open_store(path: str, mode: str) -> Any:
    if _is_local(path):
        return zarr.storage.LocalStore(_local(path), read_only=(mode == "r"))
    return zarr.storage.FsspecStore.from_url(path, read_only=(mode == "r"))


def write_image(
    image: DecodedImage,
    path: str,
    *,
    name: str,
    medflow_attrs: Mapping[str, Any] | None = None,
) -> StoredImage:
    """Write ``image`` as an OME-Zarr 0.5 multiscale group at ``path``, all or nothing.

    The group is written under a staging name beside ``path`` and moved into place only once
    complete, so a crash never leaves a half-written image at ``path``.
    """
    assert image.shape is not None and image.dtype is not None  # set by DecodedImage
    staging = _staging_path(path)
    try:
        stored = _write_group(image, staging, name=name, medflow_attrs=medflow_attrs or {})
        _publish(staging, path)
    except BaseException:
        _remove(staging)
        raise
    return StoredImage(
        path=path,
        shape=stored[0],
        dtype=str(np.dtype(image.dtype)),
        n_levels=stored[1],
        nbytes_stored=_tree_size(path),
    )


def _staging_path(path: str) -> str:
    head, tail = path.rstrip("/").rsplit("/", 1)
    return f"{head}/.staging/{tail}.{uuid.uuid4().hex[:12]}"


def _write_group(
    image: DecodedImage, path: str, *, name: str, medflow_attrs: Mapping[str, Any]
) -> tuple[tuple[int, ...], int]:
    meta = image.meta
    shape0 = tuple(int(n) for n in image.shape or ())
    dtype = np.dtype(image.dtype)
    factors = _pyramid_factors(meta.axes, shape0, meta.spacing)
    shapes = [shape0]
    for f in factors:
        shapes.append(tuple(math.ceil(n / k) for n, k in zip(shapes[-1], f, strict=True)))
    scales = [list(meta.spacing)]
    for f in factors:
        scales.append([s * k for s, k in zip(scales[-1], f, strict=True)])

    store = _open_store(path, "w")
    group = zarr.open_group(store=store, mode="w", zarr_format=3)
    arrays = []
    for i, shp in enumerate(shapes):
        chunks, shards = _chunk_and_shard(meta.axes, shp)
        arrays.append(
            group.create_array(
                name=str(i),
                shape=shp,
                dtype=dtype,
                chunks=tuple(chunks),
                shards=tuple(shards),
                compressors=_compressor(),
                dimension_names=list(meta.axes),
                fill_value=0,
            )
        )

    if image.pixels is not None:
        level = image.pixels
        arrays[0][...] = level
        for i, f in enumerate(factors, start=1):
            level = _downsample_slabwise(level, f)
            arrays[i][...] = level
        final_shape = shape0
    else:
        # streamed along axis 0, which is never downsampled (time): slab-aligned to shards
        if any(f[0] != 1 for f in factors):
            raise ValueError("Streamed images must not be downsampled along their first axis.")
        assert image.blocks is not None
        _, shards0 = _chunk_and_shard(meta.axes, shape0)
        n = 0
        for slab in _rebatch(image.blocks, shards0[0]):
            end = n + slab.shape[0]
            for i, arr in enumerate(arrays):
                if end > arr.shape[0]:
                    arr.resize((max(end, 2 * arr.shape[0]), *arr.shape[1:]))
                arr[n:end] = slab
                if i + 1 < len(arrays):
                    slab = _downsample(slab, factors[i])
            n = end
        if n == 0:
            raise ValueError("The image has no frames.")
        for arr in arrays:
            arr.resize((n, *arr.shape[1:]))
        final_shape = (n, *shape0[1:])

    attrs: dict[str, Any] = {"ome": _ome_attrs(meta, scales, name)}
    attrs["medflow"] = {**meta.to_dict(), **dict(medflow_attrs), "shape": list(final_shape)}
    group.attrs.update(json.loads(json.dumps(attrs)))
    return final_shape, len(arrays)


def _rebatch(blocks: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Regroup slabs of any length into slabs of exactly ``size`` along axis 0 (last: rest)."""
    pending: list[np.ndarray] = []
    count = 0
    for b in blocks:
        pending.append(b)
        count += b.shape[0]
        while count >= size:
            whole = np.concatenate(pending, axis=0) if len(pending) > 1 else pending[0]
            yield whole[:size]
            rest = whole[size:]
            pending = [rest] if rest.shape[0] else []
            count = rest.shape[0]
    if count:
        yield np.concatenate(pending, axis=0) if len(pending) > 1 else pending[0]


def _publish(staging: str, path: str) -> None:
    if _is_local(path):
        src, dst = _local(staging), _local(path)
        if os.path.exists(dst):
            # move the old one aside first so the swap leaves one complete image at dst
            old = f"{src}.old"
            os.replace(dst, old)
            os.replace(src, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(src, dst)
        return
    import fsspec

    fs, _, (src_p, dst_p) = fsspec.get_fs_token_paths([staging, path])
    if fs.exists(dst_p):
        fs.rm(dst_p, recursive=True)
    fs.mv(src_p, dst_p, recursive=True)


def _remove(path: str) -> None:
    if _is_local(path):
        shutil.rmtree(_local(path), ignore_errors=True)
        return
    import fsspec

    fs, _, (p,) = fsspec.get_fs_token_paths([path])
    if fs.exists(p):
        fs.rm(p, recursive=True)


def _tree_size(path: str) -> int:
    if _is_local(path):
        total = 0
        for dirpath, _, files in os.walk(_local(path)):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
        return total
    import fsspec

    fs, _, (p,) = fsspec.get_fs_token_paths([path])
    return int(fs.du(p))


# ---------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True, slots=True)
class OpenedImage:
    meta: ImageMeta
    levels: list[Any]
    attrs: dict[str, Any]

    def read(self, level: int = 0) -> np.ndarray:
        return np.asarray(self.levels[level][...])


def open_image(path: str) -> OpenedImage:
    """Open a medflow OME-Zarr image group for reading."""
    group = zarr.open_group(store=_open_store(path, "r"), mode="r", zarr_format=3)
    attrs: dict[str, Any] = dict(group.attrs)
    if "medflow" not in attrs or "ome" not in attrs:
        raise ValueError(f"{path}: not a medflow OME-Zarr image (no 'medflow'/'ome' attributes).")
    meta = ImageMeta.from_dict(attrs["medflow"])
    n = len(attrs["ome"]["multiscales"][0]["datasets"])
    levels = [group[str(i)] for i in range(n)]
    return OpenedImage(meta=meta, levels=levels, attrs=attrs)
