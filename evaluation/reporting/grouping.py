"""Grouping runs into configurations (repeats over seeds) and averaging per-case values over seeds."""
from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from evaluation.reporting.common import DEFAULT_SPACE, ReportError, warn
from evaluation.reporting.runs import RunRecord
from evaluation.stats import summarize


@dataclass
class Config:
    """The runs of one configuration (repeats over seeds), sorted by seed."""
    runs: list[RunRecord]
    slug: str = ""

    @property
    def first(self) -> RunRecord:
        return self.runs[0]

    @property
    def data(self) -> str:
        return self.first.data

    @property
    def label(self) -> str:
        r = self.first
        core = (f"holdout {r.test_sources[0]}" if r.kind == "loso" and len(r.test_sources) == 1
                else f"{r.train_label} -> {'+'.join(r.test_sources)}")
        space = "" if r.eval_space == DEFAULT_SPACE else f" ({r.eval_space} space)"
        return f"{r.kind}/{r.experiment}: {core}{space}"

    @property
    def row_label(self) -> str:
        """Row of a train x test matrix: the held-out source for LOSO, else the train set."""
        r = self.first
        return r.test_sources[0] if r.kind == "loso" and len(r.test_sources) == 1 else r.train_label


def slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-")


def group_runs(runs: Sequence[RunRecord]) -> list[Config]:
    """Configurations in a stable order. Phantom and real runs in one configuration are an error."""
    by_key: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in runs:
        by_key[r.key].append(r)
    configs, slugs = [], set()
    for rs in sorted(by_key.values(), key=lambda rs: (Config(rs).label, rs[0].key)):
        rs = sorted(rs, key=lambda r: (r.seed is None, r.seed or 0, str(r.path)))
        c = Config(rs)
        datas = sorted({r.data for r in rs})
        if len(datas) > 1:
            listing = "; ".join(f"{r.path} ({r.data})" for r in rs)
            raise ReportError(f"configuration {c.label!r} mixes {' and '.join(datas)} runs, which must never be "
                              f"averaged together; report them separately: {listing}")
        # few-shot folds are repeats like seeds: a (seed, fold) pair identifies one
        seeds = [(r.seed, r.info.get("fold")) for r in rs if r.seed is not None]
        if len(set(seeds)) < len(seeds):
            warn(f"configuration {c.label!r} has several runs with one seed {sorted(s for s, _ in seeds)}: they are treated as "
                 "repeats, but probably differ in something else (e.g. a command-line override)")
        slug, n = slugify(c.label), 1
        while slug in slugs:
            n += 1
            slug = f"{slugify(c.label)}-{n}"
        slugs.add(slug)
        c.slug = slug
        configs.append(c)
    return configs


def by_experiment(configs: Sequence[Config]) -> dict[tuple, list[Config]]:
    """Configurations by (kind, experiment, evaluation space), in order: each group gives a matrix and an average."""
    groups: dict[tuple, list[Config]] = defaultdict(list)
    for c in configs:
        groups[(c.first.kind, c.first.experiment, c.first.eval_space)].append(c)
    return groups


def config_classes(config: Config) -> list[str]:
    found = {c["class"] for r in config.runs for c in r.cases}
    return sorted(found, key=lambda x: (x != "lesion", x))


def cases_over_seeds(config: Config, cls: str, columns: Sequence[str]) -> dict[tuple[str, str], dict[str, float]]:
    """Per (source, case): each column averaged over the seeds where it is defined (NaN where it never is)."""
    acc: dict = defaultdict(lambda: defaultdict(list))
    for r in config.runs:
        for c in r.cases:
            if c["class"] == cls:
                for col in columns:
                    acc[(c["source"], c["case"])][col].append(c.get(col, math.nan))
    return {k: {col: summarize(v[col])["mean"] for col in columns} for k, v in sorted(acc.items())}

