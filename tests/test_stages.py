"""Runs in stages with files between them (issue 16): plan.json -> train -> predictions/ -> score.

One short LOSO run (module scope) is re-scored from its files, re-trained from its plan (as written and
edited), and its predictions are checked against the stored images' headers, read independently.
"""
import ast
import copy
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from datamodules.splits import LeakageError
from evaluation.records import RunInfo
from experiments.loso import main as loso_main
from experiments.plan import read_plan

REPO = Path(__file__).resolve().parents[1]
SHORT = ["experiment=smoke", "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1", "data.samples_per_epoch=4",
         "wandb.mode=disabled", "trainer.threads=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, phantom_root):
    runs = tmp_path_factory.mktemp("runs")
    cache = phantom_root.parents[1]
    loso_main(["--holdout", "mosmed", *SHORT, f"paths.runs={runs}", f"paths.cache={cache}"])
    (run_dir,) = [p for p in (runs / "loso").iterdir() if p.is_dir()]
    return run_dir, runs, cache


def test_score_reproduces_the_runs_metrics_exactly(run, tmp_path, capsys):
    from experiments.score import main as score_main
    from experiments.score import score_predictions

    run_dir, _, _ = run
    written = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert score_main([str(run_dir), "--out", str(tmp_path)]) == 0
    assert "reproduced exactly" in capsys.readouterr().out
    again = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert again == written  # every key, floats bit for bit
    assert all(type(again[k]) is type(written[k]) for k in written)
    assert (tmp_path / "per_case.csv").read_text(encoding="utf-8") == (run_dir / "per_case.csv").read_text(encoding="utf-8")
    # the API the nnU-Net import calls: the test keys of metrics.json, and the rows
    metrics, rows = score_predictions(read_plan(run_dir), run_dir / "predictions")
    assert metrics == {k: v for k, v in written.items() if k.startswith("test/")}
    assert {r["case"] for r in rows} == {k.split("/", 1)[1] for k in read_plan(run_dir)["roles"]["test"]}
    # the other selection rule (last) is re-scored from its own predictions, or the headline's
    assert (tmp_path / "selection" / "last" / "per_case.csv").read_text(encoding="utf-8") == \
        (run_dir / "selection" / "last" / "per_case.csv").read_text(encoding="utf-8")


def test_predictions_have_the_stored_images_shape_and_affine(run):
    run_dir, _, _ = run
    plan = read_plan(run_dir)
    assert plan["roles"]["test"]
    for key in plan["roles"]["test"]:
        rec = plan["cases"][key]
        pred = nib.load(str(run_dir / "predictions" / rec["source"] / f"{rec['case_id']}.nii.gz"))
        stored = nib.load(rec["image"])  # the original file, read here with nibabel alone
        assert pred.shape == stored.shape, key
        assert np.allclose(pred.affine, stored.affine, atol=1e-4), key
        assert pred.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= set(range(len(plan["classes"])))


def test_run_json_is_one_typed_record_and_old_files_load(run):
    run_dir, _, _ = run
    raw = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    info = RunInfo.from_json(raw)
    assert info.to_json() == raw and info.plan_hash == read_plan(run_dir)["hash"]
    old = RunInfo.from_json({"kind": "loso", "seed": 0, "old_key": 1})  # a run.json of an older version
    assert old.method == "erm" and old.harmonize_off == "none" and old.selection == {}
    assert old.to_json()["old_key"] == 1 and "task" not in old.to_json()


def _edited(run_dir: Path, tmp_path: Path, change) -> Path:
    plan = copy.deepcopy(read_plan(run_dir))
    change(plan)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan), encoding="utf-8")
    return path


def test_train_from_an_edited_plan_trains_that_split_under_another_name(run, tmp_path, capsys):
    from experiments.train import main as train_main

    run_dir, runs, cache = run
    plan = read_plan(run_dir)
    moved = plan["roles"]["val"][0]
    patient = plan["cases"][moved]["patient_id"]
    group = [k for k in plan["roles"]["val"] if plan["cases"][k]["patient_id"] == patient
             and plan["cases"][k]["source"] == plan["cases"][moved]["source"]]

    def move(p):
        p["roles"]["val"] = [k for k in p["roles"]["val"] if k not in group]
        p["roles"]["train"] += group

    path = _edited(run_dir, tmp_path, move)
    train_main(["--plan", str(path), f"paths.runs={runs}", f"paths.cache={cache}"])
    out = capsys.readouterr().out
    new_dirs = [p for p in (runs / "loso").iterdir() if p.is_dir() and p != run_dir]
    assert len(new_dirs) == 1 and new_dirs[0].name != run_dir.name
    new_plan = read_plan(new_dirs[0])
    assert new_plan["roles"]["train"] == plan["roles"]["train"] + group
    assert new_plan["roles"]["val"] == [k for k in plan["roles"]["val"] if k not in group]
    assert new_plan["roles"]["test"] == plan["roles"]["test"]
    assert new_plan["origin"]["edited"] is True and new_plan["origin"]["path"] == str(path.resolve())
    assert f"from {path.resolve()}" in out
    info = RunInfo.read(new_dirs[0] / "run.json")
    assert info.plan_origin["edited"] is True
    # the report shows the plan: cases per role and source, and that it was edited
    from evaluation.reporting.runs import read_run
    from evaluation.reporting.tables import _plan_cell

    cell = _plan_cell(read_run(new_dirs[0]).plan)
    assert "EDITED PLAN" in cell and "test mosmed" in cell


def test_a_plan_with_a_held_out_case_in_train_raises_leakage_naming_it(run, tmp_path):
    from experiments.train import main as train_main

    run_dir, runs, cache = run
    leaked = read_plan(run_dir)["roles"]["test"][0]

    def leak(p):
        p["roles"]["test"].remove(leaked)
        p["roles"]["train"].append(leaked)

    path = _edited(run_dir, tmp_path, leak)
    with pytest.raises(LeakageError, match=leaked):
        train_main(["--plan", str(path), f"paths.runs={tmp_path / 'runs'}", f"paths.cache={cache}"])


def test_lightning_modules_import_nothing_from_experiments_or_reporting():
    bad = []
    for path in sorted((REPO / "lightning_modules").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad += [f"{path.name}: {n}" for n in names
                    if n.split(".")[0] == "experiments" or n.startswith("evaluation.reporting")]
    assert not bad, bad
    source = (REPO / "lightning_modules" / "segmentation.py").read_text(encoding="utf-8")
    for io_call in ("load_original", "write_volume", "prediction_dir", "meta.json", "json."):
        assert io_call not in source, io_call


def test_per_case_rows_carry_the_cases_sanity(run):
    """Issue 19: every test row says whether its case's prediction is plausible (evaluation.sanity), the
    same value on every row of a case; `experiments.score` reproduces it (the per_case.csv equality above)."""
    import csv

    run_dir, _, _ = run
    with (run_dir / "per_case.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["sanity"] for r in rows)
    by_case = {}
    for r in rows:
        by_case.setdefault((r["source"], r["case"]), set()).add(r["sanity"])
    assert all(len(v) == 1 for v in by_case.values())
