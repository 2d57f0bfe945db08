"""Source adapters: one public dataset per file, registered by name.

An adapter only finds files and says what they are (a list of `Case`); it never reads voxels. The
phantom suite writes the same official layouts, so these adapters are the only way data comes in.
"""
from __future__ import annotations

from pathlib import Path

from datamodules.cases import Case
from datamodules.label_policy import LabelPolicy
from datamodules.sources.base import SOURCES, CaseProblem, DataLayoutError, SourceAdapter, get_source, register_source

# Importing the modules fills the registry through their decorators.
from datamodules.sources import covid19_20, covid19_ar, ctseg, medseg, mosmed, msd_lung, nsclc, structseg  # noqa: E402,F401  isort: skip



def policy_named(name: str) -> LabelPolicy:
    """The label policy with this full name (as recorded in cache meta, e.g. `ctseg/lung_and_infection`)."""
    for adapter in SOURCES.values():
        for policy in adapter.POLICIES.values():
            if policy.name == name:
                return policy
    raise KeyError(f"no source declares a label policy named {name!r}")


def case_from_meta(meta: dict) -> Case:
    """Rebuild the `Case` a cache entry was made from (its files and decoding), e.g. to score a
    prediction against the stored mask in original geometry."""
    return Case(source=meta["source"], case_id=meta["case"], patient_id=meta["patient"],
                image=Path(meta["image_file"]), label=Path(meta["label_file"]) if meta.get("label_file") else None,
                encoding=meta["encoding"], window=tuple(meta["window"]) if meta.get("window") else None,
                image_flips=tuple(meta.get("declared_image_flips", ())))


__all__ = ["SOURCES", "CaseProblem", "DataLayoutError", "SourceAdapter", "case_from_meta", "get_source", "policy_named",
           "register_source"]
