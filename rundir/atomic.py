"""Result files written atomically: a reader (a report, a resumed run, a sweep's status) never sees half a file.

Each file is written beside its target under a temporary name and renamed over it (`os.replace`, atomic
on POSIX and Windows), so a run killed mid-write leaves the previous file or none.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")  # never the locale: reports hold ±, ², …
    os.replace(tmp, path)


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def write_csv(path: str | Path, rows: Sequence[dict], first: Sequence[str] = ("case", "source")) -> None:
    keys = list(first) + sorted({k for r in rows for k in r} - set(first))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())
