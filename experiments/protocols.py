"""Protocols: how a config becomes a split. Each is a registry entry returning (kind, split, label);
the runner does the rest, so LOSO, transfer and few-shot runs share one training and test path.

- `loso`: hold out `data.holdout`, train on the other `data.sources`;
- `transfer`: train on `data.train_sources`, test on `data.test_sources` (default: every source of
  `data.sources`; a source in both gets an in-domain test part, see datamodules.splits.transfer_split);
- `fewshot`: `fewshot.source`'s fold `fewshot.fold` trains (with any `data.train_sources`), its other
  cases test: seed 003's Task 1 (ctseg alone) and Task 3 (non-COVID sources plus 4 ctseg cases).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig

from datamodules.registry import Registry

PROTOCOLS = Registry("protocol")
register_protocol = PROTOCOLS.register


@dataclass
class Plan:
    kind: str            # run folder group and W&B job_type
    label: str           # run name prefix: the held-out source, or the training set
    split: dict = field(default_factory=dict)  # MultiSourceDataModule split arguments


def _check_sources(cfg: DictConfig, names, what: str) -> None:
    unknown = [s for s in names if s not in cfg.data.sources]
    if unknown:
        raise ValueError(f"{what} {unknown} are not in data.sources {list(cfg.data.sources)} (add them there)")


@register_protocol("loso")
def loso(cfg: DictConfig) -> Plan:
    holdout = cfg.data.holdout
    if not holdout:
        raise ValueError("protocol loso needs data.holdout (python -m experiments.loso --holdout NAME)")
    _check_sources(cfg, [holdout], "data.holdout")
    return Plan("loso", holdout, {"holdout": holdout})


@register_protocol("transfer")
def transfer(cfg: DictConfig) -> Plan:
    train = list(cfg.data.train_sources)
    if not train:
        raise ValueError("protocol transfer needs data.train_sources (python -m experiments.transfer --train a,b)")
    test = list(cfg.data.test_sources) or list(cfg.data.sources)
    _check_sources(cfg, train, "data.train_sources")
    _check_sources(cfg, test, "data.test_sources")
    return Plan("transfer", "+".join(train), {"train_sources": train, "test_sources": test})


@register_protocol("fewshot")
def fewshot(cfg: DictConfig) -> Plan:
    f = cfg.fewshot
    if not 0 <= f.fold < len(f.folds):
        raise ValueError(f"fewshot.fold={f.fold}: there are {len(f.folds)} folds (0..{len(f.folds) - 1})")
    others = [s for s in cfg.data.train_sources if s != f.source]
    wanted = [str(r) for r in [cfg.selection.method, *cfg.selection.report] if str(r) in ("training_domain", "loso")]
    if wanted and not others:  # checked before any data is read: the split would have no validation case
        raise ValueError(f"few-shot fold trains on every listed {f.source} case and validates on none, but selection "
                         f"{wanted} picks by validation: use selection.method=last (preset seed003_task1 does)")
    train = others + [f.source]
    _check_sources(cfg, train, "training sources")
    label = "+".join(others + [f"{f.source}{len(f.folds[f.fold])}"]) + (f"-{f.task}" if f.task else "") + f"-fold{f.fold}"
    return Plan("fewshot", label, {"train_sources": train, "test_sources": [f.source],
                                   "train_cases": {f.source: list(f.folds[f.fold])}})


def run_protocol(name: str, cfg: DictConfig, wait: bool = False) -> dict:
    """Plan the split for protocol `name` and run it (experiments.runner.run). A run folder in use by
    another process and a diverged training end the command with a one-line error (exit 1), not a
    traceback: neither is a bug, and the message says what to do. `wait`: queue behind a run in use."""
    from datamodules.locking import FolderInUse
    from experiments.runner import run  # torch and Lightning only when a run starts
    from lightning_modules.segmentation import NonFiniteLoss

    plan = PROTOCOLS.lookup(name)(cfg)
    try:
        return run(cfg, plan.kind, plan.split, plan.label, wait=wait)
    except (FolderInUse, NonFiniteLoss) as e:
        raise SystemExit(f"error: {e}") from None
