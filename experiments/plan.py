"""The plan stage's record: `plan.json`, everything a run decided before training, as a file.

A plan holds the split (every case key per role, with where its files are, its patient and how its
labels and intensities are read), the duplicates and dropped cases, the harmonizer settings, the patch
and network plan and the training split's class frequencies. The trainer, the report, `score` and the
nnU-Net export read it, so the split a run trained on can be handed to another tool exactly.

Schema (version 1), all paths as strings:

    version, kind, name, data ("phantom" | "real"), data_root, seed, sources, split_args,
    train_sources, test_sources, held_out,
    roles:      {"train": [key, ...], "val": [...], "test": [...]}      key = "<source>/<case_id>"
    cases:      {key: {source, case_id, patient_id, image, label, policy (the source's name for it),
                       label_policy (full name: datamodules.sources.policy_named), encoding, window,
                       declared_image_flips, image_flips (measured, applied), annotated (class names),
                       cache (harmonized cache entry folder)}}
    patients:   {"<source>/<patient_id>": [key, ...]}    (every planned case, grouped)
    duplicates: [[key, ...], ...]   dropped: [key, ...]   skipped: [problem, ...]
    classes:    common label names, index = label value;   ignore: the ignore label value (254)
    harmonizer: HarmonizerConfig.as_dict()
    patch:      {patch_size, batch_size, samples_per_epoch, fg_fraction, sampling, target_spacing}
    network:    {name, spatial_dims, context_slices, args}
    class_frequencies: {class: fraction of its annotated training voxels, or null}
    evaluation: the `evaluation` config block
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datamodules.cases import Case
from datamodules.label_policy import CLASSES, IGNORE
from experiments.tracking import write_json

PLAN_VERSION = 1
PLAN_FILE = "plan.json"
ROLES = ("train", "val", "test")
REQUIRED = ("version", "kind", "roles", "cases", "harmonizer", "classes")
# What a run computes from (its hash): the rest (name, data_root, skipped problems) describes it.
HASHED = ("kind", "seed", "roles", "cases", "harmonizer", "patch", "network", "evaluation")
# Case fields that decide what the run reads: not where the cache happens to live.
CASE_HASHED = ("source", "case_id", "patient_id", "image", "label", "label_policy", "encoding", "window",
               "image_flips")


class PlanError(ValueError):
    """A plan file that cannot be used as written: names the file and what is wrong."""


def case_record(case: Case, meta: dict[str, Any] | None = None, cache: Path | str | None = None) -> dict[str, Any]:
    """One case of the plan. `meta` (the harmonized cache entry's meta.json) adds what was measured:
    the image flips actually applied and the classes the case's source annotates."""
    meta = meta or {}
    annotated = [n for n, a in zip(meta.get("classes", CLASSES), meta.get("annotated", ())) if a]
    return {"source": case.source, "case_id": case.case_id, "patient_id": case.patient_id,
            "image": str(case.image), "label": str(case.label) if case.label is not None else None,
            "policy": case.policy, "label_policy": meta.get("policy"), "encoding": case.encoding,
            "window": list(case.window) if case.window is not None else None,
            "declared_image_flips": list(case.image_flips),
            "image_flips": list(meta.get("image_flips", case.image_flips)),
            "annotated": annotated, "cache": str(cache) if cache is not None else None}


def case_from_record(rec: dict[str, Any]) -> Case:
    """The `Case` a record describes (declared flips: the harmonizer measures and applies its own)."""
    return Case(source=rec["source"], case_id=rec["case_id"], patient_id=rec["patient_id"], image=Path(rec["image"]),
                label=Path(rec["label"]) if rec.get("label") else None, policy=rec.get("policy"),
                encoding=rec.get("encoding", "hu"), window=tuple(rec["window"]) if rec.get("window") else None,
                image_flips=tuple(rec.get("declared_image_flips", ())))


def class_frequencies(metas: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Class c's voxels over the voxels of the training cases whose source annotates c, from the voxel
    counts the cache recorded when it built each entry (no label is read). A parent counts its typed
    children (lesion = lesion + GGO + consolidation), as `lightning_modules.losses.class_frequencies`."""
    import torch

    from lightning_modules.losses import class_frequencies as frequencies

    counts = [[int(m.get("voxels", {}).get(c, 0)) for c in CLASSES] for m in metas]
    annotated = [[bool(a) for a in list(m.get("annotated", ()))[: len(CLASSES)]]
                 + [False] * (len(CLASSES) - len(m.get("annotated", ()))) for m in metas]
    if not metas:
        return {c: None for c in CLASSES}
    f = frequencies(torch.tensor(counts), torch.tensor(annotated)).tolist()
    return {c: (None if v != v else round(float(v), 8)) for c, v in zip(CLASSES, f)}


def build_plan(*, kind: str, name: str, seed: int, sources: Sequence[str], split_args: dict, split, cached: dict,
               duplicates: Sequence[Sequence[str]] = (), skipped: Sequence[str] = (), data_root: str | Path = "",
               phantom: bool = False, harmonizer: dict, patch: dict, network: dict,
               evaluation: dict) -> dict[str, Any]:
    """The plan of a split that was built and harmonized: `split` is a `datamodules.splits.Split`, `cached`
    the data module's {role: [CachedCase]} (their meta gives the measured flips and annotated classes)."""
    entries = {c.key: c for role in ROLES for c in cached.get(role, [])}
    roles = {role: [c.key for c in getattr(split, role)] for role in ROLES}
    cases: dict[str, dict] = {}
    for role in ROLES:
        for c in getattr(split, role):
            entry = entries.get(c.key)
            cases[c.key] = case_record(c, entry.meta if entry else None, entry.path if entry else None)
    patients: dict[str, list[str]] = {}
    for key, rec in cases.items():
        patients.setdefault(f"{rec['source']}/{rec['patient_id']}", []).append(key)
    return {
        "version": PLAN_VERSION, "kind": kind, "name": name, "data": "phantom" if phantom else "real",
        "data_root": str(data_root), "seed": int(seed), "sources": list(sources),
        "split_args": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in split_args.items()},
        "train_sources": list(split.train_sources), "test_sources": list(split.test_sources),
        "held_out": list(split.held_out), "roles": roles, "cases": cases, "patients": patients,
        "duplicates": [list(g) for g in duplicates], "dropped": [c.key for c in split.dropped],
        "skipped": list(skipped), "classes": list(CLASSES), "ignore": IGNORE, "harmonizer": harmonizer,
        "patch": patch, "network": network,
        "class_frequencies": class_frequencies([e.meta for e in cached.get("train", [])]),
        "evaluation": evaluation}


def plan_hash(plan: dict[str, Any], length: int = 8) -> str:
    """Hash of what the plan makes a run compute: editing a role, a case or a setting changes it."""
    core = {k: plan.get(k) for k in HASHED}
    core["cases"] = {k: {f: rec.get(f) for f in CASE_HASHED} for k, rec in sorted(plan.get("cases", {}).items())}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:length]


def check_plan(plan: Any, where: str) -> dict[str, Any]:
    """A plan read from a file, checked: known version, every required key, every role's key a case of
    the plan, no case in two roles. Errors name the file and the key."""
    if not isinstance(plan, dict):
        raise PlanError(f"{where}: a plan is a JSON object, got {type(plan).__name__}")
    missing = [k for k in REQUIRED if k not in plan]
    if missing:
        raise PlanError(f"{where}: missing key(s) {missing}")
    if plan["version"] != PLAN_VERSION:
        raise PlanError(f"{where}: plan version {plan['version']!r}; this covid-dg reads version {PLAN_VERSION}")
    unknown_roles = sorted(set(plan["roles"]) - set(ROLES))
    if unknown_roles:
        raise PlanError(f"{where}: roles {unknown_roles} unknown; allowed: {list(ROLES)}")
    seen: dict[str, str] = {}
    for role, keys in plan["roles"].items():
        for key in keys:
            if key not in plan["cases"]:
                raise PlanError(f"{where}: roles.{role} lists {key!r}, which is not in cases")
            if key in seen:
                raise PlanError(f"{where}: {key!r} is in roles.{seen[key]} and roles.{role}")
            seen[key] = role
    return plan


def write_plan(run_dir: str | Path, plan: dict[str, Any]) -> Path:
    path = Path(run_dir) / PLAN_FILE
    write_json(path, plan)
    return path


def read_plan(path: str | Path) -> dict[str, Any]:
    """A plan file (or a run folder holding one), checked (`check_plan`)."""
    path = Path(path)
    if path.is_dir():
        path = path / PLAN_FILE
    if not path.is_file():
        raise PlanError(f"{path}: no plan file (a run folder writes {PLAN_FILE} in its plan stage)")
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"{path}: not valid JSON ({e})") from None
    return check_plan(plan, str(path))


def val_patients(plan: dict[str, Any]) -> list[str]:
    """`<source>/<patient_id>` of the validation cases (what nnU-Net's validation fold must equal)."""
    return sorted({f"{plan['cases'][k]['source']}/{plan['cases'][k]['patient_id']}" for k in plan["roles"]["val"]})
