"""Sweep files -> runs (no training): expansion, placeholders, folder names, W&B's view of the file."""
import pytest
import yaml

from experiments.sweep_run import plan_run
from sweeps.expand import SweepError, expand, load_sweep, overrides_hash, wandb_spec
from sweeps.launch import sweep_runs

SOURCES = ["covid19_20", "mosmed", "ctseg"]


def test_transfer_sweep_has_one_run_per_training_source_with_list_values():
    runs = expand(load_sweep("transfer"), SOURCES)
    assert len(runs) == 3
    assert [r[1] for r in runs] == ["data.train_sources=[covid19_20]", "data.train_sources=[mosmed]",
                                    "data.train_sources=[ctseg]"]
    assert all("protocol=transfer" in r and "data.fixed_test_part=true" in r for r in runs)


def test_grid_is_the_product_of_every_values_list(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"method": "grid", "parameters": {
        "protocol": {"value": "loso"}, "data.holdout": {"values": ["$sources"]}, "run.seed": {"values": [0, 1]},
        "selection.report": {"value": ["last", "oracle"]}}}, sort_keys=False), encoding="utf-8")
    runs = expand(load_sweep(str(path)), ["a", "b"])
    assert len(runs) == 4
    assert runs[0] == ["protocol=loso", "data.holdout=a", "run.seed=0", "selection.report=[last,oracle]"]
    assert runs[3][1:3] == ["data.holdout=b", "run.seed=1"]


def test_bad_sweep_files_are_named(tmp_path):
    with pytest.raises(SweepError, match="no sweep 'nope'"):
        load_sweep("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: bayes\nparameters: {lr: {min: 0.1, max: 1}}\n", encoding="utf-8")
    with pytest.raises(SweepError, match="grids only"):
        load_sweep(str(bad))
    bad.write_text("parameters: {lr: {min: 0.1, max: 1}}\n", encoding="utf-8")
    with pytest.raises(SweepError, match="exactly one of value / values"):
        load_sweep(str(bad))
    bad.write_text("command: [${env}]\nparameters: {}\n", encoding="utf-8")
    with pytest.raises(SweepError, match="not valid YAML"):
        load_sweep(str(bad))


def test_folder_hash_ignores_where_and_how_but_not_what():
    a = ["protocol=loso", "data.holdout=mosmed", "run.seed=0"]
    assert overrides_hash(a) == overrides_hash(list(reversed(a)))
    assert overrides_hash(a + ["paths.runs=/x", "wandb.group=g", "paths.cache=/c"]) == overrides_hash(a)
    assert overrides_hash(a) != overrides_hash(["protocol=loso", "data.holdout=mosmed", "run.seed=1"])


def test_runs_land_in_stable_folders_named_by_label_and_hash(tmp_path):
    spec = load_sweep("loso")
    sweep = sweep_runs(spec, "smoke", tmp_path, [])
    sweep_dir, runs = sweep.dir, sweep.runs
    assert sweep_dir == (tmp_path / "loso-smoke").resolve()
    assert [r["run_dir"].split("/")[-1].split("-")[0] for r in runs] == SOURCES
    assert all(r["run_dir"].startswith(str(sweep_dir / "loso")) and not r["done"] for r in runs)
    again = sweep_runs(spec, "smoke", tmp_path, []).runs
    assert [r["run_dir"] for r in again] == [r["run_dir"] for r in runs]
    # a finished run is seen as finished
    from pathlib import Path
    Path(runs[1]["run_dir"]).mkdir(parents=True)
    (Path(runs[1]["run_dir"]) / "done").write_text("x", encoding="utf-8")
    assert [r["done"] for r in sweep_runs(spec, "smoke", tmp_path, []).runs] == [False, True, False]
    _protocol, cfg, plan, run_dir = plan_run(runs[0]["overrides"])
    assert cfg.experiment == "smoke" and cfg.wandb.group == "loso-smoke" and plan.split == {"holdout": "covid19_20"}


def test_wandb_gets_a_concrete_grid_without_our_block():
    spec = wandb_spec(load_sweep("transfer"), SOURCES, ["experiment=smoke", "paths.runs=/shared/runs"])
    assert "covid_dg" not in spec and spec["method"] == "grid"
    assert spec["parameters"]["data.train_sources"] == {"values": ["[covid19_20]", "[mosmed]", "[ctseg]"]}
    assert spec["parameters"]["paths.runs"] == {"value": "/shared/runs"}
    assert spec["command"][-1] == "${args_no_hyphens}"


def test_wandb_logger_ids_and_groups(tmp_path, monkeypatch):
    from experiments.config import load_config
    from experiments.tracking import make_wandb_logger

    cfg = load_config(["experiment=smoke", "wandb.mode=offline", "wandb.group=transfer-smoke"])
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    a = make_wandb_logger(cfg, tmp_path / "run", "n", "transfer", ["x"])
    b = make_wandb_logger(cfg, tmp_path / "run", "n", "transfer", ["x"])
    other = make_wandb_logger(cfg, tmp_path / "other", "n", "transfer", ["x"])
    assert a._wandb_init["id"] == b._wandb_init["id"] != other._wandb_init["id"]  # stable per run folder
    assert a._wandb_init["group"] == "transfer-smoke" and a._wandb_init["job_type"] == "transfer"
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")  # inside `wandb agent`: the agent's id is kept
    assert make_wandb_logger(cfg, tmp_path / "run", "n", "transfer", [])._wandb_init["id"] is None
    default = make_wandb_logger(load_config(["experiment=smoke", "wandb.mode=offline"]), tmp_path, "n", "loso", [])
    assert default._wandb_init["group"] == "loso-smoke"


def _names(node) -> list[str]:
    """Every string anywhere in a YAML node (metric names may sit in nested keys or values)."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in _names(k) + _names(v)]
    if isinstance(node, list):
        return [s for v in node for s in _names(v)]
    return [node] if isinstance(node, str) else []


def test_every_sweep_objective_is_the_training_sources_validation_score():
    """A W&B Bayesian or random sweep tunes on its metric: a test/ metric would tune on the held-out source.
    The objective is the checkpoint-selection score, which aggregate() logs on every validation."""
    from lightning_modules.segmentation import aggregate
    from sweeps.expand import SWEEP_DIR

    files = sorted(SWEEP_DIR.glob("*.yaml"))
    assert len(files) >= 4
    for path in files:
        spec = wandb_spec(load_sweep(str(path)), SOURCES, ["experiment=smoke"])
        assert spec["metric"]["name"] == "val/mean/selection_dice", path.name
        named = _names(spec["metric"]) + _names(spec.get("early_terminate", {}))
        assert not any("test/" in s for s in named), (path.name, named)
    rows = [{"source": "a", "case": "1", "class": "lesion", **dict.fromkeys(
        ("dice", "iou", "nsd", "hd95", "asd", "rv", "ref_ml", "pred_ml"), 0.5)}]
    assert "val/mean/selection_dice" in aggregate(rows, "val")
