import json
import os

import numpy as np

from datamodules.cache import FG_SAMPLES_PER_CLASS, CaseCache
from datamodules.harmonize import HarmonizerConfig
from datamodules.sources import SOURCES


def _case(phantom_root, source="mosmed"):
    adapter = SOURCES[source](phantom_root / source)
    case = next(c for c in adapter.discover() if c.labelled)
    return case, adapter.policy(case)


def test_hit_on_second_run_miss_after_config_change(tmp_path, phantom_root):
    case, pol = _case(phantom_root)
    cfg = HarmonizerConfig(target_spacing=(6.0, 6.0, 8.0))
    first = CaseCache(tmp_path).get(case, pol, cfg)
    again = CaseCache(tmp_path)  # a new process: nothing in memory
    second = again.get(case, pol, cfg)
    assert (again.hits, again.misses) == (1, 0) and second.path == first.path
    np.testing.assert_array_equal(second.image(), first.image())
    changed = again.get(case, pol, HarmonizerConfig(target_spacing=(6.0, 6.0, 8.0), window=(-1000, 350)))
    assert again.misses == 1 and changed.path != first.path
    assert not np.array_equal(changed.image(), first.image())
    finer = again.get(case, pol, HarmonizerConfig(target_spacing=(4.0, 4.0, 8.0)))
    assert finer.image().shape[0] > first.image().shape[0]


def test_replaced_input_file_misses(tmp_path, phantom_root):
    case, pol = _case(phantom_root)
    cfg = HarmonizerConfig(target_spacing=(6.0, 6.0, 8.0))
    cache = CaseCache(tmp_path / "c")
    cache.get(case, pol, cfg)
    st = case.image.stat()
    os.utime(case.image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        cache.get(case, pol, cfg)
        assert cache.misses == 2
    finally:
        os.utime(case.image, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_entry_content_and_no_temp_left(tmp_path, phantom_root):
    case, pol = _case(phantom_root)
    entry = CaseCache(tmp_path).get(case, pol, HarmonizerConfig(target_spacing=(6.0, 6.0, 8.0)))
    meta = json.loads((entry.path / "meta.json").read_text(encoding="utf-8"))
    assert meta["source"] == "mosmed" and meta["case"] == case.case_id
    assert entry.image().shape == tuple(meta["shape"]) == entry.label().shape
    assert isinstance(entry.image(), np.memmap)
    fg = entry.foreground()
    lab = entry.label()
    assert len(fg) and all(lab[x, y, z] == c for c, x, y, z in fg[:50])
    assert meta["voxels"]["lesion"] == int((lab == 3).sum())
    assert not [p for p in (tmp_path / "mosmed").iterdir() if p.name.startswith(".tmp")]


def test_failed_build_leaves_no_entry(tmp_path, phantom_root):
    import pytest

    from datamodules.io import VolumeError
    case, pol = _case(phantom_root)
    bad = case.__class__(**{**case.__dict__, "image": tmp_path / "missing.nii.gz"})
    bad.image.write_bytes(b"not a nifti")
    with pytest.raises(VolumeError, match="missing.nii.gz"):
        CaseCache(tmp_path / "c").get(bad, pol, HarmonizerConfig())
    assert not list((tmp_path / "c").rglob("meta.json"))
    assert not list((tmp_path / "c").rglob(".tmp*"))


def test_foreground_sample_independent_of_storage_location(tmp_path, phantom_root):
    import shutil
    case, pol = _case(phantom_root, "ctseg")  # lungs give far more than FG_SAMPLES_PER_CLASS voxels
    cfg = HarmonizerConfig(target_spacing=(4.0, 4.0, 6.0))
    a = CaseCache(tmp_path / "a").get(case, pol, cfg)
    moved = tmp_path / "copy" / case.image.name
    moved.parent.mkdir()
    shutil.copy(case.image, moved)
    b = CaseCache(tmp_path / "b").get(case.__class__(**{**case.__dict__, "image": moved}), pol, cfg)
    assert a.meta["key"] != b.meta["key"]
    assert a.meta["voxels"]["lung_left"] > FG_SAMPLES_PER_CLASS
    np.testing.assert_array_equal(a.foreground(), b.foreground())


def test_parallel_build_equals_serial_and_keeps_going_past_a_bad_case(tmp_path, phantom_root):
    import dataclasses

    adapter = SOURCES["mosmed"](phantom_root / "mosmed")
    cases = [c for c in adapter.discover() if c.labelled][:3]
    items = [(c, adapter.policy(c)) for c in cases]
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    items.append((dataclasses.replace(cases[0], case_id="broken", image=broken), items[0][1]))
    cfg = HarmonizerConfig(target_spacing=(6.0, 6.0, 8.0))
    import torch

    threads = torch.get_num_threads()
    serial = CaseCache(tmp_path / "serial").get_many(items, cfg, workers=1, progress=False)
    assert torch.get_num_threads() == threads  # a serial build runs in the training process: leave its threads
    parallel_cache = CaseCache(tmp_path / "parallel")
    parallel = parallel_cache.get_many(items, cfg, workers=2, progress=False)
    assert (parallel_cache.hits, parallel_cache.misses) == (0, 4)
    for a, b in zip(serial[:3], parallel[:3]):  # same entries, in the caller's order
        assert a.meta["case"] == b.meta["case"] and a.path.name == b.path.name
        np.testing.assert_array_equal(a.image(), b.image())
        np.testing.assert_array_equal(a.label(), b.label())
    for bad in (serial[3], parallel[3]):  # the unreadable file comes back as its error, naming the file
        assert isinstance(bad, Exception) and "broken.nii.gz" in str(bad)
    again = CaseCache(tmp_path / "parallel")
    again.get_many(items[:3], cfg, workers=2, progress=False)
    assert (again.hits, again.misses) == (3, 0)


def test_entries_without_checksums_are_still_used(tmp_path, phantom_root):
    """Entries written before meta.json held CRC-32s (CACHE_VERSION unchanged) are validated by size and
    label voxel counts and reused, not rebuilt."""
    case, pol = _case(phantom_root)
    cfg = HarmonizerConfig(target_spacing=(6.0, 6.0, 8.0))
    entry = CaseCache(tmp_path).get(case, pol, cfg)
    meta = json.loads((entry.path / "meta.json").read_text(encoding="utf-8"))
    assert set(meta.pop("crc32")) == {"image.npy", "label.npy", "fg.npy"}
    (entry.path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    again = CaseCache(tmp_path)
    assert again.get(case, pol, cfg).path == entry.path
    assert (again.hits, again.misses, again.built, again.repaired) == (1, 0, 0, [])
