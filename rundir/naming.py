"""Run names: `run_hash` is the one function that turns what a run computes into the hash in its folder name.

Two kinds of runs are named, and both hash through `run_hash`, leaving out the same keys (`NOT_HASHED`):
- a run started directly (`python -m experiments.loso ...`) by its resolved config (a mapping):
  `<label>-<experiment>-<8 hex digits>` (experiments.tracking.config_hash);
- a sweep's run by its command-line overrides (`key=value` strings): `<label>-<10 hex digits>`
  (sweeps.expand.overrides_hash). Not by its config: a code change that adds a config key changes every
  config's hash, and a half-finished sweep must still find, and resume, the folders it started.
The lengths and the key list are what existing run folders were named with: changing either renames them.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

# Keys that do not change what a run computes (where it writes, how it logs, how many processes load
# data): a run differing only in these is the same run, in the same folder. `run.name` is the name itself.
# (wandb.project does enter the hash: config hashes have always included it.)
NOT_HASHED = ("paths.runs", "paths.cache", "run.name", "run.overwrite", "wandb.mode", "wandb.entity", "wandb.tags",
              "wandb.group", "data.num_workers", "data.cache_workers", "trainer.threads",
              "trainer.checkpoint_every_n_steps", "trainer.progress",
              # extra output files only (per-class probabilities): the numbers a run computes are the same
              "evaluation.save_probabilities",
              # how fast, not what: pinned batches, scoring in a thread (the same rows), cuDNN's kernel choice
              # (on a GPU, like any non-deterministic run, within float rounding)
              "data.pin_memory", "evaluation.overlap_scoring", "trainer.cudnn_benchmark",
              # where freed host memory goes (experiments.host_memory): the same float operations, bit for bit
              "trainer.keep_host_memory",
              # AdamW's fused kernel: the same update within float rounding, like cuDNN's kernel choice
              "optim.fused",
              # warnings only (per_case.csv's sanity column): the metrics a run computes are the same
              "evaluation.sanity")
CONFIG_HASH_LENGTH = 8
OVERRIDES_HASH_LENGTH = 10


def hashed(key: str) -> bool:
    """Whether the dotted `key` enters a run's name (it is not one of NOT_HASHED, nor below one)."""
    return not any(key == k or key.startswith(k + ".") for k in NOT_HASHED)


def _pruned(config: Mapping, prefix: str = "") -> dict:
    return {k: (_pruned(v, f"{prefix}{k}.") if isinstance(v, Mapping) else v)
            for k, v in config.items() if hashed(f"{prefix}{k}")}


def run_hash(what: Mapping | Sequence[str], length: int | None = None) -> str:
    """sha256 of what a run computes, as hex: `what` is a resolved config (a nested mapping of plain
    values) or a run's `key=value` overrides (order does not matter). NOT_HASHED keys are left out."""
    if isinstance(what, Mapping):
        payload, default = _pruned(what), CONFIG_HASH_LENGTH
    else:
        payload, default = sorted(o for o in what if hashed(o.split("=", 1)[0])), OVERRIDES_HASH_LENGTH
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:length or default]
