"""TCIA COVID-19-AR (pageId=70226443): chest radiographs (CR/DX) and CTs of 105 COVID-19 patients, DICOM.

Facts (reference/datasets.md, section 8): NBIA layout
`manifest-<id>/COVID-19-AR/COVID-19-AR-16406504/<study>/<series>/*.dcm`, mixed modalities, no
segmentations. Only CT series become cases (Modality 0008|0060 read from one file's header per series, or
from the NBIA metadata.csv); radiograph series are skipped and counted per patient in
`Case.meta["skipped_series"]` (and over the source in `self.skipped`). All cases are unlabelled.

Case id: the patient id when the patient has one CT series, else `<patient>_<k>` (k = 1.. in study date,
then folder order); the patient id is always `COVID-19-AR-xxxxxxxx`, so splits keep a patient's scans
together. A clinical CSV beside or inside the manifest folder (`*clinical*.csv`; the original spreadsheet
has upper-case headers such as `PATIENT_ID`, `ICU_Admit`, `MORTALITY`, the IDC table lower-case ones)
gives `Case.meta["clinical"]`: that patient's row with lower-cased keys.
"""
from __future__ import annotations

import re
from collections import Counter
from datetime import date
from pathlib import Path

from datamodules.cases import Case
from datamodules.label_policy import LabelPolicy
from datamodules.sources.base import SourceAdapter, register_source
from datamodules.sources.nsclc import folder_date, read_nbia_metadata, series_folders, series_modality
from datamodules.sources.tables import read_table


def read_clinical(paths: list[Path]) -> dict[str, dict[str, str]]:
    """Patient id -> row with lower-cased, stripped keys, from every clinical CSV given (first wins)."""
    rows: dict[str, dict[str, str]] = {}
    for path in paths:
        for row in read_table(path, required=("patient_id",), lower_header=True):
            low = {k: v.strip() for k, v in row.items()}
            if low["patient_id"]:
                rows.setdefault(low["patient_id"], low)
    return rows


@register_source("covid19_ar")
class Covid19AR(SourceAdapter):
    DESCRIPTION = "TCIA COVID-19-AR: CT series of COVID-19 patients (DICOM, unlabelled; radiographs skipped)"
    PATIENT_RE = re.compile(r"^COVID-19-AR-\d+$")
    # No masks: a policy only because callers ask every case for one (never applied to a label).
    POLICIES = {"unlabelled": LabelPolicy("covid19_ar/unlabelled", {0: "background"}, (),
                                          "no segmentations in this collection")}
    DEFAULT_POLICY = "unlabelled"

    def discover(self) -> list[Case]:
        coll = self.find_dir(lambda d: d.name == "COVID-19-AR" and any(
            self.PATIENT_RE.match(p.name) for p in d.iterdir() if p.is_dir()), "COVID-19-AR/COVID-19-AR-xxxxxxxx folders")
        manifest = coll.parent
        metadata = read_nbia_metadata(manifest)
        clinical_files = sorted({p for d in (manifest, manifest.parent) for p in d.glob("*.csv")
                                 if "clinical" in p.name.lower()})
        clinical = read_clinical(clinical_files)
        self.skipped: dict[str, dict[str, int]] = {}
        cases = []
        for patient in sorted(d for d in coll.iterdir() if d.is_dir() and self.PATIENT_RE.match(d.name)):
            pid = patient.name
            studies = sorted((d for d in patient.iterdir() if d.is_dir() and not d.name.startswith(".")),
                             key=lambda d: (folder_date(d.name) or date.max, d.name))
            ct, skipped = [], Counter()
            for study in studies:
                for series in series_folders(study):
                    modality = series_modality(series, metadata)
                    if modality == "CT":
                        ct.append(series)
                    else:
                        skipped[modality or "unknown"] += 1
            if skipped:
                self.skipped[pid] = dict(skipped)
            if not ct:
                continue
            for k, series in enumerate(ct, start=1):
                meta = {"study": series.parent.name, "series": series.name, "skipped_series": dict(skipped)}
                if pid in clinical:
                    meta["clinical"] = dict(clinical[pid])
                cases.append(Case(source=self.name, case_id=pid if len(ct) == 1 else f"{pid}_{k}", patient_id=pid,
                                  image=series, meta=meta))
        return cases
