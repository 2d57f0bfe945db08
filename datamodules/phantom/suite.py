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
import importlib
import io
import json
import logging
import os
import pkgutil
import shutil
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from omegaconf import OmegaConf

from datamodules.io import write_volume
from datamodules.phantom.anatomy import LesionConfig, Patient, _Grid, _heart, _segment, acquire, render, sample_patient

log = logging.getLogger(__name__)
PROFILES_FILE = Path(__file__).with_name("profiles.yaml")
DEFAULT_CENTER_Z = (-400.0, 400.0)


def load_profiles() -> dict[str, Any]:
    """profiles.yaml, plus any `profiles_<name>.yaml` beside it (sources written by their own plan module)."""
    cfg = OmegaConf.load(PROFILES_FILE)
    for extra in sorted(PROFILES_FILE.parent.glob("profiles_*.yaml")):
        cfg = OmegaConf.merge(cfg, OmegaConf.load(extra))
    return OmegaConf.to_container(cfg, resolve=True)


@dataclass
class Scan:
    """One case to write: who (patient seed), how (geometry, encoding) and where (file names)."""

    case_id: str
    shape: tuple[int, int, int]        # canonical (RAS) voxel order
    spacing: tuple[float, float, float]
    center: tuple[float, float, float]
    axcodes: str
    encoding: str = "hu"               # or uint8_window
    image_flips: tuple[int, ...] = ()  # canonical axes along which the IMAGE (not its masks) is stored mirrored
    labelled: bool = True
    healthy: bool = False
    tumour: bool = False               # plant one solid non-COVID tumour (MSD, StructSeg GTV)
    oar: bool = False                  # render the StructSeg organ-at-risk label map
    swap_lungs: bool = False           # ... with lung codes 1/2 exchanged (the disputed label order)
    extra: dict = field(default_factory=dict)  # extra manifest fields (patient, swapped_lungs, ...)


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
    extra = {}
    if scan.tumour:   # before the scanner model: the tumour is blurred and noisy like the rest
        extra["tumour"] = plant_tumour(r.hu, r.lung, scan.spacing, rng, profile["tumour"])
    if scan.oar:
        extra["oar"] = oar_labels(patient, r.lung, scan, affine)
    hu = acquire(r.hu, scan.spacing, rng, profile["noise_hu"], profile["blur_mm"],
                 hu_offset=rng.uniform(*profile["hu_offset"]))
    annotated = ((r.lesion_field > profile["annotation_threshold"]) & (r.lung > 0)).astype(np.uint8)
    return {"hu": hu, "lung": r.lung, "lobes": r.lobes, "lesion_truth": r.lesion, "lesion_mask": annotated,
            "affine": affine, **extra}


def plant_tumour(hu: np.ndarray, lung: np.ndarray, spacing, rng: np.random.Generator, cfg: dict) -> np.ndarray:
    """One solid tumour (axis-aligned ellipsoid of `cfg.radius_mm`, uniform `cfg.hu`) inside one lung.

    Paints `hu` in place and returns the uint8 0/1 tumour map. The centre is drawn among the deepest voxels
    of a random lung, the ellipsoid is clipped to that lung, and the centre voxel is always included so the
    tiny size knob still holds at least one tumour voxel. The lung map is left as it is.
    """
    from scipy import ndimage

    side = int(rng.integers(1, 3))
    inside = lung == side
    if not inside.any():
        side, inside = 3 - side, lung > 0
    radius = float(rng.uniform(*cfg["radius_mm"]))
    axes = radius * rng.uniform(0.85, 1.15, 3)
    depth = ndimage.distance_transform_edt(inside, sampling=spacing)
    cand = np.flatnonzero(depth >= min(radius, 0.7 * depth.max()))
    centre = np.unravel_index(int(cand[rng.integers(len(cand))]), lung.shape)
    d2 = sum(((np.arange(n) - c) * s / a).reshape([-1 if k == ax else 1 for k in range(3)]) ** 2
             for ax, (n, c, s, a) in enumerate(zip(lung.shape, centre, spacing, axes, strict=True)))
    tumour = (d2 <= 1.0) & inside
    tumour[centre] = True
    hu[tumour] = float(rng.uniform(*cfg["hu"]))
    return tumour.astype(np.uint8)


# StructSeg Thoracic_OAR codes in the MultiTalent order (reference/datasets.md s.6): 1 left lung, 2 right
# lung, 3 heart, 4 esophagus, 5 trachea, 6 spinal cord. The phantom anatomy has no oesophagus, so code 4
# is never written; "trachea" is the airway tree the anatomy has (trachea + main bronchi, lumen and wall);
# "spinal cord" is the spinal canal.
OAR_CODES = {"lung_left": 1, "lung_right": 2, "heart": 3, "esophagus": 4, "trachea": 5, "spinal_cord": 6}


def oar_labels(p: Patient, lung: np.ndarray, scan: Scan, affine: np.ndarray) -> np.ndarray:
    """StructSeg-style OAR label map on the scan grid (canonical order); lungs from the rendered lung map."""
    g = _Grid(scan.shape, affine, scan.center)
    out = np.zeros(scan.shape, np.uint8)
    out[_heart(p, g.x, g.y, g.z)] = OAR_CODES["heart"]
    for seg in p.airways:
        d2, _ = _segment(g.x, g.y, g.z, seg)
        out[d2 <= (seg[6] + p.airway_wall_mm) ** 2] = OAR_CODES["trachea"]
    sy, sr, cr = p.spine[:3]
    canal_y = sy - sr - cr - 2.0
    out[np.broadcast_to(g.x * g.x + (g.y - canal_y) * (g.y - canal_y) <= cr * cr, scan.shape)] = OAR_CODES["spinal_cord"]
    left, right = (OAR_CODES["lung_right"], OAR_CODES["lung_left"]) if scan.swap_lungs else \
        (OAR_CODES["lung_left"], OAR_CODES["lung_right"])
    out[lung == 1] = left
    out[lung == 2] = right
    return out


def write_case(scan: Scan, arrays: dict, profile: dict, files: dict[str, Path], truth_dir: Path) -> dict:
    """Write image + masks for one case in the stored orientation, truth maps in RAS. Returns manifest row."""
    affine = arrays["affine"]

    def stored(arr, flips=()):
        for ax in flips:
            arr = np.flip(arr, axis=ax)
        return to_stored(np.ascontiguousarray(arr), affine, scan.axcodes)

    img, aff_stored = stored(encode(arrays["hu"], scan.encoding, profile["image_dtype"], profile.get("window_8bit")),
                             scan.image_flips)
    write_volume(files["image"], img, aff_stored)
    for kind, path in files.items():
        if kind == "image":
            continue
        if kind in ("tumour", "oar"):
            mask = arrays[kind].astype(profile["mask_dtype"])
        else:
            lesion, lung = arrays["lesion_mask"], arrays["lung"]
            mask = {"lesion": lesion,
                    "lung": lung,
                    "lung_and_infection": np.where(lesion > 0, 3, lung)}[kind].astype(profile["mask_dtype"])
        write_volume(path, stored(mask)[0], aff_stored)
    write_volume(truth_dir / f"{scan.case_id}_lobes.nii.gz", arrays["lobes"].astype(np.uint8), affine)
    write_volume(truth_dir / f"{scan.case_id}_lesion.nii.gz", arrays["lesion_truth"].astype(np.uint8), affine)
    if "tumour" in arrays:
        write_volume(truth_dir / f"{scan.case_id}_tumour.nii.gz", arrays["tumour"], affine)
    if "oar" in arrays:   # the true lung map (1 left, 2 right), whatever codes the OAR label file uses
        write_volume(truth_dir / f"{scan.case_id}_lung.nii.gz", arrays["lung"].astype(np.uint8), affine)
    voxel_ml = float(np.prod(scan.spacing)) / 1000.0
    extra = dict(scan.extra)
    if "tumour" in arrays:
        extra["tumour_ml"] = float(arrays["tumour"].sum()) * voxel_ml
    return {**extra, "case": scan.case_id, "labelled": scan.labelled, "shape_ras": list(scan.shape),
            "spacing_ras": [round(s, 4) for s in scan.spacing], "axcodes": scan.axcodes, "encoding": scan.encoding,
            "image_flips": [("R-L", "A-P", "S-I")[a] for a in scan.image_flips],
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
        flips = ((1, 2) if cid in profile["z_mirrored_cases"] else (1,)) if radiopaedia else ()
        files = {"image": out / "COVID-19-CT-Seg_20cases" / f"{cid}.nii.gz",
                 "lung": out / "Lung_Mask" / f"{cid}.nii.gz",
                 "lesion": out / "Infection_Mask" / f"{cid}.nii.gz",
                 "lung_and_infection": out / "Lung_and_Infection_Mask" / f"{cid}.nii.gz"}
        plans.append((Scan(cid, shape, spacing, _center(rng, profile), profile["axcodes"],
                           encoding="uint8_window" if radiopaedia else "hu", image_flips=flips), files, rng))
    return plans


# macOS AppleDouble header: what the `._lung_XXX.nii.gz` files of the real Task06_Lung.tar start with.
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(40)


def plan_msd_lung(profile, size_name, size, seed, out: Path):
    n = profile["cases"][size_name]
    task = out / "Task06_Lung"
    train, test = profile["train_ids"][: n["train"]], profile["test_ids"][: n["test"]]
    plans = []
    for i, (cid, labelled) in enumerate([(c, True) for c in train] + [(c, False) for c in test]):
        rng = _rng(seed, "msd_lung", i)
        shape, spacing = scan_geometry(rng, profile, size)
        files = {"image": task / ("imagesTr" if labelled else "imagesTs") / f"{cid}.nii.gz"}
        if labelled:
            files["tumour"] = task / "labelsTr" / f"{cid}.nii.gz"
        # Every case has its tumour (the test set too); only Tr cases ship the label.
        plans.append((Scan(cid, shape, spacing, _center(rng, profile), profile["axcodes"], labelled=labelled,
                           healthy=True, tumour=True, extra={"patient": cid}), files, rng))
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub).mkdir(parents=True, exist_ok=True)
    for cid in train[:2]:   # the resource forks the real tar carries: adapters must skip them
        (task / "imagesTr" / f"._{cid}.nii.gz").write_bytes(APPLEDOUBLE)
        (task / "labelsTr" / f"._{cid}.nii.gz").write_bytes(APPLEDOUBLE)
    if test:
        (task / "imagesTs" / f"._{test[0]}.nii.gz").write_bytes(APPLEDOUBLE)
    (task / "dataset.json").write_text(json.dumps({
        "name": "Lung", "description": "Lung and cancer segmentation", "tensorImageSize": "3D",
        "reference": "The Cancer Imaging Archive", "licence": "CC-BY-SA 4.0", "release": "1.0 04/05/2018",
        "modality": {"0": "CT"}, "labels": {"0": "background", "1": "cancer"},
        "numTraining": len(train), "numTest": len(test),
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in train],
        "test": [f"./imagesTs/{c}.nii.gz" for c in test]}, indent=4))
    return plans


def plan_structseg(profile, size_name, size, seed, out: Path):
    n = profile["cases"][size_name]
    swapped = set(profile["swapped_oar_cases"])
    plans = []
    specs = [("Thoracic_OAR", "oar", k) for k in range(1, n["oar"] + 1)]
    specs += [("Lung_GTV", "gtv", k) for k in range(1, n["gtv"] + 1)]
    for i, (task, prefix, k) in enumerate(specs):
        rng = _rng(seed, "structseg", i)
        shape, spacing = scan_geometry(rng, profile, size)
        folder = out / task / str(k)
        oar = prefix == "oar"
        files = {"image": folder / "data.nii.gz", ("oar" if oar else "tumour"): folder / "label.nii.gz"}
        cid = f"{prefix}_{k}"
        extra = {"patient": cid, "task": task}
        if oar:
            extra["swapped_lungs"] = k in swapped
        plans.append((Scan(cid, shape, spacing, _center(rng, profile), profile["axcodes"], healthy=True,
                           tumour=not oar, oar=oar, swap_lungs=oar and k in swapped, extra=extra), files, rng))
    return plans


# source -> plan function; plan modules of further sources add themselves with `register_plan`.
PLANS = {"covid19_20": plan_covid19_20, "mosmed": plan_mosmed, "ctseg": plan_ctseg, "msd_lung": plan_msd_lung,
         "structseg": plan_structseg}
# source -> case writer, for sources not stored as NIfTI (default: `write_case`).
WRITERS: dict[str, Any] = {}


def register_plan(source: str, writer=None):
    """Decorator: `plan(profile, size_name, size, seed, out) -> [(Scan, files, rng)]` for `source`;
    `writer(scan, arrays, profile, files, truth_dir) -> manifest row` replaces `write_case` (e.g. DICOM)."""
    def wrap(fn):
        PLANS[source] = fn
        if writer is not None:
            WRITERS[source] = writer
        return fn

    return wrap


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
            rows.append(WRITERS.get(source, write_case)(scan, render_scan(scan, profile, rng), profile, files, truth))
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


def ensure_suite(cache_root: str | Path, sources=None, size: str = "tiny", seed: int = 0) -> Path:
    """Generate missing phantom sources under `cache_root/phantom/<size>-seed<seed>`; return that folder.

    A source whose manifest exists is complete and reused; a half-written one (no manifest) is redone.
    """
    profiles = load_profiles()
    if size not in profiles["sizes"]:
        raise ValueError(f"phantom size {size!r} unknown; choose from {sorted(profiles['sizes'])}")
    root = Path(cache_root) / "phantom" / f"{size}-seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    for source in PHANTOM_SOURCES if sources is None else sources:
        if source not in PLANS:
            raise ValueError(f"no phantom profile for source {source!r}; phantom sources: {sorted(PLANS)}")
        if not (root / f"{source}.json").exists():
            print(f"[phantom] generating synthetic source {source!r} ({size}) in {root / source}", flush=True)
            write_source(root, source, size, seed)
    return root


# Plan modules of further sources (`plan_<name>.py` beside this file) register themselves on import.
for _module in pkgutil.iter_modules([str(Path(__file__).parent)]):
    if _module.name.startswith("plan_"):
        importlib.import_module(f"datamodules.phantom.{_module.name}")
PHANTOM_SOURCES = tuple(PLANS)
