"""Configuration: one YAML file, every key overridable by a `NODAL_...` environment variable.

The defaults here are the embedded defaults (`conf/node.yaml` spells them out for people
and a test keeps the two equal). Sources, strongest first: environment variables
(`NODAL_NODE__AE_TITLE=...`, `__` between levels), the YAML file (`--config` or
`NODAL_CONFIG`), the defaults. Unknown keys and wrong values stop start-up with one line
per problem.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)
from pydicom import uid

CONFIG_ENV = "NODAL_CONFIG"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


AE_TITLE = r"^[ -~]*[!-~][ -~]*$"  # 1-16 printable ASCII characters, not all spaces
CT_IMAGE_STORAGE = str(uid.CTImageStorage)
ENHANCED_CT_IMAGE_STORAGE = str(uid.EnhancedCTImageStorage)
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = str(uid.LegacyConvertedEnhancedCTImageStorage)


# -- security: TLS and secrets (docs/security.md) --


def read_secret(inline: SecretStr | None, path: Path | None, what: str) -> str | None:
    """The secret given inline (env var) or in a file (first line, whitespace stripped)."""
    if inline is not None:
        return inline.get_secret_value()
    if path is None:
        return None
    try:
        value = path.read_text().strip()
    except OSError as e:
        raise ConfigError(
            f"{what}: cannot read {path} ({e.strerror}); check the path and its permissions"
        ) from None
    if not value:
        raise ConfigError(f"{what}: {path} is empty")
    return value


class ServerTls(_Section):
    enabled: bool = False
    cert_file: Path | None = Field(None, description="PEM certificate (chain) this server presents")
    key_file: Path | None = Field(None, description="PEM private key of cert_file (readable by nodal only)")
    ca_file: Path | None = Field(
        None, description="PEM CA certificates that client certificates must chain to"
    )
    require_client_cert: bool = Field(False, description="mutual TLS: refuse clients without a valid cert")

    @model_validator(mode="after")
    def _complete(self) -> ServerTls:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("TLS is enabled but cert_file or key_file is not set")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CA that signs client certificates)")
        return self


class ClientTls(_Section):
    enabled: bool = False
    ca_file: Path | None = Field(None, description="PEM CA certificates to verify the peer; null: system CAs")
    cert_file: Path | None = Field(None, description="client certificate, for peers that require one")
    key_file: Path | None = None
    check_hostname: bool = Field(True, description="the peer's certificate must name its host")

    @model_validator(mode="after")
    def _pair(self) -> ClientTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class HttpAuth(_Section):
    token: SecretStr | None = Field(
        None, description="bearer token for STOW-RS and the API; set as NODAL_NODE__HTTP_AUTH__TOKEN"
    )
    token_file: Path | None = Field(None, description="... or read it from this file")


class HttpLimits(_Section):
    header_timeout_seconds: float = Field(
        10.0, gt=0, le=600, description="a connection must send a request's headers within this"
    )
    body_timeout_seconds: float = Field(
        30.0, gt=0, le=3600, description="a STOW-RS upload that moves no bytes this long is closed"
    )
    max_uploads: int = Field(32, ge=1, le=10000, description="concurrent STOW-RS uploads, all clients")
    max_uploads_per_client: int = Field(
        8, ge=1, le=10000, description="concurrent STOW-RS uploads from one address"
    )
    max_body_mb: int = Field(4096, ge=1, description="largest STOW-RS request body (MiB)")


class NodeSection(_Section):
    ae_title: str = Field("NODAL", min_length=1, max_length=16, pattern=AE_TITLE)
    dimse_port: int = Field(11112, ge=1, le=65535)
    http_port: int = Field(8080, ge=1, le=65535)
    monitoring_port: int | None = Field(
        None, ge=1, le=65535, description="also serve /metrics, /healthz, /readyz here; null = off"
    )
    data_dir: Path = Path("var")
    bind_address: str = Field("0.0.0.0", min_length=1, description="address both receivers listen on")
    max_associations: int = Field(
        10, ge=1, le=1000, description="simultaneous established DIMSE associations"
    )
    artim_seconds: float = Field(
        5.0, gt=0, le=300, description="ARTIM: a new DIMSE connection must send A-ASSOCIATE-RQ within this"
    )
    max_pending_connections: int = Field(
        128, ge=1, le=10000, description="DIMSE connections still negotiating (before the association is up)"
    )
    min_open_files: int = Field(
        4096, ge=0, description="warn at start when the open-file limit (raised to the hard one) is lower"
    )
    max_connections_per_host: int = Field(
        16, ge=1, le=10000, description="simultaneous DIMSE connections from one address, negotiating or not"
    )
    max_pdu_bytes: int = Field(131072, ge=4096, le=16_777_216, description="largest PDU nodal accepts")
    tcp_nodelay: bool = True  # Nagle off on DIMSE sockets: a 2-10x difference on small instances
    dimse_timeout_seconds: float = Field(60.0, gt=0)
    network_timeout_seconds: float = Field(60.0, gt=0)
    dimse_tls: ServerTls = ServerTls()  # DICOM TLS on dimse_port (PS3.15 B.1)
    http_tls: ServerTls = ServerTls()  # HTTPS on http_port
    http_auth: HttpAuth = HttpAuth()  # no token: STOW-RS and the API are open (a warning is logged)
    http_limits: HttpLimits = HttpLimits()  # timeouts and caps against stalled or too many uploads


class AllowedCaller(_Section):
    ae_title: str = Field(min_length=1, max_length=16, pattern=AE_TITLE)
    host: str | None = Field(None, description="IP address or host name the caller must come from")
    port: int | None = Field(
        None, ge=1, le=65535, description="the caller's own DIMSE port, for `reply` destinations"
    )


class SpoolSection(_Section):
    durability: Literal["fsync", "log", "syncfs"] = Field(
        "log",
        description="log: append to a preallocated write-ahead log and fdatasync it (files made durable "
        "in bulk, replayed at start); fsync: fsync file and folder (POSIX); syncfs: one syncfs per batch",
    )
    log_segment_mb: int = Field(
        128,
        ge=1,
        le=4096,
        description="size of each of the 4 write-ahead log segments (durability: log); files are written "
        "during a transfer only once half the log is taken, so half of it should hold a whole study",
    )
    min_free_mb: int = Field(
        1024, ge=0, description="below this much free space new instances are refused (0xA700 / 503)"
    )


class CompletionSection(_Section):
    quiet_seconds: float = Field(
        30.0, gt=0, description="a study is complete this long after its last instance"
    )
    after_release_seconds: float = Field(
        5.0, ge=0, description="... or this long once every association that brought it was released"
    )
    check_interval_seconds: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _release_not_longer(self) -> CompletionSection:
        if self.after_release_seconds > self.quiet_seconds:
            raise ValueError("after_release_seconds must not be longer than quiet_seconds")
        return self


def _check_regexes(values: list[str]) -> list[str]:
    for v in values:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"{v!r} is not a regular expression: {e}") from None
    return values


class RoutingRule(_Section):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    modalities: list[str] = ["CT"]
    sop_classes: list[str] = Field([CT_IMAGE_STORAGE], description="empty: any SOP class")
    image_type_contains: list[str] = Field(["AXIAL"], description="every value must be in Image Type")
    min_slice_thickness_mm: float = Field(0.0, ge=0)
    max_slice_thickness_mm: float = Field(5.0, gt=0)
    min_slices: int = Field(20, ge=1, description="instances (frames for multi-frame) in the series")
    include_descriptions: list[str] = Field([], description="regexes; when any given, one must match")
    exclude_descriptions: list[str] = Field(["(?i)scout|topogram|locali[sz]er|surview|dose"])

    _regexes = field_validator("include_descriptions", "exclude_descriptions")(_check_regexes)

    @model_validator(mode="after")
    def _thickness_range(self) -> RoutingRule:
        if self.min_slice_thickness_mm > self.max_slice_thickness_mm:
            raise ValueError("min_slice_thickness_mm is larger than max_slice_thickness_mm")
        return self


def _default_rules() -> list[RoutingRule]:
    return [
        RoutingRule(name="axial-ct"),
        RoutingRule(
            name="enhanced-ct",
            sop_classes=[ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE],
            image_type_contains=[],
        ),
    ]


# Kernels of sharp reconstructions (descriptions where a series names no kernel): lung and
# bone by name; Siemens kernels of sharpness 50 and above (B60f, Br64, Bl57, I70f, Hr60);
# Canon FC5x-FC9x (lung and high-resolution kernels).
SHARP_KERNELS = ["(?i)lung|bone|sharp|edge|detail", "^[A-Z][a-z]?[5-9][0-9]", "^FC[5-9][0-9]"]


class RoutingSection(_Section):
    rules: list[RoutingRule] = Field(
        default_factory=_default_rules, description="a series runs if any rule matches"
    )
    one_per_scan: bool = Field(
        True,
        description="of the selected series that reconstruct one scan (same frame of reference, "
        "overlapping acquisition times, same stretch of body), analyse one: original before derived, "
        "slices up to thin_slices_mm before thicker, soft-tissue kernel before sharp, then the "
        "thinnest; the others are skipped with the reason",
    )
    sharp_kernels: list[str] = Field(
        SHARP_KERNELS,
        description="regexes on Convolution Kernel (on Series Description where a series names no "
        "kernel) that mark a sharp (lung, bone) reconstruction, chosen after a soft-tissue one",
    )
    thin_slices_mm: float = Field(
        2.5,
        gt=0,
        description="reconstructions up to this Slice Thickness are chosen before thicker ones, "
        "whatever their kernel: the model card's limits.max_slice_spacing_mm (the demo model's: 2.5)",
    )

    _regexes = field_validator("sharp_kernels")(_check_regexes)


class _Destination(_Section):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    send_results: bool = Field(
        True,
        description="false: nodal sends no results here and only asks it for priors (query-only: "
        "needs a query role)",
    )


# -- issue 17: the query role of a destination (docs/follow-up.md) --


class DimseQuery(_Section):
    """nodal may also ask this PACS (C-FIND, study root) and fetch from it (C-GET or C-MOVE)."""

    retrieve: Literal["get", "move"] = Field(
        "get",
        description="get: C-GET on the query association (nothing to register in the PACS beyond "
        "nodal's AE); move: C-MOVE to move_destination (the PACS must know that AE's host and port)",
    )
    move_destination: str | None = Field(
        None,
        min_length=1,
        max_length=16,
        pattern=AE_TITLE,
        description="the AE title the PACS moves to; null: node.ae_title (nodal's own receiver)",
    )
    timeout_seconds: float = Field(
        300.0, gt=0, description="the longest a query or a whole retrieval may take"
    )


class DicomwebQuery(_Section):
    """nodal may also ask this DICOMweb service (QIDO-RS) and fetch from it (WADO-RS)."""

    url: str | None = Field(
        None, pattern=r"^https?://", description="the QIDO-RS/WADO-RS base; null: the destination's url"
    )
    timeout_seconds: float = Field(300.0, gt=0, description="the longest one request may take")


# -- end issue 17 --


class DimseDestination(_Destination):
    kind: Literal["dimse"]
    ae_title: str = Field(min_length=1, max_length=16, pattern=AE_TITLE)
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    timeout_seconds: float = Field(60.0, gt=0)
    tls: ClientTls = ClientTls()
    query: DimseQuery | None = Field(None, description="null: results only; set: also a query/retrieve peer")


class ReplyDestination(_Destination):
    kind: Literal["reply"]
    timeout_seconds: float = Field(60.0, gt=0)


class _HttpDestination(_Destination):
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = Field(None, description="the password in a file instead (preferred)")
    timeout_seconds: float = Field(60.0, gt=0)
    ca_file: Path | None = Field(
        None, description="PEM CA certificates for an https:// url; null: system CAs"
    )

    @field_validator("url", check_fields=False)
    @classmethod
    def _no_credentials_in_url(cls, url: str) -> str:
        if "@" in url.split("//", 1)[-1].split("/", 1)[0]:
            raise ValueError("the url holds credentials; use username and password_file (kept out of logs)")
        return url

    def secret(self) -> str | None:
        return read_secret(self.password, self.password_file, f"destination {self.name}: password")


class DicomwebDestination(_HttpDestination):
    kind: Literal["dicomweb"]
    url: str = Field(pattern=r"^https?://", description="the STOW-RS base, e.g. http://pacs:8042/dicom-web")
    query: DicomwebQuery | None = Field(
        None, description="null: results only; set: also a QIDO-RS/WADO-RS peer"
    )


class OrthancDestination(_HttpDestination):
    kind: Literal["orthanc"]
    url: str = Field(pattern=r"^https?://", description="Orthanc's REST root, e.g. http://pacs:8042")


Destination = Annotated[
    DimseDestination | ReplyDestination | DicomwebDestination | OrthancDestination,
    Field(discriminator="kind"),
]


class JobsSection(_Section):
    workers: int = Field(1, ge=0, description="in-process worker processes; 0 = receive only")
    lease_seconds: float = Field(
        60.0, ge=2, description="a job whose worker stops renewing is taken up again"
    )
    time_limit_seconds: float = Field(1800.0, gt=0, description="a job running longer is stopped")
    max_attempts: int = Field(3, ge=1)
    retry_delay_seconds: float = Field(
        30.0, ge=0, description="first wait before a failed attempt runs again"
    )
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="on SIGTERM, running jobs may finish this long, then are re-queued"
    )


class QueueSection(_Section):
    backend: Literal["embedded", "celery"] = Field(
        "embedded",
        description="embedded: jobs.workers processes inside `nodal serve`; celery: `nodal worker` processes",
    )
    broker_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Celery broker (redis:// or amqp://); celery backend only"
    )
    queue_name: str = Field("nodal", min_length=1, description="Celery queue the jobs are announced on")
    republish_seconds: float = Field(
        60.0,
        gt=0,
        description="a due job still unclaimed this long after its announcement is announced again",
    )


class DeliverySection(_Section):
    retry_initial_seconds: float = Field(30.0, gt=0)
    retry_max_seconds: float = Field(900.0, gt=0)
    expire_hours: float = Field(72.0, gt=0, description="undelivered results are marked failed after this")
    check_interval_seconds: float = Field(1.0, gt=0)


class RetentionSection(_Section):
    spool_days: float = Field(
        7.0, ge=0, description="received instances kept after their study was processed"
    )
    outbox_days: float = Field(7.0, ge=0, description="result files kept after delivery")
    min_free_gb: float = Field(10.0, ge=0, description="below this, delete the oldest finished data earlier")
    interval_seconds: float = Field(600.0, gt=0)


class IndexSection(_Section):
    url: str | None = Field(None, description="SQLAlchemy URL; null = SQLite file <data_dir>/index.sqlite3")


class SlidingWindow(_Section):
    roi: int = Field(96, ge=32, description="cube side of a window, working voxels")
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    batch_size: int = Field(2, ge=1)


class InferenceSection(_Section):
    model_dir: Path | None = None  # None: the demo model shipped in inference/models
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    threads: int = Field(0, ge=0, description="CPU threads for torch; 0 = all cores")
    sliding_window: SlidingWindow = SlidingWindow()
    threshold: float | None = Field(
        None, gt=0.0, lt=1.0, description="node mask threshold; None = the model card's segmenter.threshold"
    )
    min_node_volume_mm3: float = Field(20.0, ge=0.0)
    boundary_refine_mm: float = Field(
        3.0, ge=0.0, le=10.0, description="settle each node's edge on the CT within this distance; 0 = off"
    )
    malignancy_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    plausibility: bool = Field(
        True, description="drop candidates that break the model card's plausibility rules; false = off"
    )


class VolumeSection(_Section):
    min_slices: int = Field(8, ge=2)
    max_tilt_degrees: float = Field(2.0, ge=0.0, le=45.0)
    gap_factor: float = Field(1.5, gt=1.0)


class ResultsSection(_Section):
    result_images: bool = True
    omit_empty_frames: bool = True
    editable_in_ohif: bool = Field(
        False, description="SR axes that OHIF offers as editable measurements (docs/results.md)"
    )


class StatusPageSection(_Section):
    enabled: bool = Field(True, description="the status page at / (behind node.http_auth when set)")
    viewer_url: str | None = Field(
        None,
        description="link to open a study in a viewer; {StudyInstanceUID} is replaced, "
        "e.g. http://ohif:3000/viewer?StudyInstanceUIDs={StudyInstanceUID}",
    )
    refresh_seconds: float = Field(5.0, ge=1.0, le=3600.0, description="the page polls its data this often")
    page_size: int = Field(50, ge=10, le=500, description="studies per page of the list")
    live_window_minutes: float = Field(5.0, gt=0, le=1440.0, description="'instances in the last minutes'")
    show_patient: bool = Field(
        False,
        description="show patient name and ID on the page; only then does the index keep them "
        "(off: they are never stored, and those stored earlier are erased at start)",
    )


# -- issue 17: follow-up studies (docs/follow-up.md) --


class FollowUpSection(_Section):
    enabled: bool = Field(
        True,
        description="compare each analysed study with the patient's prior; acts only when a "
        "destination has a query role (nothing is asked of any PACS otherwise)",
    )
    query_destination: str | None = Field(
        None, description="the destination to ask for priors; null: the first one with a query role"
    )
    lookback_days: int = Field(730, ge=1, le=36500, description="priors older than this are not considered")
    same_body_part: bool = Field(
        True, description="the prior's Body Part Examined must equal the current one's (when both say)"
    )
    same_contrast: bool = Field(
        True, description="contrast given in both or in neither (Contrast/Bolus Agent, when both say)"
    )
    max_candidates: int = Field(5, ge=1, le=50, description="prior studies looked at, most recent first")
    send_prior_results: bool = Field(
        True,
        description="a prior nodal analysed now (no SR of nodal's in the PACS) has its SEG and SR sent "
        "with the current results, so that the tracking UIDs the new SR carries over exist there",
    )
    registration: Literal["affine", "rigid", "none"] = Field(
        "affine", description="how the prior CT is brought onto the current one (docs/follow-up-criteria.md)"
    )


# -- end issue 17 --


class LoggingSection(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = Field("text", description="json: one JSON object per line")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="NODAL_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    node: NodeSection = NodeSection()
    allowed_callers: list[AllowedCaller] = Field(
        [], description="empty: any calling AE is accepted (and logged)"
    )
    spool: SpoolSection = SpoolSection()
    index: IndexSection = IndexSection()
    completion: CompletionSection = CompletionSection()
    routing: RoutingSection = RoutingSection()
    destinations: list[Destination] = Field([], description="empty: results stay in the outbox and the API")
    jobs: JobsSection = JobsSection()
    queue: QueueSection = QueueSection()
    delivery: DeliverySection = DeliverySection()
    retention: RetentionSection = RetentionSection()
    inference: InferenceSection = InferenceSection()
    volume: VolumeSection = VolumeSection()
    results: ResultsSection = ResultsSection()
    status_page: StatusPageSection = StatusPageSection()
    followup: FollowUpSection = FollowUpSection()  # issue 17
    logging: LoggingSection = LoggingSection()

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        for what, names in (
            ("destinations", [d.name for d in self.destinations]),
            ("routing.rules", [r.name for r in self.routing.rules]),
        ):
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"{what}: names must be unique, repeated: {', '.join(twice)}")
        self._check_query_destination()
        idle = [d.name for d in self.destinations if not d.send_results and getattr(d, "query", None) is None]
        if idle:
            raise ValueError(
                f"destinations {', '.join(idle)}: send_results is false and there is no query role: "
                "nodal would neither send to them nor ask them"
            )
        return self

    def _check_query_destination(self) -> None:  # issue 17
        name = self.followup.query_destination
        if name is None:
            return
        dest = next((d for d in self.destinations if d.name == name), None)
        if dest is None:
            raise ValueError(f"followup.query_destination: no destination named {name!r}")
        if getattr(dest, "query", None) is None:
            raise ValueError(f"followup.query_destination: destination {name!r} has no query role (query:)")

    def result_destinations(self) -> list:
        """The destinations that receive the results (all but the query-only ones)."""
        return [d for d in self.destinations if d.send_results]

    def query_peer(self) -> DimseDestination | DicomwebDestination | None:
        """The destination nodal asks for priors and retrievals, or None (issue 17)."""
        for d in self.destinations:
            asked = self.followup.query_destination in (None, d.name)
            if isinstance(d, DimseDestination | DicomwebDestination) and d.query is not None and asked:
                return d
        return None

    def index_url(self) -> str:
        return self.index.url or f"sqlite:///{self.node.data_dir / 'index.sqlite3'}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = settings_cls.model_config.get("yaml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


class ConfigError(ValueError):
    """The configuration is wrong; the message has one line per problem."""


def load_settings(path: str | Path | None = None) -> Settings:
    """Read the YAML file (if any) under the environment overrides, or raise ConfigError."""
    chosen = path or os.environ.get(CONFIG_ENV)
    if chosen is not None:
        chosen = Path(chosen)
        if not chosen.is_file():
            raise ConfigError(f"configuration file {chosen} does not exist")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(yaml_file=chosen)

    saved = os.environ.pop(CONFIG_ENV, None)  # not a setting itself
    try:
        return Settings.model_validate(_FromFile().model_dump())
    except ValidationError as e:
        raise ConfigError(_explain(e, chosen)) from None
    finally:
        if saved is not None:
            os.environ[CONFIG_ENV] = saved


def _explain(e: ValidationError, path: Path | None) -> str:
    where = f"in {path} or the NODAL_ environment" if path else "in the NODAL_ environment"
    lines = [f"invalid configuration ({where}):"]
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"])
        env = "NODAL_" + "__".join(str(p) for p in err["loc"]).upper()
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling against conf/node.yaml)")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {err['msg']}{shown}; set it in the file or as {env}")
    return "\n".join(lines)
