"""Selection across a sweep (evaluation.sweep_selection, experiments.select), the hyperparameter search's
expansion (sweeps.expand) and the paired statistics (evaluation.stats), on hand-made records and runs."""
import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from evaluation.selection_rules import choose
from evaluation.stats import mean_se, paired_difference, wilcoxon_p
from evaluation.sweep_selection import Candidate, cells, choose_in_sweep, paired_vs_baseline, trial_means
from sweeps.expand import (
    SweepError,
    draw_hparams,
    expand_hparams,
    load_sweep,
    split_run_overrides,
    wandb_runs_spec,
    wandb_spec,
)

SOURCES = ["covid19_20", "mosmed", "ctseg"]


def rec(epoch, val, oracle=None, **extra):
    r = {"epoch": epoch, "step": 8 * (epoch + 1), "checkpoints": [], "val/a/cases": 2.0, "val/b/cases": 2.0,
         "val/mean/selection_dice": val}
    if oracle is not None:
        r["oracle/mean/selection_dice"] = oracle
    r.update(extra)
    return r


# mixstyle, trial 0: configuration 0 (the default) and 1; erm has its default only
MIX0 = [rec(0, 0.2, 0.9), rec(1, 0.5, 0.1)]
MIX1 = [rec(0, 0.6, 0.3), rec(1, 0.4, 0.95)]
ERM = [rec(0, 0.3, 0.2), rec(1, 0.3, 0.4)]


def cand(run, method, records, h=0, holdout="mosmed", trial=0):
    return Candidate(run=run, method=method, holdout=holdout, trial=trial, hparams_id=h,
                     hparams={"p": 0.3} if h else {}, records=tuple(records))


CANDS = [cand("mix-h0", "mixstyle", MIX0, 0), cand("mix-h1", "mixstyle", MIX1, 1), cand("erm", "erm", ERM)]


def picked(choices):
    return {cell[0]: (ch.candidate.hparams_id, ch.record["epoch"]) for cell, ch in choices.items()}


def test_each_rule_picks_hyperparameters_and_epoch_over_the_whole_sweep():
    assert picked(choose_in_sweep("training_domain", CANDS)) == {"mixstyle": (1, 0), "erm": (0, 1)}
    assert picked(choose_in_sweep("loso", CANDS)) == {"mixstyle": (1, 0), "erm": (0, 1)}
    # oracle: the best test-domain score over configurations and epochs
    assert picked(choose_in_sweep("oracle", CANDS)) == {"mixstyle": (1, 1), "erm": (0, 1)}
    # last: every configuration's final epoch, the configuration by that epoch's validation score
    assert picked(choose_in_sweep("last", CANDS)) == {"mixstyle": (0, 1), "erm": (0, 1)}
    # the chosen record is the one the rule picks inside that run (same ties, same NaN handling)
    ch = choose_in_sweep("training_domain", CANDS)[("mixstyle", "mosmed", 0)]
    assert ch.record is choose("training_domain", MIX1) and ch.score == 0.6 and ch.step == 8


def test_cells_are_trials_and_held_out_sources_and_ties_prefer_the_default():
    tie = [cand("a", "dann", [rec(0, 0.5)], 0), cand("b", "dann", [rec(0, 0.5)], 1),
           cand("c", "dann", [rec(0, 0.1), rec(1, 0.7)], 1, trial=1), cand("d", "dann", [rec(0, 0.2)], 0, "ctseg")]
    got = {cell: (ch.candidate.run, ch.record["epoch"]) for cell, ch in choose_in_sweep("training_domain", tie).items()}
    assert got == {("dann", "mosmed", 0): ("a", 0), ("dann", "mosmed", 1): ("c", 1), ("dann", "ctseg", 0): ("d", 0)}
    # NaN never chosen; a run with no finite score does not compete
    nan = [cand("x", "erm", [rec(0, math.nan)], 0), cand("y", "erm", [rec(0, 0.01)], 1)]
    assert choose_in_sweep("training_domain", nan)[("erm", "mosmed", 0)].candidate.run == "y"
    with pytest.raises(ValueError, match="differ in something else"):
        choose_in_sweep("training_domain", [cand("x", "erm", ERM), cand("y", "erm", ERM)])
    with pytest.raises(ValueError, match="no sweep-level"):
        choose_in_sweep("best_guess", CANDS)


class Spy(dict):
    """A record that remembers every key whose value was read."""
    read: list

    def __getitem__(self, k):
        Spy.read.append(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        Spy.read.append(k)
        return super().get(k, default)


def test_no_choice_reads_a_test_key_and_test_numbers_never_change_an_honest_choice():
    def poisoned(records, test_values, oracle_shift):
        out = []
        for r, t in zip(records, test_values):
            r = dict(r, **{"test/mosmed/dice": t, "test/mean/selection_dice": t})
            if "oracle/mean/selection_dice" in r:
                r["oracle/mean/selection_dice"] += oracle_shift
            out.append(Spy(r))
        return out

    baseline = {rule: picked(choose_in_sweep(rule, CANDS)) for rule in ("training_domain", "loso", "last")}
    # test values that would flip every choice if read, and oracle values shuffled
    for test_values, shift in (([1.0, 0.0], 0.0), ([0.0, 1.0], -0.5), ([0.9, 0.9], 0.7)):
        cands = [cand("mix-h0", "mixstyle", poisoned(MIX0, test_values, shift), 0),
                 cand("mix-h1", "mixstyle", poisoned(MIX1, test_values[::-1], -shift), 1),
                 cand("erm", "erm", poisoned(ERM, test_values, shift))]
        for rule, expected in baseline.items():
            Spy.read = []
            assert picked(choose_in_sweep(rule, cands)) == expected, rule
            assert Spy.read and not [k for k in Spy.read if k.startswith(("test/", "oracle/"))], (rule, Spy.read)
        Spy.read = []
        choose_in_sweep("oracle", cands)
        assert not [k for k in Spy.read if k.startswith("test/")]


def test_tables_are_mean_and_standard_error_over_trials():
    values = {("erm", "mosmed", 0): 0.4, ("erm", "mosmed", 1): 0.6, ("erm", "ctseg", 0): 0.2,
              ("dann", "mosmed", 0): 0.5, ("dann", "mosmed", 1): 0.9, ("dann", "ctseg", 0): 0.3,
              ("dann", "ctseg", 1): 0.5}
    t = cells(values)
    assert t["methods"] == ["erm", "dann"] and t["columns"] == ["ctseg", "mosmed", "mean"]
    c = t["cells"][("dann", "mosmed")]
    assert c["mean"] == pytest.approx(0.7) and c["se"] == pytest.approx(0.2) and c["n"] == 2  # std 0.2828/sqrt 2
    assert math.isnan(t["cells"][("erm", "ctseg")]["se"])  # one trial: no error bar
    assert t["cells"][("dann", "mean")]["mean"] == pytest.approx((0.7 + 0.4) / 2)
    assert t["cells"][("erm", "mean")]["mean"] == pytest.approx((0.5 + 0.2) / 2)
    assert trial_means({("erm", "m", 0): {"a": 0.2, "b": math.nan, "c": 0.4}}) == {("erm", "m", 0): pytest.approx(0.3)}


def test_statistics_against_hand_computed_values():
    # Wilcoxon signed-rank, exact: all five differences positive -> two-sided p = 2/2^5
    assert wilcoxon_p([0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(0.0625)
    # one negative of rank 2: W- = 2; subsets of ranks summing to <= 2: {}, {1}, {2} -> p = 2 * 3/32
    assert wilcoxon_p([0.1, -0.2, 0.3, 0.4, 0.5]) == pytest.approx(0.1875)
    assert math.isnan(wilcoxon_p([0.0, 0.0]))
    r = paired_difference([([0.5, 0.6, 0.7], [0.4, 0.4, 0.4])], n_boot=500, seed=3)
    assert r["mean_diff"] == pytest.approx(0.2) and r["n"] == 3 and r["n_boot"] == 500
    assert 0.1 - 1e-12 <= r["ci_low"] <= 0.2 <= r["ci_high"] <= 0.3 + 1e-12  # within min and max difference
    assert r == paired_difference([([0.5, 0.6, 0.7], [0.4, 0.4, 0.4])], n_boot=500, seed=3)  # seeded
    const = paired_difference([([0.5, 0.5], [0.3, 0.3]), ([0.9, math.nan], [0.8, 0.1])])
    # strata weigh the same: (0.2 + 0.1) / 2; a constant sample has a zero-width interval; the NaN pair is left out
    assert const["mean_diff"] == pytest.approx(0.15) and const["ci_low"] == pytest.approx(0.15) == const["ci_high"]
    assert const["n"] == 3 and const["n_undefined"] == 1
    assert mean_se([1.0, 2.0, 3.0]) == (2.0, pytest.approx(1 / math.sqrt(3)), 3)


def test_paired_comparisons_pair_the_same_cases_averaged_over_common_trials():
    scores = {("erm", "m", 0): {"c1": 0.5, "c2": 0.4, "c3": 0.3},
              ("erm", "m", 1): {"c1": 0.7, "c2": 0.4, "c3": 0.5},
              ("dann", "m", 0): {"c1": 0.6, "c2": 0.6, "c3": 0.3},
              ("dann", "m", 1): {"c1": 0.8, "c2": 0.8, "c3": 0.6},
              ("dann", "m", 2): {"c1": 0.0, "c2": 0.0, "c3": 0.0}}  # no erm trial 2: not paired
    (row,) = paired_vs_baseline(scores, n_boot=200)
    # per case over trials 0 and 1: c1 0.7 vs 0.6, c2 0.7 vs 0.4, c3 0.45 vs 0.4 -> diffs 0.1, 0.3, 0.05
    assert row["method"] == "dann" and row["holdout"] == "m" and row["n"] == 3
    assert row["mean_diff"] == pytest.approx(0.15)
    assert row["p"] == pytest.approx(0.25)  # exact: 3 positive differences, 2 * 1/8


# ---------------------------------------------------------------- the hyperparameter search's expansion

def test_draws_start_from_the_default_are_distinct_and_seeded():
    search = {"p": {"values": [0.3, 0.5, 0.8]}, "layers": {"values": [1, 2, 3]}}
    a = draw_hparams(search, 5, seed=0, where="methods.mixstyle.search")
    assert a[0] == {} and len(a) == 5 and all(set(d) == {"p", "layers"} for d in a[1:])
    assert len({json.dumps(d, sort_keys=True) for d in a}) == 5
    assert a == draw_hparams(search, 5, seed=0, where="methods.mixstyle.search")
    assert a != draw_hparams(search, 5, seed=1, where="methods.mixstyle.search")
    assert draw_hparams(search, 3, seed=0, where="methods.mixstyle.search") == a[:3]  # more draws keep the first
    assert len(draw_hparams({"p": {"values": [0.1, 0.2]}}, 10)) == 3  # a small space gives fewer
    # a draw equal to the method's own arguments would rerun configuration 0: skipped
    assert draw_hparams({"p": {"values": [0.1, 0.2]}}, 10, defaults={"p": 0.2, "q": 1}) == [{}, {"p": 0.1}]
    assert draw_hparams(None, 4) == [{}]
    ranged = draw_hparams({"lr": {"min": 1e-4, "max": 1e-2, "distribution": "log_uniform_values"},
                           "k": {"min": 1, "max": 3}, "w": {"min": 0.0, "max": 1.0}}, 20)
    assert all(1e-4 <= d["lr"] <= 1e-2 and d["k"] in (1, 2, 3) and 0 <= d["w"] <= 1 for d in ranged[1:])
    with pytest.raises(SweepError, match="methods.x.search.p"):
        draw_hparams({"p": {"min": 1, "max": 0}}, 2, where="methods.x.search")
    with pytest.raises(SweepError, match="needs value, values"):
        draw_hparams({"p": {"mean": 1}}, 2)


def test_the_hparams_sweep_expands_methods_configurations_and_trials(tmp_path):
    spec = load_sweep("hparams")
    searches = {"erm": None, "mixstyle": {"p": {"values": [0.3, 0.5, 0.8]}, "layers": {"values": [1, 2, 3]}}}
    runs = expand_hparams(spec, SOURCES, searches, "erm")
    block = spec["covid_dg"]["hparams"]
    assert len(runs) == len(spec["parameters"]["data.holdout"]["values"]) * (1 + block["n_hparams"]) * block["n_trials"]
    with_defaults = expand_hparams(spec, SOURCES, searches, "erm", {"mixstyle": {"p": 0.5, "layers": 2}})
    assert all(h["values"] != {"p": 0.5, "layers": 2} for _, h in with_defaults)
    erm = [h for o, h in runs if h["method"] == "erm"]
    assert {(h["id"], h["trial"]) for h in erm} == {(0, t) for t in range(block["n_trials"])}
    mix = [(o, h) for o, h in runs if h["method"] == "mixstyle" and h["id"] == 1]
    o, h = mix[0]
    assert [x for x in o if x.startswith("methods.mixstyle.")] == [f"methods.mixstyle.{k}={v}" for k, v in h["values"].items()]
    assert o[-1] == "run.seed=0" and not [x for x in runs[0][0] if x.startswith("methods.")]
    # W&B gets the listed runs as one parameter; sweep_run splits it back to the same overrides
    fixed = ["experiment=smoke", "paths.runs=/r"]
    w = wandb_runs_spec(spec, [fixed + o for o, _ in runs], fixed)
    assert "covid_dg" not in w and w["parameters"]["paths.runs"] == {"value": "/r"}
    values = w["parameters"]["sweep.overrides"]["values"]
    assert split_run_overrides([*fixed, f"sweep.overrides={values[2]}"]) == fixed + runs[2][0]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**{k: v for k, v in spec.items() if not k.startswith("_")},
                                   "covid_dg": {"hparams": {"n_hparams": 0}}}), encoding="utf-8")
    with pytest.raises(SweepError, match="n_hparams must be an integer >= 1"):
        load_sweep(str(bad))


def test_no_sweep_file_targets_a_test_domain_metric():
    from sweeps.expand import SWEEP_DIR

    for path in sorted(SWEEP_DIR.glob("*.yaml")):
        spec = load_sweep(str(path))
        w = wandb_spec(spec, SOURCES, ["experiment=smoke"])
        metric = w["metric"]["name"]
        assert metric.startswith("val/") and "test/" not in metric and "oracle/" not in metric, path.name
        assert "oracle" not in json.dumps(w.get("early_terminate", {})), path.name


# ---------------------------------------------------------------- experiments.select on hand-made run folders

def fake_run(root: Path, name, method, records, test_of_step, seed=0, holdout="mosmed", h=0):
    """A finished run folder as the runner leaves it: run.json (each rule's checkpoint and step), records,
    checkpoint files, and the per-case test scores of each rule's checkpoint (test_of_step(step) -> {case: dice})."""
    d = root / "loso" / name
    (d / "checkpoints").mkdir(parents=True)
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    ckpts = {}
    for rule in ("training_domain", "last", "oracle"):
        r = choose(rule, records)
        path = d / "checkpoints" / f"{rule}-step{r['step']}.ckpt"
        path.write_bytes(b"weights")
        ckpts[rule] = {"path": str(path), "epoch": r["epoch"], "global_step": r["step"], "score": None}
        out = d if rule == "training_domain" else d / "selection" / rule
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "per_case.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["split", "source", "case", "class", "dice"])
            for case, v in test_of_step(r["step"]).items():
                w.writerow(["test", holdout, case, "lesion", v])
                w.writerow(["test", holdout, case, "lung", 0.99])
    (d / "run.json").write_text(json.dumps({
        "kind": "loso", "name": name, "data": "phantom", "method": method, "seed": seed, "test_sources": [holdout],
        "selection": {"method": "training_domain", "checkpoints": ckpts}}), encoding="utf-8")
    (d / "done").write_text("", encoding="utf-8")
    return {"run_dir": str(d), "overrides": [], "hparams": {"id": h, "method": method, "values": {"p": 0.3} if h else {},
                                                            "trial": seed}}


def fake_sweep(root: Path, test_shift=0.0) -> Path:
    sweep = root / "hparams-smoke"
    runs = []
    for t in (0, 1):
        runs.append(fake_run(sweep, f"erm-{t}", "erm", ERM, lambda s: {"c1": 0.3 + test_shift, "c2": 0.5}, t))
        runs.append(fake_run(sweep, f"mix0-{t}", "mixstyle", MIX0, lambda s: {"c1": 0.9, "c2": 0.9 - test_shift}, t))
        # mix1: at step 8 (its training-domain choice) 0.4 and 0.6 in trial 0, +0.1 in trial 1
        runs.append(fake_run(sweep, f"mix1-{t}", "mixstyle", MIX1,
                             lambda s, t=t: {"c1": 0.4 + 0.1 * t, "c2": 0.6 + 0.1 * t} if s == 8 else {"c1": 0.0, "c2": 0.0},
                             t, h=1))
    (sweep / "runs.json").write_text(json.dumps({"runs": runs}), encoding="utf-8")
    return sweep


def test_select_writes_per_rule_tables_paired_statistics_and_a_forest_plot(tmp_path, monkeypatch):
    import experiments.select as sel

    order = []
    choose_real, read_real = sel.choose_in_sweep, sel.read_case_scores
    monkeypatch.setattr(sel, "choose_in_sweep", lambda *a: order.append("choose") or choose_real(*a))
    monkeypatch.setattr(sel, "read_case_scores", lambda *a: order.append("read") or read_real(*a))
    sweep = fake_sweep(tmp_path)
    summary = sel.select_sweep(sweep, from_run=True, n_boot=200, use_wandb=False)
    assert summary["rules"] == ["training_domain", "last", "oracle"] and summary["headline"] == "training_domain"
    assert order.index("read") > max(i for i, x in enumerate(order) if x == "choose")  # test scores after every choice
    out = sweep / "selection"
    rows = {r["method"]: r for r in csv.DictReader(open(out / "table_training_domain.csv", encoding="utf-8"))}
    # mixstyle chose configuration 1 epoch 0 in both trials: trial means 0.5 and 0.6 -> 0.55 ± 0.05
    assert float(rows["mixstyle"]["mosmed"]) == pytest.approx(0.55) and float(rows["mixstyle"]["mosmed_se"]) == pytest.approx(0.05)
    assert float(rows["erm"]["mosmed"]) == pytest.approx(0.4) and float(rows["erm"]["mean"]) == pytest.approx(0.4)
    paired = list(csv.DictReader(open(out / "paired_training_domain.csv", encoding="utf-8")))
    # per case over trials: c1 0.45 - 0.3, c2 0.65 - 0.5 -> +0.15
    assert [(p["method"], p["holdout"]) for p in paired] == [("mixstyle", "mosmed")]
    assert float(paired[0]["mean_diff"]) == pytest.approx(0.15) and paired[0]["n"] == "2"
    # last chose configuration 0 (its final epoch validates at 0.5 against 0.4): the 0.9 cases
    last = {r["method"]: r for r in csv.DictReader(open(out / "table_last.csv", encoding="utf-8"))}
    assert float(last["mixstyle"]["mosmed"]) == pytest.approx(0.9)
    info = json.loads((out / "selection.json").read_text(encoding="utf-8"))
    assert info["data"] == "phantom" and info["n_boot"] == 200
    chosen = {(c["method"], c["trial"]): (c["hparams_id"], c["epoch"]) for c in info["results"]["oracle"]["choices"]}
    assert chosen == {("erm", 0): (0, 1), ("erm", 1): (0, 1), ("mixstyle", 0): (1, 1), ("mixstyle", 1): (1, 1)}
    md = (out / "selection.md").read_text(encoding="utf-8")
    assert md.startswith("**PHANTOM DATA") and "ORACLE" in md and md.index("## training_domain") < md.index("## oracle")
    assert (out / "forest_training_domain.png").stat().st_size > 1000

    # test-domain scores changed: the honest choices stay, only the numbers move
    again = fake_sweep(tmp_path / "other", test_shift=0.2)
    sel.select_sweep(again, from_run=True, n_boot=50, use_wandb=False)
    other = json.loads((again / "selection" / "selection.json").read_text(encoding="utf-8"))
    for rule in ("training_domain", "last"):
        strip = [{k: v for k, v in c.items() if k not in ("run", "checkpoint")} for c in info["results"][rule]["choices"]]
        assert strip == [{k: v for k, v in c.items() if k not in ("run", "checkpoint")}
                         for c in other["results"][rule]["choices"]], rule


def test_select_names_what_is_missing(tmp_path):
    import experiments.select as sel

    assert sel.main([str(tmp_path)]) == 2
    sweep = fake_sweep(tmp_path)
    with pytest.raises(sel.SelectError, match="not every run kept"):
        sel.select_sweep(sweep, rules=["loso"], from_run=True, use_wandb=False)
    stray = fake_run(sweep, "stray", "erm", ERM, lambda s: {"c1": 1.0}, 0)  # an earlier plan's run
    assert stray["run_dir"] not in (sweep / "runs.json").read_text(encoding="utf-8")
    assert sel.select_sweep(sweep, rules=["training_domain"], from_run=True, use_wandb=False)["tested"] == 4  # erm-0 and stray would clash
    (sweep / "loso" / "erm-0" / "records.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(sel.SelectError, match="records.jsonl: missing or empty"):
        sel.select_sweep(sweep, from_run=True, use_wandb=False)


def test_the_hparams_sweep_plans_one_folder_per_run_with_the_drawn_values_in_its_config(tmp_path):
    from experiments.sweep_plan import plan_sweep
    from experiments.sweep_run import plan_run

    plan = plan_sweep(load_sweep("hparams"), "smoke", tmp_path, ["experiment=smoke"])
    runs = plan["runs"]
    assert len({r["run_dir"] for r in runs}) == len(runs) == 6  # erm 1 x 2 trials, mixstyle 2 x 2 trials
    drawn = [r for r in runs if r["hparams"]["id"] == 1]
    assert {r["hparams"]["method"] for r in drawn} == {"mixstyle"} and len(drawn) == 2
    _protocol, cfg, _plan, _dir = plan_run(drawn[0]["overrides"])
    for key, value in drawn[0]["hparams"]["values"].items():
        assert cfg.methods.mixstyle[key] == value
    assert cfg.run.seed == drawn[0]["hparams"]["trial"] and list(cfg.selection.report) == ["last", "oracle"]
    default = next(r for r in runs if r["hparams"]["method"] == "mixstyle" and r["hparams"]["id"] == 0)
    assert not [o for o in default["overrides"] if o.startswith("methods.")]


def test_select_logs_tables_and_the_forest_plot_to_wandb_offline(tmp_path, monkeypatch):
    import experiments.select as sel

    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = fake_sweep(tmp_path)
    summary = sel.select_sweep(sweep, rules=["training_domain"], from_run=True, n_boot=50)
    logged = b"".join(p.read_bytes() for p in (sweep / "selection").rglob("offline-run-*/*.wandb"))
    assert summary["wandb"] and b"selection/table_training_domain" in logged and b"selection/forest_training_domain" in logged
