"""MultiSourceDataModule: discover sources, split without leakage, harmonize into the cache, serve batches."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from datamodules import fingerprint
from datamodules.alignment import summarize as summarize_statuses
from datamodules.augment import Augmenter
from datamodules.cache import CachedCase, CaseCache, class_counts
from datamodules.cases import Case, repeated_id_message, repeated_ids
from datamodules.choices import ON_ERROR, WHERE
from datamodules.datasets import EpochSampler, PatchDataset, VolumeDataset, patch_loader
from datamodules.harmonize import HarmonizerConfig
from datamodules.io import VolumeError
from datamodules.label_policy import LabelError
from datamodules.sources import get_source
from datamodules.splits import Split, loso_split, merge_duplicate_patients, split_from_roles, transfer_split

log = logging.getLogger(__name__)


# Errors that concern one case's files; anything else (a bug, a missing layout) always stops the run.
CASE_ERRORS = (VolumeError, LabelError)


class DataError(ValueError):
    """Bad input files, listed one per line (raised with data.on_error=fail). Its message is several lines
    on purpose (a summary, one line per file, what to do): entry points print it whole (rundir.cli)."""

    multiline = True


def discover_sources(data_root: str | Path, sources: Sequence[str], on_error: str = "fail",
                     policies: dict[str, str] | None = None,
                     image_flips: dict[str, dict] | None = None) -> tuple[list[Case], dict]:
    """Run each source's adapter on `data_root/<source>`; return all cases and the adapters by name.

    `image_flips`: per source, the user's image-flip declarations (`data.image_flips`), which replace
    the source's own for the case ids they match. Per-case problems the adapters found stop here with
    on_error=fail, and are printed with skip; so do case ids found twice in a source (every copy is left
    out: which file is the scan is the user's call).
    """
    adapters, cases, problems = {}, [], []
    for name in sources:
        adapter = get_source(name)(Path(data_root) / name, policy=(policies or {}).get(name))
        adapters[name] = adapter
        found = adapter.with_flip_overrides(adapter.discover(), (image_flips or {}).get(name))
        repeated = repeated_ids(found)
        for same in repeated.values():
            adapter.problem(same[0].image, repeated_id_message(same))
        found = [c for c in found if c.key not in repeated]
        problems += adapter.problems
        if not any(c.labelled for c in found):
            why = "".join(f"\n  {p}" for p in adapter.problems)  # what left them out, if anything did
            raise FileNotFoundError(f"{name}: no labelled case found under {adapter.root}"
                                    + (f"; problems found:{why}" if why else ""))
        cases += found
    report_problems([str(p) for p in problems], on_error, data_root)
    return cases, adapters


def report_problems(problems: Sequence[str], on_error: str, data_root: str | Path | None = None) -> None:
    """With on_error=fail, one DataError naming every problem (each once, in order), and how to see them
    all before a run (datamodules.verify) or run without them (data.on_error=skip); with skip, print each."""
    problems = list(dict.fromkeys(problems))
    if not problems:
        return
    if on_error == "fail":
        root = f" --root {data_root}" if data_root is not None else " --root DATA_ROOT"
        raise DataError(f"{len(problems)} problem(s) in the input data:\n  " + "\n  ".join(problems)
                        + f"\ncheck the whole data root with `covid-dg verify{root}` (python -m datamodules.verify), "
                        "or leave these cases out with data.on_error=skip")
    for p in problems:
        print(f"[data.on_error=skip] skipped: {p}", flush=True)


class MultiSourceDataModule(pl.LightningDataModule):
    """Leave-one-source-out (`holdout`) or train-on-X/test-on-Y (`train_sources`, `test_sources`) data.

    Every batch carries `source` / `source_id`; `source_ids` indexes `sources` in the given order.
    """

    def __init__(self, data_root: str | Path, cache_dir: str | Path, sources: Sequence[str],
                 holdout: str | None = None, train_sources: Sequence[str] | None = None,
                 test_sources: Sequence[str] | None = None, harmonizer: HarmonizerConfig = HarmonizerConfig(),
                 patch_size: Sequence[int] = (64, 64, 16), batch_size: int = 2, samples_per_epoch: int = 64,
                 fg_fraction: float = 0.5, val_fraction: float = 0.2, sampling: str = "uniform",
                 num_workers: int = 0, seed: int = 0, on_error: str = "fail", policies: dict[str, str] | None = None,
                 image_flips: dict[str, dict] | None = None,
                 find_duplicates: bool = True, test_fraction: float = 0.2, fixed_test_part: bool = False,
                 train_cases: dict[str, Sequence[str]] | None = None, val_sources: Sequence[str] = (),
                 test_cases: dict[str, Sequence[str]] | None = None,
                 cache_workers: int = 1, augment: dict | None = None,
                 roles: dict[str, Sequence[str]] | None = None, pin_memory: bool = False):
        super().__init__()
        if on_error not in ON_ERROR:
            raise ValueError(f"data.on_error must be one of {ON_ERROR}, got {on_error!r}")
        if roles is not None and holdout is not None and not (train_sources and test_sources):
            train_sources = [s for s in sources if s != holdout]
            test_sources = [holdout]
        if holdout is None and not (train_sources and test_sources):
            raise ValueError("give either holdout or both train_sources and test_sources")
        self.data_root, self.sources, self.holdout = Path(data_root), list(sources), holdout
        self.train_sources, self.test_sources = train_sources, test_sources
        self.harmonizer = harmonizer
        self.patch_size, self.batch_size = tuple(patch_size), batch_size
        self.samples_per_epoch, self.fg_fraction = samples_per_epoch, fg_fraction
        self.val_fraction, self.num_workers, self.seed = val_fraction, num_workers, seed
        # a config's Choice members (datamodules.choices) kept as their plain strings, like every other value here
        self.sampling = str(sampling)
        self.cache = CaseCache(cache_dir)
        self.source_ids = {s: i for i, s in enumerate(self.sources)}
        self.split: Split | None = None
        self.cached: dict[str, list[CachedCase]] = {}
        self._early_problems: dict[str, str] = {}  # case key -> why fingerprinting could not read it
        self.on_error = str(on_error)
        self.policies = dict(policies or {})
        self.image_flips = dict(image_flips or {})
        self.find_duplicates = find_duplicates
        self.duplicates: list = []  # fingerprint.DuplicateGroup of the labelled cases
        self.skipped: list[str] = []  # problems of cases left out under on_error=skip
        # runner sets True for oracle model selection: the test cases become a second validation loader
        self.oracle = False
        self.cache_workers = cache_workers  # processes building missing cache entries
        # augment.where == loader: the patch dataset augments after cropping (device: the module does)
        augment = dict(augment or {})
        if augment.get("where", "none") not in WHERE:
            raise ValueError(f"augment.where must be one of {WHERE}, got {augment.get('where')!r}")
        self.augmenter = Augmenter(augment.get("ops")) if augment.get("where") == "loader" else None
        # transfer_split's in-domain / few-shot / model-selection options (see its docstring)
        self.split_options = {"test_fraction": test_fraction, "fixed_test_part": fixed_test_part,
                              "train_cases": dict(train_cases or {}), "val_sources": tuple(val_sources),
                              "test_cases": dict(test_cases or {})}
        # a plan's split (experiments.plan): case keys per role, used as listed (and leakage-checked)
        self.roles = {r: list(keys) for r, keys in roles.items()} if roles is not None else None
        # page-locked batches: Lightning copies them to a CUDA device with non_blocking=True, which is only
        # asynchronous from pinned memory (the build sets it for CUDA runs: on a CPU it is one more copy)
        self.pin_memory = bool(pin_memory)

    def make_split(self) -> Split:
        cases, self.adapters = discover_sources(self.data_root, self.sources, self.on_error, self.policies,
                                                self.image_flips)
        self.skipped += [str(p) for a in self.adapters.values() for p in a.problems]
        if self.find_duplicates:
            cases = self._merge_duplicates(cases)
        if self.roles is not None:
            # validation sources train nothing (loso selection): they are not trained-on sources
            trained = [s for s in self.train_sources if s not in self.split_options["val_sources"]]
            return split_from_roles(cases, self.roles, trained, self.test_sources)
        if self.holdout is not None:
            return loso_split(cases, self.sources, self.holdout, self.val_fraction, self.seed,
                              val_sources=self.split_options["val_sources"],
                              test_cases=self.split_options["test_cases"])
        return transfer_split(cases, self.train_sources, self.test_sources, self.val_fraction, self.seed,
                              **self.split_options)

    def _merge_duplicates(self, cases: list[Case]) -> list[Case]:
        """The same scan under two names or sources is one patient: no split may put it on both sides. An
        unreadable case is not fingerprinted; harmonizing meets it again and reports it with every other
        bad case (issue 19: stopping here named only the first bad file)."""
        fingerprints = []
        for case in (c for c in cases if c.labelled):
            try:
                fingerprints.append(fingerprint.cached_fingerprint(case, self.cache.root.parent / "fingerprints"))
            except CASE_ERRORS as e:
                self._early_problems[case.key] = str(e)
        self.duplicates = fingerprint.group_fingerprints(fingerprints)
        for g in self.duplicates:
            print(f"[duplicates] {g.describe()}: grouped as one patient", flush=True)
        return merge_duplicate_patients(cases, self.duplicates) if self.duplicates else cases

    def _harmonize(self, split: Split) -> list[str]:
        """Fill `self.cached` for every role (missing entries built in parallel: data.cache_workers);
        return the problems of the cases that could not be read."""
        roles = [(role, c) for role in ("train", "val", "test") for c in getattr(split, role)]
        entries = self.cache.get_many([(c, self.adapters[c.source].policy(c)) for _, c in roles], self.harmonizer,
                                      workers=self.cache_workers)
        problems: list[str] = []
        self.cached = {"train": [], "val": [], "test": []}
        for (role, case), entry in zip(roles, entries):
            if isinstance(entry, CASE_ERRORS):
                problems.append(f"{case.key} ({role}): {entry}")
                self._early_problems.pop(case.key, None)  # the same file's error, found again
            elif isinstance(entry, Exception):
                raise entry  # not a per-case input problem: a bug or a broken environment stops the run
            else:
                self.cached[role].append(entry)
        return problems

    def _load(self) -> None:
        """Discover, split (transfer_split asserts no leakage) and harmonize into the cache; keep the result."""
        self._early_problems = {}
        split = self.make_split()
        problems = self._harmonize(split)
        # a case that failed fingerprinting but not harmonizing (a split that left it out): still bad input
        problems += [f"{key}: {msg}" for key, msg in self._early_problems.items()]
        report_problems(problems, self.on_error, self.data_root)
        self.skipped += problems
        if problems:  # the split must describe exactly what is loaded (the runner checks the tested cases)
            kept = {c.key for role in ("train", "val", "test") for c in self.cached[role]}
            split = dataclasses.replace(split, **{role: tuple(c for c in getattr(split, role) if c.key in kept)
                                                  for role in ("train", "val", "test")})
            empty = [role for role in ("train", "test") if not getattr(split, role)]
            if empty:
                raise DataError(f"no readable case left for {empty} after skipping {len(problems)} bad case(s)")
        self.split = split
        self._check_cached_roles()

    def prepare_data(self) -> None:
        # Builds the cache (on rank 0 under DDP). Lightning calls it again in fit, validate and test, and in
        # one process setup() needs the same result: do the work once.
        if self.split is None:
            self._load()

    def setup(self, stage: str | None = None) -> None:
        # Other DDP ranks never ran prepare_data: they load here, finding the cache complete.
        if self.split is None:
            self._load()

    def _check_cached_roles(self) -> None:
        # The cache is shared by all runs: re-assert on what will actually be loaded.
        held_out = set(self.split.held_out)
        for role in ("train", "val"):
            bad = [c.key for c in self.cached[role] if c.meta["source"] in held_out]
            assert not bad, f"held-out cases reached {role}: {bad[:5]}"
        test_keys = {c.key for c in self.cached["test"]}
        assert not test_keys & {c.key for c in self.cached["train"] + self.cached["val"]}, "test case in train/val"

    def alignment(self) -> dict[str, dict]:
        """Per source: how many loaded cases have each image-mask alignment status (`datamodules.alignment`),
        and the cases whose status is not `ok` with their applied flips and margin (for run.json)."""
        by_source: dict[str, dict[str, dict]] = {}
        for entry in (c for role in ("train", "val", "test") for c in self.cached[role]):
            by_source.setdefault(entry.meta["source"], {})[entry.meta["case"]] = entry.meta["alignment"]
        return {src: {"statuses": summarize_statuses(a["status"] for a in cases.values()),
                      "cases": {cid: {k: a[k] for k in ("status", "flips", "margin")}
                                for cid, a in cases.items() if a["status"] != "ok"}}
                for src, cases in by_source.items()}

    def class_counts(self, n_classes: int):
        """Voxel counts per class and annotated classes of the training cases only (`cache.class_counts`)."""
        return class_counts(self.cached["train"], n_classes)

    def train_dataloader(self) -> DataLoader:
        ds = PatchDataset(self.cached["train"], self.source_ids, self.patch_size, self.samples_per_epoch,
                          self.fg_fraction, self.sampling, augment=self.augmenter)
        # Patches are a function of (seed, epoch, index) (EpochSampler), and the loader's own generator keeps
        # the global one untouched (it seeds the workers): a resumed run draws what the uninterrupted one drew.
        return patch_loader(ds, self.batch_size, self.num_workers, drop_last=True,
                            sampler=EpochSampler(len(ds), self.seed, self._serving_epoch()),
                            generator=torch.Generator().manual_seed(self.seed), pin_memory=self.pin_memory)

    def _serving_epoch(self) -> int:
        """The training epoch the loader's first iterator serves: 0, or on resume the first unfinished one.
        Lightning builds that iterator before its first `set_epoch` call, after restoring the loop state."""
        if self.trainer is None:
            return 0
        return int(self.trainer.fit_loop.epoch_progress.current.processed)

    def _volume_loader(self, role: str, source: str | None = None) -> DataLoader:
        # A private generator: starting a DataLoader iterator draws a base seed from its generator (the
        # global torch RNG by default), so every validation pass would shift the training patches that
        # follow. With its own, training draws the same patches whatever is validated, and how often.
        cases = [c for c in self.cached[role] if source is None or c.meta["source"] == source]
        return DataLoader(VolumeDataset(cases, self.source_ids), batch_size=1, shuffle=False,
                          num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed),
                          pin_memory=self.pin_memory)

    def val_dataloader(self):
        if self.oracle:  # loader 1: the test cases, scored as stage "oracle" (reported, never the default)
            return [self._volume_loader("val"), self._volume_loader("test")]
        return self._volume_loader("val")

    def test_dataloader(self, source: str | None = None) -> DataLoader:
        """Every test case; `source`: that source's only (test-time methods adapt per source)."""
        return self._volume_loader("test", source)

    def predict_dataloader(self) -> DataLoader:
        """The test cases, for the predict stage (experiments.stages.predict)."""
        return self._volume_loader("test")
