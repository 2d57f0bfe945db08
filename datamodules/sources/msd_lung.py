"""Medical Segmentation Decathlon Task06_Lung (medicaldecathlon.com), `Task06_Lung/{imagesTr,labelsTr,imagesTs}`.

Facts (reference/datasets.md, section 5): `imagesTr/lung_XXX.nii.gz` with `labelsTr/lung_XXX.nii.gz`
(0 background, 1 "cancer", per `dataset.json`), unlabelled `imagesTs/lung_XXX.nii.gz`; 63 labelled
cases with non-contiguous ids; HU; the tar carries macOS `._lung_XXX.nii.gz` resource forks, which
`nifti_files` skips. Lungs are not annotated. One patient per case.

The tumour is non-small-cell lung cancer, not COVID-19: it never silently becomes lesion. The default
policy `tumour_ignored` maps it to "ignore" (neither lesion nor healthy tissue, out of loss and metrics);
`data.policies={msd_lung: tumour_as_lesion}` maps it to lesion instead (Ma et al.'s knowledge-transfer
proxy, seed 003).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from datamodules.cases import Case
from datamodules.label_policy import LabelPolicy
from datamodules.sources.base import SourceAdapter, nifti_files, register_source, strip_nifti

log = logging.getLogger(__name__)


@register_source("msd_lung")
class MSDLung(SourceAdapter):
    DESCRIPTION = "MSD Task06_Lung: 63 labelled CTs with a lung-cancer mask (not COVID), unlabelled imagesTs"
    # The labels dataset.json must declare (names compared case-insensitively).
    EXPECTED_LABELS = {0: "background", 1: "cancer"}
    POLICIES = {
        "tumour_ignored": LabelPolicy("msd_lung/tumour_ignored", {0: "background", 1: "ignore"}, (),
                                      "1 = lung cancer, ignored (neither COVID lesion nor healthy); lungs not annotated"),
        "tumour_as_lesion": LabelPolicy("msd_lung/tumour_as_lesion", {0: "background", 1: "lesion"}, ("lesion",),
                                        "1 = lung cancer taken as lesion (knowledge-transfer proxy); lungs not annotated"),
        "tumour_as_class": LabelPolicy("msd_lung/tumour_as_class", {0: "background", 1: "tumour"}, ("tumour",),
                                       "1 = lung cancer as its own class `tumour`; lungs not annotated"),
    }
    DEFAULT_POLICY = "tumour_ignored"

    def discover(self) -> list[Case]:
        task = self.find_dir(lambda d: (d / "imagesTr").is_dir(), "Task06_Lung folder with imagesTr/")
        labels_ok = self._check_dataset_json(task / "dataset.json")
        labels = {strip_nifti(p.name): p for p in nifti_files(task / "labelsTr")}
        cases = []
        for image in nifti_files(task / "imagesTr"):
            case_id = strip_nifti(image.name)
            label = labels.pop(case_id, None)
            if label is None:
                self.problem(image, f"labelled imagesTr case has no labelsTr/{case_id}.nii[.gz]; case left out")
                continue
            if not labels_ok:
                continue   # reported once, on dataset.json
            cases.append(self._case(image, label))
        for case_id, label in sorted(labels.items()):
            self.problem(label, f"label without an image imagesTr/{case_id}.nii[.gz]; label ignored")
        cases += [self._case(image, None) for image in nifti_files(task / "imagesTs")]
        return sorted(cases, key=lambda c: c.case_id)

    def _case(self, image: Path, label: Path | None) -> Case:
        case_id = strip_nifti(image.name)
        return Case(source=self.name, case_id=case_id, patient_id=case_id, image=image, label=label,
                    policy=self.default_policy if label is not None else None,
                    meta={"subset": image.parent.name})

    def _check_dataset_json(self, path: Path) -> bool:
        """True if dataset.json declares exactly 0 background / 1 cancer (or is absent: then assumed)."""
        if not path.exists():
            log.warning("%s: %s missing; assuming labels %s", self.name, path, self.EXPECTED_LABELS)
            return True
        try:
            declared = {int(k): str(v) for k, v in json.loads(path.read_text(encoding="utf-8"))["labels"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            self.problem(path, f"unreadable labels in dataset.json ({err!r}); labelled cases left out")
            return False
        if {k: v.lower() for k, v in declared.items()} != self.EXPECTED_LABELS:
            self.problem(path, f"dataset.json declares labels {declared}, expected {self.EXPECTED_LABELS}; "
                               "labelled cases left out")
            return False
        return True
