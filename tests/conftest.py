import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

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
