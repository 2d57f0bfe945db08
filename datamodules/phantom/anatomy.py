"""Analytic synthetic chest CT: one seeded adult patient that any voxel grid can sample.

The patient is defined in physical space (mm, nibabel RAS+: +x towards the subject's right, +y anterior,
+z superior; the RIGHT lung lies at x > 0), relative to its origin on the thorax midline at mid-lung
height. `render` evaluates it at the voxel centres of any (shape, affine) grid, so scanners with other
matrices, spacings or orientations sample the same anatomy. Label-deciding geometry uses only
+ - * / sqrt and comparisons (correctly rounded in IEEE), so voxel centres that coincide exactly (a grid
and its mirrored twin, nested grids) get bit-identical labels. `acquire` adds the scanner: blur,
calibration offset, noise.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

AIR_HU, SOFT_HU, CSF_HU, DISC_HU = -1000.0, 40.0, 15.0, 80.0
FAR = 5000.0  # mm: "unbounded" extent of the spine and trachea along z


@dataclass(frozen=True)
class LesionConfig:
    n_min: int = 1            # number of lesions per patient (inclusive range)
    n_max: int = 6
    radius_mm: tuple[float, float] = (8.0, 30.0)   # blob radius range
    p_consolidation: float = 0.3   # chance a lesion has a consolidation core
    ggo_hu: tuple[float, float] = (-750.0, -300.0)
    consolidation_hu: tuple[float, float] = (-200.0, 50.0)
    peripheral_bias: float = 2.0   # >0: centres prefer the pleural periphery
    basal_bias: float = 1.5        # >0: centres prefer the lung bases (low z)


@dataclass(frozen=True)
class Lesion:
    center: tuple[float, float, float]
    radius: float                          # mm, size of the main blob
    edge_mm: float                         # half-width of the 0 -> 1 membership transition
    ggo_hu: float
    consolidation_hu: float | None         # None: pure ground glass
    blobs: tuple[tuple[float, ...], ...]   # per blob: offset (3), M row-major (9, maps to unit sphere), radius
    extent_mm: float                       # half-size of a box holding all nonzero membership


@dataclass(frozen=True)
class Patient:
    body_axes: tuple[float, float]         # skin ellipse semi-axes (L-R, A-P)
    fat_mm: float
    fat_hu: float
    cavity: tuple[float, float, float]     # thoracic cavity ellipse: semi-axis x, semi-axis y, centre y
    bone_hu: float
    ribs: tuple[float, float, float, float, float]  # pitch, width, thickness, slope dz/dy, phase
    spine: tuple[float, float, float, float]   # vertebral body centre y, radius, canal radius, HU
    lung_height: float
    lung_center: tuple[float, float]       # |x| and y of each lung's axis
    lung_axes: tuple[float, float]         # base semi-axes of each lung's own ellipse
    mediastinum_mm: float
    dome_mm: tuple[float, float]           # diaphragm dome height (left, right)
    lung_hu: float
    lung_gradient_hu: float                # dependent (posterior) lung is denser by up to this much
    heart_center: tuple[float, float, float]
    heart_axes: tuple[float, float, float]
    heart_angle: float                     # rad about z; negative: long axis runs to the left-anterior apex
    fissures: tuple[tuple[float, float], tuple[float, float]]  # oblique (left, right): z = z0 - k * y
    horizontal_fissure_z: float
    airway_wall_mm: float
    airways: tuple[tuple[float, ...], ...]  # (x0, y0, z0, x1, y1, z1, lumen radius): trachea, bronchi
    vessels: tuple[tuple[float, ...], ...]  # (x0, y0, z0, x1, y1, z1, r0, r1)
    lesions: tuple[Lesion, ...]


@dataclass
class Rendered:
    hu: np.ndarray            # float32, ideal (noise-free, unblurred) HU
    lung: np.ndarray          # uint8: 0 none, 1 LEFT lung, 2 RIGHT lung
    lobes: np.ndarray         # uint8: 0 none, 1 RUL, 2 RML, 3 RLL, 4 LUL, 5 LLL
    lesion: np.ndarray        # uint8: 0 none, 1 ground-glass, 2 consolidation (truth at field > 0.5)
    lesion_field: np.ndarray  # float32 in [0, 1], 0 outside the lungs


class _Grid:
    """Voxel-centre coordinates of a grid in patient-local mm (world minus the patient's origin)."""

    def __init__(self, shape, affine, center, shift: float = 0.0, axis: int = 2):
        aff = np.asarray(affine, dtype=np.float64)
        m = aff[:3, :3]
        t = aff[:3, 3] - np.asarray(center, dtype=np.float64) + shift * m[:, axis]
        ijk = [np.arange(n, dtype=np.float64) for n in shape]
        self.shape = tuple(int(n) for n in shape)
        self.x, self.y, self.z = (
            ((m[r, 0] * ijk[0])[:, None, None] + (m[r, 1] * ijk[1])[None, :, None]
             + (m[r, 2] * ijk[2] + t[r])[None, None, :]).astype(np.float32) for r in range(3))
        self._inv, self._t = np.linalg.inv(m), t

    def box(self, lo, hi):
        """Slices covering every voxel whose centre lies in the local box [lo, hi] (None if none)."""
        corners = np.array(np.meshgrid(*zip(lo, hi, strict=True), indexing="ij")).reshape(3, -1)
        ijk = self._inv @ (corners - self._t[:, None])
        first = np.maximum(np.floor(ijk.min(axis=1)).astype(int), 0)
        last = np.minimum(np.ceil(ijk.max(axis=1)).astype(int) + 1, self.shape)
        if np.any(last <= first):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(first, last, strict=True))

    def seg_box(self, seg, r):
        p0, p1 = np.asarray(seg[:3]), np.asarray(seg[3:6])
        return self.box(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r)

    def at(self, sl):
        return self.x[sl], self.y[sl], self.z[sl]


def _smoothstep(s):
    s = np.clip(s, 0.0, 1.0)
    return s * s * (3.0 - 2.0 * s)


def _segment(x, y, z, seg):
    """Squared distance to segment p0-p1 and the clamped position t in [0, 1] along it."""
    x0, y0, z0, x1, y1, z1 = seg[:6]
    dx, dy, dz = x1 - x0, y1 - y0, z1 - z0
    px, py, pz = x - x0, y - y0, z - z0
    t = np.clip((px * dx + py * dy + pz * dz) * (1.0 / max(dx * dx + dy * dy + dz * dz, 1e-9)), 0.0, 1.0)
    ex, ey, ez = px - t * dx, py - t * dy, pz - t * dz
    return ex * ex + ey * ey + ez * ez, t


def _heart(p: Patient, x, y, z):
    (hx, hy, hz), (ha, hb, hc) = p.heart_center, p.heart_axes
    c, s = float(np.cos(p.heart_angle)), float(np.sin(p.heart_angle))
    dx, dy = x - hx, y - hy
    u = (c * dx + s * dy) * (1.0 / ha)
    v = (c * dy - s * dx) * (1.0 / hb)
    w = (z - hz) * (1.0 / hc)
    return u * u + v * v + w * w <= 1.0


def _near_spine(p: Patient, x, y):
    sy, sr = p.spine[:2]
    return x * x + (y - sy) * (y - sy) < (sr + 4.0) ** 2


def _lung_points(p: Patient, x, y, z):
    """Lung side per point (1 left, 2 right), airway aside."""
    ca, cb, cy = p.cavity
    xc, yc = p.lung_center
    a, b = p.lung_axes
    zb = -0.5 * p.lung_height
    t = (z - zb) * (1.0 / p.lung_height)
    t2 = t * t
    f2 = 1.0 - t2 * t2              # cross-section shrinks towards a rounded apex, widest at the base
    v = (y - yc) * (1.0 / b)
    v2 = v * v
    w = (y - cy) * (1.0 / cb)
    u = x * (1.0 / ca)
    inside = u * u + w * w <= 1.0    # lungs end at the ribs
    out = np.zeros(np.shape(x), np.uint8)
    for code, sign, dome in ((2, 1.0, p.dome_mm[1]), (1, -1.0, p.dome_mm[0])):
        xs = sign * x
        u = (xs - xc) * (1.0 / a)
        r2 = u * u + v2
        # Diaphragm: a dome under each lung, lowest at the costophrenic recesses (r2 -> 1).
        side = inside & (xs > 0.5 * p.mediastinum_mm) & (r2 <= f2) & (z > zb + dome * np.maximum(1.0 - r2, 0.0))
        out[side] = code
    out[_heart(p, x, y, z) | _near_spine(p, x, y)] = 0
    return out


def _lung_box(p: Patient):
    ca, cb, cy = p.cavity
    h = 0.5 * p.lung_height
    return (-ca, cy - cb, -h), (ca, cy + cb, h)


def _lungs(p: Patient, g: _Grid):
    """Lung labels on a grid and the airway masks (wall + lumen, lumen)."""
    outer, lumen, lung = np.zeros(g.shape, bool), np.zeros(g.shape, bool), np.zeros(g.shape, np.uint8)
    for seg in p.airways:
        r, ro = seg[6], seg[6] + p.airway_wall_mm
        sl = g.seg_box(seg, ro)
        if sl is not None:
            d2, _ = _segment(*g.at(sl), seg)
            outer[sl] |= d2 <= ro * ro
            lumen[sl] |= d2 <= r * r
    sl = g.box(*_lung_box(p))
    if sl is not None:
        lung[sl] = _lung_points(p, *g.at(sl))
    lung[outer] = 0   # airway lumen and wall are not lung parenchyma
    return lung, outer, lumen


def _lesion_field(les: Lesion, x, y, z):
    """Smooth membership: blobs unioned on a pseudo signed distance (mm), 0.5 at the truth boundary."""
    k = 0.3 * les.radius   # smooth-union width: blobs fuse into one irregular lesion
    dx, dy, dz = x - les.center[0], y - les.center[1], z - les.center[2]
    delta = None
    for blob in les.blobs:
        px, py, pz = dx - blob[0], dy - blob[1], dz - blob[2]
        m = blob[3:12]
        u = m[0] * px + m[1] * py + m[2] * pz
        v = m[3] * px + m[4] * py + m[5] * pz
        w = m[6] * px + m[7] * py + m[8] * pz
        d = (1.0 - np.sqrt(u * u + v * v + w * w)) * blob[12]
        if delta is None:
            delta = d
        else:
            h = np.maximum(k - np.abs(delta - d), 0.0) * (1.0 / k)
            delta = np.maximum(delta, d) + h * h * (0.25 * k)
    return _smoothstep(0.5 + delta * (0.5 / les.edge_mm))


def _paint_skeleton(p: Patient, g: _Grid, hu: np.ndarray):
    ca, cb, cy = p.cavity
    pitch, width, thick, slope, phase = p.ribs
    x, y, z = g.x, g.y, g.z
    xx, yy = x * x, (y - cy) * (y - cy)
    shell = (xx * (1.0 / (ca + 1.0) ** 2) + yy * (1.0 / (cb + 1.0) ** 2) > 1.0) & (
        xx * (1.0 / (ca + 1.0 + thick) ** 2) + yy * (1.0 / (cb + 1.0 + thick) ** 2) <= 1.0)
    idx = np.flatnonzero(shell)   # ribs live in a thin shell: evaluate the rest there only
    xs, ys, zs = x.ravel()[idx], y.ravel()[idx], z.ravel()[idx]
    zb, top = -0.5 * p.lung_height, 0.5 * p.lung_height
    ph = (zs + slope * ys) * (1.0 / pitch) + phase   # ribs descend anteriorly
    band = np.abs(ph - np.floor(ph) - 0.5) < 0.5 * width / pitch
    mid = np.abs(xs) < 14.0
    ribs = band & (zs > zb - 40.0) & (zs < top + 10.0) & ~mid & ~((np.abs(xs) < p.spine[1] + 12.0) & (ys < cy))
    sternum = mid & (ys > cy) & (zs > zb + 0.2 * p.lung_height) & (zs < top - 10.0)
    flat = hu.reshape(-1)
    flat[idx[ribs]] = p.bone_hu
    flat[idx[sternum]] = 0.7 * p.bone_hu

    sy, sr, cr, vhu = p.spine
    canal_y = sy - sr - cr - 2.0
    sl = g.box((-sr - 1, canal_y - cr - 25, -FAR), (sr + 1, sy + sr + 1, FAR))
    if sl is None:
        return
    x, y, z = g.at(sl)
    a, b = p.body_axes[0] - p.fat_mm, p.body_axes[1] - p.fat_mm
    muscle = x * x * (1.0 / a ** 2) + y * y * (1.0 / b ** 2) <= 1.0
    vb = x * x + (y - sy) * (y - sy) <= sr * sr
    dc = x * x + (y - canal_y) * (y - canal_y)
    canal = dc <= cr * cr
    arch = (dc <= (cr + 5.0) ** 2) | ((np.abs(x) < 4.0) & (y < canal_y) & (y > canal_y - cr - 22.0))
    ph = z * (1.0 / 28.0)
    disc = vb & (ph - np.floor(ph) < 6.0 / 28.0)   # 6 mm discs every 28 mm
    h = hu[sl]
    np.copyto(h, vhu, where=(vb | arch) & muscle)
    np.copyto(h, DISC_HU, where=disc)
    np.copyto(h, CSF_HU, where=canal)


def _paint(p: Patient, g: _Grid):
    x, y = g.x, g.y
    hu = np.full(g.shape, AIR_HU, np.float32)
    a, b = p.body_axes
    fa, fb = a - p.fat_mm, b - p.fat_mm
    xx, yy = x * x, y * y
    np.copyto(hu, p.fat_hu, where=xx * (1.0 / a ** 2) + yy * (1.0 / b ** 2) <= 1.0)
    np.copyto(hu, SOFT_HU, where=xx * (1.0 / fa ** 2) + yy * (1.0 / fb ** 2) <= 1.0)
    del xx, yy
    _paint_skeleton(p, g, hu)
    lung, outer, lumen = _lungs(p, g)
    hu[outer] = SOFT_HU
    hu[lumen] = AIR_HU
    inlung = lung > 0

    # Lesions: per voxel the lesion with the largest membership decides the target HU.
    field = np.zeros(g.shape, np.float32)
    target = np.zeros(g.shape, np.float32)
    core = np.zeros(g.shape, bool)
    for les in p.lesions:
        c = np.asarray(les.center)
        sl = g.box(c - les.extent_mm, c + les.extent_mm)
        if sl is None:
            continue
        m = _lesion_field(les, *g.at(sl))
        win = m > field[sl]
        np.copyto(field[sl], m, where=win)
        if les.consolidation_hu is None:
            np.copyto(target[sl], les.ggo_hu, where=win)
            continue
        # The consolidation ramp starts at the core's label boundary (0.8) so label-1 voxels stay GGO.
        t = les.ggo_hu + _smoothstep((m - 0.8) * 10.0) * (les.consolidation_hu - les.ggo_hu)
        np.copyto(target[sl], t, where=win)
        np.copyto(core[sl], m > 0.8, where=win)
    field[~inlung] = 0.0
    lesion = (field > 0.5).astype(np.uint8)
    lesion[core & (field > 0.8)] = 2

    lobes = np.zeros(g.shape, np.uint8)
    sl = g.box(*_lung_box(p))
    if sl is not None:
        _, ys, zs = g.at(sl)
        lab, ins = lung[sl], inlung[sl]
        ca, cb, cy = p.cavity
        hl = p.lung_hu + p.lung_gradient_hu * (cy - ys) * (1.0 / cb)
        # Intensity is fully lesional at the truth boundary; the halo (field 0.1-0.5) is what generous
        # annotators (threshold 0.3) include and tight ones (0.7) cut.
        bw = _smoothstep((field[sl] - 0.1) * 2.5)
        np.copyto(hu[sl], hl + bw * (target[sl] - hl), where=ins)
        (zl, kl), (zr, kr) = p.fissures   # lower lobes lie below (posterior-inferior to) the oblique fissures
        right = np.where(zs < zr - kr * ys, 3, np.where(zs >= p.horizontal_fissure_z, 1, 2))
        lobes[sl] = np.select([lab == 2, lab == 1], [right, np.where(zs < zl - kl * ys, 5, 4)], 0)

    for seg in p.vessels:   # vessels stay visible through ground glass: max rule
        r0, r1 = seg[6], seg[7]
        sl = g.seg_box(seg, max(r0, r1))
        if sl is None:
            continue
        d2, t = _segment(*g.at(sl), seg)
        r = r0 + (r1 - r0) * t
        h = hu[sl]
        np.maximum(h, SOFT_HU, out=h, where=(d2 <= r * r) & inlung[sl])
    return hu, lung, lobes, lesion, field


def render(patient: Patient, shape: tuple[int, int, int], affine: np.ndarray,
           center: tuple[float, float, float] = (0.0, 0.0, 0.0), supersample_z: int = 1) -> Rendered:
    """Sample the patient (origin placed at world `center`) at the voxel centres of (shape, affine).

    supersample_z > 1 averages that many sub-samples across each voxel's extent along the voxel axis
    closest to world z (partial volume of thick slices) for `hu`; labels use the voxel centre.
    """
    aff = np.asarray(affine, dtype=np.float64)
    m = aff[:3, :3]
    axis = int(np.argmax(np.abs(m[2]) / np.linalg.norm(m, axis=0)))
    n = max(1, int(supersample_z))
    offsets = [(s + 0.5) / n - 0.5 for s in range(n)]
    acc, labels = None, None
    for off in offsets:
        hu, *lab = _paint(patient, _Grid(shape, aff, center, off, axis))
        acc = hu if acc is None else acc + hu
        if off == 0.0:
            labels = lab
    if labels is None:   # even n: no sub-sample sits at the centre
        labels = _paint(patient, _Grid(shape, aff, center))[1:]
    hu = acc if n == 1 else (acc * np.float32(1.0 / n)).astype(np.float32)
    return Rendered(hu, *labels)


def acquire(hu: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator,
            noise_hu: float, blur_mm: float, hu_offset: float = 0.0) -> np.ndarray:
    """Scanner model: Gaussian blur of sigma blur_mm (per axis via spacing), + hu_offset, + white
    Gaussian noise of std noise_hu; float32, floored at -1024 (no rounding)."""
    out = np.array(hu, dtype=np.float32, copy=True)
    if blur_mm > 0:
        out = ndimage.gaussian_filter(out, sigma=[blur_mm / s for s in spacing], mode="nearest")
    if hu_offset:
        out += np.float32(hu_offset)
    if noise_hu > 0:
        out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(noise_hu)
    return np.maximum(out, np.float32(-1024.0))


# ------------------------------------------------------------------------------------------ sampling
def _unit(v):
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _sample_lesion(rng, cfg: LesionConfig, center) -> Lesion:
    lo, hi = cfg.radius_mm
    r = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))   # small lesions are more common
    edge = float(np.clip(rng.uniform(0.25, 0.5) * r, 2.5, 10.0))
    blobs, reach = [], 0.0
    for i in range(int(rng.integers(2, 5))):
        off = np.zeros(3) if i == 0 else _unit(rng.normal(size=3)) * rng.uniform(0.3, 0.8) * r
        rk = r if i == 0 else r * rng.uniform(0.4, 0.75)
        s = np.exp(rng.normal(0.0, 0.25, 3))
        s = rk * s / np.exp(np.log(s).mean())          # anisotropic, same mean radius
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))   # random orientation
        m = (q / s).T                                   # maps the ellipsoid onto the unit sphere
        reach = max(reach, float(np.linalg.norm(off) + s.max() * (1.0 + (edge + 0.075 * r) / rk)))
        blobs.append(tuple(float(v) for v in (*off, *m.ravel(), rk)))
    ggo = float(rng.uniform(*cfg.ggo_hu))
    cons = float(rng.uniform(*cfg.consolidation_hu))
    has_core = rng.random() < cfg.p_consolidation
    return Lesion(tuple(float(c) for c in center), r, edge, ggo, cons if has_core else None,
                  tuple(blobs), reach + 1.0)


def _grow_vessels(p: Patient, rng, n: int, hila, pts, codes) -> list[tuple[float, ...]]:
    """Random branching trees from each hilum: segments taper ~5 -> ~1 mm and stay inside their lung."""
    segs = []
    for code, count in ((2, n - n // 2), (1, n // 2)):
        hilum, cand = hila[code], pts[codes == code]
        if count <= 0 or len(cand) == 0:
            continue

        def root(hilum=hilum, cand=cand):   # towards a random point of the lung
            return hilum, _unit(cand[rng.integers(len(cand))] - hilum), rng.uniform(4.5, 5.5)

        frontier, made, tries = [root() for _ in range(3 if code == 2 else 2)], 0, 0
        while made < count and tries < 40 * count:
            tries += 1
            if not frontier:
                frontier.append(root())
            start, d, r0 = frontier.pop(int(rng.integers(len(frontier))))
            r1 = max(1.0, r0 * rng.uniform(0.55, 0.7))
            length = rng.uniform(6.0, 10.0) * r0 + 8.0
            for _ in range(3):
                ends = start + np.outer([0.5, 1.0], d * length)
                if np.all(_lung_points(p, *ends.T) == code):
                    break
                length *= 0.6
            else:
                continue
            end = ends[1]
            segs.append(tuple(float(v) for v in (*start, *end, r0, r1)))
            made += 1
            if r1 > 1.05:
                away = _unit(end - hilum)
                for sign, scale in ((1.0, 1.0), (-1.0, rng.uniform(0.6, 0.9))):
                    j = rng.normal(size=3)
                    j = _unit(j - d * (j @ d))
                    frontier.append((end, _unit(d + sign * rng.uniform(0.4, 0.9) * j + 0.3 * away),
                                     max(1.0, r1 * scale)))
    return segs


def sample_patient(rng: np.random.Generator, lesions: LesionConfig = LesionConfig(), n_vessels: int = 24) -> Patient:
    """Draw one adult chest: sizes, organs, airway, vessel tree and COVID-19-like lesions."""
    u = rng.uniform
    a, b, fat, wall, post = u(150, 175), u(100, 125), u(10, 20), u(8, 12), u(10, 20)
    ca, cy = a - fat - wall, post / 2
    cb = b - fat - wall - post / 2          # thicker back muscles behind the lungs
    height, med = u(200, 260), u(40, 70)
    zb = -height / 2
    xc, lax = (ca + med / 2) / 2 + 2.0, (ca - med / 2) / 2 + 15.0   # medial edge cut by the mediastinum
    yc, lby = cy - u(0.05, 0.15) * cb, cb * u(1.1, 1.2)
    dome = (u(10, 25), u(15, 35))           # the right hemidiaphragm sits higher (liver)
    sr, cr = u(18, 22), u(7, 9)
    sy = cy - cb + sr + 5.0                  # vertebral body at the back of the cavity
    h_axes = (u(60, 70), u(40, 50), u(40, 50))
    h_center = (-u(22, 35), cy + cb - h_axes[1] - u(3, 10), zb + 0.3 * dome[0] + 0.8 * h_axes[2])

    def oblique(lo, hi, dome):   # from the back of the lung at lo..hi of its height to the anterior base
        y_post, z_post = cy - 0.85 * cb, zb + u(lo, hi) * height
        y_ant, z_ant = cy + u(0.7, 0.9) * cb, zb + 0.3 * dome
        k = (z_post - z_ant) / (y_ant - y_post)
        return float(z_post + k * y_post), float(k)

    fissures = (oblique(0.8, 0.9, dome[0]), oblique(0.75, 0.85, dome[1]))
    r_t, wall_aw = u(7.5, 9.0), u(1.5, 2.5)
    y_t = sy + sr + u(10, 16) + r_t + wall_aw   # trachea in front of the spine (oesophagus between)
    z_car = zb + u(0.55, 0.65) * height
    p = Patient(
        body_axes=(a, b), fat_mm=fat, fat_hu=u(-110, -90), cavity=(ca, cb, cy), bone_hu=u(400, 700),
        ribs=(u(28, 34), u(9, 13), min(9.0, wall - 2.0), u(0.3, 0.5), u(0, 1)), spine=(sy, sr, cr, u(450, 550)),
        lung_height=height, lung_center=(xc, yc), lung_axes=(lax, lby), mediastinum_mm=med, dome_mm=dome,
        lung_hu=u(-880, -820), lung_gradient_hu=u(0, 15), heart_center=h_center, heart_axes=h_axes,
        heart_angle=u(-0.6, -0.3), fissures=fissures, horizontal_fissure_z=zb + u(0.45, 0.55) * height,
        airway_wall_mm=wall_aw, airways=((0.0, y_t, z_car, 0.0, y_t, FAR, r_t),), vessels=(), lesions=())
    p = replace(p, **{k: _floats(v) for k, v in p.__dict__.items() if k not in ("airways", "vessels", "lesions")})

    # Main bronchi: right short and steep, left longer and flatter; each ends ~1-2 cm inside its lung.
    airways, hila = list(p.airways), {}
    for code, sign, depth, drop, r in ((2, 1.0, u(12, 20), u(20, 30), u(6.0, 7.5)),
                                       (1, -1.0, u(20, 28), u(30, 40), u(5.0, 6.5))):
        end = np.array([sign * (med / 2 + depth), y_t + u(-5, 5), z_car - drop])
        for _ in range(10):
            if _lung_points(p, *end[:, None])[0] == code:
                break
            end[0] += sign * 5.0
        airways.append((0.0, y_t, z_car, *map(float, end), r))
        hila[code] = end
    p = replace(p, airways=tuple(airways))

    # Coarse 4 mm lung map: interior points for vessel targets, pleural depth for lesion placement.
    lo, hi = (np.asarray(v) for v in _lung_box(p))
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    aff[:3, 3] = lo - 8.0
    g = _Grid(tuple(int(v) for v in np.ceil((hi - lo + 16.0) / 4.0) + 1), aff, (0.0, 0.0, 0.0))
    coarse = _lungs(p, g)[0]
    idx = np.flatnonzero(coarse)
    pts = np.stack([c.ravel()[idx] for c in (g.x, g.y, g.z)], axis=1).astype(np.float64)
    codes = coarse.ravel()[idx]
    vessels = _grow_vessels(p, rng, n_vessels, hila, pts, codes)

    n_les, chosen = int(rng.integers(lesions.n_min, lesions.n_max + 1)), []
    if n_les > 0 and len(pts):   # centre weights: exp(-bias * pleural depth / 20 mm - bias * relative height)
        depth = ndimage.distance_transform_edt(coarse > 0, sampling=4.0).ravel()[idx] - 2.0
        logw = -lesions.peripheral_bias * depth / 20.0 - lesions.basal_bias * (pts[:, 2] - zb) / height
        w = np.exp(logw - logw.max())   # shifted so extreme biases cannot underflow to all zeros
        chosen = rng.choice(len(pts), size=n_les, p=w / w.sum())
    les = tuple(_sample_lesion(rng, lesions, pts[i] + rng.uniform(-2.0, 2.0, 3)) for i in chosen)
    return replace(p, vessels=tuple(vessels), lesions=les)


def _floats(v):
    """Plain Python floats (not numpy scalars) so the frozen Patient reprs and compares cleanly."""
    return tuple(_floats(e) for e in v) if isinstance(v, tuple) else float(v)
