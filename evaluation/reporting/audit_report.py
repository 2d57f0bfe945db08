"""A harmonization audit (`datamodules.audit`) as files: audit.json, audit.md and PNG plots, all atomic.

Plots: `hu_histograms.png` (per source, the stored values and the harmonized HU as fractions of voxels,
log scale, the training window dashed), `volumes.png` (lung litres and lesion mL per case, before and
after, the plausible adult lung range shaded), `spacing.png` (in-plane spacing against slice thickness
per case, before and after; spacing outliers named). Phantom audits say PHANTOM DATA on every file.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from datamodules.audit import MEASURES
from datamodules.audit_flags import LUNG_LITRES, SPACING_RATIO
from evaluation.reporting.common import PHANTOM_MARK
from evaluation.reporting.plots import _figure, _save_png, _title
from evaluation.reporting.render import to_markdown
from rundir.atomic import atomic_write_text, write_json

DIGITS = {"mm": 2, "L": 2, "mL": 1, "%": 1, "HU": 0, "": 0}  # printed precision per unit


def _num(v, unit: str) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{DIGITS[unit]}f}"


def _range(agg: dict | None, unit: str) -> str:
    if not agg:
        return "n/a"
    return f"{_num(agg['median'], unit)} [{_num(agg['min'], unit)}, {_num(agg['max'], unit)}]"


def _counts(d: dict | None) -> str:
    return ", ".join(f"{k}: {n}" for k, n in d.items()) if d else "n/a"


def _harmonizer_line(report: dict) -> str:
    h = report["harmonizer"]
    off = [s for s, on in (("decode", h["decode"]), ("resample", h["resample"])) if not on]
    off += ["normalize"] if h["normalize"] == "none" else []
    return (f"target spacing {h['target_spacing']} mm, window {h['window']} HU, normalize {h['normalize']}, "
            f"steps switched off: {', '.join(off) or 'none'}")


def source_table(s: dict) -> str:
    rows = []
    for name, unit, _get in MEASURES:
        b, a = s["summary"]["before"].get(name), s["summary"]["after"].get(name)
        if b or a:
            rows.append([f"{name}{f' ({unit})' if unit else ''}", _range(b, unit), _range(a, unit)])
    rows.append(["stored dtypes", ", ".join(s["summary"]["before"]["dtypes"] or []) or "n/a", ""])
    rows.append(["label codes (voxels)", _counts(s["summary"]["before"]["codes"]),
                 _counts(s["summary"]["after"]["classes"])])
    rows.append(["image-mask alignment (labelled cases)", "", _counts(s["summary"]["alignment"])])
    return to_markdown(["measure", "before: median [min, max]", "after: median [min, max]"], rows)


def to_markdown_report(report: dict, plots: list[str]) -> str:
    phantom = report["data"] == "phantom"
    lines = [f"**{PHANTOM_MARK}**\n" if phantom else "", "# Harmonization audit\n",
             f"Data root `{report['root']}`; harmonizer: {_harmonizer_line(report)}."
             + (f" Overrides: `{' '.join(report['overrides'])}`." if report.get("overrides") else "") + "\n",
             "*Before*: each case as stored (values: the stored numbers, HU or 0..255 for 8-bit exports; "
             "volumes on the stored grid). *After*: the harmonized grid, HU before the window and normalization "
             "(decoded unless `data.harmonize_off` holds `decode`); lesion HU are read there. Lung = lung_left + "
             "lung_right + opacities, only where a source annotates lungs; involvement = lesion / lung.\n",
             "## Flags\n"]
    if report["flags"]:
        lines.append(to_markdown(["level", "source", "kind", "reason"],
                                 [[f["level"], f["source"], f["kind"], f["reason"]] for f in report["flags"]]) + "\n")
    else:
        lines.append("none\n")
    for name, s in report["sources"].items():
        lines.append(f"## {name}: {s['n_cases']} cases, {s['n_labelled']} labelled\n")
        if not s["cases"]:
            lines.append("nothing measured: " + "; ".join(s["problems"]) + "\n")
            continue
        lines.append(source_table(s) + "\n")
    lines += ["## Plots\n", *[f"![{p}]({p})\n" for p in plots]]
    return "\n".join(line for line in lines if line)


def _cases(report: dict, stage: str):
    for name, s in report["sources"].items():
        for c in s["cases"]:
            if c.get(stage):
                yield name, c, c[stage]


def _suptitle(fig, text: str, report: dict) -> None:
    fig.suptitle(_title(text, report["data"] == "phantom"))
    fig.subplots_adjust(top=0.78)  # room for the two-line title above the panels' own titles


def plot_histograms(report: dict, path: Path) -> None:
    names = [n for n, s in report["sources"].items() if s.get("histograms", {}).get("before")]
    edges = np.asarray(report["hist_edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    fig, axes = _figure(max(1, len(names)), (4.2, 3.4))
    lo, hi = report["harmonizer"]["window"]
    for ax, name in zip(axes, names):
        for stage, colour, label in (("before", "0.5", "as stored"), ("after", "C0", "harmonized (HU)")):
            h = report["sources"][name]["histograms"].get(stage)
            if h:  # h[0] and h[-1] count values below / above the axis
                ax.step(centres, np.maximum(h[1:-1], 1e-7), where="mid", color=colour, label=label, lw=1.2)
        for x in (lo, hi):
            ax.axvline(x, color="k", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylim(1e-6, 1)
        ax.set_title(name)
        ax.set_xlabel("stored value / HU")
    axes[0].set_ylabel("fraction of voxels (mean over cases)")
    axes[0].legend(fontsize=8)
    _suptitle(fig, "values before and after harmonization (window dashed)", report)
    _save_png(fig, path)


def plot_volumes(report: dict, path: Path) -> None:
    names = list(report["sources"])
    fig, (ax_lung, ax_lesion) = _figure(2, (5.0, 3.8))
    for ax, key, unit in ((ax_lung, "lung_l", "L"), (ax_lesion, "lesion_ml", "mL")):
        for stage, dx, marker in (("before", -0.15, "o"), ("after", 0.15, "x")):
            xs, ys = [], []
            for name, _c, rec in _cases(report, stage):
                if rec.get(key) is not None:
                    xs.append(names.index(name) + dx)
                    ys.append(rec[key])
            ax.scatter(xs, ys, marker=marker, s=18, label=stage, alpha=0.8)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(f"{'lung' if key == 'lung_l' else 'lesion'} volume ({unit})")
        ax.legend(fontsize=8)
    ax_lung.axhspan(*LUNG_LITRES, color="C2", alpha=0.12, lw=0)  # plausible adult range
    ax_lung.set_title(f"lungs (shaded: plausible {LUNG_LITRES[0]:g}-{LUNG_LITRES[1]:g} L)")
    ax_lesion.set_title("lesions (all opacities)")
    _suptitle(fig, "volumes per case (sources that annotate them)", report)
    _save_png(fig, path)


def plot_spacing(report: dict, path: Path) -> None:
    fig, (ax,) = _figure(1, (6.0, 4.5))
    outliers = {(f["source"], c) for f in report["flags"] if f["kind"] == "spacing_outlier" for c in f["cases"]}
    for i, name in enumerate(report["sources"]):
        for stage, marker in (("before", "o"), ("after", "x")):
            pts = [(c["case"], (r["spacing_mm"][0] + r["spacing_mm"][1]) / 2, r["thickness_mm"])
                   for n, c, r in _cases(report, stage) if n == name]
            if pts:
                ax.scatter([p[1] for p in pts], [p[2] for p in pts], marker=marker, color=f"C{i}", s=20,
                           label=f"{name} {stage}", alpha=0.8)
            if stage == "before":
                for case, x, y in pts:
                    if (name, case) in outliers:
                        ax.annotate(case, (x, y), fontsize=7)
    ax.set_xlabel("in-plane spacing (mm, mean of x and y)")
    ax.set_ylabel("slice thickness (mm, S-I spacing)")
    ax.legend(fontsize=7)
    _suptitle(fig, f"spacing per case (outliers beyond {SPACING_RATIO:g}x the source median named)", report)
    _save_png(fig, path)


PLOTS = {"hu_histograms.png": plot_histograms, "volumes.png": plot_volumes, "spacing.png": plot_spacing}


def write_audit(report: dict, out: str | Path) -> list[Path]:
    """audit.json, the PNG plots, then audit.md (which links them); returns the paths written."""
    out = Path(out)
    write_json(out / "audit.json", report)
    written = [out / "audit.json"]
    for name, plot in PLOTS.items():
        plot(report, out / name)
        written.append(out / name)
    atomic_write_text(out / "audit.md", to_markdown_report(report, list(PLOTS)))
    return [*written, out / "audit.md"]
