"""What the model's findings are, by the tissue under them, in training-family phantoms.

`python -m benchmarks.fp_kinds --first 600000 --count 10 --variety` runs the pipeline with
the plausibility rules off on training phantoms (seeds below the evaluation seeds; with
`--variety` drawn by `inference.phantoms.variety_spec`) and prints one line per finding:
true or false (by the evaluations' hit rule, `inference.evaluate.HIT_MIN_IOU`: a finding
mostly of other tissue with a node on it is false), short and long axis, mean HU, extent
along z, the two commonest tissues of the phantom's tissue map under it, and the
plausibility rules it breaks. It reads
only the training family, so rules and training can be studied on it without spending
the held-out family.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np

from inference import phantoms, plausibility
from inference.evaluate import match, phantom_volume
from inference.model_store import load_model
from inference.pipeline import PipelineSettings, analyse
from inference.train import EVAL_SEED_BASE

TISSUE_NAMES = {
    v: k
    for k, v in vars(phantoms).items()
    if k.isupper() and isinstance(v, int) and k not in ("VARIETY_STREAM",) and v < 256
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--first", type=int, default=600_000)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--variety", action="store_true")
    p.add_argument("--model-dir", type=Path, default=None, help="default: the shipped demo model")
    args = p.parse_args()
    if args.first + args.count > EVAL_SEED_BASE:
        raise SystemExit(f"training seeds only (below {EVAL_SEED_BASE})")
    model = load_model(args.model_dir)
    rules = plausibility.Rules()
    kinds: collections.Counter = collections.Counter()
    for seed in range(args.first, args.first + args.count):
        spec = phantoms.variety_spec(seed) if args.variety else phantoms.PhantomSpec()
        ph = phantoms.generate(seed, spec)
        volume = phantom_volume(ph)
        findings = analyse(volume, model, PipelineSettings(plausibility=False)).findings.findings
        for f, m in zip(findings, match(ph.labels, [(f.bbox, f.mask) for f in findings]), strict=True):
            verdict = plausibility.verdict_of(
                volume.array, volume.spacing, f.mask, f.bbox, f.short_axis, f.long_axis, f.key_slice, rules
            )
            k0, j0, i0, k1, j1, i1 = f.bbox
            under = ph.tissue[k0:k1, j0:j1, i0:i1][f.mask]
            top = collections.Counter(under.tolist()).most_common(2)
            ks = np.flatnonzero(f.mask.any(axis=(1, 2)))
            row = {
                "seed": seed,
                "true": bool(m.gt),
                "short_mm": round(f.short_axis.length_mm, 1),
                "long_mm": round(f.long_axis.length_mm, 1),
                "mean_hu": round(f.mean_hu),
                "z_extent_mm": round(float((ks[-1] - ks[0] + 1) * volume.spacing[0]), 1),
                "tissue": [(TISSUE_NAMES.get(c, c), round(n / under.size, 2)) for c, n in top],
                "breaks": [r for r, broken in verdict.items() if broken],
            }
            if not m.gt:
                kinds[row["tissue"][0][0]] += 1
            print(json.dumps(row), flush=True)
    print(json.dumps({"false_positives_by_tissue": dict(kinds)}))


if __name__ == "__main__":
    main()
