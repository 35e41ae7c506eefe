"""Status page benchmark: `/` and `/status/data.json` with 10,000 studies in an SQLite index.

Fills a fresh SQLite index with `--studies` studies (an accession number, with
`--show-patient` also a patient name and ID, and one CT series of `--instances` instance
rows each, one job: most done with findings and two destinations delivered, every tenth
skipped, every twentieth with a failed delivery) and 200 refused associations in the audit
trail, then times the page, its polling data and one study's page through the real app
(FastAPI's TestClient, in process: no network), `--repeat` times each after one warm-up.
The readiness checks in the health box (an index write, a spool write) are part of each
request, as on a live node.

    .venv/bin/python -m benchmarks.bench_status [--studies 10000] [--instances 30] [--repeat 30]
        [--show-patient]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import insert

from dicom_node.api.app import create_app
from dicom_node.config import Settings
from dicom_node.index.db import AuditEvent, Database, Delivery, Instance, Job, Series, Study
from dicom_node.receive.receiver import Receiver
from dicom_node.spool.store import Spool


def fill(db: Database, studies: int, instances: int, t0: float, patient: bool = False) -> None:
    with db.engine.begin() as conn:
        st, se, jobs, dl, inst = [], [], [], [], []
        for i in range(studies):
            uid = f"1.2.826.0.1.3680043.10.999.{i}"
            t = t0 - (studies - i) * 30.0
            st.append(
                dict(
                    study_uid=uid,
                    first_received_at=t,
                    last_received_at=t + 20,
                    pending=False,
                    completed_at=t + 50,
                    completions=1,
                    instance_count=instances,
                    accession_number=f"A{i:09d}",
                    patient_name=f"Family{i}^Given" if patient else None,
                    patient_id=f"P{i:07d}" if patient else None,
                )
            )
            se.append(
                dict(
                    series_uid=uid + ".1",
                    study_uid=uid,
                    modality="CT",
                    description="Thorax",
                    instance_count=instances,
                    pending=False,
                    last_received_at=t + 20,
                    calling_ae="CT1",
                    routing="rule ct-axial matched",
                )
            )
            skipped = i % 10 == 0
            jobs.append(
                dict(
                    id=i + 1,
                    study_uid=uid,
                    series_uid=uid + ".1",
                    state="skipped" if skipped else "done",
                    rule=None if skipped else "ct-axial",
                    reason="slice thickness 8 mm > 5 mm" if skipped else None,
                    created_at=t + 50,
                    started_at=t + 51,
                    finished_at=t + 80,
                    findings=None if skipped else 4,
                    malignant=None if skipped else 1,
                    seconds=None if skipped else json.dumps({"load": 1.2, "segment": 20.1}),
                )
            )
            if not skipped:
                for dest in ("pacs", "archive"):
                    for k, cls in enumerate(("seg", "sr")):
                        failed = i % 20 == 5 and dest == "archive"
                        dl.append(
                            dict(
                                job_id=i + 1,
                                destination=dest,
                                sop_uid=f"{uid}.9.{k}",
                                sop_class_uid="1.2",
                                file=f"{i}/{cls}.dcm",
                                state="failed" if failed else "delivered",
                                attempts=1,
                                created_at=t + 80,
                                expires_at=t + 3600,
                                next_attempt_at=0.0,
                                delivered_at=None if failed else t + 81,
                                last_error="connection refused" if failed else None,
                            )
                        )
            for k in range(instances):
                inst.append(
                    dict(
                        sop_uid=f"{uid}.1.{k}",
                        series_uid=uid + ".1",
                        study_uid=uid,
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                        transfer_syntax_uid="1.2.840.10008.1.2.1",
                        path=f"x/{i}/{k}.dcm",
                        size=525_000,
                        frames=1,
                        received_at=t + k * 0.05,
                        via="dimse",
                        calling_ae="CT1",
                        peer_host="127.0.0.1",
                    )
                )
        conn.execute(insert(Study), st)
        conn.execute(insert(Series), se)
        conn.execute(insert(Job), jobs)
        conn.execute(insert(Delivery), dl)
        for k in range(0, len(inst), 50_000):
            conn.execute(insert(Instance), inst[k : k + 50_000])
        conn.execute(
            insert(AuditEvent),
            [
                dict(
                    at=t0 - k,
                    event="association",
                    outcome="failure",
                    actor="UNKNOWN",
                    peer="10.0.0.9",
                    detail=json.dumps({"reason": "calling AE not allowed"}),
                )
                for k in range(200)
            ],
        )


def timed(client: TestClient, path: str, repeat: int) -> dict:
    assert client.get(path).status_code == 200  # warm-up
    ms = []
    for _ in range(repeat):
        t = time.perf_counter()
        r = client.get(path)
        ms.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200, r.status_code
    ms.sort()
    return {
        "median_ms": round(statistics.median(ms), 1),
        "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 1),
        "max_ms": round(ms[-1], 1),
        "bytes": len(r.content),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=10_000)
    ap.add_argument("--instances", type=int, default=30, help="instance rows per study")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--show-patient", action="store_true", help="status_page.show_patient on")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(f"sqlite:///{Path(tmp) / 'index.sqlite3'}")
        t0 = time.time()
        fill(db, args.studies, args.instances, t0, args.show_patient)
        fill_s = time.time() - t0
        spool = Spool(Path(tmp) / "spool")
        receiver = Receiver(spool, db)
        settings = Settings.model_validate({"status_page": {"show_patient": args.show_patient}})
        app = create_app(settings, db, receiver, ready=lambda: True)
        with TestClient(app) as c:
            out = {
                "benchmark": "status_page",
                "date": date.today().isoformat(),
                "studies": args.studies,
                "show_patient": args.show_patient,
                "instances": args.studies * args.instances,
                "fill_seconds": round(fill_s, 1),
                "page": timed(c, "/", args.repeat),
                "data_json": timed(c, "/status/data.json", args.repeat),
                "data_json_last_page": timed(c, f"/status/data.json?offset={args.studies - 50}", args.repeat),
                "study": timed(c, "/status/studies/1.2.826.0.1.3680043.10.999.5", args.repeat),
            }
        receiver.close()
        spool.close()
        db.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
