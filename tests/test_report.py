"""`python -m experiments.report` on hand-written run folders, and the statistics under it."""
import csv
import json
import math
from pathlib import Path

import pytest
from scipy import stats

from evaluation.agreement import agreement
from evaluation.reporting.common import PHANTOM_MARK, ReportError
from evaluation.reporting.render import to_latex
from evaluation.reporting.runs import collect_runs
from evaluation.reporting.tables import build_tables
from evaluation.stats import bland_altman, bootstrap_ci, bootstrap_ci_strata, mean_std, summarize
from experiments.report import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLUMNS = ["split", "source", "case", "class", "dice", "iou", "nsd", "hd95", "asd", "rv", "ref_ml", "pred_ml",
           "tolerance_mm", "space", "ref_po", "pred_po", "ref_lss", "pred_lss"]
SD2 = math.sqrt(2 * 0.05**2)  # sample std of two values 0.1 apart


# ------------------------------------------------------------------------------------------ statistics

def test_mean_std_and_summarize_by_hand():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    m, s = mean_std([4.0])
    assert m == 4.0 and math.isnan(s)
    assert all(math.isnan(x) for x in mean_std([]))
    out = summarize([1.0, float("nan"), 3.0, None, float("inf")])
    assert out == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "median": 2.0, "n": 2, "n_undefined": 3}


def test_bootstrap_ci_by_hand():
    assert bootstrap_ci([0.3] * 9) == (0.3, 0.3)  # a constant sample: every resample mean is the constant
    assert bootstrap_ci([0.7]) == (0.7, 0.7)
    assert all(math.isnan(x) for x in bootstrap_ci([float("nan")]))
    lo, hi = bootstrap_ci([0.2, 0.8])
    assert 0.2 <= lo < 0.5 < hi <= 0.8  # resample means are 0.2, 0.5 or 0.8
    values = [0.1, 0.4, 0.35, 0.8, 0.55, 0.6, 0.9, 0.2]
    lo, hi = bootstrap_ci(values, n_boot=500, seed=3)
    assert lo < sum(values) / len(values) < hi
    assert bootstrap_ci(values, n_boot=500, seed=3) == (lo, hi)
    assert bootstrap_ci(values, n_boot=500, seed=4) != (lo, hi)
    assert bootstrap_ci(values + [float("nan")], n_boot=500, seed=3) == (lo, hi)  # undefined values dropped
    assert bootstrap_ci_strata([values], n_boot=500, seed=3) == (lo, hi)
    # two constant strata weigh the same, whatever their sizes: (0.2 + 0.6) / 2
    assert bootstrap_ci_strata([[0.2] * 10, [0.6] * 2]) == pytest.approx((0.4, 0.4))


def test_bland_altman_by_hand():
    ba = bland_altman([10.0, 20.0, 30.0, 5.0], [12.0, 21.0, 33.0, float("nan")])  # d = 2, 1, 3
    assert ba["n"] == 3 and ba["n_undefined"] == 1
    assert ba["bias"] == pytest.approx(2.0) and ba["sd"] == pytest.approx(1.0)
    assert ba["loa_low"] == pytest.approx(2 - 1.96) and ba["loa_high"] == pytest.approx(2 + 1.96)


# -------------------------------------------------------------------------------------- run folders

def write_run(root: Path, *, holdout: str | None = None, train=None, test=None, seed=0, data="phantom",
              rows=(), metrics=None, kind=None, experiment="smoke", done=True, run_json_extra=None) -> Path:
    """A run folder in the runner's format; rows are (source, case, class, values) with values a dict."""
    kind = kind or ("loso" if holdout else "transfer")
    test = test or [holdout]
    train = train or [s for s in ("covid19_20", "ctseg", "mosmed") if s != holdout]
    name = f"{'+'.join(test)}-{experiment}-s{seed}" if kind == "loso" else f"{'+'.join(train)}-{experiment}-s{seed}"
    d = root / kind / name
    d.mkdir(parents=True)
    info = {"kind": kind, "name": name, "data": data, "experiment": experiment, "seed": seed,
            "config_hash": f"h{seed}", "train_sources": train, "test_sources": test, "eval_space": "harmonized",
            "best_checkpoint": str(d / "checkpoints" / "best.ckpt"), "wall_s": 1.0, **(run_json_extra or {})}
    (d / "run.json").write_text(json.dumps({k: v for k, v in info.items() if v is not None}), encoding="utf-8")
    (d / "metrics.json").write_text(json.dumps({**(metrics or {}), "data": data}), encoding="utf-8")
    with (d / "per_case.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, COLUMNS, restval="")
        w.writeheader()
        for source, case, cls, values in rows:
            w.writerow({"split": "test", "source": source, "case": case, "class": cls, "tolerance_mm": 3.0,
                        "space": "harmonized", **values})
    (d / "val_per_case.csv").write_text("split,source,case,class,dice\nval,covid19_20,v1,lesion,0.9\n", encoding="utf-8")
    if done:
        (d / "done").write_text("2024-01-01T00:00:00\n", encoding="utf-8")
    return d


def _lesion(dice, hd95="", po=None):
    out = {"dice": dice, "iou": dice / (2 - dice), "nsd": min(1.0, dice + 0.1), "hd95": hd95, "asd": 1.0, "rv": 0.1}
    if po is not None:
        out.update(ref_po=po[0], pred_po=po[1])
    return out


# Per-case lesion Dice (hand-chosen): holdout mosmed means 0.7 (seed 0) and 0.6 (seed 1), holdout ctseg
# 0.3 and 0.4. HD95 of mosmed: one undefined case per seed, defined means 6.0 and 6.0.
MOSMED = {0: [("m1", 0.6, 5.0, (10, 12)), ("m2", 0.8, "", (20, 21)), ("m3", 0.7, 7.0, (30, 33))],
          1: [("m1", 0.5, "nan", (10, 12)), ("m2", 0.7, 4.0, (20, 21)), ("m3", 0.6, 8.0, (30, 33))]}
CTSEG = {0: [("c1", 0.4), ("c2", 0.2)], 1: [("c1", 0.5), ("c2", 0.3)]}
VAL = {("mosmed", 0): 0.9, ("mosmed", 1): 0.7, ("ctseg", 0): 0.5, ("ctseg", 1): 0.6}


def write_loso_suite(root: Path, data="phantom", ctseg_data=None) -> None:
    for seed in (0, 1):
        rows = [("mosmed", c, "lesion", _lesion(dv, hd, po)) for c, dv, hd, po in MOSMED[seed]]
        test_dice = sum(r[3]["dice"] for r in rows) / 3
        write_run(root, holdout="mosmed", seed=seed, data=data, rows=rows,
                  metrics={"val/mean/dice": VAL[("mosmed", seed)], "test/mean/dice": test_dice,
                           "test/mosmed/dice": test_dice})
        rows = [("ctseg", c, "lesion", _lesion(dv, 3.0)) for c, dv in CTSEG[seed]]
        rows += [("ctseg", c, "lung", {"dice": 0.9 + 0.05 * i, "hd95": 2.0}) for i, (c, _) in enumerate(CTSEG[seed])]
        test_dice = sum(dv for _, dv in CTSEG[seed]) / 2
        write_run(root, holdout="ctseg", seed=seed, data=ctseg_data or data, rows=rows,
                  metrics={"val/mean/dice": VAL[("ctseg", seed)], "test/mean/dice": test_dice})
    write_run(root, holdout="covid19_20", seed=0, data=data, done=False,
              rows=[("covid19_20", "x1", "lesion", _lesion(0.5))])


def _row(result_rows, config, source="mosmed", cls="lesion"):
    (row,) = [r for r in result_rows if r["config"] == config and r["test_source"] == source and r["class"] == cls]
    return row


def _csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def loso_report(tmp_path_factory):
    """One report over the LOSO suite (phantom), shared by the assertions below."""
    root = tmp_path_factory.mktemp("runs")
    write_loso_suite(root)
    out = root.parent / (root.name + "-report")
    return main([str(root), "--out", str(out), "--bootstrap", "500"]), out, root


def test_unfinished_run_is_skipped_with_a_warning(tmp_path, capsys):
    write_loso_suite(tmp_path)
    skipped = []
    runs = collect_runs([tmp_path], skipped)
    assert len(runs) == 4 and not any("covid19_20" in r.test_sources for r in runs)
    assert len(skipped) == 1 and skipped[0].endswith("covid19_20-smoke-s0")
    assert "skipping unfinished run" in capsys.readouterr().err


def test_means_over_seeds_and_undefined_counts(loso_report):
    tables, out, _ = loso_report
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    mos = _row(rep["results"], "loso/smoke: holdout mosmed")["metrics"]
    assert mos["dice"]["mean"] == pytest.approx(0.65) and mos["dice"]["std"] == pytest.approx(SD2)
    assert mos["dice"]["n_seeds"] == 2 and mos["dice"]["n_cases"] == 3 and mos["dice"]["n_undefined"] == 0
    assert mos["hd95"]["mean"] == pytest.approx(6.0) and mos["hd95"]["std"] == pytest.approx(0.0)
    assert mos["hd95"]["n_undefined"] == 2 and mos["hd95"]["n"] == 4  # 6 case values over 2 seeds, 2 NaN
    ct = _row(rep["results"], "loso/smoke: holdout ctseg", "ctseg")["metrics"]["dice"]
    assert ct["mean"] == pytest.approx(0.35) and ct["std"] == pytest.approx(SD2)
    lung = _row(rep["results"], "loso/smoke: holdout ctseg", "ctseg", "lung")["metrics"]["dice"]
    assert lung["mean"] == pytest.approx(0.925)
    # average over the two held-out sources, paired by seed: (0.7 + 0.3) / 2 and (0.6 + 0.4) / 2
    avg = _row(rep["results"], "loso/smoke: average over 2 configurations", "mean")["metrics"]["dice"]
    assert avg["mean"] == pytest.approx(0.5) and avg["std"] == pytest.approx(0.0, abs=1e-12)
    assert rep["meta"]["phantom"] and rep["meta"]["n_runs"] == 4
    assert any("covid19_20" in n and "skipped" in n for n in rep["notes"])
    # the CSV holds the same numbers, and says undefined values were left out
    (csv_row,) = [r for r in _csv(out / "tables" / "results.csv")
                  if r["config"] == "loso/smoke: holdout mosmed" and r["class"] == "lesion"]
    assert float(csv_row["dice_mean"]) == pytest.approx(0.65) and csv_row["hd95_n_undefined"] == "2"
    assert csv_row["hd95_n"] == "4" and csv_row["dice_n"] == "6"
    assert "(2 undef.)" in (out / "summary.md").read_text(encoding="utf-8")


def test_bootstrap_ci_brackets_the_mean_and_is_reproducible(loso_report):
    tables, out, root = loso_report
    cell = _row(tables["results"], "loso/smoke: holdout mosmed")["metrics"]["dice"]
    # cases averaged over seeds: 0.55, 0.75, 0.65; resample means lie within [0.55, 0.75]
    assert 0.55 <= cell["ci_low"] < 0.65 < cell["ci_high"] <= 0.75
    runs = collect_runs([root])
    again = build_tables(runs, n_boot=500, seed=0)
    assert _row(again["results"], "loso/smoke: holdout mosmed")["metrics"]["dice"]["ci_low"] == cell["ci_low"]
    other = build_tables(runs, n_boot=500, seed=7)
    c7 = _row(other["results"], "loso/smoke: holdout mosmed")["metrics"]["dice"]
    assert (c7["ci_low"], c7["ci_high"]) != (cell["ci_low"], cell["ci_high"]) and c7["mean"] == cell["mean"]


def test_generalization_gap_is_val_minus_test(loso_report):
    tables, out, _ = loso_report
    (mos,) = [r for r in _csv(out / "tables" / "gap.csv") if r["config"] == "loso/smoke: holdout mosmed"]
    # seed 0: 0.9 - 0.7 = 0.2; seed 1: 0.7 - 0.6 = 0.1
    assert float(mos["gap_mean"]) == pytest.approx(0.15, abs=1e-6)
    assert float(mos["gap_std"]) == pytest.approx(SD2, abs=1e-6)
    (ct,) = [r for r in tables["gap"] if r["config"] == "loso/smoke: holdout ctseg"]
    assert ct["gap_mean"] == pytest.approx(((0.5 - 0.3) + (0.6 - 0.4)) / 2)


def test_matrix_csv_and_pngs(loso_report):
    _, out, _ = loso_report
    rows = {r["train"]: r for r in _csv(out / "tables" / "matrix_loso_smoke_harmonized.csv")}
    assert set(rows) == {"mosmed", "ctseg"}
    assert float(rows["mosmed"]["mosmed"]) == pytest.approx(0.65, abs=1e-6)
    assert float(rows["ctseg"]["ctseg"]) == pytest.approx(0.35, abs=1e-6)
    assert rows["mosmed"]["ctseg"] == "" and rows["ctseg"]["mosmed"] == ""
    assert rows["mosmed"]["train_sources"] == "covid19_20+ctseg"
    pngs = sorted((out / "plots").glob("*.png"))
    names = {p.name for p in pngs}
    assert {"matrix_loso_smoke_harmonized.png", "box_loso-smoke-holdout-mosmed.png",
            "po_scatter_loso-smoke-holdout-mosmed.png", "po_bland_altman_loso-smoke-holdout-mosmed.png"} <= names
    assert "po_scatter_loso-smoke-holdout-ctseg.png" not in names  # no severity columns there
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_SIGNATURE and p.stat().st_size > 1000
    summary = (out / "summary.md").read_text(encoding="utf-8")
    for p in pngs:
        assert f"plots/{p.name}" in summary
    (sev,) = [r for r in _csv(out / "tables" / "severity.csv") if r["measure"] == "po"]
    assert float(sev["bias"]) == pytest.approx(2.0) and float(sev["sd"]) == pytest.approx(1.0)


def test_severity_table_is_agreement_of_the_per_case_values(loso_report):
    tables, out, _ = loso_report
    # PO of holdout mosmed, the same in both seeds: reference 10, 20, 30; predicted 12, 21, 33.
    ref, pred = [10.0, 20.0, 30.0], [12.0, 21.0, 33.0]
    # by hand: deviations from the means (20, 22) are ref -10, 0, 10 and pred -10, -1, 11, so
    # Sxy = 210, Spp = 222, Srr = 200; the paper's fit regresses the reference on the prediction.
    r, slope = 210 / math.sqrt(222 * 200), 210 / 222
    assert r == pytest.approx(stats.pearsonr(ref, pred).statistic)
    fit = stats.linregress(pred, ref)
    assert slope == pytest.approx(fit.slope)
    (row,) = [x for x in tables["severity"] if x["config"] == "loso/smoke: holdout mosmed" and x["measure"] == "po"]
    assert row["n"] == 3 and row["kind"] == "percent"
    assert row["pearson_r"] == pytest.approx(r) and row["slope"] == pytest.approx(slope)
    assert row["intercept"] == pytest.approx(fit.intercept) and row["intercept"] == pytest.approx(20 - slope * 22)
    assert row["kendall_tau"] == pytest.approx(1.0)
    # Bland-Altman: the same numbers as evaluation.stats.bland_altman (and so as the plot's lines)
    ba = bland_altman(ref, pred)
    assert {k: row[k] for k in ("bias", "sd", "loa_low", "loa_high")} == pytest.approx(
        {k: ba[k] for k in ("bias", "sd", "loa_low", "loa_high")}, rel=1e-12)
    (sev,) = [x for x in _csv(out / "tables" / "severity.csv") if x["measure"] == "po"]
    assert float(sev["pearson_r"]) == pytest.approx(r, abs=1e-6) and float(sev["slope"]) == pytest.approx(slope, abs=1e-6)
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert "| Pearson r (p) | Kendall tau (p) | chi2 p | slope [95 % CI] |" in md
    assert f"| PO (%) | 3 | {r:.3f} (" in md and f"| {slope:.3f} [" in md


def test_severity_scores_averaged_over_seeds(tmp_path, capsys):
    # LSS: reference 2, 5, 9, 14; predicted 3, 5, 10, 13 (seed 0) and 3, 6, 10, 15 (seed 1)
    ref, preds = [2, 5, 9, 14], {0: [3, 5, 10, 13], 1: [3, 6, 10, 15]}
    for seed, pred in preds.items():
        write_run(tmp_path, holdout="mosmed", seed=seed, rows=[
            ("mosmed", f"m{i}", "lesion", {**_lesion(0.5), "ref_lss": r, "pred_lss": p})
            for i, (r, p) in enumerate(zip(ref, pred))])
    tables = build_tables(collect_runs([tmp_path]), n_boot=10)
    (row,) = [x for x in tables["severity"] if x["measure"] == "lss"]
    mean = [3.0, 5.5, 10.0, 14.0]  # not integer scores any more: no chi-squared test over score values
    assert row["kind"] == "score" and math.isnan(row["chi2_p"])
    assert any("non-integer scores" in n for n in tables["notes"])
    assert row["pearson_r"] == pytest.approx(stats.pearsonr(ref, mean).statistic)
    assert row["slope"] == pytest.approx(stats.linregress(mean, ref).slope)
    assert row["bias"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)  # mean of predicted - reference
    # one seed: integer scores, so the table is agreement(kind="score") itself, chi-squared included
    one = build_tables(collect_runs(sorted(tmp_path.rglob("*-s0"))), n_boot=10)["severity"][0]
    want = agreement(ref, preds[0], kind="score")
    assert one["chi2_p"] == pytest.approx(want["chi2_p"]) and one["chi2_dof"] == want["chi2_dof"]
    assert one["slope"] == pytest.approx(want["slope"])
    # a score outside 0..20 is a corrupt table, named with its configuration
    write_run(tmp_path / "bad", holdout="mosmed", rows=[("mosmed", "m1", "lesion", {**_lesion(0.5), "ref_lss": 25,
                                                                                    "pred_lss": 3})])
    with pytest.raises(ReportError, match="holdout mosmed.*lss"):
        build_tables(collect_runs([tmp_path / "bad"]), n_boot=10)


def test_phantom_marker_everywhere(loso_report):
    _, out, _ = loso_report
    assert (out / "summary.md").read_text(encoding="utf-8").startswith(f"**{PHANTOM_MARK}**")
    for path in (out / "tables").glob("*.csv"):
        rows = _csv(path)
        assert rows and all(r["data"] == PHANTOM_MARK for r in rows), path.name
    for path in (out / "tables").glob("*.tex"):
        text = path.read_text(encoding="utf-8")
        assert r"\caption{" in text and PHANTOM_MARK in text and r"\begin{tabular}" in text, path.name


def test_real_data_carries_no_phantom_marker(tmp_path):
    write_loso_suite(tmp_path / "runs", data="real")
    main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--bootstrap", "50"])
    files = [tmp_path / "out" / "summary.md", tmp_path / "out" / "report.json",
             *(tmp_path / "out" / "tables").iterdir()]
    assert len(files) > 6
    for path in files:
        assert "PHANTOM" not in path.read_text(encoding="utf-8"), path.name
    assert {r["data"] for r in _csv(tmp_path / "out" / "tables" / "results.csv")} == {"real"}


def test_mixing_phantom_and_real_in_one_configuration_is_an_error(tmp_path):
    write_loso_suite(tmp_path, data="phantom", ctseg_data="phantom")
    write_run(tmp_path, holdout="mosmed", seed=2, data="real", rows=[("mosmed", "m1", "lesion", _lesion(0.5))])
    with pytest.raises(ReportError, match="mixes phantom and real"):
        build_tables(collect_runs([tmp_path]), n_boot=10)
    with pytest.raises(SystemExit, match="holdout mosmed"):
        main([str(tmp_path), "--out", str(tmp_path / "out")])


def test_phantom_and_real_configurations_side_by_side(tmp_path):
    write_loso_suite(tmp_path / "runs", data="phantom", ctseg_data="real")
    tables = main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--bootstrap", "20"])
    by_config = {r["config"]: r["data"] for r in _csv(tmp_path / "out" / "tables" / "headline.csv")}
    assert by_config == {"loso/smoke: holdout mosmed": PHANTOM_MARK, "loso/smoke: holdout ctseg": "real"}
    assert (tmp_path / "out" / "summary.md").read_text(encoding="utf-8").startswith(f"**{PHANTOM_MARK}**: 2 of 4 runs")
    assert any("mix phantom and real" in n for n in tables["notes"])  # never averaged across the two


def test_no_finished_run_and_corrupt_tables_are_clear_errors(tmp_path):
    write_run(tmp_path / "a", holdout="mosmed", done=False, rows=[("mosmed", "m1", "lesion", _lesion(0.5))])
    with pytest.raises(SystemExit, match="no finished run"):
        main([str(tmp_path / "a"), "--out", str(tmp_path / "out")])
    d = write_run(tmp_path / "b", holdout="mosmed", rows=[("mosmed", "m1", "lesion", _lesion(0.5))])
    (d / "per_case.csv").write_text("split,source,case,class,dice\ntest,mosmed,m1,lesion,0.5\ntest,mosmed,m2\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"per_case\.csv, line 3"):
        main([str(d), "--out", str(tmp_path / "out")])
    (d / "per_case.csv").write_text("split,source,case,class,dice\ntest,mosmed,m1,lesion,zero point five\n", encoding="utf-8")
    with pytest.raises(ReportError, match=r"per_case\.csv.*'dice'"):
        collect_runs([d])
    (d / "per_case.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ReportError, match=r"per_case\.csv"):
        collect_runs([d])


def test_transfer_matrix_and_mean_over_test_sources(tmp_path):
    for seed, shift in ((0, 0.0), (1, 0.1)):
        write_run(tmp_path, kind="transfer", train=["mosmed"], test=["ctseg", "covid19_20"], seed=seed, rows=[
            ("ctseg", "c1", "lesion", _lesion(0.2 + shift)), ("ctseg", "c2", "lesion", _lesion(0.4 + shift)),
            ("covid19_20", "v1", "lesion", _lesion(0.8 + shift))])
        write_run(tmp_path, kind="transfer", train=["covid19_20"], test=["ctseg", "mosmed"], seed=seed, rows=[
            ("ctseg", "c1", "lesion", _lesion(0.5 + shift)), ("mosmed", "m1", "lesion", _lesion(0.1 + shift))])
    tables = main([str(tmp_path), "--out", str(tmp_path / "out"), "--bootstrap", "200"])
    rows = {r["train"]: r for r in _csv(tmp_path / "out" / "tables" / "matrix_transfer_smoke_harmonized.csv")}
    assert float(rows["mosmed"]["ctseg"]) == pytest.approx(0.35) and float(rows["mosmed"]["covid19_20"]) == pytest.approx(0.85)
    assert rows["mosmed"]["mosmed"] == "" and float(rows["covid19_20"]["mosmed"]) == pytest.approx(0.15)
    assert float(rows["covid19_20"]["ctseg_std"]) == pytest.approx(SD2, abs=1e-6)  # 0.5 and 0.6
    # mean over test sources weighs each source the same (ctseg 0.3 and covid19_20 0.8 for seed 0)
    mean = _row(tables["results"], "transfer/smoke: mosmed -> covid19_20+ctseg", "mean")["metrics"]["dice"]
    assert mean["mean"] == pytest.approx((0.55 + 0.65) / 2) and mean["n_cases"] == 3
    assert mean["ci_low"] <= mean["mean"] <= mean["ci_high"]
    assert (tmp_path / "out" / "plots" / "matrix_transfer_smoke_harmonized.png").read_bytes()[:8] == PNG_SIGNATURE
    assert any("no severity plots" in n for n in tables["notes"])  # skipped with a note


def test_older_runs_fall_back_to_config_yaml_and_legacy_columns(tmp_path):
    d = write_run(tmp_path, holdout="ctseg", run_json_extra={"seed": None, "experiment": None}, rows=[])
    (d / "config.yaml").write_text("experiment: demo\nrun:\n  seed: 3\n", encoding="utf-8")
    # the per-case table of older runs: no class column, lung Dice in `dice_lung`
    (d / "per_case.csv").write_text("case,source,dice,dice_lung,pred_ml,ref_ml,split\n"
                                    "c1,ctseg,0.5,0.9,1.0,2.0,test\nc2,ctseg,0.25,0.8,1.0,2.0,test\n", encoding="utf-8")
    (run,) = collect_runs([tmp_path])
    assert (run.seed, run.experiment) == (3, "demo")
    tables = build_tables([run], n_boot=20)
    assert _row(tables["results"], "loso/demo: holdout ctseg", "ctseg")["metrics"]["dice"]["mean"] == 0.375
    assert _row(tables["results"], "loso/demo: holdout ctseg", "ctseg", "lung")["metrics"]["dice"]["mean"] == pytest.approx(0.85)


def test_latex_escapes_special_characters():
    tex = to_latex(["config", "dice"], [["a_b & c%", "0.5 ± 0.1"]], "x_y", "t")
    assert r"a\_b \& c\%" in tex and r"0.5 $\pm$ 0.1" in tex and r"\caption{x\_y}" in tex


def test_wandb_offline_run_under_out(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    write_loso_suite(tmp_path / "runs", data="real")
    main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--bootstrap", "50", "--wandb"])
    (run_dir,) = (tmp_path / "out" / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("*.wandb"))
