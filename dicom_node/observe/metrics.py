"""Every Prometheus metric of nodal, defined here and nowhere else.

Names follow the Prometheus conventions: prefix `nodal_`, base units (seconds, bytes),
`_total` on counters. Labels never carry patient data or a UID: their values come from
small fixed sets (receiver, outcome, reason, state, stage) or from the configuration
(destination names, the model's name and version, the device).

The metrics live in their own registry (`REGISTRY`, with the process metrics), served on
`/metrics` by the `nodal serve` process. Worker processes never touch them: a worker
records its stage timings, findings and malignant calls on the job row, and the serve
process observes them when it sees the job finish (`job_watcher.JobWatcher`). Values that are
state rather than events (jobs by state, queue depth, spool free space, model info, GPU
memory) are read at scrape time by `StateCollector`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# Every label name any nodal metric may carry (a test checks the definitions against it).
LABELS = frozenset(
    {
        "receiver",
        "outcome",
        "reason",
        "state",
        "destination",
        "name",
        "version",
        "device",
        "worker",
        "operation",
    }
)

# -- receiving ----------------------------------------------------------------------------

INSTANCES_RECEIVED = Counter(
    "nodal_instances_received_total",
    "Instances received, by receiver (dimse, stow) and outcome (stored, duplicate, refused)",
    ["receiver", "outcome"],
    registry=REGISTRY,
)
BYTES_RECEIVED = Counter(
    "nodal_received_bytes_total",
    "Bytes of instances stored or acknowledged as duplicates, by receiver",
    ["receiver"],
    registry=REGISTRY,
)
STORE_SECONDS = Histogram(
    "nodal_store_duration_seconds",
    "Time from an instance's bytes in hand to its answer (header read, durable write), by receiver",
    ["receiver"],
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)
RECEIVERS = ("dimse", "stow", "retrieve")  # retrieve: POST /api/retrieve fetched it (C-GET, WADO-RS)
RECEIVE_OUTCOMES = ("stored", "duplicate", "refused")  # the values of receive.receiver.Outcome
for _receiver in RECEIVERS:  # every known series exists from the start (at 0, not absent)
    STORE_SECONDS.labels(_receiver)
    BYTES_RECEIVED.labels(_receiver)
    for _outcome in RECEIVE_OUTCOMES:
        INSTANCES_RECEIVED.labels(_receiver, _outcome)
ASSOCIATIONS_ACTIVE = Gauge("nodal_associations_active", "DIMSE associations open now", registry=REGISTRY)
ASSOCIATIONS_ACCEPTED = Counter(
    "nodal_associations_accepted_total", "DIMSE associations accepted", registry=REGISTRY
)
ASSOCIATIONS_REJECTED = Counter(
    "nodal_associations_rejected_total",
    "DIMSE associations rejected, by reason (calling_ae_unknown, host_not_allowed, association_limit)",
    ["reason"],
    registry=REGISTRY,
)
CONNECTIONS_REFUSED = Counter(
    "nodal_connections_refused_total",
    "Connections closed by nodal's connection limits before or instead of serving them, by receiver "
    "(dimse, http) and reason (host_not_allowed, per_host_limit, pending_limit, artim_timeout, "
    "header_timeout, body_timeout, upload_limit, client_upload_limit, body_too_large)",
    ["receiver", "reason"],
    registry=REGISTRY,
)
# Deprecated since 2026-12-05: nodal_http_refused_total{reason=~"token_.*"} counts the same
# requests. Still counted, so that sites' dashboards and alerts keep working until they move;
# to be removed in a later release, announced in docs/monitoring.md.
HTTP_REFUSED = Counter(
    "nodal_http_requests_refused_total",
    'DEPRECATED, use nodal_http_refused_total{reason=~"token_.*"}. HTTP requests (STOW-RS, '
    "REST API) refused for want of the bearer token, by reason (missing, invalid)",
    ["reason"],
    registry=REGISTRY,
)
for _reason in ("missing", "invalid"):
    HTTP_REFUSED.labels(_reason)
# Every HTTP request refused as a whole, by reason; each is also logged at WARNING with the
# client's address. Reasons: token_missing, token_invalid (bearer token), media_type (not
# multipart/related of application/dicom), boundary, malformed_body, no_parts, study_uid
# (not a UID in the URL), not_acceptable (Accept names no format nodal answers in),
# nothing_stored (409), out_of_resources (503, spool disk almost full).
HTTP_REFUSAL_REASONS = (
    "token_missing",
    "token_invalid",
    "media_type",
    "boundary",
    "malformed_body",
    "no_parts",
    "study_uid",
    "not_acceptable",
    "nothing_stored",
    "out_of_resources",
)
HTTP_REFUSED_BY_REASON = Counter(
    "nodal_http_refused_total",
    "HTTP requests refused as a whole (STOW-RS, REST API), by reason",
    ["reason"],
    registry=REGISTRY,
)
for _reason in HTTP_REFUSAL_REASONS:  # every known reason exists from the start, at 0
    HTTP_REFUSED_BY_REASON.labels(_reason)
STUDIES_COMPLETED = Counter(
    "nodal_studies_completed_total",
    "Study completions (a study sent again later completes again; a reconstruction routed again is not one)",
    registry=REGISTRY,
)
RECEIVE_TO_COMPLETE = Histogram(
    "nodal_receive_to_complete_seconds",
    "From a study's first instance to its first completion (transfer plus quiet period)",
    buckets=(1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200, 1800, 3600, 7200),
    registry=REGISTRY,
)

# -- jobs (observed in the serve process from the job rows) ---------------------------------

JOBS_FINISHED = Counter(
    "nodal_jobs_finished_total",
    "Jobs that reached a final state (done, failed, skipped, superseded)",
    ["state"],
    registry=REGISTRY,
)
# One histogram per stage, each with buckets that fit the stage. Keys are the stage names
# the job function records in `Job.seconds`.
STAGE_BUCKETS: dict[str, tuple[float, ...]] = {
    "load": (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120),
    "preprocess": (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
    "segment": (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800),
    "measure": (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
    "verify": (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
    "check": (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),  # the checker (a CNN per candidate)
    "refine": (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
    "classify": (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
    "encode": (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120),
    "followup": (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),  # find, fetch, compare a prior
}
STAGE_SECONDS = {
    stage: Histogram(
        f"nodal_{stage}_duration_seconds",
        f"Time a job spent in the {stage} stage",
        buckets=buckets,
        registry=REGISTRY,
    )
    for stage, buckets in STAGE_BUCKETS.items()
}
JOB_SECONDS = Histogram(
    "nodal_job_duration_seconds",
    "Time of a successful job attempt, all stages",
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600),
    registry=REGISTRY,
)
FINDINGS_PER_STUDY = Histogram(
    "nodal_findings_per_study",
    "Lymph nodes found per analysed series",
    buckets=(0, 1, 2, 3, 5, 8, 13, 20, 30, 50),
    registry=REGISTRY,
)
MALIGNANT_CALLS = Counter(
    "nodal_malignant_calls_total",
    "Nodes with a malignancy probability at or above inference.malignancy_threshold",
    registry=REGISTRY,
)

# -- delivery ------------------------------------------------------------------------------

RESULTS_SENT = Counter(
    "nodal_results_sent_total",
    "Result instances delivered, by destination",
    ["destination"],
    registry=REGISTRY,
)
RESULTS_FAILED = Counter(
    "nodal_results_failed_total",
    "Result instances given up on (expired, or an error retrying cannot fix), by destination",
    ["destination"],
    registry=REGISTRY,
)
SEND_RETRIES = Counter(
    "nodal_send_retries_total",
    "Result instances whose send attempt failed and is tried again later, by destination",
    ["destination"],
    registry=REGISTRY,
)
SEND_SECONDS = Histogram(
    "nodal_send_duration_seconds",
    "Time to send one job's results to one destination (one association or request)",
    ["destination"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)


def declare_destinations(names: Iterable[str]) -> None:
    """The delivery series of each configured destination, at 0 from the start, so that
    `rate()` and the alert rules see zeros rather than absent series."""
    for name in names:
        RESULTS_SENT.labels(name)
        RESULTS_FAILED.labels(name)
        SEND_RETRIES.labels(name)
        SEND_SECONDS.labels(name)


END_TO_END = Histogram(
    "nodal_end_to_end_seconds",
    "From the first instance of a series received to its last result delivered "
    "(or to the job's end when no destination is configured)",
    buckets=(5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900, 1800, 3600, 7200, 14400),
    registry=REGISTRY,
)

# -- query and retrieve: nodal as a client of the PACS (issue 17, docs/follow-up.md) ------
# Queries and retrievals run in the workers (a prior's search) and in the serve process
# (POST /api/retrieve); a worker records its operations on the job row and the serve
# process observes them when the job finishes (`job_watcher`), like the stage timings.

QR_OPERATIONS = ("find", "get", "move", "qido", "wado")  # C-FIND, C-GET, C-MOVE; QIDO-RS, WADO-RS
QR_OUTCOMES = ("success", "failure")
QR_REQUESTS = Counter(
    "nodal_qr_requests_total",
    "Queries and retrievals nodal made as a client, by destination, operation (find, get, move: "
    "DIMSE; qido, wado: DICOMweb) and outcome (success, failure)",
    ["destination", "operation", "outcome"],
    registry=REGISTRY,
)
QR_SECONDS = Histogram(
    "nodal_qr_duration_seconds",
    "Time of one query or retrieval, by operation",
    ["operation"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
    registry=REGISTRY,
)
QR_INSTANCES = Counter(
    "nodal_qr_retrieved_instances_total",
    "Instances retrieved from a query destination (C-GET, C-MOVE, WADO-RS), by destination",
    ["destination"],
    registry=REGISTRY,
)
# What became of an analysed study's comparison with a prior: compared (results carry the
# comparison), no_prior (none within followup.lookback_days), query_failed (the PACS did not
# answer the search), retrieve_failed (the prior could not be fetched), prior_unusable (fetched,
# but neither nodal's SR nor the CT could be used), compare_failed (the comparison refused the
# inputs). Every outcome but compared sends the results as without follow-up.
FOLLOWUP_OUTCOMES = (
    "compared",
    "no_prior",
    "query_failed",
    "retrieve_failed",
    "prior_unusable",
    "compare_failed",
)
FOLLOWUPS = Counter(
    "nodal_followups_total",
    "Analysed studies by what became of their comparison with a prior study, by outcome",
    ["outcome"],
    registry=REGISTRY,
)
for _op in QR_OPERATIONS:
    QR_SECONDS.labels(_op)
for _outcome in FOLLOWUP_OUTCOMES:
    FOLLOWUPS.labels(_outcome)


def declare_query_destination(name: str, operations: Iterable[str]) -> None:
    """The query series of the configured query destination, at 0 from the start."""
    QR_INSTANCES.labels(name)
    for op in operations:
        for outcome in QR_OUTCOMES:
            QR_REQUESTS.labels(name, op, outcome)


def observe_qr(destination: str, operation: str, outcome: str, seconds: float, instances: int = 0) -> None:
    """One query or retrieval (from the API directly, from a job through its row)."""
    QR_REQUESTS.labels(destination, operation, outcome).inc()
    QR_SECONDS.labels(operation).observe(seconds)
    if instances:
        QR_INSTANCES.labels(destination).inc(instances)


# -- state read at scrape time (StateCollector) -------------------------------------------

JOBS = "nodal_jobs"
QUEUE_DEPTH = "nodal_queue_depth"
DELIVERIES_PENDING = "nodal_deliveries_pending"
SPOOL_FREE = "nodal_spool_free_bytes"
SPOOL_UNWRITTEN = "nodal_spool_log_unwritten_bytes"
WORKERS_READY = "nodal_workers_ready"
MODEL_INFO = "nodal_model_info"
GPU_MEMORY = "nodal_gpu_memory_used_bytes"

STATE_HELP = {
    JOBS: "Jobs in the index, by state",
    QUEUE_DEPTH: "Jobs queued and waiting for a worker",
    DELIVERIES_PENDING: "Result instances waiting to be delivered, by destination",
    SPOOL_FREE: "Free bytes on the file system of the spool",
    SPOOL_UNWRITTEN: "Acknowledged instance bytes held in the spool log whose files are not written yet",
    WORKERS_READY: "Worker processes with the model loaded",
    MODEL_INFO: "The model the workers run (always 1)",
    GPU_MEMORY: "GPU memory held by a worker's model (CUDA caching allocator), by worker",
}


@dataclass(frozen=True)
class NodeState:
    """What the serve process knows at scrape time."""

    jobs: dict[str, int] = field(default_factory=dict)  # state -> count
    queued: int = 0
    deliveries_pending: dict[str, int] = field(default_factory=dict)  # destination -> count
    spool_free_bytes: int | None = None
    spool_unwritten_bytes: int | None = None  # None: spool.durability is not log
    workers_ready: int = 0
    models: list[dict[str, str]] = field(default_factory=list)  # {name, version, device}
    gpu_bytes: dict[str, int] = field(default_factory=dict)  # worker -> bytes (CUDA only)


class StateCollector(Collector):
    """Turns a `NodeState` read at scrape time into gauges."""

    def __init__(self, read: Callable[[], NodeState] | None = None):
        self.read = read

    def collect(self) -> Iterable[Metric]:
        if self.read is None:
            return []
        return state_metrics(self.read())

    def describe(self) -> Iterable[Metric]:
        return []  # dynamic; nothing to check at registration


def state_metrics(st: NodeState) -> list[Metric]:
    out: list[Metric] = []
    jobs = GaugeMetricFamily(JOBS, STATE_HELP[JOBS], labels=["state"])
    for state, n in sorted(st.jobs.items()):
        jobs.add_metric([state], n)
    out.append(jobs)
    out.append(GaugeMetricFamily(QUEUE_DEPTH, STATE_HELP[QUEUE_DEPTH], value=st.queued))
    pending = GaugeMetricFamily(DELIVERIES_PENDING, STATE_HELP[DELIVERIES_PENDING], labels=["destination"])
    for dest, n in sorted(st.deliveries_pending.items()):
        pending.add_metric([dest], n)
    out.append(pending)
    if st.spool_free_bytes is not None:
        out.append(GaugeMetricFamily(SPOOL_FREE, STATE_HELP[SPOOL_FREE], value=st.spool_free_bytes))
    if st.spool_unwritten_bytes is not None:
        unwritten = st.spool_unwritten_bytes
        out.append(GaugeMetricFamily(SPOOL_UNWRITTEN, STATE_HELP[SPOOL_UNWRITTEN], value=unwritten))
    out.append(GaugeMetricFamily(WORKERS_READY, STATE_HELP[WORKERS_READY], value=st.workers_ready))
    info = GaugeMetricFamily(MODEL_INFO, STATE_HELP[MODEL_INFO], labels=["name", "version", "device"])
    for m in {(m["name"], m["version"], m["device"]) for m in st.models}:
        info.add_metric(list(m), 1)
    out.append(info)
    if st.gpu_bytes:
        gpu = GaugeMetricFamily(GPU_MEMORY, STATE_HELP[GPU_MEMORY], labels=["worker"])
        for worker, n in sorted(st.gpu_bytes.items()):
            gpu.add_metric([worker], n)
        out.append(gpu)
    return out


STATE = StateCollector()
REGISTRY.register(STATE)


def exposition() -> tuple[bytes, str]:
    """The text exposition of every metric and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def metric_names() -> set[str]:
    """Every metric name nodal exposes (sample names included: `_bucket`, `_count`, ...)."""
    names = set(STATE_HELP)
    for collector in list(REGISTRY._collector_to_names):  # the registry's own index
        if collector is STATE:
            continue
        for metric in collector.collect():
            names.add(metric.name)
            names.update(s.name for s in metric.samples)
    names.update({f"{n}_total" for n in list(names)})  # counters' family names lack _total
    return names
