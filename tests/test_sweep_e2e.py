"""Sweeps end to end on the tiny phantom suite: the transfer matrix, skipping finished runs, resuming a
SIGKILLed sweep with the same W&B run id, and what the offline W&B folder holds."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHORT = ["trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1", "data.samples_per_epoch=8"]


def _launch(args, **kw):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "sweeps.launch", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, encoding="utf-8", **kw)


def _wandb_record(run_dir: Path) -> bytes:
    # wandb >= 0.19 has no Python reader for its record log; its records are uncompressed protobuf
    return b"".join(p.read_bytes() for p in run_dir.glob("wandb/offline-run-*/*.wandb"))


def test_transfer_sweep_fills_the_matrix_and_a_rerun_redoes_nothing(tmp_path, phantom_root):
    cache = phantom_root.parents[1]
    args = ["transfer", "--preset", "smoke", "--runs", str(tmp_path), f"paths.cache={cache}", *SHORT]
    first = _launch(args, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "3 runs, 0 finished" in first.stdout
    sweep = tmp_path / "transfer-smoke"
    rows = list(csv.DictReader((sweep / "transfer_matrix.csv").open(encoding="utf-8")))
    sources = ["covid19_20", "ctseg", "mosmed"]
    assert sorted(r["train"] for r in rows) == sources
    for r in rows:  # every train x test cell holds a Dice
        assert all(0.0 <= float(r[s]) <= 1.0 for s in sources), r
    assert (sweep / "transfer_matrix.png").stat().st_size > 1000
    assert "PHANTOM DATA" in (sweep / "transfer_matrix.md").read_text(encoding="utf-8")
    # the diagonal and the off-diagonal cells of a column score the same patients
    tested = {}
    for run in (p for p in (sweep / "transfer").iterdir() if p.is_dir()):  # not the runs' lock files
        cases = {(r["source"], r["case"]) for r in csv.DictReader((run / "per_case.csv").open(encoding="utf-8"))}
        tested[run.name.split("-")[0]] = cases
    assert tested["covid19_20"] == tested["mosmed"] == tested["ctseg"]
    assert {s for s, _ in tested["mosmed"]} == set(sources)

    # W&B: one offline run per experiment, grouped by sweep, tagged, with tables and overlay images
    run = next((sweep / "transfer").glob("mosmed-*"))
    assert len(list(run.glob("wandb/offline-run-*"))) == 1
    raw = _wandb_record(run)
    for needle in (b"transfer-smoke", b"train:mosmed", b"test:ctseg", b"model:unet3d", b"test/per_case",
                   b"selection/table", b"overlay/", b"test/mean/dice", b"val/mean/dice"):
        assert needle in raw, needle

    # the sweep's report is one more W&B run in the same group: the matrix as a table and as a heatmap
    report_log = b"".join(p.read_bytes() for p in sweep.glob("report/wandb/offline-run-*/*.wandb"))
    for needle in (b"transfer-smoke", b"matrix_transfer", b"plot/transfer_matrix", b"report"):
        assert needle in report_log, needle

    mtimes = {p: p.stat().st_mtime_ns for p in sweep.glob("transfer/*/metrics.json")}
    second = _launch(args, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:]
    assert "3 runs, 3 finished (skipped), 0 to resume, 0 to start" in second.stdout
    assert "starting" not in second.stdout and "resuming" not in second.stdout
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_killed_sweep_resumes_the_interrupted_run_with_the_same_wandb_id(tmp_path, phantom_root):
    cache = phantom_root.parents[1]
    sweep_file = tmp_path / "one.yaml"
    sweep_file.write_text(yaml.safe_dump({"name": "one", "method": "grid", "parameters": {
        "protocol": {"value": "loso"}, "data.holdout": {"value": "mosmed"}}, "covid_dg": {"report": "loso_table"}},
        sort_keys=False), encoding="utf-8")
    args = [str(sweep_file), "--preset", "smoke", "--runs", str(tmp_path / "runs"), f"paths.cache={cache}",
            "trainer.max_epochs=8", "trainer.check_val_every_n_epoch=4", "data.samples_per_epoch=8"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sweeps.launch", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    runs = tmp_path / "runs" / "one-smoke" / "loso"
    deadline = time.time() + 600
    try:
        while not list(runs.glob("*/checkpoints/last.ckpt")):  # killed once an epoch is saved
            assert proc.poll() is None, "sweep ended before it could be killed"
            assert time.time() < deadline, "no checkpoint within 10 minutes"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its run, without any cleanup
        proc.wait()
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    assert not (run / "done").exists()
    first_id = {p.name.rsplit("-", 1)[1] for p in run.glob("wandb/offline-run-*")}

    again = _launch(args, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "1 to resume" in again.stdout and "resuming" in again.stdout
    log = (run.parents[1] / "logs" / f"{run.name}.log").read_text(encoding="utf-8")
    assert "resuming from" in log and "last.ckpt" in log
    assert (run / "done").exists() and (run / "per_case.csv").exists()
    ids = {p.name.rsplit("-", 1)[1] for p in run.glob("wandb/offline-run-*")}
    assert len(list(run.glob("wandb/offline-run-*"))) == 2  # one W&B run, written in two sessions
    assert ids == first_id and len(ids) == 1
    (row,) = list(csv.DictReader((run.parents[1] / "loso_table.csv").open(encoding="utf-8")))
    assert row["holdout"] == "mosmed" and 0.0 <= float(row["dice_mean"]) <= 1.0


def test_slurm_backend_submits_through_submitit(tmp_path, phantom_root):
    """submitit's `local` cluster runs the job array as local processes: the same code path a SLURM
    cluster takes, without a cluster."""
    cache = phantom_root.parents[1]
    sweep_file = tmp_path / "one.yaml"
    sweep_file.write_text(yaml.safe_dump({"name": "one", "method": "grid", "parameters": {
        "protocol": {"value": "loso"}, "data.holdout": {"value": "mosmed"}}}, sort_keys=False), encoding="utf-8")
    args = [str(sweep_file), "--preset", "smoke", "--runs", str(tmp_path / "runs"), "--backend", "slurm",
            "--slurm-cluster", "local", "--slurm", "timeout_min=20", f"paths.cache={cache}", *SHORT,
            "wandb.mode=disabled"]
    done = _launch(args, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "submitted" in done.stdout
    (run,) = [p for p in (tmp_path / "runs" / "one-smoke" / "loso").iterdir() if p.is_dir()]
    assert (run / "done").exists() and list((tmp_path / "runs" / "one-smoke" / "slurm").iterdir())
