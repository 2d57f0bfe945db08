"""Choice-valued settings of the experiment layer as enums (the data layer's are in datamodules.choices):
the config schema types its keys with them, so a value outside the set fails when the config loads."""
from __future__ import annotations

from datamodules.choices import Choice


class EvalSpace(Choice):
    """evaluation.space: scored on each case's stored grid (original), or on the training grid (harmonized)."""
    original = "original"
    harmonized = "harmonized"


class SelectionMethod(Choice):
    """selection.method (and each selection.report entry): which checkpoint is tested (experiments.selection)."""
    training_domain = "training_domain"
    loso = "loso"
    oracle = "oracle"
    last = "last"


class WandbMode(Choice):
    """wandb.mode: W&B logs to files (offline), to the server (online), or not at all (disabled)."""
    offline = "offline"
    online = "online"
    disabled = "disabled"


SELECTIONS = SelectionMethod.values()
