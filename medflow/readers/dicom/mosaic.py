"""Siemens mosaics: one frame holding a whole volume's slices as tiles.

A Siemens EPI (ImageType containing ``MOSAIC``) stores its N slices as tiles of an ``m x m``
grid (``m = ceil(sqrt(N))``), row by row, in one frame; N is NumberOfImagesInMosaic from the
CSA image header (read with nibabel.nicom), else from Siemens' private element (0019,xx0A).
Each tile becomes a plane of its own:

* its in-plane size is the frame's divided by ``m``;
* ImagePositionPatient gives the corner of the whole mosaic: the first slice's corner lies half
  the difference between the mosaic and the tile size further along the row and column
  directions;
* slice k lies k slice spacings (SpacingBetweenSlices, else SliceThickness) further along the
  CSA SliceNormalVector (which says which way the slices were stored; without it the normal of
  the row and column directions).

Each mosaic file is then one volume; the files of one series are its volumes, ordered like any
other volumes (see :mod:`medflow.readers.dicom.assembly`).
"""

from __future__ import annotations

import math

import numpy as np

from medflow.readers.dicom.facts import classic_facts
from medflow.readers.dicom.geometry import Plane, geometry_of, rescale_of, spacing_of
from medflow.readers.dicom.series import Instance
from medflow.readers.dicom.values import float_or_none, text_of, value_of
from medflow.reasons import ReasonCode, SourceError

__all__ = ["is_mosaic", "mosaic_planes"]


def is_mosaic(inst: Instance) -> bool:
    """A single-frame Siemens object whose ImageType says MOSAIC."""
    if inst.frames != 1 or "SIEMENS" not in (text_of(inst.ds, "Manufacturer") or "").upper():
        return False
    image_type = value_of(inst.ds, "ImageType") or ()
    words = [image_type] if isinstance(image_type, str) else list(image_type)
    return any(str(w).strip().upper() == "MOSAIC" for w in words)


def _csa(inst: Instance) -> tuple[int | None, np.ndarray | None]:
    from nibabel.nicom import csareader

    try:
        header = csareader.get_csa_header(inst.ds, "image")
        if not header:
            return None, None
        n = csareader.get_n_mosaic(header)
        normal = csareader.get_slice_normal(header)
    except Exception:  # a damaged private header: said below, by what it lacks
        return None, None
    n_tiles = int(n) if n is not None else None
    return n_tiles, (np.asarray(normal, dtype=np.float64) if normal is not None else None)


def _private_count(inst: Instance) -> int | None:
    """NumberOfImagesInMosaic from Siemens' private element (0019,xx0A), where the CSA header
    lacks it."""
    try:
        value = inst.ds.private_block(0x0019, "SIEMENS MR HEADER")[0x0A].value
        return int(value[0] if isinstance(value, list | tuple) else value)
    except (KeyError, ValueError, TypeError, AttributeError, IndexError):
        return None


def mosaic_planes(inst: Instance, index: int) -> list[Plane]:
    """The slices of a mosaic object as planes, each with its tile of the frame."""
    ds, path = inst.ds, inst.path
    n, normal = _csa(inst)
    if n is None:
        n = _private_count(inst)
    if n is None or n < 1:
        raise SourceError(
            path,
            "a Siemens mosaic without NumberOfImagesInMosaic in its CSA image header: its "
            "slices cannot be cut out",
            code=ReasonCode.INVALID_HEADER,
        )
    rows = int(value_of(ds, "Rows") or 0)
    columns = int(value_of(ds, "Columns") or 0)
    grid = math.ceil(math.sqrt(n))
    if rows % grid or columns % grid or rows == 0:
        raise SourceError(
            path,
            f"a mosaic of {rows}x{columns} pixels cannot hold {n} tiles on a {grid}x{grid} grid",
            code=ReasonCode.INVALID_PIXEL_MODULE,
        )
    tile_rows, tile_columns = rows // grid, columns // grid
    position, orientation = geometry_of(
        value_of(ds, "ImagePositionPatient"), value_of(ds, "ImageOrientationPatient"), path
    )
    if position is None or orientation is None:
        raise SourceError(
            path,
            "a Siemens mosaic without ImagePositionPatient/ImageOrientationPatient",
            code=ReasonCode.INVALID_GEOMETRY,
        )
    spacing, source = spacing_of(ds, path)
    pixel = spacing or (1.0, 1.0)
    row_dir, col_dir = orientation[:3], orientation[3:]
    corner = (
        position
        + row_dir * pixel[1] * (columns - tile_columns) / 2.0
        + col_dir * pixel[0] * (rows - tile_rows) / 2.0
    )
    cross = np.cross(row_dir, col_dir)
    if normal is None or not np.all(np.isfinite(normal)) or np.linalg.norm(normal) < 0.5:
        normal = cross
    normal = normal / np.linalg.norm(normal)
    step = 0.0
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = float_or_none(value_of(ds, keyword))
        if value is not None and value > 0:
            step = value
            break
    if step <= 0:
        step = 1.0
    slope, intercept = rescale_of(ds, path) or (1.0, 0.0)
    facts = classic_facts(ds, csa=True)
    return [
        Plane(
            path,
            index,
            0,
            corner + normal * step * k,
            orientation,
            spacing,
            source,
            slope,
            intercept,
            tile=((k // grid) * tile_rows, (k % grid) * tile_columns, tile_rows, tile_columns),
            facts=facts,
        )
        for k in range(n)
    ]
