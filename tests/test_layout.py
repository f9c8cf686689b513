"""The package's architecture, as the README describes it, holds in the code."""

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


def test_readme_layout_lists_every_module_of_the_package():
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
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
    assert not missing, f"README Layout does not list: {missing}"
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
