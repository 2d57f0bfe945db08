"""Figures (matplotlib Agg, no pyplot): train x test heatmaps, per-case box plots, severity scatter and
Bland-Altman plots. Every PNG is written atomically."""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np

from evaluation.reporting.common import METRICS, PHANTOM_MARK, SEVERITY, note
from evaluation.reporting.grouping import Config, cases_over_seeds
from evaluation.reporting.render import fmt

BOUNDED = ("dice", "iou", "nsd")  # in [0, 1]: heatmaps use a fixed colour scale


def _save_png(fig, path: Path) -> None:
    """Rendered in memory, then renamed into place like every other result file."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def _figure(ncols: int = 1, size: tuple[float, float] = (5.0, 4.0)):
    # Figure without pyplot: no global state, no GUI backend, the Agg canvas renders the PNG.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1]))
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _title(text: str, phantom: bool) -> str:
    return f"{PHANTOM_MARK}\n{text}" if phantom else text


def _box_plot(c: Config, cls: str, path: Path, phantom: bool, notes: list) -> bool:
    cases = cases_over_seeds(c, cls, METRICS)
    shown = [m for m in ("dice", "nsd") if any(math.isfinite(v.get(m, math.nan)) for v in cases.values())]
    if not shown:
        note(notes, f"no box plot for {c.label!r}: no per-case Dice or NSD")
        return False
    sources = [s for s in c.first.test_sources if any(k[0] == s for k in cases)]
    fig, axes = _figure(len(shown))
    for ax, m in zip(axes, shown):
        data = [[v[m] for k, v in cases.items() if k[0] == s and math.isfinite(v[m])] for s in sources]
        keep = [i for i, d in enumerate(data) if d]
        ax.boxplot([data[i] for i in keep], tick_labels=[f"{sources[i]}\n(n={len(data[i])})" for i in keep])
        rng = np.random.default_rng(0)
        for pos, i in enumerate(keep, start=1):
            ax.scatter(pos + rng.uniform(-0.12, 0.12, len(data[i])), data[i], s=10, alpha=0.6, color="tab:blue")
        ax.set_ylabel(f"{m} ({cls}, per case, mean over seeds)")
        ax.set_ylim(-0.02, 1.02)
    if "nsd" not in shown:
        note(notes, f"{c.label!r}: no NSD values, box plot of Dice only")
    fig.suptitle(_title(c.label, phantom), fontsize=9)
    _save_png(fig, path)
    return True


def _severity_plots(c: Config, measure: str, out: Path, phantom: bool, ba: dict | None) -> list[dict]:
    """Scatter and Bland-Altman plots of one measure; `ba` is its severity table row, so the lines drawn are
    the bias and limits the table shows (None: no case has both values)."""
    cases = cases_over_seeds(c, "lesion", (f"ref_{measure}", f"pred_{measure}"))
    pairs = [(k[0], v[f"ref_{measure}"], v[f"pred_{measure}"]) for k, v in cases.items()
             if math.isfinite(v[f"ref_{measure}"]) and math.isfinite(v[f"pred_{measure}"])]
    if not pairs or ba is None:
        return []
    sources = sorted({s for s, _, _ in pairs})
    ref, pred = np.array([p[1] for p in pairs]), np.array([p[2] for p in pairs])
    name, unit, top, _ = SEVERITY[measure]
    entries = []
    by_source = {s: [i for i, p in enumerate(pairs) if p[0] == s] for s in sources}
    fig, (ax,) = _figure()
    for s, sel in by_source.items():
        ax.scatter(ref[sel], pred[sel], s=14, label=s)
    hi = max(top, float(max(ref.max(), pred.max())))
    ax.plot([0, hi], [0, hi], "k--", lw=1, label="identity")
    ax.set_xlabel(f"reference {name} ({unit})")
    ax.set_ylabel(f"predicted {name} ({unit}, mean over seeds)")
    ax.legend(fontsize=7)
    fig.suptitle(_title(f"{c.label}: {name}", phantom), fontsize=9)
    path = out / "plots" / f"{measure}_scatter_{c.slug}.png"
    _save_png(fig, path)
    entries.append({"file": f"plots/{path.name}", "title": f"{name} reference vs predicted, {c.label}",
                    "config": c.label})
    fig, (ax,) = _figure()
    for s, sel in by_source.items():
        ax.scatter((ref[sel] + pred[sel]) / 2, pred[sel] - ref[sel], s=14, label=s)
    for y, style, text in ((ba["bias"], "-", "mean"), (ba["loa_low"], "--", "mean - 1.96 sd"),
                          (ba["loa_high"], "--", "mean + 1.96 sd")):
        if math.isfinite(y):
            ax.axhline(y, color="k", ls=style, lw=1)
            ax.annotate(f"{text} {y:.2f}", (1.0, y), xycoords=("axes fraction", "data"), fontsize=7, ha="right",
                        va="bottom")
    ax.set_xlabel(f"mean of reference and predicted {name} ({unit})")
    ax.set_ylabel(f"predicted - reference {name} ({unit})")
    ax.legend(fontsize=7)
    fig.suptitle(_title(f"{c.label}: Bland-Altman {name} (n={ba['n']})", phantom), fontsize=9)
    path = out / "plots" / f"{measure}_bland_altman_{c.slug}.png"
    _save_png(fig, path)
    entries.append({"file": f"plots/{path.name}", "title": f"Bland-Altman {name}, {c.label}", "config": c.label})
    return entries


def _heatmap(matrix: dict, path: Path, phantom: bool) -> None:
    rows, cols = matrix["rows"], matrix["columns"]
    values = np.array([[r["cells"].get(s, {}).get("mean", math.nan) for s in cols] for r in rows], dtype=float)
    fig, (ax,) = _figure(size=(1.2 * len(cols) + 2.5, 0.6 * len(rows) + 2.0))
    bounded = matrix["metric"] in BOUNDED
    im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0 if bounded else None,
                   vmax=1 if bounded else None, aspect="auto")
    for i, r in enumerate(rows):
        for j, s in enumerate(cols):
            cell = r["cells"].get(s)
            if cell is None:
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=8, color="gray")
                continue
            text = fmt(cell["mean"]) + (f"\n± {fmt(cell['std'])}" if math.isfinite(cell["std"]) else "")
            dark = bounded and cell["mean"] < 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), [r["train"] for r in rows])
    ax.set_xlabel("test source")
    ax.set_ylabel("held-out source" if matrix["kind"] == "loso" else "train set")
    fig.colorbar(im, ax=ax, label=f"{matrix['metric']} ({matrix['class']}), mean over seeds")
    fig.suptitle(_title(f"{matrix['kind']}/{matrix['experiment']} ({matrix['eval_space']} space)", phantom), fontsize=9)
    _save_png(fig, path)


def make_plots(tables: dict, out: str | Path) -> list[dict]:
    """Write plots/*.png; returns their entries (file relative to `out`, title) and records skipped plots."""
    out, notes, phantom, cls = Path(out), tables["notes"], tables["meta"]["phantom"], tables["meta"]["class"]
    entries = []
    agreement = {(r["_slug"], r["measure"]): r for r in tables["severity"]}  # the table rows, per (slug, measure)
    for m in tables["matrices"]:
        path = out / "plots" / f"matrix_{m['name']}.png"
        _heatmap(m, path, phantom)
        entries.append({"file": f"plots/{path.name}", "title": f"{m['kind']}/{m['experiment']} matrix", "config": ""})
    for c in tables["_configs"]:
        path = out / "plots" / f"box_{c.slug}.png"
        if _box_plot(c, cls, path, phantom, notes):
            entries.append({"file": f"plots/{path.name}", "title": f"per-case {cls} Dice/NSD, {c.label}",
                            "config": c.label})
        severity = [e for s in SEVERITY for e in _severity_plots(c, s, out, phantom, agreement.get((c.slug, s)))]
        if not severity:
            note(notes, f"no severity plots for {c.label!r}: per_case.csv has no ref_<x>/pred_<x> values "
                        f"(x = {', '.join(SEVERITY)})")
        entries += severity
    tables["plots"] = entries
    return entries

