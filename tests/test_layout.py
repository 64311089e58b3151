"""The installed layout: one ``medflow`` namespace, nothing else at top level.

The wheel is built for real (``pip wheel``) and its file list read; the sources are parsed to
check that every import of medflow's own code goes through the namespace.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("flows", "tasks", "encoders", "storage")


def _python_files() -> list[Path]:
    roots = [REPO / "medflow", REPO / "tests", REPO / "benchmarks"]
    files: list[Path] = []
    for root in roots:
        files.extend(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    return files


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


# code run in a child process (``python -c "..."``) imports too
_LAYER_NAMES = "|".join(LAYERS)
_CODE_IMPORT = re.compile(rf"\b(?:import|from)\s+(?:[\w.]+\s*,\s*)*({_LAYER_NAMES})\b")


def _imports_in_code_strings(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        (node.lineno, m.group(1))
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        for m in _CODE_IMPORT.finditer(node.value)
        if not node.value.lstrip().startswith(("\n", "The ", "A "))  # prose, not code
    ]


def test_every_import_of_medflow_code_goes_through_the_namespace() -> None:
    offenders = [
        f"{path.relative_to(REPO)}:{line}: import {name}"
        for path in _python_files()
        for line, name in _imported_modules(path) + _imports_in_code_strings(path)
        if name.split(".")[0] in LAYERS
    ]
    assert not offenders, "imports outside the medflow namespace:\n" + "\n".join(offenders)


@pytest.mark.slow
def test_the_wheel_installs_only_the_medflow_package(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = tmp_path.glob("medflow-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = zf.read(entry_points).decode()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"medflow"}, sorted(top)
    for layer in LAYERS:
        assert f"medflow/{layer}/__init__.py" in names, layer
    # package data travels with the code: the encoders' configs and prompt banks
    assert any(n.startswith("medflow/encoders/configs/") and n.endswith(".json") for n in names)
    assert any(n.startswith("medflow/encoders/prompts/") and n.endswith(".json") for n in names)
    assert "medflow = medflow.flows.cli:app" in scripts
