"""Evaluation across entry points: a short LOSO run scores in original geometry and writes its
predictions; `experiments.evaluate` re-scores them to the same numbers; `experiments.predict` gives
the same masks from the checkpoint for NIfTI (any orientation, 8-bit) and DICOM input; `experiments.report`
tables match the run folder."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from datamodules.io import read_volume, write_volume
from experiments.evaluate import main as evaluate_main
from experiments.loso import main as loso_main
from experiments.predict import discover_inputs, run_predict
from tests.dicom_util import write_dicom_series

REPO = Path(__file__).resolve().parents[1]
METRICS = ("dice", "iou", "nsd", "hd95", "asd", "rv", "ref_ml", "pred_ml")
SEVERITY = ("ref_po", "pred_po", "ref_pho", "pred_pho", "ref_wal_pct", "pred_wal_pct")
EIGHT_BIT_FLIPPED = "radiopaedia_7_85703_0"  # 8-bit windowed, stored mirrored along x and z


@pytest.fixture(scope="module")
def ctseg_run(phantom_root, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    loso_main(["--holdout", "ctseg", "experiment=smoke", f"paths.runs={runs}", f"paths.cache={phantom_root.parents[1]}",
               "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1", "data.samples_per_epoch=8",
               "wandb.mode=disabled"])
    (run_dir,) = [p for p in (runs / "loso").iterdir() if p.is_dir()]
    return run_dir


def _rows(path: Path) -> dict:
    return {(r["source"] or "ctseg", r["case"], r["class"]): r for r in csv.DictReader(path.open(encoding="utf-8"))}


def test_run_scores_in_original_geometry_and_saves_what_it_scored(ctseg_run, phantom_root):
    images = phantom_root / "ctseg" / "COVID-19-CT-Seg_20cases"
    preds = sorted((ctseg_run / "predictions" / "ctseg").glob("*.nii.gz"))
    assert len(preds) == 7
    for p in preds:
        pred, affine = read_volume(p)
        image, image_affine = read_volume(images / p.name)
        assert pred.shape == image.shape and np.allclose(affine, image_affine, atol=1e-4)
        assert set(np.unique(pred)) <= {0, 1, 2, 3}
        ref, _ = read_volume(ctseg_run / "references" / "ctseg" / p.name)
        official, _ = read_volume(phantom_root / "ctseg" / "Lung_and_Infection_Mask" / p.name)
        assert np.array_equal(ref, official)  # ctseg's codes 1, 2, 3 are the common codes
    rows = _rows(ctseg_run / "per_case.csv")
    assert {k[2] for k in rows} == {"lesion", "lung", "lung_left", "lung_right"}  # ctseg annotates lungs
    assert all(r["space"] == "original" for r in rows.values())
    lesion = [r for k, r in rows.items() if k[2] == "lesion"]
    assert all(float(r["tolerance_mm"]) == 3.0 for r in lesion)
    assert all(r["ref_po"] != "" and 0 < float(r["ref_po"]) < 100 for r in lesion)
    metrics = json.loads((ctseg_run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["test/ctseg/dice"] == pytest.approx(np.mean([float(r["dice"]) for r in lesion]), abs=1e-6)
    assert metrics["test/ctseg/nsd_lung"] == pytest.approx(
        np.mean([float(r["nsd"]) for k, r in rows.items() if k[2] == "lung"]), abs=1e-6)


def test_evaluate_reproduces_the_run_per_case_numbers(ctseg_run, phantom_root, tmp_path):
    out = tmp_path / "eval"
    rc = evaluate_main(["--pred", str(ctseg_run / "predictions"), "--ref", str(ctseg_run / "references"),
                        "--out", str(out), "--labels", "lesion=3+6+7,lung=1+2+3+6+7,lung_left=1,lung_right=2",
                        "--lesions-by-side", "lung_left,lung_right",
                        "--image", str(phantom_root / "ctseg" / "COVID-19-CT-Seg_20cases"), "--source", "ctseg"])
    assert rc == 0
    run_rows, eval_rows = _rows(ctseg_run / "per_case.csv"), _rows(out / "per_case.csv")
    assert run_rows.keys() == eval_rows.keys()
    for key, r in run_rows.items():
        cols = METRICS + (SEVERITY if key[2] == "lesion" else ())
        for c in cols:
            a, b = float(r[c]), float(eval_rows[key][c])
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=2e-6), (key, c, a, b)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    lesion = [float(r["dice"]) for k, r in run_rows.items() if k[2] == "lesion"]
    assert summary["classes"]["lesion"]["dice"]["mean"] == pytest.approx(np.mean(lesion), abs=1e-6)
    assert summary["classes"]["lesion"]["severity_agreement"]["po"]["n"] == 7


def test_evaluate_reports_missing_cases_and_geometry_mismatch(ctseg_run, tmp_path, capsys):
    pred = tmp_path / "pred"
    (pred / "ctseg").mkdir(parents=True)
    src = sorted((ctseg_run / "predictions" / "ctseg").glob("*.nii.gz"))
    for p in src[:2]:
        (pred / "ctseg" / p.name).write_bytes(p.read_bytes())
    args = ["--pred", str(pred), "--ref", str(ctseg_run / "references"), "--out", str(tmp_path / "o"), "--labels", "lesion=3"]
    assert evaluate_main(args) == 2
    err = capsys.readouterr().err
    assert "5 reference case(s) without a prediction" in err and "--allow-missing" in err
    assert evaluate_main(args + ["--allow-missing"]) == 0
    assert len({r["case"] for r in csv.DictReader((tmp_path / "o" / "per_case.csv").open(encoding="utf-8"))}) == 2
    # a prediction on another grid is an error naming the file, never resampled silently
    data, affine = read_volume(src[0])
    shifted = affine.copy()
    shifted[0, 3] += 5.0
    write_volume(pred / "ctseg" / src[0].name, data, shifted)
    assert evaluate_main(args + ["--allow-missing"]) == 2
    err = capsys.readouterr().err
    assert src[0].name in err and "affine" in err


def test_predict_matches_the_run_for_8bit_flipped_las_and_dicom_inputs(ctseg_run, phantom_root, tmp_path):

    ckpt = Path(json.loads((ctseg_run / "run.json").read_text(encoding="utf-8"))["best_checkpoint"])
    image_path = phantom_root / "ctseg" / "COVID-19-CT-Seg_20cases" / f"{EIGHT_BIT_FLIPPED}.nii.gz"
    saved, saved_affine = read_volume(ctseg_run / "predictions" / "ctseg" / f"{EIGHT_BIT_FLIPPED}.nii.gz")

    run_predict(ckpt, image_path, tmp_path / "ras", source="ctseg", overlays=1)
    lesion, affine = read_volume(tmp_path / "ras" / f"{EIGHT_BIT_FLIPPED}_lesion.nii.gz")
    assert lesion.shape == saved.shape and np.allclose(affine, saved_affine, atol=1e-5)
    assert np.array_equal(lesion, (saved == 3).astype(np.uint8))  # the same pipeline as the run's test step
    # trained on covid19_20 + mosmed, neither annotates lungs: no lung output, and no PO claimed
    assert not (tmp_path / "ras" / f"{EIGHT_BIT_FLIPPED}_lung.nii.gz").exists()
    sev = json.loads((tmp_path / "ras" / f"{EIGHT_BIT_FLIPPED}_severity.json").read_text(encoding="utf-8"))
    assert sev["lungs_predicted"] is False and "po" not in sev
    assert sev["sanity"] == "ok"  # issue 19: no lungs predicted, none in a bare input: nothing implausible to find
    assert sev["decoding"] == {"encoding": "uint8_window", "window": [-1250.0, 250.0], "image_flips": ["A-P", "S-I"]}
    assert sev["lesion_ml"] == pytest.approx((saved == 3).sum() * np.prod(nib.load(image_path).header.get_zooms()) / 1000)
    assert (tmp_path / "ras" / f"{EIGHT_BIT_FLIPPED}_overlay_1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same scan stored LAS (voxel x reversed, affine adjusted: same world geometry).
    img = nib.load(image_path)
    data = np.asanyarray(img.dataobj)[::-1]
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, data.shape[0] - 1
    las_dir = tmp_path / "las_in"
    las_dir.mkdir()
    las = nib.Nifti1Image(np.ascontiguousarray(data), img.affine @ flip)
    nib.save(las, str(las_dir / f"{EIGHT_BIT_FLIPPED}.nii.gz"))
    assert nib.aff2axcodes(las.affine) == ("L", "A", "S")
    run_predict(ckpt, las_dir, tmp_path / "las", source="ctseg", overlays=0)
    las_lesion, las_affine = read_volume(tmp_path / "las" / f"{EIGHT_BIT_FLIPPED}_lesion.nii.gz")
    assert las_lesion.shape == data.shape and np.allclose(las_affine, las.affine, atol=1e-5)
    assert np.array_equal(las_lesion, (saved[::-1] == 3).astype(np.uint8))

    # A DICOM series of an HU case (no quirks) gives the same mask as its NIfTI.
    hu_case = phantom_root / "ctseg" / "COVID-19-CT-Seg_20cases" / "coronacases_001.nii.gz"
    hu, hu_affine = read_volume(hu_case)
    series = tmp_path / "dicom" / "coronacases_001"
    write_dicom_series(hu.astype(np.int16), hu_affine, series)
    (case,) = discover_inputs(tmp_path / "dicom")
    assert case.case_id == "coronacases_001" and case.dicom_files
    run_predict(ckpt, tmp_path / "dicom", tmp_path / "dcm_out", overlays=0)
    run_predict(ckpt, hu_case, tmp_path / "nii_out", overlays=0)
    a, a_aff = read_volume(tmp_path / "dcm_out" / "coronacases_001_lesion.nii.gz")
    b, b_aff = read_volume(tmp_path / "nii_out" / "coronacases_001_lesion.nii.gz")
    assert a.shape == b.shape == hu.shape and np.allclose(a_aff, hu_affine, atol=1e-3)
    assert (a == b).mean() > 0.999


def test_report_tables_match_the_run_folder(ctseg_run, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.report", str(ctseg_run), "--out", str(tmp_path / "rep")],
                          cwd=REPO, capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((ctseg_run / "metrics.json").read_text(encoding="utf-8"))
    rows = list(csv.DictReader((tmp_path / "rep" / "tables" / "headline.csv").open(encoding="utf-8")))
    (row,) = [r for r in rows if r.get("test_source", r.get("test source")) == "ctseg"]
    value = next(float(v) for k, v in row.items() if k.startswith("dice") and "mean" in k)
    assert value == pytest.approx(metrics["test/ctseg/dice"], abs=5e-4)
    assert "PHANTOM DATA" in (tmp_path / "rep" / "summary.md").read_text(encoding="utf-8")


def test_evaluate_lobe_scores_from_lobe_maps(ctseg_run, phantom_root, tmp_path):
    from evaluation.severity import lobe_score

    # coronacases are stored as the header says, so the phantom's truth lobes lie on the mask's grid
    cases = ["coronacases_001", "coronacases_002"]
    pred, ref, lobes = (tmp_path / n for n in ("pred", "ref", "lobes"))
    for d in (pred, ref, lobes):
        d.mkdir()
    for c in cases:
        (pred / f"{c}.nii.gz").write_bytes((ctseg_run / "predictions" / "ctseg" / f"{c}.nii.gz").read_bytes())
        (ref / f"{c}.nii.gz").write_bytes((ctseg_run / "references" / "ctseg" / f"{c}.nii.gz").read_bytes())
        (lobes / f"{c}.nii.gz").write_bytes((phantom_root / "_truth" / "ctseg" / f"{c}_lobes.nii.gz").read_bytes())
    images = phantom_root / "ctseg" / "COVID-19-CT-Seg_20cases"
    assert evaluate_main(["--pred", str(pred), "--ref", str(ref), "--out", str(tmp_path / "out"),
                          "--labels", "lesion=3", "--image", str(images), "--lobes", str(lobes)]) == 0
    rows = {r["case"]: r for r in csv.DictReader((tmp_path / "out" / "per_case.csv").open(encoding="utf-8"))}
    for c in cases:
        lab, _ = read_volume(lobes / f"{c}.nii.gz")
        les = read_volume(ref / f"{c}.nii.gz")[0] == 3
        hu = read_volume(images / f"{c}.nii.gz")[0]
        lung = lab > 0
        assert float(rows[c]["ref_po"]) == pytest.approx(100 * (les & lung).sum() / lung.sum(), abs=1e-5)
        lss = sum(lobe_score(100 * (les & (lab == v)).sum() / (lab == v).sum()) for v in range(1, 6))
        lhos = sum(lobe_score(100 * (les & (lab == v) & (hu >= -200)).sum() / (lab == v).sum()) for v in range(1, 6))
        assert int(float(rows[c]["ref_lss"])) == lss and int(float(rows[c]["ref_lhos"])) == lhos
        assert 0 <= int(float(rows[c]["pred_lss"])) <= 20


def test_evaluate_decodes_8bit_images_in_flat_folders_too(ctseg_run, phantom_root, tmp_path):
    """`--source` decides the decoding even when the folders are flat (no source sub-folder)."""
    case = "radiopaedia_7_85703_0"
    for d in ("pred", "ref"):
        (tmp_path / d).mkdir()
    (tmp_path / "pred" / f"{case}.nii.gz").write_bytes(
        (ctseg_run / "predictions" / "ctseg" / f"{case}.nii.gz").read_bytes())
    (tmp_path / "ref" / f"{case}.nii.gz").write_bytes((ctseg_run / "references" / "ctseg" / f"{case}.nii.gz").read_bytes())
    assert evaluate_main(["--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--out", str(tmp_path / "o"),
                          "--labels", "lesion=3+6+7,lung=1+2+3+6+7", "--source", "ctseg",
                          "--image", str(phantom_root / "ctseg" / "COVID-19-CT-Seg_20cases")]) == 0
    (flat,) = [r for r in csv.DictReader((tmp_path / "o" / "per_case.csv").open(encoding="utf-8")) if r["class"] == "lesion"]
    run = _rows(ctseg_run / "per_case.csv")[("ctseg", case, "lesion")]
    for c in SEVERITY:  # decoded as 8-bit windowed exactly like the run (raw 0..255 would give other PHO/WAL)
        assert float(flat[c]) == pytest.approx(float(run[c]), abs=2e-6), c
