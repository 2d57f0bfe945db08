"""Check a data root before a GPU hour is spent: what each source adapter finds, and every problem.

    python -m datamodules.verify --root DIR [--sources a,b] [--json] [--no-duplicates]

For each registered source (or `--sources`): whether `DIR/<source>/` holds its official layout, the
cases, labelled cases and patients found (patients with more than one scan are listed), spacing and
intensity summaries, the mask codes seen against those its label policy declares, the image-mask
alignment of every labelled case (`datamodules.alignment`: under which mirroring of the image its masks
fit, against the flips the source declares), and every problem with the file it concerns: corrupt or
truncated files, oversized or sheared headers, image/mask shape or affine mismatch, undeclared mask codes,
NaN/inf voxels, constant images, intensities that cannot be what the source declares (an 8-bit export
read as HU, scl_slope/scl_inter off scale: `harmonize.check_intensity`), labelled cases without a mask, images whose masks fit another mirroring than declared, empty folders. Scans found
twice (within or across sources, whatever their encoding, orientation, mirroring or resampling) are
listed (`datamodules.fingerprint`); training groups them as one patient. Two files under one case id
are a problem naming both.

Exit status 0 when nothing was found, 1 when problems were found, 2 when it could not check (EXIT_STATUS).
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np

from datamodules.alignment import AlignmentConfig, measure_case, parse_flips, summarize
from datamodules.cases import Case, repeated_id_message, repeated_ids
from datamodules.fingerprint import find_duplicates
from datamodules.harmonize import align_mask, check_intensity, decode_intensity
from datamodules.io import VolumeError, read_volume, spacing_of
from datamodules.label_policy import LabelError
from datamodules.sources import SOURCES, DataLayoutError, get_source
from datamodules.sources.custom import register_custom_source
from rundir.cli import command_name, did_you_mean, run_cli

EXIT_STATUS = """exit status: 0 no problem found; 1 problems found, each naming its file (duplicate scans are
reported, not problems); 2 could not check: unreadable root, bad arguments, or an unexpected error
(the report, if any, is incomplete; the cases it could not check are listed as problems)."""


def _problem(source: str, file: str, message: str) -> dict:
    return {"source": source, "file": file, "message": message}


def check_case(case: Case, adapter, alignment: AlignmentConfig = AlignmentConfig()) -> tuple[dict, list[dict]]:
    """Read one case like training does; return its summary (with its measured image-mask alignment,
    `info["alignment"]`, for a labelled case whose files read cleanly) and its problems."""
    problems: list[dict] = []
    info: dict = {"case": case.case_id, "patient": case.patient_id, "labelled": case.labelled}
    try:
        stored, affine = read_volume(case.image)
    except VolumeError as exc:
        return info, [_problem(case.source, str(case.image), str(exc).split(": ", 1)[-1])]
    info.update(shape=list(stored.shape), spacing=[round(float(s), 4) for s in spacing_of(affine)],
                axcodes="".join(nib.aff2axcodes(affine)), dtype=str(stored.dtype))
    try:
        check_intensity(stored, case.encoding, str(case.image), case.image)  # as training does
        hu = decode_intensity(stored, case.encoding, case.window, str(case.image))
        info["hu_p1_p50_p99"] = [round(float(v), 1) for v in np.percentile(hu, [1, 50, 99])]
    except (VolumeError, ValueError) as exc:
        problems.append(_problem(case.source, str(case.image), str(exc).split(": ", 1)[-1]))
    if case.label is None:
        return info, problems
    try:
        raw, lab_affine = read_volume(case.label)
    except VolumeError as exc:
        return info, problems + [_problem(case.source, str(case.label), str(exc).split(": ", 1)[-1])]
    info["codes"] = mask_codes(raw)
    aligned = None
    try:
        aligned = align_mask(raw, lab_affine, stored.shape, affine, case.label, case.image)
        if aligned is not raw:
            info["mask_reoriented"] = True  # same world grid, other axis order: aligned by its header
    except VolumeError as exc:
        problems.append(_problem(case.source, str(case.label), str(exc).split(": ", 1)[-1]))
    policy = adapter.policy(case)
    try:
        remapped = policy.remap(raw if aligned is None else aligned, where=str(case.label))
    except LabelError as exc:
        problems.append(_problem(case.source, str(case.label), str(exc).split(": ", 1)[-1]))
        return info, problems
    if problems:  # nothing trustworthy to measure the alignment on
        return info, problems
    align = measure_case(stored, affine, remapped, policy.annotated_vector(), case.encoding, case.window,
                         case.image_flips, alignment)
    info["alignment"] = align.as_dict()
    if align.status == "mismatch":
        problems.append(_problem(case.source, str(case.image), align.describe(case.key)))
    return info, problems


def mask_codes(raw: np.ndarray) -> list[int]:
    """The whole-number values a mask holds. NaN/inf and fractional values are left out: the label policy
    reports them as a problem naming the file."""
    values = np.unique(raw)
    if values.dtype.kind == "f":
        values = values[np.isfinite(values) & (values == np.round(values))]
    return sorted(int(v) for v in values)


def _range(values: list[float]) -> list[float] | None:
    return [round(min(values), 4), round(max(values), 4)] if values else None


def patient_groups(cases: list[Case]) -> dict[str, list[str]]:
    """Patient id -> its case ids (sorted), for every patient of these cases."""
    out: dict[str, list[str]] = {}
    for c in cases:
        out.setdefault(c.patient_id, []).append(c.case_id)
    return {p: sorted(ids) for p, ids in sorted(out.items())}


def verify_source(root: Path, name: str, image_flips: dict | None = None,
                  alignment: AlignmentConfig = AlignmentConfig()) -> dict:
    folder = root / name
    out: dict = {"found": folder.is_dir(), "folder": str(folder), "cases": 0, "labelled": 0, "n_patients": 0,
                 "patients": {}, "problems": []}
    if not folder.is_dir():
        return out
    try:
        adapter = get_source(name)(folder)
        cases = adapter.with_flip_overrides(adapter.discover(), image_flips)
    except DataLayoutError as exc:
        out["problems"].append(_problem(name, str(folder), str(exc)))
        return out
    if hasattr(adapter, "slices"):  # 2D-only cases (MedSeg's slice stacks): counted, not read voxel by voxel
        flat = adapter.slices()
        out["slices_2d"] = {"cases": len(flat), "labelled": sum(c.labelled for c in flat)}
    out["problems"] += [_problem(p.source, p.file, p.message) for p in adapter.problems]
    if not cases:
        out["problems"].append(_problem(name, str(folder), "the layout is there but holds no case"))
    repeated = repeated_ids(cases)
    for same in repeated.values():
        out["problems"].append(_problem(name, str(same[0].image), repeated_id_message(same)))
    infos, readable = [], []
    for case in cases:
        try:
            info, problems = check_case(case, adapter, alignment)
        except Exception as exc:  # a bug or a case nobody foresaw: say which file, check the others
            info = {"case": case.case_id, "patient": case.patient_id, "labelled": case.labelled}
            problems = [_problem(name, str(case.image), f"could not check: {type(exc).__name__}: {exc}")]
            out.setdefault("unchecked", []).append(str(case.image))
        infos.append(info)
        out["problems"] += problems
        if not problems and case.key not in repeated:  # the duplicate-scan search needs unique keys
            readable.append(case)
    out["readable_cases"] = readable
    declared = sorted({int(c) for p in adapter.POLICIES.values() for c in p.code_map})
    seen = Counter(c for i in infos for c in i.get("codes", []))
    patients = patient_groups(cases)
    alignment_by_case = {i["case"]: i["alignment"] for i in infos if "alignment" in i}
    out.update(
        cases=len(cases), labelled=sum(c.labelled for c in cases), n_patients=len(patients), patients=patients,
        alignment=alignment_by_case,
        spacing_mm={ax: _range([i["spacing"][k] for i in infos if "spacing" in i]) for k, ax in enumerate("xyz")},
        axcodes=dict(Counter(i["axcodes"] for i in infos if "axcodes" in i)),
        dtypes=dict(Counter(i["dtype"] for i in infos if "dtype" in i)),
        hu_p1_median_p99=[float(np.median([i["hu_p1_p50_p99"][k] for i in infos if "hu_p1_p50_p99" in i]))
                          for k in range(3)] if any("hu_p1_p50_p99" in i for i in infos) else None,
        codes_seen={str(c): n for c, n in sorted(seen.items())}, codes_declared=declared,
        case_list=infos)
    return out


def find_duplicate_scans(cases: list[Case], cache_dir: Path | None = None) -> list[dict]:
    """Groups of cases holding the same scan, within or across sources (any case, labelled or not)."""
    groups = find_duplicates(cases, cache_dir=cache_dir)
    return [{"cases": list(g.keys), "similarity": float(g.min_similarity)} for g in groups]


def verify(root: Path, names: list[str], duplicates: bool = True, cache_dir: Path | None = None,
           image_flips: dict[str, dict] | None = None, alignment: AlignmentConfig = AlignmentConfig()) -> dict:
    report: dict = {"root": str(root), "sources": {}, "problems": [], "duplicates": [], "unchecked": []}
    for name in names:
        report["sources"][name] = verify_source(root, name, (image_flips or {}).get(name), alignment)
        report["problems"] += report["sources"][name]["problems"]
        report["unchecked"] += report["sources"][name].pop("unchecked", [])
    if duplicates:  # only cases that read cleanly: a broken file is already a problem above
        readable = [c for s in report["sources"].values() for c in s.get("readable_cases", [])]
        report["duplicates"] = find_duplicate_scans(readable, cache_dir)
    for s in report["sources"].values():
        s.pop("readable_cases", None)
    return report


def print_report(report: dict) -> None:
    print(f"data root {report['root']}")
    for name, s in report["sources"].items():
        if not s["found"]:
            print(f"  {name:<12} not found ({s['folder']})")
            continue
        flat = f" + {s['slices_2d']['cases']} 2D-only slices" if s.get("slices_2d") else ""
        print(f"  {name:<12} {s['cases']:>5} cases{flat} {s['labelled']:>5} labelled {s['n_patients']:>5} patients"
              f"  spacing x {s.get('spacing_mm', {}).get('x')} z {s.get('spacing_mm', {}).get('z')} mm"
              f"  orientations {s.get('axcodes')}  codes seen {s.get('codes_seen')} declared {s.get('codes_declared')}")
        for pid, ids in s["patients"].items():
            if len(ids) > 1:
                print(f"    patient {pid}: {len(ids)} scans ({', '.join(ids)}): always on one side of a split")
        if s.get("alignment"):
            counts = summarize(a["status"] for a in s["alignment"].values())
            print("    image-mask alignment: " + ", ".join(f"{n} {st}" for st, n in counts.items()))
            for cid, a in s["alignment"].items():
                if a["status"] != "ok":
                    best = "+".join(a["best"] or []) or "none"
                    print(f"      {cid}: {a['status']}: image flips applied {a['flips'] or 'none'}, declared "
                          f"{a['declared'] or 'none'}, best fit {best}, margin {a['margin']}")
    for d in report["duplicates"]:
        print(f"  duplicate scan: {', '.join(d['cases'])} (similarity >= {d['similarity']:.3f}); "
              "training groups them as one patient")
    if report["problems"]:
        print(f"{len(report['problems'])} problem(s):")
        for p in report["problems"]:
            print(f"  {p['source']}: {p['file']}: {p['message']}")
    else:
        print("no case found, so none checked" if nothing_found(report) else "no problem found")


def parse_flip_args(items: list[str]) -> dict[str, dict[str, str]]:
    """['ctseg/radiopaedia_4_*=A-P'] -> {'ctseg': {'radiopaedia_4_*': 'A-P'}} (checked by the adapters)."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        target, sep, axes = item.partition("=")
        source, slash, pattern = target.partition("/")
        if not sep or not slash or not source or not pattern:
            raise ValueError(f"--image-flips {item!r}: expected SOURCE/GLOB=AXES, e.g. ctseg/radiopaedia_4_*=A-P")
        parse_flips(axes, f"--image-flips {item!r}")
        out.setdefault(source, {})[pattern] = axes
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=command_name("python -m datamodules.verify"), description=__doc__.split("\n\n")[0],
                                 epilog=EXIT_STATUS)
    ap.add_argument("--root", required=True, type=Path, help="data root: one sub-folder per source")
    ap.add_argument("--sources", default=None, help="comma-separated source names (default: all registered)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--no-duplicates", action="store_true", help="skip the duplicate-scan search")
    ap.add_argument("--custom", action="append", default=[], help="custom source YAML (repeatable)")
    ap.add_argument("--cache", type=Path, default=None, help="folder for cached scan fingerprints")
    ap.add_argument("--image-flips", action="append", default=[], metavar="SOURCE/GLOB=AXES",
                    help="declare image flips as data.image_flips does, e.g. 'ctseg/radiopaedia_4_*=A-P' "
                         "(AXES: comma-separated R-L, A-P, S-I, or none); repeatable")
    args = ap.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root} is not a folder", file=sys.stderr)
        return 2
    for spec in args.custom:
        register_custom_source(spec)
    names = args.sources.split(",") if args.sources else sorted(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        print(f"error: unknown source(s) {unknown}{did_you_mean(unknown[0], SOURCES)}; registered: "
              f"{sorted(SOURCES)}", file=sys.stderr)
        return 2
    try:
        flips = parse_flip_args(args.image_flips)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        report = verify(args.root, names, duplicates=not args.no_duplicates, cache_dir=args.cache,
                        image_flips=flips)
    except Exception as exc:  # not a finding about the data: the check itself failed
        traceback.print_exc()
        print(f"error: could not check {args.root}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        slim = {k: v for k, v in report.items() if k != "sources"}
        slim["sources"] = {n: {k: v for k, v in s.items() if k != "case_list"} for n, s in report["sources"].items()}
        print(json.dumps(slim, indent=1))
    else:
        print_report(report)
    if report["unchecked"]:
        print(f"error: {len(report['unchecked'])} case(s) could not be checked (listed as problems above)",
              file=sys.stderr)
        return 2
    empty = nothing_found(report)
    if empty:  # "no problem found" about no data at all would pass a wrong --root as clean
        print(f"error: {empty}", file=sys.stderr)
        return 2
    return 1 if report["problems"] else 0


def nothing_found(report: dict) -> str | None:
    """Why the report checked no case at all (no source folder, or folders without a case), naming what was
    searched; None when some case was checked."""
    sources = report["sources"]
    if any(s.get("found") and (s.get("cases") or 0) > 0 for s in sources.values()):
        return None
    found = [n for n, s in sources.items() if s.get("found")]
    searched = ", ".join(f"{s['folder']}" for s in sources.values()) if len(sources) <= 3 else \
        f"{report['root']}/<source>/ for {', '.join(sources)}"
    if not found:
        return (f"nothing to check: no source folder found under {report['root']} (searched {searched}); --root is "
                "the folder holding one sub-folder per source, named as `python -m experiments.list` lists them")
    return (f"nothing to check: the source folder(s) of {found} under {report['root']} hold no case in their "
            "official layout (see each source's layout in docs)")


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m datamodules.verify"))
