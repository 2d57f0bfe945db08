"""`python -m datamodules.verify` and `python -m experiments.evaluate` on bad trees, as a user runs them.

verify exits 0 when it finds nothing, 1 when it finds problems (each naming its file) and 2 when it
could not check (unreadable root, an unexpected error). evaluate exits 2 on inputs it cannot score.
Most cases call the command's `main` in this process (output captured, the exit status turned into a
`CliError` like `cli()` does) to stay cheap; a few run it as a real subprocess through `cli()`.
"""
from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import numpy as np

from tests.badinputs import ACCEPTED, CliError, bad_input, cli
from tests.badinputs.volumes import _nifti, _patch, ct, lesion

SCL_SLOPE = 112


def run_main(main, *args: str) -> str:
    """`main(args)` with its output captured; a non-zero exit raises CliError('exit N: ...')."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in args])
    if code:
        raise CliError(code, (err.getvalue() + out.getvalue())[-4000:])
    return out.getvalue()


def verify(root, *extra, duplicates=False):
    from datamodules.verify import main

    return run_main(main, "--root", root, "--sources", "mosmed", *([] if duplicates else ["--no-duplicates"]), *extra)


def mosmed_tree(tmp, image=None, mask=None, study="study_0255", category="CT-1"):
    """A MosMed download with one labelled study; returns (root, image path, mask path)."""
    base = tmp / "root" / "mosmed" / "COVID19_1110"
    for folder in (base / "studies" / category, base / "masks"):
        folder.mkdir(parents=True, exist_ok=True)
    img = _nifti(base / "studies" / category / f"{study}.nii.gz", ct() if image is None else image)
    msk = _nifti(base / "masks" / f"{study}_mask.nii.gz", lesion() if mask is None else mask)
    return tmp / "root", img, msk


# ----------------------------------------------------------------------------- verify
@bad_input("cli", match=ACCEPTED)
def case_verify_clean_tree(tmp):
    root, _, _ = mosmed_tree(tmp)
    assert "no problem found" in verify(root)


@bad_input("cli", match=r"(?s)^exit 1: .*NaN", names=("{tmp}/root/mosmed/COVID19_1110/masks/study_0255_mask.nii.gz",))
def case_verify_nan_mask(tmp):
    m = lesion().astype(np.float32)
    m[0, 0, 0] = np.nan
    root, _, _ = mosmed_tree(tmp, mask=m)
    verify(root)


@bad_input("cli", match=r"(?s)^exit 1: .*non-integer", names=("{tmp}/root/mosmed/COVID19_1110/masks/study_0255_mask.nii.gz",))
def case_verify_fractional_mask(tmp):
    m = lesion().astype(np.float32) * 0.5
    root, _, _ = mosmed_tree(tmp, mask=m)
    verify(root)


@bad_input("cli", match=r"(?s)^exit 1: .*duplicate case id",
           names=("{tmp}/root/mosmed/COVID19_1110/studies/CT-1/study_0255.nii.gz",
                  "{tmp}/root/mosmed/COVID19_1110/studies/CT-2/study_0255.nii.gz"))
def case_verify_duplicated_case_ids(tmp):
    """The same study under two severity folders (an archive unpacked twice over another)."""
    root, _, _ = mosmed_tree(tmp)
    mosmed_tree(tmp, category="CT-2")
    verify(root, duplicates=True)  # the duplicate-scan search used to crash on the repeated key


@bad_input("cli", match=r"(?s)^exit 1: .*duplicate case id",
           names=("{tmp}/root/mosmed/COVID19_1110/studies/CT-1/study_0255.nii",
                  "{tmp}/root/mosmed/COVID19_1110/studies/CT-1/study_0255.nii.gz"))
def case_verify_same_case_compressed_and_not(tmp):
    """A Kaggle `.nii` copy unpacked beside the official `.nii.gz`."""
    root, img, _ = mosmed_tree(tmp)
    _nifti(img.with_name("study_0255.nii"), ct())
    verify(root, duplicates=True)


@bad_input("cli", match=r"(?s)^exit 1: .*mask .*missing", names=("{tmp}/root/mosmed/COVID19_1110/studies/CT-1/study_0256.nii.gz",))
def case_verify_missing_mask(tmp):
    root, _, _ = mosmed_tree(tmp)
    base = root / "mosmed" / "COVID19_1110"
    _nifti(base / "studies" / "CT-1" / "study_0256.nii.gz", ct())
    (base / "dataset_registry.csv").write_text(
        "study_id,category,study_file,mask_file\n"
        "study_0255,CT-1,/studies/CT-1/study_0255.nii.gz,/masks/study_0255_mask.nii.gz\n"
        "study_0256,CT-1,/studies/CT-1/study_0256.nii.gz,/masks/study_0256_mask.nii.gz\n", encoding="utf-8")
    verify(root)


@bad_input("cli", match=r"(?s)^exit 1: .*constant image", names=("{tmp}/root/mosmed/COVID19_1110/studies/CT-1/study_0255.nii.gz",))
def case_verify_constant_image(tmp):
    root, _, _ = mosmed_tree(tmp, image=np.zeros((40, 40, 12), np.int16))
    verify(root)


@bad_input("cli", match=r"(?s)^exit 1: .*8-bit", names=("{tmp}/root/mosmed/COVID19_1110/studies/CT-1/study_0255.nii.gz",))
def case_verify_8bit_export_as_hu(tmp):
    stored = np.round((np.clip(ct().astype(np.float32), -1250, 250) + 1250) / 1500 * 255).astype(np.uint8)
    root, _, _ = mosmed_tree(tmp, image=stored)
    verify(root)


@bad_input("cli", match=r"(?s)^exit 1: .*scl_slope=1000", names=("{tmp}/root/mosmed/COVID19_1110/studies/CT-1/study_0255.nii.gz",))
def case_verify_absurd_scl_slope(tmp):
    root, img, _ = mosmed_tree(tmp)
    _patch(img, SCL_SLOPE, "ff", 1000.0, 0.0)
    verify(root)


@bad_input("cli", match=r"(?s)^exit 1: .*shear", names=("{tmp}/root/mosmed/COVID19_1110/studies/CT-1/study_0255.nii.gz",))
def case_verify_sheared_image(tmp):
    root, img, msk = mosmed_tree(tmp)
    a = np.diag([2.0, 2.0, 5.0, 1.0])
    a[1, 2] = 1.5
    _nifti(img, ct(), a)
    _nifti(msk, lesion(), a)
    verify(root)


@bad_input("cli", match=r"(?s)^exit 1: .*header declares", names=("{tmp}/root/mosmed/COVID19_1110/studies/CT-1/study_0255.nii.gz",))
def case_verify_huge_header(tmp):
    root, img, _ = mosmed_tree(tmp)
    _patch(img, 40, "4h", 3, 1000, 1000, 1000)
    verify(root)


@bad_input("cli", match=r"(?s)^exit 2: .*not a folder", names=("{tmp}/nowhere",))
def case_verify_root_missing(tmp):
    cli("datamodules.verify", "--root", str(tmp / "nowhere"), "--sources", "mosmed", "--no-duplicates")


@bad_input("cli", match=r"(?s)^exit 2: .*not a folder", names=("{tmp}/root.txt",))
def case_verify_root_is_a_file(tmp):
    (tmp / "root.txt").write_text("x", encoding="utf-8")
    verify(tmp / "root.txt")


@bad_input("cli", match=r"(?s)^exit 1: .*NaN", names=("{tmp}/root/mosmed/COVID19_1110/masks/study_0255_mask.nii.gz",))
def case_verify_nan_mask_subprocess(tmp):
    """The exit status a shell script sees: 1 for problems found (not a crash)."""
    m = lesion().astype(np.float32)
    m[0, 0, 0] = np.nan
    root, _, _ = mosmed_tree(tmp, mask=m)
    cli("datamodules.verify", "--root", str(root), "--sources", "mosmed", "--no-duplicates")


# ----------------------------------------------------------------------------- evaluate
def evaluate(tmp, *extra):
    from experiments.evaluate import main

    return run_main(main, "--pred", tmp / "pred", "--ref", tmp / "ref", "--out", tmp / "out", *extra)


def pair(tmp, pred, ref=None, name="case1.nii.gz", affine=None):
    (tmp / "pred").mkdir(exist_ok=True)
    (tmp / "ref").mkdir(exist_ok=True)
    _nifti(tmp / "ref" / name, lesion() if ref is None else ref)
    if pred is not None:
        _nifti(tmp / "pred" / name, pred, affine)


@bad_input("cli", match=ACCEPTED)
def case_evaluate_clean(tmp):
    pair(tmp, lesion())
    evaluate(tmp)
    summary = json.loads((tmp / "out" / "summary.json").read_text(encoding="utf-8"))
    assert summary["classes"]["lesion"]["dice"]["mean"] == 1.0


@bad_input("cli", match=r"(?s)^exit 2: .*label.*\[2, 255\]", names=("{tmp}/pred/case1.nii.gz",))
def case_evaluate_unknown_prediction_labels(tmp):
    """A tool that writes lesions as 255 (a PNG habit) and lungs as 2: scored as empty before."""
    p = lesion() * 255
    p[0:3, 0:3, 0:3] = 2
    pair(tmp, p.astype(np.uint8))
    evaluate(tmp)


@bad_input("cli", match=ACCEPTED)
def case_evaluate_unknown_labels_allowed_and_recorded(tmp):
    p = lesion().astype(np.uint8)
    p[0:3, 0:3, 0:3] = 9
    pair(tmp, p)
    evaluate(tmp, "--allow-unknown-labels")
    summary = json.loads((tmp / "out" / "summary.json").read_text(encoding="utf-8"))
    assert summary["unknown_labels"] == {"case1": [9]}, summary.get("unknown_labels")


@bad_input("cli", match=ACCEPTED)
def case_evaluate_labels_known_from_the_references(tmp):
    """Codes the references use (lungs 1/2 beside lesion 3) are known even when only lesion is scored."""
    ref = lesion() * 3
    ref[0:4, 0:4, 0:4] = 1
    pair(tmp, ref.astype(np.uint8), ref.astype(np.uint8))
    evaluate(tmp, "--labels", "lesion=3")


@bad_input("cli", match=r"(?s)^exit 2: .*shape", names=("{tmp}/pred/case1.nii.gz",))
def case_evaluate_shape_mismatch(tmp):
    pair(tmp, lesion()[:, :, :-1])
    evaluate(tmp)


@bad_input("cli", match=r"(?s)^exit 2: .*affine", names=("{tmp}/pred/case1.nii.gz",))
def case_evaluate_affine_mismatch(tmp):
    a = np.diag([2.0, 2.0, 5.0, 1.0])
    a[:3, 3] = 10.0
    pair(tmp, lesion(), affine=a)
    evaluate(tmp)


@bad_input("cli", match=r"(?s)^exit 2: .*without a prediction .*case2")
def case_evaluate_missing_prediction(tmp):
    pair(tmp, lesion())
    pair(tmp, None, name="case2.nii.gz")
    evaluate(tmp)


@bad_input("cli", match=r"(?s)^exit 2: .*NaN", names=("{tmp}/pred/case1.nii.gz",))
def case_evaluate_nan_prediction(tmp):
    p = lesion().astype(np.float32)
    p[1, 1, 1] = np.nan
    pair(tmp, p)
    evaluate(tmp)


@bad_input("cli", match=r"(?s)^exit 2: .*non-integer", names=("{tmp}/pred/case1.nii.gz",))
def case_evaluate_probabilities_as_prediction(tmp):
    pair(tmp, lesion().astype(np.float32) * 0.7)
    evaluate(tmp)


@bad_input("cli", match=r"(?s)^exit 2: .*corrupt or truncated", names=("{tmp}/pred/case1.nii.gz",))
def case_evaluate_truncated_prediction(tmp):
    pair(tmp, lesion())
    raw = (tmp / "pred" / "case1.nii.gz").read_bytes()
    (tmp / "pred" / "case1.nii.gz").write_bytes(raw[: len(raw) // 2])
    evaluate(tmp)


@bad_input("cli", match=r"(?s)^exit 2: .*not a folder", names=("{tmp}/pred",))
def case_evaluate_prediction_folder_missing(tmp):
    (tmp / "ref").mkdir()
    _nifti(tmp / "ref" / "case1.nii.gz", lesion())
    evaluate(tmp)


@bad_input("cli", match=r"(?s)^exit 2: .*label.*\[255\]", names=("{tmp}/pred/case1.nii.gz",))
def case_evaluate_unknown_labels_subprocess(tmp):
    pair(tmp, (lesion() * 255).astype(np.uint8))
    cli("experiments.evaluate", "--pred", str(tmp / "pred"), "--ref", str(tmp / "ref"), "--out", str(tmp / "out"))
