"""Harmonization audit: per source, what the data are as stored and what the harmonizer makes of them.

    python -m datamodules.audit [--root DIR] [--out DIR] [--sources a,b] [--custom file.yaml] [key=value ...]

Without `--root` (and without paths.data_root) it audits the embedded phantom suite, generated or reused
exactly as a run does, and labels every output PHANTOM DATA. `key=value` overrides choose the harmonizer
as for training (e.g. `experiment=smoke`, `data.harmonize_off=[decode]`).

Per case, *before* is the case as stored: voxel spacing from the affine, slice thickness (the spacing
along the axis closest to S-I: NIfTI records spacing, not the reconstructed thickness), field of view
(shape x spacing per canonical axis), the stored values (percentiles, histogram), the raw mask codes,
lung and lesion volumes on the stored grid. *After* is `harmonize_case` with the run's harmonizer, except
that its last step (window and normalization, a pure function of HU) is left out, so the HU the network's
input is computed from are seen unclipped: spacing and shape of the harmonized grid, HU percentiles and
histogram, the share of voxels the window clips, common-class voxel counts, lung and lesion volumes on the
harmonized grid, the lesion's HU and the measured image-mask alignment. Flags: `datamodules.audit_flags`.
Outputs (`--out`, default reports/audit): audit.json, audit.md and PNG plots
(`evaluation.reporting.audit_report`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np

from datamodules.alignment import LUNG_VALUES, AlignmentError
from datamodules.alignment import summarize as summarize_statuses
from datamodules.audit_flags import flags_for_source
from datamodules.cases import Case
from datamodules.harmonize import HarmonizerConfig, align_mask, harmonize_case, window_normalize
from datamodules.io import VolumeError, read_volume, spacing_of
from datamodules.label_policy import CLASSES, IGNORE, OPACITY, LabelError, LabelPolicy
from datamodules.sources import DataLayoutError, get_source
from rundir.cli import command_name, run_cli

# Value histograms: 10 HU bins from just below air to dense bone; the stored values of an 8-bit export
# (0..255) fall into the same axis, which is what makes an undecoded source visible next to HU ones.
HIST_EDGES = np.arange(-1100.0, 1600.0 + 10.0, 10.0)
# Percentiles and histograms read at most this many voxels, evenly strided through the array: a full-size
# CT (512 x 512 x 300 = 79 M voxels) is read every ~40th voxel, which moves p1/p50/p99 by well under one
# 10 HU bin and keeps the audit of a real source to seconds per case. Phantom volumes are read whole.
SAMPLE_VOXELS = 2_000_000
PERCENTILES = (1, 50, 99)
MEASURED_CASE_ERRORS = (VolumeError, LabelError, ValueError, OSError)


def canonical_order(affine: np.ndarray) -> np.ndarray:
    """For each canonical axis (R-L, A-P, S-I), the stored voxel axis closest to it."""
    world_of_voxel = nib.orientations.io_orientation(affine)[:, 0].astype(int)
    return np.argsort(world_of_voxel)


def geometry(shape, affine: np.ndarray) -> dict:
    """Spacing, slice thickness and field of view (mm) in canonical axis order (x R-L, y A-P, z S-I)."""
    order = canonical_order(affine)
    spacing = spacing_of(affine)[order]
    extent = np.asarray(shape, dtype=np.float64)[order]
    return {"shape": [int(n) for n in extent], "spacing_mm": [round(float(s), 4) for s in spacing],
            "thickness_mm": round(float(spacing[2]), 4), "fov_mm": [round(float(v), 1) for v in extent * spacing],
            "axcodes": "".join(nib.aff2axcodes(affine)), "voxel_ml": float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0}


def sample(values: np.ndarray, limit: int = SAMPLE_VOXELS) -> np.ndarray:
    """At most `limit` voxels, an even stride through the array in memory order (no copy of the volume)."""
    flat = np.asarray(values).ravel(order="K")
    return flat[:: max(1, -(-flat.size // limit))]


def value_summary(values: np.ndarray) -> tuple[dict, np.ndarray]:
    """(min, percentiles, max of the values; histogram counts over HIST_EDGES plus below/above counts)."""
    s = sample(values)
    p = np.percentile(s, PERCENTILES)
    counts, _ = np.histogram(s, bins=HIST_EDGES)
    hist = np.concatenate([[np.count_nonzero(s < HIST_EDGES[0])], counts, [np.count_nonzero(s > HIST_EDGES[-1])]])
    summary = {"min": float(np.min(values)), "max": float(np.max(values)),
               **{f"p{q}": round(float(v), 1) for q, v in zip(PERCENTILES, p)}, "n_sampled": int(s.size)}
    return summary, hist


def volumes(label: np.ndarray, voxel_ml: float, annotated: np.ndarray) -> dict:
    """Lung (litres) and lesion (mL) volumes and % involvement, where the source annotates them.

    Lung = lung_left + lung_right + opacity voxels: sources that delineate both give the infection its own
    code inside the lungs (COVID-19-CT-Seg), so the lungs are the union. Lesion = every opacity (lesion,
    GGO, consolidation). Involvement = lesion / lung, only where both are annotated. Ignore voxels count
    in neither."""
    counts = np.bincount(label.ravel(), minlength=256)
    lesion_n = int(counts[list(OPACITY)].sum())
    lungs = bool(annotated[list(LUNG_VALUES)].all())
    lesions = bool(annotated[list(OPACITY)].any())
    lung_n = int(counts[list(LUNG_VALUES)].sum()) + lesion_n if lungs else None
    out = {"voxel_ml": voxel_ml, "lung_voxels": lung_n, "lesion_voxels": lesion_n if lesions else None,
           "lung_l": lung_n * voxel_ml / 1000.0 if lungs else None,
           "lesion_ml": lesion_n * voxel_ml if lesions else None}
    out["involvement_pct"] = 100.0 * lesion_n / lung_n if (lungs and lesions and lung_n) else None
    return out


def class_counts(label: np.ndarray) -> dict[str, int]:
    counts = np.bincount(label.ravel(), minlength=256)
    out = {name: int(counts[i]) for i, name in enumerate(CLASSES) if counts[i]}
    if counts[IGNORE]:
        out["ignore"] = int(counts[IGNORE])
    return out


def code_counts(raw: np.ndarray) -> dict[str, int]:
    codes, counts = np.unique(np.asarray(raw), return_counts=True)
    return {f"{float(c):g}": int(n) for c, n in zip(codes, counts)}


def lesion_hu(hu: np.ndarray, label: np.ndarray) -> dict | None:
    values = hu[np.isin(label, OPACITY)]
    if not values.size:
        return None
    return {"median": round(float(np.median(values)), 1), "mean": round(float(values.mean()), 1), "n": int(values.size)}


def measure_before(case: Case, policy: LabelPolicy | None) -> tuple[dict, np.ndarray]:
    """The case as stored; also returns the value histogram."""
    stored, affine = read_volume(case.image)
    if stored.dtype.kind == "f" and not np.all(np.isfinite(stored)):
        raise VolumeError(f"{case.image}: image contains NaN or inf voxels")  # as the harmonizer says it
    out = {"dtype": str(stored.dtype), **geometry(stored.shape, affine)}
    out["values"], hist = value_summary(stored)
    if case.label is not None and policy is not None:
        raw, lab_affine = read_volume(case.label)
        raw = align_mask(raw, lab_affine, stored.shape, affine, case.label, case.image)
        out["codes"] = code_counts(raw)
        out.update(volumes(policy.remap(raw, where=str(case.label)), out["voxel_ml"], policy.annotated_vector()))
    return out, hist


def measure_after(case: Case, policy: LabelPolicy | None, cfg: HarmonizerConfig) -> tuple[dict, np.ndarray]:
    """The case through the harmonizer, up to (not including) window and normalization; also the histogram."""
    h = harmonize_case(case, policy, replace(cfg, normalize="none"))
    hu = h.image
    out = {"read_as": case.encoding if cfg.decode else "hu", **geometry(hu.shape, h.affine),
           "alignment": h.meta["alignment"]["status"], "image_flips": h.meta["image_flips"]}
    out["hu"], hist = value_summary(hu)
    if cfg.normalize != "none":  # what the window clips before the network sees the values
        lo, hi = cfg.window
        s = sample(hu)
        out["clipped_low_pct"] = round(100.0 * float(np.count_nonzero(s < lo)) / s.size, 3)
        out["clipped_high_pct"] = round(100.0 * float(np.count_nonzero(s > hi)) / s.size, 3)
        normalized = window_normalize(s, cfg)
        out["normalized"] = {"min": float(normalized.min()), "max": float(normalized.max())}
    if h.label is not None:
        out["classes"] = class_counts(h.label)
        out.update(volumes(h.label, out["voxel_ml"], np.asarray(h.meta["annotated"], dtype=bool)))
        out["lesion_hu"] = lesion_hu(hu, h.label)
    return out, hist


def audit_case(case: Case, policy: LabelPolicy | None, cfg: HarmonizerConfig) -> tuple[dict, dict]:
    """(record, histograms) of one case; a file that cannot be read or a case the harmonizer refuses is
    recorded with its error (and with what could be measured before it)."""
    rec = {"source": case.source, "case": case.case_id, "key": case.key, "patient": case.patient_id,
           "image": str(case.image), "label": str(case.label) if case.label else None, "labelled": case.labelled,
           "encoding": case.encoding, "window": list(case.window) if case.window else None,
           "before": None, "after": None, "alignment": None}
    hists: dict = {}
    try:
        rec["before"], hists["before"] = measure_before(case, policy)
        rec["after"], hists["after"] = measure_after(case, policy, cfg)
        rec["alignment"] = rec["after"]["alignment"]
    except AlignmentError as exc:
        rec["alignment"], rec["error"] = "mismatch", str(exc)
    except MEASURED_CASE_ERRORS as exc:
        rec["error"] = str(exc)
    return rec, hists


def aggregate(values) -> dict | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


# (name, unit, getter on a before/after record): the per-source summary and the markdown table's rows
MEASURES = (
    ("spacing x, R-L", "mm", lambda r: r["spacing_mm"][0]),
    ("spacing y, A-P", "mm", lambda r: r["spacing_mm"][1]),
    ("slice thickness, S-I", "mm", lambda r: r["thickness_mm"]),
    ("field of view x", "mm", lambda r: r["fov_mm"][0]),
    ("field of view y", "mm", lambda r: r["fov_mm"][1]),
    ("field of view z", "mm", lambda r: r["fov_mm"][2]),
    ("value p1", "", lambda r: (r.get("values") or r.get("hu"))["p1"]),
    ("value p50", "", lambda r: (r.get("values") or r.get("hu"))["p50"]),
    ("value p99", "", lambda r: (r.get("values") or r.get("hu"))["p99"]),
    ("lung volume", "L", lambda r: r.get("lung_l")),
    ("lesion volume", "mL", lambda r: r.get("lesion_ml")),
    ("involvement", "%", lambda r: r.get("involvement_pct")),
    ("lesion median", "HU", lambda r: (r.get("lesion_hu") or {}).get("median")),
    ("voxels below the window", "%", lambda r: r.get("clipped_low_pct")),
    ("voxels above the window", "%", lambda r: r.get("clipped_high_pct")),
)


def summarize_source(cases: list[dict]) -> dict:
    """Per measure, before and after: median, min, max over the cases that have it; summed codes and classes."""
    out: dict = {}
    for stage in ("before", "after"):
        recs = [c[stage] for c in cases if c.get(stage)]
        out[stage] = {name: aggregate(get(r) for r in recs) for name, _unit, get in MEASURES}
        key = "codes" if stage == "before" else "classes"
        total: dict[str, int] = {}
        for r in recs:
            for k, n in (r.get(key) or {}).items():
                total[k] = total.get(k, 0) + n
        out[stage][key] = dict(sorted(total.items(), key=lambda kv: (kv[0] not in CLASSES, kv[0])))
        out[stage]["dtypes"] = sorted({r["dtype"] for r in recs}) if stage == "before" else None
    out["alignment"] = summarize_statuses(c["alignment"] for c in cases if c["labelled"] and c["alignment"])
    return out


def mean_histogram(hists: list[np.ndarray]) -> list[float] | None:
    """Each case's histogram as fractions of its voxels, averaged: every case weighs the same."""
    if not hists:
        return None
    return [round(float(v), 6) for v in np.mean([h / max(1, h.sum()) for h in hists], axis=0)]


def audit_source(root: Path, name: str, cfg: HarmonizerConfig, policy: str | None = None,
                 image_flips: dict | None = None) -> dict:
    folder = root / name
    out: dict = {"folder": str(folder), "found": folder.is_dir(), "cases": [], "problems": []}
    if not folder.is_dir():
        out["problems"].append(f"{folder}: not found")
    else:
        try:
            adapter = get_source(name)(folder, policy=policy)
            cases = adapter.with_flip_overrides(adapter.discover(), image_flips)
            out["problems"] += [str(p) for p in adapter.problems]
        except DataLayoutError as exc:
            cases = []
            out["problems"].append(str(exc))
        hists: dict[str, list] = {"before": [], "after": []}
        for case in cases:
            rec, h = audit_case(case, adapter.policy(case) if case.labelled else None, cfg)
            out["cases"].append(rec)
            for stage, hist in h.items():
                hists[stage].append(hist)
        out["histograms"] = {stage: mean_histogram(hs) for stage, hs in hists.items()}
    out["n_cases"], out["n_labelled"] = len(out["cases"]), sum(c["labelled"] for c in out["cases"])
    out["summary"] = summarize_source(out["cases"])
    out["flags"] = flags_for_source(name, out["cases"], out["problems"])
    return out


def is_phantom_root(root: Path, sources) -> bool:
    """A phantom suite says so in the manifest it writes beside each source (`<source>.json`)."""
    for name in sources:
        manifest = root / f"{name}.json"
        try:
            if manifest.is_file() and json.loads(manifest.read_text(encoding="utf-8")).get("phantom"):
                return True
        except (OSError, ValueError):
            continue
    return False


def audit(root: Path, sources, cfg: HarmonizerConfig, policies: dict | None = None,
          image_flips: dict | None = None) -> dict:
    """The whole audit as plain data (what audit.json holds)."""
    from evaluation.reporting.common import PHANTOM_MARK

    t0 = time.time()
    phantom = is_phantom_root(root, sources)
    report = {"data": "phantom" if phantom else "real", "label": PHANTOM_MARK if phantom else "real data",
              "root": str(root), "harmonizer": cfg.as_dict(), "hist_edges": HIST_EDGES.tolist(),
              "sources": {name: audit_source(root, name, cfg, (policies or {}).get(name), (image_flips or {}).get(name))
                          for name in sources}}
    report["flags"] = [f for s in report["sources"].values() for f in s["flags"]]
    report["wall_s"] = round(time.time() - t0, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=command_name("python -m datamodules.audit"), description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=None, help="data root, one sub-folder per source "
                    "(default: paths.data_root, else the phantom suite)")
    ap.add_argument("--out", type=Path, default=Path("reports/audit"), help="output folder (default reports/audit)")
    ap.add_argument("--sources", default=None, help="comma-separated source names (default: data.sources)")
    ap.add_argument("--custom", action="append", default=[], help="custom source YAML (repeatable)")
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. experiment=smoke)")
    args = ap.parse_intermixed_args(argv)
    from omegaconf import OmegaConf

    from datamodules.sources import SOURCES
    from datamodules.sources.custom import register_custom_source
    from evaluation.reporting.audit_report import write_audit
    from experiments.config import load_config
    from experiments.runner import harmonizer_config, resolve_data_root

    try:
        for spec in args.custom:  # first: the config may name these sources (data.policies, data.sources)
            register_custom_source(spec)
        cfg = load_config(args.overrides)
    except ValueError as exc:  # a config or custom-source error, naming the key or the file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.sources:
        cfg.data.sources = args.sources.split(",")
    if args.root is not None:
        cfg.paths.data_root = str(args.root)
    for spec in cfg.data.custom_sources:
        register_custom_source(spec)
    unknown = [n for n in cfg.data.sources if n not in SOURCES]
    if unknown:
        print(f"error: unknown source(s) {unknown}; registered: {sorted(SOURCES)}", file=sys.stderr)
        return 2
    try:
        root, _ = resolve_data_root(cfg)  # no data root: prints the PHANTOM banner, writes/reuses the suite
        report = audit(root, list(cfg.data.sources), harmonizer_config(cfg), OmegaConf.to_container(cfg.data.policies),
                       OmegaConf.to_container(cfg.data.image_flips))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report["overrides"] = list(args.overrides)
    written = write_audit(report, args.out)
    if report["data"] == "phantom":
        print(f"*** {report['label']}: every number below describes synthetic phantoms, not real CT ***")
    for name, s in report["sources"].items():
        lung = (s["summary"]["before"].get("lung volume") or {}).get("median")
        print(f"  {name:<12} {s['n_cases']:>4} cases {s['n_labelled']:>4} labelled  "
              f"median lung {'n/a' if lung is None else f'{lung:.2f} L'}  flags {len(s['flags'])}")
    for f in report["flags"]:
        print(f"  [{f['level']}] {f['kind']}: {f['reason']}")
    print(f"audit of {len(report['sources'])} source(s) in {report['wall_s']} s: " + ", ".join(str(p) for p in written))
    return 1 if any(f["level"] == "error" for f in report["flags"]) else 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m datamodules.audit"))
