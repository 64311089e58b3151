"""The installed layout: one ``medflow`` namespace, nothing else at top level.

The wheel is built for real (``pip wheel``) and its file list read; the sources are parsed to
check that every import of medflow's own code goes through the namespace.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("flows", "tasks", "encoders", "storage")


def _walk(root: Path) -> list[Path]:
    """Python files under ``root``, through the links that make up the medflow package."""
    return sorted(
        Path(folder) / name
        for folder, _, names in os.walk(root, followlinks=True)
        if "__pycache__" not in folder
        for name in names
        if name.endswith(".py")
    )


def _python_files() -> list[Path]:
    return [p for root in ("medflow", "tests", "benchmarks") for p in _walk(REPO / root)]


def _medflow_modules() -> dict[str, Path]:
    """Every module of the package by its dotted name."""
    modules: dict[str, Path] = {}
    for path in _walk(REPO / "medflow"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _runtime_imports(name: str, path: Path) -> set[str]:
    """Modules ``name`` imports when it runs (at the top or inside functions), not those
    imported for type checking only."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{module}" if module else base
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


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
    found = [
        (node.lineno, m.group(1))
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        for m in _CODE_IMPORT.finditer(node.value)
        if not node.value.lstrip().startswith(("\n", "The ", "A "))  # prose, not code
    ]
    # modules named to importlib: import_module("..."), resources' files("...")
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        first = node.args[0]
        if (
            called in ("import_module", "files")
            and isinstance(first, ast.Constant)
            and isinstance(first.value, str)
        ):
            found.append((node.lineno, first.value))
    return found


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
    # built from a copy of the sources: setuptools leaves build folders beside them
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("medflow", *LAYERS):
        shutil.copytree(
            REPO / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = dist.glob("medflow-*.whl")
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
    assert "medflow = medflow.flows.entry:main" in scripts


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return groups


def test_no_import_cycles() -> None:
    modules = _medflow_modules()
    assert "medflow.storage.layout" in modules and "medflow.flows.cli" in modules
    graph = {
        name: {m for m in _runtime_imports(name, path) if m in modules and m != name}
        for name, path in modules.items()
    }
    assert not _cycles(graph), _cycles(graph)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_prefect_is_imported_only_by_flows_and_tasks() -> None:
    allowed = ("medflow.flows", "medflow.tasks")
    offenders = [
        name
        for name, path in _medflow_modules().items()
        if not (name + ".").startswith(tuple(a + "." for a in allowed))
        and any(m.split(".")[0] == "prefect" for m in _runtime_imports(name, path))
    ]
    assert not offenders, offenders


def test_importing_medflow_changes_no_global_state() -> None:
    """Importing any module leaves the environment and fsspec's configuration as they were;
    the offline defaults are set by the command's entry point only."""
    names = sorted(n for n in _medflow_modules() if not n.endswith("__main__"))
    code = (
        "import copy, importlib, os, fsspec\n"
        "import gdcm  # noqa: F401  (a dependency that sets its own variable when imported)\n"
        "env, conf = dict(os.environ), copy.deepcopy(fsspec.config.conf)\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "changed = sorted(set(os.environ.items()) ^ set(env.items()))\n"
        "assert not changed, changed\n"
        "assert fsspec.config.conf == conf, fsspec.config.conf\n"
        "from medflow.flows.entry import OFFLINE_DEFAULTS, apply_offline_defaults\n"
        "apply_offline_defaults()\n"
        "assert all(os.environ[k] == v for k, v in OFFLINE_DEFAULTS.items())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DO_NOT"))}
    env["PREFECT_HOME"] = os.environ.get("PREFECT_HOME", "")
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _package(name: str) -> str:
    return ".".join(name.split(".")[:2])


def test_no_module_reaches_into_another_modules_private_names() -> None:
    """``from medflow.x._private import ...`` across packages, ``from m import _name`` and
    ``module._name`` are what a module keeps to itself."""
    modules = _medflow_modules()
    offenders = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        imported: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("medflow"):
                target = node.module or ""
                private = [
                    a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"
                ]
                private_module = any(p.startswith("_") for p in target.split("."))
                if private or (private_module and _package(target) != _package(name)):
                    offenders.append(f"{name}:{node.lineno}: from {target} import {private}")
                imported.update(a.asname or a.name for a in node.names)
            elif isinstance(node, ast.Import):
                imported.update(
                    (a.asname or a.name).split(".")[0]
                    for a in node.names
                    if a.name.startswith("medflow")
                )
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in imported
            ):
                offenders.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not offenders, "\n".join(offenders)


_ROOT_PATH_CALLS = ("_dir", "_path")


def _builds_root_path(node: ast.AST) -> bool:
    """A path under the output root put together by hand: ``root.join("literal", ...)``, an
    f-string that starts with ``{root.<x>_dir()}/`` or ``{root.url}/``, or
    ``Path(root.<x>_dir()) / ...``."""

    def root_call(n: ast.AST) -> bool:
        return (
            isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute)
            and n.func.attr.endswith(_ROOT_PATH_CALLS)
            and isinstance(n.func.value, ast.Name)
            and n.func.value.id in ("root", "out", "output_root")
        )

    def root_url(n: ast.AST) -> bool:
        return (
            isinstance(n, ast.Attribute)
            and n.attr == "url"
            and isinstance(n.value, ast.Name)
            and n.value.id in ("root", "out", "output_root")
        )

    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and (
            node.func.attr == "join"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id in ("root", "out", "output_root")
            and any(isinstance(a, ast.Constant) for a in node.args)
        )
    ):
        return True
    if isinstance(node, ast.JoinedStr) and len(node.values) >= 2:
        first, second = node.values[0], node.values[1]
        if (
            isinstance(first, ast.FormattedValue)
            and (root_call(first.value) or root_url(first.value))
            and isinstance(second, ast.Constant)
            and str(second.value).startswith("/")
        ):
            return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        left = node.left
        if isinstance(left, ast.Call) and left.args and root_call(left.args[0]):
            return True
    return False


def test_paths_under_the_root_are_built_by_storage_only() -> None:
    offenders = [
        f"{name}:{node.lineno}"
        for name, path in _medflow_modules().items()
        if not name.startswith("medflow.storage")
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if _builds_root_path(node)
    ]
    assert not offenders, offenders


def test_the_root_path_rule_sees_a_hand_built_path() -> None:
    hand_built = [
        'root.join("reports", name)',
        'f"{root.models_dir()}/known.json"',
        'f"{out.url}/tables/catalog"',
        'Path(root.models_dir()) / "m3ret"',
    ]
    for code in hand_built:
        assert any(_builds_root_path(n) for n in ast.walk(ast.parse(code))), code
    assert not any(_builds_root_path(n) for n in ast.walk(ast.parse("root.join(item.path)")))


def test_every_medflow_module_imported_anywhere_exists() -> None:
    """An import of a module that moved fails here, also where it is only run in a function
    (the type checker leaves missing modules to the tests)."""
    modules = set(_medflow_modules())
    missing = []
    for path in _python_files():
        for line, name in _imported_modules(path) + _imports_in_code_strings(path):
            if not name.startswith("medflow."):
                continue
            if name not in modules:
                missing.append(f"{path.relative_to(REPO)}:{line}: {name}")
    assert not missing, "\n".join(missing)


_SQL = re.compile(r"\bSELECT\b[\s\S]*\bFROM\b", re.IGNORECASE)


def test_queries_over_the_tables_live_in_storage() -> None:
    """SQL is written in ``medflow.storage`` (``storage.queries``) only; elsewhere a stage calls
    a named query. A command line example shown to the user is not a query."""
    offenders = []
    for name, path in _medflow_modules().items():
        if name.startswith("medflow.storage"):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        examples = {  # the parts of a text that shows a `medflow query` command
            id(part)
            for node in ast.walk(tree)
            if isinstance(node, ast.JoinedStr)
            and any("medflow query" in str(getattr(v, "value", "")) for v in node.values)
            for part in node.values
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and _SQL.search(node.value)
                and "medflow query" not in node.value
                and id(node) not in examples
            ):
                offenders.append(f"{name}:{node.lineno}")
    assert not offenders, offenders
