"""Helpers for tests against real peers on 127.0.0.1: Orthanc, Prometheus and `nodal serve` as
subprocesses.

Orthanc runs with a generated configuration in a temporary folder (its own ports, nodal
as a DICOM modality, the DICOMweb plugin) and never as a system service.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_MODEL = ROOT / "inference" / "models" / "nodal-ln-demo"
DICOMWEB_PLUGINS = [
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
]


def _below_ephemeral() -> tuple[int, int]:
    """Ports the kernel never gives an outbound connection: below ip_local_port_range."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(1024, low - 12000), low


_GIVEN: set[int] = set()


def free_port() -> int:
    """A free port for a peer or a node to listen on.

    Not one from the kernel (`bind(0)`): that comes from the ephemeral range, and between this
    check and the peer's own bind an outbound connection (a sender, an HTTP client, a storescu)
    can be given the same port; Orthanc then fails to start with "Address already in use" (seen
    on a loaded CI machine). Ports below the ephemeral range are never handed out that way; each
    is given once per test process and checked free now."""
    low, high = _below_ephemeral()
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(low, high)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port in {low}-{high}")


def wait_until(check: Callable[[], object], timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def missing_binaries(*names: str) -> list[str]:
    return [n for n in names if shutil.which(n) is None]


def orthanc_binary() -> str | None:
    return (
        shutil.which("Orthanc")
        or shutil.which("orthanc")
        or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
    )


def dicomweb_plugin() -> Path | None:
    return next((p for p in DICOMWEB_PLUGINS if p.exists()), None)


def skip_reason(*binaries: str, dicomweb: bool = False) -> str | None:
    """Why a peer test cannot run here (binaries, Orthanc, its DICOMweb plugin, a model), or None."""
    missing = missing_binaries(*binaries)
    if orthanc_binary() is None:
        missing.append("Orthanc")
    if missing:
        return f"peer binaries missing: {', '.join(missing)} (`make peers` installs them)"
    if dicomweb and dicomweb_plugin() is None:
        return "the Orthanc DICOMweb plugin is missing (Debian package orthanc-dicomweb)"
    if model_dir() is None:
        return "no model: inference/models/nodal-ln-demo/model_card.json absent and no NODAL_TEST_MODEL_DIR"
    return None


def stop_process(proc: subprocess.Popen | None, timeout: float) -> int | None:
    """SIGTERM, then SIGKILL after `timeout` seconds; the exit code (None: no process)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def model_dir() -> Path | None:
    """The shipped model if present, else a development model (NODAL_TEST_MODEL_DIR or /tmp/m-smoke)."""
    if (SHIPPED_MODEL / "model_card.json").is_file():
        return SHIPPED_MODEL
    for candidate in (os.environ.get("NODAL_TEST_MODEL_DIR"), "/tmp/m-smoke"):
        if candidate and (Path(candidate) / "model_card.json").is_file():
            return Path(candidate)
    return None


class Orthanc:
    """An Orthanc server in a temporary folder with its own ports."""

    def __init__(self, folder: Path, aet: str = "ORTHANC", modalities: dict[str, list] | None = None):
        self.folder = folder
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.modalities = modalities or {}
        self.proc: subprocess.Popen | None = None

    def config(self) -> dict:
        plugin = dicomweb_plugin()
        return {
            "Name": f"nodal-test-{self.aet}",
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": self.modalities,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "MaximumPduLength": 131072,
            "StableAge": 3600,
            "Plugins": [str(plugin)] if plugin else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
        }

    def start(self, timeout: float = 30) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=1))
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 (kept open for the process)
        self.proc = subprocess.Popen([orthanc_binary(), str(cfg)], stdout=log, stderr=log, cwd=self.folder)
        wait_until(self.alive, timeout, "Orthanc to answer")
        return self

    def alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"Orthanc exited with {self.proc.returncode}; see {self.folder / 'orthanc.log'}"
            )
        try:
            return requests.get(f"{self.url}/system", timeout=1).ok
        except requests.RequestException:
            return False

    def stop(self) -> None:
        stop_process(self.proc, 20)
        self.proc = None

    def client(self):
        from orthanc_api_client import OrthancApiClient

        return OrthancApiClient(self.url)


NGINX_CONF = """daemon off;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log {folder}/access.log;
  client_body_temp_path {folder}/body;
  proxy_temp_path {folder}/proxy;
  fastcgi_temp_path {folder}/fastcgi;
  uwsgi_temp_path {folder}/uwsgi;
  scgi_temp_path {folder}/scgi;
  client_max_body_size 0;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location / {{
      proxy_pass {upstream};
      proxy_set_header Host $http_host;
      proxy_request_buffering off;
      proxy_buffering off;
    }}
  }}
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


class TlsProxy:
    """nginx terminating HTTPS in front of an HTTP peer, as sites put Orthanc behind one
    (Debian's Orthanc 1.10 crashes on its own HTTPS: docs/security.md)."""

    def __init__(self, folder: Path, upstream: str, cert: Path, key: Path):
        self.folder = folder
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.upstream = upstream
        self.cert, self.key = cert, key
        self.proc: subprocess.Popen | None = None

    def start(self, ca: Path, timeout: float = 20) -> TlsProxy:
        self.folder.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                folder=self.folder, port=self.port, cert=self.cert, key=self.key, upstream=self.upstream
            )
        )
        nginx = nginx_binary()
        assert nginx is not None
        self.proc = subprocess.Popen(
            [nginx, "-p", str(self.folder), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.folder / "stderr.log", "ab"),  # noqa: SIM115 (kept open for the process)
        )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}; see {self.folder}")
            try:
                return requests.get(f"{self.url}/system", timeout=1, verify=str(ca)).ok
            except requests.RequestException:
                return False

        wait_until(up, timeout, "nginx to answer over https")
        return self

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self.proc = None


class Nodal:
    """`nodal serve` with a generated configuration, as a subprocess."""

    def __init__(self, folder: Path, config: dict):
        self.folder = folder
        self.config = config
        self.http = f"http://127.0.0.1:{config['node']['http_port']}"
        self.proc: subprocess.Popen | None = None
        self.log_path = folder / "nodal.log"

    def start(self, timeout: float = 90, ready_path: str = "/readyz") -> Nodal:
        """Start and wait for `ready_path` to answer 200 (/healthz for a node without workers)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg = self.folder / "node.yaml"
        cfg.write_text(yaml.safe_dump(self.config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("NODAL_")}
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "--config", str(cfg), "serve"],
            stdout=log,
            stderr=log,
            cwd=ROOT,
            env=env,
        )
        try:
            wait_until(lambda: self.ready(ready_path), timeout, f"nodal to answer {ready_path}")
        except TimeoutError as e:
            raise TimeoutError(f"{e}; nodal's log ends:\n{self.log()[-3000:]}") from None
        return self

    def ready(self, path: str = "/readyz") -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"nodal exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        log = self.log()
        if "cannot load the model" in log:
            raise RuntimeError(
                "nodal's worker cannot load the model:\n" + log[log.index("cannot load the model") :][:1500]
            )
        try:
            return requests.get(f"{self.http}{path}", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def api(self, path: str):
        r = requests.get(f"{self.http}{path}", timeout=10)
        r.raise_for_status()
        return r.json()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 60) -> int | None:
        code = stop_process(self.proc, timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL: no clean-up at all (the workers die with it)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def node_config(data_dir: Path, dimse_port: int, model: Path, **sections) -> dict:
    """A test configuration: short quiet periods and retries, one worker, the given model."""
    cfg = {
        "node": {
            "ae_title": "NODAL",
            "dimse_port": dimse_port,
            "http_port": free_port(),
            "data_dir": str(data_dir),
            "bind_address": "127.0.0.1",
        },
        "completion": {"quiet_seconds": 2.0, "after_release_seconds": 1.0, "check_interval_seconds": 0.5},
        "jobs": {
            "workers": 1,
            "lease_seconds": 6.0,
            "retry_delay_seconds": 1.0,
            "shutdown_grace_seconds": 5.0,
        },
        "delivery": {"retry_initial_seconds": 1.0, "retry_max_seconds": 2.0, "check_interval_seconds": 0.5},
        "inference": {"model_dir": str(model), "threads": 2},
        "spool": {"min_free_mb": 0, "log_segment_mb": 4},  # small log segments: quick to create
        "retention": {"min_free_gb": 0.0},
    }
    for key, value in sections.items():
        cfg[key] = value
    return cfg


class Prometheus:
    """A Prometheus server in a temporary folder scraping one target (job "nodal") every second,
    with the shipped alert rules loaded."""

    def __init__(self, folder: Path, target: str):
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.target = target
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> Prometheus:
        self.folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "deploy" / "prometheus" / "alerts.yml", self.folder / "alerts.yml")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": "nodal", "static_configs": [{"targets": [self.target]}]}],
        }
        (self.folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = open(self.folder / "prometheus.log", "ab")  # noqa: SIM115 (kept open for the process)
        self.proc = subprocess.Popen(
            [
                shutil.which("prometheus") or "prometheus",
                f"--config.file={self.folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=log,
            cwd=self.folder,
        )
        wait_until(self.alive, timeout, "Prometheus to answer")
        return self

    def alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"Prometheus exited; see {self.folder / 'prometheus.log'}")
        try:
            return requests.get(f"{self.url}/-/ready", timeout=1).ok
        except requests.RequestException:
            return False

    def query(self, expr: str) -> list[dict]:
        """The result of an instant query; AssertionError naming the query when Prometheus refuses it."""
        r = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"Prometheus refused {expr!r}: {body.get('error', r.text)}")
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        stop_process(self.proc, 20)
        self.proc = None


# --- scale-out peers: redis-server (Celery broker) and a throwaway PostgreSQL cluster ---


class Redis:
    """`redis-server` on a free 127.0.0.1 port, no persistence, in a temporary folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20) -> Redis:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "redis.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=log,
            stderr=log,
        )
        wait_until(self._answers, timeout, "redis-server to answer PING")
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"redis-server exited with {self.proc.returncode}; see {self.folder}/redis.log"
            )
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.proc, 20)
        self.proc = None


class NodalWorker:
    """`nodal worker` (queue.backend celery) as a subprocess, its log in `folder`."""

    def __init__(self, folder: Path, config: Path, name: str):
        self.name, self.log_path = name, folder / f"worker-{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("NODAL_")}
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "--config", str(config), "worker", "--name", name],
            stdout=log,
            stderr=log,
            cwd=ROOT,
            env=env,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"worker {self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}"
            )
        return "ready for jobs" in self.log()

    def owns(self, job: dict) -> bool:
        return bool(job["worker"]) and f":{self.proc.pid}:" in job["worker"]

    def done_jobs(self) -> list[int]:
        return [int(n) for n in re.findall(r"job (\d+): done in", self.log())]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def storescu(paths: list[Path], port: int, called_ae: str = "NODAL") -> None:
    """C-STORE `paths` with dcmtk's storescu (one association) as AE MODALITY."""
    subprocess.run(
        ["storescu", "-aet", "MODALITY", "-aec", called_ae, "127.0.0.1", str(port), *map(str, paths)],
        check=True,
        capture_output=True,
        timeout=120,
    )


def postgres_bin() -> Path | None:
    """The folder with initdb/pg_ctl/postgres (Debian keeps them off PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


class Postgres:
    """A throwaway PostgreSQL cluster on a free 127.0.0.1 port (trust auth, no fsync).

    PostgreSQL refuses to run as root; as root the cluster belongs to the `postgres` user
    (the Debian package creates it) and its commands run through `runuser`."""

    def __init__(self):
        import tempfile

        self.folder = Path(tempfile.mkdtemp(prefix="nodal-pg-"))
        self.port = free_port()
        self.url = f"postgresql+psycopg://nodal@127.0.0.1:{self.port}/nodal"
        self.bin = postgres_bin()
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *cmd: str) -> None:
        subprocess.run([*self._as, *cmd], check=True, capture_output=True, cwd=self.folder)

    def start(self) -> Postgres:
        if self._as:
            shutil.chown(self.folder, "postgres", "postgres")
        data = self.folder / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-U", "nodal", "-A", "trust", "-E", "UTF8")
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c fsync=off"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            opts,
            "-l",
            str(self.folder / "pg.log"),
            "-w",
            "start",
        )
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "nodal", "nodal")
        return self

    def stop(self) -> None:
        if (self.folder / "data" / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)


def study_series(orthanc: Orthanc, study_uid: str) -> list[dict]:
    """[{modality, instances: [orthanc ids]}] of the study in Orthanc (empty when absent)."""
    found = requests.post(f"{orthanc.url}/tools/lookup", data=study_uid, timeout=10).json()
    ids = [f["ID"] for f in found if f["Type"] == "Study"]
    if not ids:
        return []
    series = requests.get(f"{orthanc.url}/studies/{ids[0]}/series", timeout=10).json()
    return [{"modality": s["MainDicomTags"].get("Modality"), "instances": s["Instances"]} for s in series]
