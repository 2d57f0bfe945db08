"""Text files opened, read or written without `encoding=`: they decode with the locale's codec, ASCII on a machine
without a locale (containers, CI, SLURM nodes), and our reports and tables carry non-ASCII marks (†, ±, →).
`python tools/encoding_check.py [--fix]` lists them (and appends encoding="utf-8"); tests/test_encoding.py runs it."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# every .py of the checkout except these (virtual environments, build output, caches, hidden folders)
SKIP = {"build", "dist", "__pycache__", "node_modules", "wandb", "runs"}
# modules whose `.open` is not the text-mode builtin
NOT_TEXT_OPEN = {"os", "tarfile", "gzip", "zipfile", "Image", "h5py", "bz2", "lzma", "webbrowser", "dicom", "pydicom",
                 "shelve", "dbm", "wave", "tempfile"}


def _mode(call: ast.Call, position: int) -> str | None:
    """The constant mode argument ('r' when absent), None when it is not a constant."""
    for kw in call.keywords:
        if kw.arg == "mode":
            return kw.value.value if isinstance(kw.value, ast.Constant) else None
    if len(call.args) > position:
        arg = call.args[position]
        return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
    return "r"


def offending_calls(tree: ast.AST) -> list[ast.Call]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or any(kw.arg == "encoding" or kw.arg is None for kw in node.keywords):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in ("read_text", "write_text"):
            found.append(node)
        elif isinstance(f, ast.Name) and f.id == "open":
            mode = _mode(node, 1)
            if mode is not None and "b" not in mode:
                found.append(node)
        elif isinstance(f, ast.Attribute) and f.attr == "open":
            if isinstance(f.value, ast.Name) and f.value.id in NOT_TEXT_OPEN:
                continue
            mode = _mode(node, 0)
            if mode is not None and "b" not in mode:
                found.append(node)
    return found


def files() -> list[Path]:
    def kept(p: Path) -> bool:
        parts = p.relative_to(REPO).parts[:-1]
        return not any(d.startswith(".") or d in SKIP or d.endswith(".egg-info") for d in parts)
    return sorted(p for p in REPO.rglob("*.py") if kept(p))


def fix(path: Path, calls: list[ast.Call]) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for call in sorted(calls, key=lambda c: (c.end_lineno, c.end_col_offset), reverse=True):
        row, col = call.end_lineno - 1, call.end_col_offset - 1  # the closing parenthesis
        line = lines[row]
        assert line[col] == ")", (path, call.lineno)
        before = "".join(lines[:row]) + line[:col]
        needs_comma = bool(call.args or call.keywords) and not before.rstrip().endswith(",")  # a trailing comma
        lines[row] = line[:col] + (', encoding="utf-8"' if needs_comma else 'encoding="utf-8"') + line[col:]
    path.write_text("".join(lines), encoding="utf-8")


def main(argv: list[str]) -> int:
    bad = 0
    for path in files():
        calls = offending_calls(ast.parse(path.read_text(encoding="utf-8")))
        for call in calls:
            print(f"{path.relative_to(REPO)}:{call.lineno}: text file without encoding=")
        bad += len(calls)
        if calls and "--fix" in argv:
            fix(path, calls)
    return 1 if bad and "--fix" not in argv else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
