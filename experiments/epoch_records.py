"""`records.jsonl`: one record per validated epoch, appended while a run trains, so that the selection rules
(evaluation.selection_rules) can be applied after the fact. The record format is documented there.

- Written at the training epoch's end (after the epoch's validation and the rules' checkpoint saves, whose
  files the record names) and before `last.ckpt`: `EpochRecords` is listed before LastCheckpoint. A kill
  between the two leaves a record of an epoch that the resumed run will redo; `truncate_records` drops it.
- Every line is flushed and fsynced on its own: a killed run loses at most the line being written (which
  `read_records` skips).
- On resume, records of epochs at or after the resumed checkpoint's finished epochs are dropped before
  training continues, so the file equals that of an uninterrupted run (on CPU, where the resumed run
  reproduces the uninterrupted one).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn

from evaluation.aggregate import aggregate
from evaluation.selection_rules import RECORDS, epoch_number, read_records

STAGES = ("val", "oracle")


def _plain(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None  # JSON has no NaN; a rule never picks a missing value anyway


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line, flushed and fsynced."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def truncate_records(path: Path, finished_epochs: int) -> int:
    """Keep the records of epochs `<= finished_epochs` (1-based numbers; a resumed checkpoint's finished
    epochs; 0 for a fresh start) and drop the rest and any cut-short line, rewriting the file atomically. Returns the records kept."""
    path = Path(path)
    if not path.exists():
        return 0
    kept = [r for r in read_records(path) if int(r["epoch"]) <= finished_epochs]
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in kept)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return len(kept)


class EpochRecords(pl.Callback):
    """Appends `run_dir/records.jsonl` one record per validated epoch of the fit (rank zero only). Keys are
    those the module logged in this epoch's validation (`val/...`, and `oracle/...` when `oracle`), values
    as logged (trainer.callback_metrics, which also keeps stale keys of earlier validations: the keys are
    taken from this validation's rows). Validations outside `fit` (the test stage's) are not recorded."""

    def __init__(self, run_dir: str | Path, oracle: bool):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RECORDS
        self.oracle = bool(oracle)
        self._validated_epoch = -1
        self._best_before: dict[int, str] = {}

    @staticmethod
    def _fitting(trainer: pl.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def on_validation_start(self, trainer, module) -> None:
        if self._fitting(trainer):
            self._best_before = {id(cb): cb.best_model_path for cb in trainer.checkpoint_callbacks
                                 if isinstance(cb, pl.callbacks.ModelCheckpoint)}

    def on_validation_end(self, trainer, module) -> None:
        if self._fitting(trainer):
            self._validated_epoch = trainer.current_epoch

    def _checkpoints(self, trainer: pl.Trainer) -> list[str]:
        """The rules' files saved by this epoch's validation (their best path changed), relative to the run."""
        out = []
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, pl.callbacks.ModelCheckpoint) and cb.best_model_path \
                    and cb.best_model_path != self._best_before.get(id(cb)):
                p = Path(cb.best_model_path)
                out.append(str(p.relative_to(self.run_dir)) if p.is_relative_to(self.run_dir) else str(p))
        return list(dict.fromkeys(out))

    def metrics(self, trainer: pl.Trainer, module) -> dict[str, float | None]:
        logged = trainer.callback_metrics
        rows = getattr(module, "last_rows", {})
        out = {}
        for stage in STAGES:
            if stage == "oracle" and not self.oracle:
                continue
            for key, value in aggregate(rows.get(stage) or [], stage).items():
                out[key] = _plain(logged[key] if key in logged else value)
        return out

    def on_train_epoch_end(self, trainer, module) -> None:
        if self._validated_epoch != trainer.current_epoch or not trainer.is_global_zero:
            return
        record = {"epoch": epoch_number(trainer.current_epoch), "step": int(trainer.global_step),
                  "checkpoints": self._checkpoints(trainer), **self.metrics(trainer, module)}
        append_record(self.path, record)
