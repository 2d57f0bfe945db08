"""Run folders built from user strings stay inside `paths.runs`, and `run.overwrite` deletes only run folders.

`run.name=../../..` with `run.overwrite=true` once deleted a folder outside `paths.runs`, and `run.name=.`
every other LOSO run. A name is now one plain folder name, the resolved folder must lie inside
`paths.runs` (a symlink out of it is refused too), and a folder is deleted only when it carries the
marker every run writes when it creates its folder (or, for folders of older versions, a run's files).
Imports no torch: the sweep launcher checks its folder names with it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

MARKER = ".covid-dg-run"  # written into every run folder when it is created
# what a run folder of a version before the marker held: its config and one of its results
LEGACY_FILES = ("run.json", "done", "checkpoints/last.ckpt")


def check_component(name: str, key: str) -> str:
    """`name` as one plain folder name, or ValueError naming `key`: no separators, not `.`/`..`, not
    hidden (`.name.lock` and `.tmp-*` beside run folders are ours), no control characters."""
    why = None
    if not isinstance(name, str) or not name.strip():
        why = "is empty"
    elif name in (".", ".."):
        why = "would be the parent folder itself, or above it"
    elif "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        why = "holds a path separator"
    elif name.startswith("."):
        why = "starts with '.' (hidden names beside run folders are the framework's lock and temp files)"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        why = "holds a control character"
    elif len(name.encode()) > 200:
        why = "is longer than 200 bytes"
    if why:
        raise ValueError(f"{key}={name!r} {why}: it must be a single folder name")
    return name


def run_folder(runs: str | Path, kind: str, name: str) -> Path:
    """`<runs>/<kind>/<name>`, checked to stay inside `runs` once resolved (symlinks followed)."""
    check_component(kind, "run kind")
    check_component(name, "run.name")
    root = Path(runs).expanduser()
    folder = root / kind / name
    inside = root.resolve()
    if not folder.resolve().is_relative_to(inside) or folder.resolve() == inside:
        raise ValueError(f"run.name={name!r}: the run folder {folder} resolves to {folder.resolve()}, outside "
                         f"paths.runs={inside}")
    return folder


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` is a run folder: the marker, or (older versions) config.yaml plus a run's result."""
    if (folder / MARKER).is_file():
        return True
    return (folder / "config.yaml").is_file() and any((folder / f).exists() for f in LEGACY_FILES)


def mark_run_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / MARKER
    if not marker.exists():
        marker.write_text("a covid-dg run folder: run.overwrite=true may delete it\n", encoding="utf-8")


def remove_run_folder(folder: Path) -> None:
    """Delete `folder` for run.overwrite=true: only a run folder, or an empty folder."""
    if folder.is_symlink():
        raise ValueError(f"run.overwrite=true: {folder} is a symbolic link; refusing to delete what it points to")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ValueError(f"run.overwrite=true: {folder} is a file, not a run folder; refusing to delete it")
    if not is_run_folder(folder) and any(folder.iterdir()):
        raise ValueError(f"run.overwrite=true: {folder} is not a run folder (no {MARKER} marker, no config.yaml "
                         "with run results); refusing to delete it. Remove it yourself or choose another run.name")
    shutil.rmtree(folder)
