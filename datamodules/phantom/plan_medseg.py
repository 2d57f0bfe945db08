"""Phantom MedSeg COVID-19 (profile `medseg` in profiles_medseg.yaml; reference/datasets.md s.4).

Writes the layout of the two figshare downloads, unzipped side by side in the source folder:

- `rp_im/<n>.nii.gz`, `rp_msk/<n>.nii.gz` (0 / 1 GGO / 2 consolidation / 3 pleural effusion) and
  `rp_lung_msk/<n>.nii.gz` (binary lung, any side): one phantom patient per volume, HU int16, 630 matrix
  shrunk by the size knob. Codes 1/2 come from the renderer's truth (`Rendered.lesion`: 1 ground glass,
  2 consolidation) inside the annotated lesion; one volume (profile `effusion.case`) gets a crescent of
  dependent pleural fluid (code 3, ~+10 HU) at the posterior base of the right lung, cut out of the lung map.
- `tr_im.nii.gz` / `tr_mask.nii.gz` and `val_im.nii.gz` (no mask): stacks of unrelated 2D slices, one per
  phantom patient (the slice with the most lesion of a coarse scan), float32 grey levels 0..255 of the HU
  window `stack.jpg_window` (the JPG export); the listed `effusion.stack_slices` get effusion too.

Every slice of a stack is one `Scan` of the plan (so one manifest row per slice, `tr_000 ..`); the writer
keeps them in memory and writes the stack files when the last slice of a stack arrives. Truth maps in
RAS under `_truth/medseg/`: `<case>_lesion` (1 GGO, 2 consolidation), `<case>_lung` (1 left, 2 right, the
effusion removed), `<case>_lobes`, and `<case>_effusion` for the rp volume that has one.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from datamodules.io import write_volume
from datamodules.phantom.suite import Scan, _center, _rng, encode, register_plan, scan_geometry, to_stored

SOURCE = "medseg"
STACK_ENCODING = "jpg-derived"
# Stack slices waiting for their stack-mates, by stack image path (unique per write: under a temp folder).
_PENDING: dict[Path, dict] = {}


def effusion_region(lung: np.ndarray, side: int, posterior_fraction: float, slices) -> np.ndarray:
    """Bool map: in each listed axial slice (RAS axis 2), the posterior `posterior_fraction` of lung
    `side`'s A-P extent (RAS axis 1 grows anteriorly) within that lung: dependent pleural fluid."""
    eff = np.zeros(lung.shape, bool)
    for k in slices:
        inside = lung[:, :, k] == side
        ys = np.flatnonzero(inside.any(axis=0))
        if len(ys) == 0:
            continue
        cut = ys[0] + max(1, round(posterior_fraction * (ys[-1] - ys[0] + 1)))
        eff[:, :cut, k] = inside[:, :cut]
    return eff


def medseg_codes(arrays: dict) -> np.ndarray:
    """MedSeg mask codes on the scan grid: 1 GGO, 2 consolidation inside the annotated lesion."""
    annotated = arrays["lesion_mask"] > 0
    return np.where(annotated, np.where(arrays["lesion_truth"] == 2, 2, 1), 0).astype(np.uint8)


def _plant_effusion(scan: Scan, arrays: dict, codes: np.ndarray, lung: np.ndarray, hu: np.ndarray, cfg: dict,
                    slices) -> np.ndarray:
    eff = effusion_region(lung, 2, cfg["posterior_fraction"], slices)
    noise = np.random.default_rng(zlib.crc32(f"{SOURCE}/{scan.case_id}/effusion".encode()))
    hu[eff] = scan.extra["effusion_hu"] + noise.standard_normal(int(eff.sum())).astype(np.float32) * 8.0
    codes[eff] = 3
    lung[eff] = 0
    return eff


def write_medseg(scan: Scan, arrays: dict, profile: dict, files: dict[str, Path], truth_dir: Path) -> dict:
    if "stack" in scan.extra:
        return _write_stack_slice(scan, arrays, profile, files)
    affine = arrays["affine"]
    hu, lung, codes = arrays["hu"].copy(), arrays["lung"].copy(), medseg_codes(arrays)
    eff = np.zeros(lung.shape, bool)
    if scan.extra.get("effusion"):
        cfg = profile["effusion"]
        zs = np.flatnonzero((lung == 2).any(axis=(0, 1)))
        eff = _plant_effusion(scan, arrays, codes, lung, hu, cfg, zs[: max(1, int(np.ceil(cfg["basal_fraction"] * len(zs))))])

    def stored(arr):
        return to_stored(np.ascontiguousarray(arr), affine, scan.axcodes)

    img, aff_stored = stored(encode(hu, scan.encoding, profile["image_dtype"]))
    write_volume(files["image"], img, aff_stored)
    write_volume(files["lesion"], stored(codes.astype(profile["mask_dtype"]))[0], aff_stored)
    write_volume(files["lung"], stored((lung > 0).astype(profile["mask_dtype"]))[0], aff_stored)
    for kind, arr in (("lobes", arrays["lobes"]), ("lesion", arrays["lesion_truth"]), ("lung", lung)):
        write_volume(truth_dir / f"{scan.case_id}_{kind}.nii.gz", arr.astype(np.uint8), affine)
    if eff.any():
        write_volume(truth_dir / f"{scan.case_id}_effusion.nii.gz", eff.astype(np.uint8), affine)
    voxel_ml = float(np.prod(scan.spacing)) / 1000.0
    return {**scan.extra, "case": scan.case_id, "labelled": True, "shape_ras": list(scan.shape),
            "spacing_ras": [round(s, 4) for s in scan.spacing], "axcodes": scan.axcodes, "encoding": scan.encoding,
            "image_flips": [], "ggo_voxels": int((codes == 1).sum()), "consolidation_voxels": int((codes == 2).sum()),
            "effusion_voxels": int(eff.sum()),
            "lesion_ml_truth": float((arrays["lesion_truth"] > 0).sum()) * voxel_ml,
            "lesion_ml_annotated": float(np.isin(codes, (1, 2)).sum()) * voxel_ml,
            "lung_ml": float((lung > 0).sum()) * voxel_ml}


def _write_stack_slice(scan: Scan, arrays: dict, profile: dict, files: dict[str, Path]) -> dict:
    """Keep the most lesioned slice of this patient; write the stack once all its slices are in."""
    codes = medseg_codes(arrays)
    lung_any = (arrays["lung"] > 0).sum(axis=(0, 1))
    score = (codes > 0).sum(axis=(0, 1)) + 1000 * ((codes == 2).any(axis=(0, 1)) & (codes == 1).any(axis=(0, 1)))
    k = int(np.argmax(score + 1e-3 * lung_any))
    hu = arrays["hu"][:, :, k : k + 1].copy()
    code = codes[:, :, k : k + 1].copy()
    lung = arrays["lung"][:, :, k : k + 1].copy()
    eff = np.zeros(lung.shape, bool)
    if scan.extra.get("effusion"):
        eff = _plant_effusion(scan, arrays, code, lung, hu, profile["effusion"], [0])
    lo, hi = profile["stack"]["jpg_window"]
    grey = np.clip(np.rint((hu[:, :, 0] - lo) / (hi - lo) * 255.0), 0, 255).astype(np.float32)
    n, j = scan.extra["n"], scan.extra["slice"]
    buf = _PENDING.setdefault(files["image"], {
        "image": np.zeros((*grey.shape, n), np.float32), "mask": np.zeros((*grey.shape, n), np.uint8),
        "done": set(), "spacing": scan.spacing})
    buf["image"][:, :, j] = grey
    buf["mask"][:, :, j] = code[:, :, 0]
    buf["done"].add(j)
    if len(buf["done"]) == n:
        del _PENDING[files["image"]]
        sx, sy, _ = buf["spacing"]
        affine = np.diag([sx, sy, float(profile["stack"]["spacing_z"]), 1.0])
        write_volume(files["image"], buf["image"], affine)
        if "lesion" in files:
            write_volume(files["lesion"], buf["mask"].astype(profile["mask_dtype"]), affine)
    return {**scan.extra, "case": scan.case_id, "labelled": scan.labelled, "two_d": True,
            "shape_ras": list(grey.shape), "encoding": STACK_ENCODING, "image_flips": [], "source_z_index": k,
            "codes": sorted(int(c) for c in np.unique(code)), "effusion_voxels": int(eff.sum()),
            "lung_voxels": int((lung > 0).sum())}


@register_plan(SOURCE, writer=write_medseg)
def plan_medseg(profile, size_name, size, seed, out: Path):
    n = profile["cases"][size_name]
    eff_cfg = profile["effusion"]
    plans = []
    for i in range(n["rp"]):
        rng = _rng(seed, SOURCE, i)
        shape, spacing = scan_geometry(rng, profile, size)
        eff_hu = float(np.random.default_rng([seed, i, 7]).uniform(*eff_cfg["hu"]))
        files = {"image": out / "rp_im" / f"{i + 1}.nii.gz", "lesion": out / "rp_msk" / f"{i + 1}.nii.gz",
                 "lung": out / "rp_lung_msk" / f"{i + 1}.nii.gz"}
        cid = f"rp_{i + 1}"
        plans.append((Scan(cid, shape, spacing, _center(rng, profile), profile["axcodes"],
                           extra={"patient": cid, "effusion": i == eff_cfg["case"], "effusion_hu": eff_hu}),
                      files, rng))
    st = profile["stack"]
    factor = 512.0 / size["inplane"]
    nx, ny = (max(8, round(m / factor)) for m in st["matrix"])
    spacing = (st["spacing_xy"] * st["matrix"][0] / nx, st["spacing_xy"] * st["matrix"][1] / ny, st["scan_spacing_z"])
    for prefix, offset, labelled in (("tr", 1000, True), ("val", 2000, False)):
        count = n[prefix]
        for j in range(count):
            rng = _rng(seed, SOURCE, offset + j)
            files = {"image": out / f"{prefix}_im.nii.gz"}
            if labelled:
                files["lesion"] = out / "tr_mask.nii.gz"
            effusion = labelled and j in eff_cfg["stack_slices"]
            eff_hu = float(np.random.default_rng([seed, offset + j, 7]).uniform(*eff_cfg["hu"]))
            plans.append((Scan(f"{prefix}_{j:03d}", (nx, ny, int(st["scan_slices"])), spacing, _center(rng, profile),
                               "RAS", labelled=labelled,
                               extra={"stack": prefix, "slice": j, "n": count, "effusion": effusion,
                                      "effusion_hu": eff_hu}), files, rng))
    return plans
