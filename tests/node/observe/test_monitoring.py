"""Monitoring without peers: metric definitions, label values, JSON logs, audit trail, probes,
the job watcher, and the Prometheus rules and Grafana dashboard in deploy/."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import time

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.exc import DatabaseError

from dicom_node.api.app import create_app
from dicom_node.config import Settings
from dicom_node.delivery.outbox import deliver_due
from dicom_node.index.db import Database, Job, JobState
from dicom_node.observe import audit, metrics
from dicom_node.observe.job_watcher import JobWatcher, read_state
from dicom_node.observe.logs import JsonFormatter, configure_logging
from dicom_node.receive.contract import Source
from tests.helpers.dicom import part10
from tests.helpers.metrics import DEPLOY, ROOT, alert_names, dashboard_exprs, sample
from tests.helpers.node import FakeSender, complete, done_job, receive, settings
from tests.helpers.peers import wait_until

UID_LIKE = re.compile(r"^[0-9]+(\.[0-9]+){3,}$")  # shaped like a DICOM UID


@pytest.fixture(autouse=True)
def no_state_reader():
    yield
    metrics.STATE.read = None


def nodal_collectors():
    return [c for c in metrics.REGISTRY._collector_to_names if isinstance(c, Counter | Gauge | Histogram)]


def test_every_metric_follows_the_naming_rules_and_the_label_whitelist():
    found = nodal_collectors()
    assert len(found) >= 20
    for c in found:
        [family] = c.describe()
        assert family.name.startswith("nodal_"), family.name
        assert set(c._labelnames) <= metrics.LABELS, (family.name, c._labelnames)
        if isinstance(c, Counter):
            assert c._name.endswith("_total") or f"{family.name}_total" in metrics.metric_names()
        if isinstance(c, Histogram) and family.name != "nodal_findings_per_study":
            assert family.name.endswith("_seconds"), family.name
    stages = {f"nodal_{s}_duration_seconds" for s in ("load", "segment", "classify", "encode")}
    assert (
        stages | {"nodal_end_to_end_seconds", "nodal_receive_to_complete_seconds"} <= metrics.metric_names()
    )
    assert metrics.STAGE_BUCKETS["segment"] != metrics.STAGE_BUCKETS["classify"]  # fitted per stage


def test_label_values_never_carry_a_uid(node):
    """Receive, refuse, complete, run and deliver a job; then read every label value exposed."""
    db, receiver, root = node
    s = settings()
    receive(receiver, n=4, series="1.2.826.0.1.3680043.2.1143.77")
    receiver.store_bytes(b"not dicom", Source("stow", "r1"))
    job_id, outbox = done_job(node, s)
    deliver_due(db, s, outbox, time.time(), lambda d, st, r: FakeSender(failing={f"9.9.{job_id}.1"}))
    metrics.STATE.read = lambda: read_state(db, root, lambda: 1, lambda: [], lambda: {"0": 123}, lambda: 4096)
    body, ctype = metrics.exposition()
    assert ctype.startswith("text/plain")
    values = set()
    for family in text_string_to_metric_families(body.decode()):
        if not family.name.startswith("nodal_"):
            continue  # python_info carries the Python version, process_* no labels
        for smp in family.samples:
            values.update(v for k, v in smp.labels.items() if k != "le" and k != "quantile")
    assert {"dimse", "stow", "stored", "refused", "pacs", "web", "queued", "done"} <= values
    uids = [v for v in values if UID_LIKE.match(v) or v.startswith(("1.2.3", "1.2.826", "9.9."))]
    assert not uids, uids
    assert sample("nodal_gpu_memory_used_bytes", worker="0") == 123
    assert sample("nodal_spool_log_unwritten_bytes") == 4096
    assert sample("nodal_results_sent_total", destination="pacs") >= 2
    assert sample("nodal_send_retries_total", destination="pacs") >= 1
    assert sample("process_resident_memory_bytes") > 0  # the process metrics are there too


def test_receiver_counts_instances_and_bytes_by_outcome(node):
    _, receiver, _ = node
    before = {
        o: sample("nodal_instances_received_total", receiver="dimse", outcome=o)
        for o in ("stored", "duplicate")
    }
    bytes_before = sample("nodal_received_bytes_total", receiver="dimse")
    timed_before = sample("nodal_store_duration_seconds_count", receiver="dimse")
    data = part10(sop="1.2.3.9.1")
    receiver.store_bytes(data, Source("dimse", "a9", "CT1"))
    receiver.store_bytes(data, Source("dimse", "a9", "CT1"))
    assert (
        sample("nodal_instances_received_total", receiver="dimse", outcome="stored") == before["stored"] + 1
    )
    assert (
        sample("nodal_instances_received_total", receiver="dimse", outcome="duplicate")
        == before["duplicate"] + 1
    )
    assert sample("nodal_received_bytes_total", receiver="dimse") == bytes_before + 2 * len(data)
    assert sample("nodal_store_duration_seconds_count", receiver="dimse") == timed_before + 2
    summary = receiver.release("a9", released=True)
    assert summary.outcomes == {"stored": 1, "duplicate": 1} and summary.studies == {"1.2.3": 2}
    assert receiver.release("a9", released=True) is None  # a second end reports nothing


def test_known_label_series_exist_at_zero_from_the_start():
    """rate() and the alert rules see zeros, not absent series: every receiver and outcome,
    and the delivery series of each configured destination."""
    from dicom_node.receive.contract import Outcome

    assert set(metrics.RECEIVE_OUTCOMES) == {o.value for o in Outcome}
    exposed = metrics.exposition()[0].decode()
    for receiver in metrics.RECEIVERS:
        assert f'nodal_received_bytes_total{{receiver="{receiver}"}}' in exposed
        for outcome in metrics.RECEIVE_OUTCOMES:
            line = f'nodal_instances_received_total{{outcome="{outcome}",receiver="{receiver}"}}'
            assert line in exposed
    metrics.declare_destinations(["pacs-zero"])
    exposed = metrics.exposition()[0].decode()
    for name in ("nodal_results_sent_total", "nodal_results_failed_total", "nodal_send_retries_total"):
        assert f'{name}{{destination="pacs-zero"}} 0.0' in exposed
    assert 'nodal_send_duration_seconds_count{destination="pacs-zero"} 0.0' in exposed


def test_json_log_lines_carry_the_structured_fields():
    fmt = JsonFormatter()
    rec = logging.LogRecord("nodal.outbox", logging.INFO, __file__, 1, "job %d -> %s", (7, "pacs"), None)
    rec.job_id, rec.destination, rec.event = 7, "pacs", "send"
    doc = json.loads(fmt.format(rec))
    assert doc["message"] == "job 7 -> pacs" and doc["level"] == "INFO" and doc["logger"] == "nodal.outbox"
    assert doc["job_id"] == 7 and doc["destination"] == "pacs" and doc["event"] == "send"
    assert doc["time"].endswith("+00:00")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(fmt.format(rec))["exception"]


def test_log_lines_follow_stderr_when_it_is_replaced_and_closed(monkeypatch):
    """A line logged after the stderr of set-up time was closed reaches the new stderr.

    Found in `make test`: an association thread logged after the test whose captured
    stderr the handler had kept was over ("--- Logging error ---", I/O on a closed file).
    """
    import io
    import sys

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    first, second = io.StringIO(), io.StringIO()
    try:
        monkeypatch.setattr(sys, "stderr", first)
        configure_logging(Settings(logging={"format": "text", "level": "INFO"}))
        logging.getLogger("nodal.test").info("while the first stream is open")
        first.close()
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("nodal.test").info("after it was closed")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert "after it was closed" in second.getvalue() and "Logging error" not in second.getvalue()


def test_audit_trail_is_append_only_and_queryable(node):
    db = node[0]
    uid = "1.2.826.0.1.3680043.2.1143.99"
    audit.record(db, audit.Event("association", actor="CT1", peer="10.0.0.5"), t=100.0)
    audit.record(
        db, audit.Event("instances_stored", actor="CT1", study_key=audit.study_key(uid), count=40), t=200.0
    )
    audit.record(db, audit.Event("association", audit.FAILURE, actor="X", detail={"reason": "r"}), t=300.0)
    rows = audit.query(db)
    assert [r["event"] for r in rows] == ["association", "instances_stored", "association"]  # newest first
    assert [r["actor"] for r in audit.query(db, event="association", since=250.0)] == ["X"]
    stored = audit.query(db, event="instances_stored")[0]
    assert (
        stored["count"] == 40 and stored["study_key"] == audit.study_key(uid) and uid not in json.dumps(rows)
    )
    assert len(audit.study_key(uid)) == 12 and audit.study_key(uid) == audit.study_key(uid)
    with pytest.raises(ValueError, match="unknown audit event"):
        audit.Event("made_up")
    for statement in ("UPDATE audit_events SET actor = 'Y'", "DELETE FROM audit_events"):
        with pytest.raises(DatabaseError, match="append-only"), db.session() as s:
            s.execute(text(statement))
    assert len(audit.query(db)) == 3


def test_config_hash_masks_secrets_and_follows_changes():
    dest = {"name": "w", "kind": "orthanc", "url": "http://x", "username": "u", "password": "secret-1"}
    a = Settings.model_validate({"destinations": [dest]})
    b = Settings.model_validate({"destinations": [{**dest, "password": "secret-2"}]})
    c = Settings.model_validate({"destinations": [{**dest, "url": "http://y"}]})
    assert "secret-1" not in a.model_dump_json()
    assert audit.config_hash(a) == audit.config_hash(b) != audit.config_hash(c)


def test_readyz_names_failing_checks_and_metrics_and_audit_are_served(node):
    db, receiver, _ = node
    loaded = {"value": False}
    app = create_app(Settings(), db, receiver, ready=lambda: loaded["value"])
    audit.record(db, audit.Event("config_loaded", actor="nodal", detail={"sha256": "ab"}))
    with TestClient(app) as c:
        assert c.get("/healthz").json() == {"status": "alive"}
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["failing"] == ["model_loaded"]
        loaded["value"] = True
        r = c.get("/readyz")
        assert r.status_code == 200, r.json()
        assert set(r.json()["checks"]) == {"model_loaded", "index_writable", "spool_writable", "disk_space"}
        receiver.min_free_bytes = 0
        m = c.get("/metrics")
        assert m.status_code == 200 and "nodal_instances_received_total" in m.text
        events = c.get("/api/audit", params={"event": "config_loaded"}).json()["events"]
        assert events[0]["detail"] == {"sha256": "ab"} and events[0]["at"].endswith("+00:00")
        assert c.get("/api/audit", params={"since": "2999-01-01T00:00:00"}).json()["events"] == []
        assert c.get("/api/audit", params={"event": "nope"}).status_code == 400
        assert c.get("/api/audit", params={"since": "yesterday"}).status_code == 400
    full = create_app(
        Settings.model_validate({"spool": {"min_free_mb": 2**40}}), db, receiver, ready=lambda: True
    )
    with TestClient(full) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["failing"] == ["disk_space"]
        assert "below spool.min_free_mb" in r.json()["checks"]["disk_space"]["detail"]


def test_job_watcher_observes_each_finished_job_once(node):
    db, receiver, _ = node
    s = settings(destinations=[])
    receive(receiver, n=4, series="1.2.3.50")
    watcher = JobWatcher(db, has_destinations=False, t=time.time())
    [job_id] = complete(db, s)
    before = {
        "segment": sample("nodal_segment_duration_seconds_count"),
        "e2e": sample("nodal_end_to_end_seconds_count"),
        "done": sample("nodal_jobs_finished_total", state="done"),
        "malignant": sample("nodal_malignant_calls_total"),
    }
    with db.session() as ses:
        job = ses.get(Job, job_id)
        job.state, job.finished_at, job.findings, job.malignant = JobState.DONE, time.time(), 3, 2
        job.seconds = json.dumps({"load": 0.5, "segment": 4.0, "classify": 0.2, "encode": 0.3})
    assert watcher.poll(time.time()) == 1
    assert watcher.poll(time.time()) == 0  # seen once only
    assert sample("nodal_segment_duration_seconds_count") == before["segment"] + 1
    assert sample("nodal_end_to_end_seconds_count") == before["e2e"] + 1  # no destinations: at job end
    assert sample("nodal_jobs_finished_total", state="done") == before["done"] + 1
    assert sample("nodal_malignant_calls_total") == before["malignant"] + 2
    [ev] = audit.query(db, event="job_finished")
    assert ev["job_id"] == job_id and ev["count"] == 3 and ev["detail"]["state"] == "done"
    # a new watcher (a restart) does not count the same job again
    assert JobWatcher(db, has_destinations=False, t=time.time()).poll(time.time()) == 0


def test_end_to_end_observed_once_every_result_is_delivered(node):
    db = node[0]
    s = settings()
    job_id, outbox = done_job(node, s)
    before = sample("nodal_end_to_end_seconds_count")
    fake = FakeSender(failing={f"9.9.{job_id}.1"})
    t = time.time()
    deliver_due(db, s, outbox, t, lambda d, st, r: fake)
    assert sample("nodal_end_to_end_seconds_count") == before  # one instance still to retry
    fake.failing.clear()
    deliver_due(db, s, outbox, t + 11, lambda d, st, r: fake)
    assert sample("nodal_end_to_end_seconds_count") == before + 1
    transferred = audit.query(db, event="results_transferred")
    assert {e["actor"] for e in transferred} == {"pacs", "web"}
    assert any(e["outcome"] == "failure" and e["detail"]["failed"] == 1 for e in transferred)


# -- deploy/: Prometheus rules and the Grafana dashboard ------------------------------------

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing (Debian package prometheus)")


@needs_promtool
def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    rules = DEPLOY / "prometheus"
    check = subprocess.run(
        [PROMTOOL, "check", "rules", "alerts.yml"], cwd=rules, capture_output=True, text=True
    )
    found = f"SUCCESS: {len(alert_names())} rules found"
    assert check.returncode == 0 and found in check.stdout, check.stdout + check.stderr
    tested = {
        t["alertname"]
        for case in yaml.safe_load((rules / "alerts_test.yml").read_text())["tests"]
        for t in case["alert_rule_test"]
    }
    assert tested == set(alert_names())  # every alert has its unit test
    tests = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=rules, capture_output=True, text=True
    )
    assert tests.returncode == 0 and "SUCCESS" in tests.stdout, tests.stdout + tests.stderr
    config = subprocess.run(
        [PROMTOOL, "check", "config", "prometheus.yml"], cwd=rules, capture_output=True, text=True
    )
    assert config.returncode == 0, config.stdout + config.stderr


def alert_rules() -> list[dict]:
    import yaml

    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    import yaml

    tests = yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text())["tests"]
    for rule in alert_rules():
        cases = [c for t in tests for c in t["alert_rule_test"] if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in cases), f"{rule['alert']}: no firing case"
        assert any(not c["exp_alerts"] for c in cases), f"{rule['alert']}: no quiet case"


def used_metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bnodal_[a-z0-9_]+\b", expr))


def test_dashboard_and_alerts_name_only_metrics_nodal_exposes():
    doc = json.loads((DEPLOY / "grafana" / "nodal-dashboard.json").read_text())
    assert doc["title"] == "nodal" and doc["uid"]
    exprs = dashboard_exprs() + [r["expr"] for r in alert_rules()]
    assert len(exprs) >= 30
    known = metrics.metric_names()
    for expr in exprs:
        unknown = used_metric_names(expr) - known
        assert not unknown, (expr, unknown)
    titles = " ".join(p["title"] for p in doc["panels"]).lower()
    for needed in (
        "instances received",
        "queue depth",
        "stages p95",
        "failures by destination",
        "gpu",
        "spool",
    ):
        assert needed in titles, needed


def test_associations_counted_open_accepted_and_rejected_by_reason(tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from dicom_node.receive.receiver import Receiver
    from dicom_node.receive.scp import DimseServer
    from dicom_node.spool.store import Spool
    from tests.helpers.peers import free_port

    port = free_port()
    s = Settings.model_validate(
        {
            "node": {"dimse_port": port, "bind_address": "127.0.0.1", "max_associations": 1},
            "allowed_callers": [{"ae_title": "CT1"}],
        }
    )
    db = Database(f"sqlite:///{tmp_path / 'i.sqlite3'}")
    spool = Spool(tmp_path / "spool")
    receiver = Receiver(spool, db)
    server = DimseServer(s, receiver)
    server.start()
    before = {
        r: sample("nodal_associations_rejected_total", reason=r)
        for r in ("calling_ae_unknown", "association_limit")
    }
    accepted = sample("nodal_associations_accepted_total")

    def associate(calling):
        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        return ae.associate("127.0.0.1", port, ae_title="NODAL")

    try:
        first = associate("CT1")
        assert first.is_established and sample("nodal_associations_active") >= 1
        second = associate("CT1")  # over node.max_associations
        assert second.is_rejected
        assert not associate("NOBODY").is_established
        first.release()
        wait_until(lambda: sample("nodal_associations_active") == 0, 5, "the association to end", 0.05)
        assert sample("nodal_associations_accepted_total") == accepted + 1
        assert (
            sample("nodal_associations_rejected_total", reason="association_limit")
            == before["association_limit"] + 1
        )
        assert (
            sample("nodal_associations_rejected_total", reason="calling_ae_unknown")
            == before["calling_ae_unknown"] + 1
        )
        # pynetdicom reports its own rejection after answering it
        wait_until(lambda: len(audit.query(db, event="association")) == 3, 5, "3 audit events", 0.05)
        events = audit.query(db, event="association")
        assert sorted((e["actor"], e["outcome"]) for e in events) == [
            ("CT1", "failure"),
            ("CT1", "success"),
            ("NOBODY", "failure"),
        ]
    finally:
        server.stop(1)
        receiver.close()
        spool.close()
        db.close()


def test_docs_list_every_metric():
    doc = (ROOT / "docs" / "monitoring.md").read_text()
    names = set(metrics.STATE_HELP)
    for c in nodal_collectors():
        [family] = c.describe()
        names.add(f"{family.name}_total" if isinstance(c, Counter) else family.name)
    missing = sorted(n for n in names if f"`{n}`" not in doc)
    assert not missing, f"docs/monitoring.md lacks {missing}"


def test_workers_publish_their_model_to_the_pool_for_model_info():
    from types import SimpleNamespace

    import torch

    from dicom_node.jobs.embedded import WorkerPool, _publish_model

    pool = WorkerPool(Settings.model_validate({"jobs": {"workers": 2}}), db=None)  # not started
    model = SimpleNamespace(name="nodal-ln-demo", version="0.3.1", device=torch.device("cpu"))
    slot = pool._slots[1]
    _publish_model(slot, model)
    assert pool.models() == []  # published, but not ready yet
    slot.ready.value = 1
    assert pool.models() == [{"name": "nodal-ln-demo", "version": "0.3.1", "device": "cpu"}]
    assert pool.gpu_bytes() == {}  # a CPU worker reports no GPU memory
    [info] = [
        m
        for m in metrics.state_metrics(metrics.NodeState(models=pool.models()))
        if m.name == "nodal_model_info"
    ]
    assert info.samples[0].labels == {"name": "nodal-ln-demo", "version": "0.3.1", "device": "cpu"}
