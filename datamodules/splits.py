"""Patient-grouped splits and the leakage checks every split passes before training sees it.

A split is pure data: which cases train, which select the model (validation) and which test. LOSO
is the transfer split with "all other sources" as training sources. Validation always comes from
the training sources, so model selection never looks at a held-out source.
"""
from __future__ import annotations

import fnmatch
import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
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
    # Cases left out to keep patients apart: training-source copies of test scans (duplicate groups
    # spanning a test source; the test side keeps the scan) and few-shot test cases of a training patient.
    dropped: tuple[Case, ...] = field(default=())

    @property
    def held_out(self) -> tuple[str, ...]:
        """Test sources never trained on (out-of-domain); only these may not appear in train/val at all."""
        return tuple(s for s in self.test_sources if s not in self.train_sources)

    @property
    def in_domain(self) -> tuple[str, ...]:
        """Test sources that also train (transfer-matrix diagonal, few-shot): kept apart by patient."""
        return tuple(s for s in self.test_sources if s in self.train_sources)

    def summary(self) -> list[dict]:
        rows = []
        for role in ("train", "val", "test"):
            by_src: dict[str, list[Case]] = defaultdict(list)
            for c in getattr(self, role):
                by_src[c.source].append(c)
            for src, cs in sorted(by_src.items()):
                rows.append({"role": role, "source": src, "cases": len(cs), "patients": len({c.patient_id for c in cs})})
        return rows


def _stable_rank(text: str, seed: int | str) -> int:
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


def group_holdout(cases: Sequence[Case], fraction: float, seed: int | str) -> tuple[list[Case], list[Case]]:
    """Split cases of one source by patient: about `fraction` of patients (at least one when there are
    two or more) go to the second list."""
    patients = sorted({c.patient_id for c in cases}, key=lambda p: _stable_rank(p, seed))
    n_out = int(round(fraction * len(patients)))
    if fraction > 0 and len(patients) >= 2:
        n_out = min(max(n_out, 1), len(patients) - 1)
    out = set(patients[:n_out])
    return [c for c in cases if c.patient_id not in out], [c for c in cases if c.patient_id in out]


def transfer_split(cases: Iterable[Case], train_sources: Sequence[str], test_sources: Sequence[str],
                   val_fraction: float, seed: int, test_fraction: float = 0.2, fixed_test_part: bool = False,
                   train_cases: Mapping[str, Sequence[str]] | None = None,
                   val_sources: Sequence[str] = (), test_cases: Mapping[str, Sequence[str]] | None = None) -> Split:
    """Train on `train_sources` (minus a patient-grouped validation part), test on `test_sources`.

    Only labelled cases take part. Per test source:
    - out-of-domain (not trained on): all its labelled cases, or with `fixed_test_part` only its test
      part (the same `test_fraction` of patients a diagonal cell uses), so every cell of a
      transfer-matrix column scores the same patients;
    - in-domain (also a training source; the diagonal of a transfer matrix): a `test_fraction` of its
      patients, chosen by a hash of the patient id (independent of the other sources), the rest trains;
    - few-shot (`train_cases[source]` lists case ids): exactly those cases train (official folds), the
      others test; a test case of a patient who also trains is left out (`Split.dropped`) and printed.
    `test_cases[source]`: glob patterns of case ids (fnmatch); only the matching test cases of that source
    test (a paper that tested a subset, e.g. seed 004's ten coronacases of COVID-19-CT-Seg); the others
    are left out, never moved to training.
    `val_sources`: training sources used whole for validation instead of training (leave-one-source-out
    model selection; the other training sources then train whole); otherwise validation is `val_fraction` of each training source's patients, except
    for few-shot sources, whose listed cases all train.
    """
    train_cases = {s: list(ids) for s, ids in (train_cases or {}).items()}
    test_cases = {s: list(globs) for s, globs in (test_cases or {}).items()}
    not_tested = sorted(set(test_cases) - set(test_sources))
    if not_tested:
        raise ValueError(f"data.test_cases names source(s) {not_tested} that are not test sources {list(test_sources)}")
    unknown = sorted(set(train_cases) - set(train_sources))
    if unknown:
        raise ValueError(f"train_cases names source(s) {unknown} that are not training sources {list(train_sources)}")
    bad_val = sorted(set(val_sources) - set(train_sources))
    if bad_val:
        raise ValueError(f"validation source(s) {bad_val} are not training sources {list(train_sources)}")
    fixed_val = sorted(set(val_sources) & set(train_cases))
    if fixed_val:
        raise ValueError(f"source(s) {fixed_val} cannot both validate whole and train their listed cases")
    if val_sources and not set(train_sources) - set(val_sources):
        raise ValueError(f"every training source {list(train_sources)} is a validation source: nothing left to train on")
    labelled = [c for c in cases if c.labelled]
    by_source: dict[str, list[Case]] = defaultdict(list)
    for c in labelled:
        by_source[c.source].append(c)
    train, val, test, excluded = [], [], [], []
    for src in dict.fromkeys(list(train_sources) + list(test_sources)):
        cs = by_source.get(src, [])
        if src in train_cases:
            ids = set(train_cases[src])
            missing = sorted(ids - {c.case_id for c in cs})
            if missing:
                raise ValueError(f"{src}: training case(s) {missing} (train_cases) are not among its labelled cases")
            tr = [c for c in cs if c.case_id in ids]
            pids = {c.patient_id for c in tr}
            rest = [c for c in cs if c.case_id not in ids]
            train += tr
            if src in test_sources:
                excluded += [c for c in rest if c.patient_id in pids]
                test += [c for c in rest if c.patient_id not in pids]
            continue
        tested = src in test_sources
        if tested and (src in train_sources or fixed_test_part):
            # the test part is drawn with its own salt: it never depends on val_fraction or the other sources
            keep, part = group_holdout(cs, test_fraction, f"test-{seed}")
            test += part
            cs = keep
        elif tested:
            test += cs
            continue
        if src not in train_sources:
            continue
        if src in val_sources:
            val += cs
            continue
        # with validation sources, model selection never looks at the training sources' patients
        tr, va = group_holdout(cs, 0.0 if val_sources else val_fraction, seed)
        train += tr
        val += va
    for src, globs in test_cases.items():
        ours = [c for c in test if c.source == src]
        keep = [c for c in ours if any(fnmatch.fnmatchcase(c.case_id, g) for g in globs)]
        if ours and not keep:
            raise ValueError(f"data.test_cases.{src}: no test case of {src} matches {globs} "
                             f"(its test cases: {sorted(c.case_id for c in ours)[:5]}...)")
        test = [c for c in test if c.source != src or c in keep]
    if excluded:
        print(f"[splits] left out {len(excluded)} test case(s) whose patient is in training: "
              + ", ".join(f"{c.key} (patient {c.patient_id})" for c in excluded), flush=True)
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
    trained = tuple(s for s in train_sources if s not in val_sources)
    split = Split(tuple(train), tuple(val), tuple(test), trained, tuple(test_sources), dropped + tuple(excluded))
    assert_no_leakage(split)
    return split


def loso_split(cases: Iterable[Case], sources: Sequence[str], holdout: str, val_fraction: float, seed: int,
               val_sources: Sequence[str] = (), test_cases: Mapping[str, Sequence[str]] | None = None) -> Split:
    if holdout not in sources:
        raise ValueError(f"holdout source {holdout!r} is not among the sources {list(sources)}")
    train_sources = [s for s in sources if s != holdout]
    if not train_sources:
        raise ValueError("leave-one-source-out needs at least two sources")
    return transfer_split(cases, train_sources, [holdout], val_fraction, seed, val_sources=val_sources,
                          test_cases=test_cases)


def split_from_roles(cases: Iterable[Case], roles: Mapping[str, Sequence[str]], train_sources: Sequence[str],
                     test_sources: Sequence[str], where: str = "plan") -> Split:
    """The split a plan lists: case keys (`<source>/<case_id>`) per role, taken as given (a user may have
    edited them), then checked like every split: a held-out source's case in train or validation, or a
    patient on two sides, raises LeakageError naming the case. `train_sources`: the sources trained on
    (the test sources outside them are held out: none of their cases may train or validate)."""
    by_key = {c.key: c for c in cases}
    unknown = sorted(set(roles) - {"train", "val", "test"})
    if unknown:
        raise ValueError(f"{where}: roles {unknown} unknown; allowed: train, val, test")
    picked: dict[str, tuple[Case, ...]] = {}
    for role in ("train", "val", "test"):
        keys = list(roles.get(role, ()))
        missing = [k for k in keys if k not in by_key]
        if missing:
            raise ValueError(f"{where}: roles.{role} lists {missing[:5]}, not found among the discovered cases")
        unlabelled = [k for k in keys if not by_key[k].labelled]
        if unlabelled:
            raise ValueError(f"{where}: roles.{role} lists unlabelled case(s) {unlabelled[:5]}")
        picked[role] = tuple(by_key[k] for k in keys)
    split = Split(picked["train"], picked["val"], picked["test"], tuple(train_sources), tuple(test_sources))
    assert_no_leakage(split)
    return split


def assert_no_leakage(split: Split) -> None:
    """Raise LeakageError if a test source or a test/validation patient reaches training."""
    for role in ("train", "val"):
        bad = [c.key for c in getattr(split, role) if c.source in split.held_out]
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


__all__ = ["Split", "LeakageError", "transfer_split", "loso_split", "split_from_roles", "assert_no_leakage", "group_holdout",
           "check_batch_sources", "merge_duplicate_patients"]
