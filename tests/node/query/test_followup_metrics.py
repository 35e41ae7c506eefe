"""A job's queries and retrievals reach the metrics through its row (issue 17)."""

from __future__ import annotations

from dicom_node.observe import metrics
from dicom_node.observe.job_watcher import observe_followup


def value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_observed_once_per_operation_and_outcome():
    metrics.declare_query_destination("qpacs", ("find", "get"))
    assert value("nodal_qr_requests_total", destination="qpacs", operation="get", outcome="failure") == 0.0
    before = {
        "find": value("nodal_qr_requests_total", destination="qpacs", operation="find", outcome="success"),
        "get": value("nodal_qr_requests_total", destination="qpacs", operation="get", outcome="success"),
        "inst": value("nodal_qr_retrieved_instances_total", destination="qpacs"),
        "fu": value("nodal_followups_total", outcome="retrieve_failed"),
    }
    observe_followup(
        {
            "outcome": "retrieve_failed",
            "operations": [
                {
                    "destination": "qpacs",
                    "operation": "find",
                    "outcome": "success",
                    "seconds": 0.1,
                    "instances": 0,
                },
                {
                    "destination": "qpacs",
                    "operation": "get",
                    "outcome": "success",
                    "seconds": 1.5,
                    "instances": 48,
                },
                {"destination": "qpacs", "operation": "bogus", "outcome": "success", "seconds": 1.0},
            ],
        }
    )
    assert (
        value("nodal_qr_requests_total", destination="qpacs", operation="find", outcome="success")
        == before["find"] + 1
    )
    assert (
        value("nodal_qr_requests_total", destination="qpacs", operation="get", outcome="success")
        == before["get"] + 1
    )
    assert value("nodal_qr_retrieved_instances_total", destination="qpacs") == before["inst"] + 48
    assert value("nodal_followups_total", outcome="retrieve_failed") == before["fu"] + 1
    observe_followup(None)  # a job without follow-up changes nothing
    assert value("nodal_followups_total", outcome="retrieve_failed") == before["fu"] + 1
