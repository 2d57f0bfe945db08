"""Segment new CT volumes with a trained checkpoint.

    python -m experiments.predict --ckpt PATH --input (file.nii[.gz] | folder | DICOM series folder) --out DIR
        [--source NAME] [--encoding auto|hu|uint8_window] [--window LO,HI] [--image-flips A-P,S-I] [--device cpu]

Each input goes through the harmonizer the checkpoint was trained with (orientation, decoding,
resampling, windowing), sliding-window inference, and back onto the input's own grid. Per case
`<out>/`:
- `<case>_lesion.nii.gz` (0/1) and, when the model learned lungs (a training source annotated them),
  `<case>_lung.nii.gz` (1 left, 2 right, lesions inside included) plus `<case>_labels.nii.gz`
  (1 left lung, 2 right lung, 3 lesion); all with the input's shape and affine;
- `<case>_severity.json`: lesion volume, and PO/PHO/WAL when the lungs are predicted, and `sanity`: `ok` or
  the implausible findings (evaluation.sanity: lung volume outside an adult range, lung in the air outside the
  body or on the volume border, lesions outside the lungs), each case with problems also printed as a warning;
- `<case>_overlay_<k>.png`: the most affected axial slices (radiological view), image beside the
  prediction, with a legend (and the sanity problems in red when there are any);
and `predictions.csv` with one row per case.

Intensities: `auto` reads 0..255 integer volumes as 8-bit windowed exports (COVID-19-CT-Seg's
radiopaedia cases, window -1250..250 HU) and everything else as HU; it says which it chose.
`--source ctseg` applies that source's per-case storage quirks (8-bit window, declared image flips)
by case name. An input without a mask cannot have its image flips measured (datamodules.alignment):
the declared ones (or `--image-flips`) are applied unconfirmed, and the report says so.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datamodules.alignment import parse_flips
from datamodules.cases import Case
from datamodules.harmonize import HarmonizerConfig, harmonize_case, load_original
from datamodules.io import VolumeError, dicom_series, read_dicom_series, read_volume, spacing_of, write_volume
from datamodules.label_policy import CLASS_INDEX, OPACITY
from datamodules.sources import get_source
from datamodules.sources.base import NIFTI_RE, nifti_files
from evaluation import severity as severity_mod
from evaluation.sanity import SanityLimits, check_prediction, sanity_text
from evaluation.scoring import lesions_to_lung_sides
from experiments.tracking import write_csv, write_json
from rundir.cli import command_name, run_cli

WINDOW_8BIT = (-1250.0, 250.0)
DISPLAY_WINDOW = (-1000.0, 300.0)
LUNGS = (CLASS_INDEX["lung_left"], CLASS_INDEX["lung_right"])


@dataclass
class InputCase:
    case_id: str
    path: Path                       # NIfTI file, or the DICOM folder
    dicom_files: list[str] | None = None


def discover_inputs(path: Path) -> list[InputCase]:
    """A NIfTI file; a folder of NIfTI files; a DICOM series folder; or a folder of series folders."""
    if path.is_file():
        if not NIFTI_RE.search(path.name):
            raise VolumeError(f"{path}: not a NIfTI file (.nii/.nii.gz); pass a DICOM series as its folder")
        return [InputCase(NIFTI_RE.sub("", path.name), path)]
    if not path.is_dir():
        raise VolumeError(f"{path}: no such file or folder")
    files = nifti_files(path)
    if files:
        return [InputCase(NIFTI_RE.sub("", f.name), f) for f in files]
    cases = []
    for folder in [path] + sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        series = dicom_series(folder)
        for i, (_uid, names) in enumerate(series):
            name = folder.name if len(series) == 1 else f"{folder.name}_{i}"
            cases.append(InputCase(name, folder, names))
    if not cases:
        raise VolumeError(f"{path}: holds neither NIfTI files nor a readable DICOM series")
    return cases


def choose_decoding(image: np.ndarray, encoding: str, window: tuple[float, float], where: str) -> tuple[str, tuple | None]:
    if encoding == "hu":
        return "hu", None
    if encoding == "uint8_window":
        return "uint8_window", window
    if encoding != "auto":
        raise ValueError(f"--encoding must be auto, hu or uint8_window, got {encoding!r}")
    lo, hi = float(image.min()), float(image.max())
    # CT in HU always holds air near -1000; a volume confined to 0..255 is an 8-bit windowed export.
    if image.dtype.kind in "ui" and lo >= 0 and hi <= 255:
        print(f"{where}: values span {lo:g}..{hi:g}: reading it as 8-bit windowed {window[0]:g}..{window[1]:g} HU "
              "(--encoding hu to override)", flush=True)
        return "uint8_window", window
    return "hu", None


def load_module(ckpt: Path, device: str):
    from experiments.checkpoints import load_module as load_checkpoint_module
    from lightning_modules.segmentation import SegmentationModule

    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: checkpoint not found")
    # weights_only: a crafted checkpoint is refused (CheckpointError, a ValueError naming it), never executed
    module = load_checkpoint_module(SegmentationModule, ckpt, map_location=device)
    if not module.hparams.get("harmonizer"):
        raise ValueError(f"{ckpt}: checkpoint does not record its harmonizer settings (trained before they "
                         "were saved); retrain or evaluate it through its run")
    return module.eval().to(device)


def infer_case(module, case: Case, harmonizer: HarmonizerConfig, device: str,
               probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(common-class label map uint8, per-class probabilities X, Y, Z, C or None) on the input's stored grid:
    the harmonizer, the module's sliding-window logits and the predict stage's `restore` (the one predictor
    a run's test and `experiments.test_run` use)."""
    from experiments.stages.predict import restore

    h = harmonize_case(case, None, harmonizer)
    image = torch.from_numpy(h.image)[None, None].to(device)
    with torch.no_grad():
        logits = module.predict_volume(image)
    labels, _affine, probs = restore(logits, h.meta, "original", probabilities)
    return labels, probs


def predict_case(module, case: Case, harmonizer: HarmonizerConfig, device: str) -> np.ndarray:
    """Common-class label map (uint8) on the input's stored grid."""
    return infer_case(module, case, harmonizer, device)[0]


def severity_report(labels: np.ndarray, hu: np.ndarray, spacing, lungs: bool) -> dict:
    lesion = np.isin(labels, OPACITY)
    report = {"lesion_ml": float(lesion.sum() * np.prod(spacing) / 1000.0), "lungs_predicted": lungs}
    if lungs:
        lung = np.isin(labels, LUNGS + OPACITY)  # lungs with the opacities inside them
        if lung.any():
            sev = severity_mod.severity(lesion, lung=lung, spacing=spacing, hu=hu)
            report.update({k: sev[k] for k in ("po", "pho", "wal_pct", "lung_ml", "high_opacity_ml") if k in sev})
        else:
            report["note"] = "no lung voxel predicted: PO/PHO undefined"
    else:
        report["note"] = ("the model was trained on no source that annotates lungs: PO/PHO need a lung mask "
                          "(score with experiments.evaluate --lobes or a lung class instead)")
    report["lss"] = report["lhos"] = None  # need lobe masks, which no model here predicts
    return report


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis closest to superior-inferior."""
    return int(np.argmax(np.abs(affine[2, :3]) / spacing_of(affine)))


# overlay colours and legend names of the common classes drawn (lesion covers GGO and consolidation too)
OVERLAY_CLASSES = (("right lung", (CLASS_INDEX["lung_right"],), "deepskyblue"),
                   ("left lung", (CLASS_INDEX["lung_left"],), "limegreen"),
                   ("lesion", OPACITY, "orangered"))


def _radiological(plane: np.ndarray) -> np.ndarray:
    # RAS arrays: x grows to the patient's left, y anterior; the radiological view puts the patient's
    # right on the image's left and anterior at the top.
    return plane.T[::-1, ::-1]


def overlay_figure(img: np.ndarray, pred: np.ndarray, ref: np.ndarray | None, aspect: float, title: str,
                   note: str | None = None):
    """One axial slice (radiological view, 2D arrays) as a figure: image, reference (when given) and
    prediction side by side, each class filled in its colour with its outline, and a legend naming them.
    `note` (e.g. the case's sanity problems) goes under the panels in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    panels = [("image", None)] + ([("reference", ref)] if ref is not None else []) + [("prediction", pred)]
    height = 4 * img.shape[0] * aspect / img.shape[1]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), height + 0.9), dpi=100, squeeze=False)
    for ax, (name, labels) in zip(axes[0], panels):
        ax.imshow(img, cmap="gray", vmin=DISPLAY_WINDOW[0], vmax=DISPLAY_WINDOW[1], interpolation="nearest",
                  aspect=aspect)
        if labels is not None:
            for _label, values, colour in OVERLAY_CLASSES:
                mask = np.isin(labels, values)
                if mask.any():
                    ax.imshow(np.ma.masked_where(~mask, mask), cmap=ListedColormap([colour]), alpha=0.35,
                              interpolation="nearest", aspect=aspect)
                    ax.contour(mask, levels=[0.5], colors=[colour], linewidths=0.8)
        ax.set_title(name, fontsize=9)
        ax.text(0.01, 0.99, "R", color="yellow", transform=ax.transAxes, va="top")
        ax.axis("off")
    fig.legend(handles=[Patch(facecolor=c, edgecolor=c, alpha=0.6, label=n) for n, _v, c in OVERLAY_CLASSES],
               loc="lower center", ncol=len(OVERLAY_CLASSES), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=8)
    if note:
        fig.text(0.5, 0.06, note, color="red", ha="center", fontsize=7, wrap=True)
    return fig


def overlay_slices(hu: np.ndarray, labels: np.ndarray, affine: np.ndarray, prefix: Path, n: int = 3,
                   reference: np.ndarray | None = None, note: str | None = None) -> list[Path]:
    """PNG overlays of the `n` axial slices with the most lesion (predicted, or in the reference when
    given), in the radiological convention: image, reference (if any) and prediction with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    def canonical(volume):
        return np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(volume, affine)).dataobj)

    ras_hu = nib.as_closest_canonical(nib.Nifti1Image(hu.astype(np.float32), affine)).get_fdata(dtype=np.float32)
    ras_lab = canonical(labels)
    ras_ref = canonical(reference) if reference is not None else None
    area = np.isin(ras_lab, OPACITY).sum(axis=(0, 1))
    if ras_ref is not None:
        area = area + np.isin(ras_ref, OPACITY).sum(axis=(0, 1))
    order = [int(z) for z in np.argsort(-area, kind="stable")[:n] if area[z] > 0] or [ras_lab.shape[2] // 2]
    sp = spacing_of(nib.as_closest_canonical(nib.Nifti1Image(labels, affine)).affine)
    out = []
    for k, z in enumerate(order):
        pred_area = np.isin(ras_lab[:, :, z], OPACITY).sum() * sp[0] * sp[1] / 100
        fig = overlay_figure(_radiological(ras_hu[:, :, z]), _radiological(ras_lab[:, :, z]),
                             None if ras_ref is None else _radiological(ras_ref[:, :, z]), sp[1] / sp[0],
                             f"{prefix.name}: axial slice {z} (RAS), predicted lesion {pred_area:.1f} cm²", note)
        path = prefix.with_name(f"{prefix.name}_overlay_{k + 1}.png")
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, bbox_inches="tight")
        plt.close(fig)
        tmp.replace(path)
        out.append(path)
    return out


def sanity_limits(module) -> SanityLimits:
    """The checkpoint's `evaluation.sanity`, or (a checkpoint trained before it existed) base.yaml's."""
    spec = (module.hparams.get("evaluation") or {}).get("sanity")
    if not spec:
        from omegaconf import OmegaConf

        from experiments.config import CONFIG_DIR

        spec = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "base.yaml").evaluation.sanity)
    return SanityLimits.from_config(spec)


def run_predict(ckpt: Path, input_path: Path, out: Path, source: str | None = None, encoding: str = "auto",
                window: tuple[float, float] = WINDOW_8BIT, image_flips: tuple[str, ...] | None = None,
                device: str = "cpu", overlays: int = 3, probabilities: bool = False) -> list[dict]:
    module = load_module(ckpt, device)
    harmonizer = HarmonizerConfig.from_dict(module.hparams["harmonizer"])
    trained = set(module.hparams.get("trained_classes") or ["lesion"])
    lungs = {"lung_left", "lung_right"} <= trained
    limits = sanity_limits(module)
    adapter = get_source(source) if source else None
    inputs = discover_inputs(input_path)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="covid-dg-predict-") as tmp:
        for item in tqdm(inputs, desc="predict", unit="case", disable=len(inputs) < 2 and not sys.stderr.isatty()):
            image_path = item.path
            if item.dicom_files is not None:  # the pipeline reads NIfTI: convert the series once
                data, affine = read_dicom_series(item.dicom_files, str(item.path))
                image_path = Path(tmp) / f"{item.case_id}.nii.gz"
                write_volume(image_path, data, affine)
            if adapter is not None:
                decoding = adapter.decoding(item.case_id)
            else:
                stored, _ = read_volume(image_path)
                enc, win = choose_decoding(stored, encoding, window, str(item.path))
                decoding = {"encoding": enc, "window": win, "image_flips": ()}
                del stored
            if image_flips is not None:
                decoding["image_flips"] = tuple(image_flips)
            case = Case(source=source or "input", case_id=item.case_id, patient_id=item.case_id, image=image_path,
                        **decoding)
            labels, probs = infer_case(module, case, harmonizer, device, probabilities)
            hu, _, affine = load_original(case, None)
            if probs is not None:
                write_volume(out / f"{item.case_id}_probabilities.nii.gz", probs, affine)
            write_volume(out / f"{item.case_id}_lesion.nii.gz", np.isin(labels, OPACITY).astype(np.uint8), affine)
            if lungs:
                write_volume(out / f"{item.case_id}_labels.nii.gz", labels, affine)
                sided = lesions_to_lung_sides(labels, spacing_of(affine))  # the lesions inside each lung
                write_volume(out / f"{item.case_id}_lung.nii.gz",
                             np.where(np.isin(sided, LUNGS), sided, 0).astype(np.uint8), affine)
            report = severity_report(labels, hu, spacing_of(affine), lungs)
            problems = check_prediction(labels, spacing_of(affine), limits, lungs, axial_axis=axial_axis(affine), hu=hu)
            report["sanity"] = sanity_text(problems)
            if problems:
                print(f"warning: implausible prediction {item.case_id}: {report['sanity']}", flush=True)
            report.update(case=item.case_id, input=str(item.path), decoding={k: (list(v) if isinstance(v, tuple) else v)
                                                                              for k, v in decoding.items()},
                          # no mask to measure the image flips against (datamodules.alignment)
                          alignment="unverifiable: image flips applied as declared, not measured",
                          checkpoint=str(ckpt), shape=list(labels.shape))
            write_json(out / f"{item.case_id}_severity.json", report)
            if overlays:
                overlay_slices(hu, labels, affine, out / item.case_id, n=overlays,
                               note=None if not problems else "implausible: " + report["sanity"])
            rows.append({k: v for k, v in report.items() if not isinstance(v, (dict, list))})
    write_csv(out / "predictions.csv", rows, first=("case", "lesion_ml"))
    return rows


def _pair(text: str, what: str) -> tuple[float, float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise ValueError(f"{what} needs LO,HI, got {text!r}")
    lo, hi = float(parts[0]), float(parts[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{what}: need finite LO < HI, got {text!r}")
    return lo, hi


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=command_name("python -m experiments.predict"), description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, type=Path)
    ap.add_argument("--input", required=True, type=Path, help="NIfTI file, folder of NIfTI files, or DICOM folder")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--source", default=None, help="apply this source's storage quirks by case name (e.g. ctseg)")
    ap.add_argument("--encoding", default="auto", choices=("auto", "hu", "uint8_window"))
    ap.add_argument("--window", default="-1250,250", help="HU window of 8-bit inputs (LO,HI)")
    ap.add_argument("--image-flips", default=None,
                    help="canonical axes along which the image is stored mirrored relative to where its masks "
                         "would be (R-L, A-P, S-I), e.g. A-P; applied unconfirmed")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--overlays", type=int, default=3, help="overlay PNGs per case (0: none)")
    ap.add_argument("--probabilities", action="store_true",
                    help="also write <case>_probabilities.nii.gz (float32, X, Y, Z, class in the common label space)")
    args = ap.parse_args(argv)
    try:
        flips = parse_flips(args.image_flips, "--image-flips") if args.image_flips is not None else None
        rows = run_predict(args.ckpt, args.input, args.out, args.source, args.encoding,
                           _pair(args.window, "--window"), flips, args.device, args.overlays, args.probabilities)
    except (VolumeError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in rows:
        extra = f" PO {r['po']:.1f} %" if r.get("po") is not None else ""
        print(f"{r['case']}: lesion {r['lesion_ml']:.1f} mL{extra}")
    print(f"{len(rows)} case(s) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m experiments.predict"))
