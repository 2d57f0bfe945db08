"""Model selection rules recorded side by side, and CPU determinism of a whole run."""
import csv
import json

from evaluation.reporting.runs import collect_runs
from evaluation.reporting.tables import build_tables
from experiments.loso import main as loso_main

SHORT = ["experiment=smoke", "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1", "data.samples_per_epoch=4",
         "wandb.mode=disabled", "evaluation.save_predictions=false", "trainer.threads=1"]


def test_loso_selection_validates_on_a_whole_training_source_and_reports_oracle_and_last(tmp_path, phantom_root):
    args = ["--holdout", "mosmed", *SHORT, f"paths.runs={tmp_path}", f"paths.cache={phantom_root.parents[1]}",
            "selection.method=loso", "selection.val_source=ctseg", "selection.report=[last,oracle]"]
    loso_main(args)
    (run_dir,) = list((tmp_path / "loso").iterdir())
    info = json.loads((run_dir / "run.json").read_text())
    roles = {(r["role"], r["source"]): r["cases"] for r in info["split"]}
    # ctseg validates whole and never trains; covid19_20 trains whole; mosmed tests
    assert ("train", "ctseg") not in roles and roles[("val", "ctseg")] == 7
    assert ("val", "covid19_20") not in roles and roles[("train", "covid19_20")] == 6
    assert info["train_sources"] == ["covid19_20"]
    sel = info["selection"]
    assert sel["method"] == "loso" and set(sel["checkpoints"]) == {"loso", "last", "oracle"}
    assert sel["checkpoints"]["oracle"]["path"].split("/")[-1].startswith("oracle-epoch")
    for rule in ("last", "oracle"):
        rows = list(csv.DictReader((run_dir / "selection" / rule / "per_case.csv").open()))
        assert {r["source"] for r in rows} == {"mosmed"} and len({r["case"] for r in rows}) == 6
    # the oracle picked its epoch by the test Dice it saw: no other epoch's checkpoint scores higher there
    assert sel["checkpoints"]["oracle"]["score"] >= 0.0
    tables = build_tables(collect_runs([tmp_path]), n_boot=50)
    (row,) = tables["selection"]
    assert row["headline"] == "loso" and {"loso_mean", "last_mean", "oracle_mean"} <= set(row)
    assert row["oracle_mean"] == sel["test"]["oracle"]["test/mean/selection_dice"]


def test_same_seed_same_split_and_metrics_on_cpu(tmp_path, phantom_root):
    cache = phantom_root.parents[1]
    for name in ("a", "b"):
        loso_main(["--holdout", "ctseg", *SHORT, f"paths.runs={tmp_path / name}", f"paths.cache={cache}"])
    (a,), (b,) = [list((tmp_path / n / "loso").iterdir()) for n in ("a", "b")]
    assert (a / "per_case.csv").read_text() == (b / "per_case.csv").read_text()
    assert (a / "val_per_case.csv").read_text() == (b / "val_per_case.csv").read_text()
    ia, ib = json.loads((a / "run.json").read_text()), json.loads((b / "run.json").read_text())
    assert ia["split"] == ib["split"] and ia["config_hash"] == ib["config_hash"]
