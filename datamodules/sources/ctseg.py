"""COVID-19-CT-Seg (Ma et al., Zenodo 3757476): images and three mask folders with the same file names.

Facts (reference/datasets.md, section 3): `COVID-19-CT-Seg_20cases/<id>.nii.gz`; `Lung_Mask` (1 left,
2 right), `Infection_Mask` (1), `Lung_and_Infection_Mask` (1 left, 2 right, 3 infection). The ten
`radiopaedia_*` cases are windowed to [-1250, 250] HU and stored as 0..255; their arrays are mirrored
along the first in-plane axis relative to the header (and `radiopaedia_7_85703_0` along z too), which
TRI undoes after canonical reorientation. `radiopaedia_10_85902_1` and `_3` are one patient.
"""
from __future__ import annotations

import re
from dataclasses import replace

from datamodules.cases import Case
from datamodules.label_policy import LabelPolicy
from datamodules.sources.base import SourceAdapter, nifti_files, register_source, strip_nifti


@register_source("ctseg")
class CovidCTSeg(SourceAdapter):
    DESCRIPTION = "COVID-19-CT-Seg: 20 CTs (19 patients) with left/right lung and infection masks"
    # Image folder of each mirror: Zenodo (official), Kaggle andrewmvd/covid19-ct-scans, Paddle AI-Studio.
    IMAGE_DIRS = ("COVID-19-CT-Seg_20cases", "ct_scans", "20_ncov_scan")
    KAGGLE_DIR = "ct_scans"
    # Richest mask first: a user who unpacked only some of the zips still gets every label there is.
    # Kaggle names the same folders in lower case.
    MASK_DIRS = (("Lung_and_Infection_Mask", "lung_and_infection"), ("Infection_Mask", "infection"),
                 ("Lung_Mask", "lung"))
    # Mirror file names -> Zenodo case ids (the Paddle script's mapping; datasets.md section 3).
    MIRROR_NAMES = (("_org_covid-19-pneumonia-", "_"), ("-dcm", ""), ("_org_", "_"))
    WINDOW_8BIT = (-1250.0, 250.0)
    EIGHT_BIT_RE = re.compile(r"^radiopaedia_")
    FLIPS = {"radiopaedia_7_85703_0": (0, 2)}  # per case; other radiopaedia cases: (0,)
    DEFAULT_RADIOPAEDIA_FLIP = (0,)
    # radiopaedia_<article>_<case>_<series>: series of one Radiopaedia case come from one patient.
    PATIENT_RE = re.compile(r"^(radiopaedia_\d+_\d+)_\d+$")
    POLICIES = {
        "lung_and_infection": LabelPolicy(
            "ctseg/lung_and_infection", {0: "background", 1: "lung_left", 2: "lung_right", 3: "lesion"},
            ("lung_left", "lung_right", "lesion"), "1 left lung, 2 right lung, 3 infection"),
        "infection": LabelPolicy("ctseg/infection", {0: "background", 1: "lesion"}, ("lesion",), "1 infection"),
        "lung": LabelPolicy("ctseg/lung", {0: "background", 1: "lung_left", 2: "lung_right"},
                            ("lung_left", "lung_right"), "1 left lung, 2 right lung"),
    }
    DEFAULT_POLICY = "lung_and_infection"
    # Kaggle's masks hold non-integer values (interpolated): the same codes, rounded to the nearest.
    POLICIES.update({f"kaggle_{k}": replace(p, name=f"ctseg/kaggle_{k}", float_tolerance=0.5,
                                            description=p.description + " (float mask rounded)")
                     for k, p in list(POLICIES.items())})

    @classmethod
    def decoding(cls, case_id: str) -> dict:
        if not cls.EIGHT_BIT_RE.match(case_id):
            return {"encoding": "hu", "window": None, "flip_axes": ()}
        return {"encoding": "uint8_window", "window": cls.WINDOW_8BIT,
                "flip_axes": cls.FLIPS.get(case_id, cls.DEFAULT_RADIOPAEDIA_FLIP)}

    @classmethod
    def case_id_of(cls, file_name: str) -> str:
        case_id = strip_nifti(file_name)
        for old, new in cls.MIRROR_NAMES:
            case_id = case_id.replace(old, new)
        return case_id

    def discover(self) -> list[Case]:
        images = self.find_dir(lambda d: d.name in self.IMAGE_DIRS and bool(nifti_files(d)),
                               f"image folder ({' or '.join(self.IMAGE_DIRS)})")
        parent = images.parent
        kaggle = images.name == self.KAGGLE_DIR
        cases = []
        for image in nifti_files(images):
            case_id = self.case_id_of(image.name)
            label, policy = None, None
            for folder, pol in self.MASK_DIRS:
                hits = [p for d in (folder, folder.lower()) for p in nifti_files(parent / d)
                        if self.case_id_of(p.name) == case_id]
                if hits:
                    label, policy = hits[0], (f"kaggle_{pol}" if kaggle else pol)
                    break
            radiopaedia = bool(self.EIGHT_BIT_RE.match(case_id))
            m = self.PATIENT_RE.match(case_id)
            cases.append(Case(
                source=self.name, case_id=case_id, patient_id=m.group(1) if m else case_id, image=image,
                label=label, policy=policy, **self.decoding(case_id),
                meta={"origin": "radiopaedia" if radiopaedia else "coronacases", "file_name": image.name,
                      "mirror": images.name},
            ))
        return cases
