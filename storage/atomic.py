"""Writes that appear whole or not at all: the one place medflow writes a file atomically.

A reader (another process, a query, the next night) must never see half a file under its final
name, and a process killed mid-write must leave the previous version intact. Locally a file is
written beside its target under a hidden temporary name and renamed over it (``os.replace``,
atomic on POSIX); on an object store, where there is no rename, one PUT makes the object appear
whole. A failed write removes its temporary file.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from medflow.storage.layout import filesystem, is_local_url, local_path

__all__ = [
    "atomic_file",
    "atomic_path",
    "publish_dir",
    "save_atomic",
    "swap_dir",
    "write_atomic",
]


def _temporary_name(path: str) -> str:
    folder, _, name = path.rpartition("/")
    return f"{folder}/.tmp-{name}-{uuid.uuid4().hex[:8]}" if folder else f".tmp-{name}"


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike[str], mode: str = "wb", newline: str | None = None
) -> Iterator[IO[Any]]:
    """A file to write, opened on a temporary name; on a clean exit it becomes ``path``.

    ``mode``: ``"wb"`` or ``"w"`` (text, UTF-8, ``newline`` as for :func:`open`). ``path`` is a local path or an fsspec URL. The
    folder is created when missing. On an exception nothing changes at ``path``.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"Expected mode 'wb' or 'w', got {mode!r}.")
    target = os.fspath(path)
    encoding = "utf-8" if mode == "w" else None
    if not is_local_url(target):
        fs, remote = filesystem(target)
        if mode == "w":
            text = io.StringIO()
            yield text
            fs.pipe_file(remote, text.getvalue().encode("utf-8"))
        else:
            raw = io.BytesIO()
            yield raw
            fs.pipe_file(remote, raw.getvalue())
        return
    target = local_path(target)
    folder = os.path.dirname(target) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = _temporary_name(target)
    try:
        with open(tmp, mode, encoding=encoding, newline=newline if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """A temporary local path beside ``path`` for a writer that takes a path (DuckDB, a
    library's ``save(path)``); on a clean exit it is renamed to ``path``, on an exception it and
    its side files (``<tmp>.wal``) are removed."""
    target = local_path(os.fspath(path))
    if not is_local_url(os.fspath(path)):
        raise ValueError(f"Expected a local path, got an object store URL {os.fspath(path)!r}.")
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    tmp = _temporary_name(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        for leftover in (tmp, f"{tmp}.wal"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
        raise


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically."""
    with atomic_file(path, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)


def save_atomic(path: str | os.PathLike[str], save: Callable[[IO[bytes]], None]) -> None:
    """Call ``save(file)`` (``torch.save``, ``pq.write_table``, ...) to write ``path`` atomically."""
    with atomic_file(path, "wb") as f:
        save(f)


def swap_dir(staging: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Put the fully written local folder ``staging`` at ``final``, replacing what is there:
    the old folder is renamed aside first, so ``final`` always holds one complete version."""
    src, dst = os.fspath(staging), os.fspath(final)
    if os.path.exists(dst):
        old = f"{src}.old"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def publish_dir(staging: str | os.PathLike[str], final: str | os.PathLike[str]) -> bool:
    """Move a fully written local folder ``staging`` to ``final`` in one rename.

    Returns False, and removes ``staging``, when ``final`` already exists (content-addressed
    folders: the same content is already there).
    """
    src, dst = Path(staging), Path(final)
    if dst.exists():
        shutil.rmtree(src, ignore_errors=True)
        return False
    os.replace(src, dst)
    return True
