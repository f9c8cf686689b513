"""The package's architecture, as docs/architecture.md describes it, holds in the code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "mabn_d2"


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_documented_layout_lists_every_module_of_the_package():
    architecture = (REPO / "docs" / "architecture.md").read_text()
    layout = architecture[architecture.index("## Layout"):]
    layout = layout[:layout.index("```", layout.index("```") + 3)]
    folder = ""
    listed = set()
    for line in layout.splitlines():
        match = re.match(r"^(\s*)(\S+)", line)
        if not match or line.strip().startswith("```"):
            continue
        indent, entry = len(match.group(1)), match.group(2)
        if indent == 2 and entry.endswith("/"):
            folder = entry
        elif indent == 2:
            listed.add(entry)
            folder = ""
        elif indent == 4 and folder:
            listed.add(folder + entry)
    modules = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
               if p.name != "__init__.py" or p.parent == PACKAGE}
    folders = {str(p.parent.relative_to(PACKAGE)) + "/" for p in PACKAGE.rglob("*.py")
               if p.parent != PACKAGE}
    missing = sorted(m for m in modules if m not in listed and m.split("/")[-1] not in listed)
    assert not missing, f"docs/architecture.md's Layout does not list: {missing}"
    assert all(f in layout for f in folders), folders


def test_no_path_hacks_and_no_tool_imports_tests():
    hack = "sys." + "path"  # spelled so that this file does not contain it
    for path in python_files("tools", "dev", "studies", "tests"):
        assert hack not in path.read_text(), path
        if path.relative_to(REPO).parts[0] in ("tools", "dev", "studies"):
            test_modules = {p.stem for p in (REPO / "tests").rglob("*.py")}
            assert not imported_modules(path) & test_modules, path


def test_tests_import_no_test_module_and_their_names_are_unique():
    # tests/ has no __init__.py: pytest imports each test file by its basename (rootdir-based
    # "prepend" mode), so two files of one name in two folders would collide.
    files = python_files("tests")
    names = [p.name for p in files]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
    assert not [p for p in files if p.name == "__init__.py"]
    # Shared pieces live in tests/helpers.py or a support module, never in a test module (also
    # not in the code a test runs in a child Python).
    pattern = re.compile(r"^\s*(from|import)\s+test_\w+", re.MULTILINE)
    offenders = [str(p.relative_to(REPO)) for p in files if pattern.search(p.read_text())]
    assert not offenders, offenders


def package_imports(path: Path) -> set[str]:
    """The mabn_d2 modules ``path`` imports (anywhere in it, relative imports resolved)."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}  # submodules
    return {name for name in found if name.split(".")[0] == "mabn_d2"}


def test_package_parts_depend_one_way():
    # Parts: the subpackages and the root's modules; the root __init__ is the facade over all.
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "__init__.py":
            continue
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for name in package_imports(path):
            other = name.split(".")[1] if "." in name else part
            if other != part and ((PACKAGE / other).is_dir() or (PACKAGE / f"{other}.py").exists()):
                graph.setdefault(part, set()).add(other)
    assert graph.get("kernels", set()) == set(), graph["kernels"]  # the bottom
    assert graph.get("layer", set()) <= {"kernels"}, graph["layer"]

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == start:
                return [*path, nxt]
            if nxt not in path and (found := cycle_from(start, [*path, nxt])):
                return found
        return None

    cycles = [c for part in sorted(graph) if (c := cycle_from(part, [part]))]
    assert not cycles, f"package parts import each other: {cycles[0]} ({graph})"


def test_layer_and_kernels_never_import_detectron2():
    for path in python_files("mabn_d2/layer", "mabn_d2/kernels"):
        assert not any(m.split(".")[0] == "detectron2" for m in imported_modules(path)), path


def test_only_the_layer_assigns_its_private_attributes():
    source = (PACKAGE / "layer" / "mabn.py").read_text()
    private = set(re.findall(r"self\.(_[a-z]\w*)\s*[:=]", source))
    assert "_iteration" in private
    offenders = []
    for path in python_files("mabn_d2", "tools", "dev", "studies", "tests"):
        if path == PACKAGE / "layer" / "mabn.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr in private:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {target.attr}")
    assert not offenders, offenders
