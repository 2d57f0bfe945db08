"""Faults during a run: a SIGKILL mid-epoch, a full disk during a save, a damaged or crafted checkpoint, two
processes on one run folder, a killed sweep launcher, a diverging loss. Real tiny runs (the smoke preset,
3 epochs of 4 patches) as subprocesses, killed the way a machine or a user kills them."""
import contextlib
import errno
import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datamodules.locking import is_locked

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
SHORT = ["experiment=smoke", f"trainer.max_epochs={EPOCHS}", "trainer.check_val_every_n_epoch=1",
         "data.samples_per_epoch=4", "wandb.mode=disabled", "evaluation.save_predictions=false", "trainer.threads=1"]
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _cmd(runs: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.loso", "--holdout", "mosmed", *SHORT, f"paths.runs={runs}",
            f"paths.cache={cache}", *extra]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, encoding="utf-8", errors="replace", env=ENV,
                          timeout=600, **kwargs)


def _kill_after(cmd: list[str], line_start: str) -> str:
    """Start `cmd`, SIGKILL it as soon as it prints a line starting with `line_start` (the next epoch is then
    under way), return what it printed."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8",
                            errors="replace", env=ENV)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(line_start):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    out = "".join(seen)
    assert line_start in out, out[-3000:]
    return out


def _run_dir(runs: Path) -> Path:
    (run_dir,) = [p for p in (runs / "loso").iterdir() if p.is_dir()]
    return run_dir


def _results(run_dir: Path) -> dict:
    """What must not depend on whether the run was interrupted: every number and the final weights."""
    info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {"metrics": json.loads((run_dir / "metrics.json").read_text(encoding="utf-8")),
            "per_case": (run_dir / "per_case.csv").read_text(encoding="utf-8"),
            "val_per_case": (run_dir / "val_per_case.csv").read_text(encoding="utf-8"),
            "selection": info["selection"]["test"],
            "records": (run_dir / "records.jsonl").read_text(encoding="utf-8"),  # stale epochs dropped on resume
            "weights": {k: v.tolist() for k, v in state["state_dict"].items()}}


def _resumed_from(out: str) -> int:
    found = re.findall(r"resuming from epoch (\d+)", out)
    assert len(found) == 1, out[-3000:]
    return int(found[0])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, phantom_root):
    """An uninterrupted run (no loader workers) and the cache the other runs share."""
    cache = phantom_root.parents[1]
    runs = tmp_path_factory.mktemp("reference")
    proc = _run(_cmd(runs, cache))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The third-party lines no user can act on are filtered at the entry point (rundir.cli.THIRD_PARTY_*).
    # Lightning's INFO lines read as Lightning prints them, not in logging's default format (rundir.cli.PlainFormatter).
    for noise in ("You have overridden", "litlogger", "LeafSpec", "INFO:"):
        assert noise not in proc.stdout + proc.stderr, noise
    assert "GPU available: False, used: False" in proc.stderr
    return cache, _results(_run_dir(runs))


def test_killed_mid_epoch_resumes_from_its_last_epoch_and_ends_as_if_never_killed(tmp_path, reference):
    """SIGKILL during epoch 2 (right after `[epoch 1/3]`); the rerun says where it resumes and ends with the
    uninterrupted run's numbers and weights, bit for bit. With a loader worker: patches are drawn from
    (seed, epoch, index), not from the workers' streams, which die with the run."""
    cache, expected = reference
    cmd = _cmd(tmp_path, cache, "data.num_workers=1")
    _kill_after(cmd, "[epoch 1/")
    run_dir = _run_dir(tmp_path)
    assert not (run_dir / "done").exists() and (run_dir / "checkpoints" / "last.ckpt").exists()
    assert not is_locked(run_dir)  # the kernel freed the lock; the killed run's worker did not keep it
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    k = _resumed_from(proc.stdout)
    assert k in (1, 2)  # 1 unless the kill came only after epoch 2 had been saved
    assert f"[epoch {k + 1}/{EPOCHS}]" in proc.stdout and "[epoch 1/" not in proc.stdout
    assert (run_dir / "done").exists() and not (run_dir / "checkpoints" / "last-prev.ckpt").exists()
    assert _results(run_dir) == expected


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _small_disk(limit_bytes: int):
    """preexec_fn: files this process writes may not exceed `limit_bytes` (RLIMIT_FSIZE); with SIGXFSZ ignored
    a write beyond it fails with EFBIG, as on a full disk."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def test_full_disk_during_a_save_and_a_truncated_last_checkpoint_never_block_the_run(tmp_path, reference):
    """Killed after epoch 2 (last.ckpt = epoch 2, last-prev.ckpt = epoch 1). A rerun on a 'full disk' fails
    while saving, naming the checkpoint, and leaves both files as they were, with no temp file. Then last.ckpt
    is truncated by hand and a killed save's temp file is planted: the rerun removes the temp file, moves
    last.ckpt aside, resumes from last-prev.ckpt and ends with the uninterrupted run's numbers."""
    cache, expected = reference
    cmd = _cmd(tmp_path, cache)
    _kill_after(cmd, "[epoch 2/")
    ckpts = _run_dir(tmp_path) / "checkpoints"
    last, prev = ckpts / "last.ckpt", ckpts / "last-prev.ckpt"
    assert last.exists() and prev.exists()
    before = {p.name: _digest(p) for p in ckpts.iterdir()}
    limit = last.stat().st_size // 2  # a checkpoint cannot be written; config, logs and CSVs can
    proc = _run(cmd, preexec_fn=_small_disk(limit))
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert re.search(r"could not write checkpoint \S+\.ckpt .*File too large", out), out[-3000:]
    assert {p.name: _digest(p) for p in ckpts.iterdir()} == before  # nothing replaced, no .tmp-* left

    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    orphan = ckpts / ".tmp-last.ckpt.4242"  # what a save killed mid-write leaves
    orphan.write_bytes(b"half a checkpoint")
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"removed {orphan}, left by a save that was killed" in proc.stdout and not orphan.exists()
    assert re.search(r"cannot resume from \S+last\.ckpt: unreadable or truncated", proc.stdout), proc.stdout[-3000:]
    assert list(ckpts.glob("last.ckpt.corrupt-*")) and _resumed_from(proc.stdout) in (1, 2)
    assert "last-prev.ckpt" in re.search(r"resuming from epoch .*", proc.stdout).group(0)
    assert _results(_run_dir(tmp_path)) == expected


def test_a_save_failing_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """Unit: the bytes are written, then the filesystem reports the full disk when they are flushed (fsync:
    delayed allocation, network filesystems)."""
    from experiments import checkpoints

    target = tmp_path / "last.ckpt"
    checkpoints.atomic_save({"epoch": 1}, target, keep_previous=True)
    good = target.read_bytes()

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.os, "fsync", full)
    with pytest.raises(OSError, match=rf"could not write checkpoint {re.escape(str(target))} .*No space left"):
        checkpoints.atomic_save({"epoch": 2, "big": torch.zeros(1000)}, target, keep_previous=True)
    assert target.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    monkeypatch.undo()
    checkpoints.atomic_save({"epoch": 2}, target, keep_previous=True)  # the previous last is kept as fallback
    assert checkpoints.read_checkpoint(tmp_path / "last-prev.ckpt") == {"epoch": 1}


def test_last_checkpoint_every_epoch_and_every_n_steps(tmp_path):
    """A tiny Lightning model, 2 epochs of 4 steps, every_n_steps=3: saves at step 3 (mid-epoch 1), at the end
    of epoch 1 (step 4), at step 6 and at the end of epoch 2 (step 8); last-prev.ckpt is the save before."""
    import pytorch_lightning as pl

    from experiments.checkpoints import (
        AtomicCheckpointIO,
        LastCheckpoint,
        finished_epochs,
        mid_epoch_note,
        read_checkpoint,
    )

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, _):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    saved = []

    class Spy(LastCheckpoint):
        def _save(self, trainer, module):
            super()._save(trainer, module)
            saved.append(trainer.global_step)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=2)
    trainer = pl.Trainer(max_epochs=2, callbacks=[Spy(tmp_path, every_n_steps=3)], plugins=[AtomicCheckpointIO()],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Tiny(), data)
    assert saved == [3, 4, 6, 8]
    last, prev = read_checkpoint(tmp_path / "last.ckpt"), read_checkpoint(tmp_path / "last-prev.ckpt")
    assert (last["global_step"], finished_epochs(last), mid_epoch_note(last)) == (8, 2, "")
    assert (prev["global_step"], finished_epochs(prev), mid_epoch_note(prev)) == (6, 1, ", 2 step(s) into epoch 2")
    assert any("rng" in s for s in last["callbacks"].values()) and not list(tmp_path.glob(".tmp-*"))


class Payload:
    """Unpickling it would create the marker file: what a crafted checkpoint does with os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _crafted(path: Path, marker: Path) -> Path:
    torch.save({"epoch": 3, "global_step": 9, "callbacks": {"x": Payload(marker)}, "state_dict": {}}, path)
    return path


def test_a_crafted_checkpoint_is_refused_not_executed(tmp_path):
    """Fails on the code before this change: `runner._progress_of` (now `experiments.stages.test.progress_of`)
    unpickled with weights_only=False, so the payload ran (the marker appeared) when a rerun read last.ckpt's
    progress."""
    from experiments.stages.test import progress_of

    marker = tmp_path / "PWNED"
    ckpt = _crafted(tmp_path / "last.ckpt", marker)
    with contextlib.suppress(Exception):
        progress_of(str(ckpt))
    assert not marker.exists()
    from experiments.checkpoints import CheckpointError
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(ckpt))}: refused to load: .*could run code"):
        progress_of(str(ckpt))
    assert not marker.exists()


def test_crafted_checkpoints_given_to_predict_and_test_run_are_refused(tmp_path, capsys):
    from experiments import predict, test_run

    marker = tmp_path / "PWNED"
    ckpt = _crafted(tmp_path / "best-epoch001.ckpt", marker)
    assert predict.main(["--ckpt", str(ckpt), "--input", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert f"error: {ckpt}: refused to load" in capsys.readouterr().err
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("experiment: smoke\n", encoding="utf-8")
    (run_dir / "run.json").write_text(json.dumps({"selection": {"method": "training_domain", "checkpoints": {
        "training_domain": {"path": str(ckpt)}}}, "split_args": {}}), encoding="utf-8")
    with pytest.raises(SystemExit, match=rf"error: {re.escape(str(ckpt))}: refused to load"):
        test_run.main([str(run_dir), "--out", str(tmp_path / "t")])
    assert not marker.exists()


def test_a_second_process_on_a_run_folder_gets_a_one_line_error(tmp_path, phantom_root):
    cache = phantom_root.parents[1]
    cmd = _cmd(tmp_path, cache, "trainer.max_epochs=200")
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8",
                             errors="replace", env=ENV)
    try:
        for line in first.stdout:
            if line.startswith("split ("):  # the lock is taken before the split is made
                break
        second = _run(cmd)
        assert second.returncode == 1
        run_dir = _run_dir(tmp_path)
        assert second.stderr.strip().splitlines()[-1] == f"error: run folder {run_dir} in use by pid {first.pid}"
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.terminate()  # Lightning stops after the current batch on SIGTERM
        first.wait(timeout=120)
    assert not is_locked(run_dir)


def test_a_sweep_run_waits_for_its_folder(tmp_path, monkeypatch, capsys):
    """experiments.sweep_run queues behind a process holding the run folder (another launcher, a W&B agent)."""
    from experiments import runner
    from experiments import sweep_run as run_one

    overrides = ["protocol=loso", "data.holdout=mosmed", "experiment=smoke", f"paths.runs={tmp_path}"]
    _protocol, _cfg, _plan, run_dir = run_one.plan_run(overrides)
    hold = ("import sys,time; from datamodules.locking import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(2)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    ran = []
    monkeypatch.setattr(runner, "_run_locked", lambda *args: ran.append(time.time()) or {"ran": True})
    t0 = time.time()
    assert run_one.main(overrides) == {"ran": True}
    holder.wait()
    assert ran and ran[0] - t0 > 0.5
    assert f"run folder {run_dir} in use by pid {holder.pid}: waiting for it to finish" in capsys.readouterr().out


def test_under_ddp_only_rank_zero_locks_the_run_folder(tmp_path, monkeypatch):
    """The other ranks re-run the script while rank zero holds the lock: they must not wait for it or fail."""
    from pytorch_lightning.utilities import rank_zero_only

    from datamodules.locking import FolderInUse, folder_lock
    from experiments import runner
    from experiments.config import load_config

    cfg = load_config(["experiment=smoke", f"paths.runs={tmp_path}", "data.holdout=mosmed", "run.name=r"])
    monkeypatch.setattr(runner, "_run_locked", lambda *args: {"ran": True})
    with folder_lock(tmp_path / "loso" / "r", what="run folder"):  # rank zero's lock
        with pytest.raises(FolderInUse):
            runner.run(cfg, "loso", {"holdout": "mosmed"}, "mosmed")
        monkeypatch.setattr(rank_zero_only, "rank", 1)
        assert runner.run(cfg, "loso", {"holdout": "mosmed"}, "mosmed") == {"ran": True}


LAUNCHER = """
import sys
from sweeps.launch import run_child
sys.exit(run_child([sys.executable, "-c", sys.argv[1], sys.argv[2]]))
"""
CHILD = """
import os, signal, sys, time
from pathlib import Path
def stop(*_):
    time.sleep(1)  # a run finishing its batch and closing its files
    Path(sys.argv[1], "stopped").write_text("yes")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
Path(sys.argv[1], "pid").write_text(str(os.getpid()))
time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_killing_the_sweep_launcher_stops_its_run_first(tmp_path, sig):
    """SIGTERM (kill, a scheduler) or SIGINT sent to the launcher alone: the run gets SIGTERM, and the launcher
    exits only after it."""
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, CHILD, str(tmp_path)], cwd=REPO, env=ENV)
    deadline = time.time() + 30
    while not (tmp_path / "pid").exists():
        assert time.time() < deadline and launcher.poll() is None
        time.sleep(0.05)
    time.sleep(0.2)
    child = int((tmp_path / "pid").read_text(encoding="utf-8"))
    launcher.send_signal(sig)
    assert launcher.wait(timeout=30) == 128 + sig
    assert (tmp_path / "stopped").read_text(encoding="utf-8") == "yes"  # the run got the signal and ended before the launcher
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_a_diverging_loss_fails_the_run_and_never_marks_it_done(tmp_path, phantom_root):
    """optim.lr=1e30: the loss is NaN from the second step; the run stops before validating or saving."""
    from experiments.loso import main

    args = ["--holdout", "mosmed", *SHORT, f"paths.runs={tmp_path}", f"paths.cache={phantom_root.parents[1]}",
            "optim.lr=1e30"]
    with pytest.raises(SystemExit, match=r"error: training loss became NaN/inf at global step \d+ \(epoch 1\).*"
                                         r"optim.lr=1e\+30"):
        main(args)
    run_dir = _run_dir(tmp_path)
    assert not (run_dir / "done").exists() and not (run_dir / "checkpoints").exists()
    assert not is_locked(run_dir)
