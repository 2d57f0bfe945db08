"""Issue 19: a model selection never silently degenerate, one epoch numbering, and reports that list every run
they leave out with the reason."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch

from evaluation.selection_rules import VAL_KEY, choose, degenerate, epoch_number
from experiments.report import main as report_main
from tests.test_report import _lesion, write_run


def rec(epoch, value, key=VAL_KEY):
    return {"epoch": epoch, "step": 10 * epoch, "checkpoints": [], **({key: value} if value is not ... else {})}


@pytest.mark.parametrize("values, flat", [
    ([0.0, 0.0, 0.0], "is 0 at every one of the 3 validation checks"),
    ([0.5, 0.5], "is 0.5 at every one of the 2 validation checks"),
    ([None, math.nan, ...], "undefined at every one of the 3 validation check(s)"),  # null, NaN, missing
    ([None, 0.2, 0.2], "is 0.2 at every one of the 3 validation checks (1 undefined)"),
    ([0.1, 0.3, 0.3], None),  # a tie at the top is a choice (the later epoch), not a flat score
    ([0.0], None),  # one check: nothing to choose between, and nothing flat either
    ([], None),
])
def test_degenerate_on_hand_made_values(values, flat):
    records = [rec(e + 1, v) for e, v in enumerate(values)]
    why = degenerate(records, VAL_KEY)
    assert (why is None) == (flat is None)
    if flat:
        assert VAL_KEY in why and flat in why


def test_epoch_numbers_are_one_based_at_the_boundary():
    assert [epoch_number(e) for e in (0, 11)] == [1, 12]


def _run_select(tmp_path, records, names=("training_domain", "last")):
    from experiments.stages.test import select_and_test

    with (tmp_path / "records.jsonl").open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    best, last = tmp_path / "best-epoch002.ckpt", tmp_path / "last.ckpt"
    torch.save({"epoch": 1, "global_step": 20}, best)  # Lightning's 0-based epoch 1 = [epoch 2/N]
    torch.save({"epoch": 3, "global_step": 40}, last)
    callbacks = {"last": NS(dirpath=str(tmp_path)),
                 "training_domain": NS(best_model_path=str(best), best_model_score=torch.tensor(0.0))}

    class Trainer:
        def validate(self, module, datamodule, ckpt_path, verbose, weights_only):
            return [{"val/mean/dice": 0.0}]

    tested = []

    def test(ckpt, out, headline):
        tested.append(Path(ckpt).name)
        return {"test/mean/selection_dice": 0.5}, []

    dm = NS(split=NS(val=("v",), test=()))
    return select_and_test(Trainer(), NS(last_rows={"val": []}), dm, tmp_path, callbacks, list(names), test)[3], tested


def test_a_flat_validation_score_tests_the_last_epoch_and_says_so(tmp_path, capsys):
    record, tested = _run_select(tmp_path, [rec(2, 0.0), rec(4, 0.0)])
    assert record["degenerate"] is True
    head = record["checkpoints"]["training_domain"]
    assert Path(head["path"]).name == "last.ckpt" and head["epoch"] == 4 and head["global_step"] == 40
    assert "is 0 at every one of the 2 validation checks" in head["degenerate"]
    assert tested == ["last.ckpt"]  # the same weights as `last`: tested once
    out = capsys.readouterr().out
    assert out.count("WARNING: selection training_domain is degenerate") == 1


def test_a_varying_score_keeps_the_rules_choice(tmp_path, capsys):
    record, tested = _run_select(tmp_path, [rec(2, 0.4), rec(4, 0.1)])
    assert record["degenerate"] is False and "degenerate" not in record["checkpoints"]["training_domain"]
    # one epoch numbering: run.json's epoch of the chosen weights is the records' (and the printed) one
    assert record["checkpoints"]["training_domain"]["epoch"] == choose("training_domain", [rec(2, 0.4), rec(4, 0.1)])["epoch"] == 2
    assert record["checkpoints"]["last"]["epoch"] == 4
    assert tested == ["best-epoch002.ckpt", "last.ckpt"] and "degenerate" not in capsys.readouterr().out


def _transfer_runs(root: Path, flat_row: str) -> None:
    for train, test in ((["mosmed"], ["ctseg"]), (["ctseg"], ["mosmed"])):
        extra = {"selection": {"method": "training_domain", "degenerate": train[0] == flat_row,
                               "checkpoints": {"training_domain": {"epoch": 4, "global_step": 40, "degenerate":
                                                                   f"{VAL_KEY} is 0 at every one of the 2 checks"}
                                               if train[0] == flat_row else {"epoch": 2, "global_step": 20}},
                               "test": {}}}
        write_run(root, kind="transfer", train=train, test=test, rows=[(test[0], "c1", "lesion", _lesion(0.4))],
                  run_json_extra=extra)


def test_reports_and_the_transfer_matrix_mark_degenerate_cells(tmp_path, monkeypatch):
    from sweeps.summary import summarize_sweep

    _transfer_runs(tmp_path, "mosmed")
    tables = report_main([str(tmp_path), "--out", str(tmp_path / "out"), "--bootstrap", "50"])
    summary = (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    (matrix,) = tables["matrices"]
    by_row = {r["train"]: r for r in matrix["rows"]}
    assert by_row["mosmed"]["cells"]["ctseg"]["n_degenerate"] == 1 and by_row["ctseg"]["cells"]["mosmed"]["n_degenerate"] == 0
    assert "| 0.400† |" in summary and "| 0.400 |" in summary and "† model selection degenerate" in summary
    assert any("model selection degenerate" in n and "transfer/mosmed" in n for n in tables["notes"])
    rows = {r["train"]: r for r in csv.DictReader((tmp_path / "out" / "tables" /
                                                   "matrix_transfer_smoke_harmonized.csv").open(encoding="utf-8"))}
    assert rows["mosmed"]["ctseg_n_degenerate"] == "1" and rows["ctseg"]["mosmed_n_degenerate"] == "0"
    # the sweep's transfer matrix (md and csv) carries the same marks
    monkeypatch.setenv("WANDB_MODE", "disabled")
    summarize_sweep(tmp_path, "transfer_matrix", n_boot=50)
    md = (tmp_path / "transfer_matrix.md").read_text(encoding="utf-8")
    assert "| mosmed | 0.400† | n/a |" in md and "| ctseg | n/a | 0.400 |" in md
    assert "† model selection degenerate" in md
    rows = {r["train"]: r for r in csv.DictReader((tmp_path / "transfer_matrix.csv").open(encoding="utf-8"))}
    assert rows["mosmed"]["ctseg_n_degenerate"] == "1" and rows["ctseg"]["mosmed_n_degenerate"] == "0"


def test_report_lists_every_skipped_run_with_its_reason(tmp_path, capsys):
    write_run(tmp_path, kind="transfer", train=["mosmed"], test=["ctseg"], rows=[("ctseg", "c1", "lesion", _lesion(0.4))])
    killed = tmp_path / "transfer" / "killed-smoke-abc"  # killed in training: marker, config, records only
    (killed / "checkpoints").mkdir(parents=True)
    (killed / ".covid-dg-run").write_text("", encoding="utf-8")
    (killed / "config.yaml").write_text("experiment: smoke\n", encoding="utf-8")
    (killed / "records.jsonl").write_text(json.dumps(rec(4, 0.2)) + "\n", encoding="utf-8")
    (killed / "wandb" / "run-1" / "files").mkdir(parents=True)
    (killed / "wandb" / "run-1" / "files" / "config.yaml").write_text("a: 1\n", encoding="utf-8")  # not a run folder
    no_done = write_run(tmp_path, kind="transfer", train=["ctseg"], test=["mosmed"], done=False,
                        rows=[("mosmed", "m1", "lesion", _lesion(0.4))])
    no_metrics = write_run(tmp_path, kind="transfer", train=["covid19_20"], test=["mosmed"],
                           rows=[("mosmed", "m1", "lesion", _lesion(0.4))])
    (no_metrics / "metrics.json").unlink()
    tables = report_main([str(tmp_path), "--out", str(tmp_path / "out"), "--bootstrap", "50"])
    err = capsys.readouterr().err
    reasons = {Path(s["path"]).name: s["reason"] for s in tables["skipped"]}
    assert reasons == {"killed-smoke-abc": "no run.json: killed, failed or still running; records.jsonl reaches epoch 4",
                       no_done.name: "no `done` marker: stopped while writing its results (rerun its command to finish it)",
                       no_metrics.name: "marked done but missing metrics.json"}
    for name, reason in reasons.items():  # a printed line each
        assert sum(name in line and reason in line for line in err.splitlines()) == 1
    summary = (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    assert "## Skipped runs" in summary and "3 run folder(s) found but not reported" in summary
    assert all(reason in summary for reason in reasons.values()) and "run-1" not in summary
