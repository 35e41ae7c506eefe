"""Schema migrations of the index (Alembic, scripts in `dicom_node/index/migrations/versions`).

`nodal serve` and `nodal db upgrade` bring the index to the newest revision; `nodal worker`
processes only check it (several workers racing to migrate one PostgreSQL index would be
worse than one clear refusal). An index written before migrations existed (tables but no
`alembic_version`) has the schema of the first revision and is stamped with it before the
upgrade, so an old index is upgraded, never recreated.
"""

from __future__ import annotations

import logging

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger("nodal.schema")

FIRST_REVISION = "0001"


class SchemaOutdated(RuntimeError):
    """The index is older (or newer) than this version of nodal."""


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "dicom_node.index:migrations")
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"the migrations have {len(heads)} heads ({heads}); merge them")
    return heads[0]


def current(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Migrate to `revision`; returns (revision before, revision after)."""
    with engine.begin() as conn:
        before = MigrationContext.configure(conn).get_current_revision()
        cfg = alembic_config(conn)
        if before is None and inspect(conn).has_table("jobs"):
            log.info("index predates migrations: stamping it with revision %s", FIRST_REVISION)
            command.stamp(cfg, FIRST_REVISION)
            before = FIRST_REVISION
        command.upgrade(cfg, revision)
        after = MigrationContext.configure(conn).get_current_revision()
    if before != after:
        log.info("index schema upgraded from %s to %s", before or "empty", after)
    return before, after  # type: ignore[return-value]


def require_current(engine: Engine) -> None:
    """Raise SchemaOutdated unless the index is at the newest revision."""
    have, want = current(engine), head()
    if have != want:
        raise SchemaOutdated(
            f"the index ({engine.url.render_as_string(hide_password=True)}) is at schema revision "
            f"{have or 'none'}, this nodal needs {want}: run `nodal db upgrade` (or start `nodal serve`, "
            "which upgrades it) before starting workers"
        )
