"""Reading the node's metrics, alert rules and dashboard in the tests."""

from __future__ import annotations

import json

import yaml

from dicom_node.observe import metrics
from tests.helpers.peers import (
    ROOT,
)

DEPLOY = ROOT / "deploy"


def sample(name: str, **labels) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def alert_names() -> list[str]:
    """The alerts deploy/prometheus/alerts.yml defines."""
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    doc = json.loads((DEPLOY / "grafana" / "nodal-dashboard.json").read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
