"""MosMedData COVID19_1110 (mosmed.ai), `COVID19_1110/{studies/CT-k, masks}`.

Facts (reference/datasets.md, section 2 and the addendum on the 50 real masks): studies
`studies/CT-0..CT-4/study_NNNN.nii.gz`, masks `masks/study_NNNN_mask.nii.gz` for studies 0255..0304
(CT-1), int16 {0, 1} with GGO and consolidation merged, LAS, 8 mm slices. Lungs are not annotated.
Mirrors ship uncompressed `.nii` and flat `studies/` folders: both are accepted.
"""
from __future__ import annotations

import re
from pathlib import Path

from datamodules.cases import Case
from datamodules.label_policy import LabelPolicy
from datamodules.sources.base import SourceAdapter, nifti_files, register_source, strip_nifti
from datamodules.sources.tables import read_table

REGISTRY_NAME = "dataset_registry.csv"


def read_registry(path: Path) -> dict[str, dict]:
    """`dataset_registry.csv` as shipped: UTF-8 with BOM, CRLF, paths with a leading slash.

    Returns study id (`study_0255`) -> {"category": "CT-1", "study_file": "studies/CT-1/...",
    "mask_file": "masks/..." or None}. `utf-8-sig` drops the BOM (else the first header reads
    "\ufeffstudy_id"); the csv module handles CRLF; leading slashes are stripped so the paths join onto
    the archive folder. A short row, a missing column or invalid UTF-8 is an error naming the line
    (`datamodules.sources.tables`).
    """
    rows = {}
    for row in read_table(path, required=("study_id", "category", "study_file", "mask_file")):
        study = strip_nifti(Path(row["study_file"].strip()).name)
        rows[study] = {"category": row["category"].strip(), "study_file": row["study_file"].strip().lstrip("/"),
                       "mask_file": row["mask_file"].strip().lstrip("/") or None}
    return rows


@register_source("mosmed")
class MosMed(SourceAdapter):
    DESCRIPTION = "MosMedData COVID19_1110: 1110 CTs in severity folders CT-0..CT-4, 50 with lesion masks"
    STUDY_RE = re.compile(r"^study_\d{4}$")
    CATEGORY_RE = re.compile(r"^CT-\d$")
    MASK_SUFFIX = "_mask"
    POLICIES = {
        "lesion": LabelPolicy("mosmed/lesion", {0: "background", 1: "lesion"}, ("lesion",),
                              "1 = GGO or consolidation (merged); lungs not annotated"),
    }
    DEFAULT_POLICY = "lesion"

    def discover(self) -> list[Case]:
        studies = self.find_dir(lambda d: d.name == "studies", "studies/ folder")
        masks_dir = studies.parent / "masks"
        registry_path = studies.parent / REGISTRY_NAME
        registry = read_registry(registry_path) if registry_path.is_file() else {}
        masks = {strip_nifti(p.name)[: -len(self.MASK_SUFFIX)]: p for p in nifti_files(masks_dir)
                 if strip_nifti(p.name).endswith(self.MASK_SUFFIX)}
        cases = []
        for folder in [studies, *sorted(d for d in studies.iterdir() if d.is_dir() and self.CATEGORY_RE.match(d.name))]:
            for image in nifti_files(folder):
                study = strip_nifti(image.name)
                if not self.STUDY_RE.match(study):
                    continue
                label = masks.pop(study, None)
                listed = registry.get(study, {})
                if listed.get("mask_file") and label is None:
                    self.problem(image, f"{REGISTRY_NAME} lists mask {listed['mask_file']}, which is missing; "
                                        "study kept as unlabelled")
                category = folder.name if folder is not studies else listed.get("category")
                cases.append(Case(
                    source=self.name, case_id=study, patient_id=study,  # one study per patient (README)
                    image=image, label=label, policy=self.default_policy if label else None,
                    meta={"category": category},
                ))
        for study, mask in sorted(masks.items()):
            self.problem(mask, f"mask without a study {study}.nii[.gz] under {studies}; mask ignored")
        return sorted(cases, key=lambda c: c.case_id)
