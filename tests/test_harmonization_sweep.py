"""The harmonization ablation sweep: its grid, the run variant that keeps its arms apart, its headline table."""
import csv

import pytest

from experiments.config import load_config
from experiments.list import catalogue
from experiments.runner import variant
from experiments.sweep_run import plan_run
from sweeps.expand import expand, load_sweep
from sweeps.summary import summarize_sweep
from tests.test_report import write_run


def test_sweep_is_loso_over_every_source_times_each_step_off(tmp_path):
    spec = load_sweep("harmonization")
    assert spec["metric"] == {"name": "val/mean/selection_dice", "goal": "maximize"}  # never a test metric
    assert spec["covid_dg"]["report"] == "harmonization_table"
    sources = list(load_config(["experiment=smoke"]).data.sources)
    runs = expand(spec, sources)
    assert len(runs) == 12 == 4 * len(sources)
    offs = {}
    folders = set()
    for overrides in runs:
        _protocol, cfg, plan, run_dir = plan_run(["experiment=smoke", f"paths.runs={tmp_path}", *overrides])
        assert plan.kind == "loso"
        offs.setdefault(cfg.data.holdout, []).append(variant(cfg)["harmonize_off"])
        folders.add(run_dir)
    assert offs == {s: ["none", "decode", "resample", "normalize"] for s in sources}
    assert len(folders) == 12  # every arm has its own run folder


def test_experiments_list_describes_the_sweep():
    sweeps = {e["name"]: e["description"] for e in catalogue()["sweeps"]}
    assert sweeps["harmonization"].startswith("Harmonization ablation: LOSO over every source")


def test_variant_names_the_steps_switched_off_in_harmonizer_order():
    assert variant(load_config([]))["harmonize_off"] == "none"
    assert variant(load_config(["data.harmonize_off=[normalize,decode]"]))["harmonize_off"] == "decode+normalize"


# Per-case held-out lesion Dice by (harmonize_off, holdout) and seed. mosmed has two seeds, ctseg one.
DICE = {("none", "mosmed"): {0: [0.4, 0.6], 1: [0.6, 0.8]},       # seed means 0.5, 0.7 -> 0.6 ± 0.1414
        ("decode", "mosmed"): {0: [0.2, 0.2], 1: [0.3, 0.5]},     # 0.2, 0.4 -> 0.3 (-0.3)
        ("resample", "mosmed"): {0: [0.5, 0.7], 1: [0.7, 0.9]},   # 0.6, 0.8 -> 0.7 (+0.1)
        ("normalize", "mosmed"): {0: [0.1, 0.1], 1: [0.2, 0.4]},  # 0.1, 0.3 -> 0.2 (-0.4)
        ("none", "ctseg"): {0: [0.5, 0.7]},                       # 0.6
        ("decode", "ctseg"): {0: [0.1, 0.3]},                     # 0.2 (-0.4)
        ("resample", "ctseg"): {0: [0.6, 0.6]},                   # 0.6 (+0.0)
        ("normalize", "ctseg"): {0: [0.0, 0.2]}}                  # 0.1 (-0.5)


def test_harmonization_table_against_all_steps_on(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for (off, holdout), seeds in DICE.items():
        for seed, values in seeds.items():
            rows = [(holdout, f"c{i}", "lesion", {"dice": v}) for i, v in enumerate(values)]
            # an older run.json without the key is a run with every step on
            extra = {} if (off, holdout) == ("none", "ctseg") else {"harmonize_off": off}
            write_run(tmp_path / off, holdout=holdout, seed=seed, rows=rows, run_json_extra=extra,
                      metrics={"test/mean/dice": sum(values) / 2})
    out = summarize_sweep(tmp_path, "harmonization_table", n_boot=50)
    assert out["harmonization_table"] == {"rows": ["ctseg", "mosmed", "mean"],
                                          "columns": ["all_on", "decode_off", "resample_off", "normalize_off"]}
    rows = {r["holdout"]: r for r in csv.DictReader((tmp_path / "harmonization_table.csv").open(encoding="utf-8"))}
    m, c, mean = rows["mosmed"], rows["ctseg"], rows["mean"]
    assert float(m["all_on"]) == pytest.approx(0.6) and float(m["all_on_std"]) == pytest.approx(0.141421, abs=1e-6)
    assert int(m["all_on_n_seeds"]) == 2 and int(c["all_on_n_seeds"]) == 1
    assert float(m["decode_off_vs_all_on"]) == pytest.approx(-0.3)
    assert float(m["resample_off_vs_all_on"]) == pytest.approx(0.1)
    assert float(m["normalize_off_vs_all_on"]) == pytest.approx(-0.4)
    assert float(c["decode_off"]) == pytest.approx(0.2) and float(c["normalize_off_vs_all_on"]) == pytest.approx(-0.5)
    assert float(mean["all_on"]) == pytest.approx(0.6) and float(mean["decode_off"]) == pytest.approx(0.25)
    assert float(mean["decode_off_vs_all_on"]) == pytest.approx(-0.35)
    assert float(mean["resample_off_vs_all_on"]) == pytest.approx(0.05)
    assert float(mean["normalize_off_vs_all_on"]) == pytest.approx(-0.45)
    md = (tmp_path / "harmonization_table.md").read_text(encoding="utf-8")
    assert md.startswith("**PHANTOM DATA")
    assert "| held-out source | all steps on | decode off | resample off | normalize off |" in md
    assert "| mosmed | 0.600 ± 0.141 | 0.300 ± 0.141 (-0.300) | 0.700 ± 0.141 (+0.100) | 0.200 ± 0.141 (-0.400) |" in md
    assert "| mean | 0.600 | 0.250 (-0.350) | 0.650 (+0.050) | 0.150 (-0.450) |" in md


def test_two_configurations_in_one_cell_are_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for method in ("erm", "dann"):  # same held-out source, all steps on, but two methods: which one is the cell?
        write_run(tmp_path / method, holdout="mosmed", rows=[("mosmed", "c0", "lesion", {"dice": 0.5})],
                  run_json_extra={"method": method})
    with pytest.raises(ValueError, match=r"both fill the cell \('mosmed', 'all_on'\)"):
        summarize_sweep(tmp_path, "harmonization_table", n_boot=10)
