"""Time the follow-up registration (`inference.followup.registration`) on a 300-slice CT.

A phantom of 300 slices x 512 x 512 (0.75 mm pixels, 1 mm slices) is the prior; the same
phantom moved by a known rigid motion (`inference.phantom_pairs`) is the current study.
Registers `--repeat` times and prints one JSON object: the seconds of each run, the method
kept, the bone residual and the largest error at the phantom's node centres (mm).

    .venv/bin/python benchmarks/bench_registration.py [--slices 300] [--size 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.evaluate import array_volume
from inference.followup.registration import register
from inference.phantom_pairs import covered_slices, move_patient, random_motion
from inference.phantoms import PhantomSpec, generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)
    spec = PhantomSpec(
        rows=args.size, columns=args.size, pixel_spacing_mm=0.75, slices=args.slices, slice_spacing_mm=1.0
    )
    ph = generate(args.seed, spec)
    motion = random_motion(np.random.default_rng(args.seed), ph.affine, ph.hu.shape)
    first, stop = covered_slices(motion, ph.affine, ph.hu.shape)
    moved, _ = move_patient(ph.hu.astype(np.float32), ph.labels, ph.affine, motion, range(first, stop))
    cut = ph.affine.copy()
    cut[:3, 3] += first * ph.affine[:3, 0]
    prior = array_volume(ph.hu.astype(np.float32), ph.affine, "bench-registration", "prior")
    current = array_volume(moved, cut, "bench-registration", "current")
    centres = np.array([n.centre_lps_mm for n in ph.nodes])
    truth = centres @ motion[:3, :3].T + motion[:3, 3]
    runs = []
    matrices = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        reg = register(prior, current)
        seconds = time.perf_counter() - started
        m = np.asarray(reg.matrix)
        matrices.append(m)
        error = float(np.linalg.norm(centres @ m[:3, :3].T + m[:3, 3] - truth, axis=1).max())
        runs.append(
            {
                "seconds": round(seconds, 2),
                "method": reg.method,
                "bone_residual_mm": None if reg.bone_residual_mm is None else round(reg.bone_residual_mm, 2),
                "max_node_error_mm": round(error, 2),
            }
        )
    print(
        json.dumps(
            {
                "volume": list(ph.hu.shape),
                "shift_mm": [round(float(v), 1) for v in motion[:3, 3]],
                "runs": runs,
                "median_seconds": float(np.median([r["seconds"] for r in runs])),
                "largest_difference_between_runs": float(
                    max(np.abs(m - matrices[0]).max() for m in matrices)
                ),
                "machine": platform.machine(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
