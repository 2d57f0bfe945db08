"""Model selection rules recorded side by side, and CPU determinism of a whole run."""
import csv
import json
from pathlib import Path

from evaluation.reporting.runs import collect_runs
from evaluation.reporting.tables import build_tables
from evaluation.selection_rules import choose, read_records, validated_sources
from experiments.loso import main as loso_main

SHORT = ["experiment=smoke", "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1", "data.samples_per_epoch=4",
         "wandb.mode=disabled", "evaluation.save_predictions=false", "trainer.threads=1"]


def test_loso_selection_validates_on_a_whole_training_source_and_reports_oracle_and_last(tmp_path, phantom_root):
    args = ["--holdout", "mosmed", *SHORT, f"paths.runs={tmp_path}", f"paths.cache={phantom_root.parents[1]}",
            "selection.method=loso", "selection.val_source=ctseg", "selection.report=[last,oracle]"]
    loso_main(args)
    (run_dir,) = [p for p in (tmp_path / "loso").iterdir() if p.is_dir()]
    info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    roles = {(r["role"], r["source"]): r["cases"] for r in info["split"]}
    # ctseg validates whole and never trains; covid19_20 trains whole; mosmed tests
    assert ("train", "ctseg") not in roles and roles[("val", "ctseg")] == 7
    assert ("val", "covid19_20") not in roles and roles[("train", "covid19_20")] == 6
    assert info["train_sources"] == ["covid19_20"]
    sel = info["selection"]
    assert sel["method"] == "loso" and set(sel["checkpoints"]) == {"loso", "last", "oracle"}
    assert sel["checkpoints"]["oracle"]["path"].split("/")[-1].startswith("oracle-epoch")
    from pathlib import Path
    assert all(Path(c["path"]).exists() for c in sel["checkpoints"].values())
    for rule in ("last", "oracle"):
        rows = list(csv.DictReader((run_dir / "selection" / rule / "per_case.csv").open(encoding="utf-8")))
        assert {r["source"] for r in rows} == {"mosmed"} and len({r["case"] for r in rows}) == 6
    # the oracle picked its epoch by the test Dice it saw: no other epoch's checkpoint scores higher there
    assert sel["checkpoints"]["oracle"]["score"] >= 0.0
    # the same choices from the run's records (evaluation.selection_rules): validated on ctseg alone
    records = read_records(run_dir)
    assert [r["epoch"] for r in records] == [1, 2] and all(validated_sources(r) == {"ctseg"} for r in records)
    for rule in ("loso", "oracle", "last"):
        assert choose(rule, records, val_source="ctseg")["step"] == sel["checkpoints"][rule]["global_step"], rule
    tables = build_tables(collect_runs([tmp_path]), n_boot=50)
    (row,) = tables["selection"]
    assert row["headline"] == "loso" and {"loso_mean", "last_mean", "oracle_mean"} <= set(row)
    assert row["oracle_mean"] == sel["test"]["oracle"]["test/mean/selection_dice"]


def test_same_seed_same_split_and_metrics_on_cpu(tmp_path, phantom_root):
    cache = phantom_root.parents[1]
    for name in ("a", "b"):
        loso_main(["--holdout", "ctseg", *SHORT, f"paths.runs={tmp_path / name}", f"paths.cache={cache}"])
    (a,), (b,) = [[p for p in (tmp_path / n / "loso").iterdir() if p.is_dir()] for n in ("a", "b")]
    assert (a / "per_case.csv").read_text(encoding="utf-8") == (b / "per_case.csv").read_text(encoding="utf-8")
    assert (a / "val_per_case.csv").read_text(encoding="utf-8") == (b / "val_per_case.csv").read_text(encoding="utf-8")
    ia, ib = json.loads((a / "run.json").read_text(encoding="utf-8")), json.loads((b / "run.json").read_text(encoding="utf-8"))
    assert ia["split"] == ib["split"] and ia["config_hash"] == ib["config_hash"]


def test_every_rules_choice_is_read_before_validate_and_test_restore_callback_states(tmp_path):
    """Lightning's validate/test restore callback states from the checkpoint they load; a choice read
    afterwards can point at a checkpoint the rule has since replaced (and deleted)."""
    from types import SimpleNamespace as NS

    import torch

    from experiments.stages.test import select_and_test

    paths = {}
    for name, epoch in (("last", 5), ("best-epoch004", 4), ("oracle-epoch002", 2)):
        paths[name] = tmp_path / f"{name}.ckpt"
        torch.save({"epoch": epoch, "global_step": 10 * epoch}, paths[name])
    callbacks = {"last": NS(dirpath=str(tmp_path)),
                 "training_domain": NS(best_model_path=str(paths["best-epoch004"]), best_model_score=torch.tensor(0.7)),
                 "oracle": NS(best_model_path=str(paths["oracle-epoch002"]), best_model_score=torch.tensor(0.4))}
    rows = [{"source": "s", "case": "c1", "class": "lesion", "dice": 0.5}]

    class Trainer:
        def validate(self, module, datamodule, ckpt_path, verbose, weights_only):
            callbacks["oracle"].best_model_path = str(tmp_path / "oracle-epoch001.ckpt")  # the restore
            return [{"val/mean/dice": 0.7}]

    tested = []

    def test(ckpt_path, out, headline):  # the predict and score stages of one checkpoint
        tested.append((Path(ckpt_path).name, out, headline))
        return {"test/mean/dice": float(torch.load(ckpt_path)["epoch"])}, rows

    module = NS(last_rows={"val": []})
    dm = NS(split=NS(val=("v",), test=(NS(case_id="c1"),)))
    metrics, _, _, record = select_and_test(Trainer(), module, dm, tmp_path, callbacks,
                                            ["training_domain", "oracle", "last"], test)
    assert record["checkpoints"]["oracle"]["path"] == str(paths["oracle-epoch002"])
    assert record["test"]["oracle"]["test/mean/dice"] == 2.0 and metrics["test/mean/dice"] == 4.0
    assert record["test"]["last"]["test/mean/dice"] == 5.0 and record["checkpoints"]["last"]["global_step"] == 50
    # the headline predicts into the run folder, the other rules into selection/<rule>/
    assert tested == [("best-epoch004.ckpt", tmp_path, True), ("oracle-epoch002.ckpt", tmp_path / "selection" / "oracle", False),
                      ("last.ckpt", tmp_path / "selection" / "last", False)]


def test_validation_never_shifts_the_training_patches(tmp_path, phantom_root):
    """Starting a DataLoader iterator draws from its generator; the volume loaders have their own, so
    asking for the oracle (a second validation loader) leaves training, hence the last epoch, unchanged."""
    cache = phantom_root.parents[1]
    for name, extra in (("plain", []), ("oracle", ["selection.report=[last,oracle]"])):
        loso_main(["--holdout", "mosmed", *SHORT, f"paths.runs={tmp_path / name}", f"paths.cache={cache}", *extra])
    (a,), (b,) = [[p for p in (tmp_path / n / "loso").iterdir() if p.is_dir()] for n in ("plain", "oracle")]
    ta = json.loads((a / "run.json").read_text(encoding="utf-8"))["selection"]["test"]["last"]
    tb = json.loads((b / "run.json").read_text(encoding="utf-8"))["selection"]["test"]["last"]
    assert ta == tb
