"""Bad sources: custom-source YAML a user writes, globs that match the wrong files, and the CSV tables of
a download (MosMed's registry, NBIA's metadata.csv, COVID-19-AR's clinical table) damaged or re-saved.

Discovery never reads voxels, so the image and mask files here are empty placeholders. Cases go through
what a run does: `register_custom_source` (data.custom_sources) and `discover_sources` (the data module,
data.on_error=fail), which turns an adapter's per-file problems into one error.
"""
from __future__ import annotations

import os
from pathlib import Path

from tests.badinputs import ACCEPTED, bad_input

GOOD_SPEC = {
    "name": "mine",
    "images": "'images/*.nii.gz'",
    "masks": "'masks/{case}_mask.nii.gz'",
    "codes": "{0: background, 1: lesion}",
    "annotated": "[lesion]",
}


def _spec(tmp: Path, **changes) -> Path:
    """A custom-source YAML: GOOD_SPEC with `changes` (YAML text per key; None drops the key)."""
    keys = {**GOOD_SPEC, **changes}
    path = tmp / "mine.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in keys.items() if v is not None), encoding="utf-8")
    return path


def _touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def _discover(tmp: Path, spec: Path):
    """Register the YAML as a run does and discover its folder `tmp/data/mine` (on_error=fail)."""
    from datamodules.datamodule import discover_sources
    from datamodules.sources import SOURCES
    from datamodules.sources.custom import register_custom_source

    SOURCES.pop("mine", None)
    try:
        register_custom_source(spec)
        return discover_sources(tmp / "data", ["mine"], on_error="fail")[0]
    finally:
        SOURCES.pop("mine", None)  # the registry is global: leave it as other cases expect it


def _tree(tmp: Path, *names: str) -> Path:
    root = tmp / "data" / "mine"
    _touch(root, *(names or ("images/a.nii.gz", "masks/a_mask.nii.gz")))
    return root


# --- custom-source YAML keys -------------------------------------------------------------------------

SPEC_ROWS = [
    # (case name, changed keys, regex, key or text the message must name)
    ("images_a_list", {"images": "[a.nii.gz, b.nii.gz]"}, r"must be a non-empty string", "images="),
    ("masks_without_case_field", {"masks": "'masks/mask.nii.gz'"}, r"needs exactly the field \{case\}", "masks="),
    ("masks_unclosed_brace", {"masks": "'masks/{case_mask.nii.gz'"}, r"not a pattern with a \{case\} field", "masks="),
    ("case_id_a_number", {"case_id": "5"}, r"must be a non-empty string", "case_id="),
    ("patient_id_a_list", {"patient_id": "['^(?P<patient>.+)$']"}, r"must be a non-empty string", "patient_id="),
    ("annotated_a_number", {"annotated": "5"}, r"must be a list of class names", "annotated="),
    ("window_reversed", {"encoding": "uint8_window", "window": "[300, -1000]"}, r"low end must be below", "window="),
    ("window_without_uint8", {"window": "[-1000, 300]"}, r"applies only with encoding: uint8_window", "window="),
    ("codes_a_list", {"codes": "[background, lesion]"}, r"must be a mapping raw code -> class", "codes="),
    ("code_not_an_integer", {"codes": "{0: background, one: lesion}"}, r"raw code 'one' is not an integer", "codes="),
    ("groups_code_undeclared", {"groups": "{opacity: [1, 7]}"}, r"lists codes \[7\] that codes does not declare",
     "groups="),
    ("unknown_key", {"policy": "custom"}, r"unknown keys \['policy'\]", "policy"),
    ("missing_key", {"annotated": None}, r"missing keys \['annotated'\]", "annotated"),
]


def _register_spec_case(name: str, changes: dict, match: str, named: str) -> None:
    def run(tmp):
        from datamodules.sources.custom import load_spec

        return load_spec(_spec(tmp, **changes))

    run.__name__ = f"spec_{name}"  # not case_*: the registry strips that prefix (case_id_... would lose it)
    bad_input("source", match=match, names=("{tmp}/mine.yaml", named))(run)


for _row in SPEC_ROWS:
    _register_spec_case(*_row)


@bad_input("source", match=r"unreadable custom source YAML", names=("{tmp}/mine.yaml",))
def case_spec_invalid_utf8(tmp):
    from datamodules.sources.custom import load_spec

    (tmp / "mine.yaml").write_bytes("name: mine\ndescription: 'Zürich'\n".encode("latin-1"))
    load_spec(tmp / "mine.yaml")


@bad_input("source", match=r"unreadable custom source YAML .*could not determine a constructor",
           names=("{tmp}/mine.yaml",))
def case_spec_python_tag_never_runs(tmp):
    """YAML stays safe-loaded: a python/object tag is refused, and its payload never runs."""
    from datamodules.sources.custom import load_spec

    marker = tmp / "ran"
    path = _spec(tmp, description=f"!!python/object/apply:os.system ['touch {marker}']")
    try:
        load_spec(path)
    finally:
        assert not marker.exists(), "the YAML tag ran code"


# --- globs ----------------------------------------------------------------------------------------------

@bad_input("source", match=r"images 'imgs/\*\.nii\.gz': no image matches under", names=("{tmp}/data/mine",))
def case_glob_matches_nothing(tmp):
    _tree(tmp)
    _discover(tmp, _spec(tmp, images="'imgs/*.nii.gz'"))


@bad_input("source", match=r"must stay inside the source folder \(no `\.\.`\)", names=("images=", "{tmp}/mine.yaml"))
def case_glob_climbs_out(tmp):
    _tree(tmp)
    _touch(tmp / "data", "elsewhere.nii.gz")
    _discover(tmp, _spec(tmp, images="'../*.nii.gz'"))


@bad_input("source", match=r"must be relative to the source folder", names=("images=",))
def case_glob_absolute(tmp):
    _tree(tmp)
    _discover(tmp, _spec(tmp, images=f"'{tmp}/data/mine/images/*.nii.gz'"))


@bad_input("source", match=r"resolves to .*outside the source folder", names=("{tmp}/data/mine/images/b.nii.gz",))
def case_image_symlink_out_of_the_folder(tmp):
    root = _tree(tmp)
    _touch(tmp, "private/other.nii.gz")
    os.symlink(tmp / "private" / "other.nii.gz", root / "images" / "b.nii.gz")
    _discover(tmp, _spec(tmp))


@bad_input("source", match=r"masks 'masks/\{case\}_mask\.nii\.gz': .* resolves to .*outside the source folder",
           names=("{tmp}/data/mine/masks/a_mask.nii.gz",))
def case_mask_symlink_out_of_the_folder(tmp):
    root = _tree(tmp, "images/a.nii.gz")
    _touch(tmp, "private/a_mask.nii.gz")
    (root / "masks").mkdir()
    os.symlink(tmp / "private" / "a_mask.nii.gz", root / "masks" / "a_mask.nii.gz")
    _discover(tmp, _spec(tmp))


@bad_input("source", match=r"images '\*\.nii\.gz' also matches 1 file\(s\) of masks", names=("{tmp}/data/mine/a_seg.nii.gz",))
def case_images_glob_matches_masks(tmp):
    _tree(tmp, "a.nii.gz", "a_seg.nii.gz")
    _discover(tmp, _spec(tmp, images="'*.nii.gz'", masks="'{case}_seg.nii.gz'"))


@bad_input("source", match=r"(?s)1 problem\(s\) .*case id 'a' again", names=("{tmp}/data/mine/images/x/a.nii",))
def case_two_images_one_case_id(tmp):
    _tree(tmp, "images/a.nii.gz", "images/x/a.nii", "masks/a_mask.nii.gz")
    _discover(tmp, _spec(tmp, images="'images/**/*.nii*'"))


@bad_input("source", match=ACCEPTED)
def case_custom_tree_accepted(tmp):
    _tree(tmp, "images/P1_day1.nii.gz", "images/P1_day7.nii.gz", "masks/P1_day1_mask.nii.gz")
    cases = _discover(tmp, _spec(tmp, patient_id="'^(?P<patient>[^_]+)'"))
    assert [(c.case_id, c.patient_id, c.labelled) for c in cases] == [("P1_day1", "P1", True), ("P1_day7", "P1", False)]


# --- CSV tables of official downloads ------------------------------------------------------------------

REGISTRY_HEADER = "study_id,category,study_file,mask_file\r\n"


def _mosmed(tmp: Path, registry: bytes | None) -> list:
    """A MosMed tree (one labelled study) with `registry` as its dataset_registry.csv."""
    from datamodules.datamodule import discover_sources

    root = tmp / "data" / "mosmed" / "COVID19_1110"
    _touch(root, "studies/CT-1/study_0255.nii.gz", "masks/study_0255_mask.nii.gz")
    if registry is not None:
        (root / "dataset_registry.csv").write_bytes(registry)
    return discover_sources(tmp / "data", ["mosmed"], on_error="fail")[0]


ROW = "study_0255,CT-1,/studies/CT-1/study_0255.nii.gz,/masks/study_0255_mask.nii.gz\r\n"
REGISTRY = "{tmp}/data/mosmed/COVID19_1110/dataset_registry.csv"


@bad_input("source", match=r"line 3: short row, 2 field\(s\) where the header has 4", names=(REGISTRY,))
def case_registry_short_row(tmp):
    _mosmed(tmp, ("\ufeff" + REGISTRY_HEADER + ROW + "study_0256,CT-1\r\n").encode("utf-8"))


@bad_input("source", match=r"line 2: invalid UTF-8 at byte offset \d+", names=(REGISTRY,))
def case_registry_invalid_utf8(tmp):
    _mosmed(tmp, REGISTRY_HEADER.encode() + "study_0255,CT-1,/studies/CT-1/étude.nii.gz,\r\n".encode("latin-1"))


@bad_input("source", match=r"empty file, expected a header row", names=(REGISTRY,))
def case_registry_empty(tmp):
    _mosmed(tmp, b"")


@bad_input("source", match=r"line 1: missing column\(s\) \['mask_file'\]", names=(REGISTRY,))
def case_registry_missing_column(tmp):
    _mosmed(tmp, b"study_id,category,study_file\r\nstudy_0255,CT-1,/studies/CT-1/study_0255.nii.gz\r\n")


@bad_input("source", match=r"dataset_registry\.csv lists mask masks/study_0256_mask\.nii\.gz, which is missing",
           names=("study_0256.nii.gz",))
def case_registry_lists_a_missing_mask(tmp):
    _touch(tmp / "data" / "mosmed" / "COVID19_1110", "studies/CT-1/study_0256.nii.gz")
    _mosmed(tmp, (REGISTRY_HEADER + ROW + "study_0256,CT-1,/studies/CT-1/study_0256.nii.gz,"
                  "/masks/study_0256_mask.nii.gz\r\n").encode())


@bad_input("source", match=r"mask without a study study_0999", names=("study_0999_mask.nii.gz",))
def case_mosmed_extra_mask_file(tmp):
    _touch(tmp / "data" / "mosmed" / "COVID19_1110", "masks/study_0999_mask.nii.gz")
    _mosmed(tmp, None)


@bad_input("source", match=ACCEPTED)
def case_registry_as_shipped_accepted(tmp):
    """UTF-8 with BOM, CRLF, leading slashes, an empty mask_file, a trailing separator and a blank line."""
    cases = _mosmed(tmp, ("\ufeff" + REGISTRY_HEADER + ROW + "study_0001,CT-0,/studies/CT-0/study_0001.nii.gz,,\r\n"
                          "\r\n").encode("utf-8"))
    assert [(c.case_id, c.labelled, c.meta["category"]) for c in cases] == [("study_0255", True, "CT-1")]


@bad_input("source", match=r"line 3: short row", names=("{tmp}/data/nsclc/manifest-1/metadata.csv",))
def case_nbia_metadata_short_row(tmp):
    from datamodules.sources import get_source

    manifest = tmp / "data" / "nsclc" / "manifest-1"
    (manifest / "NSCLC-Radiomics" / "LUNG1-001").mkdir(parents=True)
    (manifest / "metadata.csv").write_text("Series UID,Modality,File Location\n1.2.3,CT,./NSCLC-Radiomics/LUNG1-001/s/1\n"
                                           "1.2.4,CT\n", encoding="utf-8")
    get_source("nsclc")(tmp / "data" / "nsclc").discover()


@bad_input("source", match=r"line 1: missing column\(s\) \['patient_id'\]",
           names=("{tmp}/data/covid19_ar/manifest-1/covid19_ar_clinical.csv",))
def case_clinical_table_without_patient_id(tmp):
    from datamodules.sources import get_source

    manifest = tmp / "data" / "covid19_ar" / "manifest-1"
    (manifest / "COVID-19-AR" / "COVID-19-AR-16406504").mkdir(parents=True)
    (manifest / "covid19_ar_clinical.csv").write_text("PATIENT,AGE\nCOVID-19-AR-16406504,60\n", encoding="utf-8")
    get_source("covid19_ar")(tmp / "data" / "covid19_ar").discover()
