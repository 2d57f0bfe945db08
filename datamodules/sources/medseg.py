"""MedSeg COVID-19 CT segmentation (medicalsegmentation.com/covid19; figshare 13521488 and 13521509).

Facts (reference/datasets.md, section 4; anything marked UNCONFIRMED there is treated as such here):

- figshare 13521488: `tr_im.nii.gz` / `tr_mask.nii.gz`, 512x512x100: one hundred UNRELATED axial slices
  from more than 40 patients, converted from JPG, so the intensities are not reliable HU; `val_im.nii.gz`:
  10 more slices without masks. The slice lung masks `tr_lungmasks_updated.nii.gz` are a separate
  download and optional here.
- figshare 13521509: `rp_im/1.nii.gz .. 9.nii.gz`, the same names in `rp_msk/` and `rp_lung_msk/`:
  nine 630x630xZ volumes (Radiopaedia). One patient per volume (UNCONFIRMED).
- Mask codes: 1 ground-glass opacity (GGO), 2 consolidation, 3 pleural effusion (the tr masks; for the rp
  masks AMID documents only 1/2, OLM also lists 3, so 3 is accepted there too).
- Whether `rp_lung_msk` separates left and right lung is UNCONFIRMED (OLM binarises it): any nonzero
  voxel is lung. It is NOT used as a training label; its path is kept in `Case.meta["lung_mask"]`.
- rp intensities: datasets.md says "JPG-derived, not HU" only of the 100-slice stack; the encoding of the
  rp volumes is UNCONFIRMED. They are treated as HU (`decoding()` says `hu`); check the first real
  download's value range (HU: about -1024..3071; 8-bit: 0..255).
- Possible overlap: the nine rp volumes may be the same Radiopaedia patients as the ten `radiopaedia_*`
  cases of COVID-19-CT-Seg (source `ctseg`; both 630x630; UNCONFIRMED). Nothing here assumes either way:
  the content fingerprints (`datamodules/fingerprint.py`, `find_duplicates`) catch such copies at run
  time (across encodings, orientations and resampling) and merge them into one patient for the splits.

Cases and the current limitation:

- `discover()` returns only the nine rp volumes (`rp_1 .. rp_9`): ordinary 3D cases for the 3D pipeline.
- The 100-slice stack is NOT a volume: its neighbouring slices come from different patients. Each slice is
  a 2D-only case `tr_000 .. tr_099` (and the unlabelled `val_000 .. val_009`) pointing at the stack file,
  with `meta = {"two_d": True, "stack": True, "slice": k, "intensity": "jpg-derived", ...}`. The harmonizer
  cannot read one slice of a file today, so these are NOT returned by `discover()` (they would be read as a
  3D scan); `slices()` returns them for a future 2D pipeline. Their `encoding` is `jpg-derived`, which
  `decode_intensity` refuses on purpose: the stored scale is not HU and must not silently pass as HU. The
  slice -> patient mapping is not published, so each slice is its own `patient_id`: a slice-level split may
  put two slices of one patient on both sides (UNCONFIRMED how many such pairs exist).
  `slices()` reads the stack headers (slice count), never voxels.

Label policies, both views of the opacities: the default `lesion` merges GGO (1) and consolidation (2)
into `lesion`, like every other COVID source; `ggo_consolidation` keeps them as the typed classes `ggo`
and `consolidation` (the split view; sources that only give `lesion` still train such a model, their
lesions merging GGO and consolidation in the loss). Pleural effusion (3) is never lesion (nor lung or
healthy tissue): "ignore" (out of loss and metrics) by default; `effusion_as_class` makes it the common
class `effusion`. `fine_labels()` gives the raw three-way split for analysis.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from datamodules.cases import Case
from datamodules.label_policy import LabelPolicy
from datamodules.sources.base import SourceAdapter, nifti_files, register_source, strip_nifti

log = logging.getLogger(__name__)

# Raw mask codes of both MedSeg sets (datasets.md s.4).
FINE_CODES = {1: "ggo", 2: "consolidation", 3: "pleural_effusion"}


def fine_labels(raw: np.ndarray) -> dict[str, np.ndarray]:
    """Raw MedSeg mask -> boolean map per fine class (`ggo`, `consolidation`, `pleural_effusion`)."""
    arr = np.rint(np.asarray(raw)).astype(np.int64, copy=False)
    return {name: arr == code for code, name in FINE_CODES.items()}


def _nifti(folder: Path, stem: str) -> Path | None:
    for ext in (".nii.gz", ".nii"):
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return None


def _number_key(case: Case) -> tuple:
    tail = case.case_id.split("_", 1)[1]
    return (0, int(tail), "") if tail.isdigit() else (1, 0, tail)


@register_source("medseg")
class MedSeg(SourceAdapter):
    DESCRIPTION = ("MedSeg COVID-19: 9 Radiopaedia CT volumes with GGO/consolidation(/effusion) masks and lung "
                   "masks; the 100-slice 2D stack (JPG-derived) is listed by slices(), not discover()")
    POLICIES = {
        "lesion": LabelPolicy(
            "medseg/lesion", {0: "background", 1: "lesion", 2: "lesion", 3: "ignore"}, ("lesion",),
            "1 GGO and 2 consolidation -> lesion; 3 pleural effusion ignored (never lesion); lungs not used"),
        "effusion_as_class": LabelPolicy(
            "medseg/effusion_as_class", {0: "background", 1: "lesion", 2: "lesion", 3: "effusion"},
            ("lesion", "effusion"), "1 GGO and 2 consolidation -> lesion; 3 pleural effusion as class `effusion`"),
        "ggo_consolidation": LabelPolicy(
            "medseg/ggo_consolidation", {0: "background", 1: "ggo", 2: "consolidation", 3: "ignore"},
            ("ggo", "consolidation"), "1 GGO and 2 consolidation as typed classes (split view); 3 effusion ignored"),
    }
    DEFAULT_POLICY = "lesion"
    STACK_RE = re.compile(r"^(tr|val)_\d+$")
    LUNG_MASK_DIR = "rp_lung_msk"

    @classmethod
    def decoding(cls, case_id: str) -> dict:
        if cls.STACK_RE.match(case_id):
            # Not HU and of unknown scale: an encoding no decoder accepts, so it can never pass as HU.
            return {"encoding": "jpg-derived", "window": None, "image_flips": ()}
        return {"encoding": "hu", "window": None, "image_flips": cls.declared_flips(case_id)}  # rp: HU assumed (UNCONFIRMED)

    def _layout(self) -> Path:
        return self.find_dir(lambda d: (d / "rp_im").is_dir() or _nifti(d, "tr_im") is not None,
                             "MedSeg folder with rp_im/ or tr_im.nii.gz")

    def discover(self) -> list[Case]:
        """The rp volumes (3D cases); a volume without its rp_msk is a problem and left out."""
        root = self._layout()
        if not (root / "rp_im").is_dir():
            log.warning("%s: %s has no rp_im/ (figshare 13521509): no 3D cases; the 2D stack is in slices()",
                        self.name, root)
            return []
        masks = {strip_nifti(p.name): p for p in nifti_files(root / "rp_msk")}
        lungs = {strip_nifti(p.name): p for p in nifti_files(root / self.LUNG_MASK_DIR)}
        cases = []
        for image in nifti_files(root / "rp_im"):
            stem = strip_nifti(image.name)
            mask = masks.pop(stem, None)
            if mask is None:
                # The figshare archive ships all nine masks: a missing one is a broken download.
                self.problem(image, f"rp_im volume has no rp_msk/{stem}.nii[.gz]; case left out")
                continue
            case_id = f"rp_{stem}"
            cases.append(Case(source=self.name, case_id=case_id, patient_id=case_id, image=image, label=mask,
                              policy=self.default_policy, **self.decoding(case_id),
                              meta={"subset": "rp", "origin": "radiopaedia", "lung_mask": lungs.get(stem),
                                    "two_d": False}))
        for stem, mask in sorted(masks.items()):
            self.problem(mask, f"rp_msk mask without an image rp_im/{stem}.nii[.gz]; mask ignored")
        return sorted(cases, key=_number_key)

    def slices(self) -> list[Case]:
        """The 2D-only cases of the slice stacks: labelled `tr_000..`, unlabelled `val_000..` (see module doc)."""
        root = self._layout()
        out: list[Case] = []
        tr_im = _nifti(root, "tr_im")
        if tr_im is not None:
            mask = _nifti(root, "tr_mask")
            n = self._depth(tr_im)
            if mask is None:
                self.problem(tr_im, "slice stack has no tr_mask.nii[.gz]; its slices left out")
            elif n is not None and self._shape(mask) != self._shape(tr_im):
                self.problem(mask, f"tr_mask shape {self._shape(mask)} differs from tr_im {self._shape(tr_im)}; "
                                   "its slices left out")
            elif n is not None:
                out += self._stack(tr_im, mask, "tr", n, _nifti(root, "tr_lungmasks_updated"))
        val_im = _nifti(root, "val_im")
        if val_im is not None and (n := self._depth(val_im)) is not None:
            out += self._stack(val_im, None, "val", n, None)
        return out

    def _stack(self, image: Path, label: Path | None, prefix: str, n: int, lung: Path | None) -> list[Case]:
        cases = []
        for k in range(n):
            case_id = f"{prefix}_{k:03d}"
            # Slice -> patient mapping unpublished: each slice stands for its own patient.
            cases.append(Case(source=self.name, case_id=case_id, patient_id=case_id, image=image, label=label,
                              policy=self.default_policy if label is not None else None, **self.decoding(case_id),
                              meta={"two_d": True, "stack": True, "slice": k, "intensity": "jpg-derived",
                                    "subset": prefix, "lung_mask": lung}))
        return cases

    @staticmethod
    def _shape(path: Path) -> tuple[int, ...] | None:
        try:
            return tuple(int(s) for s in nib.load(str(path)).shape)   # header only
        except Exception:   # unreadable header: reported by _depth
            return None

    def _depth(self, path: Path) -> int | None:
        shape = self._shape(path)
        if shape is None or len(shape) != 3:
            self.problem(path, f"slice stack header unreadable or not 3-D (shape {shape}); its slices left out")
            return None
        return shape[2]
