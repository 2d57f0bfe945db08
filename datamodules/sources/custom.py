"""Custom sources from YAML: a private dataset joins without code.

    data.custom_sources=[path/to/my_source.yaml]        (training, LOSO, transfer)
    python -m datamodules.verify --root DIR --custom path/to/my_source.yaml

The YAML names the source, where its files are (globs relative to `DIR/<name>/`), how case and patient
ids are read from file names, the intensity encoding and the label policy:

    name: l3net                        # the folder DIR/l3net/ and the source name in configs
    description: ...
    images: "images/*.nii.gz"          # glob for the images
    masks: "masks/{case}_mask.nii.gz"  # where a case's mask is ({case} = case id); omit for image-only
    case_id: "^(?P<case>.+?)\\.nii(\\.gz)?$"   # regex on the image file name with a group `case`
    patient_id: "^(?P<patient>[^_]+)"  # optional regex on the case id with a group `patient`
    encoding: hu                       # or uint8_window with `window: [lo, hi]`
    codes: {-1: ignore, 0: background, 1: lung_left, ...}   # raw code -> common class or "ignore"
    annotated: [lung_left, lung_right, lesion]

A mask that does not exist leaves the case unlabelled; a mask matching no image is a problem. The
built-in example `experiments/configs/sources/l3net.yaml` writes down the L3-Net class scheme (Lensink
et al., seed 000, Table 1).
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from datamodules.cases import Case
from datamodules.label_policy import LabelPolicy
from datamodules.sources.base import SOURCES, DataLayoutError, SourceAdapter, strip_nifti

REQUIRED = ("name", "images", "codes", "annotated")
ALLOWED = set(REQUIRED) | {"description", "masks", "case_id", "patient_id", "encoding", "window", "groups"}
DEFAULT_CASE_RE = r"^(?P<case>.+?)\.nii(\.gz)?$"


class CustomSourceError(ValueError):
    """A custom source YAML that cannot describe a source; the message names the file and the key."""


def load_spec(path: str | Path) -> dict:
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise CustomSourceError(f"{path}: unreadable custom source YAML ({exc})") from exc
    if not isinstance(spec, dict):
        raise CustomSourceError(f"{path}: expected a mapping at the top level")
    missing = [k for k in REQUIRED if k not in spec]
    unknown = sorted(set(spec) - ALLOWED)
    if missing or unknown:
        raise CustomSourceError(f"{path}: missing keys {missing}, unknown keys {unknown} (allowed: {sorted(ALLOWED)})")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", str(spec["name"])):
        raise CustomSourceError(f"{path}: name {spec['name']!r} must be lower-case letters, digits and _")
    for key in ("case_id", "patient_id"):
        if key in spec:
            try:
                rx = re.compile(spec[key])
            except re.error as exc:
                raise CustomSourceError(f"{path}: {key} is not a valid regex ({exc})") from exc
            group = "case" if key == "case_id" else "patient"
            if group not in rx.groupindex:
                raise CustomSourceError(f"{path}: {key} regex needs a named group (?P<{group}>...)")
    if spec.get("encoding", "hu") not in ("hu", "uint8_window"):
        raise CustomSourceError(f"{path}: encoding must be hu or uint8_window")
    if spec.get("encoding") == "uint8_window" and len(spec.get("window") or ()) != 2:
        raise CustomSourceError(f"{path}: uint8_window needs window: [low, high] in HU")
    try:
        codes = {int(k): str(v) for k, v in spec["codes"].items()}
        spec["policy"] = LabelPolicy(f"{spec['name']}/custom", codes, tuple(spec["annotated"]),
                                     spec.get("description", ""))
    except (ValueError, AttributeError) as exc:
        raise CustomSourceError(f"{path}: codes/annotated do not form a label policy: {exc}") from exc
    spec["path"] = str(path)
    return spec


def register_custom_source(path: str | Path) -> type[SourceAdapter]:
    """Build an adapter class from the YAML and register it under its name (re-registering the same
    file is a no-op; a name taken by another source is an error)."""
    spec = load_spec(path)
    name = spec["name"]
    existing = SOURCES.get(name)
    if existing is not None:
        if getattr(existing, "SPEC_PATH", None) == spec["path"]:
            return existing
        raise CustomSourceError(f"{path}: source name {name!r} is already registered ({existing.__name__})")
    cls = type(f"Custom_{name}", (CustomSource,), {
        "name": name, "DESCRIPTION": spec.get("description", f"custom source from {path}"),
        "POLICIES": {"custom": spec["policy"]}, "DEFAULT_POLICY": "custom", "SPEC": spec, "SPEC_PATH": spec["path"]})
    return SOURCES.register(name)(cls)


class CustomSource(SourceAdapter):
    SPEC: dict = {}
    SPEC_PATH: str | None = None

    def discover(self) -> list[Case]:
        spec = self.SPEC
        images = sorted(p for p in self.root.glob(spec["images"]) if p.is_file() and not p.name.startswith("."))
        if not images:
            raise DataLayoutError(f"{self.name}: no image matches {spec['images']!r} under {self.root}")
        case_re = re.compile(spec.get("case_id", DEFAULT_CASE_RE))
        patient_re = re.compile(spec["patient_id"]) if spec.get("patient_id") else None
        window = tuple(float(w) for w in spec["window"]) if spec.get("window") else None
        cases, used_masks = [], set()
        for image in images:
            m = case_re.search(image.name)
            if not m:
                self.problem(image, f"file name does not match case_id regex {case_re.pattern!r}; left out")
                continue
            case_id = m.group("case")
            pm = patient_re.search(case_id) if patient_re else None
            label = None
            if spec.get("masks"):
                candidate = self.root / spec["masks"].format(case=case_id)
                if candidate.is_file():
                    label = candidate
                    used_masks.add(candidate.resolve())
            cases.append(Case(source=self.name, case_id=case_id, patient_id=pm.group("patient") if pm else case_id,
                              image=image, label=label, policy="custom" if label else None,
                              encoding=spec.get("encoding", "hu"), window=window, meta={"custom_spec": spec["path"]}))
        if spec.get("masks"):
            pattern = spec["masks"].replace("{case}", "*")
            for mask in sorted(self.root.glob(pattern)):
                if mask.is_file() and mask.resolve() not in used_masks and not mask.name.startswith("."):
                    self.problem(mask, f"mask matches no image ({spec['images']!r}, case id {strip_nifti(mask.name)!r})")
        return cases
