"""The house rules of the code layout, checked on the source: packages import downward only,
the library never imports the tool, and the size limits hold."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# a package may import those to its right (and itself)
ORDER = ["cli", "report", "search", "measure", "quality", "bundled"]


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "tuner" and len(parts) > 1 and parts[1] in ORDER else None


@pytest.mark.parametrize("path", sorted((ROOT / "tuner").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_tuner_packages_import_downward_only(path):
    here = _stage("tuner." + ".".join(path.relative_to(ROOT / "tuner").with_suffix("").parts))
    if here is None:
        return  # tuner/__init__.py, __main__.py
    allowed = set(ORDER[ORDER.index(here):])
    bad = sorted(m for m in _imports(path) if _stage(m) is not None and _stage(m) not in allowed)
    assert not bad, f"{path.relative_to(ROOT)} ({here}) imports upward: {bad}"


def test_library_never_imports_the_tool_or_rich():
    for path in (ROOT / "tarflow").rglob("*.py"):
        bad = sorted(m for m in _imports(path) if m.split(".")[0] in ("tuner", "rich", "typer"))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def _sizes():
    for path in sorted([*(ROOT / "tarflow").rglob("*.py"), *(ROOT / "tuner").rglob("*.py")]):
        text = path.read_text()
        yield path, len(text.splitlines()), [
            (n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(text))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_module_over_400_lines_no_function_over_60():
    long_modules = [(str(p.relative_to(ROOT)), n) for p, n, _ in _sizes() if n > 400]
    long_functions = [(str(p.relative_to(ROOT)), name, n) for p, _, fns in _sizes() for name, n in fns if n > 60]
    assert not long_modules and not long_functions, (long_modules, long_functions)
