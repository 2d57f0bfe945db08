"""Analytic chest phantom: determinism, world placement across grids, physical HU and volumes, scanner."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from datamodules.phantom.anatomy import LesionConfig, acquire, render, sample_patient

FOV = (372.0, 300.0, 330.0)   # mm: holds any sampled chest (skin <= 350 x 250 mm, lungs <= 260 mm tall)
LABELS = ("lung", "lobes", "lesion")


def ras_grid(spacing, center=(0.0, 0.0, 0.0), fov=FOV):
    """Axis-aligned RAS grid centred on `center` (dyadic numbers, so voxel centres are exact)."""
    shape = tuple(int(round(f / s)) for f, s in zip(fov, spacing, strict=True))
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = np.asarray(center) - (np.asarray(shape) - 1) / 2.0 * np.asarray(spacing)
    return shape, aff


def patient(seed, **lesions):
    return sample_patient(np.random.default_rng(seed), LesionConfig(**lesions))


@pytest.fixture(scope="module")
def scan3():
    p = patient(7, n_min=3, n_max=6)
    shape, aff = ras_grid((3.0, 3.0, 3.0))
    return p, aff, render(p, shape, aff)


def test_same_seed_same_arrays_other_seed_differs():
    shape, aff = ras_grid((6.0, 6.0, 6.0))
    a, b, c = (render(patient(s), shape, aff) for s in (11, 11, 12))
    for name in ("hu", "lesion_field", *LABELS):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.hu, c.hu)
    assert not np.array_equal(a.lung, c.lung)


@pytest.mark.parametrize("kind", ["LAS", "permuted"])
def test_reoriented_grid_samples_same_world_anatomy(kind):
    p = patient(3, n_min=4, n_max=6)
    shape, aff = ras_grid((4.0, 4.0, 5.0))
    ref = render(p, shape, aff, supersample_z=3)
    if kind == "LAS":   # voxel axis 0 mirrored, every voxel keeps its world position
        aff2 = aff.copy()
        aff2[:3, 0] *= -1
        aff2[:3, 3] = aff[:3, 3] + aff[:3, 0] * (shape[0] - 1)
        out = render(p, shape, aff2, supersample_z=3)
        back = {k: np.flip(getattr(out, k), 0) for k in ("hu", *LABELS)}
    else:               # voxel axes (z, x, y): the supersampled axis must follow world z to axis 0
        aff2 = aff.copy()
        aff2[:3, :3] = aff[:3, [2, 0, 1]]
        out = render(p, (shape[2], shape[0], shape[1]), aff2, supersample_z=3)
        back = {k: np.transpose(getattr(out, k), (1, 2, 0)) for k in ("hu", *LABELS)}
    for k in LABELS:
        np.testing.assert_array_equal(back[k], getattr(ref, k))
    np.testing.assert_allclose(back["hu"], ref.hu, atol=1e-3)
    assert (ref.lesion > 0).sum() > 50


def test_nested_grids_agree_exactly():
    """Anatomy is a function of world position: a 4 mm grid whose centres are every other 2 mm centre
    must reproduce the 2 mm arrays exactly (bounding boxes differ between the grids, the values not)."""
    p = patient(8, n_min=5, n_max=6)
    origin = (-185.0, -149.0, -165.0)
    fine, coarse = np.diag([2.0, 2.0, 2.0, 1.0]), np.diag([4.0, 4.0, 4.0, 1.0])
    fine[:3, 3] = coarse[:3, 3] = origin
    a = render(p, (186, 150, 166), fine)
    b = render(p, (93, 75, 83), coarse)
    for k in ("hu", "lesion_field", *LABELS):
        np.testing.assert_array_equal(getattr(a, k)[::2, ::2, ::2], getattr(b, k))
    assert (b.lesion > 0).sum() > 100


def test_oblique_grid_gives_same_volumes():
    p = patient(6, n_min=4, n_max=6, radius_mm=(15.0, 30.0))
    shape, aff = ras_grid((3.0, 3.0, 3.0))
    ref = render(p, shape, aff)
    cz, sz, cx, sx = np.cos(0.5), np.sin(0.5), np.cos(0.3), np.sin(0.3)
    rot = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    n = 136   # a 408 mm cube holds the rotated chest
    obl = np.eye(4)
    obl[:3, :3] = rot * 3.0
    obl[:3, 3] = -obl[:3, :3] @ np.full(3, (n - 1) / 2.0)
    r = render(p, (n, n, n), obl, supersample_z=2)
    for k, tol in (("lung", 0.02), ("lesion", 0.08)):
        v0, v1 = (getattr(ref, k) > 0).sum(), (getattr(r, k) > 0).sum()
        assert abs(v1 - v0) / v0 < tol, (k, v0, v1)
    assert set(np.unique(r.lobes)) == {0, 1, 2, 3, 4, 5}


def test_heart_carves_the_left_lung_anteriorly():
    p = patient(1)
    shape, aff = ras_grid((3.0, 3.0, 3.0))
    with_heart = render(p, shape, aff)
    without = render(dataclasses.replace(p, heart_axes=(1e-3, 1e-3, 1e-3)), shape, aff)
    ml = 27.0 / 1000.0
    carved = (without.lung > 0) & (with_heart.lung == 0)
    left = ((without.lung == 1) & carved).sum() * ml
    right = ((without.lung == 2) & carved).sum() * ml
    assert 100.0 < left < 600.0 and right < 0.2 * left
    i, j, _ = np.nonzero(carved)
    assert (aff[0, 0] * i + aff[0, 3]).mean() < -40.0 and (aff[1, 1] * j + aff[1, 3]).mean() > 0.0


def test_center_moves_the_patient_with_the_grid():
    p = patient(5)
    c = (40.0, -30.0, 512.0)
    shape, aff0 = ras_grid((6.0, 6.0, 6.0))
    _, aff1 = ras_grid((6.0, 6.0, 6.0), center=c)
    a, b = render(p, shape, aff0), render(p, shape, aff1, center=c)
    for k in LABELS:
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    # Left lung (label 1) on the subject's left, i.e. world x below the patient origin; right lung above.
    x = aff1[0, 0] * np.arange(shape[0]) + aff1[0, 3]
    for code, sign in ((1, -1), (2, 1)):
        cx = x[np.nonzero(b.lung == code)[0]].mean()
        assert sign * (cx - c[0]) > 40.0
    # The mediastinum (40-70 mm wide) keeps the lungs apart everywhere.
    gap = x[np.nonzero(b.lung == 2)[0]].min() - x[np.nonzero(b.lung == 1)[0]].max()
    assert 40.0 - 6.0 <= gap <= 70.0 + 6.0


def test_label_consistency(scan3):
    p, _, r = scan3
    lung = r.lung > 0
    assert set(np.unique(r.lung)) == {0, 1, 2}
    np.testing.assert_array_equal(r.lobes > 0, lung)
    assert set(np.unique(r.lobes[r.lung == 2])) == {1, 2, 3}
    assert set(np.unique(r.lobes[r.lung == 1])) == {4, 5}
    assert (r.lesion > 0).sum() > 0 and not (r.lesion[~lung] > 0).any()
    assert r.lesion_field.min() == 0.0 and r.lesion_field.max() <= 1.0
    assert not r.lesion_field[~lung].any()
    np.testing.assert_array_equal(r.lesion > 0, r.lesion_field > 0.5)
    # Annotation styles nest: generous (0.3) > truth (0.5) > tight (0.7).
    v = [(r.lesion_field > t).sum() for t in (0.3, 0.5, 0.7)]
    assert v[0] > v[1] > v[2] > 0


def test_lobes_nonempty_plausible_shares_and_positions():
    shape, aff = ras_grid((4.0, 4.0, 4.0))
    y, z = (aff[a, a] * np.arange(shape[a]) + aff[a, 3] for a in (1, 2))
    for seed in range(4):
        r = render(patient(seed), shape, aff)
        share = np.bincount(r.lobes.ravel(), minlength=6)[1:] / (r.lobes > 0).sum()
        assert (share > 0.04).all() and (share < 0.45).all(), share
        cy, cz = {}, {}
        for code in range(1, 6):
            _, j, k = np.nonzero(r.lobes == code)
            cy[code], cz[code] = y[j].mean(), z[k].mean()
        assert cz[1] > cz[2] + 20 and cz[4] > cz[5] + 20        # upper lobes above the middle/lower ones
        assert cy[3] < min(cy[1], cy[2]) - 10 and cy[5] < cy[4] - 10   # lower lobes posterior
        assert cy[2] > cy[1]                                   # middle lobe anterior


def test_lesion_placement_biases():
    """Peripheral bias pulls centres towards the pleura, basal bias towards the lung bases."""
    shape, aff = ras_grid((4.0, 4.0, 4.0))
    stats = {}
    for biases in ((0.0, 0.0), (4.0, 0.0), (0.0, 3.0)):
        depth, height = [], []
        for seed in (0, 1):
            p = patient(seed, n_min=40, n_max=40, peripheral_bias=biases[0], basal_bias=biases[1])
            lung = render(dataclasses.replace(p, lesions=()), shape, aff).lung > 0
            edt = ndimage.distance_transform_edt(lung, sampling=4.0)
            c = np.array([les.center for les in p.lesions])
            idx = np.round((c - aff[:3, 3]) / 4.0).astype(int)
            outside = ndimage.distance_transform_edt(~lung, sampling=4.0)[tuple(idx.T)]
            assert (outside <= 8.0).all()   # centres in the lungs, up to jitter and grid rounding
            depth.append(edt[tuple(idx.T)].mean())
            height.append((c[:, 2] / p.lung_height).mean())
        stats[biases] = np.mean(depth), np.mean(height)
    assert stats[(4.0, 0.0)][0] < 0.6 * stats[(0.0, 0.0)][0]
    assert stats[(0.0, 3.0)][1] < stats[(0.0, 0.0)][1] - 0.1


def test_ideal_hu_values(scan3):
    p, aff, r = scan3
    shape = r.hu.shape
    assert r.hu[0, 0, 0] == -1000.0 and r.hu[-1, -1, -1] == -1000.0
    no_vessels = render(dataclasses.replace(p, vessels=()), shape, aff)
    vessel_free = r.hu == no_vessels.hu
    assert (~vessel_free & (r.lung > 0)).sum() > 20        # vessels exist and are drawn in the lungs
    deep = ndimage.distance_transform_edt(r.lung > 0, sampling=3.0) > 15.0
    parenchyma = deep & vessel_free & (r.lesion_field == 0)
    assert parenchyma.sum() > 1000
    assert np.all(np.abs(r.hu[parenchyma] + 850.0) <= 50.0)
    assert np.all(r.hu[~vessel_free & (r.lung > 0)] >= 40.0)   # vessels are soft tissue (max rule)


def test_body_wall_profile_along_x():
    """A 0.25 mm line through the patient's right side at mid-lung height: air, fat, muscle, lung."""
    p = patient(9, n_min=0, n_max=0)
    n = 800
    aff = np.diag([0.25, 1.0, 1.0, 1.0])
    aff[:3, 3] = (0.125, 0.0, 0.0)
    hu = render(p, (n, 1, 1), aff).hu[:, 0, 0]
    x = 0.125 + 0.25 * np.arange(n)
    skin = x[hu > -1000].max()
    assert 150.0 <= skin <= 175.0
    fat = x[(hu >= -120) & (hu <= -80) & (x > skin - 30.0)]
    assert 10.0 <= fat.max() - fat.min() + 0.25 <= 20.0 and fat.max() == skin
    assert np.any(hu == 40.0)
    lung = x[(hu <= -790) & (hu >= -910)]
    assert 15.0 < skin - lung.max() < 45.0   # lung reaches the ribs, inside a 2-4 cm chest wall


def test_spine_and_ribs_along_z():
    """Vertebral bodies (+450..550 HU) broken by discs; ribs intermittent (~1 cm bands every ~3 cm)."""
    p = patient(10)
    sy, sr = p.spine[:2]
    ca, cb, cy = p.cavity
    aff = np.diag([1.0, 1.0, 0.5, 1.0])
    aff[:3, 3] = (0.0, sy, -100.0)
    spine = render(p, (1, 1, 401), aff).hu[0, 0]
    bone = (spine >= 450.0) & (spine <= 550.0)
    assert np.all(bone | (spine == 80.0)) and 0.65 < bone.mean() < 0.9
    aff[:3, 3] = (ca + 4.0, cy, -100.0)    # lateral chest wall, just outside the pleura
    wall = render(p, (1, 1, 401), aff).hu[0, 0]
    ribs = wall >= 400.0
    assert 0.2 < ribs.mean() < 0.55 and np.all(ribs | (wall == 40.0))
    assert 5 <= np.count_nonzero(np.diff(ribs.astype(int)) == 1) <= 9   # 6-7 ribs over 20 cm


def test_trachea_lumen_diameter():
    p = patient(4)
    x0, y0, z0 = p.airways[0][:3]
    aff = np.diag([0.25, 1.0, 1.0, 1.0])
    aff[:3, 3] = (-15.0, y0, z0 + 40.0)        # 4 cm above the carina, within the mediastinum
    r = render(p, (121, 1, 1), aff)
    hu = r.hu[:, 0, 0]
    lumen = (hu == -1000.0).sum() * 0.25
    assert 14.0 <= lumen <= 19.0
    assert not r.lung.any()
    assert np.any(hu[:60] == 40.0) and np.any(hu[61:] == 40.0)   # wall on both sides
    # Each main bronchus ends inside its lung: air there, and never labelled lung.
    for seg, code in zip(p.airways[1:], (2, 1), strict=True):
        aff = np.diag([1.0, 1.0, 1.0, 1.0])
        aff[:3, 3] = np.asarray(seg[3:6]) - 20.0
        r = render(p, (41, 41, 41), aff)
        assert r.hu[20, 20, 20] == -1000.0 and r.lung[20, 20, 20] == 0
        assert (r.lung == code).sum() > 1000 and not (r.lung[r.hu == -1000.0] > 0).any()


def test_lesion_hu_ggo_and_consolidation():
    shape, aff = ras_grid((3.0, 3.0, 3.0))
    ggo = patient(21, n_min=5, n_max=6, radius_mm=(15.0, 30.0), p_consolidation=0.0)
    r = render(dataclasses.replace(ggo, vessels=()), shape, aff)
    hu = r.hu[r.lesion == 1]
    assert hu.size > 200 and not (r.lesion == 2).any()
    assert hu.min() >= -760.0 and hu.max() <= -290.0
    cons = patient(22, n_min=5, n_max=6, radius_mm=(20.0, 30.0), p_consolidation=1.0)
    r = render(cons, shape, aff)
    core = r.hu[r.lesion == 2]
    assert core.size > 50
    assert -210.0 <= np.median(core) <= 60.0
    flat = render(dataclasses.replace(cons, vessels=()), shape, aff)
    hu = flat.hu[flat.lesion == 1]   # the GGO rim of consolidating lesions stays in the GGO range
    assert hu.min() >= -760.0 and hu.max() <= -290.0


def test_physical_volumes_agree_across_grids():
    p = patient(13, n_min=4, n_max=6, radius_mm=(20.0, 30.0))
    vols = []
    for sp in ((2.0, 2.0, 2.0), (3.0, 3.0, 5.0)):
        shape, aff = ras_grid(sp)
        r = render(p, shape, aff)
        ml = np.prod(sp) / 1000.0
        vols.append(((r.lung > 0).sum() * ml, (r.lesion > 0).sum() * ml))
    (lung_a, les_a), (lung_b, les_b) = vols
    assert 3000.0 <= lung_a <= 7000.0 and 3000.0 <= lung_b <= 7000.0
    assert abs(lung_a - lung_b) / lung_a < 0.10
    assert les_a > 20.0 and abs(les_a - les_b) / les_a < 0.15


def test_supersample_averages_subslices_labels_from_centre():
    p = patient(2)
    shape, aff = ras_grid((6.0, 6.0, 8.0))
    ss = render(p, shape, aff, supersample_z=2)
    one = render(p, shape, aff)
    subs = []
    for off in (-0.25, 0.25):
        a = aff.copy()
        a[2, 3] += off * 8.0
        subs.append(render(p, shape, a).hu)
    np.testing.assert_allclose(ss.hu, (subs[0] + subs[1]) / 2, atol=1e-3)
    assert not np.allclose(ss.hu, one.hu)
    for k in LABELS:
        np.testing.assert_array_equal(getattr(ss, k), getattr(one, k))


def test_acquire_identity_noise_floor_and_blur():
    rng = np.random.default_rng(0)
    hu = np.full((48, 48, 48), -850.0, np.float32)
    hu[0] = -1000.0
    out = acquire(hu, (1.0, 1.0, 2.0), rng, noise_hu=0.0, blur_mm=0.0, hu_offset=12.5)
    assert out.dtype == np.float32 and out is not hu
    np.testing.assert_array_equal(out, hu + np.float32(12.5))
    assert hu[1, 1, 1] == -850.0                         # input untouched
    noisy = acquire(hu, (1.0, 1.0, 2.0), rng, noise_hu=25.0, blur_mm=0.0)
    region = noisy[4:]
    assert abs(region.std() - 25.0) < 2.5 and abs(region.mean() + 850.0) < 1.0
    floor = acquire(hu, (1.0, 1.0, 2.0), rng, noise_hu=25.0, blur_mm=0.0, hu_offset=-40.0)
    assert floor.min() == -1024.0 and (floor[0] == -1024.0).mean() > 0.5
    # A point spread in mm: sigma = blur_mm along every axis whatever the spacing.
    imp = np.zeros((61, 31, 17), np.float32)
    imp[30, 15, 8] = 1000.0
    spacing = (0.5, 1.0, 2.0)
    psf = acquire(imp, spacing, rng, noise_hu=0.0, blur_mm=2.0)
    assert abs(psf.sum() - 1000.0) < 1.0
    for ax, sp in enumerate(spacing):
        prof = psf.sum(axis=tuple(a for a in range(3) if a != ax))
        pos = (np.arange(prof.size) - prof.size // 2) * sp
        assert abs(np.sqrt((prof * pos**2).sum() / prof.sum()) - 2.0) < 0.1
