"""Time the whole offline pipeline on one CT series and report peak memory.

Run as a child process so that its peak RSS is the pipeline's own (loading the DICOM
series, the model, inference, measurements, classification and writing SEG/SR/images):

    .venv/bin/python -m benchmarks.bench_inference SERIES_DIR [--threads N] [--device cpu] [--model-dir DIR]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("series", type=Path)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--model-dir", type=Path, default=None, help="default: the shipped demo model")
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from dicom_node.jobs.analysis import series_files, source_datasets
    from inference.dicom_volume import load_series
    from inference.model_store import load_model
    from inference.pipeline import analyse
    from sr_templates import write_results

    t0 = time.perf_counter()
    model = load_model(args.model_dir, args.device)
    t_model = time.perf_counter() - t0
    t = time.perf_counter()
    volume = load_series(args.series)
    t_load = time.perf_counter() - t
    analysis = analyse(volume, model)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        wanted = {ref.sop_instance_uid for ref in analysis.findings.slices}
        write_results(source_datasets(series_files(args.series), wanted), analysis.findings, Path(out))
    t_write = time.perf_counter() - t
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    print(
        json.dumps(
            {
                "shape": list(volume.shape),
                "spacing_mm": [round(s, 3) for s in volume.spacing],
                "device": model.device.type,
                "threads": torch.get_num_threads(),
                "model": model.version,
                "nodes": len(analysis.findings.findings),
                "seconds": {
                    "model_load": round(t_model, 2),
                    "dicom_load": round(t_load, 2),
                    **{k: round(v, 2) for k, v in analysis.seconds.items()},
                    "write_results": round(t_write, 2),
                    "pipeline_total": round(t_load + sum(analysis.seconds.values()) + t_write, 2),
                },
                "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
