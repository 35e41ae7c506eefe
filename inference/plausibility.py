"""Plausibility: could a measured candidate be a lymph node at all? (issue 15)

The verifier (`inference.verify`) is a model fitted on candidates of the training family.
These rules are not fitted: each one states what a lymph node cannot look like, with its
threshold taken from anatomy (docs/model.md, notes on lymph nodes) or from the ranges of
the training family, never from the held-out family. A candidate breaking any enabled
rule is dropped.

Rules (a lymph node does not ...):

* `size`: have a short axis above `max_short_axis_mm` (100 mm: bulky nodal disease reaches
  10 cm, so only what no node can be);
* `elongation`: have a long/short axis ratio above `max_elongation` on its key slice;
* `density`: have a mean above `max_mean_hu` (contrast-filled vessel, oral contrast, bone);
* `gas`: contain gas (more than `max_gas_share` of its voxels below `gas_hu`);
* `fluid`: consist mostly of fluid when large (short axis from `fluid_min_short_axis_mm`,
  more than `max_fluid_share` of its voxels in `fluid_hu` on the image smoothed 1 mm in
  plane): a fluid-filled bowel loop or a cyst inside a thin wall, not a node with a
  necrotic centre (a core within a thick rim);
* `tube_z`: continue above and below itself: tissue of its own density in its central
  footprint `tube_mm` beyond both its ends (share >= `tube_share`) is a vessel, the
  oesophagus, a crus or a ureter cut across;
* `tube_inplane`: continue beyond both ends of its long axis on its key slice (a vessel or
  a bowel loop lying in the plane);
* `no_fat`: lie without fat around it (less than `min_shell_fat` of a 1-3 mm shell below
  -30 HU);
* `tube_path`: be a piece of a tube: its longest path inside itself (a curve allowed,
  across slices) more than `max_path_thickness` times its thickness (twice the radius of
  the largest ball inside it). A node is at most about 3 times as long as thick; a bowel
  loop or vessel running obliquely or curving through the slices, which `elongation`
  (key slice only), `tube_z` and `tube_inplane` (straight continuation only) miss, is
  longer. Large candidates are measured on a grid of at most `path_max_voxels` voxels.

The rules and their thresholds live in the model card (`plausibility`), so a model and
the rules it was measured with travel together; `inference.plausibility: false` in the
configuration turns them off, and a rule set to `null` in the card is skipped. A rule
that the card's `rules` does not name is off: a rule added later changes no older model's
findings unmeasured. The shipped card names `tube_path` and `tube_inplane` as off (measured:
each lost nodes on the training generator's families, benchmarks/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.graph import MCP_Geometric

RULES = (
    "size",
    "elongation",
    "density",
    "gas",
    "fluid",
    "tube_z",
    "tube_inplane",
    "no_fat",
    "tube_path",
)


@dataclass(frozen=True)
class Rules:
    """Thresholds of the plausibility rules; a rule whose name is in `off` is skipped."""

    max_short_axis_mm: float = 100.0  # bulky disease (Lugano: a mass of 10 cm) is still a node
    max_elongation: float = 3.5
    max_mean_hu: float = 150.0
    gas_hu: float = -300.0
    max_gas_share: float = 0.02
    fluid_hu: tuple[float, float] = (-30.0, 20.0)
    max_fluid_share: float = 0.5
    fluid_min_short_axis_mm: float = 20.0
    similar_hu: float = 35.0
    tube_mm: tuple[float, float] = (2.0, 6.0)
    tube_share: float = 0.7
    shell_mm: tuple[float, float] = (1.0, 3.0)
    min_shell_fat: float = 0.05
    max_path_thickness: float = 4.0
    path_max_voxels: int = 20000
    off: tuple[str, ...] = ()

    def enabled(self) -> tuple[str, ...]:
        return tuple(r for r in RULES if r not in self.off)

    def to_card(self) -> dict:
        body = asdict(self)
        off = body.pop("off")
        return {
            "module": "inference.plausibility",
            "rules": {r: r not in off for r in RULES},
            "thresholds": body,
        }

    @classmethod
    def from_card(cls, entry: dict | None) -> Rules | None:
        """The rules of a card's `plausibility` entry; None when the card has none. A rule
        the card does not name is off: a card records the rules its model was measured with,
        and a rule added later must not change an older model's findings unmeasured."""
        if not entry:
            return None
        known = {f.name for f in fields(cls)} - {"off"}
        thresholds = entry.get("thresholds", {})
        unknown = set(thresholds) - known
        if unknown:
            raise ValueError(f"plausibility thresholds {sorted(unknown)} are unknown; known: {sorted(known)}")
        rules = entry.get("rules", {})
        bad = set(rules) - set(RULES)
        if bad:
            raise ValueError(f"plausibility rules {sorted(bad)} are unknown; known: {', '.join(RULES)}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in thresholds.items()}
        off = tuple(r for r in RULES if not rules.get(r, False))
        return cls(**values, off=off)


def margin_voxels(spacing: tuple[float, float, float], rules: Rules) -> tuple[int, int, int]:
    reach = max(rules.tube_mm[1], rules.shell_mm[1]) + 1.0
    return tuple(int(np.ceil(reach / s)) + 1 for s in spacing)  # type: ignore[return-value]


def judge(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    mask: np.ndarray,
    bbox: tuple[int, int, int, int, int, int],
    short_mm: float,
    long_mm: float,
    long_endpoints_ji: tuple[tuple[float, float], tuple[float, float]] | None,
    key_slice: int,
    rules: Rules,
) -> dict[str, bool]:
    """Which rules the candidate breaks (True = implausible for a node), for every rule.

    `hu` is the whole volume, `mask` the candidate in `bbox`, `long_endpoints_ji` the long
    axis endpoints in (row, column) pixels of the whole volume, on slice `key_slice`."""
    k0, j0, i0, k1, j1, i1 = bbox
    inside = hu[k0:k1, j0:j1, i0:i1][mask]
    mean = float(inside.mean()) if inside.size else 0.0
    soft = inside[inside > -30]
    own = float(np.median(soft)) if soft.size else mean
    out = {
        "size": short_mm > rules.max_short_axis_mm,
        "elongation": short_mm > 0 and long_mm / short_mm > rules.max_elongation,
        "density": mean > rules.max_mean_hu,
        "gas": float((inside < rules.gas_hu).mean()) > rules.max_gas_share if inside.size else False,
        "fluid": _fluid_share(hu, spacing, mask, bbox, rules) > rules.max_fluid_share
        if short_mm >= rules.fluid_min_short_axis_mm
        else False,
        "tube_z": _continues_along_z(hu, spacing, mask, bbox, own, rules),
        "tube_inplane": _continues_in_plane(hu, spacing, long_endpoints_ji, key_slice, short_mm, own, rules),
        "no_fat": _shell_fat(hu, spacing, mask, bbox, rules) < rules.min_shell_fat,
        "tube_path": path_over_thickness(mask, spacing, rules.path_max_voxels) > rules.max_path_thickness,
    }
    return out


def implausible(verdict: dict[str, bool], rules: Rules) -> bool:
    return any(verdict[r] for r in rules.enabled())


def _fluid_share(hu, spacing, mask, bbox, rules: Rules) -> float:
    """Share of the candidate at fluid density on the image smoothed 1 mm in plane (noise
    alone would put an unenhanced node's voxels below 20 HU)."""
    k0, j0, i0, k1, j1, i1 = bbox
    box = ndimage.gaussian_filter(
        hu[k0:k1, j0:j1, i0:i1].astype(np.float32), (0, 1.0 / spacing[1], 1.0 / spacing[2])
    )
    values = box[mask]
    lo, hi = rules.fluid_hu
    return float(((values >= lo) & (values <= hi)).mean()) if values.size else 0.0


def _similar(values: np.ndarray, own: float, rules: Rules) -> np.ndarray:
    return (np.abs(values - own) < rules.similar_hu) & (values > -30)


def _continues_along_z(hu, spacing, mask, bbox, own: float, rules: Rules) -> bool:
    """Tissue of the candidate's own density in its central footprint beyond both ends."""
    k0, j0, i0, _, j1, i1 = bbox
    per_slice = mask.any(axis=(1, 2))
    ks = np.flatnonzero(per_slice)
    if ks.size == 0:
        return False
    # the footprint: the key slice's mask shrunk towards its centre (half its inscribed radius)
    key = int(np.argmax(mask.sum(axis=(1, 2))))
    dist = ndimage.distance_transform_edt(mask[key], sampling=spacing[1:])
    core = dist >= 0.5 * dist.max()
    if not core.any():
        return False
    lo_mm, hi_mm = rules.tube_mm
    ends = []
    for edge, step in ((k0 + ks[0], -1), (k0 + ks[-1], +1)):
        found = []
        for n in range(1, hu.shape[0]):
            k = edge + step * n
            d = n * spacing[0]
            if d > max(hi_mm, spacing[0]) or not 0 <= k < hu.shape[0]:
                break
            if d >= lo_mm:
                found.append(_similar(hu[k, j0:j1, i0:i1][core], own, rules).mean())
        if not found:
            return False  # the volume ends here: no evidence
        ends.append(max(found))
    return min(ends) >= rules.tube_share


def _continues_in_plane(hu, spacing, endpoints, key, short_mm, own: float, rules: Rules) -> bool:
    if endpoints is None:
        return False
    (ja, ia), (jb, ib) = (np.asarray(p, float) for p in endpoints)
    sj, si = spacing[1], spacing[2]
    a, b = np.array([ja * sj, ia * si]), np.array([jb * sj, ib * si])
    length = float(np.linalg.norm(b - a))
    if length == 0:
        return False
    d = (b - a) / length
    radius = max(short_mm / 4, 1.0)
    shares = []
    for end, direction in ((a, -d), (b, d)):
        best = 0.0
        for dist in np.arange(rules.tube_mm[0], rules.tube_mm[1] + 1e-6, 1.0):
            c = end + direction * (dist + radius)
            jj = np.arange(int((c[0] - radius) / sj), int((c[0] + radius) / sj) + 2)
            ii = np.arange(int((c[1] - radius) / si), int((c[1] + radius) / si) + 2)
            jj = jj[(jj >= 0) & (jj < hu.shape[1])]
            ii = ii[(ii >= 0) & (ii < hu.shape[2])]
            if jj.size == 0 or ii.size == 0:
                continue
            disc = ((jj[:, None] * sj - c[0]) ** 2 + (ii[None, :] * si - c[1]) ** 2) <= radius**2
            if not disc.any():
                continue
            vals = hu[key][np.ix_(jj, ii)][disc]
            best = max(best, float(_similar(vals, own, rules).mean()))
        shares.append(best)
    return min(shares) >= rules.tube_share


def _shell_fat(hu, spacing, mask, bbox, rules: Rules) -> float:
    k0, j0, i0, k1, j1, i1 = bbox
    m = [int(np.ceil(rules.shell_mm[1] / s)) + 1 for s in spacing]
    lo = [max(0, a - g) for a, g in zip((k0, j0, i0), m, strict=True)]
    hi = [min(n, b + g) for b, g, n in zip((k1, j1, i1), m, hu.shape, strict=True)]
    big = np.zeros([h - low for low, h in zip(lo, hi, strict=True)], bool)
    big[k0 - lo[0] : k1 - lo[0], j0 - lo[1] : j1 - lo[1], i0 - lo[2] : i1 - lo[2]] = mask
    dist = ndimage.distance_transform_edt(~big, sampling=spacing)
    ring = hu[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]][
        (dist > rules.shell_mm[0]) & (dist <= rules.shell_mm[1])
    ]
    return float((ring < -30).mean()) if ring.size else 1.0


def path_over_thickness(mask: np.ndarray, spacing, max_voxels: int = 20000) -> float:
    """The candidate's longest path inside itself over its thickness (`tube_path`).

    The path: geodesic, between the two voxels farthest apart along paths that stay inside
    the mask (two sweeps, from the voxel farthest from the centroid); the thickness: twice
    the largest distance from a voxel to the outside. An ellipsoid gives about its long
    over its short axis, a tube segment its length over its diameter however it bends.
    A mask of more than `max_voxels` voxels is first reduced by whole blocks (a block is
    inside when at least half of it is), so the cost per candidate stays small."""
    m, sp = _coarse(mask, spacing, max_voxels)
    m = np.pad(m, 1)
    if not m.any():
        return 0.0
    thickness = 2.0 * float(ndimage.distance_transform_edt(m, sampling=sp).max())
    mcp = MCP_Geometric(np.where(m, 1.0, np.inf), sampling=tuple(sp))
    pts = np.argwhere(m)
    start = tuple(pts[np.argmax((((pts - pts.mean(axis=0)) * sp) ** 2).sum(axis=1))])
    length = 0.0
    for _ in range(2):
        cost, _ = mcp.find_costs([start])
        cost = np.where(m & np.isfinite(cost), cost, -1.0)
        far = np.unravel_index(int(np.argmax(cost)), cost.shape)
        length, start = float(cost[far]), far
    return length / thickness if thickness > 0 else 0.0


def _coarse(mask: np.ndarray, spacing, max_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    sp = np.asarray(spacing, float)
    if mask.size <= max_voxels:
        return mask, sp
    g = (float(np.prod(sp)) * mask.size / max_voxels) ** (1 / 3)
    f = np.maximum(1, np.round(g / sp).astype(int))
    shape = [int(np.ceil(n / k)) * k for n, k in zip(mask.shape, f, strict=True)]
    padded = np.zeros(shape, np.float32)
    padded[tuple(slice(0, n) for n in mask.shape)] = mask
    blocks = padded.reshape(shape[0] // f[0], f[0], shape[1] // f[1], f[1], shape[2] // f[2], f[2])
    return blocks.mean(axis=(1, 3, 5)) >= 0.5, sp * f


def verdict_of(
    volume_hu: np.ndarray, spacing, mask, bbox, short_line, long_line, key_slice: int, rules: Rules
):
    """`judge` for a measured node given its axis lines (`inference.findings.AxisLine`)."""
    a, b = ((float(p[1]) - 0.5, float(p[0]) - 0.5) for p in long_line.endpoints_pixel)
    return judge(
        volume_hu, spacing, mask, bbox, short_line.length_mm, long_line.length_mm, (a, b), key_slice, rules
    )
