"""The local sweep backend says what each run is doing (issue 19): skipped/starting/done/FAILED lines, the
finished run's key metric, its log path and the sweep's ETA; driven with a stand-in run program."""
import json

from sweeps import launch


def run(tmp_path, name, done=False, **extra):
    run_dir = tmp_path / "runs" / name
    if done:
        run_dir.mkdir(parents=True)
        (run_dir / "done").write_text("x\n", encoding="utf-8")
        (run_dir / "metrics.json").write_text(json.dumps({"test/mean/dice": 0.125}), encoding="utf-8")
    overrides = [f"run_dir={run_dir}", *(f"{k}={v}" for k, v in extra.items())]
    return {"run_dir": str(run_dir), "overrides": overrides, "done": done, "started": done}


def test_local_backend_prints_status_metric_log_and_eta(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(launch, "RUN_PROGRAM", "tests.fake_sweep_run")
    runs = [run(tmp_path, "a", done=True), run(tmp_path, "b", dice=0.75), run(tmp_path, "c", fail=1),
            run(tmp_path, "d", dice=0.5)]
    failed = launch._run_local(runs, tmp_path / "logs")
    out = capsys.readouterr().out.splitlines()
    assert [r["run_dir"] for r in failed] == [runs[2]["run_dir"]]
    assert out[0] == f"[sweep] skipped (already done) {runs[0]['run_dir']} test/mean/dice=0.1250"
    assert out[1] == f"[sweep] 1/3 starting {runs[1]['run_dir']} (log {tmp_path / 'logs' / 'b.log'})"
    assert out[2].startswith("[sweep] 1/3 done in 0:0") and out[2].endswith(f"{runs[1]['run_dir']} test/mean/dice=0.7500")
    assert out[3].startswith("[sweep] 2 run(s) left, ETA 0:0") and "per finished run" in out[3]
    assert out[5].startswith("[sweep] 2/3 FAILED (exit 3) after") and out[5].endswith(f"log {tmp_path / 'logs' / 'c.log'}")
    assert out[-1].startswith("[sweep] 3/3 done in") and out[-1].endswith("test/mean/dice=0.5000")
    assert "fake run" in (tmp_path / "logs" / "c.log").read_text(encoding="utf-8")
    assert runs[1]["wall_s"] >= 0 and runs[3]["done"] and not runs[2]["done"]


def test_eta_is_the_mean_of_finished_runs_times_the_runs_left():
    assert launch.sweep_eta([60.0, 120.0], 4) == 360.0
    assert launch.sweep_eta([], 3) is None and launch.sweep_eta([10.0], 0) == 0.0
    assert launch.clock(3725) == "1:02:05" and launch.clock(None) == "?"


def test_key_metric_reads_a_finished_runs_metrics(tmp_path):
    assert launch.key_metric(tmp_path) == ""
    (tmp_path / "metrics.json").write_text(json.dumps({"test/mean/selection_dice": 0.25, "val/mean/dice": 0.9}), encoding="utf-8")
    assert launch.key_metric(tmp_path) == "test/mean/selection_dice=0.2500"
