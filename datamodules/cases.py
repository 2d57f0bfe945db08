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
    `image_flips` are the canonical axes (`R-L`, `A-P`, `S-I`) along which the source *declares* the
    image mirrored relative to its masks. A declaration only: the harmonizer measures every labelled
    case (`datamodules.alignment`) and refuses one the data contradict.
    """

    source: str
    case_id: str
    patient_id: str
    image: Path
    label: Path | None = None
    policy: str | None = None
    encoding: str = "hu"
    window: tuple[float, float] | None = None
    image_flips: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def labelled(self) -> bool:
        return self.label is not None

    @property
    def key(self) -> str:
        """Globally unique id: case ids repeat across sources (e.g. `1.nii.gz`)."""
        return f"{self.source}/{self.case_id}"
