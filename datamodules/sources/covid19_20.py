"""COVID-19-20 challenge (grand-challenge.org), `COVID-19-20_v2/{Train,Validation}`.

Facts (reference/datasets.md, section 1): Train pairs `volume-covid19-A-NNNN[_N|_dayNNN]_ct.nii.gz`
with `..._seg.nii.gz` (0 background, 1 lesion); Validation holds `_ct` only. Lungs are not annotated.
"""
from __future__ import annotations

import re

from datamodules.cases import Case
from datamodules.label_policy import LabelPolicy
from datamodules.sources.base import SourceAdapter, nifti_files, register_source, strip_nifti


@register_source("covid19_20")
class Covid1920(SourceAdapter):
    DESCRIPTION = "COVID-19-20 challenge: 199 labelled train CTs (lesion only), 50 unlabelled validation CTs"
    ARCHIVE_DIR = "COVID-19-20_v2"
    IMAGE_SUFFIX = "_ct"
    MASK_SUFFIX = "_seg"
    # `_1` / `_dayNNN` mark further scans of the same TCIA patient: group them so no split divides them.
    PATIENT_RE = re.compile(r"(_day\d+|_\d+)$")
    POLICIES = {
        "lesion": LabelPolicy("covid19_20/lesion", {0: "background", 1: "lesion"}, ("lesion",),
                              "1 = COVID-19 lesion; lungs not annotated"),
    }
    DEFAULT_POLICY = "lesion"

    def discover(self) -> list[Case]:
        train = self.find_dir(lambda d: d.name == "Train" and any(
            strip_nifti(p.name).endswith(self.IMAGE_SUFFIX) for p in nifti_files(d)), "Train folder with *_ct.nii.gz")
        cases = [self._case(p, labelled=True) for p in self._images(train)]
        validation = train.parent / "Validation"
        cases += [self._case(p, labelled=False) for p in self._images(validation)]
        return [c for c in cases if c is not None]

    def _images(self, folder):
        return [p for p in nifti_files(folder) if strip_nifti(p.name).endswith(self.IMAGE_SUFFIX)]

    def _case(self, image, labelled: bool) -> Case | None:
        stem = strip_nifti(image.name)
        case_id = stem[: -len(self.IMAGE_SUFFIX)]
        label = None
        if labelled:
            ext = image.name[len(stem):]
            label = image.with_name(case_id + self.MASK_SUFFIX + ext)
            if not label.exists():
                alt = [p for p in nifti_files(image.parent) if strip_nifti(p.name) == case_id + self.MASK_SUFFIX]
                if not alt:
                    self.problem(image, f"labelled Train case has no mask {label.name} beside it; case left out")
                    return None
                label = alt[0]
        return Case(
            source=self.name, case_id=case_id, patient_id=self.PATIENT_RE.sub("", case_id), image=image,
            label=label, policy=self.default_policy if labelled else None,
            meta={"subset": "Train" if labelled else "Validation"},
        )
