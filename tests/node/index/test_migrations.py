"""Index schema migrations (Alembic) on SQLite and, where the Debian package is installed,
PostgreSQL: the migrations build exactly the models' schema, an index of the first revision
(or one from before migrations existed) is upgraded without losing a row, and workers
refuse an outdated index with the command that fixes it."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from dicom_node.cli import main
from dicom_node.index import schema
from dicom_node.index.db import Base, Database, Delivery, Instance, Job, Series, Study
from dicom_node.jobs.table import claim
from tests.helpers.peers import Postgres, postgres_bin

ROWS = {
    "studies": "INSERT INTO studies (study_uid, first_received_at, last_received_at, pending, completions,"
    " instance_count) VALUES ('1.2.3', 10, 11, false, 1, 1)",
    "series": "INSERT INTO series (series_uid, study_uid, modality, sop_class_uid, image_type, description,"
    " instance_count, frame_count, pending, last_received_at, calling_ae)"
    " VALUES ('1.2.3.4', '1.2.3', 'CT', '1.2.840.10008.5.1.4.1.1.2', 'ORIGINAL\\PRIMARY\\AXIAL', 'chest',"
    " 1, 1, false, 11, 'MODALITY')",
    "instances": "INSERT INTO instances (sop_uid, series_uid, study_uid, sop_class_uid, transfer_syntax_uid,"
    " path, size, frames, received_at, via, calling_ae, peer_host) VALUES ('1.2.3.4.5', '1.2.3.4', '1.2.3',"
    " '1.2.840.10008.5.1.4.1.1.2', '1.2.840.10008.1.2.1', 'a/b.dcm', 1000, 1, 11, 'dimse', 'MODALITY',"
    " '127.0.0.1')",
    "jobs": "INSERT INTO jobs (id, study_uid, series_uid, state, attempts, created_at, not_before, reply_ae,"
    " instance_count) VALUES (1, '1.2.3', '1.2.3.4', 'done', 1, 12, 12, 'MODALITY', 1),"
    " (2, '1.2.3', '1.2.3.4', 'queued', 0, 13, 0, 'MODALITY', 1)",
    "deliveries": "INSERT INTO deliveries (job_id, destination, sop_uid, sop_class_uid, file, state,"
    " attempts, created_at, expires_at, next_attempt_at) VALUES (1, 'pacs', '9.8.7',"
    " '1.2.840.10008.5.1.4.1.1.66.4', '1/seg.dcm', 'delivered', 1, 12, 99999, 12)",
}


@pytest.fixture(scope="module")
def postgres():
    if postgres_bin() is None:
        pytest.skip("PostgreSQL binaries missing (Debian package postgresql; `make peers` installs it)")
    pg = Postgres().start()
    yield pg
    pg.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.sqlite3'}"
    pg = request.getfixturevalue("postgres")
    engine = create_engine(pg.url)
    with engine.begin() as conn:  # each test starts from an empty database
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    return pg.url


def _first_revision_with_rows(url: str):
    engine = create_engine(url)
    schema.upgrade(engine, schema.FIRST_REVISION)
    with engine.begin() as conn:
        for sql in ROWS.values():
            conn.execute(text(sql))
    return engine


def test_migrations_build_exactly_the_models_schema(url):
    db = Database(url)
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    db.close()
    assert diff == [], f"index.py and the migrations differ (add a migration): {diff}"


def test_upgrade_from_the_first_revision_keeps_every_row(url):
    engine = _first_revision_with_rows(url)
    assert schema.current(engine) == schema.FIRST_REVISION
    engine.dispose()
    db = Database(url)  # what `nodal serve` does at start
    assert schema.current(db.engine) == schema.head() != schema.FIRST_REVISION
    with db.session() as s:
        assert s.get(Study, "1.2.3").completions == 1
        assert s.get(Series, "1.2.3.4").image_type == "ORIGINAL\\PRIMARY\\AXIAL"
        assert s.get(Instance, "1.2.3.4.5").path == "a/b.dcm"
        done = s.get(Job, 1)
        assert (done.state, done.worker, done.published_at) == ("done", None, None)
        [delivery] = s.query(Delivery).all()
        assert (delivery.job_id, delivery.state) == (1, "delivered")
    job = claim(db, "host:1:w0", 60, 100.0)  # the new columns work on the old rows
    assert job.id == 2 and job.worker == "host:1:w0"
    db.close()


def test_index_from_before_migrations_is_stamped_then_upgraded(url):
    engine = _first_revision_with_rows(url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))  # as nodal 0.1's create_all left it
    assert schema.current(engine) is None
    assert schema.upgrade(engine) == (schema.FIRST_REVISION, schema.head())
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 2
    engine.dispose()


def test_workers_refuse_an_outdated_index_and_nodal_db_upgrade_fixes_it(url, monkeypatch, capsys):
    _first_revision_with_rows(url).dispose()
    with pytest.raises(schema.SchemaOutdated, match="run `nodal db upgrade`"):
        Database(url, upgrade=False)
    monkeypatch.setenv("NODAL_INDEX__URL", url)
    assert main(["db", "current"]) == 1
    assert main(["db", "upgrade"]) == 0
    assert main(["db", "current"]) == 0
    out = capsys.readouterr().out
    assert f"{schema.FIRST_REVISION} -> {schema.head()}" in out
    Database(url, upgrade=False).close()


def test_0005_adds_the_study_labels_empty_and_downgrade_removes_them(url):
    engine = _first_revision_with_rows(url)
    schema.upgrade(engine, "0004")
    schema.upgrade(engine, "0005")
    with engine.begin() as conn:
        row = conn.execute(text("SELECT accession_number, patient_name, patient_id FROM studies")).one()
        assert tuple(row) == (None, None, None)  # known once an instance of the study comes again
        conn.execute(text("UPDATE studies SET accession_number = 'ACC-7', patient_name = 'Doe^Jane'"))
    schema.upgrade(engine, "head")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT accession_number FROM studies")).scalar() == "ACC-7"
    with engine.begin() as conn:
        command.downgrade(schema.alembic_config(conn), "0004")
    with engine.connect() as conn:
        columns = {c["name"] for c in inspect(conn).get_columns("studies")}
        assert "accession_number" not in columns and "patient_name" not in columns
        assert conn.execute(text("SELECT instance_count FROM studies")).scalar() == 1
    engine.dispose()


def test_0007_adds_the_scan_of_a_series_empty_and_downgrade_removes_it(url):
    engine = _first_revision_with_rows(url)
    schema.upgrade(engine, "0007")
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT frame_of_reference_uid, acquired_from, acquired_to, kernel, extent_from, extent_to "
                "FROM series"
            )
        ).one()
        assert tuple(row) == (None,) * 6  # never grouped with another series
    with engine.begin() as conn:
        command.downgrade(schema.alembic_config(conn), "0006")
    with engine.connect() as conn:
        columns = {c["name"] for c in inspect(conn).get_columns("series")}
        assert not columns & {
            "frame_of_reference_uid",
            "acquired_from",
            "acquired_to",
            "kernel",
            "extent_from",
            "extent_to",
        }
        assert conn.execute(text("SELECT image_type FROM series")).scalar() == "ORIGINAL\\PRIMARY\\AXIAL"
    engine.dispose()


def test_a_series_scan_spans_every_batch_of_its_instances(url):
    """The indexer's upsert keeps the span of acquisition times and slice positions over all
    batches, and the first frame of reference and kernel, on both databases."""
    from dicom_node.receive.contract import Source
    from dicom_node.receive.indexer import Pending, index_batch
    from dicom_node.spool.header import InstanceHeader

    def batch(first: int, times, positions, kernel="", frame_of_reference=""):
        return [
            Pending(
                InstanceHeader(
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    sop_instance_uid=f"1.2.3.4.{first + n}",
                    study_instance_uid="1.2.3",
                    series_instance_uid="1.2.3.4",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    acquired=None if t is None else (t, t),
                    extent_mm=None if z is None else (z, z),
                    kernel=kernel,
                    frame_of_reference_uid=frame_of_reference,
                ),
                f"a/{first + n}.dcm",
                1,
                Source("dimse", "a1", "CT1"),
                100.0,
            )
            for n, (t, z) in enumerate(zip(times, positions, strict=True))
        ]

    db = Database(url)
    index_batch(db, batch(0, [None], [None]))  # the first instance says nothing
    index_batch(db, batch(10, [105.0, 103.0], [-50.0, -150.0], kernel="Br40d"))
    index_batch(db, batch(20, [101.0, None], [-10.0, -300.0], kernel="B70f", frame_of_reference="1.2.3.99"))
    index_batch(db, batch(30, [104.0], [-100.0]))
    with db.session() as s:
        series = s.get(Series, "1.2.3.4")
        assert (series.acquired_from, series.acquired_to) == (101.0, 105.0)
        assert (series.extent_from, series.extent_to) == (-300.0, -10.0)
        assert (series.kernel, series.frame_of_reference_uid) == ("Br40d", "1.2.3.99")
        assert series.instance_count == 6
    db.close()
