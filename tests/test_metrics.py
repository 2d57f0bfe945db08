"""evaluation.metrics: closed-form boxes, equality with DeepMind's surface_distance package, empty masks.

Surfel geometry used by the hand computations (DeepMind's formulation, see the module docstring): a box of
n0 x n1 x n2 voxels has its surfels on the corner lattice points of the box [0, n0] x [0, n1] x [0, n2]
(corner j lies between voxels j-1 and j). Marching cubes cuts the box's edges and corners, so with spacing s
a surfel's area depends on where it sits:
  face interior, face normal to axis i:  F_i = prod_{j != i} s_j                     (flat square)
  edge interior, edge along axis i:      E_i = s_i * 0.5 * sqrt(sum_{j != i} s_j^2)  (45-degree strip)
  box corner:                            C   = 0.125 * sqrt(F_0^2 + F_1^2 + F_2^2)   (cut-off triangle)
and its distance is the Euclidean distance (mm) between lattice points of the two surfaces.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from evaluation import metrics as M


def _box(shape: tuple[int, ...], lo: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(a, a + n) for a, n in zip(lo, size))] = True
    return m


def _face(s, i):
    return math.prod(s[j] for j in range(3) if j != i)


def _edge(s, i):
    return s[i] * 0.5 * math.sqrt(sum(s[j] ** 2 for j in range(3) if j != i))


def _corner(s):
    return 0.125 * math.sqrt(sum(_face(s, i) ** 2 for i in range(3)))


def _box_area(n, s):
    """Surfel area of an n0 x n1 x n2 box: interior points of the 6 faces and 12 edges, plus 8 corners."""
    faces = sum(2 * math.prod(n[j] - 1 for j in range(3) if j != i) * _face(s, i) for i in range(3))
    edges = sum(4 * (n[i] - 1) * _edge(s, i) for i in range(3))
    return faces + edges + 8 * _corner(s)


# ----------------------------------------------------------------------------------------- surfel geometry


@pytest.mark.parametrize("n, spacing", [((3, 4, 5), (1.0, 1.0, 1.0)), ((6, 8, 4), (0.7, 0.7, 2.5)),
                                        ((2, 7, 3), (1.3, 0.4, 3.0))])
def test_box_surface_area(n, spacing):
    m = _box(tuple(x + 4 for x in n), (2, 2, 2), n)
    sd = M.surface_distances(m, m, spacing)
    assert sd.areas_ref.sum() == pytest.approx(_box_area(n, spacing), rel=1e-12)
    assert sd.areas_ref.size == math.prod(x + 1 for x in n) - math.prod(x - 1 for x in n)  # lattice boundary
    assert np.all(sd.distances_ref_to_pred == 0) and M.hausdorff(sd, 100) == 0 and M.nsd(sd, 0.0) == 1.0


def test_rectangle_perimeter_2d():
    # Marching squares: a straight step of one pixel along axis i has length s_i, each of the 4 cut corners
    # has length half a pixel diagonal.
    n, s = (5, 9), (0.8, 2.0)
    m = _box((9, 13), (2, 2), n)
    sd = M.surface_distances(m, m, s)
    expected = 2 * (n[0] - 1) * s[0] + 2 * (n[1] - 1) * s[1] + 4 * 0.5 * math.hypot(*s)
    assert sd.areas_ref.sum() == pytest.approx(expected, rel=1e-12)


def test_surfel_area_tables_match_package():
    # Every one of the 256 (16 in 2D) neighbourhood codes, not only those random shapes happen to produce.
    from surface_distance import lookup_tables

    rng = np.random.default_rng(7)
    for s in [(1.0, 1.0, 1.0), (0.7, 0.7, 2.5), *(tuple(rng.uniform(0.2, 5.0, 3)) for _ in range(3))]:
        np.testing.assert_array_equal(M._surfel_area_table(s),
                                      lookup_tables.create_table_neighbour_code_to_surface_area(s))
        np.testing.assert_array_equal(M._surfel_area_table(s[:2]),
                                      lookup_tables.create_table_neighbour_code_to_contour_length(s[:2]))


def test_statistics_on_handmade_distances():
    sd = M.SurfaceDistances(distances_ref_to_pred=np.array([0.0, 0.0, 1.0, 2.0]), areas_ref=np.ones(4),
                            distances_pred_to_ref=np.array([0.0, 10.0]), areas_pred=np.array([3.0, 1.0]))
    # Percentile = smallest distance within which at least p% of the area lies (no interpolation).
    assert M.hausdorff(sd, 50) == 0.0  # ref: exactly half the area at 0; pred: 3/4 at 0
    assert M.hausdorff(sd, 60) == 1.0
    assert M.hausdorff(sd, 75) == 1.0
    assert M.hausdorff(sd, 76) == 10.0  # pred: only 3/4 of its area within 0
    assert M.hausdorff(sd, 0) == 0.0 and M.hausdorff(sd, 100) == 10.0
    assert M.nsd(sd, 1.0) == pytest.approx((3 + 3) / (4 + 4))
    assert M.asd(sd) == pytest.approx((0 + 0 + 1 + 2 + 0 + 10) / (4 + 4))
    with pytest.raises(ValueError, match="sorted"):
        M.SurfaceDistances(np.array([1.0, 0.0]), np.ones(2), np.zeros(0), np.zeros(0))


# ----------------------------------------------------------------------------------------------- shifted box


@pytest.mark.parametrize("n, spacing, axis, k", [((6, 8, 4), (0.7, 0.7, 2.5), 2, 1), ((5, 6, 7), (1.0, 1.0, 3.0), 0, 2),
                                                 ((4, 9, 8), (0.7, 0.7, 2.5), 0, 3)])
def test_shifted_box(n, spacing, axis, k):
    shape = tuple(x + 2 * k + 4 for x in n)
    ref = _box(shape, (2, 2, 2), n)
    lo = [2, 2, 2]
    lo[axis] += k
    pred = _box(shape, tuple(lo), n)
    b, c = (j for j in range(3) if j != axis)
    s = spacing

    # overlap = (n_a - k) slabs of n_b*n_c voxels
    assert M.dice(pred, ref) == pytest.approx((n[axis] - k) / n[axis])
    assert M.iou(pred, ref) == pytest.approx((n[axis] - k) / (n[axis] + k))

    sd = M.surface_distances(pred, ref, spacing)
    # Ref's trailing face (the one the shift moves away from) is k*s_a from pred's trailing face and at least
    # that from pred's side faces; every other ref surfel is closer (side faces: (k - i_a)*s_a, leading face:
    # min(k*s_a, distances within the face plane)). By symmetry the same holds for pred. So the Hausdorff
    # distance is the shift in mm, and a tolerance of one shift covers both surfaces completely.
    shift_mm = k * s[axis]
    assert M.hausdorff(sd, 100) == pytest.approx(shift_mm)
    assert M.nsd(sd, shift_mm) == 1.0
    assert M.nsd(sd, shift_mm * (1 - 1e-9)) < 1.0
    # HD95 is also the shift: the trailing face alone (all at distance k*s_a) is more than 5% of the surface.
    trailing = (n[b] - 1) * (n[c] - 1) * _face(s, axis) + 2 * (n[b] - 1) * _edge(s, b) + 2 * (n[c] - 1) * _edge(s, c)
    assert trailing / _box_area(n, s) > 0.05
    assert M.hausdorff(sd, 95) == pytest.approx(shift_mm)

    # Distance 0 only where the two surfaces coincide: side-face lattice points with i_a in [k, n_a - 1]
    # (face interiors and the 4 edges along the shift axis) and the rim of the leading face (its 4 edges and
    # 4 corners). Every other distance is at least one voxel step, min(spacing). Same area on both sides.
    on_both = (2 * (n[axis] - k) * (n[c] - 1) * _face(s, b) + 2 * (n[axis] - k) * (n[b] - 1) * _face(s, c)
               + 4 * (n[axis] - k) * _edge(s, axis) + 2 * (n[b] - 1) * _edge(s, b) + 2 * (n[c] - 1) * _edge(s, c)
               + 4 * _corner(s))
    assert M.nsd(sd, 0.99 * min(s)) == pytest.approx(on_both / _box_area(n, s), rel=1e-12)
    assert M.nsd(sd, 0.0) == pytest.approx(on_both / _box_area(n, s), rel=1e-12)


# ----------------------------------------------------------------------------------------------- dilated box


def _dilated_box_groups(n, s):
    """(count, area, distance) per surfel type, for box n (ref) and the box grown by one voxel (pred).

    Requires 2*min(s) >= max(s): then the nearest outer face from an inner surfel is the parallel one, one
    voxel out (any other outer face is at least 2 voxels away along its own axis).
    """
    assert 2 * min(s) >= max(s)
    inner, outer = [], []
    for i in range(3):
        j, k = (a for a in range(3) if a != i)
        inner.append((2 * (n[j] - 1) * (n[k] - 1), _face(s, i), s[i]))
        inner.append((4 * (n[i] - 1), _edge(s, i), min(s[j], s[k])))  # both adjacent outer faces one step out
        # Outer surfels lie outside the inner box: distance to the box through the axes where they stick out.
        outer.append((2 * (n[j] + 1) * (n[k] + 1), _face(s, i), s[i]))
        outer.append((4 * (n[i] + 1), _edge(s, i), math.hypot(s[j], s[k])))
    inner.append((8, _corner(s), min(s)))
    outer.append((8, _corner(s), math.sqrt(sum(x * x for x in s))))
    return inner, outer


def _directed_percentile(groups, p):
    groups = sorted(groups, key=lambda g: g[2])
    total = sum(c * a for c, a, _ in groups)
    cum = 0.0
    for c, a, d in groups:
        cum += c * a
        if cum / total >= p / 100 - 1e-12:
            return d
    return groups[-1][2]


@pytest.mark.parametrize("n, spacing", [((4, 5, 6), (0.8, 1.0, 1.5)), ((7, 3, 5), (1.0, 0.6, 1.2)),
                                        ((5, 5, 5), (1.0, 1.0, 1.0))])
def test_dilated_box(n, spacing):
    shape = tuple(x + 6 for x in n)
    ref = _box(shape, (3, 3, 3), n)
    pred = ndimage.binary_dilation(ref, np.ones((3, 3, 3), bool))  # grown by one voxel on every side
    assert pred.sum() == math.prod(x + 2 for x in n)
    inner, outer = _dilated_box_groups(n, spacing)
    s = spacing

    scores = M.score_pair(pred, ref, spacing, tolerance_mm=min(s))
    n_ref, n_pred = math.prod(n), math.prod(x + 2 for x in n)
    assert scores["dice"] == pytest.approx(2 * n_ref / (n_ref + n_pred))
    assert scores["iou"] == pytest.approx(n_ref / n_pred)
    assert scores["rv"] == pytest.approx(n_pred / n_ref)

    groups = inner + outer
    area = sum(c * a for c, a, _ in groups)
    assert scores["asd"] == pytest.approx(sum(c * a * d for c, a, d in groups) / area, rel=1e-12)

    sd = M.surface_distances(pred, ref, spacing)
    assert sd.areas_ref.sum() == pytest.approx(_box_area(n, s))
    assert sd.areas_pred.sum() == pytest.approx(_box_area(tuple(x + 2 for x in n), s))
    assert M.hausdorff(sd, 100) == pytest.approx(math.sqrt(sum(x * x for x in s)))  # outer box corners
    for p in (50, 90, 95):
        expected = max(_directed_percentile(inner, p), _directed_percentile(outer, p))
        assert M.hausdorff(sd, p) == pytest.approx(expected), p
    assert scores["hd95"] == M.hausdorff(sd, 95)

    # NSD just below / above each distinct distance (each spacing, and the diagonals of the outer surfels).
    assert M.nsd(sd, min(s) * (1 - 1e-6)) == 0.0  # no surfel is closer than one voxel step
    for d in sorted({g[2] for g in groups}):
        for tol in (d * (1 - 1e-6), d * (1 + 1e-6)):
            expected = sum(c * a for c, a, dist in groups if dist <= tol) / area
            assert M.nsd(sd, tol) == pytest.approx(expected, rel=1e-12), tol
    assert M.nsd(sd, math.sqrt(sum(x * x for x in s))) == 1.0
    assert scores["nsd"] == M.nsd(sd, min(s))


# ------------------------------------------------------------------------------------ DeepMind's package


def _blob(rng: np.random.Generator, shape, sigma, frac) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    return field > np.quantile(field, 1 - frac)


def _random_case(seed: int):
    rng = np.random.default_rng(seed)
    ndim = 2 if seed % 3 == 0 else 3
    shape = tuple(int(x) for x in rng.integers(12, 40 if ndim == 2 else 24, ndim))
    spacing = tuple(float(x) for x in rng.uniform(0.4, 3.0, ndim))
    ref = _blob(rng, shape, 1.5, rng.uniform(0.1, 0.4))
    # A related but different prediction: the reference field plus independent smooth noise.
    noise = _blob(rng, shape, 1.5, 0.5)
    pred = ndimage.binary_dilation(ref, iterations=int(rng.integers(0, 2))) ^ (noise & (rng.random(shape) < 0.3))
    if seed % 5 == 0:  # an unrelated blob: large distances, partial overlap
        pred = _blob(rng, shape, 2.0, 0.2)
    return pred, ref, spacing


@pytest.mark.parametrize("seed", range(30))
def test_equals_deepmind_surface_distance(seed):
    import surface_distance as dm

    pred, ref, spacing = _random_case(seed)
    assert pred.any() and ref.any()
    with warnings.catch_warnings():  # the package uses scipy.ndimage.filters, deprecated in scipy
        warnings.simplefilter("ignore", DeprecationWarning)
        d = dm.compute_surface_distances(ref, pred, spacing)  # (gt, pred) argument order
    sd = M.surface_distances(pred, ref, spacing)

    # The package returns both directions sorted by (distance, area), as we do.
    for ours, theirs in [(sd.distances_ref_to_pred, "distances_gt_to_pred"), (sd.areas_ref, "surfel_areas_gt"),
                         (sd.distances_pred_to_ref, "distances_pred_to_gt"), (sd.areas_pred, "surfel_areas_pred")]:
        np.testing.assert_allclose(ours, d[theirs], rtol=0, atol=1e-6)

    for tol in (1.0, 3.0):
        assert M.nsd(sd, tol) == pytest.approx(dm.compute_surface_dice_at_tolerance(d, tol), abs=1e-6)
    for p in (95, 100):
        assert M.hausdorff(sd, p) == pytest.approx(dm.compute_robust_hausdorff(d, p), abs=1e-6)
    avg_ref_to_pred, avg_pred_to_ref = dm.compute_average_surface_distance(d)
    a_ref, a_pred = d["surfel_areas_gt"].sum(), d["surfel_areas_pred"].sum()
    assert M.asd(sd) == pytest.approx((avg_ref_to_pred * a_ref + avg_pred_to_ref * a_pred) / (a_ref + a_pred),
                                      abs=1e-6)

    scores = M.score_pair(pred.astype(np.uint8) * 3, ref.astype(np.int64), spacing, tolerance_mm=3.0)
    assert scores["nsd"] == pytest.approx(M.nsd(sd, 3.0), abs=1e-12)
    assert scores["hd95"] == M.hausdorff(sd, 95) and scores["asd"] == pytest.approx(M.asd(sd), abs=1e-12)
    assert scores["dice"] == pytest.approx(dm.compute_dice_coefficient(ref, pred))


def test_result_does_not_depend_on_padding():
    # Masks touching the array border vs the same masks inside a larger zero volume: the crop must see the same.
    pred, ref, spacing = _random_case(4)
    big = tuple(n + 7 for n in ref.shape)
    at = tuple(slice(3, 3 + n) for n in ref.shape)
    pred_big, ref_big = np.zeros(big, bool), np.zeros(big, bool)
    pred_big[at], ref_big[at] = pred, ref
    assert M.score_pair(pred_big, ref_big, spacing, 2.0) == M.score_pair(pred, ref, spacing, 2.0)


# -------------------------------------------------------------------------------------------- empty masks


@pytest.mark.parametrize("shape, spacing", [((6, 7, 5), (0.7, 0.7, 2.5)), ((9, 8), (0.5, 1.5))])
def test_empty_masks(shape, spacing):
    empty = np.zeros(shape, bool)
    blob = np.zeros(shape, bool)
    blob[(slice(2, 5),) * len(shape)] = True
    voxel_ml = math.prod(spacing) / 1000

    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing)))

    both = M.score_pair(empty, empty, spacing, tolerance_mm=1.0)
    assert both == {"dice": 1.0, "iou": 1.0, "nsd": 1.0, "hd95": 0.0, "asd": 0.0, "rv": 1.0, "ref_ml": 0.0,
                    "pred_ml": 0.0, "surface_worst_case": False}
    sd = M.surface_distances(empty, empty, spacing)
    assert sd.areas_ref.size == sd.areas_pred.size == sd.distances_ref_to_pred.size == 0

    ref_empty = M.score_pair(blob, empty, spacing, tolerance_mm=1.0)
    assert (ref_empty["dice"], ref_empty["iou"], ref_empty["nsd"]) == (0.0, 0.0, 0.0)
    assert ref_empty["hd95"] == ref_empty["asd"] == pytest.approx(diagonal) and ref_empty["surface_worst_case"]
    assert math.isnan(ref_empty["rv"])
    assert ref_empty["ref_ml"] == 0.0 and ref_empty["pred_ml"] == pytest.approx(blob.sum() * voxel_ml)

    pred_empty = M.score_pair(empty, blob, spacing, tolerance_mm=1.0)
    assert (pred_empty["dice"], pred_empty["iou"], pred_empty["nsd"], pred_empty["rv"]) == (0.0, 0.0, 0.0, 0.0)
    assert pred_empty["hd95"] == pred_empty["asd"] == pytest.approx(diagonal) and pred_empty["surface_worst_case"]

    # The non-empty side keeps its surfels, at distance inf from the missing surface; the pure functions
    # on them say undefined (NaN), score_pair replaces that by the worst case above.
    sd = M.surface_distances(empty, blob, spacing)
    assert sd.areas_pred.size == 0 and sd.areas_ref.size > 0 and np.all(np.isinf(sd.distances_ref_to_pred))
    assert M.nsd(sd, 1e9) == 0.0 and math.isnan(M.hausdorff(sd, 100))


def test_a_total_miss_scores_the_diagonal_of_the_full_grid_in_mm():
    """10 x 20 x 5 voxels of 1 x 0.5 x 2 mm span 10 x 10 x 10 mm: diagonal sqrt(300) mm, whatever the
    (here tiny, corner) bounding box the masks are cropped to."""
    ref = np.zeros((10, 20, 5), bool)
    ref[0, 0, 0] = True
    scores = M.score_pair(np.zeros_like(ref), ref, (1.0, 0.5, 2.0), tolerance_mm=1.0)
    assert scores["hd95"] == scores["asd"] == pytest.approx(math.sqrt(10**2 + 10**2 + 10**2))
    assert scores["surface_worst_case"] and scores["dice"] == 0.0
    assert M.grid_diagonal_mm((10, 20, 5), (1.0, 0.5, 2.0)) == pytest.approx(math.sqrt(300))
    hit = M.score_pair(ref, ref, (1.0, 0.5, 2.0), tolerance_mm=1.0)
    assert hit["hd95"] == 0.0 and not hit["surface_worst_case"]


# ------------------------------------------------------------------------------------- overlap and volume


def test_overlap_metrics_on_label_maps():
    ref = np.array([[0, 1, 1, 2],
                    [0, 2, 2, 2],
                    [0, 0, 3, 3]])
    pred = np.array([[1, 1, 0, 0],
                     [0, 2, 2, 1],
                     [0, 0, 0, 3]])
    # foreground = nonzero: ref 8 voxels, pred 6, overlap 5 (r0c1, r1c1, r1c2, r1c3, r2c3), union 9
    assert M.dice(pred, ref) == pytest.approx(2 * 5 / (6 + 8))
    assert M.iou(pred, ref) == pytest.approx(5 / 9)
    assert M.relative_volume(pred, ref) == pytest.approx(6 / 8)
    assert M.relative_volume(ref, pred) == pytest.approx(8 / 6)
    assert M.volume_ml(ref, (2.0, 5.0)) == pytest.approx(8 * 10 / 1000)
    # Opacity = labels {1, 2} merged (e.g. GGO and consolidation), label 3 left out: ref 6 voxels, pred 5,
    # overlap 4 (r0c1, r1c1, r1c2, r1c3: r1c3 counts although pred says 1 and ref says 2), union 7.
    assert M.opacity_iou(pred, ref, (1, 2)) == pytest.approx(4 / 7)
    # Label 2 alone: ref 4, pred 2, both inside ref -> 2 / 4
    assert M.opacity_iou(pred, ref, [2]) == pytest.approx(2 / 4)
    assert M.opacity_iou(pred, ref, [7]) == 1.0  # absent from both
    assert M.relative_volume(np.zeros_like(ref), np.zeros_like(ref)) == 1.0
    assert math.isnan(M.relative_volume(ref, np.zeros_like(ref)))
    assert M.relative_volume(np.zeros_like(ref), ref) == 0.0
    assert M.dice(np.zeros_like(ref), np.zeros_like(ref)) == 1.0 and M.iou(ref * 0, ref * 0) == 1.0


def test_score_pair_keys():
    pred, ref, spacing = _random_case(1)
    assert tuple(M.score_pair(pred, ref, spacing, 1.0)) == (*M.METRIC_NAMES, "surface_worst_case")
    scores = M.score_pair(pred, ref, spacing, 1.0, percentile=99.5)
    assert "hd99.5" in scores and "hd95" not in scores
    flag = scores.pop("surface_worst_case")
    assert flag is False and all(isinstance(v, float) for v in scores.values())
    assert scores["ref_ml"] == pytest.approx(M.volume_ml(ref, spacing))
    assert scores["pred_ml"] == pytest.approx(M.volume_ml(pred, spacing))


# ------------------------------------------------------------------------------------------------- errors


def test_errors():
    a, b = np.zeros((4, 5, 6), bool), np.zeros((4, 5, 7), bool)
    with pytest.raises(ValueError, match="shape"):
        M.dice(a, b)
    with pytest.raises(ValueError, match="shape"):
        M.score_pair(a, b, (1, 1, 1), 1.0)
    with pytest.raises(ValueError, match="spacing"):
        M.surface_distances(a, a, (1.0, 1.0))
    for bad in [(1.0, 0.0, 1.0), (1.0, -2.0, 1.0), (1.0, float("nan"), 1.0)]:
        with pytest.raises(ValueError, match="spacing"):
            M.score_pair(a, a, bad, 1.0)
    with pytest.raises(ValueError, match="spacing"):
        M.volume_ml(a, (1.0, 1.0))
    with pytest.raises(ValueError, match="2D or 3D"):
        M.surface_distances(np.zeros(5, bool), np.zeros(5, bool), (1.0,))
    with pytest.raises(ValueError, match="2D or 3D"):
        M.dice(np.zeros((2, 2, 2, 2)), np.zeros((2, 2, 2, 2)))
    sd = M.surface_distances(a, a, (1, 1, 1))
    with pytest.raises(ValueError, match="tolerance"):
        M.nsd(sd, -1.0)
    with pytest.raises(ValueError, match="percentile"):
        M.hausdorff(sd, 101)
    with pytest.raises(ValueError, match="label"):
        M.opacity_iou(a, a, [])
