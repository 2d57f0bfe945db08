"""Model selection as pure functions over a run's epoch records (`records.jsonl`), after the fact.

A run appends one record per validated epoch to `records.jsonl` in its folder
(experiments.epoch_records.EpochRecords), one JSON object a line:

    {"epoch": 4,                      # the epoch's number, 1-based as printed (`[epoch 4/N]`; epoch_number)
     "step": 64,                      # global_step: identifies the weights (run.json's `global_step`)
     "checkpoints": ["checkpoints/best-epoch003.ckpt"],   # files written with these weights, relative to
                                      # the run folder ([] if none; a rule may have replaced them since)
     "val/covid19_20/dice": 0.41, ..., "val/mean/selection_dice": 0.38,   # every `val/` key as logged
     "oracle/mosmed/dice": 0.29, ...} # `oracle/` (test-domain) keys only where the oracle is requested

Each rule takes the records (any order) and returns the chosen record, or None when no record qualifies.
A record lacking the rule's metric, or holding NaN/inf there, is never chosen by that rule. Imports
nothing from `experiments`: the same functions serve a run, a report or a sweep-wide selection.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

RECORDS = "records.jsonl"
VAL_KEY = "val/mean/selection_dice"        # segmentation aggregate(): lesion Dice, or mean Dice of a lung task
ORACLE_KEY = "oracle/mean/selection_dice"  # the same score on the test cases (oracle selection only)

Record = dict
Rule = Callable[..., "Record | None"]
RULES: dict[str, Rule] = {}


def epoch_number(lightning_epoch: int) -> int:
    """The epoch's number as covid-dg writes it everywhere (printed lines, records.jsonl, run.json,
    checkpoint file names, reports): 1-based, `[epoch 4/N]`. Lightning counts from 0 (trainer.current_epoch,
    a checkpoint's `epoch`): convert here, at the boundary, and nowhere else (issue 19: run.json called the
    same weights epoch 11 and epoch 12)."""
    return int(lightning_epoch) + 1


def rule(name: str) -> Callable[[Rule], Rule]:
    """Register a selection rule under `name` (RULES)."""
    def register(fn: Rule) -> Rule:
        if name in RULES:
            raise ValueError(f"selection rule {name!r} registered twice")
        RULES[name] = fn
        return fn
    return register


def choose(name: str, records: Sequence[Record], **context) -> Record | None:
    """The record rule `name` picks (context: e.g. `val_source` for `loso`)."""
    if name not in RULES:
        raise ValueError(f"selection rule {name!r} unknown; choose from {sorted(RULES)}")
    return RULES[name](records, **context)


def _order(r: Record) -> tuple[int, int]:
    return int(r.get("epoch", -1)), int(r.get("step", -1))


def score(r: Record, key: str) -> float | None:
    """The record's finite value at `key`, else None (missing, null, NaN, inf, not a number)."""
    v = r.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def best_by(records: Iterable[Record], key: str) -> Record | None:
    """The record with the highest finite `key`. Ties go to the LATER epoch (then step): a validation score
    that stays flat (e.g. one validation patient at Dice 0 every check, issue 19) would otherwise pick an
    early, undertrained epoch silently; the later epoch is at least as good on validation and trained
    longer. The in-run checkpoints (experiments.selection) break ties the same way."""
    scored = [(s, _order(r), r) for r in records if (s := score(r, key)) is not None]
    if not scored:
        return None
    return max(scored, key=lambda t: (t[0], t[1]))[2]


# the score each rule picks by (rules not listed pick by none)
RULE_KEYS = {"training_domain": VAL_KEY, "loso": VAL_KEY, "oracle": ORACLE_KEY}
DEGENERATE_MARK = "†"  # reports and matrices mark results whose model selection was degenerate


def degenerate(records: Sequence[Record], key: str) -> str | None:
    """Why a selection by `key` over these records chooses nothing real, or None when it does: `key` undefined
    (missing, NaN, inf) at every validation check, or at most one distinct value across two or more checks
    (e.g. one validation patient at Dice 0 every time). The run then tests its last epoch instead, says so,
    and records `selection.degenerate` (issue 19: a flat score silently picked an early, undertrained epoch)."""
    values = [score(r, key) for r in records]
    defined = [v for v in values if v is not None]
    if not values:
        return None  # no validation check at all: the preflight refuses that before training
    if not defined:
        return f"{key} is undefined at every one of the {len(values)} validation check(s)"
    if len(values) >= 2 and len(set(defined)) == 1:
        undefined = f" ({len(values) - len(defined)} undefined)" if len(defined) < len(values) else ""
        return f"{key} is {defined[0]:.4g} at every one of the {len(values)} validation checks{undefined}"
    return None


def validated_sources(r: Record, stage: str = "val") -> set[str]:
    """The sources a record's `stage` scored (aggregate() logs `{stage}/{source}/cases` for each)."""
    return {k.split("/")[1] for k in r if k.startswith(f"{stage}/") and k.endswith("/cases")
            and k.count("/") == 2 and k.split("/")[1] != "mean"}


@rule("training_domain")
def training_domain(records: Sequence[Record], **_) -> Record | None:
    """Best mean validation score over the training sources' validation patients (`val/mean/selection_dice`)."""
    return best_by(records, VAL_KEY)


@rule("loso")
def loso(records: Sequence[Record], val_source: str | None = None, **_) -> Record | None:
    """Best score on the training source held out whole for validation (`selection.method=loso`: the split
    validates on that source alone, so `val/mean/selection_dice` is its score). With `val_source`, only
    records whose validation scored exactly that source qualify: a run validating on patients of trained
    sources is no leave-one-source-out validation."""
    if val_source is not None:
        records = [r for r in records if validated_sources(r) == {val_source}]
    return best_by(records, VAL_KEY)


@rule("oracle")
def oracle(records: Sequence[Record], **_) -> Record | None:
    """Best mean score on the test domain itself: an upper bound that saw test labels, never the default."""
    return best_by(records, ORACLE_KEY)


@rule("last")
def last(records: Sequence[Record], **_) -> Record | None:
    """The last validated epoch's record (latest epoch, then step). Not necessarily the run's `last.ckpt`:
    a final epoch without validation has no record."""
    return max(records, key=_order, default=None)


def read_records(path: str | Path) -> list[Record]:
    """The records of a `records.jsonl` (or of the run folder holding one), in file order; a line that is
    not a whole JSON object (a write cut short by a kill) is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORDS
    out = []
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "epoch" in r:
            out.append(r)
    return out
