"""COVID-19-CT-Seg (Ma et al., Zenodo 3757476): images and three mask folders with the same file names.

Facts (reference/datasets.md, section 3): `COVID-19-CT-Seg_20cases/<id>.nii.gz`; `Lung_Mask` (1 left,
2 right), `Infection_Mask` (1), `Lung_and_Infection_Mask` (1 left, 2 right, 3 infection). The ten
`radiopaedia_*` cases are windowed to [-1250, 250] HU and stored as 0..255. TRI's preparation script
mirrors their *images only* along canonical A-P (and `radiopaedia_7_85703_0` along S-I too), leaving
the masks as stored: this source declares those image flips (`DECLARED_IMAGE_FLIPS`), and the
harmonizer confirms or refuses them per case on the user's files (`datamodules.alignment`).

Patients: the number after `radiopaedia_` is the Radiopaedia case (`covid-19-pneumonia-<n>`); its other
numbers are the study and the series. All scans of one case are one patient (`radiopaedia_10_85902_1`
and `_3`; `radiopaedia_29_86490_1` and `radiopaedia_29_86491_1`, two studies of case 29).

Which mask a case is read from: by default the richest folder that holds the case's file
(`Lung_and_Infection_Mask`, else `Infection_Mask`, else `Lung_Mask`), so a user who unpacked only some
of the zips still gets every label there is, and a case found in none of them is unlabelled.
`data.policies={ctseg: lung | infection | lung_and_infection}` chooses the folder instead (the three
subtasks of Ma et al.'s benchmark): `lung` reads `Lung_Mask` (there the lungs include the infection,
as in the official Lung_Mask), `infection` reads `Infection_Mask`, `lung_and_infection` the combined
one. A case whose chosen folder lacks its file is then unlabelled, and the missing file is a problem
(`adapter.problems`); a missing chosen folder is one problem naming the folder. On the Kaggle mirror
(lower-case folders, float masks) every case gets the `kaggle_` variant of its policy; the override may
be named with or without that prefix.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from datamodules.cases import Case
from datamodules.label_policy import LabelPolicy
from datamodules.sources.base import SourceAdapter, nifti_files, register_source, strip_nifti

KAGGLE_PREFIX = "kaggle_"


@register_source("ctseg")
class CovidCTSeg(SourceAdapter):
    DESCRIPTION = "COVID-19-CT-Seg: 20 CTs (18 patients) with left/right lung and infection masks"
    # Image folder of each mirror: Zenodo (official), Kaggle andrewmvd/covid19-ct-scans, Paddle AI-Studio.
    IMAGE_DIRS = ("COVID-19-CT-Seg_20cases", "ct_scans", "20_ncov_scan")
    KAGGLE_DIR = "ct_scans"
    # Richest mask first: a user who unpacked only some of the zips still gets every label there is.
    # Kaggle names the same folders in lower case. Each folder's policy reads its codes; a
    # data.policies override picks the folder of that policy.
    MASK_DIRS = (("Lung_and_Infection_Mask", "lung_and_infection"), ("Infection_Mask", "infection"),
                 ("Lung_Mask", "lung"))
    # Mirror file names -> Zenodo case ids (the Paddle script's mapping; datasets.md section 3).
    MIRROR_NAMES = (("_org_covid-19-pneumonia-", "_"), ("-dcm", ""), ("_org_", "_"))
    WINDOW_8BIT = (-1250.0, 250.0)
    EIGHT_BIT_RE = re.compile(r"^radiopaedia_")
    # TRI (neuro-ml/COVID-19-Triage scripts/prepare_medseg.py) flips these images, not their masks.
    DECLARED_IMAGE_FLIPS = {"radiopaedia_7_85703_0": ("A-P", "S-I"), "radiopaedia_*": ("A-P",)}
    # radiopaedia_<case>_<study>_<series>: every study and series of one Radiopaedia case is one patient.
    PATIENT_RE = re.compile(r"^(radiopaedia_\d+)_\d+_\d+$")
    POLICIES = {
        "lung_and_infection": LabelPolicy(
            "ctseg/lung_and_infection", {0: "background", 1: "lung_left", 2: "lung_right", 3: "lesion"},
            ("lung_left", "lung_right", "lesion"), "1 left lung, 2 right lung, 3 infection"),
        "infection": LabelPolicy("ctseg/infection", {0: "background", 1: "lesion"}, ("lesion",),
                                 "1 infection (Infection_Mask)"),
        "lung": LabelPolicy("ctseg/lung", {0: "background", 1: "lung_left", 2: "lung_right"},
                            ("lung_left", "lung_right"),
                            "1 left lung, 2 right lung, infection included in the lungs (Lung_Mask)"),
    }
    DEFAULT_POLICY = "lung_and_infection"
    # Kaggle's masks hold non-integer values (interpolated): the same codes, rounded to the nearest.
    POLICIES.update({f"{KAGGLE_PREFIX}{k}": replace(p, name=f"ctseg/{KAGGLE_PREFIX}{k}", float_tolerance=0.5,
                                                    description=p.description + " (float mask rounded)")
                     for k, p in list(POLICIES.items())})

    def __init__(self, root: str | Path, policy: str | None = None):
        super().__init__(root, policy)
        # The data.policies override (None: richest folder per case). Kept apart from default_policy,
        # which is never None, because only an override pins the mask folder.
        self.override = policy

    @classmethod
    def decoding(cls, case_id: str) -> dict:
        out = super().decoding(case_id)
        if cls.EIGHT_BIT_RE.match(case_id):
            out.update(encoding="uint8_window", window=cls.WINDOW_8BIT)
        return out

    @classmethod
    def case_id_of(cls, file_name: str) -> str:
        case_id = strip_nifti(file_name)
        for old, new in cls.MIRROR_NAMES:
            case_id = case_id.replace(old, new)
        return case_id

    @staticmethod
    def base_policy(policy: str) -> str:
        """`kaggle_lung` -> `lung`: the mask folder a policy reads."""
        return policy[len(KAGGLE_PREFIX):] if policy.startswith(KAGGLE_PREFIX) else policy

    def mirror_policy(self, policy: str, kaggle: bool) -> str:
        """The policy name a case of this mirror gets: the `kaggle_` variant on the Kaggle mirror (float
        masks); an override spelled with the prefix is kept as given on any mirror."""
        return f"{KAGGLE_PREFIX}{policy}" if kaggle and not policy.startswith(KAGGLE_PREFIX) else policy

    def discover(self) -> list[Case]:
        images = self.find_dir(lambda d: d.name in self.IMAGE_DIRS and bool(nifti_files(d)),
                               f"image folder ({' or '.join(self.IMAGE_DIRS)})")
        parent = images.parent
        kaggle = images.name == self.KAGGLE_DIR
        # Mask folder (Zenodo name or Kaggle's lower-case one) and its files by case id, per policy.
        folders: dict[str, Path | None] = {}
        masks: dict[str, dict[str, Path]] = {}
        for folder, pol in self.MASK_DIRS:
            found = [parent / d for d in (folder, folder.lower()) if (parent / d).is_dir()]
            folders[pol] = found[0] if found else None
            masks[pol] = {}
            for d in found:
                for p in nifti_files(d):
                    masks[pol].setdefault(self.case_id_of(p.name), p)
        chosen = None
        if self.override is not None:
            chosen = self.base_policy(self.override)
            self.default_policy = self.mirror_policy(self.override, kaggle)
        image_files = nifti_files(images)
        if chosen is not None and folders[chosen] is None:
            folder = {pol: name for name, pol in self.MASK_DIRS}[chosen]
            folder = folder.lower() if kaggle else folder
            self.problem(parent / folder, f"mask folder {folder}/ (data.policies ctseg: {self.override}) not found "
                                          f"beside {images.name}/; all {len(image_files)} cases unlabelled")
        cases = []
        for image in image_files:
            case_id = self.case_id_of(image.name)
            label, policy = None, None
            if chosen is None:   # richest folder holding this case
                for _, pol in self.MASK_DIRS:
                    if case_id in masks[pol]:
                        label, policy = masks[pol][case_id], self.mirror_policy(pol, kaggle)
                        break
            elif case_id in masks[chosen]:
                label, policy = masks[chosen][case_id], self.default_policy
            elif folders[chosen] is not None:
                ext = image.name[len(strip_nifti(image.name)):]
                self.problem(folders[chosen] / f"{case_id}{ext}",
                             f"mask missing: {folders[chosen].name}/ holds no {case_id}.nii[.gz] for image "
                             f"{image.name} (data.policies ctseg: {self.override}); case kept unlabelled")
            radiopaedia = bool(self.EIGHT_BIT_RE.match(case_id))
            m = self.PATIENT_RE.match(case_id)
            cases.append(Case(
                source=self.name, case_id=case_id, patient_id=m.group(1) if m else case_id, image=image,
                label=label, policy=policy, **self.decoding(case_id),
                meta={"origin": "radiopaedia" if radiopaedia else "coronacases", "file_name": image.name,
                      "mirror": images.name},
            ))
        return cases
