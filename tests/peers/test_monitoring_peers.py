"""Monitoring against real peers: a real Prometheus scrapes a running `nodal serve`.

One run proves several things: dcmtk's storescu sends a phantom study (with distinctive
patient name, ID and birth date) to nodal, nodal analyses it and sends the results to
Orthanc; Prometheus, scraping nodal's separate monitoring port every second with the
shipped alert rules loaded, sees the counters and histograms move by exactly what happened;
every Grafana panel expression is a valid query against it; and no log line and no audit
record of the whole run holds the patient's name, ID or birth date.
"""

from __future__ import annotations

import json
import subprocess

import pydicom
import pytest
import requests

from inference import phantoms
from inference.ct_series import PatientInfo
from tests.helpers.metrics import alert_names, dashboard_exprs
from tests.helpers.peers import (
    Nodal,
    Orthanc,
    Prometheus,
    free_port,
    model_dir,
    node_config,
    skip_reason,
    wait_until,
)

pytestmark = [pytest.mark.peers, pytest.mark.slow]

PATIENT = PatientInfo(name="Quorvatz^Zyxwena", id="PID-8675309-QX", birth_date="19230517", sex="F")
PHI = ("Quorvatz", "Zyxwena", "PID-8675309-QX", "8675309", "19230517", "1923-05-17")
SPEC = phantoms.PhantomSpec(rows=256, columns=256, pixel_spacing_mm=1.45, slices=48, slice_spacing_mm=2.5)


if (_why := skip_reason("storescu", "echoscu", "prometheus")) is not None:
    pytest.skip(_why, allow_module_level=True)


def test_prometheus_sees_a_study_go_through_and_no_phi_is_logged_or_audited(tmp_path):
    pacs = Orthanc(tmp_path / "pacs", aet="PACS").start()
    port = free_port()
    monitoring_port = free_port()
    cfg = node_config(
        tmp_path / "var",
        port,
        model_dir(),
        allowed_callers=[{"ae_title": "MODALITY", "host": "127.0.0.1"}],
        destinations=[
            {
                "name": "pacs",
                "kind": "dimse",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs.dicom_port,
            }
        ],
        logging={"level": "DEBUG", "format": "json"},
    )
    cfg["node"]["monitoring_port"] = monitoring_port
    nodal = Nodal(tmp_path, cfg)
    prom = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{monitoring_port}")
    try:
        nodal.start()
        prom.start()
        wait_until(lambda: prom.value('up{job="nodal"}') == 1, 30, "Prometheus to scrape nodal")

        paths = phantoms.write_phantom(phantoms.generate(4_200_001, SPEC), tmp_path / "ct", patient=PATIENT)
        sent_ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
        assert (str(sent_ds.PatientName), sent_ds.PatientID) == (PATIENT.name, PATIENT.id)  # the PHI is sent
        sent = subprocess.run(
            ["storescu", "-aet", "MODALITY", "-aec", "NODAL", "127.0.0.1", str(port), *map(str, paths)],
            capture_output=True,
            text=True,
        )
        assert sent.returncode == 0, sent.stderr
        bad = subprocess.run(
            ["echoscu", "-aet", "INTRUDER", "-aec", "NODAL", "127.0.0.1", str(port)], capture_output=True
        )
        assert bad.returncode != 0

        def delivered():
            jobs = [j for j in nodal.api("/api/jobs")["jobs"] if j["state"] == "done"]
            if not jobs:
                return None
            d = nodal.api(f"/api/jobs/{jobs[0]['id']}")["deliveries"]["pacs"]
            return d if d["pending"] == 0 and d["delivered"] else None

        d = wait_until(delivered, 300, "the job done and its results delivered to Orthanc")
        assert d["failed"] == 0
        n_results = d["delivered"]

        expected = {
            'sum(nodal_instances_received_total{outcome="stored"})': len(paths),
            'nodal_instances_received_total{receiver="dimse", outcome="stored"}': len(paths),
            "nodal_studies_completed_total": 1,
            "nodal_receive_to_complete_seconds_count": 1,
            "nodal_end_to_end_seconds_count": 1,
            'nodal_results_sent_total{destination="pacs"}': n_results,
            'nodal_send_retries_total{destination="pacs"}': 0,
            'nodal_jobs_finished_total{state="done"}': 1,
            "nodal_load_duration_seconds_count": 1,
            "nodal_segment_duration_seconds_count": 1,
            "nodal_classify_duration_seconds_count": 1,
            "nodal_encode_duration_seconds_count": 1,
            "nodal_findings_per_study_count": 1,
            "nodal_associations_accepted_total": 1,
            'nodal_associations_rejected_total{reason="calling_ae_unknown"}': 1,
            "nodal_associations_active": 0,
            'nodal_jobs{state="done"}': 1,
            "nodal_queue_depth": 0,
            "nodal_workers_ready": 1,
        }

        def moved():
            return all(prom.value(expr) == want for expr, want in expected.items())

        try:
            wait_until(moved, 30, "Prometheus to see the study's metrics")
        except TimeoutError:
            got = {expr: prom.value(expr) for expr in expected}
            raise AssertionError(f"expected {expected}, Prometheus has {got}") from None
        assert (
            prom.value('sum(nodal_received_bytes_total{receiver="dimse"})')
            >= sum(p.stat().st_size for p in paths) * 0.9
        )
        assert prom.value("nodal_segment_duration_seconds_sum") > 0
        e2e = prom.value("nodal_end_to_end_seconds_sum")
        assert 0 < e2e < 600
        [info] = prom.query("nodal_model_info")
        assert info["metric"]["device"] == "cpu" and info["metric"]["version"]
        assert prom.value("nodal_spool_free_bytes") > 0
        assert prom.value("nodal_spool_log_unwritten_bytes") == 0  # the job read every file: all written
        assert prom.value("process_resident_memory_bytes") > 0

        for expr in dashboard_exprs():
            prom.query(expr.replace("$instance", ".*"))  # raises on an invalid query
        for panel_expr in (
            'sum by (receiver, outcome) (rate(nodal_instances_received_total{instance=~".*"}[5m]))',
            "histogram_quantile(0.95, sum by (le) "
            '(rate(nodal_segment_duration_seconds_bucket{instance=~".*"}[5m])))',
        ):
            assert panel_expr.replace('".*"', '"$instance"') in dashboard_exprs()
            assert prom.query(panel_expr), panel_expr  # data behind a panel, not only a valid query
        groups = requests.get(f"{prom.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == len(alert_names()) and all(r["health"] == "ok" for r in rules), rules

        ready = requests.get(f"http://127.0.0.1:{monitoring_port}/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["failing"] == []
        events = nodal.api("/api/audit?limit=1000")["events"]
        kinds = {e["event"] for e in events}
        assert {
            "config_loaded",
            "association",
            "instances_stored",
            "job_finished",
            "results_transferred",
        } <= kinds
        [stored] = [e for e in events if e["event"] == "instances_stored"]
        assert stored["count"] == len(paths) and stored["actor"] == "MODALITY" and stored["study_key"]
        [rejected] = [e for e in events if e["event"] == "association" and e["outcome"] == "failure"]
        assert rejected["actor"] == "INTRUDER"
        sent_events = [e for e in events if e["event"] == "results_transferred"]
        assert sum(e["count"] for e in sent_events) == n_results
    finally:
        prom.stop()
        code = nodal.stop()
        pacs.stop()
    assert code == 0

    log = nodal.log()
    lines = [ln for ln in log.splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines]  # every line is one JSON object
    events_logged = {r.get("event") for r in records}
    assert {"association_end", "job", "send", "config_loaded"} <= events_logged
    [assoc] = [
        r for r in records if r.get("event") == "association_end" and r.get("calling_ae") == "MODALITY"
    ]
    assert f"{len(paths)} stored" in assoc["message"] and stored["study_key"] in assoc["message"]
    from dicom_node.index.db import Database
    from dicom_node.observe.audit import query

    db = Database(f"sqlite:///{tmp_path / 'var' / 'index.sqlite3'}")
    try:
        audit_text = json.dumps(query(db, limit=100_000))
    finally:
        db.close()
    assert '"application_stop"' in audit_text
    for value in PHI:
        assert value not in log, f"{value!r} in the log"
        assert value not in audit_text, f"{value!r} in the audit trail"
