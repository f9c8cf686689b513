"""Every module, function and file that the docs and the docstrings name exists: renames cannot
leave stale references. Dotted ``mabn_d2.*`` names are imported and looked up; repository paths
(``tools/…``, ``tests/…``, ``configs/…``, …) must be files or folders of this repository."""

from __future__ import annotations

import ast
import importlib
import io
import re
import tokenize

from helpers import REPO

# Not after "." or "/" (torch.ops.mabn_d2.*, .mabn_d2.lock); a trailing "*" names a prefix.
DOTTED = re.compile(r"(?<![\w./])mabn_d2(?:\.[A-Za-z_]\w*)+\*?")
PATH = re.compile(r"(?<![\w/.-])((?:mabn_d2|tools|dev|studies|tests|configs|docs)/[\w/.*-]*\w)")
# Where names are written: the docs, and the code's docstrings and comments.
TEXT_FILES = ["README.md", *(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))]
CODE_FOLDERS = ("mabn_d2", "tools", "dev", "studies", "tests", "configs")


def docstrings_and_comments(source: str) -> str:
    """What a Python file says in words: its docstrings and comments (not its strings)."""
    parts = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            parts.append(ast.get_docstring(node, clean=False) or "")
    parts += [token.string for token in tokenize.generate_tokens(io.StringIO(source).readline)
              if token.type == tokenize.COMMENT]
    return "\n".join(parts)


def texts() -> dict[str, str]:
    found = {name: (REPO / name).read_text() for name in TEXT_FILES}
    for folder in CODE_FOLDERS:
        for path in sorted((REPO / folder).rglob("*")):
            text = path.read_text() if path.suffix in (".py", ".yaml", ".h", ".cpp") else None
            if path.suffix == ".py" and path.name != "test_references.py":
                text = docstrings_and_comments(text)
            if text is not None and path.name != "test_references.py":
                found[str(path.relative_to(REPO))] = text
    return found


# The C++ extension setup.py builds at install (mabn_d2.kernels.cpp.INSTALLED_MODULE): absent
# from a source tree where nothing built it (no compiler: the kernels then come from the
# just-in-time build), so not resolved by importing.
BUILT_AT_INSTALL = "mabn_d2.kernels._C"


def test_the_extension_built_at_install_is_the_one_cpp_py_loads():
    from mabn_d2.kernels import cpp

    assert cpp.INSTALLED_MODULE == BUILT_AT_INSTALL


def resolves(dotted: str) -> bool:
    if dotted == BUILT_AT_INSTALL:
        return True
    prefix = dotted.endswith("*")
    parts = dotted.rstrip("*").split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for i, attribute in enumerate(parts[cut:], start=cut):
            if prefix and i == len(parts) - 1:
                return any(name.startswith(attribute) for name in dir(obj))
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


def test_every_dotted_mabn_d2_name_resolves():
    stale = sorted({f"{where}: {name}" for where, text in texts().items()
                    for name in DOTTED.findall(text) if not resolves(name)})
    assert not stale, "\n".join(stale)


def test_every_repository_path_exists():
    stale = []
    for where, text in texts().items():
        for path in PATH.findall(text):
            path = path.split("::")[0]
            if path.startswith(BUILT_AT_INSTALL.replace(".", "/")):
                exists = True  # a build product (BUILT_AT_INSTALL)
            elif "*" in path:
                exists = any(REPO.glob(path))
            else:
                exists = (REPO / path).exists()
            if not exists:
                stale.append(f"{where}: {path}")
    assert not stale, "\n".join(sorted(set(stale)))
