"""Imports go one way: experiments -> sweeps -> evaluation -> rundir; lightning_modules reads no config or report.

Read from the source (ast), so an import inside a function counts as much as one at the top: the sweep
layer launches experiments as programs, the reports read run folders, and the model layer neither
configures nor reports.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT = ("datamodules", "evaluation", "experiments", "lightning_modules", "rundir", "sweeps")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import statement in the file; relative imports resolved."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            # `from evaluation import reporting` imports evaluation.reporting
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names] if base else []
    return sorted(out)


def offending(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(REPO)}:{line} imports {mod}"
            for path in sorted((REPO / package).rglob("*.py"))
            for line, mod in imported_modules(path)
            if any(mod == f or mod.startswith(f + ".") for f in forbidden)]


@pytest.mark.parametrize("package, forbidden", [
    ("evaluation", ("experiments", "sweeps")),
    ("sweeps", ("experiments",)),
    ("lightning_modules", ("experiments", "evaluation.reporting", "sweeps")),
    ("rundir", PROJECT),
])
def test_imports_go_one_way(package, forbidden):
    assert offending(package, forbidden) == []


def test_the_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The walk must catch a lazy import too (the kind that crept into sweeps before)."""
    pkg = tmp_path / "fake"
    pkg.mkdir()
    (pkg / "m.py").write_text("def f():\n    from experiments.config import load_config\n"
                              "from . import sibling\nimport experiments\n", encoding="utf-8")
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    assert offending("fake", ("experiments",)) == ["fake/m.py:2 imports experiments.config.load_config",
                                                   "fake/m.py:4 imports experiments"]
