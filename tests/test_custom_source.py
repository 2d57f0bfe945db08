"""A private source described in YAML: the shipped L3-Net scheme on a small hand-built tree."""
import json
from pathlib import Path

import numpy as np
import pytest

from datamodules.io import write_volume
from datamodules.label_policy import IGNORE
from datamodules.sources import SOURCES
from datamodules.sources.custom import CustomSourceError, load_spec, register_custom_source
from datamodules.verify import main as verify_main

L3NET = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "sources" / "l3net.yaml"


@pytest.fixture(autouse=True)
def _unregister():
    yield
    SOURCES.pop("l3net", None)  # keep the global registry as other tests expect it


@pytest.fixture(scope="module")
def l3net_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    affine = np.diag([0.8, 0.8, 5.0, 1.0])
    for case in ("P0001_day1", "P0001_day7", "P0002_day1"):
        hu = np.full((12, 10, 4), -800, np.int16)
        hu[:, 0] = -1000  # some air: verify refuses a constant image
        write_volume(root / "l3net" / "images" / f"{case}.nii.gz", hu, affine)
    mask = np.zeros((12, 10, 4), np.int16)
    mask[:, :, 0] = -1                      # an unlabelled slice
    mask[0:4, 0:5, 1] = 1
    mask[6:10, 0:5, 1] = 2
    mask[1, 1, 1] = 5                       # pure GGO
    mask[7, 1, 1] = 10                      # consolidation
    mask[11, 9, 2] = 3                      # effusion
    mask[11, 8, 2] = 4                      # lymphadenopathy
    write_volume(root / "l3net" / "masks" / "P0001_day1_mask.nii.gz", mask, affine)
    write_volume(root / "l3net" / "masks" / "P0002_day1_mask.nii.gz", mask, affine)
    return root, mask


def test_l3net_scheme_maps_into_the_common_space(l3net_tree):
    root, mask = l3net_tree
    cls = register_custom_source(L3NET)
    assert SOURCES["l3net"] is cls and register_custom_source(L3NET) is cls  # idempotent
    adapter = cls(root / "l3net")
    cases = adapter.discover()
    assert [c.case_id for c in cases] == ["P0001_day1", "P0001_day7", "P0002_day1"]
    assert [c.patient_id for c in cases] == ["P0001", "P0001", "P0002"]
    assert [c.labelled for c in cases] == [True, False, True]
    out = adapter.policy(cases[0]).remap(mask)
    assert (out[:, :, 0] == IGNORE).all()                          # -1 unlabelled
    assert out[1, 1, 1] == 3 and out[7, 1, 1] == 3                 # GGO and consolidation -> lesion
    assert out[0, 0, 1] == 1 and out[6, 0, 1] == 2                 # lungs keep their side
    assert out[11, 9, 2] == IGNORE and out[11, 8, 2] == 0          # effusion ignored, lymph nodes background
    assert adapter.policy(cases[0]).annotated_vector().tolist() == [True, True, True, True, False, False, False, False]


def test_custom_source_problems_and_bad_specs(l3net_tree, tmp_path, capsys):
    root, mask = l3net_tree
    register_custom_source(L3NET)
    orphan = root / "l3net" / "masks" / "P0009_day1_mask.nii.gz"
    write_volume(orphan, mask, np.diag([0.8, 0.8, 5.0, 1.0]))
    try:
        assert verify_main(["--root", str(root), "--custom", str(L3NET), "--sources", "l3net", "--json",
                            "--no-duplicates"]) == 1
        report = json.loads(capsys.readouterr().out)
        assert report["sources"]["l3net"]["cases"] == 3 and report["sources"]["l3net"]["labelled"] == 2
        (problem,) = report["problems"]
        assert problem["file"].endswith("P0009_day1_mask.nii.gz") and "matches no image" in problem["message"]
    finally:
        orphan.unlink()
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nimages: '*.nii.gz'\ncodes: {0: background, 1: tumor}\nannotated: [tumor]\n", encoding="utf-8")
    with pytest.raises(CustomSourceError, match=r"bad\.yaml: codes/annotated .*unknown class 'tumor'"):
        load_spec(bad)
    bad.write_text("name: x\nimages: '*.nii.gz'\ncodes: {0: background}\nannotated: []\nmask: m\n", encoding="utf-8")
    with pytest.raises(CustomSourceError, match=r"unknown keys \['mask'\]"):
        load_spec(bad)
    bad.write_text("name: mosmed\nimages: '*.nii.gz'\ncodes: {0: background}\nannotated: []\n", encoding="utf-8")
    with pytest.raises(CustomSourceError, match="already registered"):
        register_custom_source(bad)
