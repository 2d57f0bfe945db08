"""Typed configuration: choice-valued keys are enums that OmegaConf checks when the config loads, whose
values still behave as the plain strings they were; and one function names every run."""
import json
import re

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from datamodules.choices import Normalize
from datamodules.harmonize import HarmonizerConfig
from experiments.config import load_config
from experiments.list import choices
from experiments.tracking import config_hash
from rundir.naming import NOT_HASHED, hashed, run_hash
from sweeps.expand import overrides_hash

CHOICES = choices()


def test_every_choice_the_issue_names_is_an_enum():
    assert {"evaluation.space", "data.sampling", "data.on_error", "data.normalize", "augment.where",
            "selection.method", "wandb.mode"} <= set(CHOICES)
    assert CHOICES["evaluation.space"] == ["original", "harmonized"]
    assert CHOICES["data.on_error"] == ["fail", "skip"] and CHOICES["augment.where"] == ["none", "loader", "device"]


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_a_bad_choice_fails_at_load_in_one_line_listing_the_allowed_values(key):
    with pytest.raises(ValueError) as e:
        load_config([f"{key}=bogus"])
    assert str(e.value) == f"override '{key}=bogus': {key}='bogus': must be one of {CHOICES[key]}"


def test_a_bad_choice_in_a_yaml_file_names_the_file_and_key(tmp_path):
    from experiments import config

    bad = tmp_path / "preset.yaml"
    bad.write_text("evaluation:\n  space: harmonised\n", encoding="utf-8")
    cfg = OmegaConf.structured(config.Config)
    with pytest.raises(ValueError, match=re.escape(f"{bad}: evaluation.space='harmonised': must be one of "
                                                   "['original', 'harmonized']")):
        config._merge_file(cfg, bad)


def test_a_bad_choice_from_the_environment_names_the_key(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # base.yaml: wandb.mode: ${oc.env:WANDB_MODE,offline}
    with pytest.raises(ValueError, match=r"^wandb\.mode: .*'dryrun', expected one of \[offline, online, disabled\]$"):
        load_config([])


def test_choice_values_are_enum_members_that_behave_as_their_strings():
    cfg = load_config(["data.normalize=zscore"])
    value = cfg.data.normalize
    assert value is Normalize.zscore and value == "zscore" and {"zscore": 1}[value] == 1
    assert f"{value}" == str(value) == "zscore" and repr(value) == "'zscore'"
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert json.loads(json.dumps(plain))["data"]["normalize"] == "zscore"
    assert yaml.safe_load(yaml.safe_dump(plain))["data"]["normalize"] == "zscore"
    assert "normalize: zscore\n" in OmegaConf.to_yaml(cfg)
    # a run folder's config.yaml is plain strings: hashing it again names the same run
    assert config_hash(OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True))) == config_hash(cfg)


def test_a_checkpointed_harmonizer_holds_plain_strings():
    """Checkpoints load with weights_only=True, which refuses enum classes: the harmonizer (a checkpoint
    hyperparameter) keeps the plain string of a config's choice."""
    import io

    h = HarmonizerConfig(normalize=Normalize.zscore)
    assert type(h.normalize) is str
    buf = io.BytesIO()
    torch.save({"harmonizer": h.as_dict()}, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["harmonizer"]["normalize"] == "zscore"


def test_one_function_names_runs_and_both_names_leave_out_the_same_keys():
    cfg = {"data": {"holdout": "mosmed", "num_workers": 2}, "paths": {"runs": "a"}, "run": {"seed": 0}}
    moved = {"data": {"holdout": "mosmed", "num_workers": 8}, "paths": {"runs": "b"}, "run": {"seed": 0}}
    assert run_hash(cfg) == run_hash(moved) != run_hash({**cfg, "run": {"seed": 1}})
    assert len(run_hash(cfg)) == 8
    items = ["protocol=loso", "data.holdout=mosmed", "run.seed=0"]
    assert overrides_hash(items) == run_hash(items) == run_hash([*reversed(items), "data.num_workers=8"])
    assert len(overrides_hash(items)) == 10
    for key in NOT_HASHED:  # what a config leaves out, overrides leave out too
        assert not hashed(key) and not hashed(f"{key}.x")
        assert run_hash(items + [f"{key}=1"]) == run_hash(items)
    assert hashed("wandb.project") and hashed("data.holdout") and hashed("paths.runs_extra")


def test_run_names_of_the_smoke_and_demo_configs_did_not_move():
    """Run folders are named by these hashes: a change of the hash function or its key list renames them.
    (Moved by issue 17: new method/loss arguments and data.test_cases in base.yaml.)"""
    assert config_hash(load_config(["experiment=smoke", "wandb.mode=offline"])) == "d48adee8"
    assert config_hash(load_config(["experiment=demo", "wandb.mode=disabled"])) == "4b2b3ad1"
    assert overrides_hash(["experiment=smoke", "protocol=loso", "data.holdout=covid19_20", "paths.runs=/x",
                           "wandb.group=loso-smoke"]) == "ac11b3a7e7"
