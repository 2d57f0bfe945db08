"""Selection rules as pure functions over epoch records (evaluation.selection_rules), the records a run writes
(experiments.epoch_records), and their agreement with the checkpoints the run itself selected."""
import csv
import json
import math
import random
from pathlib import Path

import pytest

from evaluation.selection_rules import RULES, choose, read_records
from experiments.epoch_records import append_record, truncate_records


def rec(epoch, val=None, oracle=None, sources=("a", "b"), **extra):
    r = {"epoch": epoch, "step": 10 * (epoch + 1), "checkpoints": []}
    for s in sources:
        r[f"val/{s}/cases"] = 3.0
    if val is not None:
        r["val/mean/selection_dice"] = val
    if oracle is not None:
        r["oracle/mean/selection_dice"] = oracle
    r.update(extra)
    return r


def epoch_of(r):
    return None if r is None else r["epoch"]


def test_the_registry_holds_the_four_rules():
    assert set(RULES) >= {"training_domain", "loso", "oracle", "last"}
    with pytest.raises(ValueError, match="unknown"):
        choose("best_guess", [])


def test_each_rule_picks_its_record():
    records = [rec(0, 0.1, 0.5), rec(1, 0.4, 0.2), rec(2, 0.3, 0.6), rec(3, 0.2, 0.1)]
    shuffled = random.Random(0).sample(records, len(records))  # file order does not matter
    for rs in (records, shuffled):
        assert epoch_of(choose("training_domain", rs)) == 1
        assert epoch_of(choose("loso", rs)) == 1
        assert epoch_of(choose("oracle", rs)) == 2
        assert epoch_of(choose("last", rs)) == 3
    assert choose("training_domain", records) is records[1]  # the record itself, checkpoints and all


def test_ties_go_to_the_later_epoch():
    # a flat validation score (issue 19: one validation patient at Dice 0 every check) picks the last tied epoch
    records = [rec(0, 0.0, 0.3), rec(1, 0.5, 0.7), rec(2, 0.5, 0.7), rec(3, 0.2, 0.7), rec(4, 0.5, 0.1)]
    assert epoch_of(choose("training_domain", records)) == 4
    assert epoch_of(choose("oracle", records)) == 3
    flat = [rec(e, 0.0) for e in range(4)]
    assert epoch_of(choose("training_domain", flat)) == 3


def test_a_record_lacking_the_metric_or_holding_nan_is_never_chosen():
    records = [rec(0, 0.3), rec(1, float("nan"), 0.9), rec(2, None, 0.2), rec(3, float("inf")), rec(4, "0.9"),
               {"epoch": 5, "step": 60, "val/mean/selection_dice": None}]
    assert epoch_of(choose("training_domain", records)) == 0
    assert epoch_of(choose("oracle", records)) == 1
    assert choose("oracle", [rec(0, 0.3)]) is None          # no oracle requested: no oracle choice
    assert choose("training_domain", [rec(0, float("nan"))]) is None
    assert choose("last", []) is None
    assert epoch_of(choose("last", records)) == 5           # `last` needs no metric


def test_loso_with_a_val_source_takes_only_records_validated_on_that_source_alone():
    loso_run = [rec(0, 0.2, sources=("ctseg",)), rec(1, 0.6, sources=("ctseg",)), rec(2, 0.4, sources=("ctseg",))]
    assert epoch_of(choose("loso", loso_run, val_source="ctseg")) == 1
    assert choose("loso", loso_run, val_source="covid19_20") is None
    # a training-domain run validates on patients of trained sources: not a leave-one-source-out validation
    assert choose("loso", [rec(0, 0.9, sources=("ctseg", "covid19_20"))], val_source="ctseg") is None


def test_test_domain_metrics_never_change_a_training_domain_loso_or_last_choice():
    """Property: whatever the oracle/test-domain numbers, the rules that may not look at them choose the same."""
    rng = random.Random(17)
    blind = ("training_domain", "loso", "last")
    for _ in range(300):
        n = rng.randint(1, 8)
        # few distinct values: ties are frequent
        records = [rec(e, rng.choice([None, float("nan"), 0.0, 0.25, 0.5, rng.random()]),
                       rng.choice([None, float("nan"), 0.1, rng.random()]),
                       **{"oracle/mosmed/dice": rng.random(), "test/mean/dice": rng.random()})
                   for e in range(n)]
        records = rng.sample(records, n)
        before = {name: epoch_of(choose(name, records)) for name in blind}
        for r in records:  # change, remove or add test-domain values
            for k in [k for k in r if k.startswith(("oracle/", "test/"))]:
                if rng.random() < 0.2:
                    del r[k]
                else:
                    r[k] = rng.choice([float("nan"), -1.0, 2.0, None, rng.random()])
            if rng.random() < 0.3:
                r["oracle/mean/selection_dice"] = rng.random()
                r["test/mosmed/dice"] = rng.random()
        assert {name: epoch_of(choose(name, records)) for name in blind} == before


def test_truncation_keeps_the_epochs_a_resumed_run_does_not_redo(tmp_path):
    path = tmp_path / "records.jsonl"
    assert truncate_records(path, 3) == 0 and not path.exists()
    for e in range(1, 6):  # epochs are numbered from 1, as printed
        append_record(path, rec(e, 0.1 * e))
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"epoch": 6, "step": 6')  # a write cut short by a kill
    assert [r["epoch"] for r in read_records(path)] == [1, 2, 3, 4, 5]
    assert truncate_records(path, 3) == 3  # resumed from a checkpoint with 3 finished epochs: 1, 2, 3 stay
    assert [r["epoch"] for r in read_records(tmp_path)] == [1, 2, 3]
    assert path.read_text(encoding="utf-8").endswith("}\n")
    append_record(path, rec(4, 0.7))
    assert [r["epoch"] for r in read_records(path)] == [1, 2, 3, 4]
    assert truncate_records(path, 0) == 0 and read_records(path) == []  # a fresh start
    assert not list(tmp_path.glob(".tmp-*"))


SHORT = ["experiment=smoke", "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=1", "data.samples_per_epoch=4",
         "wandb.mode=disabled", "evaluation.save_predictions=false", "trainer.threads=1"]


def test_a_run_records_every_validated_epoch_and_the_rules_pick_its_checkpoints(tmp_path, phantom_root):
    from experiments.loso import main as loso_main

    loso_main(["--holdout", "mosmed", *SHORT, f"paths.runs={tmp_path}", f"paths.cache={phantom_root.parents[1]}",
               "selection.report=[last,oracle]"])
    (run_dir,) = [p for p in (tmp_path / "loso").iterdir() if p.is_dir()]
    records = read_records(run_dir)
    lines = (run_dir / "records.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(records) == 3 and [r["epoch"] for r in records] == [1, 2, 3]  # 1-based, as printed
    # the val and oracle keys are those the run logged in that epoch, with the logged values (the CSV logger
    # writes the step index, global_step - 1, and Lightning's 0-based epoch; a row at epoch 3 is the test stage's
    # validation of the choice)
    logged = {}
    for row in csv.DictReader((run_dir / "csv" / "metrics.csv").open(encoding="utf-8")):
        if row.get("val/mean/selection_dice"):
            logged[int(row["epoch"]), int(row["step"]) + 1] = {k: float(v) for k, v in row.items()
                                                               if k.startswith(("val/", "oracle/")) and v != ""}
    assert [e for e, _ in sorted(logged)] == [0, 1, 2, 3]
    for r in records:
        mine, theirs = {k: v for k, v in r.items() if k.startswith(("val/", "oracle/"))}, logged[r["epoch"] - 1, r["step"]]
        assert set(mine) == set(theirs)
        assert all(math.isclose(mine[k], theirs[k], rel_tol=1e-6, abs_tol=1e-9) for k in mine)
        assert any(k.startswith("oracle/mosmed/") for k in mine) and not any(k.startswith("test/") for k in r)
        assert r["step"] > 0 and all((run_dir / c).name.endswith(".ckpt") for c in r["checkpoints"])
    # the rules over the file choose the steps the run tested
    sel = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["selection"]["checkpoints"]
    for name in ("training_domain", "last", "oracle"):
        chosen = choose(name, records)
        assert chosen["step"] == sel[name]["global_step"], (name, records, sel)
        assert chosen["epoch"] == sel[name]["epoch"]
        if name != "last":
            assert Path(sel[name]["path"]) in {run_dir / c for c in chosen["checkpoints"]}
            assert math.isclose(chosen[f"{'oracle' if name == 'oracle' else 'val'}/mean/selection_dice"],
                                sel[name]["score"], rel_tol=1e-6)


def test_the_runs_checkpoints_break_ties_as_the_rules_do(tmp_path):
    """The in-run ModelCheckpoint of a rule replaces its choice on an equal score (Lightning's keeps the
    earlier epoch), so a run's chosen checkpoint and the rule over its records agree on ties."""
    from types import SimpleNamespace as NS

    import torch

    from experiments.selection import checkpoint_callbacks

    cb = checkpoint_callbacks(tmp_path, ["training_domain", "last"], has_val=True)["training_domain"]
    trainer = NS(strategy=NS(reduce_boolean_decision=lambda b: b))
    assert cb.check_monitor_top_k(trainer, torch.tensor(0.1))  # nothing saved yet
    cb.best_k_models, cb.kth_best_model_path = {"best-epoch001.ckpt": torch.tensor(0.5)}, "best-epoch001.ckpt"
    assert cb.check_monitor_top_k(trainer, torch.tensor(0.5))       # a tie: the later epoch
    assert cb.check_monitor_top_k(trainer, torch.tensor(0.6))
    assert not cb.check_monitor_top_k(trainer, torch.tensor(0.4))
    assert not cb.check_monitor_top_k(trainer, torch.tensor(float("nan")))
    assert not cb.check_monitor_top_k(trainer, None)
    # its state is ModelCheckpoint's: checkpoints written before keep their rules' choices on resume
    assert cb.state_key.startswith("ModelCheckpoint{")
