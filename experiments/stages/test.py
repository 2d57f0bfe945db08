"""A run's test: for the headline selection rule and every rule in `selection.report`, validate (headline)
and test the chosen checkpoint, where testing is the predict stage (files) followed by the score stage
(numbers from those files). The headline writes `predictions/` (and `references/` with
`evaluation.save_predictions`); another rule whose checkpoint holds other weights writes
`selection/<rule>/predictions/`, and one that picked the headline's weights reuses its predictions."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig

from evaluation.aggregate import ROW_COLUMNS, is_count
from evaluation.selection_rules import RULE_KEYS, degenerate, epoch_number, read_records
from experiments.build import is_rank_zero, say
from experiments.checkpoints import read_checkpoint
from experiments.selection import chosen_checkpoint
from experiments.stages.predict import predict_checkpoint
from experiments.stages.score import score_predictions
from experiments.tracking import write_csv

# (checkpoint, output folder, headline?) -> (test metrics, rows); rows on rank zero only
Tester = Callable[[str, Path, bool], tuple[dict, list]]


def progress_of(ckpt: str) -> tuple[int | None, int | None]:
    """(epoch, global_step) of a Lightning checkpoint: `epoch` is the number (1-based, as printed:
    evaluation.selection_rules.epoch_number) of the epoch in progress when it was saved (the rules'
    checkpoints when validation ends, last.ckpt when the training epoch ends: the same epoch; Lightning's
    fit-loop counters differ between the two), the step identifies the weights. Read with weights_only (experiments.checkpoints): an unreadable
    or crafted file raises CheckpointError naming it."""
    state = read_checkpoint(ckpt)
    try:
        return epoch_number(state["epoch"]), int(state["global_step"])
    except (KeyError, TypeError, ValueError):
        return None, None


def predict_and_score(cfg: DictConfig, trainer: pl.Trainer, module, dm, plan: dict) -> Tester:
    """The run's tester: predict the test cases into `out/predictions/`, then (rank zero) score those files."""
    ev = cfg.evaluation

    def test(ckpt: str, out: Path, headline: bool) -> tuple[dict, list]:
        pred_dir = predict_checkpoint(trainer, module, dm, ckpt, out, ev.space,
                                      probabilities=bool(ev.get("save_probabilities", False)))
        if not is_rank_zero():
            return {}, []
        refs = out / "references" if headline and ev.save_predictions else None
        metrics, rows = score_predictions(plan, pred_dir, references_out=refs)
        expected = sorted(c.case_id for c in dm.split.test)
        got = sorted(dict.fromkeys(r["case"] for r in rows))
        assert got == expected, f"tested cases {got} differ from the split's {expected}"
        return metrics, rows

    return test


def degenerate_rules(names: list[str], records: list[dict]) -> dict[str, str]:
    """Rule -> why its choice would be degenerate (evaluation.selection_rules.degenerate), each warned about
    once; such a rule tests the last epoch's checkpoint instead of an arbitrary tied or unscored one."""
    out = {}
    for name in names:
        key = RULE_KEYS.get(name)
        why = degenerate(records, key) if key else None
        if why:
            out[name] = why
            say(f"WARNING: selection {name} is degenerate: {why}; testing the last epoch instead "
                "(run.json selection.degenerate; reports mark it with †)")
    return out


def select_and_test(trainer: pl.Trainer, module, dm, run_dir: Path, callbacks: dict, names: list[str],
                    test: Tester) -> tuple[dict, list, list, dict]:
    """Validate and test the headline selection's checkpoint, then test every other selection's.
    Returns (metrics, val_rows, test_rows, selection record for run.json)."""
    head = names[0]
    record = {"method": head, "checkpoints": {}, "test": {}}
    tested: dict = {}
    metrics, val_rows, test_rows = {}, [], []
    # Read every rule's choice now: validate/predict restore callback states from the checkpoint they load,
    # which would roll a later rule's choice back to what it was when that checkpoint was written.
    flat = degenerate_rules(names, read_records(run_dir))
    chosen = {name: chosen_checkpoint("last" if name in flat else name, callbacks) for name in names}
    record["degenerate"] = head in flat
    for name in names:
        ckpt, score = chosen[name]
        epoch, step = progress_of(ckpt)
        record["checkpoints"][name] = {"path": ckpt, "epoch": epoch, "global_step": step, "score": score}
        if name in flat:
            record["checkpoints"][name]["degenerate"] = flat[name]
        if name == head and dm.split.val:
            val = trainer.validate(module, datamodule=dm, ckpt_path=ckpt, verbose=False, weights_only=True)
            val_rows = module.last_rows["val"]
            metrics.update({k: float(v) for k, v in (val[0] if val else {}).items() if k.startswith("val/")})
        same = step if step is not None else ckpt  # two rules picked the same weights: same predictions
        if same not in tested:
            tested[same] = test(ckpt, run_dir if name == head else run_dir / "selection" / name, name == head)
        result = tested[same]
        if name == head:
            metrics.update(result[0])
            test_rows = result[1]
        elif is_rank_zero():
            write_csv(run_dir / "selection" / name / "per_case.csv", [dict(r, split="test") for r in result[1]],
                      first=ROW_COLUMNS)
        # the means only: their counts are in metrics.json (headline) and would triple run.json's record
        record["test"][name] = {k: v for k, v in result[0].items() if k.startswith("test/") and not is_count(k)}
    return metrics, val_rows, test_rows, record
