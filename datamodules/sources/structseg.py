"""StructSeg 2019 (structseg2019.grand-challenge.org), Task 3 `Thoracic_OAR` and Task 4 `Lung_GTV`.

Facts (reference/datasets.md, section 6): `Thoracic_OAR/<n>/data.nii.gz` + `label.nii.gz` and
`Lung_GTV/<n>/data.nii.gz` + `label.nii.gz`, numeric folders 1..50 (`.nii` accepted too).
Case ids are `oar_<n>` and `gtv_<n>` (the folder number alone repeats across the two tasks).

Thoracic_OAR codes 1..6; the order is disputed (MultiTalent: 1 left lung, 2 right lung, 3 heart,
4 esophagus, 5 trachea, 6 spinal cord; Roncax: 1 right lung, 2 left lung, ...). Policy `oar` keeps the
lungs and maps the other organs to background (they are neither lung nor lesion). Which code is the LEFT
lung is checked per case at discovery: the two largest classes must be codes 1 and 2 (else the case is a
problem and left out), and the centroid of the left lung must have the smaller world x (RAS+: +x is the
patient's right). A case stored the other way round gets the policy `oar_swapped` (1 right, 2 left) and
a warning in `Case.meta["warnings"]` (logged; it is not a problem, the case stays).

Lung_GTV code 1 is the gross tumour volume, like MSD Task06 a non-COVID tumour: `gtv_ignored` (default)
or `gtv_as_lesion`. Every labelled case carries its own policy name; `data.policies={structseg: ...}`
chooses the GTV policy only (an OAR policy there is an error: OAR cases are decided by geometry).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from datamodules.cases import Case
from datamodules.io import VolumeError, read_volume
from datamodules.label_policy import LabelPolicy
from datamodules.sources.base import SourceAdapter, nifti_files, register_source, strip_nifti

log = logging.getLogger(__name__)

_OTHER_ORGANS = {3: "background", 4: "background", 5: "background", 6: "background"}


@register_source("structseg")
class StructSeg(SourceAdapter):
    DESCRIPTION = "StructSeg 2019: 50 Thoracic_OAR CTs (lungs kept, other organs background), 50 Lung_GTV CTs (tumour)"
    TASKS = (("Thoracic_OAR", "oar"), ("Lung_GTV", "gtv"))
    LEFT, RIGHT = 1, 2   # declared order (MultiTalent, JM); checked per case
    POLICIES = {
        "oar": LabelPolicy("structseg/oar", {0: "background", 1: "lung_left", 2: "lung_right", **_OTHER_ORGANS},
                           ("lung_left", "lung_right"),
                           "1 left lung, 2 right lung; 3 heart, 4 esophagus, 5 trachea, 6 spinal cord -> background"),
        "oar_swapped": LabelPolicy("structseg/oar_swapped",
                                   {0: "background", 1: "lung_right", 2: "lung_left", **_OTHER_ORGANS},
                                   ("lung_left", "lung_right"),
                                   "lungs stored 1 right / 2 left (found by geometry); other organs -> background"),
        "gtv_ignored": LabelPolicy("structseg/gtv_ignored", {0: "background", 1: "ignore"}, (),
                                   "1 = gross tumour volume, ignored (neither COVID lesion nor healthy)"),
        "gtv_as_lesion": LabelPolicy("structseg/gtv_as_lesion", {0: "background", 1: "lesion"}, ("lesion",),
                                     "1 = gross tumour volume taken as lesion (knowledge-transfer proxy)"),
        "gtv_as_class": LabelPolicy("structseg/gtv_as_class", {0: "background", 1: "tumour"}, ("tumour",),
                                    "1 = gross tumour volume as its own class `tumour`"),
    }
    GTV_POLICIES = ("gtv_ignored", "gtv_as_lesion", "gtv_as_class")
    DEFAULT_POLICY = "gtv_ignored"

    def __init__(self, root: str | Path, policy: str | None = None):
        super().__init__(root, policy)
        if self.default_policy not in self.GTV_POLICIES:
            raise ValueError(f"{self.name}: data.policies chooses the Lung_GTV policy {self.GTV_POLICIES}; "
                             f"got {policy!r} (Thoracic_OAR cases get oar/oar_swapped from their geometry)")

    def discover(self) -> list[Case]:
        names = [task for task, _ in self.TASKS]
        top = self.find_dir(lambda d: any((d / t).is_dir() for t in names), "Thoracic_OAR/ or Lung_GTV/ folder")
        cases = []
        for task, prefix in self.TASKS:
            folder = top / task
            if not folder.is_dir():
                continue
            for sub in sorted((d for d in folder.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name)):
                files = {strip_nifti(p.name): p for p in nifti_files(sub)}
                image, label = files.get("data"), files.get("label")
                if image is None:
                    self.problem(sub, "no data.nii[.gz] in this case folder; case left out")
                    continue
                if label is None:
                    self.problem(image, "no label.nii[.gz] beside the image; case left out")
                    continue
                case_id = f"{prefix}_{int(sub.name)}"
                meta = {"task": task, "warnings": []}
                if prefix == "oar":
                    policy = self._oar_policy(label, meta)
                    if policy is None:
                        continue
                else:
                    policy = self.default_policy
                # UNCONFIRMED: the two tasks are taken to be different patient sets (as the challenge
                # describes them); nothing links oar_<n> to gtv_<n>, so each case is its own patient.
                cases.append(Case(source=self.name, case_id=case_id, patient_id=case_id, image=image, label=label,
                                  policy=policy, meta=meta))
        return cases

    def _oar_policy(self, label: Path, meta: dict) -> str | None:
        """`oar` or `oar_swapped` from the lungs' world positions; None (problem reported) if not decidable."""
        try:
            arr, affine = read_volume(label)   # read once, at discovery; the harmonizer reads it again later
        except VolumeError as err:
            self.problem(label, f"{err}; case left out")
            return None
        if arr.dtype.kind == "f":
            arr = np.rint(arr)
        arr = arr.astype(np.int64, copy=False)
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 6:
            bad = sorted(int(c) for c in np.unique(arr[(arr < 0) | (arr > 6)])[:5])
            self.problem(label, f"codes {bad} outside the 0..6 Thoracic_OAR classes; case left out")
            return None
        counts = np.bincount(arr.ravel(), minlength=7)
        largest = {int(c) for c in np.argsort(counts[1:], kind="stable")[::-1][:2] + 1}
        if largest != {self.LEFT, self.RIGHT} or not counts[self.LEFT] or not counts[self.RIGHT]:
            self.problem(label, f"the two largest classes are {sorted(largest)}, not the lungs 1 and 2 "
                                f"(voxel counts by code {counts.tolist()}); case left out")
            return None
        x = {code: self._world_x_centroid(arr == code, affine) for code in (self.LEFT, self.RIGHT)}
        meta["lung_centroid_x_mm"] = {str(k): round(v, 1) for k, v in x.items()}
        if x[self.LEFT] < x[self.RIGHT]:
            return "oar"
        msg = (f"{label}: code {self.LEFT} (declared left lung) lies at world x {x[self.LEFT]:.1f} mm, right of code "
               f"{self.RIGHT} at {x[self.RIGHT]:.1f} mm (RAS+): lungs swapped, read with policy oar_swapped")
        meta["warnings"].append(msg)
        log.warning("%s: %s", self.name, msg)
        return "oar_swapped"

    @staticmethod
    def _world_x_centroid(mask: np.ndarray, affine: np.ndarray) -> float:
        """World x (RAS+ mm) of the mask's centroid, from per-axis projections (no coordinate arrays)."""
        n = float(mask.sum())
        mean_ijk = [float((mask.sum(axis=tuple(a for a in range(3) if a != ax)) * np.arange(mask.shape[ax])).sum()) / n
                    for ax in range(3)]
        return float(np.asarray(affine)[0, :3] @ mean_ijk + affine[0, 3])
