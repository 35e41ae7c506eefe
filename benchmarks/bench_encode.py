"""Time the result writers: SEG + SR (target <= 2 s) and the result images, on one core.

A synthetic 300-slice 512x512 CT with 20 ellipsoid nodes (4-12 mm semi-axes) is written
with `inference.ct_series` to a temporary folder and read back; the findings are built by
hand (`sr_templates.synthetic`).  No torch involved.  Prints one JSON object.

    .venv/bin/python benchmarks/bench_encode.py [--slices 300] [--size 512] [--nodes 20]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pydicom  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.ct_series import write_ct_series  # noqa: E402
from inference.findings import ModelInfo, SliceRef  # noqa: E402
from inference.rules import SIZE_CATEGORIES as CATEGORIES  # noqa: E402
from sr_templates import build_results  # noqa: E402
from sr_templates.result_images import build_result_images  # noqa: E402
from sr_templates.sources import prepare_sources  # noqa: E402
from sr_templates.synthetic import ellipsoid_finding, paint, study_findings  # noqa: E402
from sr_templates.uids import ResultUIDs, uid_from_names  # noqa: E402


def make_case(slices: int, size: int, nodes: int, folder: Path):
    affine = np.eye(4)
    affine[:3, 0] = (0.0, 0.0, 1.0)
    affine[:3, 1] = (0.0, 0.7, 0.0)
    affine[:3, 2] = (0.7, 0.0, 0.0)
    affine[:3, 3] = (-179.0, -179.0, -300.0)
    shape = (slices, size, size)
    rng = np.random.default_rng(7)
    array = rng.normal(30.0, 15.0, size=shape).astype(np.float32)
    array[:, : size // 8] = -1000.0
    findings = []
    columns = 5
    for n in range(nodes):
        row, col = divmod(n, columns)
        center = (
            slices * (0.15 + 0.7 * ((n * 7) % nodes) / max(1, nodes - 1)),
            size * (0.2 + 0.6 * row / max(1, (nodes - 1) // columns)),
            size * (0.15 + 0.7 * col / (columns - 1)),
        )
        radii = (4.0 + (n % 5) * 2.0, 3.0 + (n % 4) * 2.0, 4.0 + (n % 3) * 3.0)
        finding = ellipsoid_finding(
            label=f"LN-{n + 1}",
            tracking_uid=uid_from_names("bench", str(n)),
            shape=shape,
            affine=affine,
            center_kji=center,
            radii_mm=radii,
            malignancy_probability=(n % 10) / 10,
            size_category=CATEGORIES[n % len(CATEGORIES)],
        )
        paint(array, finding, 60.0)
        findings.append(finding)
    paths = write_ct_series(array, affine, folder, uid_seed="bench-encode")
    datasets = [pydicom.dcmread(p) for p in paths]
    refs = tuple(SliceRef(str(ds.SOPInstanceUID), str(ds.SOPClassUID)) for ds in datasets)
    first = datasets[0]
    sf = study_findings(
        study_instance_uid=first.StudyInstanceUID,
        series_instance_uid=first.SeriesInstanceUID,
        frame_of_reference_uid=first.FrameOfReferenceUID,
        slices=refs,
        shape=shape,
        affine=affine,
        findings=findings,
        model=ModelInfo(name="nodal-ln-bench", version="1.0.0"),
    )
    return datasets, sf


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    """(first call, later calls) in seconds."""
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times[0], times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    with tempfile.TemporaryDirectory(prefix="nodal-bench-") as tmp:
        datasets, sf = make_case(args.slices, args.size, args.nodes, Path(tmp))

    def seg_and_sr() -> None:
        build_results(datasets, sf, result_images=False)

    sources = prepare_sources(datasets, sf)
    uids = ResultUIDs(sources.sop_instance_uids, sf.model.version)

    def images() -> None:
        build_result_images(sources, sf, uids)

    seg_first, seg_rest = timed(seg_and_sr, args.repeats)
    img_first, img_rest = timed(images, args.repeats)
    results = build_results(datasets, sf, result_images=False)
    n_images = len(build_result_images(sources, sf, uids))
    print(
        json.dumps(
            {
                "benchmark": "encode",
                "slices": args.slices,
                "size": args.size,
                "nodes": args.nodes,
                "seg_frames": int(results.seg.NumberOfFrames),
                "seg_sr_first_s": round(seg_first, 3),
                "seg_sr_median_s": round(statistics.median(seg_rest), 3),
                "result_images_first_s": round(img_first, 3),
                "result_images_median_s": round(statistics.median(img_rest), 3),
                "result_images": n_images,
                "target_seg_sr_s": 2.0,
                "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                "python": platform.python_version(),
                "cpu": platform.processor() or platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
