"""Phantom plans for the DICOM sources: NSCLC-Radiomics (+ PleThora masks) and TCIA COVID-19-AR.

Both are written in the NBIA download layout `manifest-<id>/<Collection>/<patient>/<study>/<series>/1-NNN.dcm`
(reference/datasets.md, sections 7 and 8), one axial slice per file, int16 with rescale intercept 0 and
slope 1, LPS patient geometry with identity direction cosines (what a scanner exports; nibabel calls it
LPS, ITK-SNAP calls it RAI). Traps planted on purpose (profiles_dicom.yaml):

nsclc: a decoy later study (a dated folder that sorts first as text) and a decoy SEG series beside the CT
series; one PleThora thoracic-cavity mask stored with z reversed (header and data: the RPI vs RAI case,
which the adapter must report); an effusion mask for one patient; a patient without any mask; metadata.csv.
covid19_ar: a patient with two CT series (two studies); a CR radiograph series (one 2D file) that must be
skipped; a clinical CSV with upper-case headers beside the manifest folder.
"""
from __future__ import annotations

import csv
import zlib
from pathlib import Path

import numpy as np

from datamodules.io import write_volume
from datamodules.phantom.suite import Scan, _center, _rng, encode, register_plan, scan_geometry, to_stored

UID_ROOT = "1.2.826.0.1.3680043.2.1125.9"
STORED_AXCODES = "LPS"   # DICOM pixel order: rows left->right is +x(L), columns +y(P), slices +z(S)


def uid(*parts) -> str:
    """A deterministic DICOM UID from names (phantom only)."""
    return f"{UID_ROOT}.{zlib.crc32('/'.join(map(str, parts)).encode())}.{zlib.adler32('/'.join(map(str, parts)).encode())}"


def write_dicom_series(array_xyz: np.ndarray, affine: np.ndarray, folder: Path, tags: dict[str, str],
                       modality: str = "CT", name: str = "1-{:03d}.dcm") -> list[Path]:
    """One axial slice per file (SimpleITK/GDCM), geometry from the RAS `affine` of `array_xyz` (x, y, z).

    `tags` adds DICOM tags ("gggg|eeee" -> value), e.g. patient id, study/series UIDs and description.
    """
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0])
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    direction = lps @ affine[:3, :3] / spacing
    vol = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_xyz, (2, 1, 0))))
    vol.SetSpacing([float(s) for s in spacing])
    vol.SetOrigin([float(v) for v in lps @ affine[:3, 3]])
    vol.SetDirection([float(v) for v in direction.ravel()])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = tags["0020|000e"]
    dir_tag = "\\".join(f"{v:.6f}" for v in (list(direction[:, 0]) + list(direction[:, 1])))
    paths = []
    for z in range(vol.GetDepth()):
        sl = vol[:, :, z]
        for tag, value in (("0008|0060", modality), ("0008|0018", f"{series_uid}.{z + 1}"), ("0020|0037", dir_tag),
                           ("0020|0032", "\\".join(f"{v:.6f}" for v in vol.TransformIndexToPhysicalPoint((0, 0, z)))),
                           ("0020|0013", str(z + 1)), ("0018|0050", f"{spacing[2]:.6f}"),
                           ("0028|1052", "0"), ("0028|1053", "1"), *tags.items()):
            sl.SetMetaData(tag, value)
        path = folder / name.format(z + 1)
        writer.SetFileName(str(path))
        writer.Execute(sl)
        paths.append(path)
    return paths


def write_radiograph(folder: Path, tags: dict[str, str], rng: np.random.Generator, modality: str = "CR") -> Path:
    """A single 2D projection radiograph file (not a CT): adapters must skip it."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(rng.integers(0, 4096, (48, 40)).astype(np.uint16))
    img.SetSpacing((0.15, 0.15))
    for tag, value in (("0008|0060", modality), ("0008|0018", tags["0020|000e"] + ".1"), *tags.items()):
        img.SetMetaData(tag, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    path = folder / "1-1.dcm"
    writer.SetFileName(str(path))
    writer.Execute(img)
    return path


def _series_tags(patient: str, study: str, series: str, date: str, description: str, number: int) -> dict[str, str]:
    mm, dd, yyyy = date.split("-")
    return {"0010|0010": patient, "0010|0020": patient, "0020|000d": uid(patient, study),
            "0020|000e": uid(patient, study, series), "0008|0020": f"{yyyy}{mm}{dd}",
            "0008|103e": description, "0020|0011": str(number)}


def _stored_image(scan: Scan, arrays: dict, profile: dict) -> tuple[np.ndarray, np.ndarray]:
    hu = encode(arrays["hu"], "hu", profile["image_dtype"])
    return to_stored(hu, arrays["affine"], scan.axcodes)


def _row(scan: Scan, arrays: dict, img: np.ndarray, aff: np.ndarray, files: dict) -> dict:
    voxel_ml = float(np.prod(scan.spacing)) / 1000.0
    return {**scan.extra, "case": scan.case_id, "labelled": scan.labelled, "shape_ras": list(scan.shape),
            "spacing_ras": [round(s, 4) for s in scan.spacing], "axcodes": scan.axcodes, "encoding": scan.encoding,
            "image_flips": [], "shape_stored": list(img.shape), "affine_stored": aff.tolist(),
            "series_folder": str(Path(*files["image"].parts[-4:])),
            "lesion_ml_truth": float((arrays["lesion_truth"] > 0).sum()) * voxel_ml,
            "lesion_ml_annotated": float((arrays["lesion_mask"] > 0).sum()) * voxel_ml,
            "lung_ml": float((arrays["lung"] > 0).sum()) * voxel_ml}


def z_flipped(affine: np.ndarray, nz: int) -> np.ndarray:
    """The affine of the same voxels stored with the slice axis reversed (origin at the other end)."""
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1.0, nz - 1
    return affine @ flip


# ----------------------------------------------------------------------------------------- NSCLC
def write_nsclc(scan: Scan, arrays: dict, profile: dict, files: dict, truth_dir: Path) -> dict:
    """CT series as DICOM; PleThora thoracic cavity (and effusion) masks as NIfTI on the same grid."""
    from scipy import ndimage

    img, aff = _stored_image(scan, arrays, profile)
    write_dicom_series(img, aff, files["image"], scan.extra["tags"])
    lung = arrays["lung"] > 0
    # The thoracic cavity holds the lungs, hilum, effusion and tumour: the lung map dilated (bigger than lung).
    cavity = ndimage.binary_dilation(lung, iterations=profile["cavity_dilation_vox"]) | (arrays["tumour"] > 0)
    mask_dtype = profile["mask_dtype"]
    if "cavity" in files:
        stored, _ = to_stored(cavity.astype(mask_dtype), arrays["affine"], scan.axcodes)
        if scan.extra["cavity_z_reversed"]:   # same world positions, slices stored the other way round
            write_volume(files["cavity"], np.ascontiguousarray(stored[:, :, ::-1]), z_flipped(aff, stored.shape[2]))
        else:
            write_volume(files["cavity"], stored, aff)
    effusion = cavity & ~lung & (np.arange(scan.shape[2]) < scan.shape[2] // 3)[None, None, :]
    for kind in ("effusion_first", "effusion_second"):
        if kind in files:
            write_volume(files[kind], to_stored(effusion.astype(mask_dtype), arrays["affine"], scan.axcodes)[0], aff)
    write_volume(truth_dir / f"{scan.case_id}_lung.nii.gz", arrays["lung"].astype(np.uint8), arrays["affine"])
    write_volume(truth_dir / f"{scan.case_id}_tumour.nii.gz", arrays["tumour"].astype(np.uint8), arrays["affine"])
    row = _row(scan, arrays, img, aff, files)
    row.pop("tags")
    voxel_ml = float(np.prod(scan.spacing)) / 1000.0
    row.update(cavity_ml=float(cavity.sum()) * voxel_ml, tumour_ml=float(arrays["tumour"].sum()) * voxel_ml,
               cavity_file=str(Path(*files["cavity"].parts[-3:])) if "cavity" in files else None)
    return row


NSCLC_METADATA_COLUMNS = ["Series UID", "Collection", "3rd Party Analysis", "Subject ID", "Study UID",
                          "Study Description", "Study Date", "Series Description", "Manufacturer", "Modality",
                          "Number of Images", "File Location"]


@register_plan("nsclc", writer=write_nsclc)
def plan_nsclc(profile, size_name, size, seed, out: Path):
    n = profile["cases"][size_name]
    manifest = out / profile["manifest"]
    coll = manifest / "NSCLC-Radiomics"
    pids = profile["patients"][: n["labelled"] + n["unlabelled"]]
    plans, meta_rows = [], []
    for i, pid in enumerate(pids):
        rng = _rng(seed, "nsclc", i)
        shape, spacing = scan_geometry(rng, profile, size)
        labelled = i < n["labelled"]
        date = profile["study_dates"][i % len(profile["study_dates"])]
        study = f"{date}-StudyID-NA-{10000 + 7919 * (i + 1) % 90000}"
        series = f"0.000000-NA-{20000 + 3571 * (i + 1) % 70000}"
        tags = _series_tags(pid, study, series, date, "", 0)
        files: dict[str, Path] = {"image": coll / pid / study / series}
        reversed_z = pid in profile["z_reversed_cavity"] and labelled
        if labelled:
            files["cavity"] = out / "Thoracic_Cavities" / pid / f"{pid}_thor_cav_primary_reviewer.nii.gz"
        if pid in profile["effusion_patients"]:
            for kind in ("first", "second"):
                files[f"effusion_{kind}"] = out / "Effusions" / pid / f"{pid}_effusion_{kind}_reviewer.nii.gz"
        meta_rows.append({"Series UID": tags["0020|000e"], "Collection": "NSCLC-Radiomics", "3rd Party Analysis": "NO",
                          "Subject ID": pid, "Study UID": tags["0020|000d"], "Study Description": "",
                          "Study Date": date, "Series Description": "", "Manufacturer": "SIEMENS", "Modality": "CT",
                          "Number of Images": shape[2], "File Location": f"./NSCLC-Radiomics/{pid}/{study}/{series}"})
        decoys = []
        if pid in profile["decoy_later_study"]:
            # A later study whose folder sorts first as text ("01-..." < "09-..."): the earliest date is taken.
            later = f"01-05-{int(date[-4:]) + 1}-StudyID-NA-55555"
            decoys.append(("later_study", later, "1.000000-NA-66666", "CT"))
        if pid in profile["decoy_seg"]:
            decoys.append(("seg", study, "300.000000-Segmentation-77777", "SEG"))
        for kind, dstudy, dseries, modality in decoys:
            dtags = _series_tags(pid, dstudy, dseries, dstudy[:10], kind, 300)
            if modality == "CT":
                small = np.full((16, 16, 4), -1000, np.int16)
                write_dicom_series(small, np.diag([-2.0, -2.0, 3.0, 1.0]), coll / pid / dstudy / dseries, dtags)
            else:
                write_radiograph(coll / pid / dstudy / dseries, dtags, rng, modality=modality)
            meta_rows.append({**meta_rows[-1], "Series UID": dtags["0020|000e"], "Study UID": dtags["0020|000d"],
                              "Study Date": dstudy[:10], "Modality": modality, "Number of Images": 4 if modality == "CT" else 1,
                              "File Location": f"./NSCLC-Radiomics/{pid}/{dstudy}/{dseries}"})
        plans.append((Scan(pid, shape, spacing, _center(rng, profile), STORED_AXCODES, labelled=labelled,
                           healthy=True, tumour=True,
                           extra={"patient": pid, "cavity_z_reversed": reversed_z, "tags": tags,
                                  "effusion": pid in profile["effusion_patients"],
                                  "decoys": [d[0] for d in decoys]}), files, rng))
    manifest.mkdir(parents=True, exist_ok=True)
    with (manifest / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, NSCLC_METADATA_COLUMNS)
        w.writeheader()
        w.writerows(meta_rows)
    return plans


# ----------------------------------------------------------------------------------- COVID-19-AR
def write_covid19_ar(scan: Scan, arrays: dict, profile: dict, files: dict, truth_dir: Path) -> dict:
    """CT series as DICOM, images only (the collection has no segmentations); truth maps in `_truth/`."""
    img, aff = _stored_image(scan, arrays, profile)
    write_dicom_series(img, aff, files["image"], scan.extra["tags"])
    write_volume(truth_dir / f"{scan.case_id}_lesion.nii.gz", arrays["lesion_truth"].astype(np.uint8), arrays["affine"])
    write_volume(truth_dir / f"{scan.case_id}_lung.nii.gz", arrays["lung"].astype(np.uint8), arrays["affine"])
    row = _row(scan, arrays, img, aff, files)
    row.pop("tags")
    return row


CLINICAL_COLUMNS = ["PATIENT_ID", "AGE", "SEX", "RACE", "ZIP", "LATEST_BMI", "COVID_TEST_POSITIVE", "TEST_NAME",
                    "ICU_Admit", "NUM_ICU_admits", "MORTALITY"]


@register_plan("covid19_ar", writer=write_covid19_ar)
def plan_covid19_ar(profile, size_name, size, seed, out: Path):
    manifest = out / profile["manifest"]
    coll = manifest / "COVID-19-AR"
    per_patient = profile["cases"][size_name]
    plans, clinical, k = [], [], 0
    for p, n_ct in enumerate(per_patient):
        pid = profile["patients"][p]
        ids = [pid] if n_ct == 1 else [f"{pid}_{j + 1}" for j in range(n_ct)]
        for j, cid in enumerate(ids):
            rng = _rng(seed, "covid19_ar", k)
            k += 1
            shape, spacing = scan_geometry(rng, profile, size)
            date = f"0{4 + j}-{10 + p:02d}-2020"
            study = f"{date}-CT CHEST WITHOUT CONTRAST-{31000 + 97 * k}"
            series = f"2.000000-ROUTINE CHEST NON-CON-{42000 + 89 * k}"
            tags = _series_tags(pid, study, series, date, "ROUTINE CHEST NON-CON", 2)
            plans.append((Scan(cid, shape, spacing, _center(rng, profile), STORED_AXCODES, labelled=False,
                               extra={"patient": pid, "tags": tags}), {"image": coll / pid / study / series}, rng))
        if p in profile["radiograph_patients"]:
            study = f"03-2{p}-2020-XR CHEST AP PORTABLE-{51000 + p}"
            series = f"1.000000-AP-{52000 + p}"
            write_radiograph(coll / pid / study / series, _series_tags(pid, study, series, study[:10], "AP", 1),
                             _rng(seed, "covid19_ar/cr", p))
        rng = _rng(seed, "covid19_ar/clinical", p)
        clinical.append({"PATIENT_ID": pid, "AGE": int(rng.integers(25, 90)), "SEX": ["M", "F"][p % 2],
                         "RACE": "WHITE", "ZIP": "722", "LATEST_BMI": round(float(rng.uniform(19, 38)), 1),
                         "COVID_TEST_POSITIVE": "Y", "TEST_NAME": "SARS-COV-2 PCR", "ICU_Admit": "Y" if p == 0 else "N",
                         "NUM_ICU_admits": 1 if p == 0 else 0, "MORTALITY": "N"})
    out.mkdir(parents=True, exist_ok=True)
    with (out / profile["clinical_file"]).open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, CLINICAL_COLUMNS)
        w.writeheader()
        w.writerows(clinical)
    return plans
