"""Volume and 4D assembly: a series' planes split into parts, each part's planes into volumes.

Parts. A series may mix planes that do not belong in one image; they are split as dcm2niix
splits them, each part its own image with a stable suffix on its key:

* another SeriesNumber within one SeriesInstanceUID: ``_s<number>``;
* another echo (EchoNumbers, else the echo time): ``_e<k>``, echoes counted in the order they
  first appear in the files;
* another complex component (ImageType value 3 or ComplexImageComponent): nothing for
  magnitude, ``_ph`` for phase, ``_real``, ``_imaginary``;
* another image type otherwise (e.g. a field map): ``_`` and the words only that part has;
* another orientation (more than about 10 degrees apart) or Stack ID: ``_o<k>``, in order of
  first appearance.

A CT localizer (ImageType LOCALIZER, or a few planes in an orientation of their own beside the
volume) is left out of the image with reason code ``localizer_left_out`` rather than failing
the series.

Volumes. The planes of a part are grouped by position along the slice normal; when every
position holds the same number T > 1 of planes, they are T volumes: at each position, planes are
ordered by temporal position, acquisition number, trigger time, acquisition time, instance
number and diffusion facts (the acquisition order), and the t-th plane of each position belongs
to volume t. Planes at one position that none of these tell apart are not volumes of one series
(``multiple_stacks``); positions holding different numbers of planes are incomplete volumes
(``missing_slices``).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from medflow.readers.dicom.geometry import (
    SLICE_TOLERANCE_MM,
    SLICE_TOLERANCE_REL,
    Plane,
    placement,
)
from medflow.reasons import ReasonCode, SourceError

__all__ = ["LeftOut", "Part", "split_parts", "volumes_of"]

_COMPONENT_SUFFIX = {"magnitude": "", "phase": "_ph", "real": "_real", "imaginary": "_imaginary"}
_LOCALIZER_MAX_PLANES = 3  # an orientation of its own with at most this many planes, in CT
_PLANE_SPLIT = 0.17  # largest direction cosine difference within one group: sin(10 degrees)


@dataclass(frozen=True, slots=True)
class Part:
    """Planes of a series that make one image: its key suffix and its defining facts."""

    suffix: str
    facts: dict[str, Any]
    planes: list[Plane]


@dataclass(frozen=True, slots=True)
class LeftOut:
    """Planes left out of a series' images, with the reason (files named by path, restricted)."""

    paths: tuple[str, ...]
    code: ReasonCode
    reason: str


def _orientation_groups(planes: list[Plane]) -> list[int]:
    """An orientation group per plane, numbered in order of first appearance (-1 without an
    orientation): planes of another Stack ID (enhanced objects), or whose direction cosines
    differ by more than :data:`_PLANE_SPLIT` (about 10 degrees: a scout, a localizer or another
    stack), are another group. Planes only a few degrees apart stay together, and fail as an
    inconsistent orientation when stacked."""
    reps: list[tuple[Any, np.ndarray]] = []
    out = []
    for p in planes:
        if p.orientation is None:
            out.append(-1)
            continue
        for k, (stack, r) in enumerate(reps):
            if stack == p.facts.stack_id and float(np.max(np.abs(p.orientation - r))) <= (
                _PLANE_SPLIT
            ):
                out.append(k)
                break
        else:
            reps.append((p.facts.stack_id, p.orientation))
            out.append(len(reps) - 1)
    return out


def _echo_key(p: Plane) -> Any:
    f = p.facts
    if f.echo_number is not None:
        return ("n", f.echo_number)
    return ("t", None if f.echo_time_ms is None else round(f.echo_time_ms, 3))


def split_parts(planes: list[Plane], modality: str) -> tuple[list[Part], list[LeftOut]]:
    """The parts of a series' planes (in order of first appearance), and what was left out."""
    orientation = _orientation_groups(planes)
    echoes: dict[Any, int] = {}
    keys = []
    for p, o in zip(planes, orientation, strict=True):
        echo = echoes.setdefault(_echo_key(p), len(echoes) + 1)
        f = p.facts
        keys.append((f.series_number, f.image_type, f.complex_component, echo, o))
    groups: dict[tuple[Any, ...], list[Plane]] = {}
    for key, p in zip(keys, planes, strict=True):
        groups.setdefault(key, []).append(p)
    left: list[LeftOut] = []
    if modality == "CT" and len(groups) > 1:
        biggest = max(len(g) for g in groups.values())
        for key in list(groups):
            g = groups[key]
            localizer = "LOCALIZER" in key[1] or (
                len(g) <= _LOCALIZER_MAX_PLANES
                and biggest > _LOCALIZER_MAX_PLANES
                and sum(k[4] == key[4] for k in groups) == 1
            )
            if localizer and len(groups) > 1:
                del groups[key]
                left.append(
                    LeftOut(
                        tuple(sorted({p.path for p in g})),
                        ReasonCode.LOCALIZER_LEFT_OUT,
                        f"a localizer ({len(g)} image(s) in an orientation or image type of its "
                        "own) inside the series: left out of its volume",
                    )
                )
    if len(groups) == 1:
        ((key, g),) = groups.items()
        return [Part("", _facts(key, g), g)], left
    varies = [len({k[i] for k in groups}) > 1 for i in range(5)]
    common = set.intersection(*(set(k[1]) for k in groups))
    parts = []
    for key, g in groups.items():
        suffix = ""
        if varies[0]:
            suffix += f"_s{key[0] if key[0] is not None else 'x'}"
        if varies[3]:
            suffix += f"_e{key[3]}"
        if varies[2]:
            suffix += _COMPONENT_SUFFIX.get(key[2] or "magnitude", f"_{key[2]}")
        if varies[1]:
            words = [_word(w) for w in key[1] if w not in common and len(w) > 1]
            if any(words):
                suffix += "_" + "_".join(w for w in words if w)
        if varies[4]:
            suffix += f"_o{key[4] + 1}"
        parts.append(Part(suffix, _facts(key, g), g))
    seen: dict[str, int] = {}
    out = []
    for part in parts:  # suffixes that still collide get a running number
        n = seen[part.suffix] = seen.get(part.suffix, 0) + 1
        out.append(part if n == 1 else Part(f"{part.suffix}_p{n}", part.facts, part.planes))
    return out, left


def _word(word: str) -> str:
    """An image type word as a key suffix may hold it: lower case letters, digits and ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", word.lower()).strip("_")


def _facts(key: tuple[Any, ...], planes: list[Plane]) -> dict[str, Any]:
    f = planes[0].facts
    facts: dict[str, Any] = {}
    if f.series_number is not None:
        facts["series_number"] = f.series_number
    if f.image_type:
        facts["image_type"] = list(f.image_type)
    if f.complex_component:
        facts["complex_component"] = f.complex_component
    if f.echo_number is not None:
        facts["echo_number"] = f.echo_number
    times = {p.facts.echo_time_ms for p in planes}
    if len(times) == 1 and f.echo_time_ms is not None:
        facts["echo_time_ms"] = f.echo_time_ms
    return facts


def volumes_of(planes: list[Plane]) -> list[list[Plane]]:
    """The planes of one part as volumes, each in position order along the slice normal."""
    if len(planes) == 1:
        return [planes]
    placed = [placement(p) for p in planes]
    ref = placed[0][1]
    normal = np.cross(ref[:3], ref[3:])
    where = np.array([float(pos @ normal) for pos, _ in placed])
    order = np.argsort(where, kind="stable")
    s = where[order]
    gaps = np.diff(s)
    steps = gaps[gaps > SLICE_TOLERANCE_MM]
    tol = (
        max(SLICE_TOLERANCE_MM, SLICE_TOLERANCE_REL * float(steps.min()))
        if steps.size
        else (SLICE_TOLERANCE_MM)
    )
    buckets: list[list[int]] = [[int(order[0])]]
    for k in range(1, len(order)):
        if gaps[k - 1] > tol:
            buckets.append([])
        buckets[-1].append(int(order[k]))
    counts = {len(b) for b in buckets}
    if counts == {1}:
        return [planes]
    if len(counts) > 1:
        few = min(buckets, key=len)
        raise SourceError(
            planes[few[0]].path,
            f"incomplete volumes: slice positions hold between {min(counts)} and {max(counts)} "
            f"images (the one at {float(where[few[0]]):.3f} mm along the slice normal holds "
            f"{len(few)})",
            code=ReasonCode.MISSING_SLICES,
        )
    for b in buckets:
        b.sort(key=lambda i: planes[i].facts.volume_key())
        for i, j in itertools.pairwise(b):
            if planes[i].facts.volume_key() == planes[j].facts.volume_key():
                same_file = planes[i].path == planes[j].path
                what = "two frames" if same_file else "two slices"
                also = (
                    f"as another frame (frame {planes[i].frame + 1})"
                    if same_file
                    else "as another file of the series"
                )
                raise SourceError(
                    planes[j].path,
                    f"{what} at the same position ({float(where[j]):.3f} mm along the slice "
                    f"normal, {also}): no temporal position, acquisition number or time, "
                    "instance number or diffusion fact tells them apart as volumes",
                    code=ReasonCode.MULTIPLE_STACKS,
                )
    n = len(buckets[0])
    return [[planes[b[t]] for b in buckets] for t in range(n)]
