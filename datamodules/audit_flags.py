"""Judging a harmonization audit: which measured numbers should not be trusted, and why.

Pure functions on the per-case records `datamodules.audit` measures. Every flag names its case(s) and the
numbers behind it: `{"level", "kind", "source", "cases", "reason"}`. Levels: `error` (the case cannot be
read or the harmonizer refuses it: training stops on it), `warning` (a number that is probably wrong),
`info` (worth a look, not necessarily wrong).
"""
from __future__ import annotations

import statistics

# Plausible adult lung volume on CT (litres). Total lung capacity of adults is about 4-8 L (GLI reference
# values for static lung volumes: Hall et al., Eur Respir J 2021;57:2000289, whose predicted TLC runs from
# roughly 4 L in short women to 8 L in tall men); a CT segments somewhat less than TLC, and COVID patients
# often do not reach full inspiration, so the lower bound is set well below, at 2 L. Outside this range:
# a partial scan, a wrong spacing in the header, or a mask of something other than the lungs.
LUNG_LITRES = (2.0, 8.0)
# Median HU of a lesion mask must lie in the CT window the harmonizer trains on (seed 004's [-1000, 300]):
# COVID opacities run from ground glass (about -750 HU) to consolidation (about +50 HU). Beyond it the
# image is undecoded or mis-scaled, or the mask sits on the wrong voxels (bone, air outside the body).
LESION_HU = (-1000.0, 300.0)
# A case whose in-plane spacing or slice thickness is more than this factor from its source's median is
# an outlier: a factor 2 exceeds the spread of every public source's own protocol (MosMed in-plane 0.58..1.15
# mm spans 2x end to end, i.e. at most ~1.6x from its median), so it means another scanner, protocol or
# reconstruction mixed into the source (e.g. 1 mm coronacases next to 5 mm radiopaedia series).
SPACING_RATIO = 2.0
# A median of fewer cases says nothing about what is typical for the source.
MIN_CASES_FOR_OUTLIERS = 3
# Alignment statuses worth listing (datamodules.alignment): mismatch refuses the case; ambiguous and
# unverifiable apply the declared flips without confirmation from the data.
ALIGNMENT_NOTED = ("mismatch", "ambiguous", "unverifiable")


def _flag(level: str, kind: str, source: str, cases: list[str], reason: str) -> dict:
    return {"level": level, "kind": kind, "source": source, "cases": cases, "reason": reason}


def undecoded_8bit(case: dict) -> dict | None:
    """Stored integers within 0..255 read as HU: an 8-bit windowed export the source did not declare (or
    whose decode the ablation switched off). CT in HU holds air near -1000, which 0..255 cannot hold."""
    before, after = case.get("before"), case.get("after")
    if not before or not before["dtype"].startswith(("int", "uint")):
        return None
    lo, hi = before["values"]["min"], before["values"]["max"]
    read_as = after["read_as"] if after else case["encoding"]
    if lo < 0 or hi > 255 or read_as != "hu":
        return None
    why = ("the source declares an 8-bit window but data.harmonize_off switches the decode off"
           if case["encoding"] == "uint8_window" else "the source declares HU (encoding hu)")
    return _flag("warning", "undecoded_8bit", case["source"], [case["case"]],
                 f"{case['key']}: stored {before['dtype']} values span only {lo:g}..{hi:g} and are read as HU "
                 f"({why}); CT in HU holds air near -1000, so this is an 8-bit windowed export: declare its "
                 f"window (encoding uint8_window) or it trains undecoded ({case['image']})")


def lung_volume(case: dict, bounds: tuple[float, float] = LUNG_LITRES) -> dict | None:
    """The annotated lungs (as stored) outside the plausible adult range."""
    before = case.get("before") or {}
    litres = before.get("lung_l")
    if litres is None or bounds[0] <= litres <= bounds[1]:
        return None
    return _flag("warning", "lung_volume", case["source"], [case["case"]],
                 f"{case['key']}: lung volume {litres:.3f} L ({before['lung_voxels']} voxels of "
                 f"{before['voxel_ml']:.4g} mL) outside the plausible adult range {bounds[0]:g}-{bounds[1]:g} L: "
                 "a partial scan, a wrong spacing in the header or a mask of something else")


def lesion_hu(case: dict, bounds: tuple[float, float] = LESION_HU) -> dict | None:
    """Median HU of the lesion voxels (harmonized, as the network gets them) outside `bounds`."""
    stats = (case.get("after") or {}).get("lesion_hu")
    if not stats or bounds[0] <= stats["median"] <= bounds[1]:
        return None
    return _flag("warning", "lesion_hu", case["source"], [case["case"]],
                 f"{case['key']}: median HU of its {stats['n']} lesion voxels is {stats['median']:.0f} "
                 f"(mean {stats['mean']:.0f}), outside [{bounds[0]:g}, {bounds[1]:g}]: COVID opacities run from "
                 "about -750 (ground glass) to +50 HU (consolidation); the image is undecoded or mis-scaled, or "
                 "the mask lies on other voxels")


def spacing_outliers(source: str, cases: list[dict], ratio: float = SPACING_RATIO) -> list[dict]:
    """Cases whose stored in-plane spacing (mean of the two in-plane axes) or slice thickness is more than
    `ratio` times above or below the source's median."""
    read = [c for c in cases if c.get("before")]
    if len(read) < MIN_CASES_FOR_OUTLIERS:
        return []
    out = []
    for what, get in (("in-plane spacing", lambda b: (b["spacing_mm"][0] + b["spacing_mm"][1]) / 2),
                      ("slice thickness", lambda b: b["thickness_mm"])):
        median = statistics.median(get(c["before"]) for c in read)
        for c in read:
            value = get(c["before"])
            r = value / median
            if r > ratio or r < 1.0 / ratio:
                out.append(_flag("warning", "spacing_outlier", source, [c["case"]],
                                 f"{c['key']}: {what} {value:.3f} mm is {r:.2f}x the source median {median:.3f} mm "
                                 f"(outliers: beyond {ratio:g}x either way); another scanner or protocol in this "
                                 "source, or a wrong header"))
    return out


def alignment(source: str, cases: list[dict]) -> dict | None:
    """Labelled cases whose image-mask alignment was not confirmed (one informational flag per source)."""
    by_status: dict[str, list[str]] = {}
    for c in cases:
        status = c.get("alignment")
        if c["labelled"] and status in ALIGNMENT_NOTED:
            by_status.setdefault(status, []).append(c["case"])
    if not by_status:
        return None
    listed = "; ".join(f"{len(ids)} {st} ({', '.join(ids)})" for st, ids in by_status.items())
    return _flag("info", "alignment", source, [i for ids in by_status.values() for i in ids],
                 f"{source}: image-mask alignment of labelled cases: {listed}. mismatch: the harmonizer refuses "
                 "the case; ambiguous/unverifiable: the declared image flips are applied unconfirmed "
                 "(python -m datamodules.verify shows the scores)")


def unreadable(case: dict) -> dict | None:
    if not case.get("error"):
        return None
    return _flag("error", "unreadable", case["source"], [case["case"]], f"{case['key']}: {case['error']}")


def flags_for_source(source: str, cases: list[dict], problems: list[str] = ()) -> list[dict]:
    """Every flag of one source: its layout problems, then per case, then across its cases."""
    out = [_flag("error", "layout", source, [], p) for p in problems]
    for c in cases:
        out += [f for f in (unreadable(c), undecoded_8bit(c), lung_volume(c), lesion_hu(c)) if f]
    out += spacing_outliers(source, cases)
    info = alignment(source, cases)
    return out + ([info] if info else [])
