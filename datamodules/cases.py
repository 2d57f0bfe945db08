"""The record every source adapter returns: where a case's files are and what they mean."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Case:
    """One CT volume of one source, with its mask if it has one.

    `policy` names the source's label policy for this case's mask (a source may ship several mask
    kinds); `encoding` names the intensity decoding the harmonizer applies (`hu` or `uint8_window`);
    `flip_axes` are voxel axes stored mirrored relative to the header, to undo after reorientation.
    """

    source: str
    case_id: str
    patient_id: str
    image: Path
    label: Path | None = None
    policy: str | None = None
    encoding: str = "hu"
    window: tuple[float, float] | None = None
    flip_axes: tuple[int, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def labelled(self) -> bool:
        return self.label is not None

    @property
    def key(self) -> str:
        """Globally unique id: case ids repeat across sources (e.g. `1.nii.gz`)."""
        return f"{self.source}/{self.case_id}"
