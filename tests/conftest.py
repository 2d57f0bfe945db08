import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two xdist workers on the 2 cores: each worker's torch keeps to one thread (and the
    # runs it starts in subprocesses default to one, through OMP_NUM_THREADS). Measured on 2 cores: one
    # process 770-814 s; two workers with two threads each 746 s (user time 22 min: libgomp's threads spin
    # while they wait for the core the other worker holds); two workers with one thread each 459 s.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    _set_num_threads = torch.set_num_threads
    torch.set_num_threads = lambda n: _set_num_threads(min(int(n), 1))
    torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MOSMED_MASKS = SHARED / "data" / "mosmed_masks"


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    """One tiny phantom suite (all three sources) for the whole session."""
    from datamodules.phantom.suite import ensure_suite

    return ensure_suite(tmp_path_factory.mktemp("cache"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def manifests(phantom_root):
    import json

    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in phantom_root.glob("*.json")}
