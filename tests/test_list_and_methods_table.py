"""`python -m experiments.list` lists every registry entry; the methods sweep's headline table."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from datamodules.augment import AUGMENTS
from datamodules.sources import SOURCES
from experiments.list import catalogue, main
from lightning_modules.losses import LOSSES
from lightning_modules.methods import METHODS
from lightning_modules.networks import NETWORKS
from sweeps.summary import summarize_sweep
from tests.test_report import write_run

ROOT = Path(__file__).resolve().parents[1]


def test_list_json_names_every_registry_entry_with_a_description(capsys):
    assert main(["--json"]) == 0
    cat = json.loads(capsys.readouterr().out)
    for kind, registry in (("sources", SOURCES), ("networks", NETWORKS), ("losses", LOSSES), ("methods", METHODS),
                           ("augmentations", AUGMENTS)):
        assert [e["name"] for e in cat[kind]] == sorted(registry), kind
        assert all(e["description"] for e in cat[kind]), [e["name"] for e in cat[kind] if not e["description"]]
    assert {"unetr", "swinunetr", "dynunet", "anisotropic_unet"} <= {e["name"] for e in cat["networks"]}
    assert {e["name"]: e["spatial_dims"] for e in cat["networks"]}["anisotropic_unet"] == [3]
    assert {e["name"] for e in cat["methods"] if e["test_time"]} == {"bn_adapt", "tent"}
    assert {"smoke", "demo"} <= {e["name"] for e in cat["experiments"]}
    assert {"seed004", "seed000_2d"} <= {e["name"] for e in cat["presets"]}
    assert {"methods", "loso", "transfer"} <= {e["name"] for e in cat["sweeps"]}
    assert all(e["description"] for kind in ("experiments", "presets", "sweeps") for e in cat[kind])


def test_list_runs_as_a_module_in_plain_text():
    out = subprocess.run([sys.executable, "-m", "experiments.list"], cwd=ROOT, capture_output=True, text=True,
                         encoding="utf-8", check=True).stdout
    assert "networks:" in out and "tent" in out and "[test time]" in out
    assert len(out.splitlines()) == sum(len(v) for v in catalogue().values()) + len(catalogue())


# erm / dann per-case lesion Dice by (holdout, seed); hand-computed means in the test below
DICE = {("erm", "mosmed"): {0: [0.4, 0.6], 1: [0.6, 0.8]}, ("dann", "mosmed"): {0: [0.5, 0.7], 1: [0.7, 0.9]},
        ("erm", "ctseg"): {0: [0.3, 0.3], 1: [0.2, 0.4]}, ("dann", "ctseg"): {0: [0.2, 0.2], 1: [0.1, 0.3]}}


def test_methods_table_against_erm(tmp_path):
    for (method, holdout), seeds in DICE.items():
        for seed, values in seeds.items():
            rows = [(holdout, f"c{i}", "lesion", {"dice": v}) for i, v in enumerate(values)]
            write_run(tmp_path / method, holdout=holdout, seed=seed, rows=rows, run_json_extra={"method": method},
                      metrics={"test/mean/dice": sum(values) / 2})
    import os
    os.environ["WANDB_MODE"] = "disabled"
    try:
        out = summarize_sweep(tmp_path, "methods_table", n_boot=50)
    finally:
        os.environ["WANDB_MODE"] = "offline"
    assert out["methods_table"] == {"rows": ["ctseg", "mosmed", "mean"], "columns": ["erm", "dann"]}
    rows = {r["holdout"]: r for r in csv.DictReader((tmp_path / "methods_table.csv").open(encoding="utf-8"))}
    # mosmed: erm seeds 0.5, 0.7 -> 0.6; dann 0.6, 0.8 -> 0.7 (+0.1). ctseg: erm 0.3; dann 0.2 (-0.1)
    assert float(rows["mosmed"]["erm"]) == pytest.approx(0.6) and float(rows["mosmed"]["dann"]) == pytest.approx(0.7)
    assert float(rows["mosmed"]["dann_vs_erm"]) == pytest.approx(0.1)
    assert float(rows["ctseg"]["dann_vs_erm"]) == pytest.approx(-0.1)
    assert float(rows["mean"]["erm"]) == pytest.approx(0.45) and float(rows["mean"]["dann_vs_erm"]) == pytest.approx(0.0)
    assert int(rows["mosmed"]["dann_n_seeds"]) == 2
    md = (tmp_path / "methods_table.md").read_text(encoding="utf-8")
    assert "PHANTOM" in md and "(+0.100)" in md and "(-0.100)" in md
