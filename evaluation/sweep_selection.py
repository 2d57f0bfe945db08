"""Model selection across a sweep (DomainBed, Gulrajani & Lopez-Paz 2021): per selection rule, per held-out
source, per method and per trial (seed), the best (hyperparameters, epoch) over every run of the sweep,
chosen from the runs' epoch records alone; then tables of the chosen checkpoints' test scores and paired
comparisons with a baseline method. Pure functions: no files, no plotting (experiments.select does those).

The choice, as DomainBed's `SelectionMethod.sweep_acc`: within each run (one hyperparameter configuration
of one trial) the rule picks an epoch (evaluation.selection_rules); across the runs of the same method,
held-out source and trial, the configuration whose picked record scores best on the rule's key
(`ACROSS_KEY`). Test-domain numbers enter only after the choice, through the scores handed to `cells` and
`paired_vs_baseline`: `choose_in_sweep` reads nothing but the records' validation keys (and `oracle/`
keys for the oracle rule, which looks at the test cases on purpose and is never the default).
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from evaluation.selection_rules import ORACLE_KEY, VAL_KEY, Record, choose, score
from evaluation.stats import mean_se, paired_difference

# The record key that compares configurations once each run's epoch is picked. `last` picks the final
# validated epoch of every configuration and the configuration by that epoch's validation score: the
# hyperparameters are still chosen on validation, only early stopping is left out.
ACROSS_KEY = {"training_domain": VAL_KEY, "loso": VAL_KEY, "oracle": ORACLE_KEY, "last": VAL_KEY}
MEAN = "mean"


@dataclass(frozen=True)
class Candidate:
    """One finished run of a sweep: which cell it competes for and its epoch records."""
    run: str                      # the run folder (identifies it in the outputs)
    method: str
    holdout: str                  # the held-out (test) source(s), "+"-joined
    trial: int                    # run.seed: runs of one trial compete, trials are averaged
    hparams_id: int = 0           # 0: the method's default configuration (DomainBed's hparams_seed 0)
    hparams: dict = field(default_factory=dict, hash=False, compare=False)
    records: tuple = field(default=(), hash=False, compare=False)
    val_source: str | None = None  # selection.val_source of a loso-validated run

    @property
    def cell(self) -> tuple[str, str, int]:
        return self.method, self.holdout, self.trial


@dataclass(frozen=True)
class Choice:
    rule: str
    candidate: Candidate
    record: Record = field(hash=False, compare=False)
    score: float | None           # the record's ACROSS_KEY value (what won the comparison)

    @property
    def step(self) -> int:
        return int(self.record["step"])


def choose_run(rule: str, c: Candidate) -> tuple[Record | None, float | None]:
    """The record `rule` picks in one run, and its score on the rule's comparison key across runs."""
    rec = choose(rule, list(c.records), val_source=c.val_source)
    return rec, (None if rec is None else score(rec, ACROSS_KEY[rule]))


def choose_in_sweep(rule: str, candidates: Sequence[Candidate]) -> dict[tuple[str, str, int], Choice]:
    """(method, holdout, trial) -> the chosen (run, record). A run whose rule picks no record (no finite
    score) does not compete; a cell none of whose runs qualifies is absent. Ties go to the lower
    `hparams_id` (the default configuration first), then to the run name, so the result never depends on the
    order runs were found. Two runs with the same `hparams_id` in one cell are an error: they differ in
    something the table does not show."""
    if rule not in ACROSS_KEY:
        raise ValueError(f"selection rule {rule!r} has no sweep-level comparison; choose from {sorted(ACROSS_KEY)}")
    groups: dict[tuple[str, str, int], list[Candidate]] = defaultdict(list)
    for c in candidates:
        groups[c.cell].append(c)
    out = {}
    for cell, runs in sorted(groups.items()):
        ids = [c.hparams_id for c in runs]
        if len(set(ids)) != len(ids):
            dup = sorted(c.run for c in runs if ids.count(c.hparams_id) > 1)
            raise ValueError(f"runs {dup} both fill (method, held-out source, trial) {cell} with hyperparameter "
                             "configuration id the same: they differ in something else (select works on the runs "
                             "of one hyperparameter search)")
        best = None
        for c in runs:
            rec, s = choose_run(rule, c)
            if rec is None:
                continue
            key = (s is not None, -math.inf if s is None else s, -c.hparams_id, c.run)
            if best is None or key > best[0]:
                best = (key, Choice(rule, c, rec, s))
        if best is not None:
            out[cell] = best[1]
    return out


def trial_means(case_scores: Mapping[tuple[str, str, int], Mapping[str, float]]) -> dict[tuple[str, str, int], float]:
    """(method, holdout, trial) -> mean over the held-out cases (undefined cases left out; NaN if none)."""
    out = {}
    for cell, cases in case_scores.items():
        vals = [v for v in cases.values() if v is not None and math.isfinite(v)]
        out[cell] = sum(vals) / len(vals) if vals else math.nan
    return out


def cells(values: Mapping[tuple[str, str, int], float], baseline: str = "erm") -> dict:
    """A DomainBed table from per-trial values: rows = methods (the baseline first), columns = held-out
    sources + `mean`. Each cell: mean, standard error and n over trials. The `mean` column is the mean of
    the row's held-out means, defined only when every held-out source has one (DomainBed's `Avg`)."""
    methods = sorted({m for m, _, _ in values}, key=lambda m: (m != baseline, m))
    holdouts = sorted({h for _, h, _ in values})
    table: dict[tuple[str, str], dict] = {}
    for m in methods:
        for h in holdouts:
            vals = [v for (mm, hh, _), v in values.items() if mm == m and hh == h]
            if vals:
                mean, se, n = mean_se(vals)
                table[(m, h)] = {"mean": mean, "se": se, "n": n}
        means = [table[(m, h)]["mean"] for h in holdouts if (m, h) in table]
        ok = len(means) == len(holdouts) and all(math.isfinite(v) for v in means)
        table[(m, MEAN)] = {"mean": sum(means) / len(means) if ok else math.nan, "se": math.nan,
                            "n": min((table[(m, h)]["n"] for h in holdouts if (m, h) in table), default=0)}
    return {"methods": methods, "columns": [*holdouts, MEAN], "cells": table}


def _case_pairs(case_scores, method: str, baseline: str, holdout: str) -> tuple[list[float], list[float]]:
    """Per held-out case, the method's and the baseline's score averaged over the trials both have: one
    pair per case (cases are the independent units; trials repeat the training)."""
    trials = sorted({t for (m, h, t) in case_scores if m == method and h == holdout}
                    & {t for (m, h, t) in case_scores if m == baseline and h == holdout})
    a, b = defaultdict(list), defaultdict(list)
    for t in trials:
        x, y = case_scores[(method, holdout, t)], case_scores[(baseline, holdout, t)]
        for case in sorted(set(x) & set(y)):
            a[case].append(x[case])
            b[case].append(y[case])
    cases = sorted(a)

    def avg(vs):
        vs = [v for v in vs if v is not None and math.isfinite(v)]
        return sum(vs) / len(vs) if vs else math.nan
    return [avg(a[c]) for c in cases], [avg(b[c]) for c in cases]


def paired_vs_baseline(case_scores: Mapping[tuple[str, str, int], Mapping[str, float]], baseline: str = "erm",
                       n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Each method against `baseline` on the same held-out cases: per held-out source and pooled over them
    (`mean`, every source weighing the same), the mean per-case difference (method - baseline), its
    bootstrap CI (`n_boot` resamples of the cases, seeded) and the Wilcoxon signed-rank p-value."""
    methods = sorted({m for m, _, _ in case_scores} - {baseline})
    holdouts = sorted({h for _, h, _ in case_scores})
    rows = []
    for m in methods:
        strata = []
        for h in holdouts:
            a, b = _case_pairs(case_scores, m, baseline, h)
            if not a:
                continue
            strata.append((a, b))
            rows.append({"method": m, "holdout": h, **paired_difference([(a, b)], n_boot=n_boot, seed=seed)})
        if len(strata) > 1:
            rows.append({"method": m, "holdout": MEAN, **paired_difference(strata, n_boot=n_boot, seed=seed)})
    return rows
