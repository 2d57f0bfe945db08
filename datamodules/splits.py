"""Patient-grouped splits and the leakage checks every split passes before training sees it.

A split is pure data: which cases train, which select the model (validation) and which test. LOSO
is the transfer split with "all other sources" as training sources. Validation always comes from
the training sources, so model selection never looks at a held-out source.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

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
    # Training-source copies of test scans (duplicate groups spanning a test source), left out of
    # train and validation: the test side keeps the scan.
    dropped: tuple[Case, ...] = field(default=())

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


DUPLICATE_PREFIX = "dup:"


def merge_duplicate_patients(cases: Iterable[Case], groups) -> list[Case]:
    """Give every case of a duplicate group one shared patient id, across sources.

    `groups`: `fingerprint.DuplicateGroup`s or plain iterables of case keys. Grouping is transitive
    through patients: the other scans of a duplicate's patient (same source and patient id) join the
    merged patient too, or a patient's second series could still land on the other side. The merged
    id is `dup:<first case key>`; `meta["duplicate_of"]` lists the other keys of the scan's duplicate
    group (empty for a case merged only through its patient) and `meta["source_patient_id"]` keeps
    the source's own id. Cases outside every group come back unchanged; order is kept.
    """
    cases = list(cases)
    by_key = {c.key: c for c in cases}
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def root(node):
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    dup_of: dict[str, list[str]] = {}
    for group in groups:
        keys = sorted(getattr(group, "keys", group))
        missing = [k for k in keys if k not in by_key]
        if missing:
            raise ValueError(f"duplicate group {keys} names cases that are not in the case list: {missing}")
        nodes = [(by_key[k].source, by_key[k].patient_id) for k in keys]
        for n in nodes[1:]:
            parent[root(n)] = root(nodes[0])
        for k in keys:
            dup_of.setdefault(k, []).extend(o for o in keys if o != k)
    members: dict[tuple[str, str], list[Case]] = defaultdict(list)
    for c in cases:
        if (c.source, c.patient_id) in parent:
            members[root((c.source, c.patient_id))].append(c)
    new_id = {}
    for component in members.values():
        pid = DUPLICATE_PREFIX + min(c.key for c in component)
        for c in component:
            new_id[c.key] = pid
    out = []
    for c in cases:
        if c.key not in new_id:
            out.append(c)
            continue
        meta = {**c.meta, "duplicate_of": sorted(set(dup_of.get(c.key, []))),
                "source_patient_id": c.meta.get("source_patient_id", c.patient_id)}
        out.append(replace(c, patient_id=new_id[c.key], meta=meta))
    return out


def _merged(c: Case) -> bool:
    return "duplicate_of" in c.meta


def _patient_key(c: Case) -> tuple[str, str]:
    # A merged duplicate patient spans sources: one patient whatever source holds the copy.
    return ("*", c.patient_id) if _merged(c) else (c.source, c.patient_id)


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
    # Merged duplicate patients (merge_duplicate_patients) span sources. Per-source holdouts may put
    # their copies in train of one source and validation of another: validation wins (model selection
    # must not see a trained-on scan). Copies of a test patient in training sources are dropped.
    test_pids = {c.patient_id for c in test if _merged(c)}
    val_pids = {c.patient_id for c in val if _merged(c)}
    dropped = tuple(c for c in train + val if _merged(c) and c.patient_id in test_pids)
    moved = [c for c in train if _merged(c) and c.patient_id in val_pids - test_pids]
    if dropped:
        print(f"[splits] dropped {len(dropped)} training-source case(s) that duplicate held-out test scans: "
              + ", ".join(f"{c.key} (patient {c.patient_id})" for c in dropped), flush=True)
    if moved:
        print(f"[splits] moved {len(moved)} duplicate case(s) from train to validation, where their copies are: "
              + ", ".join(c.key for c in moved), flush=True)
    out = {c.key for c in dropped} | {c.key for c in moved}
    val = [c for c in val if c.key not in out] + moved
    train = [c for c in train if c.key not in out]
    split = Split(tuple(train), tuple(val), tuple(test), tuple(train_sources), tuple(test_sources), dropped)
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
            pid = _patient_key(c)
            if seen.get(pid, role) != role:
                who = f"duplicate patient {c.patient_id}" if _merged(c) else f"patient {c.source}/{c.patient_id}"
                raise LeakageError(f"{who} is in both {seen[pid]} and {role} ({c.key})")
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
           "check_batch_sources", "merge_duplicate_patients"]
