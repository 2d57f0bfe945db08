import os
import subprocess
import sys
import time

import pytest

from datamodules.locking import FolderInUse, folder_lock, is_locked, lock_path_of, remove_stale_tmp

HOLD = "import sys,time; from datamodules.locking import folder_lock\nwith folder_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(60)"


def _holder(folder):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_locker_is_told_the_pid(tmp_path):
    folder = tmp_path / "run"
    p = _holder(folder)
    try:
        assert is_locked(folder)
        with pytest.raises(FolderInUse, match=rf"run folder {folder} in use by pid {p.pid}"):
            with folder_lock(folder, what="run folder"):
                pass
    finally:
        p.kill()
        p.wait()
    # the kernel released the lock of the killed holder: no stale lock file blocks anyone
    assert not is_locked(folder)
    with folder_lock(folder):
        assert lock_path_of(folder).read_text(encoding="utf-8").strip() == str(os.getpid())


def test_waiting_locker_gets_it_when_the_holder_ends(tmp_path):
    folder = tmp_path / "run"
    p = _holder(folder)
    said = []
    t0 = time.time()
    subprocess.Popen(["bash", "-c", f"sleep 1; kill {p.pid}"])
    with folder_lock(folder, wait=True, poll_s=0.1, say=said.append):
        assert time.time() - t0 >= 0.9
    p.wait()
    assert said and f"in use by pid {p.pid}" in said[0]


def test_stale_tmp_removed_only_when_its_owner_is_unlocked(tmp_path):
    (tmp_path / ".tmp-a-1").mkdir()
    (tmp_path / ".tmp-b-1").mkdir()
    (tmp_path / "a").mkdir()
    p = _holder(tmp_path / "b")
    try:
        removed = remove_stale_tmp(tmp_path, lambda t: tmp_path / t.name.split("-")[1])
    finally:
        p.kill()
        p.wait()
    assert [r.name for r in removed] == [".tmp-a-1"]
    assert (tmp_path / ".tmp-b-1").exists() and (tmp_path / "a").exists()
