"""CSV tables shipped with a download (MosMed's dataset_registry.csv, NBIA's metadata.csv, COVID-19-AR's
clinical tables), read through one function whose errors name the file, the line and what is wrong.

Why strict: a truncated download or a spreadsheet re-saved in another encoding otherwise fails as a bare
`UnicodeDecodeError` or `KeyError` naming no file, or a short row silently reads as empty fields (a study
listed without its mask). The error is a `DataLayoutError`, so `verify` lists it as a problem of the
source instead of stopping.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path

from datamodules.sources.base import DataLayoutError


class TableError(DataLayoutError):
    """A CSV of a download that cannot be read as a table; the message names the file and the line."""


def decode_utf8(path: Path, data: bytes) -> str:
    """UTF-8 with or without a BOM (MosMed ships one); an invalid byte is named with its offset and line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TableError(f"{path}: line {line}: invalid UTF-8 at byte offset {e.start} "
                         f"({data[e.start:e.start + 4]!r}); save the table as UTF-8") from None


def read_table(path: str | Path, required: Iterable[str] = (), lower_header: bool = False) -> list[dict[str, str]]:
    """Rows of `path` as header -> value dicts (header names stripped, lower-cased with `lower_header`).

    Errors (`TableError`, naming the file and the line): unreadable file, invalid UTF-8, an empty file,
    a header without one of `required`, a header naming a column twice, a row with fewer fields than
    the header or with extra non-empty ones (trailing empty fields are a spreadsheet's habit: ignored).
    Blank lines are skipped.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TableError(f"{path}: unreadable ({e.strerror or e})") from None
    reader = csv.reader(io.StringIO(decode_utf8(path, data), newline=""))
    try:
        header = next((row for row in reader if any(cell.strip() for cell in row)), None)
        if header is None:
            raise TableError(f"{path}: empty file, expected a header row{_columns(required)}")
        names = [h.strip().lower() if lower_header else h.strip() for h in header]
        while names and not names[-1]:  # trailing separators after the last column
            names.pop()
        twice = sorted({n for n in names if n and names.count(n) > 1})
        if twice:
            raise TableError(f"{path}: line {reader.line_num}: column(s) {twice} appear twice in the header")
        missing = [c for c in required if c not in names]
        if missing:
            raise TableError(f"{path}: line {reader.line_num}: missing column(s) {missing}; the header has {names}")
        rows = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < len(names):
                raise TableError(f"{path}: line {reader.line_num}: short row, {len(row)} field(s) where the header "
                                 f"has {len(names)} (missing {names[len(row):]})")
            if any(cell.strip() for cell in row[len(names):]):
                raise TableError(f"{path}: line {reader.line_num}: {len(row)} fields where the header has "
                                 f"{len(names)} (a separator inside an unquoted value?)")
            rows.append(dict(zip(names, row)))
    except csv.Error as e:
        raise TableError(f"{path}: line {reader.line_num}: not a valid CSV ({e})") from None
    return rows


def _columns(required: Iterable[str]) -> str:
    required = list(required)
    return f" with columns {required}" if required else ""
