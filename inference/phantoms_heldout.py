"""A second, independent phantom family, held out to measure generalisation (issue 15).

The training family (`inference.phantoms`) paints binary ellipsoids and sphere chains and
blurs the result. This family shares none of its code or primitives and is never used for
training, fitting or choosing thresholds; `nodal evaluate --family heldout` scores a model
on it. It is built from:

* **Primitives**: signed-distance functions (superellipse slabs whose size changes with z,
  superellipsoids, Catmull-Rom spline tubes with a varying radius, a bean = superellipsoid
  minus a sphere), composited with an anti-aliased occupancy (a one-voxel ramp across the
  zero level) instead of binary masks.
* **Anatomy** (its own torso model, z = 0 at the diaphragm dome): a superellipse body of
  drawn patient size with subcutaneous fat and a muscle wall; spine, paraspinal muscles;
  above the diaphragm lungs, heart, ascending/descending aorta, SVC, trachea and bronchi,
  the oesophagus (collapsed or with air), azygos and small mediastinal vessels in every
  orientation; around the diaphragm the crura beside the aorta; below it liver, spleen,
  kidneys with horizontal renal veins, adrenals, psoas, aorta, IVC, ureters, gonadal veins,
  mesenteric vessels and bowel loops 25-55 mm wide (2-4 mm wall; fluid, gas, fluid with a
  gas level, or oral contrast inside).
* **Nodes**: superellipsoids (exponent 1.8-2.6), long/short up to 3, reniform (a notch
  with a fatty hilum), necrotic centres (5-20 HU), clusters of 2-4 with 1-3 mm gaps, and
  nodes touching a vessel, an organ or muscle, in mediastinal, retrocrural, para-aortic,
  mesenteric and axillary fat. The label uses the same published points rule as the
  training family (RECIST size classes, round, necrosis, fatty hilum), implemented here
  apart; ground-truth axes are measured on a 0.1 mm raster of the node's central section.
* **Acquisition**: pixels 0.6-0.8 mm in a 512 matrix (the body may be cut by the field of
  view), slices 1.25-5 mm made by averaging thinner sub-slices (a box slice profile), a
  smooth, standard or sharp kernel (in-plane blur and edge enhancement), noise whose
  texture follows the kernel and whose level follows patient size and slice thickness,
  non-contrast / arterial / portal-venous phase, and metal streaks in some cases.

Every number comes from `np.random.default_rng((seed, FAMILY_SALT))`, so a seed here and
the same seed in the training family draw unrelated phantoms.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

FAMILY = "heldout"
FAMILY_SALT = 0x48454C44  # "HELD"

# Tissue codes of this family (its own numbering).
T_AIR, T_FAT, T_MUSCLE, T_BONE, T_LUNG, T_BLOOD, T_ORGAN = 0, 1, 2, 3, 4, 5, 6
T_BOWEL_WALL, T_BOWEL_LUMEN, T_OESOPHAGUS, T_CRUS, T_ADRENAL, T_URETER, T_AIRWAY = 7, 8, 9, 10, 11, 12, 13
T_METAL, T_SUBCUT_FAT, T_NODE = 14, 15, 30
SOFT_CODES = (T_MUSCLE, T_BLOOD, T_ORGAN, T_BOWEL_WALL, T_OESOPHAGUS, T_CRUS, T_ADRENAL, T_URETER)

# Contrast phase: HU ranges (low, high) per compartment.
PHASE_HU = {
    "non-contrast": {
        "artery": (35, 50),
        "vein": (35, 52),
        "liver": (50, 65),
        "spleen": (40, 52),
        "kidney": (28, 40),
        "bowel_wall": (30, 45),
        "node_add": (0, 0),
        "ureter": (15, 30),
    },
    "arterial": {
        "artery": (250, 400),
        "vein": (55, 110),
        "liver": (60, 80),
        "spleen": (90, 140),
        "kidney": (140, 200),
        "bowel_wall": (55, 85),
        "node_add": (5, 15),
        "ureter": (20, 35),
    },
    "venous": {
        "artery": (130, 190),
        "vein": (120, 180),
        "liver": (95, 125),
        "spleen": (95, 125),
        "kidney": (150, 210),
        "bowel_wall": (60, 90),
        "node_add": (10, 25),
        "ureter": (25, 45),
    },
}
KERNELS = {
    # name: (in-plane PSF sigma in mm, edge enhancement, noise factor, noise correlation in px)
    "smooth": (0.75, 0.0, 0.6, 1.1),
    "standard": (0.5, 0.25, 1.0, 0.75),
    "sharp": (0.35, 0.8, 1.8, 0.45),
}
SLICE_CHOICES_MM = (1.25, 1.5, 2.0, 2.5, 3.0, 3.75, 5.0)
SUB_SLICE_MM = 1.25  # slices thicker than this are averaged from sub-slices this thin


@dataclass(frozen=True)
class HeldoutSpec:
    matrix: int = 512
    pixel_mm: tuple[float, float] = (0.6, 0.8)
    slice_mm: tuple[float, float] = (1.25, 5.0)
    length_mm: tuple[float, float] = (140.0, 200.0)  # scan length along z
    nodes: tuple[int, int] = (4, 9)  # inclusive range of node placements (clusters add more)
    metal_share: float = 0.15
    label_noise: float = 0.05
    kernel: str | None = None  # None: drawn per phantom (smooth | standard | sharp)
    phase: str | None = None  # None: drawn per phantom (non-contrast | arterial | venous)


@dataclass(frozen=True)
class Acquisition:
    pixel_mm: float
    slice_mm: float
    slices: int
    matrix: int
    kernel: str
    phase: str
    noise_hu: float
    region: str
    z_centre_mm: float
    metal: bool


@dataclass(frozen=True)
class HeldoutNode:
    index: int
    station: str
    shape: str  # superellipsoid | reniform
    centre_lps_mm: tuple[float, float, float]
    semi_axes_mm: tuple[float, float, float]  # long, short (in plane), z
    exponent: float
    rotation_deg: float
    short_axis_mm: float
    long_axis_mm: float
    volume_mm3: float
    round: bool
    necrosis: bool
    fatty_hilum: bool
    cluster: int  # 0: alone; otherwise the id shared by the nodes of one cluster
    touching: bool
    score: int
    malignant_criterion: bool
    malignant: bool


@dataclass
class HeldoutPhantom:
    hu: np.ndarray = field(repr=False)  # int16 (k, j, i)
    labels: np.ndarray = field(repr=False)  # uint8 node index
    tissue: np.ndarray = field(repr=False)  # uint8 codes of this module
    affine: np.ndarray = field(repr=False)
    nodes: list[HeldoutNode]
    seed: int
    acquisition: Acquisition
    structures: list[dict]  # what was drawn (kind and parameters), for tests and reports

    @property
    def phase(self) -> str:
        return self.acquisition.phase

    def ground_truth(self) -> dict:
        return {
            "family": FAMILY,
            "seed": self.seed,
            "acquisition": asdict(self.acquisition),
            "criterion": CRITERION,
            "nodes": [asdict(n) for n in self.nodes],
        }


CRITERION = (
    "points: short axis >= 15 mm: 2, 10-15 mm: 1; round (short/long >= 0.8): +1; central "
    "necrosis: +2; fatty hilum: -2; malignant at >= 2 points (RECIST 1.1, Steinkamp 1994, "
    "Som 1992, Node-RADS)."
)


def points(short_mm: float, is_round: bool, necrotic: bool, hilum: bool) -> int:
    size = 2 if short_mm >= 15.0 else (1 if short_mm >= 10.0 else 0)
    return size + (1 if is_round else 0) + (2 if necrotic else 0) - (2 if hilum else 0)


def draw_acquisition(seed: int, spec: HeldoutSpec | None = None) -> Acquisition:
    """The acquisition of phantom `seed` (drawn first, so it is known without rendering)."""
    spec = spec or HeldoutSpec()
    rng = np.random.default_rng((seed, FAMILY_SALT, 1))
    slices_ok = [s for s in SLICE_CHOICES_MM if spec.slice_mm[0] <= s <= spec.slice_mm[1]]
    slice_mm = float(rng.choice(slices_ok)) if slices_ok else float(rng.uniform(*spec.slice_mm))
    pixel = float(rng.uniform(*spec.pixel_mm))
    length = float(rng.uniform(*spec.length_mm))
    region = str(rng.choice(["chest", "junction", "upper-abdomen", "lower-abdomen"]))
    kernel, phase = str(rng.choice(list(KERNELS))), str(rng.choice(list(PHASE_HU)))
    z_centre = {
        "chest": rng.uniform(50, 110),
        "junction": rng.uniform(-30, 20),
        "upper-abdomen": rng.uniform(-110, -60),
        "lower-abdomen": rng.uniform(-190, -130),
    }[region]
    return Acquisition(
        pixel_mm=round(pixel, 4),
        slice_mm=slice_mm,
        slices=max(8, round(length / slice_mm)),
        matrix=spec.matrix,
        kernel=spec.kernel or kernel,
        phase=spec.phase or phase,
        noise_hu=round(float(rng.uniform(8, 16)), 2),
        region=region,
        z_centre_mm=round(float(z_centre), 2),
        metal=bool(rng.random() < spec.metal_share),
    )


# --------------------------------------------------------------------------- scene ---


class _Scene:
    """A fine grid (sub-slices along z) with an HU image, a tissue map and node ids."""

    def __init__(self, acq: Acquisition):
        self.sub = max(1, round(acq.slice_mm / SUB_SLICE_MM))
        self.acq = acq
        n = acq.matrix
        self.shape = (acq.slices * self.sub, n, n)
        self.dz = acq.slice_mm / self.sub
        self.h = acq.pixel_mm
        z_first = acq.z_centre_mm - (acq.slices - 1) * acq.slice_mm / 2  # centre of native slice 0
        self.z = z_first - acq.slice_mm / 2 + (np.arange(self.shape[0]) + 0.5) * self.dz
        self.y = (np.arange(n) - (n - 1) / 2) * self.h
        self.x = (np.arange(n) - (n - 1) / 2) * self.h
        self.z_first = z_first
        self.hu = np.full(self.shape, -1000.0, np.float32)
        self.tissue = np.zeros(self.shape, np.uint8)
        self.node = np.zeros(self.shape, np.uint8)
        self.structures: list[dict] = []

    def box(self, lo, hi):
        """Index ranges of the mm box lo..hi (x, y, z); None when outside the volume."""
        out = []
        for axis, a, b in ((self.z, lo[2], hi[2]), (self.y, lo[1], hi[1]), (self.x, lo[0], hi[0])):
            i0, i1 = np.searchsorted(axis, a), np.searchsorted(axis, b, side="right")
            if i1 <= i0:
                return None
            out.append(slice(int(i0), int(i1)))
        return tuple(out)

    def coords(self, sl):
        return (
            self.x[sl[2]][None, None, :],
            self.y[sl[1]][None, :, None],
            self.z[sl[0]][:, None, None],
        )

    def composite(self, sl, sdf, value, code, only=None):
        """Blend `value` where `sdf` < 0, with a one-voxel anti-aliased edge."""
        occ = np.clip(0.5 - sdf / self.h, 0.0, 1.0).astype(np.float32)
        if only is not None:
            occ = occ * np.isin(self.tissue[sl], only)
        region = self.hu[sl]
        region += occ * (np.asarray(value, np.float32) - region)
        self.tissue[sl][occ >= 0.5] = code
        return occ


def _superellipse(u, v, a, b, p):
    """Approximate signed distance (mm) of a superellipse |u/a|^p + |v/b|^p <= 1."""
    r = (np.abs(u / a) ** p + np.abs(v / b) ** p) ** (1.0 / p)
    return (r - 1.0) * np.minimum(a, b)


def _superellipsoid(u, v, w, a, b, c, p):
    r = ((np.abs(u / a) ** p + np.abs(v / b) ** p) ** (2.0 / p) + (w / c) ** 2) ** 0.5
    return (r - 1.0) * min(a, b, c)


def _rot(x, y, cx, cy, angle):
    dx, dy = x - cx, y - cy
    ca, sa = math.cos(angle), math.sin(angle)
    return dx * ca + dy * sa, -dx * sa + dy * ca


def _spline(ctrl: np.ndarray, per_span: int = 12) -> np.ndarray:
    """Catmull-Rom spline through the control points (x, y, z), sampled densely."""
    p = np.vstack([2 * ctrl[0] - ctrl[1], ctrl, 2 * ctrl[-1] - ctrl[-2]])
    out = []
    t = np.linspace(0, 1, per_span, endpoint=False)[:, None]
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        out.append(
            0.5
            * (
                2 * p1
                + (-p0 + p2) * t
                + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3
            )
        )
    out.append(ctrl[-1][None])
    return np.vstack(out)


def _tube(scene: _Scene, ctrl, radius, value, code, only=None, radius_end=None):
    """A spline tube: distance to the sampled centre line minus a radius varying along it."""
    pts = _spline(np.asarray(ctrl, float))
    r0 = float(radius)
    r1 = float(radius if radius_end is None else radius_end)
    rs = np.linspace(r0, r1, len(pts))
    pad = max(r0, r1) + 2 * scene.h
    sl = scene.box(pts.min(0) - pad, pts.max(0) + pad)
    if sl is None:
        return None
    dist = np.full(scene.hu[sl].shape, np.inf, np.float32)
    for (a, ra), (b, rb) in zip(
        zip(pts[:-1], rs[:-1], strict=True), zip(pts[1:], rs[1:], strict=True), strict=True
    ):
        lo, hi = np.minimum(a, b) - pad, np.maximum(a, b) + pad
        sub = scene.box(lo, hi)
        if sub is None:
            continue
        local = tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(sub, sl, strict=True))
        xs, ys, zs = scene.coords(sub)
        ab = b - a
        ll = float(ab @ ab) or 1e-9
        t = np.clip(((xs - a[0]) * ab[0] + (ys - a[1]) * ab[1] + (zs - a[2]) * ab[2]) / ll, 0, 1)
        d = np.sqrt(
            (xs - a[0] - t * ab[0]) ** 2 + (ys - a[1] - t * ab[1]) ** 2 + (zs - a[2] - t * ab[2]) ** 2
        )
        d = d - (ra + t * (rb - ra))
        np.minimum(dist[local], d, out=dist[local])
    return sl, scene.composite(sl, dist, value, code, only)


def _blob(scene: _Scene, centre, semi, value, code, p=2.0, angle=0.0, only=None):
    """A superellipsoid with one axis along z, rotated in plane by `angle`."""
    c, s = np.asarray(centre, float), np.asarray(semi, float)
    r = 1.1 * max(s[0], s[1]) + 2 * scene.h  # a superellipse with p > 2 reaches past its semi-axes
    sl = scene.box((c[0] - r, c[1] - r, c[2] - s[2] - 2), (c[0] + r, c[1] + r, c[2] + s[2] + 2))
    if sl is None:
        return None
    x, y, z = scene.coords(sl)
    u, v = _rot(x, y, c[0], c[1], angle)
    sdf = _superellipsoid(u, v, z - c[2], s[0], s[1], s[2], p)
    return sl, scene.composite(sl, sdf, value, code, only)


def _slab(scene: _Scene, z_lo, z_hi, centre_fn, semi_fn, p, value, code, only=None):
    """A superellipse cross-section along z between z_lo and z_hi; centre and size per z."""
    ks = np.flatnonzero((scene.z >= z_lo) & (scene.z <= z_hi))
    for k in ks:
        z = float(scene.z[k])
        (cx, cy), (a, b) = centre_fn(z), semi_fn(z)
        if a <= 0.5 or b <= 0.5:
            continue
        sl = scene.box((cx - a - 2, cy - b - 2, z), (cx + a + 2, cy + b + 2, z))
        if sl is None:
            continue
        sl = (slice(k, k + 1), sl[1], sl[2])
        x, y, _ = scene.coords(sl)
        scene.composite(sl, _superellipse(x - cx, y - cy, a, b, p), value, code, only)


# ----------------------------------------------------------------------- anatomy ---


def _u(rng, lo_hi) -> float:
    return float(rng.uniform(*lo_hi))


def _anatomy(scene: _Scene, rng: np.random.Generator) -> dict:
    ph = PHASE_HU[scene.acq.phase]
    zl, zh = float(scene.z[0]) - 5, float(scene.z[-1]) + 5
    size = rng.uniform(0.85, 1.25)  # patient size
    A, B = 150 * size, 112 * size * rng.uniform(0.9, 1.05)
    pexp = rng.uniform(2.1, 2.8)
    fat_t = rng.uniform(6, 16) * size**3
    wall_t = rng.uniform(8, 14)
    shift = (rng.uniform(-15, 15), rng.uniform(-10, 10))  # patient not centred in the FOV

    def half(z):  # the trunk narrows a little towards the pelvis
        return A * (1 + 0.0004 * np.clip(z, -200, 150)), B

    def centre(z):
        return shift

    _slab(scene, zl, zh, centre, half, pexp, -100.0, T_SUBCUT_FAT)
    _slab(scene, zl, zh, centre, lambda z: (half(z)[0] - fat_t, half(z)[1] - fat_t), pexp, 48.0, T_MUSCLE)
    inner = wall_t + fat_t
    _slab(scene, zl, zh, centre, lambda z: (half(z)[0] - inner, half(z)[1] - inner), pexp, -95.0, T_FAT)
    cav_a, cav_b = A - inner, B - inner
    sx, sy = shift[0], shift[1] + cav_b - 30  # vertebral body centre (posterior is +y)
    info = {
        "size": float(size),
        "lateral_semi_axis_mm": float(A),
        "cavity": (cav_a, cav_b),
        "spine": (sx, sy),
        "wall_outer": float(A - fat_t),
    }
    if zh > 40:  # axillary fat pads outside the chest wall
        for side in (-1, 1):
            _blob(
                scene,
                (shift[0] + side * (A - fat_t), shift[1] - 0.2 * B, 150),
                (32, 45, 90),
                -100.0,
                T_FAT,
                p=2.0,
                only=(T_SUBCUT_FAT, T_MUSCLE),
            )
    scene.structures.append({"kind": "body", **info})

    # Spine and paraspinal muscles.
    for side in (-1, 1):
        _slab(
            scene, zl, zh, lambda z, s=side: (sx + s * 28, sy + 36), lambda z: (17, 21), 2.4, 52.0, T_MUSCLE
        )
    _slab(scene, zl, zh, lambda z: (sx, sy), lambda z: (19, 16), 2.2, 650.0, T_BONE)
    _slab(scene, zl, zh, lambda z: (sx, sy), lambda z: (16.5, 13.5), 2.2, 210.0, T_BONE)
    _slab(scene, zl, zh, lambda z: (sx, sy + 25), lambda z: (6, 7), 2.0, 20.0, T_ORGAN)  # cord

    art = _u(rng, ph["artery"])
    ven = _u(rng, ph["vein"])
    ax, ay = sx + rng.uniform(12, 22), sy - 26  # descending aorta, left of midline
    _tube(
        scene, [(ax, ay, zh), (ax - 4, ay - 2, 0), (ax - 8, ay - 4, -230)], rng.uniform(10, 13), art, T_BLOOD
    )

    if zh > 0:  # chest
        lung_a = (cav_a - 40) / 2  # the mediastinum keeps 35 mm either side of the midline
        for side in (-1, 1):
            _blob(
                scene,
                (shift[0] + side * (35 + lung_a), shift[1] + 4, 130),
                (lung_a, cav_b * 0.8, 135),
                -860.0,
                T_LUNG,
                p=2.3,
                only=(T_FAT,),
            )
        _blob(scene, (shift[0] + 20, shift[1] - cav_b * 0.35, 55), (50, 45, 55), 42.0, T_ORGAN, p=2.0)
        _blob(scene, (shift[0] + 20, shift[1] - cav_b * 0.35, 55), (36, 32, 42), ven, T_BLOOD, p=2.0)
        _tube(
            scene, [(shift[0] + 5, shift[1] - 35, 90), (shift[0] + 2, shift[1] - 30, 200)], 14.0, art, T_BLOOD
        )
        _tube(
            scene,
            [(shift[0] - 25, shift[1] - 25, 90), (shift[0] - 27, shift[1] - 20, 220)],
            9.0,
            ven,
            T_BLOOD,
        )
        carina = rng.uniform(105, 130)
        _tube(scene, [(shift[0], sy - 55, carina), (shift[0], sy - 60, 260)], 9.5, 38.0, T_AIRWAY)
        _tube(scene, [(shift[0], sy - 55, carina), (shift[0], sy - 60, 260)], 8.0, -960.0, T_AIRWAY)
        for side in (-1, 1):
            br = [(shift[0], sy - 55, carina), (shift[0] + side * 40, sy - 45, carina - 25)]
            _tube(scene, br, 6.0, 38.0, T_AIRWAY, only=(T_FAT, T_LUNG))
            _tube(scene, br, 4.5, -960.0, T_AIRWAY, only=(T_AIRWAY,))
        ox = shift[0] + rng.uniform(-6, 8)
        oes = [(ox, sy - 32, -40), (ox + rng.uniform(-6, 6), sy - 34, 60), (ox, sy - 38, 260)]
        _tube(scene, oes, rng.uniform(6.5, 9.5), rng.uniform(33, 48), T_OESOPHAGUS, only=(T_FAT,))
        if rng.random() < 0.4:
            _tube(scene, oes, rng.uniform(1.5, 3.5), -880.0, T_OESOPHAGUS, only=(T_OESOPHAGUS,))
        scene.structures.append({"kind": "oesophagus"})
        az = [(sx - 10, sy - 20, -40), (sx - 12, sy - 22, 110), (shift[0] - 20, sy - 45, 130)]
        _tube(
            scene,
            az,
            rng.uniform(3.0, 4.5),
            ven if scene.acq.phase == "venous" else _u(rng, (35, 60)),
            T_BLOOD,
            only=(T_FAT,),
        )
        for _ in range(int(rng.integers(5, 10))):  # small mediastinal vessels in every orientation
            c = np.array(
                [
                    shift[0] + rng.uniform(-35, 35),
                    shift[1] + rng.uniform(-cav_b * 0.6, 0.2 * cav_b),
                    rng.uniform(10, 200),
                ]
            )
            d = rng.normal(0, 1, 3)
            d /= np.linalg.norm(d)
            length = rng.uniform(30, 90)
            ctrl = [c - d * length / 2, c + rng.normal(0, 6, 3), c + d * length / 2]
            hu = _u(rng, (32, 55)) if scene.acq.phase == "non-contrast" or rng.random() < 0.3 else ven
            _tube(scene, ctrl, rng.uniform(2.5, 5.0), hu, T_BLOOD, only=(T_FAT,))
            scene.structures.append({"kind": "vessel", "region": "mediastinum", "hu": float(hu)})
        for _ in range(int(rng.integers(8, 16))):  # pulmonary vessels
            side = rng.choice([-1, 1])
            c0 = np.array([shift[0] + side * 30, shift[1], rng.uniform(20, 200)])
            c1 = c0 + np.array([side * rng.uniform(40, 90), rng.uniform(-40, 40), rng.uniform(-40, 40)])
            _tube(
                scene,
                [c0, (c0 + c1) / 2 + rng.normal(0, 8, 3), c1],
                rng.uniform(1.5, 3.5),
                ven,
                T_BLOOD,
                only=(T_LUNG,),
            )

    if zl < 20:  # diaphragmatic crura: muscle bands hugging the aorta
        for side in (-1, 1):
            crus = [
                (ax + side * 14, ay - 6, 20),
                (ax + side * 12, ay + 2, -25),
                (ax + side * 9, ay + 12, -75),
            ]
            _tube(
                scene,
                crus,
                rng.uniform(3.0, 5.0),
                _u(rng, (40, 55)),
                T_CRUS,
                only=(T_FAT,),
                radius_end=rng.uniform(2.5, 4.0),
            )
        scene.structures.append({"kind": "crus"})

    if zl < -10:  # abdomen
        liver = _u(rng, ph["liver"])
        _blob(
            scene,
            (shift[0] - cav_a * 0.45, shift[1] - 5, -70),
            (cav_a * 0.5, cav_b * 0.8, 85),
            liver,
            T_ORGAN,
            p=2.2,
            only=(T_FAT,),
        )
        _blob(
            scene,
            (shift[0] + cav_a * 0.6, shift[1] + cav_b * 0.35, -55),
            (35, 45, 50),
            _u(rng, ph["spleen"]),
            T_ORGAN,
            p=2.0,
            only=(T_FAT,),
        )
        kz = rng.uniform(-125, -95)
        for side in (-1, 1):
            kc = (sx + side * 68, sy - 6, kz + side * 8)
            _blob(
                scene,
                kc,
                (30, 24, 55),
                _u(rng, ph["kidney"]),
                T_ORGAN,
                p=2.0,
                angle=side * 0.5,
                only=(T_FAT,),
            )
            # renal vein: horizontal, into the IVC (a vessel lying in the axial plane)
            _tube(
                scene,
                [kc, (sx + side * 35, sy - 20, kc[2] + 5), (sx - 22, sy - 28, kc[2] + 8)],
                rng.uniform(3.5, 5.5),
                ven,
                T_BLOOD,
                only=(T_FAT,),
            )
            # adrenal: thin inverted-V limbs above the kidney
            az_ = kc[2] + 62
            for limb in (-1, 1):
                _tube(
                    scene,
                    [(sx + side * 40, sy - 30, az_ + 15), (sx + side * (40 + limb * 8), sy - 22, az_ - 10)],
                    rng.uniform(2.0, 3.0),
                    _u(rng, (25, 45)),
                    T_ADRENAL,
                    only=(T_FAT,),
                )
            # ureter: a small tube running down from the renal pelvis
            _tube(
                scene,
                [
                    (sx + side * 55, sy - 15, kc[2] - 10),
                    (sx + side * 48, sy - 28, -170),
                    (sx + side * 45, sy - 35, -260),
                ],
                rng.uniform(2.0, 3.5),
                _u(rng, ph["ureter"]),
                T_URETER,
                only=(T_FAT,),
            )
            # psoas widening downwards
            _tube(
                scene,
                [(sx + side * 28, sy - 5, -80), (sx + side * 45, sy - 20, -260)],
                6.0,
                50.0,
                T_MUSCLE,
                only=(T_FAT,),
                radius_end=22.0,
            )
            # gonadal vein: small, rarely enhanced
            _tube(
                scene,
                [(sx + side * 42, sy - 32, kc[2]), (sx + side * 55, sy - 55, -260)],
                rng.uniform(2.0, 3.5),
                _u(rng, (35, 70)),
                T_BLOOD,
                only=(T_FAT,),
            )
        ivc = [(sx - 24, sy - 26, 10), (sx - 22, sy - 28, -120), (sx - 18, sy - 30, -260)]
        _tube(scene, ivc, rng.uniform(9, 12), ven, T_BLOOD, only=(T_FAT, T_ORGAN))
        scene.structures.append({"kind": "vessel", "region": "abdomen", "hu": float(ven)})
        _bowel(scene, rng, ph, (shift[0], shift[1]), cav_a, cav_b, zl)
        for _ in range(int(rng.integers(4, 8))):  # mesenteric vessels in every orientation
            c = np.array(
                [
                    shift[0] + rng.uniform(-0.5, 0.5) * cav_a,
                    shift[1] - rng.uniform(0, 0.6) * cav_b,
                    rng.uniform(zl, max(zl + 1, -15)),
                ]
            )
            d = rng.normal(0, 1, 3)
            d /= np.linalg.norm(d)
            ctrl = [c - d * 30, c + rng.normal(0, 5, 3), c + d * 30]
            hu = float(rng.choice([art, ven, _u(rng, (35, 55))]))
            _tube(scene, ctrl, rng.uniform(2.0, 4.5), hu, T_BLOOD, only=(T_FAT,))
            scene.structures.append({"kind": "vessel", "region": "mesentery", "hu": hu})
    return info


def _bowel(scene, rng, ph, shift, cav_a, cav_b, zl):
    wall_hu = _u(rng, ph["bowel_wall"])
    for _ in range(int(rng.integers(4, 9))):
        outer = rng.uniform(12.5, 27.5)  # loop diameter 25-55 mm
        wall = rng.uniform(2.0, 4.0)
        content = str(rng.choice(["fluid", "fluid", "gas", "fluid-gas", "oral-contrast"]))
        c = np.array(
            [
                shift[0] + rng.uniform(-0.55, 0.55) * cav_a,
                shift[1] - rng.uniform(0.05, 0.6) * cav_b,
                rng.uniform(max(zl, -260), max(zl, -260) + max(1.0, -15 - max(zl, -260))),
            ]
        )
        axis = rng.normal(0, 1, 3)
        if rng.random() < 0.5:  # many loops run roughly along z: rings on axial images
            axis[2] = 3 * np.sign(axis[2] or 1.0)
        axis /= np.linalg.norm(axis)
        length = rng.uniform(50, 120)
        bend = rng.normal(0, 12, 3)
        ctrl = [c - axis * length / 2, c + bend, c + axis * length / 2]
        c = c + bend  # the loop passes through here
        res = _tube(scene, ctrl, outer, wall_hu, T_BOWEL_WALL, only=(T_FAT,))
        if res is None:
            continue
        fluid = _u(rng, (-5, 20))
        value = {
            "fluid": fluid,
            "gas": _u(rng, (-950, -700)),
            "fluid-gas": fluid,
            "oral-contrast": _u(rng, (150, 400)),
        }[content]
        lumen = _tube(scene, ctrl, outer - wall, value, T_BOWEL_LUMEN, only=(T_BOWEL_WALL,))
        if lumen is None:
            continue
        sl = lumen[0]
        if content == "fluid-gas":  # gas rises anteriorly (-y): a level inside the lumen
            _, y, _ = scene.coords(sl)
            level = c[1] - rng.uniform(0.2, 0.6) * (outer - wall)
            gas = (scene.tissue[sl] == T_BOWEL_LUMEN) & np.broadcast_to(y < level, scene.tissue[sl].shape)
            scene.hu[sl][gas] = -900.0
        scene.structures.append(
            {
                "kind": "bowel",
                "content": content,
                "diameter_mm": 2 * outer,
                "wall_mm": wall,
                "lumen_hu": float(value),
                "wall_hu": float(wall_hu),
                "centre": c.tolist(),
            }
        )


# ------------------------------------------------------------------------- nodes ---

STATIONS = {
    # name: (z range mm, where relative to the spine: x offset range, y offset range)
    "mediastinal": ((15, 200), (-40, 40), (-75, -25)),
    "retrocrural": ((-60, 15), (-25, 25), (-35, -12)),
    "para-aortic": ((-230, -50), (-45, 45), (-55, -20)),
    "mesenteric": ((-230, -40), (-90, 90), (-150, -60)),
    "axillary": ((40, 200), None, None),
}


def _node_sdf(x, y, z, n: dict):
    u, v = _rot(x, y, n["c"][0], n["c"][1], n["angle"])
    w = z - n["c"][2]
    a, b, c = n["semi"]
    sdf = _superellipsoid(u, v, w, a, b, c, n["p"])
    if n["shape"] == "reniform":  # a notch on the +v side: a bean
        r = n["notch_r"]
        notch = np.sqrt(u**2 + (v - (b + r - n["notch_depth"])) ** 2 + (w / 1.5) ** 2) - r
        sdf = np.maximum(sdf, -notch)
    return sdf


def _section_axes(n: dict, step: float = 0.1) -> tuple[float, float]:
    """Long and short axis (mm) of the node's central axial section on a fine raster."""
    r = 1.1 * max(n["semi"][:2]) + 1
    g = np.arange(-r, r + step, step)
    x, y = g[None, :] + n["c"][0], g[:, None] + n["c"][1]
    inside = _node_sdf(x, y, n["c"][2], n) <= 0
    jj, ii = np.nonzero(inside)
    pts = np.stack([g[ii], g[jj]], 1)
    from scipy.spatial import ConvexHull

    hull = pts[ConvexHull(pts).vertices]
    d2 = ((hull[:, None] - hull[None]) ** 2).sum(-1)
    a, b = np.unravel_index(np.argmax(d2), d2.shape)
    long_mm = float(np.sqrt(d2[a, b])) + step
    d = (hull[b] - hull[a]) / (long_mm - step)
    along, across = pts @ d, pts @ np.array([-d[1], d[0]])
    bins = np.round(along / step).astype(int)
    order = np.argsort(bins)
    bins, across = bins[order], across[order]
    starts = np.flatnonzero(np.r_[True, np.diff(bins) > 0])
    width = np.maximum.reduceat(across, starts) - np.minimum.reduceat(across, starts)
    return long_mm, float(width.max()) + step


def _node_volume(n: dict) -> float:
    s = n["semi"]
    step = max(0.15, max(s) / 45)
    gx = np.arange(-1.1 * s[0] - 0.5, 1.1 * s[0] + 0.5, step)
    gz = np.arange(-s[2] - 0.5, s[2] + 0.5, step)
    x, y, z = gx[None, None, :], gx[None, :, None], gz[:, None, None]
    inside = _node_sdf(x + n["c"][0], y + n["c"][1], z + n["c"][2], n) <= 0
    return float(inside.sum() * step**3)


def _draw_node(rng, sa_range=(4.0, 32.0)) -> dict:
    sa = float(np.exp(rng.uniform(math.log(sa_range[0]), math.log(sa_range[1]))))
    kind = rng.random()
    if kind < 0.3:
        ratio = rng.uniform(1.0, 1.25)  # round
    elif kind < 0.65:
        ratio = rng.uniform(1.25, 2.0)
    else:
        ratio = rng.uniform(2.0, 3.0)  # elongated
    la = min(sa * ratio, 60.0)
    shape = "reniform" if sa >= 6 and rng.random() < 0.35 else "superellipsoid"
    zsemi = rng.uniform(0.5 * sa, 0.5 * max(sa, 0.7 * la))
    n = {
        "semi": (la / 2, sa / 2, zsemi),
        "p": float(rng.uniform(1.8, 2.6)),
        "angle": float(rng.uniform(0, math.pi)),
        "shape": shape,
        "notch_r": sa * rng.uniform(0.25, 0.4),
        "notch_depth": sa * rng.uniform(0.1, 0.18),
        "necrosis": shape != "reniform" and sa >= 8 and rng.random() < 0.3,
    }
    return n


def _place_nodes(scene: _Scene, rng, spec: HeldoutSpec, info: dict, node_add: float) -> list[dict]:
    placed: list[dict] = []
    count = int(rng.integers(spec.nodes[0], spec.nodes[1] + 1))
    sx, sy = info["spine"]
    coarse = scene.tissue[:: scene.sub, ::2, ::2]
    fat_pool = np.flatnonzero(coarse.ravel() == T_FAT)
    if fat_pool.size == 0:
        return placed
    cluster_id = 0
    queue: list[tuple[dict, int]] = []
    for _ in range(count):
        queue.append((_draw_node(rng), 0))
    while queue:
        n, cluster = queue.pop(0)
        touching = cluster == 0 and rng.random() < 0.25
        anchor = n.pop("anchor", None)
        for _attempt in range(250):
            if anchor is not None:  # a cluster member beside its anchor, 1-3 mm apart
                d = rng.normal(0, 1, 3)
                d[2] *= 0.5
                d /= np.linalg.norm(d)
                gap = rng.uniform(1.0, 3.0)
                c = np.asarray(anchor["c"]) + d * (max(anchor["semi"][:2]) + max(n["semi"][:2]) + gap)
                station = anchor["station"]
            else:
                k, j, i = np.unravel_index(int(rng.choice(fat_pool)), coarse.shape)
                c = np.array([scene.x[2 * i], scene.y[2 * j], scene.z[k * scene.sub]])
                station = _station_of(c, sx, sy, info["wall_outer"])
                if station is None:
                    continue
            n["c"] = c
            r = 1.1 * max(n["semi"][:2])
            reach = np.array([r + 4, r + 4, n["semi"][2] + 4])
            sl = scene.box(c - reach, c + reach)
            if sl is None or any(
                s.start == 0 or s.stop == dim for s, dim in zip(sl, scene.shape, strict=True)
            ):
                continue
            x, y, z = scene.coords(sl)
            sdf = _node_sdf(x, y, z, n)
            inside, near = sdf <= 0, sdf <= 2.5
            if not inside.any() or scene.node[sl][sdf <= 1.0].any():
                continue
            t_in = scene.tissue[sl][inside]
            t_near = scene.tissue[sl][near & ~inside]
            fat_in = (t_in == T_FAT).mean()
            soft_near = np.isin(t_near, SOFT_CODES).mean() if t_near.size else 0.0
            if np.isin(t_in, (T_BONE, T_LUNG, T_AIRWAY, T_BOWEL_LUMEN, T_METAL)).any():
                continue
            if touching and not (fat_in >= 0.8 and soft_near >= 0.1):
                continue
            if not touching and fat_in < 0.97:
                continue
            break
        else:
            continue
        n["station"], n["touching"], n["cluster"] = station, touching, cluster
        idx = len(placed) + 1
        value = rng.uniform(22, 48) + node_add + _texture(rng, inside.shape)
        if n["necrosis"]:
            f = rng.uniform(0.4, 0.65)
            core = _node_sdf((x - c[0]) / f + c[0], (y - c[1]) / f + c[1], (z - c[2]) / f + c[2], n) <= 0
            value = np.where(core, rng.uniform(5, 20), value)
        if n["shape"] == "reniform":  # fat enters at the notch
            u, v = _rot(x, y, c[0], c[1], n["angle"])
            b = n["semi"][1]
            hil = (u / (0.3 * n["semi"][0])) ** 2 + (
                (v - (b - n["notch_depth"] - 0.2 * b)) / (0.35 * b)
            ) ** 2 + ((z - c[2]) / (0.5 * n["semi"][2])) ** 2 <= 1.0
            value = np.where(hil, rng.uniform(-110, -70), value)
        occ = scene.composite(sl, sdf, value, T_NODE)
        scene.node[sl][occ >= 0.5] = idx
        n["index"] = idx
        placed.append(n)
        if cluster == 0 and rng.random() < 0.2:  # start a cluster of 2-4 around this node
            cluster_id += 1
            n["cluster"] = cluster_id
            for _ in range(int(rng.integers(1, 4))):
                m = _draw_node(rng, (4.0, 16.0))
                m["anchor"] = n
                queue.insert(0, (m, cluster_id))
    return placed


def _texture(rng, shape):
    t = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.2)
    return t * (5.0 / (t.std() + 1e-6))


def _station_of(c, sx, sy, wall_outer) -> str | None:
    for name, (zr, xr, yr) in STATIONS.items():
        if not zr[0] <= c[2] <= zr[1]:
            continue
        if xr is None or yr is None:  # axillary: outside the chest wall
            if abs(c[0] - sx) > wall_outer - 5:
                return name
            continue
        if xr[0] <= c[0] - sx <= xr[1] and yr[0] <= c[1] - sy <= yr[1]:
            return name
    return None


# -------------------------------------------------------------------- acquisition ---


def _metal(scene: _Scene, rng) -> None:
    """A metal object (spinal screw or surgical clip) and the streaks it throws in plane."""
    sx, sy = scene.structures[0]["spine"]
    c = np.array([sx + rng.choice([-12, 12]), sy + rng.uniform(-5, 10), float(rng.choice(scene.z))])
    res = _blob(scene, c, (3.0, 3.0, rng.uniform(6, 15)), 3000.0, T_METAL)
    if res is None:
        return
    ks = np.flatnonzero(np.abs(scene.z - c[2]) <= 15)
    yy, xx = scene.y[:, None] - c[1], scene.x[None, :] - c[0]
    theta, rr = np.arctan2(yy, xx), np.hypot(yy, xx)
    streak = np.zeros(theta.shape, np.float32)
    for _ in range(int(rng.integers(10, 25))):
        ang, amp = rng.uniform(-math.pi, math.pi), rng.uniform(-350, 250)
        dang = np.angle(np.exp(1j * (theta - ang)))
        streak += amp * np.exp(-0.5 * (dang / 0.012) ** 2) / (1 + rr / 40.0)
    body = scene.tissue[ks] != T_AIR
    scene.hu[ks] += np.where(body, streak[None], 0.0)
    scene.structures.append({"kind": "metal", "centre": c.tolist()})


def _acquire(scene: _Scene, rng, size: float) -> np.ndarray:
    acq = scene.acq
    k = acq.slices
    img = scene.hu.reshape(k, scene.sub, *scene.shape[1:]).mean(axis=1)  # box slice profile
    psf, sharpen, noise_factor, corr = KERNELS[acq.kernel]
    img = ndimage.gaussian_filter(img, (0.35, psf / acq.pixel_mm, psf / acq.pixel_mm))
    if sharpen:
        img = img + sharpen * (
            img - ndimage.gaussian_filter(img, (0, 1.2 / acq.pixel_mm, 1.2 / acq.pixel_mm))
        )
    sigma = acq.noise_hu * noise_factor * math.sqrt(2.5 / acq.slice_mm) * math.exp((size - 1.0) * 1.6)
    sigma = min(sigma, 45.0)
    noise = ndimage.gaussian_filter(rng.standard_normal(img.shape).astype(np.float32), (0, corr, corr))
    noise *= sigma / (noise.std() + 1e-6)
    return np.clip(np.rint(img + noise), -1024, 3071).astype(np.int16)


# ---------------------------------------------------------------------- generate ---


def generate(seed: int, spec: HeldoutSpec | None = None) -> HeldoutPhantom:
    """One phantom of the held-out family; the same seed and spec give the same phantom."""
    spec = spec or HeldoutSpec()
    acq = draw_acquisition(seed, spec)
    rng = np.random.default_rng((seed, FAMILY_SALT, 2))
    scene = _Scene(acq)
    info = _anatomy(scene, rng)
    node_add = _u(rng, PHASE_HU[acq.phase]["node_add"]) if acq.phase != "non-contrast" else 0.0
    drawn = _place_nodes(scene, rng, spec, info, node_add)
    if acq.metal:
        _metal(scene, rng)
    hu = _acquire(scene, rng, info["size"])

    # Node labels on the native grid: the node's shape sampled at the native voxel centres.
    k = acq.slices
    labels = np.zeros((k, acq.matrix, acq.matrix), np.uint8)
    z_native = scene.z_first + np.arange(k) * acq.slice_mm
    for n in drawn:
        r = 1.1 * max(n["semi"][:2]) + 1
        c = n["c"]
        ks = np.flatnonzero(np.abs(z_native - c[2]) <= n["semi"][2] + 1)
        js = np.flatnonzero(np.abs(scene.y - c[1]) <= r)
        is_ = np.flatnonzero(np.abs(scene.x - c[0]) <= r)
        sdf = _node_sdf(scene.x[is_][None, None], scene.y[js][None, :, None], z_native[ks][:, None, None], n)
        box = labels[ks[0] : ks[-1] + 1, js[0] : js[-1] + 1, is_[0] : is_[-1] + 1]
        box[sdf <= 0] = n["index"]
    tissue = scene.tissue[scene.sub // 2 :: scene.sub]

    nodes = []
    for n in drawn:
        long_mm, short_mm = _section_axes(n)
        is_round = short_mm / long_mm >= 0.8
        hilum = n["shape"] == "reniform"
        score = points(short_mm, is_round, n["necrosis"], hilum)
        mal = score >= 2
        noisy = (not mal) if rng.random() < spec.label_noise else mal
        c = n["c"]
        nodes.append(
            HeldoutNode(
                index=n["index"],
                station=n["station"],
                shape=n["shape"],
                centre_lps_mm=(round(float(c[0]), 3), round(float(c[1]), 3), round(float(c[2]), 3)),
                semi_axes_mm=tuple(round(float(s), 3) for s in n["semi"]),  # type: ignore[arg-type]
                exponent=round(n["p"], 3),
                rotation_deg=round(math.degrees(n["angle"]), 3),
                short_axis_mm=round(short_mm, 3),
                long_axis_mm=round(long_mm, 3),
                volume_mm3=round(_node_volume(n), 2),
                round=is_round,
                necrosis=bool(n["necrosis"]),
                fatty_hilum=hilum,
                cluster=int(n["cluster"]),
                touching=bool(n["touching"]),
                score=score,
                malignant_criterion=mal,
                malignant=noisy,
            )
        )
    # (k, j, i) -> LPS: x along columns, y along rows, z along slices.
    affine = np.eye(4)
    affine[:3, 0] = (0.0, 0.0, acq.slice_mm)
    affine[:3, 1] = (0.0, acq.pixel_mm, 0.0)
    affine[:3, 2] = (acq.pixel_mm, 0.0, 0.0)
    affine[:3, 3] = (scene.x[0], scene.y[0], scene.z_first)
    return HeldoutPhantom(
        hu=hu,
        labels=labels,
        tissue=tissue,
        affine=affine,
        nodes=nodes,
        seed=seed,
        acquisition=acq,
        structures=scene.structures,
    )
