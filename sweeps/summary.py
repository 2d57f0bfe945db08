"""After a sweep: the full report (experiments.report) plus the sweep's headline file at its root.

- `transfer_matrix`: `transfer_matrix.csv` (train source x test source, mean Dice of the lesion class
  over seeds; `<test>_std` and `<test>_n_cases` beside), `transfer_matrix.png` and `transfer_matrix.md`;
- `loso_table`: `loso_table.csv` / `.md`: one row per held-out source, Dice / NSD / HD95 mean ± std;
- `methods_table`: `methods_table.csv` / `.md`: held-out source x DG method, lesion Dice mean ± std over
  seeds and the difference from erm;
- `harmonization_table`: `harmonization_table.csv` / `.md`: held-out source x harmonizer step switched off
  (run.json `harmonize_off`), lesion Dice mean ± std over seeds and the difference from all steps on.
Everything says PHANTOM DATA when a run used phantom sources.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from evaluation.reporting.common import PHANTOM_MARK
from evaluation.reporting.plots import _heatmap, make_plots
from evaluation.reporting.render import DEGENERATE_FOOTNOTE, degenerate_mark, fmt, to_markdown, write_report
from evaluation.reporting.runs import collect_runs
from evaluation.reporting.tables import build_tables
from rundir.atomic import atomic_write_text, write_csv


def _pm(cell: dict | None) -> str:
    if not cell:
        return "n/a"
    std = cell.get("std", math.nan)
    return fmt(cell["mean"]) + (f" ± {fmt(std)}" if math.isfinite(std) else "") + degenerate_mark(cell)


def _transfer_matrix(tables: dict, out: Path, phantom: bool) -> dict:
    matrices = [m for m in tables["matrices"] if m["kind"] == "transfer"]
    if len(matrices) != 1:
        raise ValueError(f"expected one transfer matrix in the sweep's runs, found {len(matrices)}")
    m = matrices[0]
    cols = m["columns"]
    rows = []
    for r in m["rows"]:
        row = {"train": r["train"]}
        for s in cols:
            cell = r["cells"].get(s)
            row[s] = cell["mean"] if cell else math.nan
            row[f"{s}_std"] = cell["std"] if cell else math.nan
            row[f"{s}_n_seeds"] = cell["n_seeds"] if cell else 0
            row[f"{s}_n_degenerate"] = cell.get("n_degenerate", 0) if cell else 0  # runs whose selection was flat
        rows.append(row)
    write_csv(out / "transfer_matrix.csv", rows, first=["train", *cols])
    _heatmap(m, out / "transfer_matrix.png", phantom)
    mark = f"**{PHANTOM_MARK}**\n\n" if phantom else ""
    md = (f"{mark}# Transfer matrix: {m['metric']} ({m['class']})\n\nRows: training source; columns: test source "
          "(mean ± std over seeds of each run's mean over cases). A source tested where it also trained is "
          "scored on its held-out test patients, the same patients as in the other rows.\n\n"
          + to_markdown(["train \\ test", *cols], [[r["train"], *[_pm(r["cells"].get(s)) for s in cols]]
                                                   for r in m["rows"]])
          + (f"\n\n{DEGENERATE_FOOTNOTE}" if any(c.get("n_degenerate") for r in m["rows"] for c in r["cells"].values())
             else "")
          + "\n\n![transfer matrix](transfer_matrix.png)\n")
    atomic_write_text(out / "transfer_matrix.md", md)
    return {"rows": [r["train"] for r in m["rows"]], "columns": cols}


def _loso_table(tables: dict, out: Path, phantom: bool) -> dict:
    rows = [r for r in tables["results"] if r["kind"] == "loso" and r["class"] == "lesion"
            and r["test_source"] != "mean" and r["train_sources"]]
    flat, shown = [], []
    for r in sorted(rows, key=lambda r: r["test_source"]):
        m = r["metrics"]
        flat.append({"holdout": r["test_source"], "train_sources": r["train_sources"], "n_seeds": r["n_seeds"],
                     "n_cases": r["n_cases"], **{f"{k}_{x}": m[k][x] for k in ("dice", "nsd", "hd95") if k in m
                                                  for x in ("mean", "std")}})
        shown.append([r["test_source"], r["train_sources"], str(r["n_cases"]),
                      *[_pm(m.get(k)) for k in ("dice", "nsd", "hd95")]])
    write_csv(out / "loso_table.csv", flat, first=["holdout", "train_sources"])
    mark = f"**{PHANTOM_MARK}**\n\n" if phantom else ""
    atomic_write_text(out / "loso_table.md", f"{mark}# Leave-one-source-out (lesion)\n\n" + to_markdown(
        ["held-out source", "trained on", "cases", "Dice", "NSD", "HD95 (mm)"], shown) + "\n")
    return {"rows": [f["holdout"] for f in flat]}


def _lesion_dice_cells(tables: dict, column_of: dict[str, str]) -> dict[tuple[str, str], dict | None]:
    """(held-out source, column) -> held-out lesion Dice cell (mean, std, n_seeds over seeds) of the LOSO
    configurations `column_of` names (configuration label -> table column)."""
    cells: dict[tuple[str, str], dict | None] = {}
    filled_by: dict[tuple[str, str], str] = {}
    for r in tables["results"]:
        if r["kind"] == "loso" and r["class"] == "lesion" and r["test_source"] != "mean" and r["config"] in column_of:
            key = (r["test_source"], column_of[r["config"]])
            if key in filled_by:  # runs differing in something the table does not show: never pick one silently
                raise ValueError(f"configurations {filled_by[key]!r} and {r['config']!r} both fill the cell {key}")
            cells[key], filled_by[key] = r["metrics"].get("dice"), r["config"]
    if not cells:
        raise ValueError("no LOSO lesion results in the sweep's runs")
    return cells


def _against_baseline(cells: dict, columns: list[str], baseline: str) -> tuple[list[str], list[dict], list[list[str]]]:
    """Rows of held-out sources plus a mean row: each column's Dice (± std over seeds) and its difference from
    `baseline` on the same held-out source and seeds. Returns (row names, CSV rows, markdown cells)."""
    holdouts = sorted({h for h, _ in cells})
    for m in columns:  # the mean row: every held-out source weighs the same; undefined unless all are there
        vals = [cells[(h, m)]["mean"] for h in holdouts if cells.get((h, m))]
        cells[("mean", m)] = {"mean": sum(vals) / len(vals) if len(vals) == len(holdouts) else math.nan,
                              "std": math.nan}
    flat, shown = [], []
    for h in [*holdouts, "mean"]:
        base = cells[(h, baseline)]["mean"] if cells.get((h, baseline)) else math.nan
        row, cols = {"holdout": h}, [h]
        for m in columns:
            cell = cells.get((h, m))
            value = cell["mean"] if cell else math.nan
            row[m], row[f"{m}_std"] = value, cell.get("std", math.nan) if cell else math.nan
            row[f"{m}_n_seeds"] = cell.get("n_seeds", 0) if cell else 0
            row[f"{m}_vs_{baseline}"] = value - base
            delta = "" if m == baseline or not math.isfinite(value - base) else f" ({value - base:+.3f})"
            cols.append((_pm(cell) if cell and math.isfinite(value) else "n/a") + delta)
        flat.append(row)
        shown.append(cols)
    return [*holdouts, "mean"], flat, shown


def _methods_table(tables: dict, out: Path, phantom: bool) -> dict:
    """Held-out lesion Dice per (held-out source, method), mean ± std over seeds, and each method's difference
    from erm on the same held-out source (the same patients); the last row averages the held-out sources."""
    cells = _lesion_dice_cells(tables, {c.label: c.first.method for c in tables["_configs"]})
    methods = sorted({m for _, m in cells}, key=lambda m: (m != "erm", m))
    rows, flat, shown = _against_baseline(cells, methods, "erm")
    write_csv(out / "methods_table.csv", flat, first=["holdout", *methods])
    mark = f"**{PHANTOM_MARK}**\n\n" if phantom else ""
    atomic_write_text(out / "methods_table.md", f"{mark}# DG methods: held-out lesion Dice (LOSO)\n\nmean ± std over "
                      "seeds; in brackets the difference from erm on the same held-out source and seeds.\n\n"
                      + to_markdown(["held-out source", *methods], shown) + "\n")
    return {"rows": rows, "columns": methods}


def _ablation_column(off: str) -> str:
    """run.json `harmonize_off` -> table column: `all_on` for every step, else `<steps>_off`."""
    return "all_on" if off == "none" else f"{off}_off"


def _harmonization_table(tables: dict, out: Path, phantom: bool) -> dict:
    """Held-out lesion Dice per (held-out source, harmonizer step switched off), mean ± std over seeds, and the
    difference from all steps on for the same held-out source and seeds; the last row averages the sources."""
    from datamodules.harmonize import ABLATABLE_STEPS  # imports torch: only for this table

    cells = _lesion_dice_cells(tables, {c.label: _ablation_column(c.first.harmonize_off) for c in tables["_configs"]})
    order = ["all_on", *[f"{s}_off" for s in ABLATABLE_STEPS]]  # harmonizer order; combinations after
    columns = sorted({m for _, m in cells}, key=lambda m: (order.index(m) if m in order else len(order), m))
    rows, flat, shown = _against_baseline(cells, columns, "all_on")
    write_csv(out / "harmonization_table.csv", flat, first=["holdout", *columns])
    mark = f"**{PHANTOM_MARK}**\n\n" if phantom else ""
    heads = ["all steps on" if m == "all_on" else m.replace("_off", " off") for m in columns]
    atomic_write_text(out / "harmonization_table.md", f"{mark}# Harmonizer steps: held-out lesion Dice (LOSO)\n\n"
                      "Each column switches one harmonizer step off (`data.harmonize_off`): decode off reads 8-bit "
                      "windowed exports as HU, resample off keeps each case's own voxel spacing, normalize off feeds "
                      "unclipped HU. Mean ± std over seeds; in brackets the difference from all steps on for the same "
                      "held-out source and seeds.\n\n" + to_markdown(["held-out source", *heads], shown) + "\n")
    return {"rows": rows, "columns": columns}


SUMMARIES = {"transfer_matrix": _transfer_matrix, "loso_table": _loso_table, "methods_table": _methods_table,
             "harmonization_table": _harmonization_table}


def summarize_sweep(sweep_dir: Path, kind: str | None, n_boot: int = 1000, wandb_group: str | None = None) -> dict:
    """Report over every finished run under the sweep folder; then the sweep's own headline file; then,
    unless W&B is disabled, the report as one W&B run in the sweep's group (tables incl. the transfer
    matrix, heatmaps)."""
    skipped: list[str] = []
    runs = collect_runs([sweep_dir], skipped)
    if not runs:
        raise ValueError(f"no finished run under {sweep_dir}")
    tables = build_tables(runs, "dice", "lesion", n_boot, 0, skipped)
    report = sweep_dir / "report"
    make_plots(tables, report)
    written = write_report(tables, report)
    out = {"report": str(report / "summary.md"), "runs": len(runs)}
    if kind:
        out[kind] = SUMMARIES[kind](tables, sweep_dir, tables["meta"]["phantom"])
    if os.environ.get("WANDB_MODE", "offline") != "disabled":
        from evaluation.reporting.wandb_log import log_wandb

        images = {"plot/transfer_matrix": sweep_dir / "transfer_matrix.png"} if kind == "transfer_matrix" else {}
        out["wandb"] = log_wandb(tables, written, report, group=wandb_group, extra_images=images)
    return out
