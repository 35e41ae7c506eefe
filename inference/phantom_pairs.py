"""Follow-up phantoms: the same patient scanned again, with known motion and node changes.

`make_pair(seed)` takes the phantom of `seed` (`inference.phantoms.generate`, unchanged) as
the prior study and builds a follow-up of the same patient:

* the anatomy is the prior's, regenerated without its acquisition noise (the same seed with
  ``noise_hu=0`` draws the same anatomy: the noise is the generator's last random draw);
* nodes change by known amounts: each chosen node's ellipsoid is scaled about its centre
  (grown, shrunk) or removed (resolved), and new nodes are placed in free fat;
* the patient is re-positioned: a rigid motion (shift up to `MAX_SHIFT_MM`, rotation up to
  `MAX_ROTATION_DEG` about the vertical axis and `MAX_TILT_DEG` about the others) about the
  centre of the volume, sampled on the prior's scanner grid;
* new acquisition noise, from its own random stream.

The truth (`PhantomPair.nodes`) says which prior node is which follow-up node, their true
short and long axes at both times, and where each lies; `truth_response` is the RECIST 1.1
response of those true sizes. Scenarios (`SCENARIOS`) steer the changes towards a response.
The prior phantom itself is exactly `phantoms.generate(seed, spec)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from inference import phantoms, rules
from inference.followup import response
from inference.measure import axial_diameters
from inference.phantoms import FAT_CODES, NODE, STATIONS, Phantom, PhantomSpec

PAIR_STREAM = 0x50414952  # "PAIR": the follow-up's random stream is (seed, PAIR_STREAM, scenario)
MAX_SHIFT_MM = 20.0
MAX_Z_SHIFT_MM = 8.0
MAX_ROTATION_DEG = 5.0
MAX_TILT_DEG = 2.0
MIN_SHORT_AXIS_MM = 4.0  # a node shrunk below this is resolved (gone)
HALO = 1.3  # a changed node keeps out of the others' way: no other node within 1.3^0.5 x its axes
#: scenario -> what happens to the nodes (docs/model.md, "Follow-up pairs")
SCENARIOS = ("progression", "partial-response", "stable", "complete-response", "new-node", "mixed")

MATCHED, NEW, GONE = "matched", "new", "gone"


@dataclass(frozen=True)
class NodeFate:
    """One node of the pair, with its truth at both times (None where absent)."""

    status: str  # MATCHED | NEW | GONE
    prior_index: int | None  # value in the prior label map
    current_index: int | None  # value in the follow-up label map
    scale: float | None  # current axes / prior axes (matched nodes)
    prior_centre_lps_mm: tuple[float, float, float] | None
    current_centre_lps_mm: tuple[float, float, float] | None
    short_axis_mm_prior: float | None
    short_axis_mm_current: float | None
    long_axis_mm_prior: float | None
    long_axis_mm_current: float | None

    @property
    def short_axis_change_mm(self) -> float | None:
        if self.short_axis_mm_prior is None or self.short_axis_mm_current is None:
            return None
        return self.short_axis_mm_current - self.short_axis_mm_prior


@dataclass
class PhantomPair:
    prior: Phantom
    current: Phantom  # its `nodes` describe the follow-up's nodes (centres after the motion)
    motion: np.ndarray = field(repr=False)  # 4x4: prior LPS -> current LPS
    nodes: list[NodeFate]
    scenario: str

    def truth_response(self) -> response.ResponseSummary:
        """RECIST 1.1 / Lugano of the true sizes (the nodes that stay in view), by the
        comparison's rules: a prior node cut by the edge of the prior scan is no target; a
        node cut by the edge of the follow-up scan counts the size of its part in view
        (measured as a reader would, on its largest axial slice) and is not evaluable."""
        sizes = []
        for i, n in enumerate(self.nodes):
            cut_now = n.current_index is not None and self.current_at_scan_edge(n.current_index)
            sa_now, la_now = n.short_axis_mm_current, n.long_axis_mm_current
            if cut_now:
                sa_now, la_now = self.current_in_view_axes(n.current_index)  # type: ignore[arg-type]
            sizes.append(
                response.NodeSizes(
                    key=f"truth-{i}",
                    sa_prior=n.short_axis_mm_prior,
                    la_prior=n.long_axis_mm_prior,
                    sa_current=sa_now,
                    la_current=la_now,
                    at_scan_edge=n.prior_index is not None and self.prior_at_scan_edge(n.prior_index),
                    at_scan_edge_now=cut_now,
                )
            )
        return response.assess(sizes)

    def prior_at_scan_edge(self, index: int) -> bool:
        """Whether prior node `index` reaches the edge of the prior scan (`rules.touches_edge`)."""
        mask = self.prior.labels == index
        return rules.touches_edge(mask, (0, 0, 0), mask.shape, mask.shape)

    def current_at_scan_edge(self, index: int) -> bool:
        """Whether follow-up node `index` reaches the edge of the follow-up scan."""
        mask = self.current.labels == index
        return rules.touches_edge(mask, (0, 0, 0), mask.shape, mask.shape)

    def current_in_view_axes(self, index: int) -> tuple[float, float]:
        """(short, long) axis in mm of the part of follow-up node `index` in the scan, on the
        axial slice where it is largest (`inference.measure.axial_diameters`)."""
        return _in_view_axes(self.current, index)

    def true_short_axis_change_mm(self, fate: NodeFate) -> float | None:
        """The true short-axis change of a node in both scans as the comparison measures it:
        where a scan's edge cuts the node, its short axis there is that of its part in view
        (`current_in_view_axes`, and the same on the prior scan). None for a new or gone node."""
        prior, current = fate.short_axis_mm_prior, fate.short_axis_mm_current
        if fate.prior_index is None or fate.current_index is None or prior is None or current is None:
            return None
        if self.prior_at_scan_edge(fate.prior_index):
            prior = _in_view_axes(self.prior, fate.prior_index)[0]
        if self.current_at_scan_edge(fate.current_index):
            current = _in_view_axes(self.current, fate.current_index)[0]
        return current - prior


def _in_view_axes(phantom: Phantom, index: int) -> tuple[float, float]:
    """(short, long) axis in mm of what the scan of `phantom` holds of node `index`, on the
    axial slice where it is largest; 0 where that is too small to have a contour."""
    mask = phantom.labels == index
    key = int(np.argmax(mask.sum(axis=(1, 2))))
    spacing = np.linalg.norm(phantom.affine[:3, :3], axis=0)
    try:
        d = axial_diameters(mask[key].astype(np.float32), (float(spacing[1]), float(spacing[2])))
    except ValueError:  # a part of a voxel or two has no contour: nothing measurable in view
        return 0.0, 0.0
    return d.short_mm, d.long_mm


def make_pair(seed: int, scenario: str, spec: PhantomSpec | None = None) -> PhantomPair:
    """The prior phantom of `seed` and its follow-up under `scenario` (one of `SCENARIOS`)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {', '.join(SCENARIOS)}")
    spec = spec or PhantomSpec()
    if spec.variety:
        raise ValueError("follow-up pairs are made from phantoms without `variety` (its noise has a floor)")
    prior = phantoms.generate(seed, spec)
    clean = phantoms.generate(seed, replace(spec, noise_hu=0.0))
    if not np.array_equal(clean.labels, prior.labels):
        raise RuntimeError("the noiseless regeneration drew different anatomy; the generator changed")
    rng = np.random.default_rng((seed, PAIR_STREAM, SCENARIOS.index(scenario)))
    hu = clean.hu.astype(np.float32)
    labels = clean.labels.copy()
    tissue = clean.tissue.copy()
    sigma = (0.7, 0.6, 0.6) if spec.slice_spacing_mm <= 1.5 else (0.45, 0.6, 0.6)
    scales = _scales(rng, scenario, prior.nodes)
    current_nodes: dict[int, phantoms.NodeTruth] = {}
    for node in sorted(prior.nodes, key=lambda n: -n.short_axis_mm):  # the largest grow first
        s = scales[node.index]
        _erase(hu, labels, tissue, prior.affine, node, sigma)
        if s * node.short_axis_mm < MIN_SHORT_AXIS_MM:
            continue
        # a shrunk node fits where it was; where there is no room to grow that much, the
        # node grows less (down to its old size)
        tries = np.linspace(s, 1.0, 6) if s > 1 else ()
        for tried in tries:
            grown = _scaled(node, float(tried))
            if _paint(hu, labels, tissue, prior.affine, grown, node.index, sigma, rng):
                break
        else:
            grown = _scaled(node, min(s, 1.0))
            _paint(hu, labels, tissue, prior.affine, grown, node.index, sigma, rng, check=False)
        current_nodes[node.index] = grown
    new_nodes = _new_nodes(rng, scenario, hu, labels, tissue, prior.affine, sigma, len(prior.nodes))
    everyone = [*current_nodes.values(), *new_nodes]
    for attempt in range(50):  # re-position so that every node stays whole in the field of view
        motion = random_motion(rng, prior.affine, hu.shape, 0.9**attempt)
        first, stop = covered_slices(motion, prior.affine, hu.shape)
        affine = prior.affine.copy()
        affine[:3, 3] += first * prior.affine[:3, 0]
        shape = (stop - first, *hu.shape[1:])
        if stop - first >= hu.shape[0] // 2 and all(_in_view(n, motion, affine, shape) for n in everyone):
            break
    hu, labels = move_patient(hu, labels, prior.affine, motion, range(first, stop))
    hu += phantoms._smooth_noise(rng, hu.shape, 0.7, spec.noise_hu)  # new acquisition noise
    hu_i16 = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    fates = []
    for node in prior.nodes:
        now = current_nodes.get(node.index)
        fates.append(_fate(node, now, motion, labels))
    fates.extend(_fate(None, n, motion, labels) for n in new_nodes)
    moved_truth = [_moved_truth(n, motion) for n in [*current_nodes.values(), *new_nodes]]
    current = Phantom(
        hu=hu_i16,
        labels=labels,
        tissue=tissue,  # on the prior grid, not moved nor cut: kept for painting only
        affine=affine,
        nodes=moved_truth,
        seed=seed,
        phase=prior.phase,
    )
    return PhantomPair(prior=prior, current=current, motion=motion, nodes=fates, scenario=scenario)


def _scales(rng, scenario: str, nodes: list[phantoms.NodeTruth]) -> dict[int, float]:
    """Axis scale of each prior node under `scenario` (0 = resolved)."""
    out = {}
    ranked = sorted(nodes, key=lambda n: -n.short_axis_mm)
    targets = {n.index for n in ranked[: response.MAX_TARGET_NODES] if n.short_axis_mm >= 15}
    for n in nodes:
        if scenario == "progression":  # every pathological node grows well past +20 %
            s = (
                rng.uniform(1.35, 1.6)
                if n.index in targets or n.short_axis_mm >= 10
                else rng.uniform(0.95, 1.2)
            )
        elif scenario == "partial-response":
            s = rng.uniform(0.45, 0.6)
        elif scenario == "complete-response":
            s = min(rng.uniform(0.5, 0.8), 8.0 / n.short_axis_mm)  # every node < 10 mm, some gone
        elif scenario == "mixed":
            s = float(rng.choice([0.0, rng.uniform(0.6, 0.8), rng.uniform(1.1, 1.3)]))
        else:  # stable, new-node
            s = rng.uniform(0.92, 1.08)
        out[n.index] = float(s)
    return out


def _scaled(node: phantoms.NodeTruth, s: float) -> phantoms.NodeTruth:
    semi = tuple(round(a * s, 3) for a in node.semi_axes_mm)
    return replace(
        node,
        semi_axes_mm=semi,  # type: ignore[arg-type]
        short_axis_mm=round(node.short_axis_mm * s, 3),
        long_axis_mm=round(node.long_axis_mm * s, 3),
        volume_mm3=round(4 / 3 * math.pi * float(np.prod(semi)), 2),
    )


def _grid(affine: np.ndarray, shape, centre_lps, reach_mm: float):
    """Index box around `centre_lps` (+- reach) and the mm offsets (z, y, x) of its voxels."""
    spacing = np.array([affine[2, 0], affine[1, 1], affine[0, 2]])
    origin = np.array([affine[2, 3], affine[1, 3], affine[0, 3]])
    c = np.array([centre_lps[2], centre_lps[1], centre_lps[0]])
    lo = np.clip(np.floor((c - reach_mm - origin) / spacing).astype(int), 0, shape)
    hi = np.clip(np.ceil((c + reach_mm - origin) / spacing).astype(int) + 1, 0, shape)
    if np.any(hi <= lo):
        return None
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    z, y, x = (origin[d] + np.arange(lo[d], hi[d]) * spacing[d] - c[d] for d in range(3))
    return sl, np.meshgrid(z, y, x, indexing="ij", sparse=True), lo, hi


def _quadric(node: phantoms.NodeTruth, zyx) -> np.ndarray:
    z, y, x = zyx
    rot = math.radians(node.rotation_deg)
    u = x * math.cos(rot) + y * math.sin(rot)
    v = -x * math.sin(rot) + y * math.cos(rot)
    a, b, c = node.semi_axes_mm  # long (u), short (v), z
    return (z / c) ** 2 + (v / b) ** 2 + (u / a) ** 2


def _blend(hu: np.ndarray, sl, target: np.ndarray, sigma) -> None:
    """Put `target` (sharp) into `hu` with the generator's partial-volume blur on the change."""
    hu[sl] += ndimage.gaussian_filter(target - hu[sl], sigma)


def _erase(hu, labels, tissue, affine, node: phantoms.NodeTruth, sigma) -> None:
    """Replace the node by the fat around it."""
    box = _grid(affine, hu.shape, node.centre_lps_mm, max(node.semi_axes_mm) + 6.0)
    assert box is not None
    sl = box[0]
    own = labels[sl] == node.index
    near_fat = np.isin(tissue[sl], FAT_CODES)
    fat = float(np.median(hu[sl][near_fat])) if near_fat.any() else -100.0
    grown = ndimage.binary_dilation(own, iterations=1)
    target = hu[sl].copy()
    target[grown & ~near_fat | own] = fat
    _blend(hu, sl, target, sigma)
    labels[sl][own] = 0
    tissue[sl][own] = phantoms.FAT


def _paint(
    hu, labels, tissue, affine, node: phantoms.NodeTruth, index: int, sigma, rng, *, check: bool = True
) -> bool:
    """Paint `node` as label `index`; False (nothing painted) where it does not lie in free fat
    (`check`: a shrunk node or one at its old size always fits where it was)."""
    box = _grid(affine, hu.shape, node.centre_lps_mm, max(node.semi_axes_mm) + 4.0)
    if box is None:
        return False
    sl, zyx, lo, hi = box
    q = _quadric(node, zyx)
    inner, halo = q <= 1.0, q <= HALO
    if not inner.any():
        return False
    if check and rules.touches_edge(inner, lo, hi, hu.shape):
        return False
    if check and (np.isin(tissue[sl][inner], FAT_CODES).mean() < 0.9 or (labels[sl][halo] != 0).any()):
        return False
    value = rng.uniform(35, 55) + phantoms._smooth_noise(rng, inner.shape, 1.5, 6.0)
    target = hu[sl].copy()
    target[inner] = value[inner]
    _blend(hu, sl, target, sigma)
    labels[sl][inner] = index
    tissue[sl][inner] = NODE
    return True


def _new_nodes(rng, scenario, hu, labels, tissue, affine, sigma, first_index) -> list[phantoms.NodeTruth]:
    wanted = {"new-node": [rng.uniform(17, 24)], "mixed": [rng.uniform(11, 14)]}.get(scenario, [])
    pools = {name: np.flatnonzero(tissue == code) for name, code in STATIONS.items()}
    pools = {k: v for k, v in pools.items() if v.size > 2000}
    spacing = np.array([affine[2, 0], affine[1, 1], affine[0, 2]])
    origin = np.array([affine[2, 3], affine[1, 3], affine[0, 3]])
    out: list[phantoms.NodeTruth] = []
    for sa in wanted:
        la = sa / rng.uniform(0.75, 1.0)
        for _attempt in range(200):
            station = str(rng.choice(sorted(pools)))
            zyx = origin + np.array(np.unravel_index(rng.choice(pools[station]), hu.shape)) * spacing
            node = phantoms.NodeTruth(
                index=first_index + len(out) + 1,
                station=station,
                centre_lps_mm=(round(zyx[2], 3), round(zyx[1], 3), round(zyx[0], 3)),
                semi_axes_mm=(round(la / 2, 3), round(sa / 2, 3), round(rng.uniform(sa, la) / 2, 3)),
                rotation_deg=round(float(rng.uniform(0, 180)), 3),
                short_axis_mm=round(sa, 3),
                long_axis_mm=round(la, 3),
                volume_mm3=0.0,
                round=sa / la >= 0.8,
                necrosis=False,
                fatty_hilum=False,
                score=phantoms.criterion_score(sa, sa / la >= 0.8, False, False),
                malignant_criterion=True,
                malignant=True,
            )
            node = replace(node, volume_mm3=round(4 / 3 * math.pi * float(np.prod(node.semi_axes_mm)), 2))
            far = _grid(affine, hu.shape, node.centre_lps_mm, max(node.semi_axes_mm) + 10.0)
            if far is None or (labels[far[0]] != 0).any():
                continue
            if _paint(hu, labels, tissue, affine, node, node.index, sigma, rng):
                out.append(node)
                break
    return out


def _in_view(node: phantoms.NodeTruth, motion: np.ndarray, affine: np.ndarray, shape) -> bool:
    """Whether the node's bounding sphere, moved, lies inside the volume (one voxel inside)."""
    centre = motion[:3, :3] @ np.asarray(node.centre_lps_mm) + motion[:3, 3]
    kji = np.linalg.solve(affine[:3, :3], centre - affine[:3, 3])
    reach = max(node.semi_axes_mm) / np.linalg.norm(affine[:3, :3], axis=0) + 1
    return bool(np.all(kji - reach >= 0) and np.all(kji + reach <= np.asarray(shape) - 1))


def random_motion(rng, affine: np.ndarray, shape, factor: float = 1.0) -> np.ndarray:
    """Rigid prior -> current LPS: rotation about the volume's centre, then a shift
    (`factor` scales both down when a node would leave the field of view)."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    shift = direction * rng.uniform(0.5, 1.0) * MAX_SHIFT_MM * factor
    shift[2] = np.clip(shift[2], -MAX_Z_SHIFT_MM, MAX_Z_SHIFT_MM)
    angles = (
        rng.uniform(-MAX_TILT_DEG, MAX_TILT_DEG),
        rng.uniform(-MAX_TILT_DEG, MAX_TILT_DEG),
        rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG),
    )
    angles = tuple(a * factor for a in angles)
    r = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    centre = affine[:3, :3] @ ((np.asarray(shape, float) - 1) / 2) + affine[:3, 3]
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = centre - r @ centre + shift
    return m


def covered_slices(motion: np.ndarray, affine: np.ndarray, shape) -> tuple[int, int]:
    """The slices [first, stop) of the scanner grid that the moved patient fills entirely
    from inside the prior volume (the follow-up is cut to them: nothing is made up beyond
    the prior's first and last slice)."""
    back = np.linalg.inv(affine) @ np.linalg.inv(motion) @ affine  # current voxel -> prior voxel
    rows, cols = shape[1] - 1, shape[2] - 1
    corners = np.array([(0, 0), (0, cols), (rows, 0), (rows, cols)], float)
    inside = []
    for k in range(shape[0]):
        kji = np.column_stack([np.full(4, k), corners])
        src_k = kji @ back[0, :3] + back[0, 3]
        inside.append(src_k.min() >= 0 and src_k.max() <= shape[0] - 1)
    covered = np.flatnonzero(inside)
    if covered.size == 0:
        return 0, 0
    return int(covered[0]), int(covered[-1]) + 1


def move_patient(
    hu: np.ndarray, labels: np.ndarray, affine: np.ndarray, motion: np.ndarray, slices: range | None = None
):
    """The patient moved by `motion`, seen on the same scanner grid (slice by slice), on
    `slices` of it (all by default)."""
    back = np.linalg.inv(affine) @ np.linalg.inv(motion) @ affine  # current voxel -> prior voxel
    slices = range(hu.shape[0]) if slices is None else slices
    _, rows, cols = hu.shape
    out_hu = np.empty((len(slices), rows, cols), hu.dtype)
    out_labels = np.empty((len(slices), rows, cols), labels.dtype)
    jj, ii = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    for n, k in enumerate(slices):
        kji = np.stack([np.full(jj.shape, k), jj, ii]).reshape(3, -1).astype(float)
        src = back[:3, :3] @ kji + back[:3, 3:4]
        out_hu[n] = ndimage.map_coordinates(hu, src, order=1, mode="nearest").reshape(jj.shape)
        out_labels[n] = ndimage.map_coordinates(labels, src, order=0, mode="constant").reshape(jj.shape)
    return out_hu, out_labels


def _moved_truth(node: phantoms.NodeTruth, motion: np.ndarray) -> phantoms.NodeTruth:
    c = motion[:3, :3] @ np.asarray(node.centre_lps_mm) + motion[:3, 3]
    return replace(node, centre_lps_mm=(round(c[0], 3), round(c[1], 3), round(c[2], 3)))


def _fate(prior: phantoms.NodeTruth | None, now: phantoms.NodeTruth | None, motion, labels) -> NodeFate:
    if now is not None and not (labels == now.index).any():
        now = None  # moved out of the field of view
    status = MATCHED if prior is not None and now is not None else NEW if prior is None else GONE
    moved = None if now is None else _moved_truth(now, motion).centre_lps_mm
    return NodeFate(
        status=status,
        prior_index=None if prior is None else prior.index,
        current_index=None if now is None else now.index,
        scale=None if prior is None or now is None else now.short_axis_mm / prior.short_axis_mm,
        prior_centre_lps_mm=None if prior is None else prior.centre_lps_mm,
        current_centre_lps_mm=moved,
        short_axis_mm_prior=None if prior is None else prior.short_axis_mm,
        short_axis_mm_current=None if now is None else now.short_axis_mm,
        long_axis_mm_prior=None if prior is None else prior.long_axis_mm,
        long_axis_mm_current=None if now is None else now.long_axis_mm,
    )
