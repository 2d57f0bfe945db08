"""Adapter base class, the registry decorator and layout discovery shared by all sources."""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from datamodules.alignment import parse_flips
from datamodules.cases import Case
from datamodules.label_policy import LabelPolicy
from datamodules.registry import Registry

SOURCES = Registry("source")

NIFTI_RE = re.compile(r"\.nii(\.gz)?$")


class DataLayoutError(FileNotFoundError):
    """The folder does not hold the layout the source's official download has."""


@dataclass(frozen=True)
class CaseProblem:
    """Something wrong with one file of a source; `message` names what."""

    source: str
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.file}: {self.message}"


def register_source(name: str) -> Callable[[type[SourceAdapter]], type[SourceAdapter]]:
    def wrap(cls: type[SourceAdapter]) -> type[SourceAdapter]:
        cls.name = name
        return SOURCES.register(name)(cls)

    return wrap


def get_source(name: str) -> type[SourceAdapter]:
    return SOURCES.lookup(name)


def strip_nifti(name: str) -> str:
    return NIFTI_RE.sub("", name)


def nifti_files(folder: Path) -> list[Path]:
    """NIfTI files in `folder`, sorted, skipping macOS `._*` resource forks and hidden files."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and NIFTI_RE.search(p.name) and not p.name.startswith("."))


def walk_dirs(root: Path, max_depth: int = 3) -> Iterator[Path]:
    """`root` and its sub-folders breadth first, down to `max_depth` levels (archives nest differently)."""
    level = [root]
    for _ in range(max_depth + 1):
        nxt: list[Path] = []
        for d in level:
            yield d
            nxt.extend(sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")))
        level = nxt


def matching_flips(case_id: str, table: Mapping[str, object], where: str) -> tuple[str, ...] | None:
    """The image flips of the first case-id glob of `table` that matches `case_id` (None: no pattern does)."""
    for pattern, flips in table.items():
        if fnmatch.fnmatchcase(case_id, pattern):
            return parse_flips(flips, f"{where}.{pattern}")
    return None


class SourceAdapter:
    """Finds the cases of one source under `root` (the folder holding the unpacked official download).

    Subclasses declare `POLICIES` (label policies by name), `DEFAULT_POLICY`, `DESCRIPTION`, optionally
    `DECLARED_IMAGE_FLIPS`, and implement `discover()`.
    """

    name: ClassVar[str] = ""
    DESCRIPTION: ClassVar[str] = ""
    POLICIES: ClassVar[dict[str, LabelPolicy]] = {}
    DEFAULT_POLICY: ClassVar[str] = ""
    # Case-id glob -> canonical axes along which the source is believed to store the IMAGE mirrored
    # relative to its masks (first matching pattern wins). Data, not code: the harmonizer confirms each
    # declaration on the user's files (datamodules.alignment) and `data.image_flips` overrides it.
    DECLARED_IMAGE_FLIPS: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, root: str | Path, policy: str | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataLayoutError(f"{self.name}: data folder {self.root} does not exist")
        if policy is not None and policy not in self.POLICIES:
            raise ValueError(f"{self.name}: unknown label policy {policy!r} (data.policies); this source has "
                             f"{sorted(self.POLICIES)}")
        # data.policies picks another of the source's declared policies (e.g. MSD tumour as lesion).
        self.default_policy = policy or self.DEFAULT_POLICY
        # Per-case problems found while discovering (e.g. a labelled case without its mask): the case is
        # left out and the problem kept here, so one bad file never hides the rest of a source; callers
        # decide (data.on_error) whether that is fatal, and verify lists them all.
        self.problems: list[CaseProblem] = []

    def problem(self, path: Path, message: str) -> None:
        self.problems.append(CaseProblem(self.name, str(path), message))

    def discover(self) -> list[Case]:
        raise NotImplementedError

    @classmethod
    def decoding(cls, case_id: str) -> dict:
        """How this source stores a case's voxels: `encoding`, `window`, `image_flips` (Case fields).
        Plain HU, stored as the header says, unless a source overrides it per case."""
        return {"encoding": "hu", "window": None, "image_flips": cls.declared_flips(case_id)}

    @classmethod
    def declared_flips(cls, case_id: str) -> tuple[str, ...]:
        """The image flips the source declares for `case_id` (`DECLARED_IMAGE_FLIPS`), else none."""
        found = matching_flips(case_id, cls.DECLARED_IMAGE_FLIPS, f"{cls.name}.DECLARED_IMAGE_FLIPS")
        return () if found is None else found

    def with_flip_overrides(self, cases: list[Case], table: Mapping[str, object] | None) -> list[Case]:
        """`cases` with the user's image-flip declarations (`data.image_flips.<source>`) replacing the
        source's own where a pattern matches."""
        out = []
        for c in cases:
            found = matching_flips(c.case_id, table or {}, f"data.image_flips.{self.name}")
            out.append(c if found is None else replace(c, image_flips=found))
        return out

    def policy(self, case: Case) -> LabelPolicy:
        return self.POLICIES[case.policy or self.default_policy]

    def find_dir(self, predicate: Callable[[Path], bool], what: str, max_depth: int = 3) -> Path:
        for d in walk_dirs(self.root, max_depth):
            if predicate(d):
                return d
        raise DataLayoutError(f"{self.name}: no {what} found under {self.root} (searched {max_depth} levels deep)")
