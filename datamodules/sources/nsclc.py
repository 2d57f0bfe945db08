"""TCIA NSCLC-Radiomics CT (DICOM) with the PleThora thoracic-cavity and effusion masks (NIfTI).

Facts (reference/datasets.md, section 7): images in the NBIA download layout
`manifest-<id>/NSCLC-Radiomics/LUNG1-001/<MM-DD-YYYY-...study>/<series>/1-001.dcm` (`metadata.csv`
beside, optional), 422 patients; PleThora masks `Thoracic_Cavities/LUNG1-001/LUNG1-001_thor_cav_primary_reviewer.nii.gz`
(402) and `Effusions/LUNG1-001/LUNG1-001_effusion_{first,second}_reviewer.nii.gz` (78).

One case per patient (case id = patient id): of several studies the earliest-dated one is taken (TRI's
rule; dates compared as dates, not as folder text); of several series in it the CT one (Modality from
metadata.csv or one file's header; several CT series: the one with the most files, said in
`Case.meta["series_note"]`). `Case.image` is the series folder (`read_volume` reads a DICOM folder).

The thoracic cavity is NOT lung: it also holds the hilum, pleural effusion and the tumour. Trained as
lung it would teach the network to call effusion and tumour lung, and trained as background it would
teach that the lungs are background. The default policy, `cavity_ignored`, maps the cavity (code 1) to
"ignore" and annotates no class: nothing is learned from these masks yet, but the cavity is never
mistaken for lung (or for COVID lesion). A mask value other than 0/1 is an undeclared code, which
verify/harmonize report. Effusion masks (never COVID lesion by default) are recorded, in
`Case.meta["effusion_mask"]`, for every case.

`data.policies={nsclc: effusion_as_lesion}` reads the PleThora effusion masks instead (Ma et al.'s
knowledge-transfer proxy, seed 003 Task 2): a case's label file is its first reviewer's effusion mask
(the second reviewer's only when the first is absent; which one is in `Case.meta["effusion_reviewer"]`),
code 1 -> lesion; `effusion_as_class` maps it to the class `effusion` instead. Only the patients with an
effusion mask (78 of 422) are labelled then; the others, cavity mask or not, are unlabelled image-only
cases. The masks are taken to be binary 0/1 like the cavity masks: any other value is an undeclared
code that verify/harmonize report, never silently merged into the lesion. Lungs are not annotated.

Orientation: the TCIA note says the segmentations are RPI while the DICOMs are RAI. Per labelled case
the header (nibabel) of the mask the policy reads (cavity, or effusion under `effusion_as_*`) is compared
with the DICOM geometry read from two slice headers. A mask stored with an axis reversed but whose header
puts every voxel at the same world position (the RPI/RAI case) is kept, with a warning in
`Case.meta["warnings"]`: `harmonize.align_mask` reorients it onto the series' grid, which the headers
prove correct. Any other shape or affine difference is a problem naming both files and the case is left
out: geometry that cannot be verified is never fixed. AMID's known bad patients (`KNOWN_BAD`) are left
out with that reason.
"""
from __future__ import annotations

import logging
import re
from datetime import date
from pathlib import Path

import numpy as np

from datamodules.cases import Case
from datamodules.harmonize import reorientation
from datamodules.io import LPS_TO_RAS
from datamodules.label_policy import LabelPolicy
from datamodules.sources.base import SourceAdapter, register_source, walk_dirs
from datamodules.sources.tables import read_table

DATE_RE = re.compile(r"^(\d{2})-(\d{2})-(\d{4})")

log = logging.getLogger(__name__)


def folder_date(name: str) -> date | None:
    """The date an NBIA study folder starts with (`09-18-2008-StudyID-NA-69331` -> 2008-09-18)."""
    m = DATE_RE.match(name)
    if not m:
        return None
    try:
        return date(int(m.group(3)), int(m.group(1)), int(m.group(2)))
    except ValueError:
        return None


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".dcm" and not p.name.startswith("."))


def series_folders(study: Path) -> list[Path]:
    return sorted(d for d in study.iterdir() if d.is_dir() and not d.name.startswith(".") and dicom_files(d))


def read_header(path: Path):
    """SimpleITK reader with one file's header read (no pixel data)."""
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return r


def header_tag(path: Path, tag: str) -> str | None:
    """One DICOM tag ("0008|0060") of one file, stripped; None if absent or unreadable."""
    try:
        r = read_header(path)
        return r.GetMetaData(tag).strip() if r.HasMetaDataKey(tag) else None
    except RuntimeError:
        return None


def dicom_geometry(files: list[Path]) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape x, y, z; RAS affine) of a one-series folder from two slice headers, as `read_volume` would
    give them (slices sorted along the normal, origin at the lowest).

    Only the first and last file by name are read (NBIA names `1-001.dcm`.. follow the instance number,
    i.e. the slice order): cheap at discovery. Were they not the end slices, the origin would come out
    wrong and the comparison fail: a reported problem, never a silent fix.
    """
    first, last = read_header(files[0]), read_header(files[-1])
    direction = np.asarray(first.GetDirection(), dtype=np.float64).reshape(3, 3)
    o0, o1 = np.asarray(first.GetOrigin(), dtype=np.float64), np.asarray(last.GetOrigin(), dtype=np.float64)
    if float((o1 - o0) @ direction[:, 2]) < 0:
        o0, o1 = o1, o0
    sx, sy = first.GetSpacing()[:2]
    n = len(files)
    step = (o1 - o0) / (n - 1) if n > 1 else direction[:, 2] * first.GetSpacing()[2]
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = direction[:, 0] * sx, direction[:, 1] * sy, step, o0
    ras = np.diag([*np.diag(LPS_TO_RAS), 1.0]) @ lps
    size = first.GetSize()
    return (int(size[0]), int(size[1]), n), ras


def read_nbia_metadata(manifest: Path) -> dict[Path, dict]:
    """NBIA `metadata.csv` rows by series folder (resolved from `File Location`); {} if absent."""
    path = manifest / "metadata.csv"
    if not path.is_file():
        return {}
    rows = {}
    for row in read_table(path, required=("File Location",)):
        loc = row["File Location"].strip().replace("\\", "/")
        if loc:
            rows[(manifest / loc).resolve()] = row
    return rows


def series_modality(folder: Path, metadata: dict[Path, dict]) -> str | None:
    row = metadata.get(folder.resolve())
    if row and row.get("Modality"):
        return row["Modality"].strip().upper()
    files = dicom_files(folder)
    value = header_tag(files[0], "0008|0060") if files else None
    return value.upper() if value else None


@register_source("nsclc")
class NSCLCRadiomics(SourceAdapter):
    DESCRIPTION = ("NSCLC-Radiomics CT (DICOM, 422 patients) with PleThora thoracic-cavity masks (ignored: "
                   "cavity is not lung) and effusion masks (recorded; lesion or effusion by data.policies)")
    PATIENT_RE = re.compile(r"^LUNG1-\d{3}$")
    CAVITY_SUFFIX = "_thor_cav_primary_reviewer"
    EFFUSION_RE = re.compile(r"^(LUNG1-\d{3})_effusion_(first|second)_reviewer\.nii(\.gz)?$")
    # AMID: DICOM-SEG missing for LUNG1-128/412; image/SEG shape mismatch for LUNG1-014/021/085/095/194.
    KNOWN_BAD = {
        "LUNG1-128": "DICOM-SEG missing (AMID)", "LUNG1-412": "DICOM-SEG missing (AMID)",
        **{f"LUNG1-{n}": "image and segmentation shapes differ (AMID)" for n in ("014", "021", "085", "095", "194")},
    }
    POLICIES = {
        "cavity_ignored": LabelPolicy("nsclc/cavity_ignored", {0: "background", 1: "ignore"}, (),
                                      "1 = thoracic cavity (lung + hilum + effusion + tumour), ignored: not lung"),
        "effusion_as_lesion": LabelPolicy("nsclc/effusion_as_lesion", {0: "background", 1: "lesion"}, ("lesion",),
                                          "1 = pleural effusion (PleThora) taken as lesion (knowledge-transfer "
                                          "proxy); lungs not annotated"),
        "effusion_as_class": LabelPolicy("nsclc/effusion_as_class", {0: "background", 1: "effusion"}, ("effusion",),
                                         "1 = pleural effusion (PleThora) as its own class `effusion`; lungs not "
                                         "annotated"),
    }
    DEFAULT_POLICY = "cavity_ignored"
    # Policies that read the effusion masks (first reviewer, else second) instead of the cavity masks.
    EFFUSION_POLICIES = ("effusion_as_lesion", "effusion_as_class")

    def discover(self) -> list[Case]:
        coll = self.find_dir(lambda d: d.name == "NSCLC-Radiomics" and any(
            self.PATIENT_RE.match(p.name) for p in d.iterdir() if p.is_dir()), "NSCLC-Radiomics/LUNG1-xxx folders")
        metadata = read_nbia_metadata(coll.parent)
        cavities = self._masks("Thoracic_Cavities", lambda n: re.match(
            rf"^(LUNG1-\d{{3}}){self.CAVITY_SUFFIX}\.nii(\.gz)?$", n))
        effusions: dict[str, list[Path]] = {}
        for pid, path in self._mask_list("Effusions", self.EFFUSION_RE.match):
            effusions.setdefault(pid, []).append(path)
        cases = []
        for patient in sorted(d for d in coll.iterdir() if d.is_dir() and self.PATIENT_RE.match(d.name)):
            pid = patient.name
            cavity = cavities.pop(pid, None)
            effusion = effusions.pop(pid, [])
            if pid in self.KNOWN_BAD:
                self.problem(patient, f"known bad case: {self.KNOWN_BAD[pid]}; case left out")
                continue
            series, note = self._ct_series(patient, metadata)
            if series is None:
                continue
            meta = {"study": series.parent.name, "series": series.name, "effusion_mask": sorted(effusion)}
            if note:
                meta["series_note"] = note
            if self.default_policy in self.EFFUSION_POLICIES:
                label = self._effusion_label(effusion, meta)
            else:
                label = cavity
            # The label file's grid against the series' (RPI vs RAI): reoriented by its header, or left out.
            if label is not None and not self._geometry_ok(series, label, meta):
                continue
            cases.append(Case(source=self.name, case_id=pid, patient_id=pid, image=series, label=label,
                              policy=self.default_policy if label is not None else None, meta=meta))
        for pid, path in sorted(cavities.items()):
            self.problem(path, f"thoracic cavity mask of {pid}, which has no image under {coll}; mask ignored")
        for pid, paths in sorted(effusions.items()):
            for path in paths:
                self.problem(path, f"effusion mask of {pid}, which has no image under {coll}; mask ignored")
        return cases

    def _effusion_label(self, paths: list[Path], meta: dict) -> Path | None:
        """The first reviewer's effusion mask, else the second's (recorded in meta); None without either."""
        by_reviewer: dict[str, Path] = {}
        for path in sorted(paths):
            by_reviewer.setdefault(self.EFFUSION_RE.match(path.name).group(2), path)
        for reviewer in ("first", "second"):
            if reviewer in by_reviewer:
                meta["effusion_reviewer"] = reviewer
                return by_reviewer[reviewer]
        return None

    def _mask_list(self, folder_name: str, match) -> list[tuple[str, Path]]:
        folder = next((d for d in walk_dirs(self.root) if d.name == folder_name), None)
        if folder is None:
            return []
        out = []
        for sub in sorted(d for d in folder.iterdir() if d.is_dir()):
            for f in sorted(sub.iterdir()):
                m = match(f.name) if f.is_file() and not f.name.startswith(".") else None
                if m and m.group(1) == sub.name:
                    out.append((m.group(1), f))
        return out

    def _masks(self, folder_name: str, match) -> dict[str, Path]:
        return dict(self._mask_list(folder_name, match))

    def _ct_series(self, patient: Path, metadata) -> tuple[Path | None, str | None]:
        studies = sorted((d for d in patient.iterdir() if d.is_dir() and series_folders(d)),
                         key=lambda d: (folder_date(d.name) is None, folder_date(d.name) or date.min, d.name))
        if not studies:
            self.problem(patient, "no study folder holding DICOM files; case left out")
            return None, None
        study = studies[0]
        if folder_date(study.name) is None and len(studies) > 1:
            self.problem(patient, f"{len(studies)} studies without a date in their folder names; case left out")
            return None, None
        notes = []
        if len(studies) > 1:
            notes.append(f"earliest of {len(studies)} studies")
        series = series_folders(study)
        if len(series) == 1:
            return series[0], "; ".join(notes) or None
        cts = [s for s in series if series_modality(s, metadata) == "CT"]
        if not cts:
            self.problem(study, f"no CT series among {len(series)} series; case left out")
            return None, None
        chosen = max(cts, key=lambda s: len(dicom_files(s)))
        others = sorted(s.name for s in series if s != chosen)
        notes.append(f"CT series {chosen.name} ({len(dicom_files(chosen))} files) chosen over {others}")
        return chosen, "; ".join(notes)

    def _geometry_ok(self, series: Path, mask: Path, meta: dict) -> bool:
        import nibabel as nib

        try:
            header = nib.load(str(mask))
            m_shape, m_aff = tuple(int(v) for v in header.shape[:3]), np.asarray(header.affine, dtype=np.float64)
        except Exception as exc:   # noqa: BLE001  any unreadable header is this case's problem
            self.problem(mask, f"unreadable mask header ({type(exc).__name__}: {exc}); case left out")
            return False
        try:
            i_shape, i_aff = dicom_geometry(dicom_files(series))
        except RuntimeError as exc:
            self.problem(series, f"unreadable DICOM header ({exc}); case left out")
            return False
        transform = reorientation(m_shape, m_aff, i_shape, i_aff)
        if transform is None:
            self.problem(mask, f"mask grid differs from DICOM series {series}: shape {m_shape} vs {i_shape}\nimage\n"
                               f"{np.round(i_aff, 4)}\nmask\n{np.round(m_aff, 4)}\ncase left out")
            return False
        if not np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
            # Same world grid stored in another order (PleThora RPI vs DICOM RAI): the headers prove the
            # correspondence, and harmonize.align_mask reorients the mask onto the series' grid.
            names = "/".join("xyz"[a] for a, (_, flip) in enumerate(transform) if flip < 0) or "order"
            warning = (f"{mask}: PleThora mask stored with voxel axis {names} reversed relative to the DICOM series "
                       f"({''.join(nib.aff2axcodes(m_aff))} vs {''.join(nib.aff2axcodes(i_aff))}); aligned by its header")
            meta.setdefault("warnings", []).append(warning)
            log.warning(warning)
        return True
