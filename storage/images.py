"""OME-Zarr 0.5 (zarr v3) images: the decoded-image contract and its writer and reader.

Array order is C order over ``axes`` (a subset of ``t, c, z, y, x`` in that order, as OME-Zarr
requires). The affine maps a voxel index ``(x, y, z, 1)`` -- column, row, slice, i.e. the array
indices along the ``x``, ``y`` and ``z`` axes -- to RAS+ world coordinates in millimetres, the
same convention as NIfTI's ``sform``. Spacing is per axis: millimetres for ``z, y, x``, seconds
for ``t``, 1 for ``c``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from medflow.storage.atomic import swap_dir
from medflow.storage.layout import is_local_url, local_path, storage_options

__all__ = [
    "AXIS_ORDER",
    "DecodedImage",
    "ImageMeta",
    "OpenedImage",
    "Restart",
    "StoredImage",
    "open_image",
    "parse_axes",
    "publish_tree",
    "slab_rows",
    "write_image",
]

AXIS_ORDER = ("t", "c", "z", "y", "x")
_AXIS_TYPE = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
_AXIS_UNIT = {"t": "second", "z": "millimeter", "y": "millimeter", "x": "millimeter"}
MIN_LEVELS = 3
_SPATIAL = ("z", "y", "x")
_MAX_BLOCK = 4 << 20
_DOWNSAMPLE_BLOCK = (
    2 << 20
)  # input bytes per block of rows in _downsample  # the largest blosc block (bytes): bigger gains nothing on images


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


class Restart(Exception):
    """Raised by a streamed image's blocks when it must be written again from the start.

    A reader that fixes the sample type before seeing any pixel (int16 for rescaled CT) raises
    it when a value does not fit: the writer drops what it staged and writes ``restart()``.
    """

    def __init__(self, restart: Callable[[], DecodedImage], reason: str) -> None:
        super().__init__(reason)
        self.restart = restart


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


def slab_rows(axes: Sequence[str], shape: Sequence[int]) -> int:
    """How many rows along the first axis the writer takes at a time (one level-0 shard):
    a streamed image that yields slabs of this size is written without regrouping copies."""
    return _chunk_and_shard(tuple(axes), tuple(shape))[1][0]


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
        if len(factors) + 1 >= MIN_LEVELS and (big <= 512 or all(x == 1 for x in f)):
            break
        if len(factors) + 1 >= 8:
            break
        factors.append(tuple(f))
        shp = [math.ceil(n / k) for n, k in zip(shp, f, strict=True)]
        sp = [s * k for s, k in zip(sp, f, strict=True)]
    return factors


def _downsample(a: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Block mean by factors of 1 or 2, edge-padding odd sizes; integers are rounded back.

    A large array is done a few rows (along its first axis) at a time, into one output: the
    temporaries stay small enough to be reused from the heap rather than mapped afresh.
    """
    rows = max(1, _DOWNSAMPLE_BLOCK // max(1, a[:1].nbytes))
    if a.shape[0] <= rows or any(f not in (1, 2) for f in factors):
        return _downsample_block(a, factors)
    rows += rows % factors[0]  # whole pairs along the first axis in every block
    shape = tuple(math.ceil(n / f) for n, f in zip(a.shape, factors, strict=True))
    out = np.empty(shape, dtype=a.dtype)
    for i in range(0, a.shape[0], rows):
        j = i // factors[0]
        part = _downsample_block(a[i : i + rows], factors)
        out[j : j + part.shape[0]] = part
    return out


def _downsample_block(a: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """:func:`_downsample` of one block.

    Sums pairs of strided views in a wider type instead of reshaping to a float copy: no
    temporary larger than half the input.
    """
    if all(f == 1 for f in factors):
        return a
    if any(f not in (1, 2) for f in factors):
        raise ValueError(f"Expected downsampling factors of 1 or 2, got {factors} instead.")
    pad = [(0, (-n) % f) for n, f in zip(a.shape, factors, strict=True)]
    if any(p[1] for p in pad):
        a = np.pad(a, pad, mode="edge")
    integer = np.issubdtype(a.dtype, np.integer)
    # the narrowest accumulator that holds a sum of 8: bytes in 16 bits, shorts in 32
    acc_type: Any = np.float64
    if integer:
        signed = np.issubdtype(a.dtype, np.signedinteger)
        if a.dtype.itemsize == 1:
            acc_type = np.int16 if signed else np.uint16
        elif a.dtype.itemsize == 2:
            acc_type = np.int32
        else:
            acc_type = np.int64
    # pairwise sums axis by axis, outermost first: the first pass reads whole rows and every
    # pass halves the data, so the strided inner-axis pass runs on the smallest array
    acc: np.ndarray | None = None
    for axis, f in enumerate(factors):
        if f == 1:
            continue
        src = a if acc is None else acc
        lo = src[(slice(None),) * axis + (slice(0, None, 2),)]
        hi = src[(slice(None),) * axis + (slice(1, None, 2),)]
        if acc is None:
            acc = lo.astype(acc_type)
            np.add(acc, hi, out=acc, casting="unsafe")
        else:
            acc = np.add(lo, hi)
    assert acc is not None
    n = int(np.prod(factors))  # a power of two: 2, 4 or 8
    if integer:
        # the mean rounded half up; a mean of in-range values needs no clipping
        acc += n // 2
        np.right_shift(acc, n.bit_length() - 1, out=acc)
        return acc.astype(a.dtype)
    return (acc / n).astype(a.dtype)


def _level_layouts(
    axes: tuple[str, ...], shapes: list[tuple[int, ...]], cum0: list[int]
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Chunks and shards per level, the axis-0 shard shrinking with the axis-0 factor so that
    one slab of the level-0 shard maps onto exactly one shard row of every level."""
    chunks0, shards0 = _chunk_and_shard(axes, shapes[0])
    out = []
    for shape, c0 in zip(shapes, cum0, strict=True):
        chunks, shards = _chunk_and_shard(axes, shape)
        s0 = max(1, shards0[0] // c0)
        chunks[0] = max(1, min(chunks0[0], s0, shape[0]))
        shards[0] = s0 if s0 % chunks[0] == 0 else chunks[0]
        out.append((tuple(chunks), tuple(shards)))
    return out


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


def _compressor(dtype: np.dtype, chunk: Sequence[int]) -> BloscCodec:
    # bit-shuffle pays off for 16-bit and wider samples (CT, MR), over a whole chunk as one
    # block: noisy scans compress about 6% better than with blosc's default 256 KiB blocks, and
    # zstd's level 1 is then as good as level 3 at half the time. 8-bit pictures and video
    # frames compress as well and faster with a byte-level codec alone.
    if dtype.itemsize == 1:
        return BloscCodec(cname="zstd", clevel=1, shuffle="noshuffle")
    nbytes = int(np.prod(chunk)) * dtype.itemsize
    return BloscCodec(
        cname="zstd", clevel=1, shuffle="bitshuffle", blocksize=min(nbytes, _MAX_BLOCK)
    )


def _open_store(path: str, mode: str) -> Any:
    if is_local_url(path):
        return zarr.storage.LocalStore(local_path(path), read_only=(mode == "r"))
    return zarr.storage.FsspecStore.from_url(
        path, read_only=(mode == "r"), storage_options=storage_options(path) or None
    )


def _bound_zarr_threads() -> None:
    """One zarr codec thread per core (at most 8) unless the user configured zarr otherwise.

    zarr's default pool (asyncio's: cores + 4 threads) compresses no faster on few cores, and
    every thread that compresses a chunk keeps a heap of its own that glibc seldom returns:
    on 2 cores the default pool held 400 MiB writing a 150 MiB CT, two threads 280 MiB.
    """
    if zarr.config.get("threading.max_workers") is None:
        zarr.config.set({"threading.max_workers": max(1, min(8, os.cpu_count() or 1))})


_bound_zarr_threads()


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
    for attempt in (1, 2):
        staging = _staging_path(path)
        try:
            stored = _write_group(image, staging, name=name, medflow_attrs=medflow_attrs or {})
            _publish(staging, path)
            break
        except Restart as r:
            _remove(staging)
            if attempt == 2:
                raise ValueError(f"A restarted image asked to restart again: {r}") from None
            image = r.restart()
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
    cum0 = [1]
    for f in factors:
        cum0.append(cum0[-1] * f[0])
    layouts = _level_layouts(meta.axes, shapes, cum0)

    store = _open_store(path, "w")
    group = zarr.open_group(store=store, mode="w", zarr_format=3)
    arrays = [
        group.create_array(
            name=str(i),
            shape=shp,
            dtype=dtype,
            chunks=chunks,
            shards=shards,
            compressors=_compressor(dtype, chunks),
            dimension_names=list(meta.axes),
            fill_value=0,
            # every chunk is written once with real data: skip zarr's per-chunk emptiness scan
            config={"write_empty_chunks": True},
        )
        for i, (shp, (chunks, shards)) in enumerate(zip(shapes, layouts, strict=True))
    ]

    slab0 = layouts[0][1][0]
    if image.pixels is not None:
        pixels = image.pixels
        slabs: Iterator[np.ndarray] = (
            pixels[i : i + slab0] for i in range(0, pixels.shape[0], slab0)
        )
        streamed = False
    else:
        assert image.blocks is not None
        slabs = _rebatch(image.blocks, slab0)
        streamed = True
    # slab by slab along axis 0: every shard is written once, by one writer, and memory stays
    # bounded by a few slabs; the writer thread downsamples and compresses a slab while this
    # thread reads or decodes the next one
    offsets = [0] * len(arrays)
    pending: deque[Future[None]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="zarr-write") as pool:
        for slab in slabs:
            n0 = slab.shape[0]
            ranges = []
            for i in range(len(arrays)):
                start = offsets[i]
                end = start + math.ceil(n0 / cum0[i])
                ranges.append((start, end))
                offsets[i] = end
            if streamed and any(
                e > arr.shape[0] for (_, e), arr in zip(ranges, arrays, strict=True)
            ):
                for p in pending:
                    p.result()
                pending.clear()
                for (_, e), arr in zip(ranges, arrays, strict=True):
                    if e > arr.shape[0]:
                        arr.resize((max(e, 2 * arr.shape[0]), *arr.shape[1:]))
            pending.append(pool.submit(_write_levels, arrays, factors, ranges, slab))
            while len(pending) > 1:
                pending.popleft().result()
        for p in pending:
            p.result()
    n = offsets[0]
    if n == 0:
        raise ValueError("The image has no frames.")
    if streamed:  # the frame count was a hint: trim every level to what arrived
        for arr, size in zip(arrays, offsets, strict=True):
            arr.resize((size, *arr.shape[1:]))
    final_shape = (n, *shape0[1:])

    attrs: dict[str, Any] = {"ome": _ome_attrs(meta, scales, name)}
    attrs["medflow"] = {**meta.to_dict(), **dict(medflow_attrs), "shape": list(final_shape)}
    group.attrs.update(json.loads(json.dumps(attrs)))
    return final_shape, len(arrays)


def _write_levels(
    arrays: Sequence[Any],
    factors: Sequence[tuple[int, ...]],
    ranges: Sequence[tuple[int, int]],
    slab: np.ndarray,
) -> None:
    """Write one level-0 slab and its downsampled copies at their rows of every level."""
    for i, (arr, (start, end)) in enumerate(zip(arrays, ranges, strict=True)):
        if i:
            slab = _downsample(slab, factors[i - 1])
        arr[start:end] = slab


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
    if is_local_url(path):
        swap_dir(local_path(staging), local_path(path))
        return
    publish_tree(staging, path)


def publish_tree(staging: str, path: str) -> None:
    """Move a complete zarr group from ``staging`` to ``path`` on a URL filesystem.

    Object stores have no rename and no directory: the group is copied object by object (a
    server-side copy), its root ``zarr.json`` last, and the old group at ``path`` loses its root
    ``zarr.json`` first. A group without that object does not open, so a reader sees the old
    image, no image, or the new one, never a mix; a run that dies in between leaves no image at
    ``path`` and no catalog row for the new one, and the next run writes it again.
    """
    import fsspec

    fs, _, (src_p, dst_p) = fsspec.get_fs_token_paths([staging, path])
    src_p, dst_p = src_p.rstrip("/"), dst_p.rstrip("/")
    marker = "zarr.json"
    files = sorted(f for f in fs.find(src_p) if f.startswith(f"{src_p}/"))
    rel = [f[len(src_p) + 1 :] for f in files]
    if marker not in rel:
        raise ValueError(f"{staging}: no root {marker}; not a complete zarr group to publish.")
    old = fs.find(dst_p)
    if f"{dst_p}/{marker}" in old:
        fs.rm_file(f"{dst_p}/{marker}")
    if stale := [f for f in old if f != f"{dst_p}/{marker}"]:
        fs.rm(stale)
    body = [r for r in rel if r != marker]
    if body:
        fs.copy([f"{src_p}/{r}" for r in body], [f"{dst_p}/{r}" for r in body])
    fs.copy(f"{src_p}/{marker}", f"{dst_p}/{marker}")
    fs.rm(files)


def _remove(path: str) -> None:
    if is_local_url(path):
        shutil.rmtree(local_path(path), ignore_errors=True)
        return
    import fsspec

    fs, _, (p,) = fsspec.get_fs_token_paths([path])
    if fs.exists(p):
        fs.rm(p, recursive=True)


def _tree_size(path: str) -> int:
    if is_local_url(path):
        total = 0
        for dirpath, _, files in os.walk(local_path(path)):
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

    def level_scales(self) -> list[list[float]]:
        """Each level's voxel size along its axes (OME-Zarr ``scale``), level 0 first."""
        datasets = self.attrs["ome"]["multiscales"][0]["datasets"]
        out = []
        for d in datasets:
            scale = next(t["scale"] for t in d["coordinateTransformations"] if t["type"] == "scale")
            out.append([float(v) for v in scale])
        return out

    def level_meta(self, level: int) -> ImageMeta:
        """The metadata of pyramid level ``level``: its spacing, origin and affine.

        A level-``level`` voxel is the block mean of ``f`` level-0 voxels along each axis, so
        its centre lies ``(f - 1) / 2`` level-0 voxels further: the affine is level 0's times
        that scaling and shift (in voxel index order x, y, z).
        """
        if level == 0:
            return self.meta
        scales = self.level_scales()
        if not 0 <= level < len(scales):
            raise ValueError(f"Expected a level in 0..{len(scales) - 1}, got {level} instead.")
        meta = self.meta
        factors = {a: s / s0 for a, s, s0 in zip(meta.axes, scales[level], scales[0], strict=True)}
        step = np.eye(4)
        for col, axis in enumerate(("x", "y", "z")):
            f = factors.get(axis, 1.0)
            step[col, col] = f
            step[col, 3] = (f - 1.0) / 2.0
        affine = meta.affine_array @ step
        origin = tuple(
            o + (factors[a] - 1.0) * s0 / 2.0 if a in _SPATIAL else o
            for a, o, s0 in zip(meta.axes, meta.origin, meta.spacing, strict=True)
        )
        return dataclasses.replace(
            meta,
            spacing=tuple(scales[level]),
            origin=origin,
            affine=tuple(tuple(float(v) for v in row) for row in affine),
        )

    def coarsest_level_within(self, ras_spacing: Sequence[float]) -> int:
        """The coarsest level that no axis makes coarser than needed for ``ras_spacing``.

        ``ras_spacing``: the voxel size (mm along R, A, S) a consumer resamples to. Each image
        axis is matched to the RAS direction it runs closest to (through the affine); a level
        qualifies when along every spatial axis its voxel is no larger than that target, or
        than level 0's voxel where level 0 is already coarser.
        """
        target = [float(v) for v in ras_spacing]
        if len(target) != 3 or not all(v > 0 for v in target):
            raise ValueError(f"Expected 3 positive RAS spacings, got {list(ras_spacing)}.")
        meta = self.meta
        direction = np.abs(meta.affine_array[:3, :3])
        limit = {}
        for col, axis in enumerate(("x", "y", "z")):
            if axis in meta.axes:
                limit[axis] = target[int(np.argmax(direction[:, col]))]
        scales = self.level_scales()
        best = 0
        for level, scale in enumerate(scales):
            ok = all(
                s <= max(limit[a], s0) + 1e-6
                for a, s, s0 in zip(meta.axes, scale, scales[0], strict=True)
                if a in limit
            )
            if ok:
                best = level
        return best


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
