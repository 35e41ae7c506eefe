"""Synthetic chest/abdomen CT phantoms with lymph nodes of known size, shape and label.

No real CT with lymph-node labels is available offline, so nodal trains and evaluates its
demo model on these phantoms. They are built to make the task honest:

* A body of subcutaneous fat, a muscle wall, ribs, spine and paraspinal muscles; above the
  diaphragm lungs (with pulmonary vessels), trachea, oesophagus, heart, aorta, SVC and small
  mediastinal vessels; below it liver, spleen, kidneys, psoas muscles, aorta, IVC and bowel
  loops with fluid, air or oral contrast.
* Contrast phase (arterial, venous, unenhanced) is drawn per phantom. In the unenhanced
  phase vessels have node-like density (35-50 HU), and muscle, bowel walls and the
  oesophagus always do, so an intensity window alone cannot find the nodes.
* Lymph nodes are ellipsoids (one principal axis along z, rotated in plane) placed in fat
  (mediastinal, hilar, axillary, para-aortic, mesenteric stations), short axis 4-35 mm,
  some round, some oval, some with a necrotic centre, some with a fatty hilum.
* Each node's label follows a documented points rule (see `criterion_score`), after which
  a fraction of labels is flipped (label noise). Both labels are kept in the ground truth.
* Partial-volume blur and correlated noise are applied last.

Everything derives from one integer seed.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TypedDict

import numpy as np
from scipy import ndimage

#: The generator's revision, part of every cache key of phantom-made samples: 2 paints no
#: isolated short piece of a tube clipped to its region (`_Canvas.tube`); 3 continues the
#: pulmonary artery beyond the hilum into the lung (`_lobar_arteries`); 4 makes each slice of
#: a domain-randomised phantom the mean of thin sub-slices across its thickness (`slab_count`).
REVISION = 4
PLAIN_REVISION = 3  # the last revision that changed a phantom without `variety`
#: Revision 4: a domain-randomised phantom is painted on sub-slices at most this thick, and
#: each slice is their mean (a box slice profile, as a CT reconstructs a thick slice).
SUB_SLICE_MM = 1.0
MIN_PIECE_DIAMETERS = 3.0  # a tube's piece shorter than this many diameters is a blob, not a tube

#: The pulmonary artery beyond the hilum (revision 3): the interlobar artery, then the upper,
#: middle and lower lobar arteries, each a chain of (dz, dy, dx) steps in mm with the radius
#: of each step, tapering into the lung. Up is +z, posterior +y; the hilum is on the +x side.
INTERLOBAR_ARTERY = ((0.0, 5.0, 12.0), 9.0)
LOBAR_ARTERIES = (
    (((35.0, -5.0, 15.0), 6.0), ((25.0, 0.0, 10.0), 4.0), ((20.0, 0.0, 8.0), 2.0)),  # upper lobe
    (((-5.0, -25.0, 25.0), 5.0), ((-5.0, -15.0, 15.0), 3.5), ((0.0, -10.0, 10.0), 2.0)),  # middle
    (((-40.0, 15.0, 12.0), 7.0), ((-35.0, 10.0, 8.0), 4.5), ((-25.0, 5.0, 5.0), 2.0)),  # lower lobe
)


def slab_count(spec: PhantomSpec) -> int:
    """How many sub-slices make one slice of `spec`: 1 without `variety` (a slice is painted
    at its centre), else enough for each to be at most `SUB_SLICE_MM` thick."""
    return max(1, math.ceil(spec.slice_spacing_mm / SUB_SLICE_MM - 1e-9)) if spec.variety else 1


def painting_grid(spec: PhantomSpec, z0: float) -> tuple[PhantomSpec, np.ndarray]:
    """The grid a phantom of `spec` whose first slice is at `z0` is painted on: its slices,
    or `slab_count` sub-slices per slice, the j-th of slice k at z_k - ss/2 + (j + 1/2) ss/n."""
    n = slab_count(spec)
    fine = replace(spec, slices=spec.slices * n, slice_spacing_mm=spec.slice_spacing_mm / n)
    return fine, phantom_affine(fine, z0 + (0.5 / n - 0.5) * spec.slice_spacing_mm)


def revision(variety: bool) -> int:
    """The generator's revision that made the phantoms with or without `variety` as they are."""
    return REVISION if variety else PLAIN_REVISION


def revision_tag(variety: bool) -> str:
    """The part of a cache key that names the generator's revision of the phantoms with or
    without `variety` ("" for revision 1, whose recorded cache entries keep their names)."""
    rev = revision(variety)
    return "" if rev == 1 else f"-r{rev}"


# Tissue codes of the label map that the generator keeps beside the image.
AIR, FAT, FAT_MEDIASTINUM, FAT_AXILLA, FAT_ABDOMEN = 0, 1, 2, 3, 4
MUSCLE, BONE, LUNG, VESSEL, ORGAN, BOWEL, AIRWAY, OESOPHAGUS = 5, 6, 7, 8, 9, 10, 11, 12
NODE = 20
FAT_CODES = (FAT, FAT_MEDIASTINUM, FAT_AXILLA, FAT_ABDOMEN)
#: Soft-tissue structures with node-like density that are not nodes (hard negatives).
DISTRACTOR_CODES = (MUSCLE, VESSEL, BOWEL, OESOPHAGUS, ORGAN)

STATIONS = {
    "mediastinal": FAT_MEDIASTINUM,
    "axillary": FAT_AXILLA,
    "abdominal": FAT_ABDOMEN,
}

PHASES = {
    # phase: (arterial blood, venous blood, organ enhancement, node enhancement)
    "arterial": (300.0, 150.0, 30.0, 15.0),
    "venous": (170.0, 165.0, 50.0, 20.0),
    "unenhanced": (42.0, 40.0, 0.0, 0.0),
}


class _Variety(TypedDict):
    patient_size: tuple[float, float]
    pixel_spacing_mm: tuple[float, float]
    slice_spacing_mm: tuple[float, float]
    noise_hu: tuple[float, float]
    bowel_loops: tuple[int, int]
    bowel_radius_mm: tuple[float, float]
    bowel_wall_mm: tuple[float, float]
    vessels: tuple[int, int]
    vessel_radius_mm: tuple[float, float]
    unenhanced_vessel_hu: tuple[float, float]
    crus_hu: tuple[float, float]
    ureter_hu: tuple[float, float]
    adrenal_hu: tuple[float, float]
    elongated_share: float
    touching_share: float
    cluster_share: float
    metal_share: float


#: Domain randomisation (`PhantomSpec.variety`), each range documented in docs/model.md.
VARIETY_STREAM = 0x56415259  # the second random stream: (seed, VARIETY_STREAM)
VARIETY: _Variety = {
    "patient_size": (0.85, 1.25),  # body scale: the FOV may cut the body
    "pixel_spacing_mm": (0.5, 1.0),  # variety_spec
    "slice_spacing_mm": (0.6, 5.0),  # variety_spec
    "noise_hu": (6.0, 25.0),  # variety_spec, before the kernel's factor and patient size
    "bowel_loops": (2, 5),  # extra wide loops in the abdomen
    "bowel_radius_mm": (12.5, 27.5),  # diameter 25-55 mm
    "bowel_wall_mm": (2.0, 4.0),
    "vessels": (4, 10),  # extra vessels in every orientation
    "vessel_radius_mm": (2.0, 5.0),
    "unenhanced_vessel_hu": (30.0, 55.0),
    "crus_hu": (40.0, 55.0),
    "ureter_hu": (15.0, 45.0),
    "adrenal_hu": (25.0, 45.0),
    "elongated_share": 0.3,  # nodes with long/short 2.2-3
    "touching_share": 0.25,  # nodes allowed to touch a vessel, organ or muscle (70 % in fat)
    "cluster_share": 0.2,  # a node followed by a neighbour 2-5 mm away
    "metal_share": 0.15,
}
#: kernel: (extra in-plane blur in px, edge enhancement, noise factor, noise correlation in px)
KERNELS = {"smooth": (0.6, 0.0, 0.6, 1.0), "standard": (0.0, 0.0, 1.0, 0.7), "sharp": (0.0, 0.7, 1.7, 0.45)}


@dataclass(frozen=True)
class PhantomSpec:
    rows: int = 384
    columns: int = 384
    pixel_spacing_mm: float = 0.95
    slices: int = 96
    slice_spacing_mm: float = 2.0
    nodes: tuple[int, int] = (3, 9)  # inclusive range of the number of nodes
    noise_hu: float = 12.0
    label_noise: float = 0.05
    region: str = "auto"  # chest | abdomen | auto (diaphragm somewhere in the volume)
    phase: str = "auto"  # arterial | venous | unenhanced | auto (drawn from the seed)
    # Domain randomisation (issue 15, docs/model.md): more anatomy (wide bowel loops,
    # vessels in every orientation, crura, ureters, adrenals, elongated nodes, clusters,
    # nodes touching other tissue), patient size, kernel, noise and metal streaks, drawn
    # from a second random stream so that the phantoms without it stay exactly as they were.
    variety: bool = False


@dataclass(frozen=True)
class NodeTruth:
    index: int  # value in the label map
    station: str
    centre_lps_mm: tuple[float, float, float]
    semi_axes_mm: tuple[float, float, float]  # in-plane a >= b, then c along z
    rotation_deg: float  # in-plane rotation of the a axis from +x
    short_axis_mm: float  # 2b: axial short axis
    long_axis_mm: float  # 2a: axial long axis
    volume_mm3: float  # analytic ellipsoid volume
    round: bool  # short/long >= 0.8
    necrosis: bool
    fatty_hilum: bool
    score: int
    malignant_criterion: bool  # the documented rule, before label noise
    malignant: bool  # after label noise (what a training set would hold)


@dataclass
class Phantom:
    hu: np.ndarray = field(repr=False)  # int16, (k, j, i)
    labels: np.ndarray = field(repr=False)  # uint8 node index map (0 = no node)
    tissue: np.ndarray = field(repr=False)  # uint8 tissue codes
    affine: np.ndarray = field(repr=False)  # (k, j, i, 1) -> LPS mm
    nodes: list[NodeTruth]
    seed: int
    phase: str

    def ground_truth(self) -> dict:
        return {
            "seed": self.seed,
            "contrast_phase": self.phase,
            "criterion": CRITERION_TEXT,
            "nodes": [asdict(n) for n in self.nodes],
        }


CRITERION_TEXT = (
    "points = 2 if short axis >= 15 mm, 1 if 10-15 mm (RECIST 1.1 nodal classes); "
    "+1 if round (short/long >= 0.8, Steinkamp 1994); +2 if central necrosis (Som 1992); "
    "-2 if a fatty hilum is present (benign sign, Node-RADS). Malignant if points >= 2."
)


def criterion_score(short_axis_mm: float, round_: bool, necrosis: bool, hilum: bool) -> int:
    score = 2 if short_axis_mm >= 15 else 1 if short_axis_mm >= 10 else 0
    return score + int(round_) + 2 * int(necrosis) - 2 * int(hilum)


def phantom_affine(spec: PhantomSpec, z0: float) -> np.ndarray:
    """Axial geometry centred on the body: (k, j, i) -> LPS."""
    ps, ss = spec.pixel_spacing_mm, spec.slice_spacing_mm
    affine = np.eye(4)
    affine[:3, 0] = (0.0, 0.0, ss)
    affine[:3, 1] = (0.0, ps, 0.0)
    affine[:3, 2] = (ps, 0.0, 0.0)
    affine[:3, 3] = (-(spec.columns - 1) * ps / 2, -(spec.rows - 1) * ps / 2, z0)
    return affine


class _Canvas:
    """Paints tissue into an image and a tissue map, in millimetre coordinates."""

    def __init__(self, spec: PhantomSpec, affine: np.ndarray):
        self.shape = (spec.slices, spec.rows, spec.columns)
        self.hu = np.full(self.shape, -1000.0, dtype=np.float32)
        self.tissue = np.zeros(self.shape, dtype=np.uint8)
        self.spacing = np.array([affine[2, 0], affine[1, 1], affine[0, 2]])  # k, j, i
        self.origin = np.array([affine[2, 3], affine[1, 3], affine[0, 3]])  # z, y, x

    def axes_mm(self, lo_mm, hi_mm):
        """Index slices and mm coordinates (z, y, x) of the box [lo, hi] (z, y, x order)."""
        lo = np.floor((np.asarray(lo_mm) - self.origin) / self.spacing).astype(int)
        hi = np.ceil((np.asarray(hi_mm) - self.origin) / self.spacing).astype(int) + 1
        lo = np.clip(lo, 0, self.shape)
        hi = np.clip(hi, 0, self.shape)
        if np.any(hi <= lo):
            return None
        sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        coords = [self.origin[d] + np.arange(lo[d], hi[d]) * self.spacing[d] for d in range(3)]
        return sl, np.meshgrid(*coords, indexing="ij", sparse=True)

    def paint(self, sl, mask, hu, code, where=None):
        if where is not None:
            mask = mask & np.isin(self.tissue[sl], where)
        self.hu[sl][mask] = hu if np.isscalar(hu) else hu[mask]
        self.tissue[sl][mask] = code
        return mask

    def ellipsoid(self, centre_zyx, semi_zyx, hu, code, rot=0.0, where=None):
        c, s = np.asarray(centre_zyx, float), np.asarray(semi_zyx, float)
        r = s.max()
        half = np.array((s[0], r, r))
        box = self.axes_mm(c - half, c + half)
        if box is None:
            return None, None
        sl, (z, y, x) = box
        dx, dy = x - c[2], y - c[1]
        u = dx * math.cos(rot) + dy * math.sin(rot)
        v = -dx * math.sin(rot) + dy * math.cos(rot)
        mask = ((z - c[0]) / s[0]) ** 2 + (v / s[1]) ** 2 + (u / s[2]) ** 2 <= 1.0
        return sl, self.paint(sl, mask, hu, code, where)

    def tube(self, points_zyx, radius, hu, code, where=None):
        """Union of spheres along a densely sampled path.

        Painted only `where` the tissue allows, a tube that leaves its region and comes back
        would leave isolated short pieces: node-shaped blobs of vessel or bowel that no body
        has (a vessel or a bowel loop is continuous). Since `REVISION` 2 such a piece (shorter
        than `MIN_PIECE_DIAMETERS` diameters, not cut by the volume's edge) is not painted."""
        pts = _densify(np.asarray(points_zyx, float), step=max(radius * 0.5, 0.7))
        keep_pieces = where is None or code in where
        box = None if keep_pieces else self.axes_mm(pts.min(axis=0) - radius, pts.max(axis=0) + radius)
        if box is not None:
            sl = box[0]
            before_hu, before_tissue = self.hu[sl].copy(), self.tissue[sl].copy()
        for p in pts:
            self.ellipsoid(p, (radius, radius, radius), hu, code, where=where)
        if box is not None:
            self._drop_short_pieces(sl, before_hu, before_tissue, 2 * radius)

    def _drop_short_pieces(self, sl, before_hu, before_tissue, diameter) -> None:
        painted = self.tissue[sl] != before_tissue
        pieces, _ = ndimage.label(painted)
        for index, piece in enumerate(ndimage.find_objects(pieces), start=1):
            extent = max((s.stop - s.start) * d for s, d in zip(piece, self.spacing, strict=True))
            at_edge = any(
                b.start + s.start == 0 or b.start + s.stop == size
                for s, b, size in zip(piece, sl, self.shape, strict=True)
            )
            if extent >= MIN_PIECE_DIAMETERS * diameter or at_edge:
                continue
            mask = pieces[piece] == index
            self.hu[sl][piece][mask] = before_hu[piece][mask]
            self.tissue[sl][piece][mask] = before_tissue[piece][mask]

    def slab_ellipse(self, z_range, centre_yx, semi_yx, hu, code, where=None, scale=None):
        """An elliptic cylinder along z; `scale(z)` may shrink it slice by slice."""
        k0 = max(0, int(np.floor((z_range[0] - self.origin[0]) / self.spacing[0])))
        k1 = min(self.shape[0], int(np.ceil((z_range[1] - self.origin[0]) / self.spacing[0])))
        y = self.origin[1] + np.arange(self.shape[1])[:, None] * self.spacing[1]
        x = self.origin[2] + np.arange(self.shape[2])[None, :] * self.spacing[2]
        for k in range(k0, k1):
            z = self.origin[0] + k * self.spacing[0]
            f = 1.0 if scale is None else scale(z)
            if f <= 0.05:
                continue
            m = ((y - centre_yx[0]) / (semi_yx[0] * f)) ** 2 + (
                (x - centre_yx[1]) / (semi_yx[1] * f)
            ) ** 2 <= 1.0
            sl = (slice(k, k + 1), slice(None), slice(None))
            self.paint(sl, m[None], hu, code, where)


def _lobar_arteries(cv: _Canvas, hilum_zyx, hu: float) -> None:
    """The pulmonary artery's branches beyond the hilum, tapering into the lung (revision 3).

    Until revision 2 the artery, 24 mm across, ended blind at the hilum: its rounded end, at
    blood density in an unenhanced phantom, was a node-shaped cap that no body has (a
    pulmonary artery divides into lobar arteries that run on into the lung). The branches are
    painted in lung, mediastinal fat and vessel only, never over a node; a node in their way
    is a node touching a vessel."""
    where = (LUNG, FAT_MEDIASTINUM, VESSEL)
    step, radius = INTERLOBAR_ARTERY
    root = np.asarray(hilum_zyx, float) + step
    cv.tube([hilum_zyx, root], radius, hu, VESSEL, where=where)
    for chain in LOBAR_ARTERIES:
        p = root
        for step, radius in chain:
            q = p + step
            cv.tube([p, q], radius, hu, VESSEL, where=where)
            p = q


def _densify(points: np.ndarray, step: float) -> np.ndarray:
    out = [points[0]]
    for a, b in itertools.pairwise(points):
        n = max(1, int(np.linalg.norm(b - a) / step))
        out.extend(a + (b - a) * t for t in np.linspace(0, 1, n + 1)[1:])
    return np.array(out)


def _random_walk(rng, start, n, step, drift, bounds_lo, bounds_hi):
    pts = [np.asarray(start, float)]
    d = np.asarray(drift, float) + rng.normal(0, 0.3, 3)
    for _ in range(n):
        d = 0.7 * d + 0.3 * (np.asarray(drift) + rng.normal(0, 0.8, 3))
        d /= np.linalg.norm(d) + 1e-9
        nxt = np.clip(pts[-1] + d * step, bounds_lo, bounds_hi)
        pts.append(nxt)
    return np.array(pts)


def generate_variety(seed: int, spec: PhantomSpec | None = None) -> Phantom:
    """A domain-randomised phantom: `generate` on `variety_spec(seed)`, or on `spec` if given."""
    return generate(seed, spec or variety_spec(seed))


def generate(seed: int, spec: PhantomSpec | None = None) -> Phantom:
    """Build one phantom; the same seed and spec always give the same phantom."""
    spec = spec or PhantomSpec()
    rng = np.random.default_rng(seed)
    extra = np.random.default_rng((seed, VARIETY_STREAM)) if spec.variety else None
    size = float(extra.uniform(*VARIETY["patient_size"])) if extra is not None else 1.0
    height = spec.slices * spec.slice_spacing_mm
    region = spec.region if spec.region != "auto" else str(rng.choice(["mixed", "mixed", "chest", "abdomen"]))
    # z = 0 at the diaphragm dome; choose where the volume sits relative to it.
    if region == "chest":
        z0 = rng.uniform(5, 40)
    elif region == "abdomen":
        z0 = -height - rng.uniform(0, 40)
    else:
        z0 = -height * rng.uniform(0.3, 0.7)
    affine = phantom_affine(spec, z0)
    n_sub = slab_count(spec)  # painted on n_sub sub-slices per slice, centred in its slab
    cv = _Canvas(*painting_grid(spec, z0))
    zlo, zhi = z0 - 30, z0 + height + 30
    phase = str(rng.choice(list(PHASES)))
    phase = phase if spec.phase == "auto" else spec.phase
    art, ven, organ_enh, node_enh = PHASES[phase]

    # Body wall: fat, muscle ring, ribs.
    A, B = rng.uniform(140, 165) * size, rng.uniform(100, 120) * size
    fat_t, mus_t = rng.uniform(8, 25), rng.uniform(7, 14)
    cy = rng.uniform(-5, 5)
    cv.slab_ellipse((zlo, zhi), (cy, 0), (B, A), -100.0, FAT)
    cv.slab_ellipse((zlo, zhi), (cy, 0), (B - fat_t, A - fat_t), 45.0, MUSCLE)
    Bc, Ac = B - fat_t - mus_t, A - fat_t - mus_t
    cv.slab_ellipse((zlo, zhi), (cy, 0), (Bc, Ac), -100.0, FAT)  # the cavity, refined below
    for side in (-1, 1):  # axillary fat pads in the upper chest, lateral, outside the ribs
        cv.ellipsoid((rng.uniform(60, 110), cy - 5, side * (A - fat_t - 4)), (70, 38, 24), -100.0, FAT_AXILLA)

    # Spine and paraspinal muscles (posterior = +y).
    sy = cy + Bc - 38
    for side in (-1, 1):
        cv.slab_ellipse((zlo, zhi), (sy + 30, side * 30), (18, 20), 50.0, MUSCLE, where=(FAT, MUSCLE))
    cv.slab_ellipse((zlo, zhi), (sy, 0), (18, 20), 700.0, BONE)
    cv.slab_ellipse((zlo, zhi), (sy, 0), (16, 18), 230.0, BONE)
    cv.slab_ellipse((zlo, zhi), (sy + 30, 0), (8, 8), 15.0, ORGAN)
    for zd in np.arange(zlo + rng.uniform(0, 30), zhi, 30.0):
        cv.slab_ellipse((zd, zd + 6), (sy, 0), (18, 20), 85.0, ORGAN)

    # Chest above z = 0: lungs, airway, mediastinal organs and vessels.
    hilum = None
    if zhi > 15:

        def dome(z):
            return float(np.clip(z / 45.0, 0, 1)) ** 0.5

        cv.slab_ellipse((0, zhi), (cy, 0), (Bc, Ac), -100.0, FAT_MEDIASTINUM, where=(FAT,))
        for side in (-1, 1):
            cv.slab_ellipse(
                (0, zhi), (cy + 5, side * Ac * 0.5), (Bc * 0.85, Ac * 0.42), -850.0, LUNG, scale=dome
            )
        for zr in np.arange(zlo + rng.uniform(0, 25), zhi, 25.0):  # ribs: bone arc at the cavity wall
            cv.slab_ellipse((zr, zr + 8), (cy, 0), (Bc + 5, Ac + 5), 550.0, BONE, where=(MUSCLE,))
        heart_z = rng.uniform(25, 60)
        cv.ellipsoid((heart_z, cy - 0.35 * Bc, 18), (45, 48, 58), 40.0, ORGAN)
        cv.ellipsoid((heart_z, cy - 0.35 * Bc, 18), (32, 34, 42), ven, VESSEL)
        carina = heart_z + rng.uniform(40, 60)
        cv.tube([(carina, cy, 0), (zhi, cy - 5, 0)], 9.0, 40.0, AIRWAY)
        cv.tube([(carina, cy, 0), (zhi, cy - 5, 0)], 7.5, -950.0, AIRWAY)
        for side in (-1, 1):
            path = [(carina, cy, 0), (carina - 20, cy + 5, side * 40)]
            cv.tube(path, 6.0, 40.0, AIRWAY, where=(FAT_MEDIASTINUM, LUNG))
            cv.tube(path, 4.5, -950.0, AIRWAY, where=(AIRWAY,))
        oy, ox = sy - 28, rng.uniform(-8, 8)
        cv.tube([(5, oy, ox), (zhi, oy - 3, ox + rng.uniform(-5, 5))], 7.5, 42.0, OESOPHAGUS)
        if rng.random() < 0.5:
            cv.tube([(5, oy, ox), (zhi, oy - 3, ox)], 2.0, -900.0, OESOPHAGUS, where=(OESOPHAGUS,))
        ax, ay = 22 + rng.uniform(-5, 5), sy - 25
        cv.tube([(zlo, ay + 5, 5), (0, ay, ax), (zhi, ay, ax)], 12.0, art, VESSEL)  # descending aorta
        cv.tube([(heart_z + 30, cy - 0.3 * Bc, 5), (zhi, cy - 0.3 * Bc + 10, 5)], 14.0, art, VESSEL)
        hilum = (carina - 5, cy - 0.1 * Bc, 35)
        cv.tube([(heart_z + 20, cy - 0.4 * Bc, 20), hilum], 12.0, ven, VESSEL)  # pulmonary artery
        cv.tube([(heart_z + 20, cy - 0.25 * Bc, -30), (zhi, cy - 0.2 * Bc, -25)], 9.0, ven, VESSEL)
        for _ in range(rng.integers(4, 8)):  # small mediastinal vessels: node-like in cross-section
            start = (max(5.0, zlo), cy + rng.uniform(-0.5, 0.5) * Bc, rng.uniform(-35, 35))
            path = _random_walk(rng, start, 40, 6.0, (1, 0, 0), (0, cy - Bc, -Ac), (zhi, cy + Bc, Ac))
            vessel_hu = float(rng.choice([art, ven, rng.uniform(35, 55)]))
            cv.tube(path, rng.uniform(2.5, 6.5), vessel_hu, VESSEL, where=(FAT_MEDIASTINUM,))
        for _ in range(rng.integers(10, 20)):  # pulmonary vessels
            side = rng.choice([-1, 1])
            start = (rng.uniform(5, zhi), cy, side * 25)
            path = _random_walk(rng, start, 12, 7.0, (0, 0, side), (0, cy - Bc, -Ac), (zhi, cy + Bc, Ac))
            cv.tube(path, rng.uniform(1.0, 3.0), ven, VESSEL, where=(LUNG,))

    # Abdomen below z = 0.
    if zlo < -45:
        cv.slab_ellipse((zlo, 0), (cy, 0), (Bc, Ac), -100.0, FAT_ABDOMEN, where=(FAT,))
        cv.ellipsoid((-60, cy - 10, -55), (80, 0.8 * Bc, 0.55 * Ac), 60.0 + organ_enh, ORGAN)  # liver
        cv.ellipsoid((-50, cy + 0.4 * Bc, 0.6 * Ac), (50, 40, 30), 50.0 + organ_enh, ORGAN)  # spleen
        for side in (-1, 1):
            kz = rng.uniform(-140, -100)
            cv.ellipsoid((kz, sy - 10, side * 68), (55, 33, 26), 35.0 + 3 * organ_enh, ORGAN)
            cv.tube([(-100, sy, side * 35), (zlo, sy - 15, side * 55)], 11.0, 50.0, MUSCLE)  # psoas
        cv.tube([(zlo, sy - 25, 8), (0, sy - 25, 12)], 10.5, art, VESSEL)  # abdominal aorta
        cv.tube([(zlo, sy - 25, -25), (0, sy - 30, -30)], 11.0, ven, VESSEL)  # IVC
        for _ in range(rng.integers(5, 10)):  # bowel loops: wall with fluid, air or oral contrast
            start = (rng.uniform(zlo, -40), cy - rng.uniform(0, 0.6) * Bc, rng.uniform(-0.6, 0.6) * Ac)
            drift = rng.normal(0, 1, 3)
            path = _random_walk(rng, start, 20, 8.0, drift, (zlo, cy - Bc, -Ac), (-20, cy + 0.3 * Bc, Ac))
            r = rng.uniform(7, 14)
            content = float(rng.choice([15.0, -900.0, 220.0, rng.uniform(20, 45)]))
            cv.tube(path, r, 40.0 + organ_enh / 2, BOWEL, where=(FAT_ABDOMEN,))
            cv.tube(path, r - 2.5, content, BOWEL, where=(BOWEL,))
        for _ in range(rng.integers(3, 6)):  # mesenteric vessels
            start = (rng.uniform(zlo, -20), cy - rng.uniform(0, 0.5) * Bc, rng.uniform(-0.5, 0.5) * Ac)
            path = _random_walk(
                rng, start, 25, 6.0, rng.normal(0, 1, 3), (zlo, cy - Bc, -Ac), (0, cy + Bc, Ac)
            )
            cv.tube(
                path,
                rng.uniform(2, 5),
                float(rng.choice([art, ven, 45.0])),
                VESSEL,
                where=(FAT_ABDOMEN,),
            )

    if extra is not None:
        _variety_anatomy(extra, cv, (zlo, zhi), cy, Bc, Ac, sy, (art, ven, organ_enh))

    labels = np.zeros(cv.shape, dtype=np.uint8)
    nodes = _place_nodes(rng, cv, labels, spec, node_enh, extra)
    if hilum is not None:  # painted after the nodes: no random draw and no node moves
        _lobar_arteries(cv, hilum, ven)

    if n_sub > 1:  # each slice the mean of its sub-slices; a node's voxels where it fills half the slab
        cv, labels = _slab_mean(cv, labels, spec, affine, n_sub)

    # Texture, partial-volume blur and correlated noise.
    hu = cv.hu
    fat = np.isin(cv.tissue, FAT_CODES)
    hu += np.where(fat, 1.0, 0.0) * _smooth_noise(rng, cv.shape, 2.0, 8.0)
    lung = cv.tissue == LUNG
    hu += np.where(lung, 1.0, 0.0) * _smooth_noise(rng, cv.shape, 1.5, 40.0)
    if extra is not None and extra.random() < VARIETY["metal_share"]:
        _metal_streaks(extra, cv, hu, sy)
    # along z: none where the sub-slices' mean is the slice profile
    pv_z = 0.0 if n_sub > 1 else 0.7 if spec.slice_spacing_mm <= 1.5 else 0.45
    pv = (pv_z, 0.6, 0.6)
    hu = ndimage.gaussian_filter(hu, pv)
    noise_corr, noise_hu = 0.7, spec.noise_hu
    if extra is not None:  # reconstruction kernel: extra blur or edge enhancement, noise texture
        kernel = str(extra.choice(list(KERNELS)))
        blur_px, sharpen, noise_factor, noise_corr = KERNELS[kernel]
        if blur_px:
            hu = ndimage.gaussian_filter(hu, (0, blur_px, blur_px))
        if sharpen:
            hu = hu + sharpen * (hu - ndimage.gaussian_filter(hu, (0, 1.5, 1.5)))
        noise_hu = float(np.clip(noise_hu * noise_factor * size**2, 5.0, 45.0))
    hu += _smooth_noise(rng, cv.shape, noise_corr, noise_hu)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return Phantom(hu=hu, labels=labels, tissue=cv.tissue, affine=affine, nodes=nodes, seed=seed, phase=phase)


def variety_spec(seed: int, nodes: tuple[int, int] = (5, 12), max_voxels: float = 36e6) -> PhantomSpec:
    """A randomised acquisition for phantom `seed`: pixels 0.5-1 mm, slices 0.6-5 mm, field
    of view 300-400 mm, noise 6-25 HU, with `variety` on; the scan is shortened where the
    grid would exceed `max_voxels`."""
    rng = np.random.default_rng((seed, VARIETY_STREAM, 1))
    ps = float(rng.uniform(*VARIETY["pixel_spacing_mm"]))
    ss = float(
        np.exp(rng.uniform(np.log(VARIETY["slice_spacing_mm"][0]), np.log(VARIETY["slice_spacing_mm"][1])))
    )
    ss = round(ss, 2)
    n = int(rng.uniform(300, 400) / ps)
    slices = int(min(150 / ss, max_voxels / n**2))
    return PhantomSpec(
        rows=n,
        columns=n,
        pixel_spacing_mm=round(ps, 4),
        slices=max(slices, 24),
        slice_spacing_mm=ss,
        nodes=nodes,
        noise_hu=round(float(rng.uniform(*VARIETY["noise_hu"])), 2),
        variety=True,
    )


def _variety_anatomy(rng, cv: _Canvas, z_range, cy, Bc, Ac, sy, blood) -> None:
    """The extra anatomy of `PhantomSpec.variety` (look-alikes the training family lacked)."""
    zlo, zhi = z_range
    art, ven, organ_enh = blood
    v = VARIETY
    if zlo < -45:  # abdomen: wide bowel loops, ureters, adrenals
        for _ in range(int(rng.integers(v["bowel_loops"][0], v["bowel_loops"][1] + 1))):
            start = (rng.uniform(zlo, -40), cy - rng.uniform(0.1, 0.6) * Bc, rng.uniform(-0.5, 0.5) * Ac)
            drift = rng.normal(0, 1, 3)
            if rng.random() < 0.5:
                drift[0] = 3.0 * np.sign(drift[0] or 1.0)  # along z: a ring on axial images
            path = _random_walk(rng, start, 8, 9.0, drift, (zlo, cy - Bc, -Ac), (-20, cy + 0.3 * Bc, Ac))
            r = rng.uniform(*v["bowel_radius_mm"])
            wall = rng.uniform(*v["bowel_wall_mm"])
            content = float(
                rng.choice([rng.uniform(-5, 20), rng.uniform(-5, 20), -900.0, rng.uniform(150, 400)])
            )
            cv.tube(path, r, 40.0 + organ_enh / 2 + rng.uniform(-8, 8), BOWEL, where=(FAT_ABDOMEN,))
            cv.tube(path, r - wall, content, BOWEL, where=(BOWEL,))
        for side in (-1, 1):
            kz = rng.uniform(-140, -100)
            ureter = [(kz, sy - 15, side * 50), (kz - 60, sy - 25, side * 45), (zlo, sy - 35, side * 42)]
            cv.tube(ureter, rng.uniform(2.0, 3.5), rng.uniform(*v["ureter_hu"]), ORGAN, where=(FAT_ABDOMEN,))
            top = (rng.uniform(-70, -45), sy - 30, side * 38)
            for limb in (-1, 1):
                end = (top[0] - 22, top[1] + 8, top[2] + limb * 9)
                cv.tube(
                    [top, end],
                    rng.uniform(1.8, 3.0),
                    rng.uniform(*v["adrenal_hu"]),
                    ORGAN,
                    where=(FAT_ABDOMEN,),
                )
    if zlo < 15 and zhi > -70:  # diaphragmatic crura beside the aorta
        for side in (-1, 1):
            path = [
                (20, sy - 32, 10 + side * 16),
                (-30, sy - 22, 10 + side * 13),
                (-75, sy - 12, 10 + side * 10),
            ]
            cv.tube(path, rng.uniform(3.0, 5.0), rng.uniform(*v["crus_hu"]), MUSCLE, where=FAT_CODES)
    for _ in range(int(rng.integers(v["vessels"][0], v["vessels"][1] + 1))):  # every orientation
        start = (rng.uniform(zlo, zhi), cy + rng.uniform(-0.6, 0.5) * Bc, rng.uniform(-0.5, 0.5) * Ac)
        drift = rng.normal(0, 1, 3)
        if rng.random() < 0.4:
            drift[0] = 0.0  # lying in the axial plane
        path = _random_walk(rng, start, 12, 6.0, drift, (zlo, cy - Bc, -Ac), (zhi, cy + Bc, Ac))
        hu = float(rng.choice([art, ven, rng.uniform(*v["unenhanced_vessel_hu"])]))
        cv.tube(path, rng.uniform(*v["vessel_radius_mm"]), hu, VESSEL, where=(FAT_MEDIASTINUM, FAT_ABDOMEN))


def _metal_streaks(rng, cv: _Canvas, hu: np.ndarray, sy: float) -> None:
    """A metal object beside the spine and the bright and dark streaks it throws in plane."""
    k = int(rng.integers(0, cv.shape[0]))
    zc = cv.origin[0] + k * cv.spacing[0]
    centre = (zc, sy + rng.uniform(-5, 5), float(rng.choice([-14.0, 14.0])))
    sl, mask = cv.ellipsoid(centre, (rng.uniform(5, 12), 3.0, 3.0), 3000.0, BONE)
    if sl is None:
        return
    hu[sl][mask] = 3000.0
    y = cv.origin[1] + np.arange(cv.shape[1])[:, None] * cv.spacing[1] - centre[1]
    x = cv.origin[2] + np.arange(cv.shape[2])[None, :] * cv.spacing[2] - centre[2]
    theta, r = np.arctan2(y, x), np.hypot(y, x)
    streaks = np.zeros(theta.shape, np.float32)
    for _ in range(int(rng.integers(8, 20))):
        ang = np.angle(np.exp(1j * (theta - rng.uniform(-np.pi, np.pi))))
        streaks += rng.uniform(-300, 250) * np.exp(-0.5 * (ang / 0.015) ** 2) / (1 + r / 35.0)
    ks = slice(max(0, k - int(10 / cv.spacing[0])), min(cv.shape[0], k + int(10 / cv.spacing[0]) + 1))
    body = cv.tissue[ks] != AIR
    hu[ks] += np.where(body, streaks[None], 0.0)


def _smooth_noise(rng, shape, sigma, std):
    n = rng.standard_normal(shape, dtype=np.float32)
    n = ndimage.gaussian_filter(n, sigma)
    return n * (std / (n.std() + 1e-6))


def _place_nodes(rng, cv: _Canvas, labels: np.ndarray, spec: PhantomSpec, node_enh: float, extra=None):
    count = int(rng.integers(spec.nodes[0], spec.nodes[1] + 1))
    # variety: the last node's centre and half long axis, for a neighbour beside it (a cluster)
    near: tuple[np.ndarray, float] | None = None
    pools = {name: np.flatnonzero(cv.tissue == code) for name, code in STATIONS.items()}
    pools = {k: v for k, v in pools.items() if v.size > 2000}
    names = list(pools)
    weights = np.array([{"mediastinal": 3, "axillary": 1, "abdominal": 3}[n] for n in names], float)
    nodes: list[NodeTruth] = []
    occupied = np.zeros(cv.shape, dtype=bool)
    for _ in range(count):
        for _attempt in range(60):
            sa = float(np.exp(rng.uniform(math.log(4.0), math.log(35.0))))
            ratio = float(rng.choice([rng.uniform(0.8, 1.0), rng.uniform(0.4, 0.8)]))
            touching = False
            if extra is not None:
                if extra.random() < VARIETY["elongated_share"]:
                    ratio = float(extra.uniform(1 / 3, 0.45))  # long/short up to 3
                touching = bool(extra.random() < VARIETY["touching_share"])
            la = min(sa / ratio, 55.0)
            ratio = sa / la
            zext = rng.uniform(sa, la) if la > sa else sa
            station = str(rng.choice(names, p=weights / weights.sum()))
            idx = np.unravel_index(rng.choice(pools[station]), cv.shape)
            centre = cv.origin + np.array(idx) * cv.spacing
            semi = np.array([zext / 2, sa / 2, la / 2])
            if near is not None:  # a cluster: beside the last node, a few mm apart
                d = extra.normal(0, 1, 3)
                d[0] *= 0.4
                centre = near[0] + d / np.linalg.norm(d) * (near[1] + la / 2 + extra.uniform(2, 5))
            rot = rng.uniform(0, math.pi)
            box = cv.axes_mm(centre - semi.max() - 2, centre + semi.max() + 2)
            if box is None:
                continue
            sl, (z, y, x) = box
            dx, dy = x - centre[2], y - centre[1]
            u = dx * math.cos(rot) + dy * math.sin(rot)
            v = -dx * math.sin(rot) + dy * math.cos(rot)
            q = ((z - centre[0]) / semi[0]) ** 2 + (v / semi[1]) ** 2 + (u / semi[2]) ** 2
            inner, halo = q <= 1.0, q <= 1.6
            full = np.prod([s.stop - s.start for s in sl]) == inner.size and inner.any()
            if not full or _touches_edge(sl, cv.shape):
                continue
            fat_needed = 0.7 if touching else 0.9  # variety: some nodes touch a vessel or organ
            if occupied[sl][halo].any() or np.isin(cv.tissue[sl][inner], FAT_CODES).mean() < fat_needed:
                continue
            if touching and np.isin(cv.tissue[sl][inner], (LUNG, AIRWAY, BONE)).any():
                continue
            necrosis = sa >= 8 and rng.random() < 0.3
            hilum = sa >= 7 and not necrosis and rng.random() < 0.4
            round_ = ratio >= 0.8
            base = rng.uniform(30, 55) + node_enh
            tex = _smooth_noise(rng, inner.shape, 1.5, 6.0)
            value = base + tex
            if necrosis:
                f = rng.uniform(0.45, 0.65)
                value = np.where(q <= f * f, rng.uniform(5, 18) + tex * 0.5, value)
            if hilum:
                ang = rng.uniform(0, 2 * math.pi)
                hu_, hv = 0.75 * semi[2] * math.cos(ang), 0.75 * semi[1] * math.sin(ang)
                hq = (
                    ((z - centre[0]) / (0.6 * semi[0])) ** 2
                    + ((u - hu_) / (0.55 * semi[2])) ** 2
                    + ((v - hv) / (0.55 * semi[1])) ** 2
                )
                value = np.where(hq <= 1.0, -90.0 + tex, value)
            cv.hu[sl][inner] = value[inner]
            cv.tissue[sl][inner] = NODE
            occupied[sl] |= halo
            labels[sl][inner] = len(nodes) + 1
            score = criterion_score(sa, round_, necrosis, hilum)
            mal = score >= 2
            noisy = (not mal) if rng.random() < spec.label_noise else mal
            lps = (float(centre[2]), float(centre[1]), float(centre[0]))
            nodes.append(
                NodeTruth(
                    index=len(nodes) + 1,
                    station=station,
                    centre_lps_mm=(round(lps[0], 3), round(lps[1], 3), round(lps[2], 3)),
                    semi_axes_mm=(round(la / 2, 3), round(sa / 2, 3), round(zext / 2, 3)),
                    rotation_deg=round(math.degrees(rot), 3),
                    short_axis_mm=round(sa, 3),
                    long_axis_mm=round(la, 3),
                    volume_mm3=round(4 / 3 * math.pi * semi.prod(), 2),
                    round=round_,
                    necrosis=necrosis,
                    fatty_hilum=hilum,
                    score=score,
                    malignant_criterion=mal,
                    malignant=noisy,
                )
            )
            near = None
            if extra is not None and extra.random() < VARIETY["cluster_share"]:
                near = (centre, la / 2)
            break
        else:
            near = None
    return nodes


def _slab_mean(fine: _Canvas, labels: np.ndarray, spec: PhantomSpec, affine: np.ndarray, n: int):
    """The canvas of `spec`'s slices from one painted on `n` sub-slices each: the image their
    mean, the tissue the middle sub-slice's (of an even count, the upper of the two), a node's
    label where it fills at least half of them (of two nodes filling half, the first)."""
    k, rows, cols = spec.slices, spec.rows, spec.columns
    cv = _Canvas(spec, affine)
    cv.hu = fine.hu.reshape(k, n, rows, cols).mean(axis=1, dtype=np.float32)
    cv.tissue = np.ascontiguousarray(fine.tissue[n // 2 :: n])
    thick = np.zeros((k, rows, cols), dtype=np.uint8)
    filled = np.zeros((k, rows, cols), dtype=np.int16)  # sub-slices of the node kept there
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        zs = slice(box[0].start // n, -(-box[0].stop // n))
        part = labels[zs.start * n : zs.stop * n, box[1], box[2]]
        count = (part == index).reshape(zs.stop - zs.start, n, *part.shape[1:]).sum(axis=1)
        where = (zs, box[1], box[2])
        take = (2 * count >= n) & (count > filled[where])
        thick[where][take] = index
        filled[where][take] = count[take]
    return cv, thick


def _touches_edge(sl, shape) -> bool:
    return any(s.start == 0 or s.stop == n for s, n in zip(sl, shape, strict=True))


def write_phantom(phantom: Phantom, out_dir: Path, **series_kwargs) -> list[Path]:
    """Write the phantom as a DICOM CT series plus `ground_truth.json` (and the label map)."""
    from inference.ct_series import write_ct_series

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series_kwargs.setdefault("uid_seed", f"nodal-phantom-{phantom.seed}")
    series_kwargs.setdefault("series_description", f"Phantom CT seed {phantom.seed} ({phantom.phase})")
    paths = write_ct_series(phantom.hu, phantom.affine, out_dir, **series_kwargs)
    (out_dir / "ground_truth.json").write_text(json.dumps(phantom.ground_truth(), indent=2))
    np.savez_compressed(out_dir / "labels.npz", labels=phantom.labels, affine=phantom.affine)
    return paths
