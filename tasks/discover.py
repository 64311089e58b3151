"""Discover: list an archive's sources, fingerprint them, and diff them against what is known.

Works on a local folder or any fsspec URL through the same code. A file is unchanged when its
size and mtime match the last observation; when they differ, a cheap content hash (first and last
64 KiB plus size) decides, so a file that was only touched is not re-ingested.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
from prefect import task

from medflow.reasons import InputError, shielded
from medflow.storage.layout import OutputRoot
from medflow.storage.tables import SOURCES_SCHEMA, read_table
from medflow.tasks.options import task_options

__all__ = [
    "ArchiveFile",
    "Discovery",
    "classify_name",
    "content_hash",
    "diff_sources",
    "discover",
    "known_sources",
    "list_archive",
]

_HASH_SPAN = 64 * 1024
_NIFTI = (".nii", ".nii.gz")
_IMAGES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_VIDEOS = (".mp4", ".avi", ".mov", ".m4v")
_SINOGRAMS = (".sino.zarr", ".sino.npz")
# names that are never imaging data; everything else may be DICOM (often extension-less)
_NOT_IMAGING = (".txt", ".md", ".json", ".csv", ".xml", ".html", ".pdf", ".py", ".log")


@dataclass(frozen=True, slots=True)
class ArchiveFile:
    """One file in the archive as listed: path relative to the archive root, size, mtime."""

    relpath: str
    size: int
    mtime_ns: int

    @property
    def kind(self) -> str:
        return classify_name(self.relpath)


@dataclass(frozen=True, slots=True)
class KnownSource:
    relpath: str
    size: int
    mtime_ns: int
    content_hash: str
    kind: str
    series_key: str | None
    status: str
    error: str | None
    reason_code: str | None = None


@dataclass(slots=True)
class Discovery:
    """The diff of an archive against the restricted sources table."""

    new: list[ArchiveFile] = field(default_factory=list)
    changed: list[ArchiveFile] = field(default_factory=list)
    touched: list[tuple[ArchiveFile, str]] = field(default_factory=list)  # same content hash
    unchanged: int = 0
    missing: list[str] = field(default_factory=list)
    hashes: dict[str, str] = field(default_factory=dict)  # relpath -> content hash (new/changed)
    ignored: int = 0

    @property
    def pending(self) -> list[ArchiveFile]:
        return [*self.new, *self.changed]

    def counts(self) -> dict[str, int]:
        return {
            "new": len(self.new),
            "changed": len(self.changed),
            "touched": len(self.touched),
            "unchanged": self.unchanged,
            "missing": len(self.missing),
            "ignored": self.ignored,
        }


def classify_name(relpath: str) -> str:
    """The source kind a file name suggests: nifti, image, video, other, or dicom (by content)."""
    low = relpath.lower()
    if low.endswith(_SINOGRAMS):
        return "sinogram"
    if low.endswith(_NIFTI):
        return "nifti"
    if low.endswith(_IMAGES):
        return "image"
    if low.endswith(_VIDEOS):
        return "video"
    if low.endswith(_NOT_IMAGING):
        return "other"
    return "dicom"


def _url_join(base: str, rel: str) -> str:
    return f"{base.rstrip('/')}/{rel}"


def list_archive(archive: str) -> list[ArchiveFile]:
    """Every regular file under ``archive`` (hidden files and folders skipped), sorted."""
    if "://" not in archive and not os.path.isdir(archive):
        raise InputError(f"Expected an archive folder, got {archive!r}: no such folder.")
    if "://" not in archive:
        return _list_local(os.path.abspath(archive))
    fs, base = fsspec.core.url_to_fs(archive)
    out: list[ArchiveFile] = []
    for path, info in sorted(fs.find(base, detail=True).items()):
        rel = path[len(base.rstrip("/")) + 1 :]
        if any(p.startswith(".") for p in rel.split("/")):
            continue
        if ".sino.zarr/" in rel:  # a zarr group is one source: keep its zarr.json only
            head = rel.split(".sino.zarr/", 1)[0] + ".sino.zarr"
            if rel != f"{head}/zarr.json":
                continue
            rel = head
        mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
        out.append(ArchiveFile(rel, int(info.get("size") or 0), _mtime_ns(mtime)))
    return out


def _mtime_ns(value: Any) -> int:
    if value is None:
        return 0
    if hasattr(value, "timestamp"):
        return int(value.timestamp() * 1e9)
    return int(float(value) * 1e9)


def _list_local(base: str) -> list[ArchiveFile]:
    out: list[ArchiveFile] = []
    stack = [base]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir(follow_symlinks=False):
                    if e.name.endswith(".sino.zarr"):  # a zarr group is one source
                        st = e.stat()
                        out.append(ArchiveFile(os.path.relpath(e.path, base), 0, st.st_mtime_ns))
                    else:
                        stack.append(e.path)
                elif e.is_file():
                    st = e.stat()
                    rel = os.path.relpath(e.path, base).replace(os.sep, "/")
                    out.append(ArchiveFile(rel, st.st_size, st.st_mtime_ns))
    out.sort(key=lambda f: f.relpath)
    return out


def content_hash(archive: str, relpath: str, size: int) -> str:
    """sha256 over the first and last 64 KiB and the size: cheap, and catches rewrites."""
    h = hashlib.sha256(str(size).encode())
    path = _url_join(archive, relpath)
    if relpath.endswith(".sino.zarr"):  # a group: its metadata document stands for it
        path = f"{path}/zarr.json"
        size = 0
    with fsspec.open(path, "rb") as f:
        h.update(f.read(_HASH_SPAN))
        if size > 2 * _HASH_SPAN:
            f.seek(size - _HASH_SPAN)
            h.update(f.read(_HASH_SPAN))
        elif size > _HASH_SPAN:
            h.update(f.read())
    return h.hexdigest()[:32]


def known_sources(root: OutputRoot) -> dict[str, KnownSource]:
    """The newest observation of every source path, from the restricted sources table."""
    t = read_table(root.sources_dir(), SOURCES_SCHEMA)
    if t.num_rows == 0:
        return {}
    t = t.sort_by([("observed_at", "ascending"), ("run_id", "ascending")])
    cols = {name: t.column(name).to_pylist() for name in SOURCES_SCHEMA.names}
    out: dict[str, KnownSource] = {}
    for i, rel in enumerate(cols["relpath"]):
        out[rel] = KnownSource(
            relpath=rel,
            size=cols["size"][i],
            mtime_ns=cols["mtime_ns"][i],
            content_hash=cols["content_hash"][i],
            kind=cols["kind"][i],
            series_key=cols["series_key"][i],
            status=cols["status"][i],
            error=cols["error"][i],
            reason_code=cols["reason_code"][i],
        )
    return out


def diff_sources(
    archive: str, files: Iterable[ArchiveFile], known: Mapping[str, KnownSource]
) -> Discovery:
    """Split listed files into new / changed / touched / unchanged against ``known``."""
    d = Discovery()
    seen: set[str] = set()
    for f in files:
        seen.add(f.relpath)
        if f.kind == "other":
            d.ignored += 1
            continue
        k = known.get(f.relpath)
        if k is not None and k.size == f.size and k.mtime_ns == f.mtime_ns:
            d.unchanged += 1
            continue
        h = content_hash(archive, f.relpath, f.size)
        if k is None:
            d.new.append(f)
        elif k.content_hash == h and k.size == f.size:
            d.touched.append((f, h))
            continue
        else:
            d.changed.append(f)
        d.hashes[f.relpath] = h
    d.missing = sorted(set(known) - seen)
    return d


@task(**task_options("discover", retries=2, retry_delays_s=(2, 10)))
@shielded("discover")
def discover(archive: str, root: str) -> tuple[Discovery, dict[str, KnownSource]]:
    """List the archive and diff it against the sources already known under ``root``."""
    out = OutputRoot(root)
    known = known_sources(out)
    return diff_sources(archive, list_archive(archive), known), known
