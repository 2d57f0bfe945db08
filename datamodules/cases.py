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


def repeated_ids(cases: list[Case]) -> dict[str, list[Case]]:
    """Case key -> the cases sharing it, for every key found more than once (the same study unpacked into
    two folders, a `.nii` copy beside the `.nii.gz`): one case id must name one scan."""
    by_key: dict[str, list[Case]] = {}
    for c in cases:
        by_key.setdefault(c.key, []).append(c)
    return {k: v for k, v in by_key.items() if len(v) > 1}


def repeated_id_message(cases: list[Case]) -> str:
    files = ", ".join(str(c.image) for c in cases)
    return f"duplicate case id {cases[0].case_id}: {len(cases)} images share it ({files}); keep one"
