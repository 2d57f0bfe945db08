"""Damaged harmonized-cache entries: what a full disk, a killed build or bit rot leaves in `paths.cache`.

Each case builds one entry the way training does (`CaseCache.get`), damages it, and asks again. A
damaged entry must be found at lookup and rebuilt with a message naming the file (never reused, never
blocking every later run); the rebuilt arrays must equal a clean build's.
"""
from __future__ import annotations

import json
import threading

import numpy as np

from tests.badinputs import ACCEPTED, bad_input
from tests.badinputs.volumes import _nifti, ct, lesion, mosmed_case


def _setup(tmp):
    from datamodules.harmonize import HarmonizerConfig
    from datamodules.sources import get_source

    case = mosmed_case(tmp, _nifti(tmp / "ct.nii.gz", ct()), _nifti(tmp / "mask.nii.gz", lesion()))
    return case, get_source("mosmed").POLICIES["lesion"], HarmonizerConfig(target_spacing=(4.0, 4.0, 5.0))


def _cache(tmp):
    from datamodules.cache import CaseCache

    return CaseCache(tmp / "cache")


def _built(tmp):
    """(case, policy, cfg, entry, clean arrays) of a freshly built entry."""
    case, policy, cfg = _setup(tmp)
    entry = _cache(tmp).get(case, policy, cfg)
    clean = {n: np.load(entry.path / n) for n in ("image.npy", "label.npy", "fg.npy")}
    return case, policy, cfg, entry, clean


def _again(tmp, case, policy, cfg, clean, damaged: str):
    """Ask for the entry again as the next run would; it must be rebuilt intact, saying which file was bad."""
    cache = _cache(tmp)
    entry = cache.get(case, policy, cfg)
    for name, want in clean.items():
        got = np.load(entry.path / name)
        assert got.shape == want.shape and np.array_equal(got, want), f"{name} not rebuilt intact"
    said = " ".join(getattr(cache, "repaired", []))
    assert damaged in said and "rebuil" in said, f"no repair message naming {damaged}: {said!r}"
    assert (cache.hits, cache.misses) == (0, 1)
    return entry


def _truncate(path, keep=0.5):
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


@bad_input("cache", match=ACCEPTED)
def case_truncated_image_npy(tmp):
    case, policy, cfg, entry, clean = _built(tmp)
    _truncate(entry.path / "image.npy")
    _again(tmp, case, policy, cfg, clean, str(entry.path / "image.npy"))


@bad_input("cache", match=ACCEPTED)
def case_truncated_label_npy(tmp):
    case, policy, cfg, entry, clean = _built(tmp)
    _truncate(entry.path / "label.npy", 0.9)
    _again(tmp, case, policy, cfg, clean, str(entry.path / "label.npy"))


@bad_input("cache", match=ACCEPTED)
def case_truncated_fg_npy(tmp):
    case, policy, cfg, entry, clean = _built(tmp)
    _truncate(entry.path / "fg.npy", 0.3)
    _again(tmp, case, policy, cfg, clean, str(entry.path / "fg.npy"))


@bad_input("cache", match=ACCEPTED)
def case_npy_header_only(tmp):
    """A disk that filled up right after the .npy header was written."""
    case, policy, cfg, entry, clean = _built(tmp)
    _truncate(entry.path / "image.npy", 0.0001)
    _again(tmp, case, policy, cfg, clean, str(entry.path / "image.npy"))


@bad_input("cache", match=ACCEPTED)
def case_garbage_image_npy(tmp):
    case, policy, cfg, entry, clean = _built(tmp)
    size = (entry.path / "image.npy").stat().st_size
    (entry.path / "image.npy").write_bytes(b"\0" * size)
    _again(tmp, case, policy, cfg, clean, str(entry.path / "image.npy"))


@bad_input("cache", match=ACCEPTED)
def case_missing_label_npy(tmp):
    case, policy, cfg, entry, clean = _built(tmp)
    (entry.path / "label.npy").unlink()
    _again(tmp, case, policy, cfg, clean, str(entry.path / "label.npy"))


@bad_input("cache", match=ACCEPTED)
def case_missing_meta_json(tmp):
    """A folder without meta.json (copied half, or written by an older build): used to block every run."""
    case, policy, cfg, entry, clean = _built(tmp)
    (entry.path / "meta.json").unlink()
    _again(tmp, case, policy, cfg, clean, str(entry.path))


@bad_input("cache", match=ACCEPTED)
def case_corrupt_meta_json(tmp):
    case, policy, cfg, entry, clean = _built(tmp)
    _truncate(entry.path / "meta.json", 0.5)
    _again(tmp, case, policy, cfg, clean, str(entry.path / "meta.json"))


@bad_input("cache", match=ACCEPTED)
def case_meta_json_not_an_object(tmp):
    case, policy, cfg, entry, clean = _built(tmp)
    (entry.path / "meta.json").write_text("[]", encoding="utf-8")
    _again(tmp, case, policy, cfg, clean, str(entry.path / "meta.json"))


@bad_input("cache", match=ACCEPTED)
def case_meta_shape_disagrees_with_arrays(tmp):
    case, policy, cfg, entry, clean = _built(tmp)
    meta = json.loads((entry.path / "meta.json").read_text(encoding="utf-8"))
    meta["shape"] = [s + 1 for s in meta["shape"]]
    (entry.path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    _again(tmp, case, policy, cfg, clean, str(entry.path / "image.npy"))


@bad_input("cache", match=ACCEPTED)
def case_zeroed_label(tmp):
    """Same size, same header, every voxel background: used silently before (no lesion to learn)."""
    case, policy, cfg, entry, clean = _built(tmp)
    arr = np.load(entry.path / "label.npy")
    np.save(entry.path / "label.npy", np.zeros_like(arr))
    _again(tmp, case, policy, cfg, clean, str(entry.path / "label.npy"))


@bad_input("cache", match=ACCEPTED)
def case_flipped_byte_in_image(tmp):
    """One byte of bit rot inside the image data: caught by the checksum."""
    case, policy, cfg, entry, clean = _built(tmp)
    raw = bytearray((entry.path / "image.npy").read_bytes())
    raw[-100] ^= 0x40
    (entry.path / "image.npy").write_bytes(bytes(raw))
    _again(tmp, case, policy, cfg, clean, str(entry.path / "image.npy"))


@bad_input("cache", match=ACCEPTED)
def case_zeroed_label_in_entry_without_checksums(tmp):
    """An entry written before checksums existed: its recorded voxel counts still tell."""
    case, policy, cfg, entry, clean = _built(tmp)
    meta = json.loads((entry.path / "meta.json").read_text(encoding="utf-8"))
    meta.pop("crc32", None)
    (entry.path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    np.save(entry.path / "label.npy", np.zeros_like(clean["label.npy"]))
    _again(tmp, case, policy, cfg, clean, str(entry.path / "label.npy"))


@bad_input("cache", match=r"label\.npy.*voxel counts", names=("{tmp}/cache",))
def case_label_zeroed_after_lookup(tmp):
    """Damage between lookup and the class-frequency pass: the counts recorded at build time disagree."""
    from datamodules.cache import class_counts

    case, policy, cfg, entry, clean = _built(tmp)
    entry = _cache(tmp).get(case, policy, cfg)
    np.save(entry.path / "label.npy", np.zeros_like(clean["label.npy"]))
    class_counts([entry], 8)


@bad_input("cache", match=ACCEPTED)
def case_stale_tmp_folder_of_a_killed_build(tmp):
    case, policy, cfg, entry, clean = _built(tmp)
    stale = entry.path.parent / f".tmp-{entry.path.name}-deadbeef"
    stale.mkdir()
    (stale / "image.npy").write_bytes(b"half")
    other = entry.path.parent / ".tmp-study_0999-0123456789abcdef-cafe0000"  # another case's killed build
    other.mkdir()
    _cache(tmp).get(case, policy, cfg)
    assert not stale.exists() and not other.exists(), "stale .tmp-* folders left behind"


@bad_input("cache", match=ACCEPTED)
def case_tmp_folder_of_a_live_build_is_kept(tmp):
    from datamodules.locking import folder_lock

    case, policy, cfg, entry, clean = _built(tmp)
    owner = entry.path.parent / "study_0999-0123456789abcdef"
    live = entry.path.parent / f".tmp-{owner.name}-cafe0000"
    live.mkdir()
    with folder_lock(owner, "cache entry"):  # another process building that entry right now
        _cache(tmp).get(case, policy, cfg)
        assert live.exists(), "a live build's .tmp-* folder was removed"


@bad_input("cache", match=ACCEPTED)
def case_two_builders_of_one_entry(tmp):
    """Two runs sharing the cache ask for the same missing entry: one builds, the other waits and reuses it."""
    case, policy, cfg = _setup(tmp)
    caches = [_cache(tmp), _cache(tmp)]
    results = [None, None]

    def work(i):
        results[i] = caches[i].get(case, policy, cfg)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0].path == results[1].path
    assert sum(c.misses for c in caches) == 2 and sum(getattr(c, "built", 1) for c in caches) == 1
    assert not [p for p in results[0].path.parent.iterdir() if p.name.startswith(".tmp-")]


@bad_input("cache", match=r"cache|Not a directory|File exists", names=("{tmp}/cache",))
def case_cache_root_is_a_file(tmp):
    case, policy, cfg = _setup(tmp)
    (tmp / "cache").write_text("not a folder", encoding="utf-8")
    _cache(tmp).get(case, policy, cfg)
