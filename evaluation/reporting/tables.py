"""Every number of the report as plain data: mean +- std over seeds, bootstrap CIs, gap, matrices, severity."""
from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evaluation.agreement import MAX_SCORE, agreement
from evaluation.reporting.common import DEFAULT_SPACE, METRICS, PHANTOM_MARK, SEVERITY, ReportError, note
from evaluation.reporting.grouping import Config, by_experiment, cases_over_seeds, config_classes, group_runs, slugify
from evaluation.reporting.runs import RunRecord, skip_reason
from evaluation.selection_rules import DEGENERATE_MARK
from evaluation.stats import bootstrap_ci, bootstrap_ci_strata, summarize


def _cell(config: Config, source: str, cls: str, metric: str, n_boot: int, seed: int) -> dict | None:
    """Mean +- std over seeds of the per-run mean over cases, and a bootstrap CI over seed-averaged cases;
    `n` counts the case values (of every seed) behind it, `n_undefined` the NaN ones left out."""
    per_run, by_case, n, n_undefined = [], defaultdict(list), 0, 0
    for r in config.runs:
        vals = [(c["case"], c.get(metric, math.nan)) for c in r.cases if c["source"] == source and c["class"] == cls]
        if not vals:
            continue
        s = summarize(v for _, v in vals)
        per_run.append((r, s["mean"]))
        n, n_undefined = n + s["n"], n_undefined + s["n_undefined"]
        for case, v in vals:
            by_case[case].append(v)
    if not per_run:
        return None
    case_means = np.array([summarize(v)["mean"] for v in by_case.values()])  # NaN if undefined in every seed
    over_seeds = summarize(v for _, v in per_run)
    low, high = bootstrap_ci(case_means, n_boot=n_boot, seed=seed)
    return {"mean": over_seeds["mean"], "std": over_seeds["std"], "n_seeds": over_seeds["n"], "ci_low": low,
            "ci_high": high, "n_cases": len(by_case), "n": n, "n_undefined": n_undefined,
            "per_seed": [{"seed": r.seed, "value": v} for r, v in per_run],
            "_runs": {str(r.path): v for r, v in per_run}, "_strata": [case_means]}


def _combine(per_run: list[tuple], strata: list, weights: list[float], n_boot: int, seed: int, **counts) -> dict:
    over_seeds = summarize(v for _, v in per_run)
    low, high = bootstrap_ci_strata(strata, weights, n_boot=n_boot, seed=seed)
    return {"mean": over_seeds["mean"], "std": over_seeds["std"], "n_seeds": over_seeds["n"], "ci_low": low,
            "ci_high": high, **counts, "per_seed": [{"seed": s, "value": v} for s, v in per_run]}


def _source_mean(config: Config, cells: list[dict], n_boot: int, seed: int) -> dict:
    """Mean over test sources (each weighs the same, like `test/mean/<metric>`), per run, then over seeds."""
    per_run = [(r.seed, float(np.mean([c["_runs"].get(str(r.path), math.nan) for c in cells]))) for r in config.runs]
    strata = [c["_strata"][0] for c in cells]
    out = _combine(per_run, strata, [1.0] * len(strata), n_boot, seed, n_cases=sum(c["n_cases"] for c in cells),
                   n=sum(c["n"] for c in cells), n_undefined=sum(c["n_undefined"] for c in cells))
    out["_runs"] = {str(r.path): v for r, (_, v) in zip(config.runs, per_run)}
    out["_strata"] = strata
    return out


def _config_average(configs: list[Config], cells: list[dict], n_boot: int, seed: int) -> tuple[dict, str | None]:
    """Average over configurations (e.g. over the held-out sources of LOSO), pairing runs by seed."""
    by_seed = []
    for c, cell in zip(configs, cells):
        seeds = [r.seed for r in c.runs]
        by_seed.append(None if None in seeds or len(set(seeds)) < len(seeds) else
                       {r.seed: cell["_runs"].get(str(r.path), math.nan) for r in c.runs})
    note = None
    if all(by_seed) and (common := sorted(set.intersection(*(set(d) for d in by_seed)))):
        per_run = [(s, float(np.mean([d[s] for d in by_seed]))) for s in common]
        if any(len(d) != len(common) for d in by_seed):
            note = f"seeds {common} (the ones every configuration has)"
    else:
        per_run = [(None, float(np.mean([cell["mean"] for cell in cells])))]
        note = "seeds are not paired across configurations: mean of the configuration means, no std"
    strata, weights = [], []
    for cell in cells:
        strata += cell["_strata"]
        weights += [1.0 / len(cells) / len(cell["_strata"])] * len(cell["_strata"])
    return _combine(per_run, strata, weights, n_boot, seed, n_cases=sum(c["n_cases"] for c in cells),
                    n=sum(c["n"] for c in cells),
                    n_undefined=sum(c["n_undefined"] for c in cells)), note


def _row(config_label: str, data: str, kind: str, experiment: str, space: str, train: str, source: str, cls: str,
         cells: dict, runs: int, tolerance: str = "") -> dict:
    first = next(iter(cells.values()))
    return {"data": data, "kind": kind, "experiment": experiment, "eval_space": space, "config": config_label,
            "train_sources": train, "test_source": source, "class": cls, "n_runs": runs,
            "n_seeds": first["n_seeds"], "n_cases": first["n_cases"], "nsd_tolerance_mm": tolerance,
            "metrics": cells}


def _tolerance(config: Config, cls: str, source: str | None = None) -> str:
    vals = {c["tolerance_mm"] for r in config.runs for c in r.cases
            if c["class"] == cls and (source is None or c["source"] == source) and "tolerance_mm" in c}
    return ",".join(f"{v:g}" for v in sorted(v for v in vals if math.isfinite(v)))


def _stage_value(run: RunRecord, stage: str, metric: str, cls: str) -> float:
    """`<stage>/mean/<metric>[_<class>]` from metrics.json, else the mean of the per-source keys."""
    name = metric if cls == "lesion" else f"{metric}_{cls}"
    m = run.metrics
    if isinstance(m.get(f"{stage}/mean/{name}"), (int, float)):
        return float(m[f"{stage}/mean/{name}"])
    sources = run.train_sources if stage == "val" else run.test_sources
    vals = [float(m[k]) for s in sources if isinstance(m.get(k := f"{stage}/{s}/{name}"), (int, float))]
    return float(np.mean(vals)) if vals else math.nan


def _gap_rows(configs: list[Config], metric: str, cls: str, notes: list) -> list[dict]:
    rows = []
    for c in configs:
        per = [(r.seed, _stage_value(r, "val", metric, cls), _stage_value(r, "test", metric, cls)) for r in c.runs]
        if all(math.isnan(v) and math.isnan(t) for _, v, t in per):
            continue
        val, test = summarize(v for _, v, _ in per), summarize(t for _, _, t in per)
        gap = summarize(v - t for _, v, t in per)
        if gap["n_undefined"]:
            note(notes, f"gap of {c.label!r} ({metric}, {cls}): {gap['n_undefined']} run(s) lack the validation "
                        "or test value in metrics.json and are left out")
        rows.append({"data": c.data, "config": c.label, "metric": metric, "class": cls, "n_seeds": gap["n"],
                     "val_mean": val["mean"], "val_std": val["std"], "test_mean": test["mean"],
                     "test_std": test["std"], "gap_mean": gap["mean"], "gap_std": gap["std"],
                     "per_seed": [{"seed": s, "val": v, "test": t, "gap": v - t} for s, v, t in per]})
    return rows


SELECTION_ORDER = ("training_domain", "loso", "last", "oracle")


def _selection_rows(configs: list[Config]) -> list[dict]:
    """Test Dice (mean over test sources, `test/mean/selection_dice`) of every checkpoint a run recorded
    (run.json `selection`), mean ± std over seeds: DomainBed's model selections side by side. Oracle
    looked at the test labels: an upper bound, never a result."""
    rows = []
    for c in configs:
        recorded = [r.info.get("selection") or {} for r in c.runs]
        names = [n for n in SELECTION_ORDER if any(n in sel.get("test", {}) for sel in recorded)]
        if len(names) < 2:
            continue
        row = {"data": c.data, "config": c.label, "headline": recorded[0].get("method"), "n_seeds": len(c.runs)}
        for n in names:
            vals = [sel.get("test", {}).get(n, {}).get("test/mean/selection_dice", math.nan) for sel in recorded]
            stats = summarize(vals)
            row[f"{n}_mean"], row[f"{n}_std"] = stats["mean"], stats["std"]
        rows.append(row)
    return rows


# agreement() names -> the report's Bland-Altman columns (those of evaluation.stats.bland_altman)
_BLAND_ALTMAN = {"ba_mean": "bias", "ba_sd": "sd", "ba_low": "loa_low", "ba_high": "loa_high"}


def severity_agreement(ref: Sequence[float], pred: Sequence[float], kind: str) -> tuple[dict, str | None]:
    """`evaluation.agreement.agreement` over the pairs where both values are defined (+ `n_undefined`), and
    why the chi-squared test was left out, if it was.

    A score (LSS, LHOS) averaged over seeds that disagree is no longer an integer score: the chi-squared test
    over score values is then undefined (NaN), the other statistics are those of the averaged values. Raises
    ValueError for values outside the range of `kind`.
    """
    pairs = np.asarray([ref, pred], dtype=np.float64).reshape(2, -1)
    ok = np.isfinite(pairs).all(axis=0)
    r, p = pairs[0, ok], pairs[1, ok]
    why = None
    if kind == "score" and not np.array_equal(pairs[:, ok], np.round(pairs[:, ok])):
        if not ((pairs[:, ok] >= 0) & (pairs[:, ok] <= MAX_SCORE)).all():
            raise ValueError(f"scores must lie in 0..{MAX_SCORE}")
        # Only the chi-squared test depends on `kind` (its categories); "percent" accepts 0..20 unchanged.
        out = agreement(r, p, "percent") | {"chi2": math.nan, "chi2_p": math.nan, "chi2_dof": math.nan}
        why = "cases averaged over seeds hold non-integer scores, so no chi-squared test over score values"
    else:
        out = agreement(r, p, kind)
    out = {_BLAND_ALTMAN.get(k, k): v for k, v in out.items()}
    return {**out, "n_undefined": int((~ok).sum())}, why


def _severity_rows(configs: list[Config], notes: list) -> list[dict]:
    """Per configuration and severity measure: agreement of reference and predicted values over the cases,
    each case averaged over seeds (the values the severity plots show)."""
    rows = []
    for c in configs:
        for s, measure in SEVERITY.items():
            cases = cases_over_seeds(c, "lesion", (f"ref_{s}", f"pred_{s}"))
            ref, pred = [v[f"ref_{s}"] for v in cases.values()], [v[f"pred_{s}"] for v in cases.values()]
            try:
                agr, why = severity_agreement(ref, pred, measure.kind)
            except ValueError as e:
                raise ReportError(f"configuration {c.label!r}, {s}: {e} (per_case.csv of "
                                  f"{', '.join(str(r.path) for r in c.runs)})") from None
            if why:
                note(notes, f"severity agreement of {c.label!r}, {s}: {why}")
            if agr["n"]:
                rows.append({"data": c.data, "config": c.label, "measure": s, "kind": measure.kind, **agr,
                             "_slug": c.slug})
    return rows


def degenerate_runs(config: Config) -> list[RunRecord]:
    """The configuration's runs whose headline model selection was degenerate (run.json
    `selection.degenerate`: validation score constant or undefined at every check; the last epoch was tested)."""
    return [r for r in config.runs if (r.info.get("selection") or {}).get("degenerate")]


def _matrices(configs: list[Config], cells: dict, metric: str, cls: str, notes: list) -> list[dict]:
    """Train set (LOSO: held-out source) x test source tables of `metric`, one per (kind, experiment, space)."""
    out = []
    for (kind, experiment, space), cs in by_experiment(configs).items():
        if len(cs) < 2:
            if len(configs) >= 2:
                note(notes, f"no matrix for {kind}/{experiment} ({space} space): it has one configuration only")
            continue
        rows: dict[str, dict] = {}
        for c in cs:
            row = rows.setdefault(c.row_label, {"train": c.row_label, "train_sources": "+".join(c.first.train_sources),
                                                "data": c.data, "cells": {}})
            for src, by_metric in cells.get((c.slug, cls), {}).items():
                if src == "mean" or metric not in by_metric:
                    continue
                if src in row["cells"] or row["data"] != c.data:
                    note(notes, f"matrix {kind}/{experiment}: cell ({c.row_label}, {src}) also comes from "
                                f"{c.label!r}; kept the first")
                    continue
                cell = by_metric[metric]
                row["cells"][src] = {k: cell[k] for k in ("mean", "std", "n_seeds", "ci_low", "ci_high")}
                row["cells"][src]["n_degenerate"] = len(degenerate_runs(c))
        columns = sorted({s for r in rows.values() for s in r["cells"]})
        for r in rows.values():
            r["row_mean"] = summarize(x["mean"] for x in r["cells"].values())["mean"]
        out.append({"name": slugify(f"{kind}_{experiment}_{space}"), "kind": kind, "experiment": experiment,
                    "eval_space": space, "metric": metric, "class": cls, "columns": columns,
                    "rows": [rows[k] for k in sorted(rows)]})
    return out


def _config_rows(c: Config, n_boot: int, seed: int) -> tuple[list[dict], dict, dict]:
    """One configuration's result rows; its cells {(slug, class): {source: {metric: cell}}}; and its level
    {(slug, class): {metric: cell}}, the test-mean cell (the single source's, or the mean over sources)."""
    rows, cells, level = [], {}, {}
    r0, metrics = c.first, [m for m in METRICS if any(m in r.columns for r in c.runs)]
    meta = (c.data, r0.kind, r0.experiment, r0.eval_space, "+".join(r0.train_sources))
    for k in config_classes(c):
        per_source = {}
        for src in r0.test_sources:
            by_metric = {m: x for m in metrics if (x := _cell(c, src, k, m, n_boot, seed))}
            if by_metric:
                per_source[src] = by_metric
                rows.append(_row(c.label, *meta, src, k, by_metric, len(c.runs), _tolerance(c, k, src)))
        if len(per_source) >= 2:
            mean = {m: _source_mean(c, [p[m] for p in per_source.values() if m in p], n_boot, seed) for m in metrics}
            rows.append(_row(c.label, *meta, "mean", k, mean, len(c.runs), _tolerance(c, k)))
            level[(c.slug, k)] = mean
        elif per_source:
            level[(c.slug, k)] = next(iter(per_source.values()))
        cells[(c.slug, k)] = per_source
    return rows, cells, level


def _average_rows(configs: list[Config], level: dict, metric: str, n_boot: int, seed: int, notes: list) -> list[dict]:
    """Per (kind, experiment, space) with >= 2 configurations: the average over them (e.g. over LOSO holdouts)."""
    rows = []
    for (kind, experiment, space), cs in by_experiment(configs).items():
        if len(cs) < 2:
            continue
        if len({c.data for c in cs}) > 1:
            note(notes, f"no average over {kind}/{experiment} configurations: they mix phantom and real data")
            continue
        for k in sorted({k for c in cs for (slug, k) in level if slug == c.slug}, key=lambda x: (x != "lesion", x)):
            averaged = {}
            for m in METRICS:
                have = [(c, level[(c.slug, k)][m]) for c in cs if m in level.get((c.slug, k), {})]
                if len(have) >= 2:
                    averaged[m], why = _config_average([c for c, _ in have], [x for _, x in have], n_boot, seed)
                    averaged[m]["n_configurations"] = len(have)
                    if why and m == metric:
                        note(notes, f"average over {kind}/{experiment} ({k}): {why}")
            if averaged:
                n = max(x["n_configurations"] for x in averaged.values())
                label = f"{kind}/{experiment}: average over {n} configurations"
                rows.append(_row(label + ("" if space == DEFAULT_SPACE else f" ({space} space)"), cs[0].data,
                                 kind, experiment, space, "", "mean", k, averaged, sum(len(c.runs) for c in cs)))
    return rows


def build_tables(runs: Sequence[RunRecord], metric: str = "dice", cls: str = "lesion", n_boot: int = 2000,
                 seed: int = 0, skipped: Sequence[str] = ()) -> dict:
    """Every number of the report, JSON-ready except the `_configs` entry (the grouped runs, for plots)."""
    if not runs:
        raise ReportError("no finished run to report on")
    if metric not in METRICS:
        raise ReportError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    skipped_runs = [{"path": str(p), "reason": skip_reason(Path(p)) or "finished after the report started"}
                    for p in skipped]
    notes: list[str] = [f"skipped unfinished run {s['path']} ({s['reason']})" for s in skipped_runs]
    configs = group_runs(runs)
    results, cells, level = [], {}, {}
    for c in configs:
        rows, c_cells, c_level = _config_rows(c, n_boot, seed)
        results += rows
        cells.update(c_cells)
        level.update(c_level)
        if not any(metric in r.columns for r in c.runs):
            note(notes, f"{c.label!r}: per_case.csv has no {metric!r} column")
    results += _average_rows(configs, level, metric, n_boot, seed, notes)
    flat_runs = {c.label: len(degenerate_runs(c)) for c in configs}
    for r in results:
        r["n_degenerate"] = flat_runs.get(r["config"], 0)
    for c in configs:
        for r in degenerate_runs(c):
            why = [ck.get("degenerate") for ck in (r.info.get("selection") or {}).get("checkpoints", {}).values()
                   if ck.get("degenerate")]
            why_text = why[0] if why else "validation score constant or undefined"
            note(notes, f"{DEGENERATE_MARK} {r.path}: model selection degenerate ({why_text}); its last epoch was tested")
    gap = _gap_rows(configs, "dice", "lesion", notes)
    if (metric, cls) != ("dice", "lesion"):
        gap += _gap_rows(configs, metric, cls, notes)
    phantom = any(r.data == "phantom" for r in runs)
    return {
        "meta": {"metric": metric, "class": cls, "bootstrap": {"n_boot": n_boot, "alpha": 0.05, "seed": seed},
                 "phantom": phantom, "marker": PHANTOM_MARK if phantom else None, "n_runs": len(runs),
                 "n_configurations": len(configs), "skipped": list(skipped),
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S")},
        "runs": [{"data": r.data, "kind": r.kind, "experiment": r.experiment, "config": c.label, "seed": r.seed,
                  "selection": str((r.info.get("selection") or {}).get("method") or "")
                  + (f" {DEGENERATE_MARK}degenerate" if (r.info.get("selection") or {}).get("degenerate") else ""),
                  "config_hash": r.config_hash, "name": r.name, "path": str(r.path), "eval_space": r.eval_space,
                  "train_sources": list(r.train_sources), "test_sources": list(r.test_sources),
                  "wall_s": r.info.get("wall_s"), "plan": _plan_cell(r.plan), "plan_hash": r.plan.get("hash"),
                  "plan_edited": r.plan.get("edited", False)} for c in configs for r in c.runs],
        "configurations": [{"config": c.label, "slug": c.slug, "data": c.data, "seeds": [r.seed for r in c.runs]}
                           for c in configs],
        "results": results, "gap": gap, "matrices": _matrices(configs, cells, metric, cls, notes),
        "severity": _severity_rows(configs, notes), "selection": _selection_rows(configs), "notes": notes,
        "skipped": skipped_runs,
        "plots": [], "_configs": configs,
    }


def _plan_cell(plan: dict) -> str:
    """A run's plan.json in one cell: cases per role and source (`train covid19_20 11, ctseg 15; val ...`),
    marked `EDITED PLAN` when the run was trained from a plan file whose roles or settings had been edited."""
    if not plan:
        return ""
    parts = ["; ".join(f"{role} " + ", ".join(f"{src} {n}" for src, n in sorted(srcs.items()))
                       for role, srcs in plan.get("cases", {}).items())]
    if plan.get("from_plan"):
        parts.append(("EDITED PLAN " if plan.get("edited") else "plan ") + str(plan["from_plan"]))
    return " | ".join(p for p in parts if p)
