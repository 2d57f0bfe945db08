"""Model selection as in DomainBed (Gulrajani & Lopez-Paz, 2021): which checkpoint a run reports.

- `training_domain` (default): the best epoch on validation patients of the training sources;
- `loso`: the best epoch on one training source held out whole from training (`selection.val_source`);
  the split does the holding out, the checkpoint rule is the same as above;
- `oracle`: the best epoch on the test cases themselves: an upper bound that looks at held-out labels,
  reported beside the others, never the default;
- `last`: the final epoch (no validation needed: few-shot folds train on every listed case).

Each rule is one Lightning ModelCheckpoint (ties to the later epoch, as evaluation.selection_rules, the
same rules as pure functions over a run's `records.jsonl`); the runner tests the chosen checkpoint of the headline rule
and of every rule in `selection.report`, and records them side by side in run.json.
"""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl

from evaluation.selection_rules import epoch_number
from experiments.checkpoints import LastCheckpoint
from experiments.choices import SELECTIONS

# segmentation.aggregate() logs it: the lesion Dice where lesions are scored, else the mean Dice of the
# classes scored (a lung-only task).
MONITOR = {"training_domain": "val/mean/selection_dice", "loso": "val/mean/selection_dice",
           "oracle": "oracle/mean/selection_dice"}


class LaterOnTies(pl.callbacks.ModelCheckpoint):
    """ModelCheckpoint (save_top_k=1, mode max) whose ties go to the LATER epoch, as the rules over records
    (evaluation.selection_rules.best_by) break them: Lightning keeps the earlier one (strict `>`), and a
    flat validation score then silently picks an early, undertrained epoch (issue 19). A NaN score never
    replaces a saved one (NaN >= x is false); Lightning saves a first NaN (as -inf) when it has nothing yet,
    where the record rules choose nothing. Its state is saved under ModelCheckpoint's key, so runs
    checkpointed before this class existed resume with their rules' choices."""

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def format_checkpoint_name(self, metrics, filename=None, ver=None, prefix=None) -> str:
        """File names carry the epoch's 1-based number (best-epoch004.ckpt is `[epoch 4/N]`), as run.json
        and records.jsonl do (evaluation.selection_rules.epoch_number); Lightning would write 0-based."""
        if "epoch" in metrics:
            metrics = {**metrics, "epoch": epoch_number(metrics["epoch"])}
        return super().format_checkpoint_name(metrics, filename=filename, ver=ver, prefix=prefix)

    def check_monitor_top_k(self, trainer: pl.Trainer, current=None) -> bool:
        if current is None or self.save_top_k != 1 or self.mode != "max" or not self.best_k_models:
            return super().check_monitor_top_k(trainer, current)
        better = bool(current >= self.best_k_models[self.kth_best_model_path])
        return trainer.strategy.reduce_boolean_decision(better)


def wanted(method: str, report) -> list[str]:
    """The selections to test, headline first, each once, as plain strings (a config's SelectionMethod
    member would reach W&B tables and run.json, and W&B types table cells by their exact class)."""
    names = list(dict.fromkeys(str(n) for n in [method, *report]))
    bad = [n for n in names if n not in SELECTIONS]
    if bad:
        raise ValueError(f"selection {bad} unknown; choose from {SELECTIONS}")
    if "loso" in names and method != "loso":
        raise ValueError("selection `loso` changes the split (a training source validates, untrained): make it "
                         "selection.method, not a selection.report entry")
    if method == "loso" and "training_domain" in names:
        raise ValueError("with selection.method=loso the validation set is the held-out training source: "
                         "training_domain cannot be reported beside it (run it as its own configuration)")
    return names


def checkpoint_callbacks(run_dir: Path, names: list[str], has_val: bool,
                         every_n_steps: int = 0) -> dict[str, pl.Callback]:
    """One ModelCheckpoint per rule, plus `last` (experiments.checkpoints.LastCheckpoint), saved after every
    training epoch (and every `every_n_steps` steps): a killed run resumes from its last finished epoch,
    not from its last validation. The rules save when validation ends, before `last` is written at the
    training epoch's end, so `last.ckpt` records this epoch's choices."""
    folder = str(run_dir / "checkpoints")
    out: dict[str, pl.Callback] = {}
    for name in names:
        if name == "last":
            continue
        if name in ("training_domain", "loso") and not has_val:
            raise ValueError(f"selection {name!r} needs validation cases, and the split has none (few-shot folds "
                             "train on every listed case): use selection.method=last")
        prefix = "best" if name in ("training_domain", "loso") else name
        out[name] = LaterOnTies(dirpath=folder, filename=f"{prefix}-epoch{{epoch:03d}}",
                                auto_insert_metric_name=False, monitor=MONITOR[name], mode="max",
                                save_top_k=1, save_last=False, save_on_train_epoch_end=False,
                                # a resumed run that re-selects an epoch rewrites its file
                                # (atomically) instead of adding best-epochNNN-v1.ckpt
                                enable_version_counter=False)
    out["last"] = LastCheckpoint(folder, every_n_steps)
    return out


def chosen_checkpoint(name: str, callbacks: dict[str, pl.Callback]) -> tuple[str, float | None]:
    """The checkpoint path a rule picked and its monitored score (None for `last`)."""
    if name == "last":
        cb = callbacks["last"]
        path = Path(cb.dirpath) / "last.ckpt"
        if not path.exists():
            raise FileNotFoundError(f"no last checkpoint in {cb.dirpath}: training saved none")
        return str(path), None
    cb = callbacks[name]
    if not cb.best_model_path:
        raise RuntimeError(f"selection {name!r}: no checkpoint was selected (did validation run? "
                           f"trainer.check_val_every_n_epoch vs trainer.max_epochs)")
    score = cb.best_model_score
    return cb.best_model_path, (float(score) if score is not None else None)
