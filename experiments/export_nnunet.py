"""Hand a run's split to nnU-Net v2: write `DatasetXXX_<name>/` in nnU-Net's raw format.

    python -m experiments.export_nnunet RUN_OR_PLAN --out DIR --id 501 [--name NAME] [--classes lesion,...]
        [--preprocessed DIR] [--test-labels] [--overwrite]

Writes `DIR/Dataset501_<name>/`:
- `imagesTr/<case>_0000.nii.gz`, `labelsTr/<case>.nii.gz`: the plan's training cases (roles train + val);
- `imagesTs/<case>_0000.nii.gz`: its test cases (with `--test-labels` also `labelsTs/<case>.nii.gz`, the
  references in nnU-Net's label values for `nnUNetv2_evaluate_folder`);
- `dataset.json` (`channel_names` {"0": "CT"}, `labels`, `numTraining`, `file_ending` ".nii.gz", plus a
  `covid_dg` block: the label and case mapping `import_nnunet` reads back from nnU-Net's prediction folder);
- `splits_final.json`: one fold, `train` = the plan's training cases, `val` = its validation cases (every
  case of its validation patients). nnU-Net's planner copies it from the raw folder into
  `$nnUNet_preprocessed/Dataset501_<name>/`; `--preprocessed DIR` also writes it there directly;
- `covid_dg.json`: the mapping, the plan's hash and the share of voxels exported as ignore, per source.

Case identifiers are `<source>_<case_id>`, made file-name safe and unique. Images are HU on each case's
stored grid with its stored affine (8-bit windowed sources decoded as the harmonizer decodes them); an
image the harmonizer mirrors onto its masks (`image_flips`) is mirrored the same way, so image and mask agree.

Labels: background 0, then the exported classes in our class order, consecutive; `ignore` is the highest
value, declared when a training case can have unknown voxels. A class a case's source does not annotate
is unknown where it could be: inside the annotated lungs for an opacity class (lesions lie in the lungs),
in the case's background otherwise; those voxels, and the voxels a source policy ignores (254), become
`ignore`, so nnU-Net trains with partial labels as our loss does.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np

from datamodules.alignment import flip_indices
from datamodules.harmonize import load_original
from datamodules.label_policy import CLASS_INDEX, CLASSES, CONTAINERS, IGNORE, IGNORE_NAME, PARENT
from datamodules.sources import policy_named
from experiments.plan import PLAN_FILE, PlanError, case_from_record, plan_hash, read_plan
from experiments.tracking import write_json
from rundir.cli import command_name, run_cli

EXPORT_VERSION = 1
MAPPING_FILE = "covid_dg.json"
FILE_ENDING = ".nii.gz"
NAME_RE = re.compile(r"[^A-Za-z0-9_-]+")


class ExportError(ValueError):
    """A plan or request the export cannot honour: names what and why."""


def safe_name(text: str) -> str:
    return NAME_RE.sub("_", text).strip("_") or "case"


def case_identifiers(keys: list[str], plan: dict) -> dict[str, str]:
    """plan key -> nnU-Net case identifier `<source>_<case_id>`, file-name safe; a clash gets a short hash."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for key in keys:
        rec = plan["cases"][key]
        ident = safe_name(f"{rec['source']}_{rec['case_id']}")
        if ident in used:
            ident = f"{ident}_{hashlib.sha256(key.encode()).hexdigest()[:6]}"
        used.add(ident)
        out[key] = ident
    return out


def training_keys(plan: dict) -> list[str]:
    return list(plan["roles"]["train"]) + list(plan["roles"]["val"])


def export_classes(plan: dict, requested: list[str] | None) -> list[str]:
    """The classes nnU-Net learns, in our class order. Default: those any training case annotates, typed
    opacities (GGO, consolidation) merged into lesion. Requested typed classes need every training case to
    type them; any requested class needs a training case that annotates it."""
    cases = [plan["cases"][k] for k in training_keys(plan)]
    annotated_any = {c for rec in cases for c in rec.get("annotated") or () if c != "background"}
    if requested is None:
        chosen = [c for c in CLASSES if c in annotated_any and c not in PARENT]
        if not chosen:
            raise ExportError("no training case of the plan annotates any class")
        return chosen
    unknown = [c for c in requested if c not in CLASS_INDEX or c == "background"]
    if unknown:
        raise ExportError(f"--classes {unknown}: not foreground classes; known: {list(CLASSES[1:])}")
    for c in requested:
        if c not in annotated_any:
            raise ExportError(f"--classes {c}: no training case of the plan annotates it")
        untyped = sorted({rec["source"] for rec in cases if c not in (rec.get("annotated") or ())})
        if c in PARENT and untyped:
            raise ExportError(f"--classes {c}: training source(s) {untyped} do not type opacities as {c}; keep "
                              f"typed classes only when every training source types them (default: merged into "
                              f"{PARENT[c]})")
    return [c for c in CLASSES if c in requested]


def label_table(classes: list[str]) -> tuple[dict[str, int], np.ndarray]:
    """nnU-Net label names -> values (background 0, classes 1..n), and a lookup common value -> nnU-Net
    value (a typed opacity maps to its exported parent; a class not exported is background; 255 = none)."""
    labels = {"background": 0, **{c: i + 1 for i, c in enumerate(classes)}}
    lut = np.full(256, 255, np.uint8)
    for v, name in enumerate(CLASSES):
        target = name if name in labels else PARENT.get(name) if PARENT.get(name) in labels else "background"
        lut[v] = labels[target]
    return labels, lut


def policy_ignores(rec: dict) -> bool:
    """Whether the case's label policy maps some raw code to ignore (its masks may hold IGNORE voxels)."""
    name = rec.get("label_policy")
    return bool(name) and IGNORE_NAME in policy_named(name).code_map.values()


def missing_classes(rec: dict, classes: list[str]) -> list[str]:
    annotated = set(rec.get("annotated") or ())
    return [c for c in classes if c not in annotated]


def training_labels(common: np.ndarray, rec: dict, classes: list[str], lut: np.ndarray, ignore: int | None) -> np.ndarray:
    """A training case's mask in nnU-Net values: every unknown voxel is `ignore` (module docstring)."""
    out = nnunet_values(common, lut, ignore, rec)
    unknown = common == IGNORE
    annotated = set(rec.get("annotated") or ())
    for m in missing_classes(rec, classes):
        inside = CONTAINERS.get(m, ())
        if inside and all(c in annotated for c in inside):
            unknown |= np.isin(common, [CLASS_INDEX[c] for c in inside])
        else:
            unknown |= out == 0
    if unknown.any():
        if ignore is None:
            raise ExportError(f"{rec['source']}/{rec['case_id']}: unknown voxels but no ignore label declared")
        out[unknown] = ignore
    return out


def nnunet_values(common: np.ndarray, lut: np.ndarray, ignore: int | None, rec: dict) -> np.ndarray:
    """Common label values -> nnU-Net values; IGNORE voxels -> `ignore` (background when none is declared)."""
    full = lut.copy()
    full[IGNORE] = ignore if ignore is not None else 0
    out = full[common]
    if (out == 255).any():
        bad = sorted(int(v) for v in np.unique(common[out == 255]))
        raise ExportError(f"{rec['source']}/{rec['case_id']}: label values {bad} have no nnU-Net label")
    return out


def mirror_image(hu: np.ndarray, affine: np.ndarray, flips) -> np.ndarray:
    """The stored image mirrored as the harmonizer mirrors it onto its masks: `flips` name canonical (RAS)
    axes; mirroring along canonical axis k is mirroring along the stored axis that runs along k."""
    ornt = nib.orientations.io_orientation(affine)
    for k in flip_indices(flips):
        stored_axis = int(np.flatnonzero(ornt[:, 0] == k)[0])
        hu = np.flip(hu, axis=stored_axis)
    return np.ascontiguousarray(hu)


def image_array(hu: np.ndarray) -> np.ndarray:
    """HU as int16 when every value is a whole number in range (HU sources), float32 otherwise (decoded 8-bit)."""
    if hu.size and np.all(hu == np.rint(hu)) and hu.min() >= -32768 and hu.max() <= 32767:
        return hu.astype(np.int16)
    return hu.astype(np.float32)


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def splits_of(plan: dict, ids: dict[str, str]) -> list[dict]:
    """One fold: train = the plan's training cases, val = every case of its validation patients."""
    val = list(plan["roles"]["val"])
    if not val:
        raise ExportError("the plan has no validation cases: nnU-Net validates fold 0 on them (a run with "
                          "data.val_fraction > 0 plans some)")
    train_set = set(training_keys(plan))
    for patient in {f"{plan['cases'][k]['source']}/{plan['cases'][k]['patient_id']}" for k in val}:
        outside = [k for k in plan.get("patients", {}).get(patient, []) if k in train_set and k not in val]
        if outside:
            raise ExportError(f"validation patient {patient} also has training case(s) {outside}")
    return [{"train": [ids[k] for k in plan["roles"]["train"]], "val": [ids[k] for k in val]}]


def fingerprint(record: dict) -> str:
    core = {k: record[k] for k in ("version", "dataset", "plan_hash", "classes", "labels", "ignore", "cases",
                                   "test_labels")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def existing_datasets(out: Path, dataset_id: int) -> list[Path]:
    return sorted(p for p in out.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir())


def export(plan_path: Path, out: Path, dataset_id: int, name: str | None = None, classes: list[str] | None = None,
           preprocessed: Path | None = None, test_labels: bool = False, overwrite: bool = False,
           say=print) -> Path:
    """Write the dataset folder (module docstring) and return it."""
    if not 1 <= dataset_id <= 999:
        raise ExportError(f"--id {dataset_id}: nnU-Net dataset ids are 1..999")
    plan = read_plan(plan_path)
    plan_file = plan_path / PLAN_FILE if plan_path.is_dir() else plan_path
    name = safe_name(name or plan.get("name") or "covid_dg")
    dataset = f"Dataset{dataset_id:03d}_{name}"
    train_keys, test_keys = training_keys(plan), list(plan["roles"]["test"])
    missing_label = [k for k in train_keys if not plan["cases"][k].get("label")]
    if missing_label:
        raise ExportError(f"training case(s) without a mask: {missing_label[:5]}")
    chosen = export_classes(plan, classes)
    labels, lut = label_table(chosen)
    ignore_cases = [k for k in train_keys if missing_classes(plan["cases"][k], chosen) or policy_ignores(plan["cases"][k])]
    if test_labels:
        ignore_cases += [k for k in test_keys if policy_ignores(plan["cases"][k])]
    ignore = len(chosen) + 1 if ignore_cases else None
    if ignore is not None:
        labels[IGNORE_NAME] = ignore
    ids = case_identifiers(train_keys + test_keys, plan)
    splits = splits_of(plan, ids)
    record = {
        "version": EXPORT_VERSION, "dataset": dataset, "plan": str(plan_file.resolve()), "plan_hash": plan_hash(plan),
        "plan_kind": plan["kind"], "plan_name": plan.get("name"), "classes": chosen,
        "labels": {str(v): (CLASS_INDEX[n] if n != "background" else 0) for n, v in labels.items() if n != IGNORE_NAME},
        "ignore": ignore, "cases": {ids[k]: k for k in train_keys + test_keys},
        "train": [ids[k] for k in plan["roles"]["train"]], "val": [ids[k] for k in plan["roles"]["val"]],
        "test": [ids[k] for k in test_keys], "test_labels": test_labels,
    }
    record["fingerprint"] = fingerprint(record)
    out.mkdir(parents=True, exist_ok=True)
    target = out / dataset
    for other in existing_datasets(out, dataset_id):
        mapping = other / MAPPING_FILE
        same = mapping.is_file() and json.loads(mapping.read_text(encoding="utf-8")).get("fingerprint") == record["fingerprint"]
        if same and other == target:
            say(f"{target}: already exported from this plan (fingerprint {record['fingerprint']}); nothing written")
            _write_preprocessed_splits(preprocessed, dataset, splits, overwrite, say)
            return target
        if not overwrite:
            raise ExportError(f"{other} exists and holds another dataset (nnU-Net finds datasets by id, so two "
                              f"Dataset{dataset_id:03d}_* folders clash); pass --overwrite to replace it or choose "
                              "another --id")
        if not mapping.is_file():
            raise ExportError(f"{other} was not written by export_nnunet (no {MAPPING_FILE}); refusing to delete it")
    tmp = out / f".{dataset}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("imagesTr", "labelsTr", "imagesTs") + (("labelsTs",) if test_labels else ()):
        (tmp / sub).mkdir(parents=True)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    try:
        for key in train_keys + test_keys:
            rec = plan["cases"][key]
            case = case_from_record(rec)
            policy = policy_named(rec["label_policy"]) if rec.get("label_policy") else None
            hu, common, affine = load_original(case, policy)
            hu = mirror_image(hu, affine, rec.get("image_flips") or ())
            ident = ids[key]
            train = key in set(train_keys)
            write_nifti(tmp / ("imagesTr" if train else "imagesTs") / f"{ident}_0000{FILE_ENDING}", image_array(hu), affine)
            if train:
                lab = training_labels(common, rec, chosen, lut, ignore)
                counts[rec["source"]][0] += int((lab == ignore).sum()) if ignore is not None else 0
                counts[rec["source"]][1] += lab.size
                write_nifti(tmp / "labelsTr" / f"{ident}{FILE_ENDING}", lab, affine)
            elif test_labels and common is not None:
                write_nifti(tmp / "labelsTs" / f"{ident}{FILE_ENDING}", nnunet_values(common, lut, ignore, rec), affine)
            say(f"  {key} -> {ident}" + (" (image mirrored " + "+".join(rec["image_flips"]) + ")" if rec.get("image_flips") else ""))
        record["ignore_share"] = {src: round(n / total, 6) for src, (n, total) in sorted(counts.items())}
        write_json(tmp / "dataset.json", {
            "name": dataset, "description": f"covid-dg {plan['kind']} plan {plan.get('name')} (plan hash {record['plan_hash']})",
            "channel_names": {"0": "CT"}, "labels": labels, "numTraining": len(train_keys), "file_ending": FILE_ENDING,
            "covid_dg": {k: record[k] for k in ("version", "plan_hash", "labels", "ignore", "cases", "fingerprint")}})
        write_json(tmp / "splits_final.json", splits)
        write_json(tmp / MAPPING_FILE, record)
        for other in existing_datasets(out, dataset_id):
            shutil.rmtree(other)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"{target}: {len(train_keys)} training cases ({len(splits[0]['val'])} in nnU-Net's validation fold 0), "
        f"{len(test_keys)} test cases")
    say("  labels: " + ", ".join(f"{n}={v}" for n, v in labels.items()))
    for src, share in record["ignore_share"].items():
        say(f"  {src}: {100 * share:.1f}% of training voxels exported as ignore")
    say(f"  splits_final.json: {target / 'splits_final.json'} (nnU-Net's planner copies it to "
        f"$nnUNet_preprocessed/{dataset}/, where nnUNetv2_train reads it)")
    _write_preprocessed_splits(preprocessed, dataset, splits, overwrite, say)
    return target


def _write_preprocessed_splits(preprocessed: Path | None, dataset: str, splits: list, overwrite: bool, say) -> None:
    if preprocessed is None:
        return
    path = preprocessed / dataset / "splits_final.json"
    if path.is_file() and json.loads(path.read_text(encoding="utf-8")) != splits and not overwrite:
        raise ExportError(f"{path} holds other splits; pass --overwrite to replace it")
    write_json(path, splits)
    say(f"  splits_final.json: {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=command_name("python -m experiments.export_nnunet"), description=__doc__.split("\n\n")[0])
    ap.add_argument("plan", type=Path, help="a run folder or its plan.json")
    ap.add_argument("--out", required=True, type=Path, help="nnU-Net raw folder ($nnUNet_raw)")
    ap.add_argument("--id", required=True, type=int, dest="dataset_id", help="nnU-Net dataset id (1..999)")
    ap.add_argument("--name", default=None, help="dataset name (default: the plan's run name)")
    ap.add_argument("--classes", default=None, help="classes to export, comma-separated (default: those any "
                    "training case annotates, GGO/consolidation merged into lesion)")
    ap.add_argument("--preprocessed", type=Path, default=None, help="also write splits_final.json into "
                    "DIR/DatasetXXX_<name>/ ($nnUNet_preprocessed)")
    ap.add_argument("--test-labels", action="store_true", help="also write labelsTs/ (test references in nnU-Net values)")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier export with this id")
    args = ap.parse_args(argv)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    try:
        export(args.plan, args.out, args.dataset_id, args.name, classes, args.preprocessed, args.test_labels,
               args.overwrite)
    except (ExportError, PlanError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m experiments.export_nnunet"))
