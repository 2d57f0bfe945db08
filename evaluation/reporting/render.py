"""Tables as markdown, CSV and LaTeX: pure formatting first, then `write_report` (atomic files)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation.reporting.common import METRICS, PHANTOM_MARK, SEVERITY
from evaluation.selection_rules import DEGENERATE_MARK
from rundir.atomic import atomic_write_text, write_csv, write_json


def fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _data(d: str) -> str:
    return PHANTOM_MARK if d == "phantom" else d


def _pm(cell: dict | None) -> str:
    if not cell:
        return ""
    s = fmt(cell["mean"]) + (f" ± {fmt(cell['std'])}" if math.isfinite(cell["std"]) else "")
    return s + (f" ({cell['n_undefined']} undef.)" if cell.get("n_undefined") else "") + degenerate_mark(cell)


DEGENERATE_FOOTNOTE = (f"{DEGENERATE_MARK} model selection degenerate in at least one run behind the number: its "
                       "validation score was constant or undefined at every check, so the run tested its last epoch "
                       "(run.json `selection.degenerate`; the runs are listed under Notes).")


def degenerate_mark(item: dict) -> str:
    """`†` after a number (or configuration) that comes from runs whose model selection was degenerate."""
    return DEGENERATE_MARK if item.get("n_degenerate") else ""


def _ci(cell: dict | None) -> str:
    return f"[{fmt(cell['ci_low'])}, {fmt(cell['ci_high'])}]" if cell else ""


def _tex_escape(text: str) -> str:
    repl = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
            "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    text = "".join(repl.get(ch, ch) for ch in str(text))
    return text.replace("±", r"$\pm$").replace("->", r"$\to$")


def to_latex(columns: Sequence[str], rows: Sequence[Sequence[str]], caption: str, label: str) -> str:
    """A table environment with a plain tabular (no package needed): text left, the rest centred."""
    align = "".join("l" if i < 2 else "c" for i in range(len(columns)))
    lines = ["% written by python -m experiments.report", r"\begin{table}[ht]", r"\centering", r"\small",
             rf"\caption{{{_tex_escape(caption)}}}", rf"\label{{tab:{label}}}", rf"\begin{{tabular}}{{{align}}}",
             r"\hline", " & ".join(_tex_escape(c) for c in columns) + r" \\", r"\hline"]
    lines += [" & ".join(_tex_escape(v) for v in row) + r" \\" for row in rows]
    lines += [r"\hline", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def to_markdown(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(v):
        return str(v).replace("|", r"\|").replace("\n", " ")
    out = ["| " + " | ".join(map(esc, columns)) + " |", "|" + "---|" * len(columns)]
    return "\n".join(out + ["| " + " | ".join(map(esc, r)) + " |" for r in rows])


@dataclass
class Table:
    name: str  # tables/<name>.csv and .tex
    title: str
    csv_columns: list[str]
    csv_rows: list[dict]
    columns: list[str]  # shown in markdown and LaTeX
    rows: list[list[str]]


def _results_tables(tables: dict) -> list[Table]:
    res, meta = tables["results"], tables["meta"]
    metrics = [m for m in METRICS if any(m in r["metrics"] for r in res)]
    base = ["data", "kind", "experiment", "eval_space", "config", "train_sources", "test_source", "class", "n_runs",
            "n_seeds", "n_cases", "nsd_tolerance_mm"]
    # n: case values behind the mean (over all seeds), n_undefined: NaN values left out of it
    stats = ("mean", "std", "ci_low", "ci_high", "n", "n_undefined")
    stats_cols = [f"{m}_{s}" for m in metrics for s in stats]
    flat = []
    for r in res:
        row = {k: r[k] for k in base} | {"data": _data(r["data"])}
        for m, cell in r["metrics"].items():
            row.update({f"{m}_{s}": cell[s] for s in stats})
        flat.append(row)
    m, cls = meta["metric"], meta["class"]
    head = [i for i, r in enumerate(res) if r["class"] == cls and m in r["metrics"]]
    headline = Table(
        "headline", f"{m} ({cls}): mean ± std over seeds, 95 % bootstrap CI over cases",
        (cols := base + [c for c in stats_cols if c.startswith(f"{m}_")]), [{k: flat[i].get(k) for k in cols} for i in head],
        ["data", "configuration", "test source", "seeds", "cases", f"{m} mean ± std", "95 % CI"],
        [[_data(r["data"]), r["config"] + degenerate_mark(r), r["test_source"], str(r["n_seeds"]), str(r["n_cases"]), _pm(r["metrics"][m]),
          _ci(r["metrics"][m])] for r in (res[i] for i in head)])
    full = Table("results", "all metrics and classes: mean ± std over seeds (undefined values left out, counted)",
                 base + stats_cols, flat, ["data", "configuration", "test source", "class"] + metrics,
                 [[_data(r["data"]), r["config"] + degenerate_mark(r), r["test_source"], r["class"]] + [_pm(r["metrics"].get(x)) for x in metrics]
                  for r in res])
    return [headline, full]


def _simple_table(name: str, title: str, rows: list[dict], columns: list[str]) -> Table:
    flat = [{k: (_data(r[k]) if k == "data" else r.get(k)) for k in columns} for r in rows]
    return Table(name, title, columns, flat, columns, [[fmt(r[k]) for k in columns] for r in flat])


SEVERITY_COLUMNS = ["data", "config", "measure", "kind", "n", "n_undefined", "pearson_r", "pearson_p", "kendall_tau",
                    "kendall_p", "chi2", "chi2_dof", "chi2_p", "slope", "slope_ci_low", "slope_ci_high", "intercept",
                    "intercept_ci_low", "intercept_ci_high", "r2", "fit_mse", "mae", "bias", "sd", "loa_low",
                    "loa_high"]


def _p(p) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _with_p(v, p) -> str:
    return fmt(v) if fmt(v) == "n/a" else f"{fmt(v)} ({_p(p)})"


def _with_ci(v, low, high) -> str:
    return fmt(v) if fmt(v) == "n/a" or fmt(low) == "n/a" else f"{fmt(v)} [{fmt(low)}, {fmt(high)}]"


def _severity_table(rows: list[dict]) -> Table:
    flat = [{k: (_data(r[k]) if k == "data" else r.get(k)) for k in SEVERITY_COLUMNS} for r in rows]
    shown = [[_data(r["data"]), r["config"], f"{SEVERITY[r['measure']].name} ({SEVERITY[r['measure']].unit})",
              str(r["n"]) + (f" ({r['n_undefined']} undef.)" if r["n_undefined"] else ""),
              _with_p(r["pearson_r"], r["pearson_p"]), _with_p(r["kendall_tau"], r["kendall_p"]), _p(r["chi2_p"]),
              _with_ci(r["slope"], r["slope_ci_low"], r["slope_ci_high"]),
              _with_ci(r["intercept"], r["intercept_ci_low"], r["intercept_ci_high"]), fmt(r["bias"]),
              "n/a" if fmt(r["loa_low"]) == "n/a" else f"[{fmt(r['loa_low'])}, {fmt(r['loa_high'])}]"] for r in rows]
    return Table("severity", "severity agreement (lesion), cases averaged over seeds: reference = intercept + slope * "
                 "predicted (95 % CI); Bland-Altman bias and 95 % limits of predicted - reference", SEVERITY_COLUMNS,
                 flat, ["data", "configuration", "measure", "n", "Pearson r (p)", "Kendall tau (p)", "chi2 p",
                        "slope [95 % CI]", "intercept [95 % CI]", "BA bias", "BA limits"], shown)


def _all_tables(tables: dict) -> list[Table]:
    out = _results_tables(tables)
    if tables["gap"]:
        out.append(_simple_table("gap", "generalization gap: validation on the training sources minus held-out test "
                                 "(metrics.json), mean ± std over seeds", tables["gap"],
                                 ["data", "config", "metric", "class", "n_seeds", "val_mean", "val_std", "test_mean",
                                  "test_std", "gap_mean", "gap_std"]))
    for m in tables["matrices"]:
        cols = m["columns"]
        csv_cols = ["data", "train", "train_sources"] + [x for s in cols for x in (s, f"{s}_std", f"{s}_n_seeds",
                                                                                   f"{s}_n_degenerate")]
        flat = [{"data": _data(r["data"]), "train": r["train"], "train_sources": r["train_sources"], "row_mean": r["row_mean"],
                 **{k: v for s, cell in r["cells"].items()
                    for k, v in ((s, cell["mean"]), (f"{s}_std", cell["std"]), (f"{s}_n_seeds", cell["n_seeds"]),
                                 (f"{s}_n_degenerate", cell.get("n_degenerate", 0)))}}
                for r in m["rows"]]
        first = "held-out source" if m["kind"] == "loso" else "train set"
        out.append(Table(f"matrix_{m['name']}", f"{m['kind']}/{m['experiment']} ({m['eval_space']} space): {m['metric']} "
                         f"({m['class']}) by {first} and test source, mean ± std over seeds", csv_cols + ["row_mean"],
                         flat, ["data", first] + cols + ["mean of row"],
                         [[_data(r["data"]), r["train"]] + [_pm(r["cells"].get(s)) for s in cols] + [fmt(r["row_mean"])]
                          for r in m["rows"]]))
    if tables.get("selection"):
        names = [n for n in ("training_domain", "loso", "last", "oracle")
                 if any(f"{n}_mean" in r for r in tables["selection"])]
        cols = ["data", "config", "headline", "n_seeds"] + [f"{n}_{x}" for n in names for x in ("mean", "std")]
        t = _simple_table("selection", "model selection: test Dice (classes averaged, mean over test sources) of the "
                          "checkpoint each rule picks, mean ± std over seeds; oracle saw the test labels (upper bound)",
                          tables["selection"], cols)
        t.columns = ["data", "configuration", "headline", "seeds", *names]
        t.rows = [[_data(r["data"]), r["config"], str(r["headline"]), str(r["n_seeds"]),
                   *[_pm({"mean": r.get(f"{n}_mean", math.nan), "std": r.get(f"{n}_std", math.nan)}) for n in names]]
                  for r in tables["selection"]]
        out.append(t)
    if tables["severity"]:
        out.append(_severity_table(tables["severity"]))
    out.append(_simple_table("runs", "runs used", tables["runs"],
                             ["data", "config", "seed", "kind", "experiment", "name", "selection", "config_hash", "plan",
                              "path"]))
    return out


def clean(obj):
    """JSON-ready: NaN/inf -> null, numpy scalars -> Python, private `_` keys dropped."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_report(tables: dict, out: str | Path) -> dict[str, Table]:
    """summary.md, report.json, tables/*.csv and *.tex (every file written atomically); returns the tables."""
    out, meta = Path(out), tables["meta"]
    written = {t.name: t for t in _all_tables(tables)}
    mark = f"**{PHANTOM_MARK}**" if meta["phantom"] else ""
    for t in written.values():
        write_csv(out / "tables" / f"{t.name}.csv", t.csv_rows, first=t.csv_columns)
        caption = t.title + (f". {PHANTOM_MARK}" if meta["phantom"] else "")
        atomic_write_text(out / "tables" / f"{t.name}.tex", to_latex(t.columns, t.rows, caption, t.name))
    write_json(out / "report.json", clean({k: v for k, v in tables.items()}))
    atomic_write_text(out / "summary.md", _summary_md(tables, written, mark))
    return written


def _summary_md(tables: dict, written: dict[str, Table], mark: str) -> str:
    meta = tables["meta"]
    n_phantom = sum(r["data"] == "phantom" for r in tables["runs"])
    lines = []
    if mark:
        lines += [f"{mark}: {n_phantom} of {meta['n_runs']} runs use synthetic phantom sources. Their numbers show "
                  "that the pipeline works; they say nothing about real CT.", ""]
    b = meta["bootstrap"]
    lines += ["# covid-dg report", "",
              f"{meta['n_runs']} finished runs in {meta['n_configurations']} configurations, written {meta['created']}. "
              "A configuration is (kind, experiment, train sources, test sources, evaluation space); its runs differ "
              "in the seed only. Each number is the mean ± std over seeds of a run's mean over cases; the 95 % CI "
              f"is a percentile bootstrap over cases ({b['n_boot']} resamples, seed {b['seed']}), each case first "
              "averaged over seeds. Rows `mean` weigh every test source (or configuration) the same. Undefined "
              "values (e.g. HD95 with an empty mask) are left out and counted as `undef.`.", ""]

    def section(title: str, t: Table | None, extra: str = "") -> None:
        if t is None:
            return
        lines.extend([f"## {title}", ""] + ([mark, ""] if mark else []) + ([extra, ""] if extra else [])
                     + [to_markdown(t.columns, t.rows), "", f"`tables/{t.name}.csv`, `tables/{t.name}.tex`", ""])

    section(f"Results: {meta['metric']} ({meta['class']})", written["headline"],
            DEGENERATE_FOOTNOTE if any(r.get("n_degenerate") for r in tables["results"]) else "")
    section("All metrics", written["results"], "NSD tolerance per row in `tables/results.csv` (`nsd_tolerance_mm`).")
    section("Generalization gap", written.get("gap"),
            "`val/mean/<metric>` (validation cases of the training sources, the selected checkpoint) minus "
            "`test/mean/<metric>` (held-out sources), per run, then mean ± std over seeds.")
    for m in tables["matrices"]:
        flat = any(c.get("n_degenerate") for r in m["rows"] for c in r["cells"].values())
        section(f"Matrix {m['kind']}/{m['experiment']}", written[f"matrix_{m['name']}"],
                f"![matrix](plots/matrix_{m['name']}.png)" + (f"\n\n{DEGENERATE_FOOTNOTE}" if flat else ""))
    section("Model selection", written.get("selection"),
            "Each rule's checkpoint tested (run.json `selection`): training_domain = best on validation patients "
            "of the training sources (the default), loso = best on a whole held-out training source, last = final "
            "epoch, oracle = best on the test cases themselves (DomainBed's upper bound; never report it as a result).")
    section("Severity agreement", written.get("severity"),
            "Per configuration and measure, over the test cases with both values (each averaged over seeds): "
            "Pearson r and Kendall tau-b with their p; the chi-squared test of the reference and predicted "
            "distributions over the clinical bins 0-1, 1-25, 25-50, 50-75, 75-100 % (PO, PHO, WAL) or over the "
            "integer scores (LSS, LHOS); the fit reference = intercept + slope * predicted with 95 % CIs; the "
            "Bland-Altman bias (mean of predicted - reference) and its limits bias -/+ 1.96 sd. Units are those of "
            "the measure. All statistics in `tables/severity.csv`.")
    plots = [p for p in tables["plots"] if not p["file"].startswith("plots/matrix_")]
    if plots:
        lines += ["## Plots", ""] + [f"- [{p['title']}]({p['file']})" for p in plots] + [""]
    section("Runs used", written["runs"])
    if tables.get("skipped"):  # every run folder left out, with why: a report never shrinks silently
        lines += ["## Skipped runs", "", f"{len(tables['skipped'])} run folder(s) found but not reported:", "",
                  to_markdown(["run folder", "reason"], [[s["path"], s["reason"]] for s in tables["skipped"]]), ""]
    if tables["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in tables["notes"]] + [""]
    return "\n".join(lines) + "\n"

