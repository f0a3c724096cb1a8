"""The package's architecture (docs/architecture.md), read from its source: the parts are folders, imports
flow one way between them, no module imports itself back through others, no library module imports a
command line, and no function passes 80 lines. Imports inside functions count like any other."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "vgg"
# Each part and what it may import (a part, or one module of it). The order is the arrows' order:
# core at the bottom, reproduce at the top; the command lines (train.py, evaluate.py, reproduce.py,
# python -m vgg.data) stand above all of them.
MAY_IMPORT = {
    "core": set(),
    "data": {"core"},
    "models": {"core", "data.datasets.stats"},
    "config": {"core", "models"},
    "training": {"core", "data", "models", "config"},
    "evaluation": {"core", "data", "models", "config", "training.step"},
    "reproduce": {"core", "data", "models", "config", "training", "evaluation"},
    "transfer": {"core", "data", "models", "config", "training.step", "evaluation"},  # only transfer.py imports it
}
# Inside vgg/data, its two parts and which of them each may import: a dataset's items are made by the
# transforms and loaders of batches, which never import a dataset (docs/architecture.md). Only the
# command line at vgg/data's top (__main__) imports both.
DATA_MAY_IMPORT = {"batches": set(), "datasets": {"batches"}}
COMMAND_LINES = {"vgg.data.__main__", "vgg.transfer.__main__"}
FACES = {"vgg.sample_data"}  # `python -m vgg.sample_data`: the data command line under its older name
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(name: str) -> set[str]:
    """The vgg modules `name` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vgg":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "vgg"}
    return found - {name}


GRAPH = {name: imported_modules(name) for name in MODULES}


def part_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or name in {f"vgg.{p}" for p in MAY_IMPORT} else None


def allowed(importer: str, imported: str) -> bool:
    source, target = part_of(importer), part_of(imported)
    if target is None or source == target:
        return imported == "vgg" or source == target
    relative = imported.split(".", 1)[1]  # e.g. "training.step"
    return any(relative == rule or relative.startswith(rule + ".") or rule == target
               for rule in MAY_IMPORT[source])


def data_part_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "data" and parts[2] in DATA_MAY_IMPORT else None


def data_allowed(importer: str, imported: str) -> bool:
    """The arrow between vgg/data's parts (the arrows between the package's parts: `allowed`)."""
    source, target = data_part_of(importer), data_part_of(imported)
    return source is None or target is None or source == target or target in DATA_MAY_IMPORT[source]


def test_the_parts_are_folders_and_say_what_they_own():
    for part in MAY_IMPORT:
        init = PACKAGE / part / "__init__.py"
        assert init.is_file(), part
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "May import" in doc, part  # what it owns, and what it may import
    # At the top of the package only its __init__ and the one older command-line name.
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "sample_data.py"]
    for part in DATA_MAY_IMPORT:
        doc = ast.get_docstring(ast.parse((PACKAGE / "data" / part / "__init__.py").read_text()))
        assert doc and "May import" in doc, part
    # At vgg/data's top only its __init__ and its command line: every other module is in one of its parts.
    assert sorted(p.name for p in (PACKAGE / "data").glob("*.py")) == ["__init__.py", "__main__.py"]


def test_imports_flow_one_way_between_the_parts():
    wrong = [(importer, imported) for importer, targets in GRAPH.items() if part_of(importer)
             for imported in targets if not allowed(importer, imported)]
    assert wrong == []


def test_imports_flow_one_way_inside_data():
    wrong = [(importer, imported) for importer, targets in GRAPH.items() if data_part_of(importer)
             for imported in targets if not data_allowed(importer, imported)]
    assert wrong == []


def test_no_import_cycle():
    state, cycles = {}, []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = "open"
        stack.append(name)
        for target in GRAPH.get(name, ()):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [])
    assert cycles == []


def test_no_library_module_imports_a_command_line():
    for importer, targets in GRAPH.items():
        if importer not in FACES:
            assert not targets & COMMAND_LINES, importer


def test_no_function_over_80_lines():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


def test_the_checks_see_a_wrong_arrow_and_a_cycle():
    """The rules themselves can fail: a data module importing training, a batches module importing a
    dataset, and a cycle, are caught."""
    assert not allowed("vgg.data.datasets.folders", "vgg.training.run")
    assert not allowed("vgg.evaluation.runner", "vgg.training.run")
    assert allowed("vgg.evaluation.runner", "vgg.training.step")
    assert not allowed("vgg.core.distributed", "vgg.data.datasets.folders")
    assert allowed("vgg.models.pretrained", "vgg.data.datasets.stats")
    assert not allowed("vgg.models.vgg", "vgg.data.datasets.folders")
    assert not data_allowed("vgg.data.batches.loaders", "vgg.data.datasets.folders")
    assert not data_allowed("vgg.data.batches", "vgg.data.datasets.checks")  # a package's __init__ too
    assert data_allowed("vgg.data.datasets.folders", "vgg.data.batches.decode")
    assert data_allowed("vgg.data.__main__", "vgg.data.datasets.prepare")
    assert "vgg.training.run" in GRAPH["vgg.reproduce.stages"]  # lazy imports inside functions are read too
