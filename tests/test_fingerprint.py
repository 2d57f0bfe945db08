"""Content fingerprints find a scan planted under another source (8-bit, LAS, resampled, mirrored),
group nothing else, and the merged duplicate patient never straddles a split."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datamodules import fingerprint as fpm
from datamodules.cases import Case
from datamodules.io import write_volume
from datamodules.phantom.suite import to_stored
from datamodules.sources import get_source
from datamodules.splits import (
    LeakageError,
    Split,
    assert_no_leakage,
    loso_split,
    merge_duplicate_patients,
    transfer_split,
)

SOURCES = ("covid19_20", "mosmed", "ctseg")
WINDOW = (-1250.0, 250.0)
ORIGINAL = "ctseg/coronacases_001"


@pytest.fixture(scope="module")
def phantom_cases(phantom_root):
    return [c for s in SOURCES for c in get_source(s)(phantom_root / s).discover()]


@pytest.fixture(scope="module")
def phantom_fps(phantom_cases):
    return [fpm.fingerprint(c) for c in phantom_cases]


def to_uint8(hu):
    return np.rint((np.clip(hu, *WINDOW) - WINDOW[0]) * 255.0 / (WINDOW[1] - WINDOW[0])).astype(np.uint8)


def resampled_copy(hu, affine, scale):
    """8-bit copy of a canonical HU volume on a matrix `scale` times the size, same field of view."""
    n = np.asarray(hu.shape)
    m = np.maximum(1, np.round(n * np.asarray(scale, dtype=float))).astype(int)
    t = torch.from_numpy(to_uint8(hu).astype(np.float32))[None, None]
    out = F.interpolate(t, size=tuple(int(x) for x in m), mode="trilinear", align_corners=False)[0, 0].numpy()
    vox = np.eye(4)
    vox[:3, :3] = np.diag(n / m)
    vox[:3, 3] = 0.5 * n / m - 0.5  # outer corner of the field of view stays put
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), affine @ vox


def plant_copy(case, folder, source="medseg", case_id="rp_1", scale=(0.8, 0.8, 1.0), axcodes="LAS", mirror=()):
    """Write `case` again as another source would ship it: 8-bit windowed [-1250, 250], resampled,
    stored in `axcodes`, mirrored along canonical axes `mirror` (nothing declares it)."""
    hu, affine = fpm.canonical_hu(case)
    arr, aff = resampled_copy(hu, affine, scale)
    for ax in mirror:
        arr = np.flip(arr, axis=ax)
    stored, stored_aff = to_stored(np.ascontiguousarray(arr), aff, axcodes)
    path = folder / f"{case_id}.nii.gz"
    write_volume(path, stored, stored_aff)
    return Case(source, case_id, case_id, image=path, label=case.label, policy=case.policy,
                encoding="uint8_window", window=WINDOW)


def by_key(cases, key):
    return next(c for c in cases if c.key == key)


def test_planted_8bit_copy_is_grouped_and_nothing_else(phantom_cases, tmp_path, monkeypatch):
    copy = plant_copy(by_key(phantom_cases, ORIGINAL), tmp_path)
    cache = tmp_path / "fp"
    groups = fpm.find_duplicates(phantom_cases + [copy], cache_dir=cache)
    assert [g.keys for g in groups] == [tuple(sorted((ORIGINAL, copy.key)))]
    assert groups[0].min_similarity >= fpm.THRESHOLD + 0.05
    assert "medseg/rp_1" in groups[0].describe()
    assert len(list(cache.glob("*.npz"))) == len(phantom_cases) + 1
    # Second run reads every fingerprint from the cache: no volume is decoded again.
    monkeypatch.setattr(fpm, "fingerprint", lambda case: pytest.fail(f"recomputed {case.key}"))
    again = fpm.find_duplicates(phantom_cases + [copy], cache_dir=cache)
    assert [(g.keys, g.pairs) for g in again] == [(g.keys, g.pairs) for g in groups]


def test_cache_key_follows_the_file(phantom_cases, tmp_path):
    copy = plant_copy(by_key(phantom_cases, ORIGINAL), tmp_path)
    cache = tmp_path / "fp"
    fpm.cached_fingerprint(copy, cache)
    other = plant_copy(by_key(phantom_cases, "ctseg/coronacases_002"), tmp_path)  # same path, new content
    assert other.image == copy.image
    fresh = fpm.fingerprint(other)
    np.testing.assert_array_equal(fpm.cached_fingerprint(other, cache).descriptor, fresh.descriptor)
    assert len(list(cache.glob("*.npz"))) == 2
    # What a source declares about image flips does not enter the fingerprint (it is mirror-invariant).
    fpm.cached_fingerprint(replace(other, image_flips=("A-P",)), cache)
    assert len(list(cache.glob("*.npz"))) == 2
    # The decoding does: another cache entry.
    fpm.cached_fingerprint(replace(other, window=(-1000.0, 300.0)), cache)
    assert len(list(cache.glob("*.npz"))) == 3


@pytest.mark.parametrize("mirror", [(0,), (1,), (0, 2), (0, 1, 2)])
def test_mirrored_copy_matches_whatever_is_declared(phantom_cases, tmp_path, mirror):
    original = by_key(phantom_cases, ORIGINAL)
    copy = plant_copy(original, tmp_path, mirror=mirror)
    assert copy.image_flips == ()  # nobody declares the mirror
    assert fpm.similarity(fpm.fingerprint(original), fpm.fingerprint(copy)) >= fpm.THRESHOLD + 0.05


def test_radiopaedia_case_matches_its_unmirrored_copy(phantom_cases, tmp_path):
    # The phantom's radiopaedia images are 8-bit and stored mirrored along A-P and S-I relative to their
    # masks; a copy elsewhere stored the right way round and at another matrix must still match.
    rp = by_key(phantom_cases, "ctseg/radiopaedia_7_85703_0")
    assert rp.encoding == "uint8_window"
    copy = plant_copy(rp, tmp_path, scale=(0.8, 0.8, 1.0), axcodes="LPS", mirror=(1, 2))
    assert fpm.similarity(fpm.fingerprint(rp), fpm.fingerprint(copy)) >= fpm.THRESHOLD + 0.05


def test_distinct_patients_stay_below_threshold_with_margin(phantom_cases, phantom_fps):
    # Correlate every distinct pair without the field-of-view gate (as if all shared one FOV), under the
    # best of the 8 mirrorings as `similarity` does, and 8-bit resampled copies of every case: the
    # threshold must sit between them with room on both sides.
    corr = fpm.similarity_matrix(phantom_fps, gate=False)
    distinct = corr[np.triu_indices(len(phantom_fps), 1)]
    dups = {}
    for scale in [(0.8, 0.8, 1.0), (1.3, 1.3, 2.0), (0.6, 0.6, 0.5)]:
        sims = []
        for case, fp in zip(phantom_cases, phantom_fps):
            arr, aff = resampled_copy(*fpm.canonical_hu(case), scale)
            hu = WINDOW[0] + arr.astype(np.float32) * (WINDOW[1] - WINDOW[0]) / 255.0
            sims.append(fpm.similarity(fp, fpm.fingerprint_array(hu, aff)))
        dups[scale] = np.asarray(sims)
    print(f"\ndistinct pairs ({len(distinct)}): max {distinct.max():.3f}, p99 {np.quantile(distinct, 0.99):.3f}, "
          f"mean {distinct.mean():.3f}")
    for scale, sims in dups.items():
        print(f"8-bit copies at {scale}: min {sims.min():.4f}, mean {sims.mean():.4f}")
    assert distinct.max() <= fpm.THRESHOLD - 0.05
    assert min(s.min() for s in dups.values()) >= fpm.THRESHOLD + 0.05
    # With the gate, most distinct pairs are not even compared; none is grouped.
    gated = fpm.similarity_matrix(phantom_fps)
    assert np.allclose(np.diag(gated), 1.0, atol=1e-5)
    assert gated[np.triu_indices(len(phantom_fps), 1)].max() < fpm.THRESHOLD
    assert fpm.group_fingerprints(phantom_fps) == []


def test_field_of_view_gate():
    rng = np.random.default_rng(0)
    hu = rng.normal(-500, 300, (40, 40, 20)).astype(np.float32)
    a = fpm.fingerprint_array(hu, np.diag([1.0, 1.0, 2.0, 1.0]), "a")
    b = fpm.fingerprint_array(hu, np.diag([1.02, 1.02, 2.0, 1.0]), "b")  # 2 %: within tolerance
    c = fpm.fingerprint_array(hu, np.diag([1.0, 1.0, 2.2, 1.0]), "c")  # 10 % longer: another scan
    assert fpm.similarity(a, b) == pytest.approx(1.0, abs=1e-5)
    assert fpm.similarity(a, c) == 0.0
    assert fpm.similarity_matrix([a, b, c])[0, 2] == 0.0


def test_groups_are_transitive():
    # Unit vectors at 0, 25 and 50 degrees in the plane of two uncorrelated patterns: neighbours
    # correlate cos 25 = 0.91, the ends cos 50 = 0.64; a fourth, unrelated pattern stays alone.
    rng = np.random.default_rng(1)
    u, v, w = (rng.normal(size=fpm.GRID) for _ in range(3))
    v -= u * (u * v).sum() / (u * u).sum()
    fps = []
    for i, d in enumerate([u / u.std(), *(np.cos(t) * u / u.std() + np.sin(t) * v / v.std()
                                          for t in np.radians([25, 50])), w]):
        d = (d - d.mean()) / d.std()
        fps.append(fpm.Fingerprint(f"s/{i}", (300.0, 300.0, 300.0), d.astype(np.float32)))
    sim = fpm.similarity_matrix(fps)
    assert sim[0, 1] >= 0.85 and sim[1, 2] >= 0.85 > sim[0, 2]  # 0 ~ 1 ~ 2, but 0 !~ 2 directly
    groups = fpm.group_fingerprints(fps, threshold=0.85)
    assert [g.keys for g in groups] == [("s/0", "s/1", "s/2")]
    assert {(a, b) for a, b, _ in groups[0].pairs} == {("s/0", "s/1"), ("s/1", "s/2")}


# ----------------------------------------------------------------------------------- splits
def test_loso_holding_out_the_copy_drops_the_training_original(phantom_cases, tmp_path, capsys):
    copy = plant_copy(by_key(phantom_cases, ORIGINAL), tmp_path)
    cases = phantom_cases + [copy]
    groups = fpm.find_duplicates(cases)
    merged = merge_duplicate_patients(cases, groups)
    orig, cp = by_key(merged, ORIGINAL), by_key(merged, copy.key)
    assert orig.patient_id == cp.patient_id == f"dup:{ORIGINAL}"
    assert orig.meta["duplicate_of"] == [copy.key] and cp.meta["duplicate_of"] == [ORIGINAL]
    assert orig.meta["source_patient_id"] == "coronacases_001"
    assert orig.meta["origin"] == "coronacases"  # the source's own meta is kept
    untouched = [c for c in merged if c.key not in (ORIGINAL, copy.key)]
    assert all(c.patient_id == by_key(cases, c.key).patient_id for c in untouched)

    sources = [*SOURCES, "medseg"]
    for holdout, kept, dropped in (("medseg", copy.key, ORIGINAL), ("ctseg", ORIGINAL, copy.key)):
        for seed in range(3):
            split = loso_split(merged, sources, holdout, val_fraction=0.3, seed=seed)
            assert [c.key for c in split.dropped] == [dropped]
            assert kept in {c.key for c in split.test}
            assert dropped not in {c.key for c in split.train + split.val}
            assert_no_leakage(split)
            assert f"dropped 1 training-source case(s) that duplicate held-out test scans: {dropped}" \
                in capsys.readouterr().out
    # Without merging, the same LOSO split would train on the held-out scan: what the merge prevents.
    plain = loso_split(cases, sources, "medseg", val_fraction=0.3, seed=0)
    assert ORIGINAL in {c.key for c in plain.train + plain.val} and plain.dropped == ()


def test_duplicates_in_two_training_sources_stay_on_one_side(capsys):
    def case(src, cid, pid=None):
        return Case(src, cid, pid or cid, image=Path(f"/x/{src}/{cid}"),
                    label=Path(f"/x/{src}/{cid}_m"))

    a = [case("a", f"p{i}") for i in range(6)]
    b = [case("b", f"q{i}") for i in range(6)]
    test = [case("t", "z")]
    cases = a + b + test
    merged = merge_duplicate_patients(cases, [("a/p0", "b/q0"), ("a/p3", "b/q5")])
    for seed in range(12):
        split = transfer_split(merged, ["a", "b"], ["t"], val_fraction=0.34, seed=seed)
        role = {c.key: r for r in ("train", "val") for c in getattr(split, r)}
        assert role["a/p0"] == role["b/q0"] and role["a/p3"] == role["b/q5"]
        assert len(role) == 12 and split.dropped == ()
    # Some seeds drew the pair on different sides per source: validation took both copies.
    assert "moved 1 duplicate case(s) from train to validation" in capsys.readouterr().out


def test_merge_is_transitive_through_patients():
    def case(src, cid, pid):
        return Case(src, cid, pid, image=Path(f"/x/{src}/{cid}"))

    rp1, rp3 = case("ctseg", "rp_10_1", "rp_10"), case("ctseg", "rp_10_3", "rp_10")  # one patient, 2 series
    m1, m2, other = case("medseg", "1", "1"), case("medseg", "2", "2"), case("mosmed", "s", "s")
    merged = {c.key: c for c in merge_duplicate_patients([rp1, rp3, m1, m2, other], [("ctseg/rp_10_1", "medseg/1")])}
    assert merged["ctseg/rp_10_1"].patient_id == merged["ctseg/rp_10_3"].patient_id == merged["medseg/1"].patient_id
    assert merged["ctseg/rp_10_3"].meta["duplicate_of"] == []  # merged through its patient, not a copy
    assert merged["medseg/2"] is m2 and merged["mosmed/s"] is other
    with pytest.raises(ValueError, match="not in the case list"):
        merge_duplicate_patients([rp1], [("ctseg/rp_10_1", "medseg/9")])


def test_leakage_check_sees_duplicates_across_sources():
    p = Path("/x")
    a, b = Case("s1", "a", "p1", image=p, label=p), Case("s2", "b", "p1", image=p, label=p)
    # One patient id in two sources: two patients unless merged as duplicates.
    assert_no_leakage(Split((a,), (), (b,), ("s1",), ("s2",)))
    ma, mb = merge_duplicate_patients([a, b], [("s1/a", "s2/b")])
    with pytest.raises(LeakageError, match="duplicate patient dup:s1/a is in both train and test"):
        assert_no_leakage(Split((ma,), (), (mb,), ("s1",), ("s2",)))
    with pytest.raises(LeakageError, match="duplicate patient dup:s1/a is in both train and val"):
        assert_no_leakage(Split((ma,), (mb,), (), ("s1", "s2"), ("s3",)))
