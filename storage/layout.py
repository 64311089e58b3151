"""Every path under an output root, and the pseudonymous keys that name what lives there.

```
<root>/images/<series_key>.zarr                                  OME-Zarr 0.5 images
<root>/tables/catalog/part-*.parquet                             one row per series and outcome
<root>/tables/embeddings/encoder=<name>/version=<v>/part-*.parquet
<root>/tables/findings/encoder=<name>/version=<v>/part-*.parquet
<root>/restricted/sources/part-*.parquet                         source paths (restricted)
<root>/restricted/incidents/part-*.parquet                       unexpected errors' full text
<root>/restricted/dicomweb/part-*.parquet                        DICOMweb series facts handled
<root>/restricted/sr_sent/part-*.parquet                         Structured Reports sent
<root>/restricted/key_secret                                     HMAC secret, when not in env
<root>/models/                                                   registered encoder versions
```

The root is a local folder or any fsspec URL (``s3://bucket/prefix``). Keys are HMAC-SHA256
pseudonyms: a DICOM series is keyed by its Study/Series Instance UIDs, any other source by its
path relative to the archive root. The secret comes from ``MEDFLOW_KEY_SECRET`` when set, else
from ``<root>/restricted/key_secret``, created on first use, so keys stay stable for a root.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from typing import Any

import fsspec

__all__ = [
    "KEY_SECRET_ENV",
    "OutputRoot",
    "Pseudonymizer",
    "filesystem",
    "is_local_url",
    "is_object_store",
    "local_path",
    "parse_root",
    "storage_options",
]

KEY_SECRET_ENV = "MEDFLOW_KEY_SECRET"
_KEY_HEX = 24  # 96 bits: collisions are negligible even for 10^9 series
TABLES = ("catalog", "embeddings", "findings", "text_embeddings", "runs")

# Object stores: one PUT makes an object appear whole (there is no rename), and several
# processes (Dask workers, the flow) write under one prefix, so a listing cached by one of them
# goes stale. medflow lists parts and images often and must see the others' writes: listings are
# not cached unless the user's fsspec configuration says otherwise (fsspec's global
# configuration is read, never changed).
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az"})


def storage_options(url: str) -> dict[str, Any]:
    """The fsspec options medflow opens ``url`` with: no listings cache on object stores."""
    if not is_object_store(url):
        return {}
    protocol = url.split("://", 1)[0].lower()
    if "use_listings_cache" in fsspec.config.conf.get(protocol, {}):
        return {}
    return {"use_listings_cache": False}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding ``url`` and the path within it, opened with :func:`storage_options`."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
    return fs, path


def is_local_url(url: str) -> bool:
    """Whether ``url`` is a local path (plain, or a ``file://`` URL)."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """The plain path of a local ``url`` (``file://`` dropped)."""
    return url[len("file://") :] if url.startswith("file://") else url


def is_object_store(url: str) -> bool:
    """Whether ``url`` lives on an object store (``s3://``, ``gs://``, ``az://`` ...)."""
    return "://" in url and url.split("://", 1)[0].lower() in OBJECT_STORES


def parse_root(root: str | os.PathLike[str]) -> str:
    """Normalise an output root: absolute local path, or an fsspec URL without a trailing /."""
    s = os.fspath(root)
    if not s:
        raise ValueError("Expected an output root (a folder or fsspec URL), got '' instead.")
    if "://" in s and not s.startswith("file://"):
        return s.rstrip("/")
    if s.startswith("file://"):
        s = s[len("file://") :]
    return os.path.abspath(os.path.expanduser(s))


@dataclass(frozen=True, slots=True)
class OutputRoot:
    """The one place that builds paths under an output root."""

    url: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", parse_root(self.url))

    @property
    def is_local(self) -> bool:
        return "://" not in self.url

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        fs, _ = filesystem(self.url)
        return fs

    def join(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    def relpath(self, path: str | os.PathLike[str]) -> str:
        """``path`` (under the root) relative to the root, with ``/`` separators."""
        p = os.fspath(path)
        if not p.startswith(self.url + "/"):
            raise ValueError(f"Expected a path under the output root, got {p!r}.")
        return p[len(self.url) + 1 :]

    def image_path(self, series_key: str, *, derived: str | None = None) -> str:
        name = series_key if derived is None else f"{series_key}.{derived}"
        return self.join("images", f"{name}.zarr")

    def image_relpath(self, series_key: str, *, derived: str | None = None) -> str:
        name = series_key if derived is None else f"{series_key}.{derived}"
        return f"images/{name}.zarr"

    def table_dir(self, table: str, **partitions: str) -> str:
        if table not in TABLES:
            raise ValueError(f"Expected a table in {TABLES}, got {table!r} instead.")
        return self.join("tables", table, *(f"{k}={v}" for k, v in partitions.items()))

    def sources_dir(self) -> str:
        return self.join("restricted", "sources")

    def dicomweb_dir(self) -> str:
        return self.join("restricted", "dicomweb")

    def sr_sent_dir(self) -> str:
        return self.join("restricted", "sr_sent")

    def incidents_dir(self) -> str:
        return self.join("restricted", "incidents")

    def models_dir(self) -> str:
        return self.join("models")

    def model_dir(self, family: str, version: str | None = None) -> str:
        """``<root>/models/<family>`` (trained models of one family), or one version's folder."""
        base = f"{self.models_dir()}/{family}"
        return base if version is None else f"{base}/{version}"

    def training_run_dir(self, family: str, run: str) -> str:
        """A training run's checkpoints and loss curve: ``<root>/models/<family>/runs/<run>``."""
        return f"{self.model_dir(family)}/runs/{run}"

    def trash_dir(self, batch: str | None = None) -> str:
        """Where prune moves what it drops (one rename), until it is deleted: ``<root>/.pruned``
        (``batch``: one prune's own folder in it)."""
        return self.join(".pruned") if batch is None else self.join(".pruned", batch)

    def image_staging_dir(self) -> str:
        """Where image groups are written before they are renamed into ``images/``."""
        return self.join("images", ".staging")

    def known_versions_path(self) -> str:
        """The encoder versions remembered by their inputs (so a night need not load a model)."""
        return f"{self.models_dir()}/.known_versions.json"

    def reports_dir(self) -> str:
        return self.join("reports")

    def report_path(self, name: str) -> str:
        """A run report page: ``<root>/reports/<name>``."""
        return f"{self.reports_dir()}/{name}"

    def dicomweb_cache_dir(self, server_id: str) -> str:
        """Instances retrieved from one DICOMweb server, until they are ingested (restricted)."""
        return self.join("restricted", "dicomweb-cache", server_id)

    def secret_path(self) -> str:
        return self.join("restricted", "key_secret")

    def ensure(self) -> None:
        """Create the folders a run writes into (no-op on object stores)."""
        if self.is_local:
            for sub in ("images", "tables", "restricted", "models"):
                os.makedirs(self.join(sub), exist_ok=True)
            os.chmod(self.join("restricted"), 0o700)

    def pseudonymizer(self) -> Pseudonymizer:
        return Pseudonymizer(self._secret())

    def _secret(self) -> bytes:
        env = os.environ.get(KEY_SECRET_ENV)
        if env:
            return env.encode()
        fs = self.fs
        path = self.secret_path()
        if fs.exists(path):
            with fs.open(path, "rb") as f:
                data: bytes = f.read().strip()
            if not data:
                raise ValueError(
                    f"{path}: the key secret file is empty; restore it or set {KEY_SECRET_ENV}."
                )
            return data
        fs.makedirs(self.join("restricted"), exist_ok=True)
        data = secrets.token_hex(32).encode()
        with fs.open(path, "wb") as f:
            f.write(data)
        if self.is_local:
            os.chmod(path, 0o600)
        return data


@dataclass(frozen=True, slots=True)
class Pseudonymizer:
    """Keyed hashes (HMAC-SHA256) turning identifiers into stable pseudonyms."""

    secret: bytes

    def _key(self, *parts: Any) -> str:
        msg = "\x1f".join(str(p) for p in parts).encode()
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()[:_KEY_HEX]

    def dicom_series_key(self, study_uid: str, series_uid: str) -> str:
        return self._key("dicom-series", study_uid, series_uid)

    def dicom_study_key(self, study_uid: str) -> str:
        return self._key("dicom-study", study_uid)

    def file_series_key(self, relpath: str) -> str:
        return self._key("file", relpath)

    def folder_study_key(self, relpath: str) -> str:
        parent = relpath.rsplit("/", 1)[0] if "/" in relpath else ""
        return self._key("folder", parent)

    def source_key(self, relpath: str) -> str:
        return self._key("source", relpath)
