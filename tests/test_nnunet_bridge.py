"""The nnU-Net v2 bridge: export a plan in nnU-Net's raw format, import nnU-Net's predictions as a run.

Fast tests check the format, the label rule, the decoded and mirrored images and the import's mapping and
errors on the tiny phantom suite. The slow test runs nnU-Net itself (its own venv under .cache/).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from omegaconf import OmegaConf

from datamodules.datamodule import MultiSourceDataModule
from datamodules.harmonize import HarmonizerConfig, harmonize_case, load_original, to_canonical
from datamodules.label_policy import CLASS_INDEX, IGNORE
from datamodules.phantom.suite import load_profiles, to_stored
from datamodules.sources import policy_named
from experiments.config import load_config
from experiments.export_nnunet import ExportError, export, label_table, mirror_image, training_labels
from experiments.import_nnunet import PredictionImportError, import_predictions
from experiments.plan import build_plan, case_from_record, val_patients, write_plan
from experiments.score import score_predictions

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["covid19_20", "ctseg", "mosmed"]


@pytest.fixture(scope="module")
def plan_dir(phantom_root, tmp_path_factory):
    """A LOSO plan (mosmed held out) of the tiny phantom suite, written as a run's plan.json."""
    dm = MultiSourceDataModule(phantom_root, tmp_path_factory.mktemp("h"), SOURCES, holdout="mosmed",
                               harmonizer=HarmonizerConfig(target_spacing=(6.0, 6.0, 8.0)), patch_size=(32, 32, 16),
                               batch_size=2, samples_per_epoch=2, val_fraction=0.3)
    dm.prepare_data()
    dm.setup("fit")
    evaluation = OmegaConf.to_container(load_config(["experiment=smoke"]).evaluation, resolve=True)
    plan = build_plan(kind="loso", name="mosmed-smoke-test", seed=0, sources=SOURCES, split_args={"holdout": "mosmed"},
                      split=dm.split, cached=dm.cached, duplicates=[], skipped=[], data_root="", phantom=True,
                      harmonizer=dm.harmonizer.as_dict(), patch={}, network={}, evaluation=evaluation)
    folder = tmp_path_factory.mktemp("run")
    write_plan(folder, plan)
    return folder


@pytest.fixture(scope="module")
def exported(plan_dir, tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    folder = export(plan_dir, raw, 501, test_labels=True, say=lambda *a: None)
    return folder


def _plan(plan_dir):
    return json.loads((plan_dir / "plan.json").read_text(encoding="utf-8"))


def test_dataset_json_and_folders_are_nnunet_raw_format(plan_dir, exported):
    plan = _plan(plan_dir)
    assert exported.name == "Dataset501_mosmed-smoke-test"
    ds = json.loads((exported / "dataset.json").read_text(encoding="utf-8"))
    assert ds["channel_names"] == {"0": "CT"} and ds["file_ending"] == ".nii.gz"
    # covid19_20 annotates lesions only, ctseg lungs too: every class a training case annotates is learned,
    # and covid19_20's unknown lungs need the ignore label, the highest value
    assert ds["labels"] == {"background": 0, "lung_left": 1, "lung_right": 2, "lesion": 3, "ignore": 4}
    values = sorted(ds["labels"].values())
    assert values == list(range(len(values)))
    training = plan["roles"]["train"] + plan["roles"]["val"]
    assert ds["numTraining"] == len(training)
    images = sorted(p.name for p in (exported / "imagesTr").iterdir())
    labels = sorted(p.name for p in (exported / "labelsTr").iterdir())
    assert len(images) == len(labels) == len(training)
    assert [n.replace("_0000.nii.gz", "") for n in images] == [n.replace(".nii.gz", "") for n in labels]
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+_0000\.nii\.gz", n) for n in images)
    mapping = json.loads((exported / "covid_dg.json").read_text(encoding="utf-8"))
    assert sorted(mapping["cases"][p.name[:-len("_0000.nii.gz")]] for p in (exported / "imagesTs").iterdir()) == \
        sorted(plan["roles"]["test"])
    assert mapping["labels"] == {"0": 0, "1": CLASS_INDEX["lung_left"], "2": CLASS_INDEX["lung_right"],
                                 "3": CLASS_INDEX["lesion"]}
    assert ds["covid_dg"]["plan_hash"] == mapping["plan_hash"]
    # lesion-only covid19_20: its background is unknown (could be lung); ctseg annotates everything
    assert mapping["ignore_share"]["covid19_20"] > 0.5 and mapping["ignore_share"]["ctseg"] == 0


def test_splits_final_validates_on_the_plans_validation_patients(plan_dir, exported):
    plan = _plan(plan_dir)
    mapping = json.loads((exported / "covid_dg.json").read_text(encoding="utf-8"))
    (fold,) = json.loads((exported / "splits_final.json").read_text(encoding="utf-8"))
    keys = {k: v for k, v in mapping["cases"].items()}
    assert sorted(keys[i] for i in fold["val"]) == sorted(plan["roles"]["val"])
    assert sorted(keys[i] for i in fold["train"]) == sorted(plan["roles"]["train"])
    # every case of a validation patient, and nothing else
    by_patient = {k for p in val_patients(plan) for k in plan["patients"][p]}
    assert {keys[i] for i in fold["val"]} == by_patient
    assert not set(fold["val"]) & set(fold["train"])


def test_labels_hold_only_declared_values_and_ignore_where_unknown(plan_dir, exported):
    plan = _plan(plan_dir)
    mapping = json.loads((exported / "covid_dg.json").read_text(encoding="utf-8"))
    for ident, key in mapping["cases"].items():
        if key not in plan["roles"]["train"] + plan["roles"]["val"]:
            continue
        lab = np.asarray(nib.load(str(exported / "labelsTr" / f"{ident}.nii.gz")).dataobj)
        assert set(np.unique(lab)) <= {0, 1, 2, 3, 4}
        rec = plan["cases"][key]
        _, common, _ = load_original(case_from_record(rec), policy_named(rec["label_policy"]))
        assert np.array_equal(lab == 3, np.isin(common, (3, 6, 7)))  # lesions stay lesions
        if rec["source"] == "covid19_20":
            assert np.array_equal(lab == 4, common == 0) and not np.isin(lab, (0, 1, 2)).any()
        else:
            assert not (lab == 4).any() and np.array_equal(lab == 1, common == 1)


def test_partial_label_rule_on_small_arrays():
    classes = ["lung_left", "lung_right", "lesion"]
    _, lut = label_table(classes)
    common = np.array([0, 1, 2, 3, 6, IGNORE], np.uint8)
    lesion_only = {"source": "s", "case_id": "c", "annotated": ["background", "lesion"]}
    # lungs unknown: the background could be lung, IGNORE is unknown anyway
    assert training_labels(common, lesion_only, classes, lut, 4).tolist() == [4, 1, 2, 3, 3, 4]
    lungs_only = {"source": "s", "case_id": "c", "annotated": ["background", "lung_left", "lung_right"]}
    # opacities unknown: they lie inside the lungs, so the annotated lung voxels are unknown, the background known
    assert training_labels(np.array([0, 1, 2, IGNORE], np.uint8), lungs_only, classes, lut, 4).tolist() == [0, 4, 4, 4]
    full = {"source": "s", "case_id": "c", "annotated": ["background", "lung_left", "lung_right", "lesion"]}
    assert training_labels(common, full, classes, lut, 4).tolist() == [0, 1, 2, 3, 3, 4]
    # a lesion-only export: lungs are background, GGO merges into lesion
    _, lut = label_table(["lesion"])
    assert training_labels(common[:5], full, ["lesion"], lut, None).tolist() == [0, 0, 0, 1, 1]


def test_8bit_ctseg_case_is_decoded_to_hu_and_mirrored_onto_its_masks(plan_dir, exported, phantom_root):
    plan = _plan(plan_dir)
    mapping = json.loads((exported / "covid_dg.json").read_text(encoding="utf-8"))
    manifest = {c["case"]: c for c in json.loads((phantom_root / "ctseg.json").read_text(encoding="utf-8"))["cases"]}
    window = load_profiles()["profiles"]["ctseg"]["window_8bit"]
    checked = 0
    for ident, key in mapping["cases"].items():
        rec = plan["cases"][key]
        truth = manifest.get(rec["case_id"]) if rec["source"] == "ctseg" else None
        if truth is None or truth["encoding"] != "uint8_window" or key in plan["roles"]["test"]:
            continue
        assert truth["image_flips"] and rec["image_flips"] == truth["image_flips"]  # the suite planted flips
        img = nib.load(str(exported / "imagesTr" / f"{ident}_0000.nii.gz"))
        stored = nib.load(rec["image"])
        raw = np.asarray(stored.dataobj)
        assert raw.dtype == np.uint8
        # independent decode of the stored bytes with the source's declared window, mirrored along the
        # stored axes that run along the planted canonical axes (the manifest's axcodes say which)
        expected = window[0] + raw.astype(np.float64) * (window[1] - window[0]) / 255.0
        letters = {"R-L": "RL", "A-P": "AP", "S-I": "SI"}
        for axis_name in truth["image_flips"]:
            expected = np.flip(expected, axis=[i for i, c in enumerate(truth["axcodes"]) if c in letters[axis_name]][0])
        got = np.asarray(img.dataobj, dtype=np.float64)
        assert np.allclose(got, expected, atol=1e-3)
        assert np.allclose(img.affine, stored.affine, atol=1e-5)
        # the same image, on the RAS grid, as the harmonizer mirrors it onto the masks
        cfg = HarmonizerConfig(resample=False, normalize="none")
        h = harmonize_case(case_from_record(rec), policy_named(rec["label_policy"]), cfg)
        ras, _ = to_canonical(got.astype(np.float32), img.affine)
        assert np.allclose(np.clip(ras, -1024, 3071), h.image, atol=1e-2)
        # and the image fits its masks: aerated lung is dark where the exported label says lung, darker than
        # in the image as stored (mirrored away from its masks)
        lung = np.isin(np.asarray(nib.load(str(exported / "labelsTr" / f"{ident}.nii.gz")).dataobj), (1, 2))
        as_stored = window[0] + raw.astype(np.float64) * (window[1] - window[0]) / 255.0
        assert got[lung].mean() < -600 and got[lung].mean() < as_stored[lung].mean() - 100
        checked += 1
    assert checked, "no 8-bit ctseg training case in the plan"


def test_mirroring_follows_the_stored_axis_order():
    """An LPS-stored image mirrored along canonical A-P is mirrored along the stored axis that runs A-P."""
    rng = np.random.default_rng(0)
    ras = rng.normal(size=(4, 5, 6))
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    stored, stored_affine = to_stored(ras, affine, "PSL")  # stored axes run P, S, L
    mirrored, _ = to_stored(np.flip(ras, axis=1), affine, "PSL")
    assert np.array_equal(mirror_image(stored, stored_affine, ["A-P"]), mirrored)
    both, _ = to_stored(np.flip(np.flip(ras, axis=1), axis=2), affine, "PSL")
    assert np.array_equal(mirror_image(stored, stored_affine, ["A-P", "S-I"]), both)


def test_export_is_idempotent_and_refuses_another_dataset(plan_dir, exported, tmp_path):
    assert export(plan_dir, exported.parent, 501, test_labels=True, say=lambda *a: None) == exported
    raw = tmp_path / "raw"
    export(plan_dir, raw, 502, classes=["lesion"], say=lambda *a: None)
    with pytest.raises(ExportError, match="Dataset502_.*another dataset.*--overwrite"):
        export(plan_dir, raw, 502, name="other", say=lambda *a: None)
    (other,) = raw.glob("Dataset502_*")
    assert other.name == "Dataset502_mosmed-smoke-test"
    ds = json.loads((other / "dataset.json").read_text(encoding="utf-8"))
    assert ds["labels"] == {"background": 0, "lesion": 1}  # lesion-only: nothing unknown, no ignore
    pre = tmp_path / "pre"
    export(plan_dir, raw, 502, name="other", overwrite=True, preprocessed=pre, say=lambda *a: None)
    assert [p.name for p in raw.iterdir() if not p.name.startswith(".")] == ["Dataset502_other"]
    assert json.loads((pre / "Dataset502_other" / "splits_final.json").read_text(encoding="utf-8")) == \
        json.loads((raw / "Dataset502_other" / "splits_final.json").read_text(encoding="utf-8"))
    with pytest.raises(ExportError, match="ggo: no training case of the plan annotates it"):
        export(plan_dir, raw, 503, classes=["ggo"], say=lambda *a: None)
    # a source that types opacities beside sources that do not: typed classes are refused, not half-learned
    plan = _plan(plan_dir)
    typed = plan["roles"]["train"][0]
    plan["cases"][typed]["annotated"] += ["ggo", "consolidation"]
    (tmp_path / "typed").mkdir()
    write_plan(tmp_path / "typed", plan)
    with pytest.raises(ExportError, match=r"--classes ggo: training source\(s\) \[.*\] do not type opacities"):
        export(tmp_path / "typed", raw, 503, classes=["lesion", "ggo"], say=lambda *a: None)


def _nnunet_predictions(exported, plan, out: Path, change: int = 0) -> Path:
    """nnU-Net-style predictions of the test cases: the references in nnU-Net values (labelsTs), some
    lesion voxels removed; the dataset.json copied beside them, as nnUNetv2_predict does."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(exported / "dataset.json", out / "dataset.json")
    for p in sorted((exported / "labelsTs").iterdir()):
        img = nib.load(str(p))
        lab = np.asarray(img.dataobj).astype(np.uint8)
        if change:
            lab[np.unravel_index(np.flatnonzero(lab == 3)[::change], lab.shape)] = 0
        out_img = nib.Nifti1Image(lab, img.affine)
        out_img.set_qform(img.affine, code=1)
        out_img.set_sform(img.affine, code=1)
        nib.save(out_img, str(out / p.name))
    return out


def test_import_maps_back_scores_and_writes_a_run_folder(plan_dir, exported, tmp_path):
    plan = _plan(plan_dir)
    pred = _nnunet_predictions(exported, plan, tmp_path / "pred", change=3)
    run_dir = import_predictions(pred, plan_dir / "plan.json", tmp_path / "runs", say=lambda *a: None)
    assert run_dir.parent == tmp_path / "runs" / "loso" and re.fullmatch(r"mosmed-smoke-test-nnunet-[0-9a-f]{8}", run_dir.name)
    for name in ("plan.json", "run.json", "per_case.csv", "metrics.json", "done"):
        assert (run_dir / name).is_file(), name
    info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    assert info["method"] == info["network"] == "nnunet"
    assert info["train_sources"] == ["covid19_20", "ctseg"] and info["test_sources"] == ["mosmed"]
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    # a third of each lesion removed: Dice 2(2/3)/(1 + 2/3) = 0.8 per case, about
    assert 0.75 < metrics["test/mosmed/dice"] < 0.85
    # predictions back in our values on the stored grid: scoring them again gives the same numbers
    again, _ = score_predictions(plan, run_dir / "predictions")
    assert again == {k: v for k, v in metrics.items() if k != "data"}
    for key in plan["roles"]["test"]:
        rec = plan["cases"][key]
        p = nib.load(str(run_dir / "predictions" / rec["source"] / f"{rec['case_id']}.nii.gz"))
        assert set(np.unique(np.asarray(p.dataobj))) <= {0, CLASS_INDEX["lesion"]}
        assert np.allclose(p.affine, nib.load(rec["image"]).affine, atol=1e-5)
    # the same predictions again: the same folder, nothing redone
    assert import_predictions(pred, plan_dir / "plan.json", tmp_path / "runs", say=lambda *a: None) == run_dir
    # the report lists nnU-Net as its own configuration
    from evaluation.reporting.runs import collect_runs

    (record,) = collect_runs([tmp_path / "runs"])
    assert record.method == "nnunet" and "method=nnunet" in record.experiment


def test_import_errors_name_the_file(plan_dir, exported, tmp_path):
    plan = _plan(plan_dir)
    pred = _nnunet_predictions(exported, plan, tmp_path / "pred")
    files = sorted(pred.glob("mosmed_*.nii.gz"))
    files[0].unlink()
    with pytest.raises(PredictionImportError, match=re.escape(files[0].name) + ".*missing"):
        import_predictions(pred, plan_dir / "plan.json", tmp_path / "runs", say=lambda *a: None)
    pred = _nnunet_predictions(exported, plan, tmp_path / "pred2")
    target = sorted(pred.glob("mosmed_*.nii.gz"))[1]
    img = nib.load(str(target))
    shifted = img.affine.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted), str(target))
    with pytest.raises(PredictionImportError, match=re.escape(target.name) + ".*not on the stored grid"):
        import_predictions(pred, plan_dir / "plan.json", tmp_path / "runs", say=lambda *a: None)
    pred = _nnunet_predictions(exported, plan, tmp_path / "pred3")
    target = sorted(pred.glob("mosmed_*.nii.gz"))[0]
    img = nib.load(str(target))
    lab = np.asarray(img.dataobj).copy()
    lab[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(lab, img.affine), str(target))
    with pytest.raises(PredictionImportError, match=re.escape(target.name) + r".*label values \[7\]"):
        import_predictions(pred, plan_dir / "plan.json", tmp_path / "runs", say=lambda *a: None)
    (pred / "dataset.json").unlink()
    with pytest.raises(PredictionImportError, match="--dataset"):
        import_predictions(pred, plan_dir / "plan.json", tmp_path / "runs", say=lambda *a: None)


def test_sweep_commands_run_export_nnunet_and_import_per_plan(tmp_path):
    from sweeps.nnunet import main, make_jobs, script_text

    sweep = tmp_path / "loso-demo"
    for name, method in (("mosmed-abc", "erm"), ("ctseg-def", "erm"), ("mosmed-smoke-nnunet-1234", "nnunet"),
                         ("unfinished", "erm")):
        run = sweep / "loso" / name
        run.mkdir(parents=True)
        (run / "plan.json").write_text("{}", encoding="utf-8")
        (run / "run.json").write_text(json.dumps({"method": method}), encoding="utf-8")
        if name != "unfinished":
            (run / "done").write_text("", encoding="utf-8")
    jobs = make_jobs(sweep, 510, nnunet_bin=Path("/opt/nn/bin"), python="py")
    assert [(j.run_dir.name, j.dataset) for j in jobs] == [("ctseg-def", "Dataset510_ctseg-def"),
                                                           ("mosmed-abc", "Dataset511_mosmed-abc")]
    root = (sweep / "nnunet").resolve()
    export, plan_pp, train, predict, imp = jobs[1].commands
    assert export == ["py", "-m", "experiments.export_nnunet", str((sweep / "loso" / "mosmed-abc").resolve()), "--out",
                      str(root / "raw"), "--id", "511", "--name", "mosmed-abc", "--preprocessed", str(root / "preprocessed")]
    assert plan_pp == ["/opt/nn/bin/nnUNetv2_plan_and_preprocess", "-d", "511", "-c", "3d_fullres",
                       "--verify_dataset_integrity"]
    assert train == ["/opt/nn/bin/nnUNetv2_train", "511", "3d_fullres", "0", "--c"]
    assert predict == ["/opt/nn/bin/nnUNetv2_predict", "-i", str(root / "raw" / "Dataset511_mosmed-abc" / "imagesTs"),
                       "-o", str(root / "predictions" / "Dataset511_mosmed-abc"), "-d", "511", "-c", "3d_fullres", "-f", "0"]
    assert imp == ["py", "-m", "experiments.import_nnunet", str(root / "predictions" / "Dataset511_mosmed-abc"),
                   "--plan", str((sweep / "loso" / "mosmed-abc" / "plan.json").resolve()), "--runs", str(sweep.resolve())]
    text = script_text(jobs[1], tmp_path)
    assert f"export nnUNet_raw={root / 'raw'}" in text and f"export nnUNet_results={root / 'results'}" in text
    assert text.rstrip().endswith(f"touch {root / 'jobs' / 'mosmed-abc.done'}")
    assert main([str(sweep), "--dry-run", "--id", "510"]) == 0
    assert (root / "jobs" / "mosmed-abc.sh").is_file()
    # the sweep module imports nothing from experiments: each step is a process of its own
    code = "import sys, sweeps.nnunet; sys.exit(any(m.startswith('experiments') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# ------------------------------------------------------------------------------------------ nnU-Net itself
NNUNET_VENV = REPO / ".cache" / "nnunet-venv"
NNUNET_PINS = ["torch==2.13.0", "nnunetv2"]
OFFLINE_SIGNS = ("No matching distribution", "Could not find a version", "NewConnectionError", "Temporary failure",
                 "Name or service not known", "Network is unreachable", "ConnectionError", "Max retries exceeded")


def nnunet_python() -> Path:
    """The venv's python with nnU-Net v2 installed (created once; `.covid-dg-ok` marks it complete)."""
    from datamodules.locking import folder_lock

    py, ok = NNUNET_VENV / "bin" / "python", NNUNET_VENV / ".covid-dg-ok"
    with folder_lock(NNUNET_VENV, what="nnU-Net venv", wait=True):
        if ok.is_file():
            return py
        shutil.rmtree(NNUNET_VENV, ignore_errors=True)
        t0 = time.time()
        subprocess.run(["python3", "-m", "venv", str(NNUNET_VENV)], check=True)
        proc = subprocess.run([str(py), "-m", "pip", "install", *NNUNET_PINS], capture_output=True, text=True,
                              encoding="utf-8", errors="replace", timeout=3600)
        if proc.returncode:
            out = proc.stdout[-3000:] + proc.stderr[-3000:]
            shutil.rmtree(NNUNET_VENV, ignore_errors=True)
            if any(s in out for s in OFFLINE_SIGNS):
                pytest.skip(f"nnU-Net venv: the package index is unreachable (pip install {' '.join(NNUNET_PINS)}): "
                            + out.strip().splitlines()[-1])
            raise AssertionError(f"pip install {' '.join(NNUNET_PINS)} failed:\n{out}")
        ok.write_text(f"pip install {' '.join(NNUNET_PINS)}: {time.time() - t0:.0f} s\n", encoding="utf-8")
    return py


def _nnunet(py: Path, code: str, env: dict, cwd: Path) -> str:
    proc = subprocess.run([str(py), "-c", code], env=env, cwd=cwd, capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_nnunet_checks_the_export_and_scores_like_us(phantom_root, tmp_path):
    """nnU-Net v2 itself, no mock: integrity check, fingerprint + planning + 3d_fullres preprocessing on an
    exported smoke LOSO split, its Dice on our smoke run's predictions equal to ours, and the import."""
    import csv

    from experiments.loso import main as loso

    t0 = time.time()
    py = nnunet_python()
    t_venv = time.time() - t0
    # a smoke LOSO run: its plan.json and its test predictions (our common values)
    cache = phantom_root.parents[1]
    loso(["--holdout", "mosmed", "experiment=smoke", f"paths.runs={tmp_path / 'runs'}", f"paths.cache={cache}",
          "wandb.mode=disabled"])
    (run,) = [p for p in (tmp_path / "runs" / "loso").iterdir() if p.is_dir()]
    plan = json.loads((run / "plan.json").read_text(encoding="utf-8"))
    raw, pre = tmp_path / "nnUNet_raw", tmp_path / "nnUNet_preprocessed"
    ds = export(run, raw, 501, test_labels=True, say=lambda *a: None)
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(tmp_path / "res"),
               nnUNet_def_n_proc="2", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # nnU-Net's venv only: none of our packages on its path
    # 1. nnU-Net's integrity check (label values, ignore highest, consecutive labels, image/label geometry)
    out = _nnunet(py, "from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity\n"
                      f"verify_dataset_integrity({str(ds)!r}, num_processes=2)", env, tmp_path)
    assert "verify_dataset_integrity Done" in out
    # 2. fingerprint, planning and 3d_fullres preprocessing (plan_and_preprocess_api)
    _nnunet(py, "from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, "
                "plan_experiments, preprocess\n"
                "extract_fingerprints([501], num_processes=2, check_dataset_integrity=True)\n"
                "plan_experiments([501])\n"
                "preprocess([501], configurations=('3d_fullres',), num_processes=(2,))", env, tmp_path)
    pre_ds = pre / ds.name
    plans = json.loads((pre_ds / "nnUNetPlans.json").read_text(encoding="utf-8"))
    assert "3d_fullres" in plans["configurations"]
    mapping = json.loads((ds / "covid_dg.json").read_text(encoding="utf-8"))
    n_train = len(plan["roles"]["train"]) + len(plan["roles"]["val"])
    assert len(list((pre_ds / "nnUNetPlans_3d_fullres").glob("*.pkl"))) == n_train
    assert json.loads((pre_ds / "splits_final.json").read_text(encoding="utf-8")) == json.loads((ds / "splits_final.json").read_text(encoding="utf-8"))
    fingerprint = json.loads((pre_ds / "dataset_fingerprint.json").read_text(encoding="utf-8"))
    assert len(fingerprint["spacings"]) == n_train
    # 3. nnU-Net's Dice on our run's test predictions, in nnU-Net's label values, against labelsTs
    ident = {k: i for i, k in mapping["cases"].items()}
    to_nn = {int(c): int(n) for n, c in mapping["labels"].items()}
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copyfile(ds / "dataset.json", pred / "dataset.json")
    for key in plan["roles"]["test"]:
        rec = plan["cases"][key]
        img = nib.load(str(run / "predictions" / rec["source"] / f"{rec['case_id']}.nii.gz"))
        ours = np.asarray(img.dataobj)
        nn = np.zeros(ours.shape, np.uint8)
        for c, n in to_nn.items():
            nn[ours == c] = n
        out_img = nib.Nifti1Image(nn, img.affine)
        out_img.set_qform(img.affine, code=1)
        out_img.set_sform(img.affine, code=1)
        nib.save(out_img, str(pred / f"{ident[key]}.nii.gz"))
    lesion = int(json.loads((ds / "dataset.json").read_text(encoding="utf-8"))["labels"]["lesion"])
    ignore = mapping["ignore"]
    _nnunet(py, "from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder\n"
                "from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO\n"
                f"compute_metrics_on_folder({str(ds / 'labelsTs')!r}, {str(pred)!r}, {str(tmp_path / 'nn.json')!r}, "
                f"SimpleITKIO(), '.nii.gz', [{lesion}], ignore_label={ignore!r}, num_processes=2)", env, tmp_path)
    theirs = json.loads((tmp_path / "nn.json").read_text(encoding="utf-8"))
    ours = {r["case"]: float(r["dice"]) for r in csv.DictReader((run / "per_case.csv").open(encoding="utf-8")) if r["class"] == "lesion"}
    by_case = {Path(c["prediction_file"]).name[:-len(".nii.gz")]: c["metrics"][str(lesion)]["Dice"]
               for c in theirs["metric_per_case"]}
    compared = []
    for key in plan["roles"]["test"]:
        case_id = plan["cases"][key]["case_id"]
        nn_dice = by_case[ident[key]]
        if nn_dice != nn_dice:  # nnU-Net: NaN when both masks are empty; ours: 1
            assert ours[case_id] == 1.0
            continue
        assert nn_dice == pytest.approx(ours[case_id], abs=1e-6), key
        compared.append((case_id, nn_dice, ours[case_id]))
    assert compared
    # 4. the import of those nnU-Net-valued predictions reproduces the run's own test metrics
    imported = import_predictions(pred, run / "plan.json", tmp_path / "runs", say=lambda *a: None)
    metrics = json.loads((imported / "metrics.json").read_text(encoding="utf-8"))
    reference = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    for k, v in reference.items():  # the run logged its means through Lightning, in float32
        if k.startswith("test/"):
            assert metrics[k] == pytest.approx(v, rel=1e-6, abs=1e-6), k

    def table(path):
        return {(r["case"], r["class"]): (r["dice"], r["nsd"], r["hd95"]) for r in csv.DictReader(path.open(encoding="utf-8"))}
    assert table(imported / "per_case.csv") == table(run / "per_case.csv")
    from experiments.report import main as report

    report([str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--bootstrap", "50"])
    summary = (tmp_path / "report" / "summary.md").read_text(encoding="utf-8")
    assert "method=nnunet" in summary
    print(f"\nnnU-Net bridge: venv {t_venv:.0f} s, total {time.time() - t0:.0f} s; lesion Dice nnU-Net vs ours: "
          + ", ".join(f"{c} {a:.6f}/{b:.6f}" for c, a, b in compared)
          + f"; max |difference| {max(abs(a - b) for _, a, b in compared):.2e}")
