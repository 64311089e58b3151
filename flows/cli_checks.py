"""Checks of the command line's arguments and configuration, before any work starts.

Every check here reads and never writes: it runs before an output root is created, a Prefect
server started or a model loaded, so a mistyped path or a broken config file costs a second and
one line on the console, not a server start, retries and a traceback. A failed check raises
:class:`ArgumentError`, whose text is one line naming the argument and what is wrong with it;
the command line prints it and exits with status 2 (:func:`cli_errors`).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import typer

from medflow.reasons import InputError

__all__ = [
    "ArgumentError",
    "check_archive",
    "check_encoder_config",
    "check_encoder_specs",
    "check_output_folder",
    "check_positive",
    "check_root",
    "cli_errors",
]

EXIT_USAGE = 2  # the exit status of a bad argument, as for any command line usage error


class ArgumentError(InputError):
    """An argument or configuration value of the command line is wrong (one line of text)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def debug_enabled() -> bool:
    """Whether ``--debug`` (or ``MEDFLOW_DEBUG=1``) asks for tracebacks."""
    return os.environ.get("MEDFLOW_DEBUG", "").strip().lower() in ("1", "true", "yes")


def fail(message: str, exc: BaseException | None = None) -> typer.Exit:
    """Print ``medflow: error: <message>`` (one line) and return the exit to raise; with
    ``--debug`` the traceback of ``exc`` comes first."""
    if exc is not None and debug_enabled():
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    print(f"medflow: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return typer.Exit(EXIT_USAGE)


def click_exceptions() -> Any:
    """The module of the command-line parser's exceptions (typer vendors click from 0.20)."""
    try:
        from typer._click import exceptions
    except ImportError:  # an older typer on click itself
        from click import exceptions  # type: ignore[no-redef]
    return exceptions


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn an :class:`ArgumentError` raised inside into one line and exit status 2."""
    try:
        yield
    except ArgumentError as e:
        raise fail(str(e), e) from None


# ---------------------------------------------------------------------------------------------
# paths


def _is_url(text: str) -> bool:
    return "://" in text


def _check_protocol(what: str, url: str) -> None:
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ArgumentError(f"{what} {url!r}: unknown protocol {protocol!r}.") from None
    except ImportError as e:
        hint = ' (pip install "medflow[s3]")' if protocol in ("s3", "s3a") else ""
        raise ArgumentError(
            f"{what} {url!r}: the {protocol}:// protocol needs a package that is not "
            f"installed{hint}: {e}"
        ) from None


def _exists(what: str, path: Path) -> bool:
    try:
        path.stat()
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        return False
    except PermissionError:
        raise ArgumentError(f"{what} {str(path)!r}: permission denied.") from None
    return True


def check_archive(archive: str) -> None:
    """The archive: an existing, readable local folder (or a URL of a known protocol)."""
    if not archive or not archive.strip():
        raise ArgumentError("archive: expected a folder or URL, got an empty value.")
    from medflow.pacs.dicomweb import DicomwebServer, is_dicomweb
    from medflow.reasons import InputError

    if is_dicomweb(archive):  # a PACS: the URL's form here; the server answers at the run
        try:
            DicomwebServer.parse(archive)
        except InputError as e:
            raise ArgumentError(f"archive: {e}") from None
        return
    if _is_url(archive):
        _check_protocol("archive", archive)
        return
    path = Path(archive).expanduser()
    if not _exists("archive", path):
        raise ArgumentError(f"archive {archive!r}: no such folder.")
    if not path.is_dir():
        raise ArgumentError(f"archive {archive!r} is a file, expected a folder.")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ArgumentError(f"archive {archive!r}: permission denied (cannot list it).")


def check_root(root: str, *, must_exist: bool = False) -> None:
    """The output root: a local folder it can read and write, or one it can create (nothing is
    created here); ``must_exist`` for commands that only read what a run wrote."""
    if not root or not root.strip():
        raise ArgumentError("--root: expected a folder or URL, got an empty value.")
    if _is_url(root):
        _check_protocol("--root", root)
        return
    path = Path(root).expanduser()
    if _exists("--root", path):
        if not path.is_dir():
            raise ArgumentError(f"--root {root!r} is a file, expected a folder.")
        mode = os.R_OK | os.X_OK if must_exist else os.R_OK | os.W_OK | os.X_OK
        if not os.access(path, mode):
            need = "read" if must_exist else "read and write"
            raise ArgumentError(f"--root {root!r}: permission denied (cannot {need} it).")
        return
    if must_exist:
        raise ArgumentError(f"--root {root!r}: no such folder (no run has written there yet).")
    check_output_folder("--root", root)


def check_output_folder(what: str, folder: str | os.PathLike[str]) -> None:
    """A folder that may be created: it is one already, or its nearest existing parent is a
    folder this process can write into."""
    path = Path(folder).expanduser().absolute()
    if _exists(what, path):
        if not path.is_dir():
            raise ArgumentError(f"{what} {os.fspath(folder)!r} is a file, expected a folder.")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ArgumentError(f"{what} {os.fspath(folder)!r}: permission denied (read-only).")
        return
    parent = path.parent
    while not _exists(what, parent):
        parent = parent.parent
    if not parent.is_dir():
        raise ArgumentError(
            f"{what} {os.fspath(folder)!r}: cannot be created, {str(parent)!r} is a file."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArgumentError(
            f"{what} {os.fspath(folder)!r}: cannot be created, {str(parent)!r} is read-only."
        )


def check_positive(what: str, value: int | None, *, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ArgumentError(f"{what}: expected at least {minimum}, got {value}.")


# ---------------------------------------------------------------------------------------------
# encoder configuration


def check_encoder_config(path: str | None) -> list[Any]:
    """The encoder specs of a ``--config`` file, every one checked (see
    :func:`check_encoder_specs`); an empty list without a file."""
    if path is None:
        return []
    p = Path(path).expanduser()
    if not p.exists():
        raise ArgumentError(f"--config {path!r}: no such file.")
    if p.is_dir():
        raise ArgumentError(f"--config {path!r} is a folder, expected a TOML or JSON file.")
    if not os.access(p, os.R_OK):
        raise ArgumentError(f"--config {path!r}: permission denied.")
    from medflow.tasks.encode import load_encoder_specs

    try:
        specs = load_encoder_specs(p)
    except ValueError as e:  # not TOML/JSON, no list, unknown settings: its text names the file
        raise ArgumentError(f"--config: {e}") from e
    except (TypeError, AttributeError) as e:  # e.g. a list at the top, a setting of a bad type
        raise ArgumentError(
            f"--config {path!r}: expected a table of [[encoders]] settings ({e})."
        ) from e
    check_encoder_specs(specs, where=f"--config {path!r}")
    return specs


def check_encoder_specs(specs: Sequence[Any], *, where: str = "encoders") -> None:
    """Each spec names a registered encoder, an existing checkpoint file (or random weights),
    a known prompt bank, builder options it takes and existing files they name; labels are
    distinct. Nothing is loaded."""
    from medflow.encoders import get_entry, list_encoders

    known = list_encoders()
    labels: list[str] = []
    for spec in specs:
        label = spec.output_name
        at = f"{where}: encoder {label!r}"
        if spec.name not in known:
            raise ArgumentError(
                f"{at}: unknown encoder name {spec.name!r}; registered: {', '.join(known)}."
            )
        for field, minimum in (("batch_size", 1), ("series_per_task", 1)):
            value = getattr(spec, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ArgumentError(f"{at}: {field} must be an integer >= {minimum}, got {value}.")
        if not spec.random_weights:
            _check_checkpoint(at, spec.checkpoint)
        if spec.bank is not None:
            _check_bank(at, spec.bank)
        _check_options(at, get_entry(spec.name).builder, spec.options)
        labels.append(label)
    if len(set(labels)) != len(labels):
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        raise ArgumentError(f"{where}: encoder labels must be distinct, {dupes} repeat.")


def _check_checkpoint(at: str, checkpoint: str | None) -> None:
    if not checkpoint:
        raise ArgumentError(f"{at}: no checkpoint given (a local weights file).")
    text = os.fspath(checkpoint)
    if _is_url(text) or text.startswith("hf-hub:"):
        raise ArgumentError(
            f"{at}: checkpoint {text!r} is not a local file (weights are never downloaded)."
        )
    path = Path(text).expanduser()
    if not path.exists():
        raise ArgumentError(f"{at}: checkpoint {text!r}: no such file.")
    if path.is_dir():
        raise ArgumentError(f"{at}: checkpoint {text!r} is a folder, expected a weights file.")
    if not os.access(path, os.R_OK):
        raise ArgumentError(f"{at}: checkpoint {text!r}: permission denied.")


def _check_bank(at: str, bank: str) -> None:
    from medflow.encoders.findings import load_prompt_bank

    try:
        load_prompt_bank(bank)
    except ValueError as e:
        raise ArgumentError(f"{at}: {e}") from e
    except OSError as e:
        raise ArgumentError(f"{at}: prompt bank {bank!r} cannot be read ({e.strerror}).") from e


def _check_options(at: str, builder: Any, options: Mapping[str, Any]) -> None:
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # pragma: no cover - builders are plain functions
        return
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = {
        n
        for n, p in params.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in ("name", "checkpoint", "device")
    }
    for key, value in options.items():
        if not takes_any and key not in accepted:
            raise ArgumentError(
                f"{at}: unknown option {key!r}; it takes {', '.join(sorted(accepted)) or 'none'}."
            )
        names_a_file = key.endswith(("_dir", "_config", "_path", "_file"))
        if names_a_file and isinstance(value, str) and not Path(value).expanduser().exists():
            raise ArgumentError(f"{at}: option {key} {value!r}: no such file or folder.")
