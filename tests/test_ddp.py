"""DDP on CPU (gloo): the same checkpoint tested by 1 and by 2 processes gives the identical per-case
table, although DistributedSampler pads 7 test cases to 8 (one case scored twice); also with a test-time
method, whose adaptation must see the same test volumes on every rank."""
import csv
import os
import subprocess
import sys
from pathlib import Path

from experiments.loso import main as loso_main

REPO = Path(__file__).resolve().parents[1]


def _test_run(run_dir: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "experiments.test_run", str(run_dir), "--out", str(out),
                           "trainer.accelerator=cpu", "trainer.threads=1", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=600)


def test_one_and_two_processes_give_the_identical_per_case_table(tmp_path, phantom_root):
    cache = phantom_root.parents[1]
    loso_main(["--holdout", "ctseg", "experiment=smoke", f"paths.runs={tmp_path}", f"paths.cache={cache}",
               "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1", "data.samples_per_epoch=4",
               "trainer.threads=1", "wandb.mode=disabled", "evaluation.save_predictions=false"])
    (run_dir,) = [p for p in (tmp_path / "loso").iterdir() if p.is_dir()]
    one = _test_run(run_dir, tmp_path / "one", "trainer.devices=1")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _test_run(run_dir, tmp_path / "two", "trainer.devices=2", "trainer.strategy=ddp")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 process(es)" in two.stdout
    a = (tmp_path / "one" / "per_case.csv").read_text(encoding="utf-8")
    b = (tmp_path / "two" / "per_case.csv").read_text(encoding="utf-8")
    assert a == b
    rows = list(csv.DictReader(a.splitlines()))
    cases = [r["case"] for r in rows if r["class"] == "lesion"]
    assert len(cases) == len(set(cases)) == 7  # every ctseg case once: none dropped, the padded one not twice
    # the run itself (1 process, same thread count) scored the same checkpoint identically
    assert (run_dir / "per_case.csv").read_text(encoding="utf-8") == a
    import json
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text(encoding="utf-8"))
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text(encoding="utf-8"))
    assert m2["world_size"] == 2 and m1["test/ctseg/dice"] == m2["test/ctseg/dice"]


def test_test_time_adaptation_is_the_same_on_one_and_two_processes(tmp_path, phantom_root):
    """bn_adapt re-estimates statistics on every test volume on each rank (not on the rank's shard), so
    the two ranks hold one model and 1 and 2 processes score identically."""
    cache = phantom_root.parents[1]
    loso_main(["--holdout", "ctseg", "experiment=smoke", f"paths.runs={tmp_path}", f"paths.cache={cache}",
               "method.name=bn_adapt", "networks.unet.norm=batch", "trainer.max_epochs=1",
               "trainer.check_val_every_n_epoch=1", "data.samples_per_epoch=4", "trainer.threads=1",
               "wandb.mode=disabled", "evaluation.save_predictions=false"])
    (run_dir,) = [p for p in (tmp_path / "loso").iterdir() if p.is_dir()]
    one = _test_run(run_dir, tmp_path / "one", "trainer.devices=1")
    assert one.returncode == 0, one.stderr[-3000:]
    assert "[method bn_adapt] adapted on 7 unlabelled test volume(s)" in one.stdout
    two = _test_run(run_dir, tmp_path / "two", "trainer.devices=2", "trainer.strategy=ddp")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "[method bn_adapt] adapted on 7 unlabelled test volume(s)" in two.stdout  # rank 0 saw all 7, not 4
    a = (tmp_path / "one" / "per_case.csv").read_text(encoding="utf-8")
    assert a == (tmp_path / "two" / "per_case.csv").read_text(encoding="utf-8")
    assert (run_dir / "per_case.csv").read_text(encoding="utf-8") == a  # the run itself adapted the same way
