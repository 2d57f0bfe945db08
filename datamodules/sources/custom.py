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

A mask that does not exist leaves the case unlabelled; a mask matching no image is a problem. Every key is
checked when the YAML is read (the error names the file, the key and the source). The globs must stay
inside `DIR/<name>/` (no absolute path, no `..`, no match that is a symlink out of it), the images glob
must match at least one file, and no file may be both an image and a mask (`*.nii.gz` next to
`{case}_seg.nii.gz` masks would read every mask as an image). The
built-in example `experiments/configs/sources/l3net.yaml` writes down the L3-Net class scheme (Lensink
et al., seed 000, Table 1).
"""
from __future__ import annotations

import re
import string
from pathlib import Path

import yaml

from datamodules.cases import Case
from datamodules.label_policy import LabelError, LabelPolicy
from datamodules.sources.base import SOURCES, DataLayoutError, SourceAdapter, strip_nifti

REQUIRED = ("name", "images", "codes", "annotated")
ALLOWED = set(REQUIRED) | {"description", "masks", "case_id", "patient_id", "encoding", "window", "groups"}
DEFAULT_CASE_RE = r"^(?P<case>.+?)\.nii(\.gz)?$"
ENCODINGS = ("hu", "uint8_window")


class CustomSourceError(ValueError):
    """A custom source YAML that cannot describe a source; the message names the file and the key."""


class SpecError(ValueError):
    """One key's value is wrong (the message names the key): `load_spec` adds the file and the source."""


def bad(key: str, value, why: str) -> SpecError:
    return SpecError(f"{key}={value!r}: {why}")


def check_text(key: str, value, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise bad(key, value, "must be a " + ("string" if allow_empty else "non-empty string"))
    return value


def check_glob(key: str, value) -> str:
    """A glob relative to the source folder that cannot leave it: no absolute path, no `..`."""
    check_text(key, value)
    if Path(value).is_absolute() or value.startswith("~"):
        raise bad(key, value, "must be relative to the source folder DIR/<name>/, not an absolute path")
    if ".." in Path(value).parts:
        raise bad(key, value, "must stay inside the source folder (no `..`)")
    return value


def check_masks(value) -> str:
    """`{case}` must be the pattern's only field: without it every image would get the same mask."""
    check_glob("masks", value)
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
    except ValueError as exc:
        raise bad("masks", value, f"is not a pattern with a {{case}} field ({exc})") from None
    if fields != {"case"}:
        raise bad("masks", value, f"needs exactly the field {{case}} (the case id), found {sorted(fields) or 'none'}")
    return value


def check_regex(key: str, value, group: str) -> re.Pattern:
    check_text(key, value)
    try:
        rx = re.compile(value)
    except re.error as exc:
        raise bad(key, value, f"is not a valid regex ({exc})") from None
    if group not in rx.groupindex:
        raise bad(key, value, f"needs a named group (?P<{group}>...)")
    return rx


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def check_window(spec: dict) -> None:
    encoding = spec.get("encoding", "hu")
    if encoding not in ENCODINGS:
        raise bad("encoding", encoding, f"must be one of {list(ENCODINGS)}")
    window = spec.get("window")
    if encoding != "uint8_window":
        if window is not None:  # else silently ignored: the user meant an 8-bit export
            raise bad("window", window, "applies only with encoding: uint8_window")
        return
    if not isinstance(window, list) or len(window) != 2 or not all(is_number(w) for w in window):
        raise bad("window", window, "encoding uint8_window needs window: [low, high] in HU")
    if not window[0] < window[1]:
        raise bad("window", window, "the low end must be below the high end")


def check_codes(value) -> dict[int, str]:
    """raw code -> class name; YAML gives `-1:` as an int, a quoted "1" as a string: both are codes."""
    if not isinstance(value, dict) or not value:
        raise bad("codes", value, "must be a mapping raw code -> class, e.g. {0: background, 1: lesion}")
    codes = {}
    for code, cls in value.items():
        if isinstance(code, bool) or not (isinstance(code, int) or (isinstance(code, str) and re.fullmatch(r"-?\d+", code))):
            raise bad("codes", value, f"raw code {code!r} is not an integer")
        if not isinstance(cls, str):
            raise bad("codes", value, f"code {code} maps to {cls!r}, not to a class name")
        codes[int(code)] = cls
    return codes


def check_groups(value, codes: dict[int, str]) -> None:
    if not isinstance(value, dict) or not all(isinstance(v, list) for v in value.values()):
        raise bad("groups", value, "must be a mapping group name -> list of raw codes")
    for name, members in value.items():
        unknown = [c for c in members if isinstance(c, bool) or c not in codes]
        if unknown:
            raise bad("groups", value, f"group {name!r} lists codes {unknown} that codes does not declare")


def parse_spec(spec: dict) -> dict:
    """Every key checked (a `SpecError` names the key); returns the spec with its `policy`."""
    name = spec["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise bad("name", name, "must be lower-case letters, digits and _ (the folder DIR/<name>/)")
    check_text("description", spec.get("description", ""), allow_empty=True)
    check_glob("images", spec["images"])
    if "{" in spec["images"]:
        raise bad("images", spec["images"], "is a glob; {case} belongs in masks")
    if "masks" in spec:
        check_masks(spec["masks"])
    if "case_id" in spec:
        check_regex("case_id", spec["case_id"], "case")
    if "patient_id" in spec:
        check_regex("patient_id", spec["patient_id"], "patient")
    check_window(spec)
    codes = check_codes(spec["codes"])
    annotated = spec["annotated"]
    if not isinstance(annotated, list) or not all(isinstance(c, str) for c in annotated):
        raise bad("annotated", annotated, "must be a list of class names, e.g. [lesion]")
    if "groups" in spec:
        check_groups(spec["groups"], codes)
    try:
        policy = LabelPolicy(f"{name}/custom", codes, tuple(annotated), spec.get("description", ""))
    except LabelError as exc:
        raise SpecError(f"codes/annotated do not form a label policy: {exc}") from None
    return {**spec, "policy": policy}


def load_spec(path: str | Path) -> dict:
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CustomSourceError(f"{path}: unreadable custom source YAML ({exc})") from exc
    if not isinstance(spec, dict):
        raise CustomSourceError(f"{path}: expected a mapping at the top level")
    missing = [k for k in REQUIRED if k not in spec]
    unknown = sorted(set(map(str, spec)) - ALLOWED)
    if missing or unknown:
        raise CustomSourceError(f"{path}: missing keys {missing}, unknown keys {unknown} (allowed: {sorted(ALLOWED)})")
    try:
        spec = parse_spec(spec)
    except SpecError as exc:
        named = isinstance(spec["name"], str) and re.fullmatch(r"[a-z][a-z0-9_]*", spec["name"])
        raise CustomSourceError(f"{path}: {exc}" + (f" (custom source {spec['name']!r})" if named else "")) from None
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

    def where(self, key: str) -> str:
        return f"{self.name} ({self.SPEC_PATH}): {key} {self.SPEC[key]!r}"

    def files(self, key: str, pattern: str) -> list[Path]:
        """Files matching `pattern` under the source folder, hidden ones skipped. A match whose real path
        lies outside the folder (a symlink out of it) is an error: the YAML describes this folder, and
        `..` or absolute globs were refused when it was read."""
        root = self.root.resolve()
        out = []
        for path in sorted(self.root.glob(pattern)):
            if not path.is_file() or path.name.startswith("."):
                continue
            if not path.resolve().is_relative_to(root):
                raise DataLayoutError(f"{self.where(key)}: {path} resolves to {path.resolve()}, outside the source "
                                      f"folder {self.root} (link or copy the whole folder instead)")
            out.append(path)
        return out

    def discover(self) -> list[Case]:
        spec = self.SPEC
        images = self.files("images", spec["images"])
        if not images:
            raise DataLayoutError(f"{self.where('images')}: no image matches under {self.root}")
        mask_files = self.files("masks", spec["masks"].replace("{case}", "*")) if spec.get("masks") else []
        image_set = {p.resolve() for p in images}
        overlap = [m for m in mask_files if m.resolve() in image_set]
        if overlap:  # a mask read as an image would train on labels as intensities
            raise DataLayoutError(f"{self.where('images')} also matches {len(overlap)} file(s) of masks "
                                  f"{spec['masks']!r}, e.g. {overlap[0]}: narrow the images glob (a folder or a name "
                                  "pattern the masks do not match)")
        case_re = re.compile(spec.get("case_id", DEFAULT_CASE_RE))
        patient_re = re.compile(spec["patient_id"]) if spec.get("patient_id") else None
        window = tuple(float(w) for w in spec["window"]) if spec.get("window") else None
        cases, used_masks, seen = [], set(), {}
        for image in images:
            m = case_re.search(image.name)
            if not m:
                self.problem(image, f"file name does not match case_id regex {case_re.pattern!r}; left out")
                continue
            case_id = m.group("case")
            if case_id in seen:
                self.problem(image, f"case id {case_id!r} again (also {seen[case_id]}); left out")
                continue
            seen[case_id] = image
            pm = patient_re.search(case_id) if patient_re else None
            label = None
            if spec.get("masks"):
                candidate = self.root / spec["masks"].format(case=case_id)
                if candidate.is_file():
                    if not candidate.resolve().is_relative_to(self.root.resolve()) or candidate.resolve() in image_set:
                        raise DataLayoutError(f"{self.where('masks')}: the mask of case {case_id!r} is {candidate} "
                                              f"({candidate.resolve()}), outside the source folder or an image")
                    label = candidate
                    used_masks.add(candidate.resolve())
            cases.append(Case(source=self.name, case_id=case_id, patient_id=pm.group("patient") if pm else case_id,
                              image=image, label=label, policy="custom" if label else None,
                              encoding=spec.get("encoding", "hu"), window=window, meta={"custom_spec": spec["path"]}))
        for mask in mask_files:
            if mask.resolve() not in used_masks:
                self.problem(mask, f"mask matches no image ({spec['images']!r}, case id {strip_nifti(mask.name)!r})")
        return cases
