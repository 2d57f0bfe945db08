"""`run.json`: one typed record, written by the runner (experiments.stages.record) and read by the report
(evaluation.reporting). Imports nothing from `experiments`.

Older run.json files lack keys added since (variant names, plan hash, ...): every field has a default, so
they load; keys this version does not know are kept in `extra` and written back unchanged.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# registry names of what trained; runs written before they were recorded read as these
VARIANT_DEFAULTS = {"method": "erm", "network": "unet3d", "loss": "dice_ce", "harmonize_off": "none"}
# written only when set (few-shot runs, named train sets)
OPTIONAL = ("task", "fold", "train_set")


@dataclass
class RunInfo:
    kind: str | None = None
    name: str | None = None
    data: str | None = None                 # "phantom" | "real"
    data_root: str | None = None
    experiment: str | None = None
    preset: str | None = None
    seed: int | None = None
    method: str = VARIANT_DEFAULTS["method"]
    network: str = VARIANT_DEFAULTS["network"]
    loss: str = VARIANT_DEFAULTS["loss"]
    harmonize_off: str = VARIANT_DEFAULTS["harmonize_off"]
    task: str | None = None                 # few-shot runs
    fold: int | None = None
    train_set: str | None = None            # a named training set (reports label the row with it)
    config_hash: str | None = None
    plan_hash: str | None = None            # experiments.plan.plan_hash of the plan the run trained on
    plan_origin: dict | None = None         # `experiments.train --plan`: {path, hash, written_hash, edited}
    eval_space: str | None = None
    best_checkpoint: str | None = None
    selection: dict = field(default_factory=dict)
    train_sources: list[str] = field(default_factory=list)
    test_sources: list[str] = field(default_factory=list)
    split_args: dict = field(default_factory=dict)
    split: list[dict] = field(default_factory=list)   # role, source, cases, patients
    skipped: list[str] = field(default_factory=list)
    alignment: dict = field(default_factory=dict)
    duplicates: list[list[str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    world_size: int | None = None
    wall_s: float | None = None
    schedule: dict | None = None            # experiments.progress: the training plan, its estimate and actual times
    torch: str | None = None
    pytorch_lightning: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of other versions, kept as they were

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RunInfo:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        # a null means "not recorded": the field's default
        known = {k: v for k, v in obj.items() if k in names and v is not None}
        return cls(**known, extra={k: v for k, v in obj.items() if k not in names})

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for k in OPTIONAL:
            if out[k] is None:
                del out[k]
        out.update(self.extra)
        return out

    @classmethod
    def read(cls, path: str | Path) -> RunInfo:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))

    def get(self, key: str, default: Any = None) -> Any:
        """dict-style access for older readers: a field, or a key of `extra`."""
        value = getattr(self, key) if key in {f.name for f in dataclasses.fields(self)} else self.extra.get(key)
        return default if value is None else value
