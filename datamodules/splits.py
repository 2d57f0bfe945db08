"""Patient-grouped splits and the leakage checks every split passes before training sees it.

A split is pure data: which cases train, which select the model (validation) and which test. LOSO
is the transfer split with "all other sources" as training sources. Validation always comes from
the training sources, so model selection never looks at a held-out source.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from datamodules.cases import Case


class LeakageError(AssertionError):
    """A held-out source or patient reached training or model selection."""


@dataclass(frozen=True)
class Split:
    train: tuple[Case, ...]
    val: tuple[Case, ...]
    test: tuple[Case, ...]
    train_sources: tuple[str, ...]
    test_sources: tuple[str, ...]

    def summary(self) -> list[dict]:
        rows = []
        for role in ("train", "val", "test"):
            by_src: dict[str, list[Case]] = defaultdict(list)
            for c in getattr(self, role):
                by_src[c.source].append(c)
            for src, cs in sorted(by_src.items()):
                rows.append({"role": role, "source": src, "cases": len(cs), "patients": len({c.patient_id for c in cs})})
        return rows


def _stable_rank(text: str, seed: int) -> int:
    # Hash-based order: a patient's side depends only on its id and the seed, not on which other cases
    # happen to be present, so adding a case never reshuffles everybody else.
    return int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()[:12], 16)


def group_holdout(cases: Sequence[Case], fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Split cases of one source by patient: about `fraction` of patients (at least one when there are
    two or more) go to the second list."""
    patients = sorted({c.patient_id for c in cases}, key=lambda p: _stable_rank(p, seed))
    n_out = int(round(fraction * len(patients)))
    if fraction > 0 and len(patients) >= 2:
        n_out = min(max(n_out, 1), len(patients) - 1)
    out = set(patients[:n_out])
    return [c for c in cases if c.patient_id not in out], [c for c in cases if c.patient_id in out]


def transfer_split(cases: Iterable[Case], train_sources: Sequence[str], test_sources: Sequence[str],
                   val_fraction: float, seed: int) -> Split:
    """Train on `train_sources` (minus a patient-grouped validation part), test on `test_sources`.

    Only labelled cases take part. A source in both lists (in-domain diagonal of a transfer matrix)
    is not supported here yet: its test patients would have to be carved out first.
    """
    both = set(train_sources) & set(test_sources)
    if both:
        raise ValueError(f"sources {sorted(both)} are both training and test sources; not supported by this split")
    labelled = [c for c in cases if c.labelled]
    train, val, test = [], [], []
    for src in train_sources:
        tr, va = group_holdout([c for c in labelled if c.source == src], val_fraction, seed)
        train += tr
        val += va
    test = [c for c in labelled if c.source in set(test_sources)]
    split = Split(tuple(train), tuple(val), tuple(test), tuple(train_sources), tuple(test_sources))
    assert_no_leakage(split)
    return split


def loso_split(cases: Iterable[Case], sources: Sequence[str], holdout: str, val_fraction: float, seed: int) -> Split:
    if holdout not in sources:
        raise ValueError(f"holdout source {holdout!r} is not among the sources {list(sources)}")
    train_sources = [s for s in sources if s != holdout]
    if not train_sources:
        raise ValueError("leave-one-source-out needs at least two sources")
    return transfer_split(cases, train_sources, [holdout], val_fraction, seed)


def assert_no_leakage(split: Split) -> None:
    """Raise LeakageError if a test source or a test/validation patient reaches training."""
    for role in ("train", "val"):
        bad = [c.key for c in getattr(split, role) if c.source in split.test_sources]
        if bad:
            raise LeakageError(f"held-out source cases in {role}: {bad[:5]}")
    seen: dict[tuple[str, str], str] = {}
    for role in ("train", "val", "test"):
        for c in getattr(split, role):
            pid = (c.source, c.patient_id)
            if seen.get(pid, role) != role:
                raise LeakageError(f"patient {c.source}/{c.patient_id} is in both {seen[pid]} and {role} ({c.key})")
            seen[pid] = role
    keys = [c.key for c in split.train + split.val + split.test]
    if len(keys) != len(set(keys)):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise LeakageError(f"cases listed twice in the split: {dup[:5]}")


def check_batch_sources(batch_sources: Iterable[str], test_sources: Sequence[str]) -> None:
    """Guard at the point of use: a training batch carrying a held-out source is a bug, never data."""
    bad = set(batch_sources) & set(test_sources)
    if bad:
        raise LeakageError(f"training batch contains held-out source(s) {sorted(bad)}")


__all__ = ["Split", "LeakageError", "transfer_split", "loso_split", "assert_no_leakage", "group_holdout",
           "check_batch_sources"]
