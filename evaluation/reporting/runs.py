"""Run folders: finding finished ones, reading run.json / metrics.json / per_case.csv into RunRecords.

The per-case table is validated while read (numbers, field counts, duplicate cases, stray sources, one
evaluation space per run); anything a report cannot trust raises ReportError naming the file and line.
"""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from evaluation.records import VARIANT_DEFAULTS, RunInfo
from evaluation.reporting.common import DEFAULT_SPACE, METRICS, ReportError, warn
from evaluation.selection_rules import read_records

__all__ = ["VARIANT_DEFAULTS", "RunRecord", "read_run", "read_per_case", "find_run_dirs", "collect_runs"]


@dataclass
class RunRecord:
    path: Path
    kind: str
    name: str
    data: str
    experiment: str
    seed: int | None
    config_hash: str | None
    train_sources: tuple[str, ...]
    test_sources: tuple[str, ...]
    eval_space: str
    train_label: str  # a named train set from run.json `train_set`, else the sources joined by "+"
    metrics: dict
    cases: list[dict]  # test rows: source, case, class, floats per metric/severity column (NaN = undefined)
    columns: tuple[str, ...] = ()  # METRICS present in per_case.csv
    info: RunInfo = field(default_factory=RunInfo)  # run.json, typed (older files: defaults)
    plan: dict = field(default_factory=dict)  # plan.json's split summary (`plan_summary`); empty for older runs

    @property
    def method(self) -> str:
        return str(self.info.method)

    @property
    def harmonize_off(self) -> str:
        """Harmonizer steps switched off (`none`, `decode`, `decode+resample`, ...; sweeps/harmonization.yaml)."""
        return str(self.info.harmonize_off)

    @property
    def key(self) -> tuple:
        return self.kind, self.experiment, self.train_sources, self.test_sources, self.eval_space


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_config_yaml(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:  # any parse error: these keys are only a fallback
        warn(f"{path}: unreadable ({e}); falling back without it")
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _number(text: str | None, where: str, column: str) -> float:
    t = (text or "").strip()
    if not t:
        return math.nan
    try:
        return float(t)
    except ValueError:
        raise ReportError(f"{where}: column {column!r} holds {text!r}, which is not a number") from None


def _class_columns(header: Sequence[str]) -> dict[str, dict[str, str]]:
    """Old tables without a `class` column: `dice` is the lesion, `dice_lung` the lung, and so on."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for col in header:
        for m in METRICS:
            if col == m:
                out["lesion"][m] = col
            elif col.startswith(m + "_"):
                out[col[len(m) + 1:]][m] = col
    return out


def read_per_case(path: Path, split: str = "test") -> tuple[list[dict], tuple[str, ...]]:
    """Rows of `split` as dicts (source, case, class, float values) and the METRICS columns present."""
    rows: list[dict] = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            legacy = "class" not in header
            by_class = _class_columns(header) if legacy else {}
            metrics = tuple(m for m in METRICS if m in header) if not legacy else tuple(
                m for m in METRICS if any(m in cols for cols in by_class.values()))
            missing = sorted({"source", "case"} - set(header))
            if missing or not metrics:
                raise ReportError(f"{path}: not a per-case table: missing column(s) {missing or list(METRICS)} "
                                  f"(header: {header})")
            extra = [c for c in header if c.startswith(("ref_", "pred_")) or c == "tolerance_mm"]
            for raw in reader:
                where = f"{path}, line {reader.line_num}"
                if None in raw or None in raw.values():
                    raise ReportError(f"{where}: the row does not have the header's {len(header)} fields "
                                      "(truncated or corrupt file)")
                if raw.get("split", "") not in ("", split):
                    continue
                base = {"source": raw["source"], "case": raw["case"], "space": raw.get("space") or ""}
                base.update({c: _number(raw[c], where, c) for c in extra})
                if not legacy:
                    if not raw["class"]:
                        raise ReportError(f"{where}: empty `class`")
                    rows.append({**base, "class": raw["class"], **{m: _number(raw[m], where, m) for m in metrics}})
                    continue
                for cls, cols in by_class.items():
                    if cls != "lesion" and not any(raw[c].strip() for c in cols.values()):
                        continue  # an old table leaves a class the source does not annotate empty
                    rows.append({**base, "class": cls, **{m: _number(raw[c], where, c) for m, c in cols.items()}})
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ReportError(f"{path}: unreadable per-case table ({e})") from e
    seen = set()
    for r in rows:
        k = (r["source"], r["case"], r["class"])
        if k in seen:
            raise ReportError(f"{path}: case {k[1]!r} of source {k[0]!r}, class {k[2]!r} appears twice")
        seen.add(k)
    return rows, metrics


def plan_summary(run_dir: Path) -> dict:
    """What the report shows of a run's plan.json: cases per role and source, and whether the run was
    trained from a plan file (`experiments.train --plan`) that had been edited. Empty without a plan."""
    path = run_dir / "plan.json"
    if not path.is_file():
        return {}
    plan = _read_json(path)
    cases = plan.get("cases") or {}
    counts: dict[str, dict[str, int]] = {}
    for role, keys in (plan.get("roles") or {}).items():
        for key in keys:
            src = (cases.get(key) or {}).get("source") or key.split("/", 1)[0]
            counts.setdefault(role, {}).setdefault(src, 0)
            counts[role][src] += 1
    origin = plan.get("origin") or {}
    return {"cases": counts, "hash": plan.get("hash"), "from_plan": origin.get("path"),
            "edited": bool(origin.get("edited"))}


def read_run(run_dir: Path) -> RunRecord:
    info = RunInfo.from_json(_read_json(run_dir / "run.json"))
    metrics = _read_json(run_dir / "metrics.json")
    cfg: dict | None = None

    def config_value(*keys):
        nonlocal cfg
        if cfg is None:
            cfg = _read_config_yaml(run_dir)
        node = cfg
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        return node

    seed = info.seed
    if seed is None:
        seed = config_value("run", "seed")
    try:
        seed = None if seed is None else int(seed)
    except (TypeError, ValueError):
        warn(f"{run_dir}: seed {seed!r} is not an integer; treated as unknown")
        seed = None
    if seed is None:
        warn(f"{run_dir}: no seed in run.json or config.yaml; treated as an unknown seed")
    experiment = info.experiment or config_value("experiment")
    if not experiment:
        warn(f"{run_dir}: no experiment in run.json or config.yaml; grouped as 'unknown'")
        experiment = "unknown"
    # a protocol preset and a few-shot task are part of what was run: never averaged across
    # ...and so is what trained, where it is not the default: runs of two DG methods are two configurations
    variant = [f"{k}={getattr(info, k)}" for k, default in VARIANT_DEFAULTS.items() if getattr(info, k) != default]
    experiment = "/".join(str(x) for x in (experiment, info.preset, info.task, *variant) if x)
    data, mdata = info.data, metrics.get("data")
    if data and mdata and data != mdata:
        raise ReportError(f"{run_dir}: run.json says data={data!r} but metrics.json says {mdata!r}")
    data = data or mdata
    if not data:
        warn(f"{run_dir}: neither run.json nor metrics.json says whether the data is phantom or real")
        data = "unknown"
    cases, columns = read_per_case(run_dir / "per_case.csv", "test")
    if not cases:
        warn(f"{run_dir / 'per_case.csv'}: no test rows")
    found = sorted({c["source"] for c in cases})
    test = tuple(sorted(info.test_sources or found))
    train = info.train_sources
    if not train:
        sources, holdout = config_value("data", "sources") or [], config_value("data", "holdout")
        train = [s for s in sources if s != holdout] if holdout else []
    if not train:
        raise ReportError(f"{run_dir / 'run.json'}: no train_sources (and config.yaml cannot tell them)")
    stray = sorted(set(found) - set(test))
    if stray:
        raise ReportError(f"{run_dir / 'per_case.csv'}: rows for {stray}, which run.json does not list as test "
                          f"sources {list(test)}")
    spaces = sorted({c["space"] for c in cases} - {""})
    if len(spaces) > 1:
        raise ReportError(f"{run_dir / 'per_case.csv'}: cases scored in several spaces {spaces}")
    space = info.eval_space or (spaces[0] if spaces else DEFAULT_SPACE)
    named = info.train_set
    return RunRecord(path=run_dir.resolve(), kind=info.kind or run_dir.parent.name,
                     name=info.name or run_dir.name, data=str(data), experiment=str(experiment), seed=seed,
                     config_hash=info.config_hash, train_sources=tuple(sorted(train)), test_sources=test,
                     eval_space=str(space), train_label=named if isinstance(named, str) and named else
                     "+".join(sorted(train)), metrics=metrics, cases=cases, columns=columns, info=info,
                     plan=plan_summary(run_dir))


# What marks a run folder from its start (experiments.runfolder.MARKER, written when the folder is created):
# a run killed before its results has no run.json. Folders of older versions: config.yaml beside checkpoints/
# (a bare config.yaml is not enough: W&B writes one under wandb/run-*/files/).
RUN_MARKER = ".covid-dg-run"


def _is_run_dir(d: Path) -> bool:
    return ((d / "run.json").is_file() or (d / RUN_MARKER).is_file()
            or ((d / "config.yaml").is_file() and (d / "checkpoints").is_dir()))


def skip_reason(d: Path) -> str | None:
    """Why run folder `d` is not in a report (None: it is finished): killed, failed or still running before
    its results (no run.json; how far its records.jsonl got), stopped while writing them (no `done`), or a
    finished run missing a result file."""
    if not (d / "run.json").is_file():
        epochs = [int(r["epoch"]) for r in read_records(d) if isinstance(r.get("epoch"), int)]
        progress = f"; records.jsonl reaches epoch {max(epochs)}" if epochs else "; no validated epoch recorded"
        return f"no run.json: killed, failed or still running{progress}"
    if not (d / "done").exists():
        return "no `done` marker: stopped while writing its results (rerun its command to finish it)"
    missing = [f for f in ("metrics.json", "per_case.csv") if not (d / f).is_file()]
    if missing:
        return f"marked done but missing {', '.join(missing)}"
    return None


def find_run_dirs(paths: Iterable[str | Path], skipped: list | None = None) -> list[Path]:
    """Finished run folders (run.json + done + results) at or below each path, each once, in a stable order;
    every other run folder is warned about with its reason (skip_reason) and added to `skipped`."""
    found, seen = [], set()
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"{p}: no such file or folder")
        if _is_run_dir(p):
            dirs = [p]
        else:
            candidates = {f.parent for name in ("run.json", RUN_MARKER, "config.yaml") for f in p.rglob(name)}
            dirs = sorted(d for d in candidates if _is_run_dir(d))
        for d in dirs:
            if d.resolve() in seen:
                continue
            seen.add(d.resolve())
            why = skip_reason(d)
            if why:
                warn(f"skipping unfinished run {d} ({why})")
                if skipped is not None:
                    skipped.append(str(d.resolve()))
                continue
            found.append(d)
    return found


def collect_runs(paths: Iterable[str | Path], skipped: list | None = None) -> list[RunRecord]:
    """Read every finished run at or below `paths`; unfinished ones are warned about (and added to `skipped`)."""
    return [read_run(d) for d in find_run_dirs(paths, skipped)]

