"""Write the phantom suite: synthetic CT sources in the exact official layouts of the public downloads.

One analytic patient (`anatomy.py`) is sampled per case and "scanned" with the source's profile
(`profiles.yaml`): matrix, spacing, orientation on disk, dtype and intensity encoding, noise,
reconstruction blur, HU calibration offset, lesion statistics and annotation style. The source
adapters read these trees exactly as they read the real downloads.

Per source the tree is written under a temporary name and renamed into place; `<source>.json` beside
it (written last) marks it complete and lists every case with its truth volumes. Truth maps the
official layout lacks (lobes, GGO vs consolidation) go to `_truth/<source>/`, outside the layout.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from omegaconf import OmegaConf

from datamodules.io import write_volume
from datamodules.phantom.anatomy import LesionConfig, acquire, render, sample_patient

log = logging.getLogger(__name__)
PROFILES_FILE = Path(__file__).with_name("profiles.yaml")
PHANTOM_SOURCES = ("covid19_20", "mosmed", "ctseg")
DEFAULT_CENTER_Z = (-400.0, 400.0)


def load_profiles() -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(PROFILES_FILE), resolve=True)


@dataclass
class Scan:
    """One case to write: who (patient seed), how (geometry, encoding) and where (file names)."""

    case_id: str
    shape: tuple[int, int, int]        # canonical (RAS) voxel order
    spacing: tuple[float, float, float]
    center: tuple[float, float, float]
    axcodes: str
    encoding: str = "hu"               # or uint8_window
    flip_axes: tuple[int, ...] = ()    # mirrored in canonical voxel order before storing
    labelled: bool = True
    healthy: bool = False


def _rng(seed: int, source: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(source.encode()), index])


def scan_geometry(rng, geo: dict, size: dict, short_axis: int | None = None) -> tuple[tuple, tuple]:
    """Matrix and spacing for one case: the full-size draw, shrunk to the size knob, same extent (mm)."""
    mx, my = geo["matrix"]
    if short_axis:
        my = short_axis
    sxy = rng.uniform(*geo["spacing_xy"])
    n_full = int(rng.integers(geo["slices"][0], geo["slices"][1] + 1))
    sz_full = rng.uniform(*geo["spacing_z"])
    factor = 512.0 / size["inplane"]  # same shrink for every source, so 630-pixel cases stay larger
    nx, ny = max(8, round(mx / factor)), max(8, round(my / factor))
    zf = 1.0 if geo.get("fixed_spacing_z") else max(1.0, n_full / size["max_slices"])
    nz = max(4, round(n_full / zf))
    shape = (nx, ny, nz)
    spacing = (sxy * mx / nx, sxy * my / ny, sz_full * n_full / nz)
    return shape, spacing


def ras_affine(shape, spacing, center) -> np.ndarray:
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = np.asarray(center) - (np.asarray(shape) - 1) / 2.0 * np.asarray(spacing)
    return aff


def to_stored(array: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """Canonical RAS array/affine -> the source's on-disk orientation, world positions unchanged."""
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                nib.orientations.axcodes2ornt(tuple(axcodes)))
    out = nib.orientations.apply_orientation(array, transform)
    return np.ascontiguousarray(out), affine @ nib.orientations.inv_ornt_aff(transform, array.shape)


def encode(hu: np.ndarray, encoding: str, dtype: str, window=None) -> np.ndarray:
    if encoding == "uint8_window":
        lo, hi = window
        return np.clip(np.rint((hu - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
    return np.clip(np.rint(hu), -1024, 3071).astype(dtype)


def render_scan(scan: Scan, profile: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Sample a patient, scan it with the profile; return canonical-order arrays and the RAS affine."""
    les = dict(profile["lesions"])
    if scan.healthy:
        les.update(n_min=0, n_max=0)
    les["radius_mm"] = tuple(les["radius_mm"])
    patient = sample_patient(rng, LesionConfig(**les))
    affine = ras_affine(scan.shape, scan.spacing, scan.center)
    supersample = int(min(5, max(1, round(scan.spacing[2] / 1.5))))  # partial volume of thick slices
    r = render(patient, scan.shape, affine, center=scan.center, supersample_z=supersample)
    hu = acquire(r.hu, scan.spacing, rng, profile["noise_hu"], profile["blur_mm"],
                 hu_offset=rng.uniform(*profile["hu_offset"]))
    annotated = ((r.lesion_field > profile["annotation_threshold"]) & (r.lung > 0)).astype(np.uint8)
    return {"hu": hu, "lung": r.lung, "lobes": r.lobes, "lesion_truth": r.lesion, "lesion_mask": annotated,
            "affine": affine}


def write_case(scan: Scan, arrays: dict, profile: dict, files: dict[str, Path], truth_dir: Path) -> dict:
    """Write image + masks for one case in the stored orientation, truth maps in RAS. Returns manifest row."""
    affine = arrays["affine"]

    def stored(arr):
        for ax in scan.flip_axes:
            arr = np.flip(arr, axis=ax)
        return to_stored(np.ascontiguousarray(arr), affine, scan.axcodes)

    img, aff_stored = stored(encode(arrays["hu"], scan.encoding, profile["image_dtype"], profile.get("window_8bit")))
    write_volume(files["image"], img, aff_stored)
    for kind, path in files.items():
        if kind == "image":
            continue
        lesion, lung = arrays["lesion_mask"], arrays["lung"]
        mask = {"lesion": lesion,
                "lung": lung,
                "lung_and_infection": np.where(lesion > 0, 3, lung)}[kind].astype(profile["mask_dtype"])
        write_volume(path, stored(mask)[0], aff_stored)
    write_volume(truth_dir / f"{scan.case_id}_lobes.nii.gz", arrays["lobes"].astype(np.uint8), affine)
    write_volume(truth_dir / f"{scan.case_id}_lesion.nii.gz", arrays["lesion_truth"].astype(np.uint8), affine)
    voxel_ml = float(np.prod(scan.spacing)) / 1000.0
    return {"case": scan.case_id, "labelled": scan.labelled, "shape_ras": list(scan.shape),
            "spacing_ras": [round(s, 4) for s in scan.spacing], "axcodes": scan.axcodes, "encoding": scan.encoding,
            "flip_axes": list(scan.flip_axes),
            "lesion_ml_truth": float((arrays["lesion_truth"] > 0).sum()) * voxel_ml,
            "lesion_ml_annotated": float((arrays["lesion_mask"] > 0).sum()) * voxel_ml,
            "lung_ml": float((arrays["lung"] > 0).sum()) * voxel_ml}


def _center(rng, profile) -> tuple[float, float, float]:
    return (float(rng.uniform(-15, 15)), float(rng.uniform(-20, 20)), float(rng.uniform(*profile.get("center_z", DEFAULT_CENTER_Z))))


# ----------------------------------------------------------------------------------- per-source plans
def plan_covid19_20(profile, size_name, size, seed, out: Path):
    n = profile["cases"][size_name]
    # Sparse four-digit ids with the suffixes the real release has (`_1`: another scan of a patient).
    ids = [f"volume-covid19-A-{3 + 7 * i:04d}" for i in range(n["train"])]
    if len(ids) >= 4:
        ids[3] = ids[2] + "_1"
    plans = []
    for i, cid in enumerate(ids + [f"volume-covid19-A-{600 + 5 * j:04d}" for j in range(n["validation"])]):
        rng = _rng(seed, "covid19_20", i)
        shape, spacing = scan_geometry(rng, profile, size)
        labelled = i < len(ids)
        sub = out / "COVID-19-20_v2" / ("Train" if labelled else "Validation")
        files = {"image": sub / f"{cid}_ct.nii.gz"}
        if labelled:
            files["lesion"] = sub / f"{cid}_seg.nii.gz"
        plans.append((Scan(cid, shape, spacing, _center(rng, profile), profile["axcodes"], labelled=labelled), files, rng))
    return plans


def plan_mosmed(profile, size_name, size, seed, out: Path):
    n = profile["cases"][size_name]
    root = out / "COVID19_1110"
    plans, registry = [], []
    specs = [(f"study_{i + 1:04d}", profile["unlabelled_category"], False) for i in range(n["unlabelled"])]
    specs += [(f"study_{255 + i:04d}", profile["labelled_category"], True) for i in range(n["labelled"])]
    for i, (cid, cat, labelled) in enumerate(specs):
        rng = _rng(seed, "mosmed", i)
        shape, spacing = scan_geometry(rng, profile, size)
        files = {"image": root / "studies" / cat / f"{cid}.nii.gz"}
        if labelled:
            files["lesion"] = root / "masks" / f"{cid}_mask.nii.gz"
        registry.append((int(cid[-4:]), cat, f"/studies/{cat}/{cid}.nii.gz",
                         f"/masks/{cid}_mask.nii.gz" if labelled else ""))
        plans.append((Scan(cid, shape, spacing, _center(rng, profile), profile["axcodes"], labelled=labelled,
                           healthy=not labelled), files, rng))
    # The registry as the public mirror ships it: UTF-8 with BOM, CRLF, leading slashes.
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(["study_id", "category", "study_file", "mask_file"])
    w.writerows(sorted(registry))
    (root).mkdir(parents=True, exist_ok=True)
    (root / "dataset_registry.csv").write_bytes(b"\xef\xbb\xbf" + buf.getvalue().encode())
    return plans


def plan_ctseg(profile, size_name, size, seed, out: Path):
    plans = []
    for i, cid in enumerate(profile["case_ids"][: profile["cases"][size_name]]):
        rng = _rng(seed, "ctseg", i)
        radiopaedia = cid.startswith("radiopaedia_")
        geo = profile["radiopaedia" if radiopaedia else "coronacases"]
        shape, spacing = scan_geometry(rng, geo, size, profile["short_axis_cases"].get(cid))
        flips = ((0, 2) if cid in profile["z_mirrored_cases"] else (0,)) if radiopaedia else ()
        files = {"image": out / "COVID-19-CT-Seg_20cases" / f"{cid}.nii.gz",
                 "lung": out / "Lung_Mask" / f"{cid}.nii.gz",
                 "lesion": out / "Infection_Mask" / f"{cid}.nii.gz",
                 "lung_and_infection": out / "Lung_and_Infection_Mask" / f"{cid}.nii.gz"}
        plans.append((Scan(cid, shape, spacing, _center(rng, profile), profile["axcodes"],
                           encoding="uint8_window" if radiopaedia else "hu", flip_axes=flips), files, rng))
    return plans


PLANS = {"covid19_20": plan_covid19_20, "mosmed": plan_mosmed, "ctseg": plan_ctseg}


def write_source(root: Path, source: str, size_name: str, seed: int) -> dict:
    """Write one phantom source under root/<source> atomically; return its manifest."""
    profiles = load_profiles()
    profile, size = profiles["profiles"][source], profiles["sizes"][size_name]
    final = root / source
    tmp = root / f".tmp-{source}-{uuid.uuid4().hex[:8]}"
    truth = root / "_truth" / source
    try:
        rows = []
        for scan, files, rng in PLANS[source](profile, size_name, size, seed, tmp):
            rows.append(write_case(scan, render_scan(scan, profile, rng), profile, files, truth))
            log.info("phantom %s: wrote %s", source, scan.case_id)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    manifest = {"phantom": True, "source": source, "size": size_name, "seed": seed, "cases": rows}
    mpath = root / f"{source}.json"
    mtmp = mpath.with_name(f".{mpath.name}.tmp")
    mtmp.write_text(json.dumps(manifest, indent=1))
    os.replace(mtmp, mpath)
    return manifest


def ensure_suite(cache_root: str | Path, sources=PHANTOM_SOURCES, size: str = "tiny", seed: int = 0) -> Path:
    """Generate missing phantom sources under `cache_root/phantom/<size>-seed<seed>`; return that folder.

    A source whose manifest exists is complete and reused; a half-written one (no manifest) is redone.
    """
    profiles = load_profiles()
    if size not in profiles["sizes"]:
        raise ValueError(f"phantom size {size!r} unknown; choose from {sorted(profiles['sizes'])}")
    root = Path(cache_root) / "phantom" / f"{size}-seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    for source in sources:
        if source not in PLANS:
            raise ValueError(f"no phantom profile for source {source!r}; phantom sources: {sorted(PLANS)}")
        if not (root / f"{source}.json").exists():
            print(f"[phantom] generating synthetic source {source!r} ({size}) in {root / source}", flush=True)
            write_source(root, source, size, seed)
    return root

