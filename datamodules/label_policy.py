"""Common label space and per-source label policies.

Every source stores its own integer codes. A `LabelPolicy` is data: which raw code means which common
class, and which common classes the source annotates at all. A class the source does not annotate is
*unknown* in that source (a MosMed voxel labelled 0 may be lung or background), so losses and metrics
must never read those voxels as background; `annotated_vector()` is what they consume.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

# Order is the channel order of every network output. Append new classes at the end only: cached
# label maps and checkpoints store these indices.
CLASSES: tuple[str, ...] = ("background", "lung_left", "lung_right", "lesion", "effusion", "tumour", "ggo",
                            "consolidation")
# effusion and tumour exist so that a source's pleural effusion or (non-COVID) tumour can be its own
# class when the config says so (e.g. data.policies={msd_lung: tumour_as_class}); by default such
# codes are "ignore". They are never COVID lesion unless a policy named *_as_lesion is chosen.
#
# Two views of opacities: `lesion` is an opacity of unspecified type (the merged view every COVID source
# gives); `ggo` and `consolidation` are its typed children (the split view of sources that tell them
# apart, e.g. data.policies={medseg: ggo_consolidation}). In a source that annotates only `lesion`, the
# children are unknown *within* the lesion: the loss merges them into their parent, not into
# background, so a lesion voxel there may be learned as GGO or consolidation but never as background.
PARENT: dict[str, str] = {"ggo": "lesion", "consolidation": "lesion"}
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
BACKGROUND = 0
LESION = CLASS_INDEX["lesion"]
# Label values that are an opacity in either view: the lesion mask of scoring, severity and predict.
OPACITY = tuple(CLASS_INDEX[c] for c in ("lesion", "ggo", "consolidation"))


# Classes that lie inside another class's region. Whole-lung masks (COVID-19-CT-Seg's Lung_Mask,
# StructSeg's lungs, a custom lung-only source) delineate every opacity as lung: where a source annotates
# the lungs but not the opacity, an opacity is unknown *inside* the lungs, and the partial-label loss merges
# its probability into the lung the voxel is labelled with, not into background (losses.nested_moves).
CONTAINERS: dict[str, tuple[str, ...]] = {c: ("lung_left", "lung_right") for c in ("lesion", "ggo", "consolidation")}
# How a voxel's label is decided from class probabilities: the group with the largest summed probability
# wins, then its most probable member (seed 000 combines the opacity groups' probabilities). A plain argmax
# would lose an opacity whose probability is split between its types: (background 0.4, lesion 0.3, GGO 0.3)
# is an opacity. Ties go to the earlier group and member, as argmax's do.
DECISION_GROUPS: tuple[tuple[str, ...], ...] = (("background",), ("lung_left", "lung_right"),
                                                ("lesion", "ggo", "consolidation"), ("effusion",), ("tumour",))


def ancestors(name: str) -> list[str]:
    """Parent, grandparent, ... of a class (nearest first)."""
    out = []
    while name in PARENT:
        name = PARENT[name]
        out.append(name)
    return out
def decide_labels(channel: Callable[[Sequence[int]], torch.Tensor | None], n_classes: int) -> torch.Tensor:
    """Label map (uint8) from class probabilities, by `DECISION_GROUPS`.

    `channel(indices)` returns the summed probability of those classes as a tensor of the output shape,
    or None where it is zero everywhere (a class never trained); it is called once per group and once
    per member of a group that wins somewhere, so a caller can produce channels lazily (resampled one at
    a time by `harmonize.restore_to_original`)."""
    groups = [[CLASS_INDEX[c] for c in g if CLASS_INDEX[c] < n_classes] for g in DECISION_GROUPS]
    groups = [g for g in groups if g]
    best = winner = None
    for gi, members in enumerate(groups):
        total = channel(members)
        if total is None:
            continue
        if best is None:
            best, winner = total, torch.full(total.shape, gi, dtype=torch.uint8, device=total.device)
            continue
        better = total > best
        best = torch.where(better, total, best)
        winner[better] = gi
    labels = torch.zeros(winner.shape, dtype=torch.uint8, device=winner.device)
    for gi, members in enumerate(groups):
        won = winner == gi
        if not bool(won.any()):
            continue
        if len(members) == 1:
            labels[won] = members[0]
            continue
        top = None
        for c in members:  # the group's most probable member, where the group won
            p = channel([c])
            if p is None:
                continue
            if top is None:
                top = p
                labels[won] = c
            else:
                better = won & (p > top)
                top = torch.where(better, p, top)
                labels[better] = c
    return labels


def labels_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """`decide_labels` on probabilities held in memory, [C, *spatial] -> [*spatial] uint8."""
    probs = probs.detach()
    return decide_labels(lambda idx: probs[list(idx)].sum(0), probs.shape[0])


# A raw code mapped to "ignore" becomes IGNORE in the common label map: those voxels count neither for
# nor against any class in the loss and the metrics (e.g. a tumour in a non-COVID source, which is
# neither COVID lesion nor healthy tissue). It survives nearest-neighbour resampling like any label.
IGNORE_NAME = "ignore"
IGNORE = 254
# Raw codes a policy may declare: signed for schemes such as L3-Net's -1 "unlabelled" (seed 000).
CODE_MIN, CODE_MAX = -128, 255


class LabelError(ValueError):
    """A mask holds codes its policy does not declare, or a policy is malformed."""


@dataclass(frozen=True)
class LabelPolicy:
    """How one source's raw mask codes map into `CLASSES`.

    code_map: raw code -> common class name, or "ignore" (excluded from loss and metrics). Code 0 must
      map to background.
    annotated: common foreground classes this source delineates; everything else is unknown there.
    """

    name: str
    code_map: Mapping[int, str]
    annotated: tuple[str, ...]
    description: str = ""
    # Float masks: values within this distance of an integer are rounded to it, others are an error.
    # 0.5 rounds everything (mirrors that resampled masks with interpolation, e.g. Kaggle's COVID-19-CT-Seg).
    float_tolerance: float = 1e-3
    _lut: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        codes = dict(self.code_map)
        if codes.get(0) != "background":
            raise LabelError(f"policy {self.name!r}: raw code 0 must map to 'background', got {codes.get(0)!r}")
        for code, cls in codes.items():
            if cls not in CLASS_INDEX and cls != IGNORE_NAME:
                raise LabelError(f"policy {self.name!r}: code {code} maps to unknown class {cls!r}; known: {CLASSES}")
            if not CODE_MIN <= int(code) <= CODE_MAX:
                raise LabelError(f"policy {self.name!r}: raw code {code} outside {CODE_MIN}..{CODE_MAX}")
        for cls in self.annotated:
            if cls not in CLASS_INDEX or cls == "background":
                raise LabelError(f"policy {self.name!r}: annotated class {cls!r} is not a foreground class")
        mapped_fg = {c for c in codes.values() if c not in ("background", IGNORE_NAME)}
        if mapped_fg != set(self.annotated):
            # A code mapped to a class the policy calls unannotated (or the reverse) would silently teach
            # the network wrong negatives; demand the two declarations agree.
            raise LabelError(
                f"policy {self.name!r}: mapped classes {sorted(mapped_fg)} differ from annotated {sorted(self.annotated)}"
            )
        lut = np.full(CODE_MAX - CODE_MIN + 1, 255, dtype=np.uint8)  # 255 marks an undeclared code
        for code, cls in codes.items():
            lut[int(code) - CODE_MIN] = IGNORE if cls == IGNORE_NAME else CLASS_INDEX[cls]
        object.__setattr__(self, "_lut", lut)
        object.__setattr__(self, "code_map", codes)

    def annotated_vector(self) -> np.ndarray:
        """Bool vector over CLASSES: True where the class is known in this source (background always).

        A parent whose children are all annotated is known too: a source that types every opacity as
        GGO or consolidation also says where no opacity is.
        """
        vec = np.zeros(len(CLASSES), dtype=bool)
        vec[BACKGROUND] = True
        for cls in self.annotated:
            vec[CLASS_INDEX[cls]] = True
        for parent in set(PARENT.values()):
            children = [c for c, p in PARENT.items() if p == parent]
            if all(vec[CLASS_INDEX[c]] for c in children):
                vec[CLASS_INDEX[parent]] = True
        return vec

    def _dtype_lut(self, dtype: np.dtype) -> np.ndarray:
        """Lookup table indexed by the unsigned bit pattern of a <= 16-bit integer dtype (255: unknown)."""
        bits = np.arange(2 ** (8 * dtype.itemsize), dtype=np.int64)
        codes = bits - 2 ** (8 * dtype.itemsize) * (bits >= 2 ** (8 * dtype.itemsize - 1)) if dtype.kind == "i" else bits
        lut = np.full(bits.size, 255, np.uint8)
        ok = (codes >= CODE_MIN) & (codes <= CODE_MAX)
        lut[ok] = self._lut[codes[ok] - CODE_MIN]
        return lut

    def remap(self, raw: np.ndarray, where: str = "<array>") -> np.ndarray:
        """Raw mask -> uint8 common-class indices. Unknown codes raise, naming `where` and the codes."""
        arr = np.asarray(raw)
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)):
                raise LabelError(f"{where}: mask contains NaN or inf")
            rounded = np.rint(arr)
            if np.any(np.abs(arr - rounded) > self.float_tolerance):
                bad = np.unique(arr[np.abs(arr - rounded) > self.float_tolerance])[:5]
                raise LabelError(f"{where}: non-integer mask values {bad.tolist()} (policy {self.name!r})")
            arr = rounded
        if arr.dtype.kind in "ui" and arr.dtype.itemsize <= 2:
            # small integer masks (what the downloads hold): one table lookup indexed by the stored bits,
            # no int64 copy of the volume; a code outside the policy maps to 255 and is reported below
            arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
            out = self._dtype_lut(arr.dtype)[arr.view(f"u{arr.dtype.itemsize}")]
            if (out == 255).any():
                bad = sorted(int(c) for c in np.unique(arr[out == 255]))
                raise LabelError(f"{where}: mask codes {bad[:5]} not declared by policy {self.name!r} "
                                 f"(declared: {sorted(self.code_map)})")
            return out
        arr = arr.astype(np.int64, copy=False)
        lo, hi = int(arr.min(initial=0)), int(arr.max(initial=0))
        if lo < CODE_MIN or hi > CODE_MAX:
            bad = np.unique(arr[(arr < CODE_MIN) | (arr > CODE_MAX)])[:5]
            raise LabelError(f"{where}: mask codes {bad.tolist()} not declared by policy {self.name!r}")
        out = self._lut[arr - CODE_MIN]
        if (out == 255).any():
            bad = sorted(int(c) for c in np.unique(arr[out == 255]))
            raise LabelError(
                f"{where}: mask codes {bad} not declared by policy {self.name!r} (declared: {sorted(self.code_map)})"
            )
        return out
