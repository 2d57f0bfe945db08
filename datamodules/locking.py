"""OS locks on folders under construction (run folders, cache entries) and cleanup of what killed
writers left behind.

`fcntl.flock` locks belong to the open file description, so the kernel drops them when the holder
dies, however it dies (SIGKILL included): a lock file left on disk never blocks anyone, and "nobody
holds the lock" is a reliable sign that a `.tmp-*` entry of that folder is an orphan.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Descriptors of the locks this process holds. A forked child (a DataLoader worker) shares each one's open
# file description, hence the lock: killed with its parent, a worker that lives on for seconds would keep
# the folder locked. The child closes its copies at fork; the parent's descriptor keeps the lock.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class FolderInUse(RuntimeError):
    """Another live process holds the folder's lock."""


def lock_path_of(folder: Path) -> Path:
    """The lock file of `folder`: beside it, so that it survives the folder being removed or renamed."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return text or "unknown"


@contextmanager
def folder_lock(folder: str | Path, what: str = "folder", wait: bool = False,
                poll_s: float = 2.0, say=None) -> Iterator[Path]:
    """Hold an exclusive lock on `folder` for the duration of the block.

    Without `wait` a second process gets FolderInUse("<what> <folder> in use by pid N"); with `wait` it
    blocks until the holder finishes (a sweep's runs queue behind each other), saying once why it waits.
    """
    folder = Path(folder)
    path = lock_path_of(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                msg = f"{what} {folder} in use by pid {_holder(fd)}"
                if not wait:
                    raise FolderInUse(msg) from None
                if not told and say is not None:
                    say(f"{msg}: waiting for it to finish")
                    told = True
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        _HELD.add(fd)
        yield path
    finally:
        _HELD.discard(fd)
        os.close(fd)  # releases the lock; the file stays (removing it would race with a waiting locker)


def is_locked(folder: str | Path) -> bool:
    """Whether a live process holds `folder`'s lock right now."""
    path = lock_path_of(Path(folder))
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def remove_stale_tmp(parent: str | Path, owner_of) -> list[Path]:
    """Remove `.tmp-*` entries in `parent` whose owner folder (`owner_of(tmp) -> Path`) nobody holds
    locked: their writer died before its rename. Returns what was removed."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for tmp in sorted(parent.glob(".tmp-*")):
        if is_locked(owner_of(tmp)):
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed
