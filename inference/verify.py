"""Candidate verification: is a segmented component a lymph node at all?

The U-Net marks node-like voxels; some components are not nodes (a contrast-filled vessel
cut across, a bowel loop, a piece of muscle or an organ edge). Each measured candidate
gets a few plain features (size, shape, elongation along the table axis, HU statistics,
the network's own confidence, and what surrounds it: nodes sit in fat) and a logistic
model scores them; candidates under the threshold are dropped before classification. The
model is fitted on candidates of *training* phantoms (`nodal train`, or `nodal
train-verifier` for an existing model), its threshold set to keep a chosen share of the
true nodes, and stored beside the weights as `verifier.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

FEATURES = (
    "log_volume_mm3",
    "short_axis_mm",
    "long_axis_mm",
    "short_long_ratio",
    "z_extent_over_short_axis",
    "fill_of_bounding_ellipsoid",
    "mean_hu",
    "std_hu",
    "share_above_100_hu",
    "share_below_minus_30_hu",
    "mean_probability",
    "max_probability",
    "shell_share_fat",
    "shell_share_similar",
    "shell_mean_hu",
)
FILE_NAME = "verifier.json"
#: The shell: tissue within this distance outside the candidate. A node sits in fat; a
#: piece of muscle, bowel, organ or vessel continues into tissue of its own density.
SHELL_MM = 3.0
SIMILAR_HU = 40.0


def shell_margin(spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    """Voxels to add on each side of a candidate's box so that its shell fits."""
    return tuple(int(np.ceil(SHELL_MM / s)) + 1 for s in spacing)  # type: ignore[return-value]


def features(
    mask: np.ndarray,
    hu: np.ndarray,
    soft: np.ndarray,
    spacing: tuple[float, float, float],
    short_mm: float,
    long_mm: float,
    hu_around: np.ndarray | None = None,
    offset: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """The feature vector of one candidate (`mask`, `hu`, `soft`: its bounding box).

    `hu_around` is the image in the box grown by `shell_margin` where the volume allows,
    and `offset` where the candidate's box starts inside it (`hu` itself when omitted)."""
    if hu_around is None:
        hu_around = hu
    vox = float(np.prod(spacing))
    n = int(mask.sum())
    volume = n * vox
    inside = hu[mask]
    p = soft[mask]
    ks = np.flatnonzero(mask.any(axis=(1, 2)))
    z_extent = (ks[-1] - ks[0] + 1) * spacing[0] if n else 0.0
    ellipsoid = np.pi / 6 * max(short_mm, 1e-3) * max(long_mm, 1e-3) * max(z_extent, 1e-3)
    return np.array(
        [
            np.log(max(volume, 1.0)),
            short_mm,
            long_mm,
            short_mm / long_mm if long_mm > 0 else 0.0,
            z_extent / max(short_mm, 1.0),
            volume / ellipsoid,
            float(inside.mean()) if n else 0.0,
            float(inside.std()) if n else 0.0,
            float((inside > 100).mean()) if n else 0.0,
            float((inside < -30).mean()) if n else 0.0,
            float(p.mean()) if n else 0.0,
            float(p.max()) if n else 0.0,
            *_shell(mask, hu_around, offset, spacing, float(inside.mean()) if n else 0.0),
        ],
        dtype=np.float64,
    )


def _shell(mask, hu_around, offset, spacing, mean_hu: float) -> tuple[float, float, float]:
    big = np.zeros(hu_around.shape, bool)
    k, j, i = offset
    big[k : k + mask.shape[0], j : j + mask.shape[1], i : i + mask.shape[2]] = mask
    if not big.any():
        return 0.0, 0.0, 0.0
    dist = ndimage.distance_transform_edt(~big, sampling=spacing)
    ring = hu_around[(dist > 0) & (dist <= SHELL_MM)]
    if ring.size == 0:
        return 0.0, 0.0, 0.0
    return (
        float((ring < -30).mean()),
        float((np.abs(ring - mean_hu) < SIMILAR_HU).mean()),
        float(ring.mean()),
    )


@dataclass(frozen=True)
class Verifier:
    """Standardised logistic model over `FEATURES` with a decision threshold."""

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]  # per standardised feature, then the squares of each
    bias: float
    threshold: float
    features: tuple[str, ...] = FEATURES

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Node probability of each row of `x` (candidates × features)."""
        z = _design(np.atleast_2d(x), np.asarray(self.mean), np.asarray(self.scale))
        return _sigmoid(z @ np.asarray(self.weights) + self.bias)

    def keep(self, x: np.ndarray) -> np.ndarray:
        return self.scores(x) >= self.threshold

    def save(self, model_dir: Path, fit_report: dict | None = None) -> Path:
        path = Path(model_dir) / FILE_NAME
        body = asdict(self) | {"fit": fit_report or {}}
        path.write_text(json.dumps(body, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> Verifier:
        body = json.loads(Path(path).read_text())
        names = tuple(body["features"])
        if names != FEATURES:
            raise ValueError(f"{path}: verifier features {names} differ from this version's {FEATURES}")
        return cls(
            mean=tuple(body["mean"]),
            scale=tuple(body["scale"]),
            weights=tuple(body["weights"]),
            bias=float(body["bias"]),
            threshold=float(body["threshold"]),
            features=names,
        )


def fit(
    x: np.ndarray, is_node: np.ndarray, keep_share: float = 0.98, l2: float = 1.0
) -> tuple[Verifier, dict]:
    """Fit by Newton's method (L2-penalised logistic regression on the features and their
    squares); the threshold keeps `keep_share` of the true nodes among the candidates."""
    x = np.asarray(x, float)
    y = np.asarray(is_node, float)
    if y.all() or not y.any():
        raise ValueError("the verifier needs both node and non-node candidates to learn from")
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    z = _design(x, mean, scale)
    a = np.hstack([z, np.ones((len(z), 1))])
    w = np.zeros(a.shape[1])
    penalty = np.full(a.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(50):
        p = _sigmoid(a @ w)
        grad = a.T @ (p - y) + penalty * w
        hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(penalty) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    p = _sigmoid(a @ w)
    threshold = float(np.quantile(p[y == 1], 1 - keep_share))
    kept = p >= threshold
    report = {
        "candidates": len(y),
        "nodes": int(y.sum()),
        "keep_share": keep_share,
        "nodes_kept": round(float(kept[y == 1].mean()), 4),
        "non_nodes_removed": round(float(1 - kept[y == 0].mean()), 4),
    }
    verifier = Verifier(
        mean=tuple(float(v) for v in mean),
        scale=tuple(float(v) for v in scale),
        weights=tuple(float(v) for v in w[:-1]),
        bias=float(w[-1]),
        threshold=threshold,
    )
    return verifier, report


def _design(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    z = np.clip((x - mean) / scale, -8, 8)
    return np.hstack([z, z**2])


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(v, -40, 40)))
