"""Scale-out against real peers: `nodal serve` receiving, PostgreSQL holding the index,
redis-server carrying Celery messages to two `nodal worker` processes.

Four studies go in by C-STORE (dcmtk storescu). Both workers run jobs; one is killed
(SIGKILL) in the middle of a job, and the other takes that job up: every study ends with
exactly one job, done, and each job id is finished by exactly one worker.
"""

from __future__ import annotations

import pydicom
import pytest
from sqlalchemy import create_engine, text

from inference import phantoms
from tests.helpers.peers import (
    Nodal,
    NodalWorker,
    Postgres,
    Redis,
    free_port,
    missing_binaries,
    model_dir,
    node_config,
    postgres_bin,
    storescu,
    wait_until,
)

pytestmark = [pytest.mark.peers, pytest.mark.slow]

# Small enough for four inferences (and one re-run) on two shared cores in about a minute,
# large enough for the axial-ct routing rule (>= 20 slices, <= 5 mm).
SMALL = phantoms.PhantomSpec(rows=128, columns=128, pixel_spacing_mm=2.9, slices=24, slice_spacing_mm=4.0)
STUDIES = 4


def _skip_reason() -> str | None:
    missing = missing_binaries("redis-server", "storescu")
    if postgres_bin() is None:
        missing.append("initdb (Debian package postgresql)")
    if missing:
        return f"peer binaries missing: {', '.join(missing)} (`make peers` installs them)"
    if model_dir() is None:
        return "no model: inference/models/nodal-ln-demo/model_card.json absent and no NODAL_TEST_MODEL_DIR"
    return None


if (_why := _skip_reason()) is not None:
    pytest.skip(_why, allow_module_level=True)


@pytest.fixture
def peers(tmp_path):
    redis, pg = Redis(tmp_path / "redis"), Postgres()
    try:
        yield redis.start(), pg.start()
    finally:
        redis.stop()
        pg.stop()


def test_two_celery_workers_on_postgres_one_killed_mid_job(tmp_path, peers):
    redis, pg = peers
    port = free_port()
    cfg = node_config(
        tmp_path / "data",
        port,
        model_dir(),
        index={"url": pg.url},
        queue={
            "backend": "celery",
            "broker_url": redis.url,
            "queue_name": "nodal",
            "republish_seconds": 30.0,
        },
    )
    cfg["inference"]["threads"] = 1  # two workers on two cores
    nodal = Nodal(tmp_path / "serve", cfg)
    workers: list[NodalWorker] = []
    try:
        nodal.start(ready_path="/readyz")  # celery: ready = index and spool writable, broker answers
        for name in ("w1", "w2"):
            workers.append(NodalWorker(tmp_path / "serve", nodal.folder / "node.yaml", name))
        w1, w2 = workers
        wait_until(lambda: w1.ready() and w2.ready(), 120, "both workers to load the model")

        studies = []
        for seed in range(STUDIES):
            paths = phantoms.write_phantom(phantoms.generate(100 + seed, SMALL), tmp_path / f"ct-{seed}")
            studies.append(str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID))
            storescu(paths, port)

        def jobs() -> list[dict]:
            return nodal.api("/api/jobs?limit=100")["jobs"]

        # a worker finished a job and runs another: kill it there. Which worker that is, the
        # broker decides (the faster one may take both remaining jobs); with four jobs on two
        # workers one of them runs at least two
        def second_job():
            for w in workers:
                running = [j for j in jobs() if j["state"] == "running" and w.owns(j)]
                if w.done_jobs() and running:
                    return w, running[0]
            return None

        try:
            killed, victim = wait_until(second_job, 180, "a worker to run its second job", every=0.2)
        except TimeoutError as e:  # say where the jobs stood
            states = [(j["id"], j["state"], j["worker"]) for j in jobs()]
            done = f"done by w1 {w1.done_jobs()}, w2 {w2.done_jobs()}"
            raise AssertionError(f"{e}; jobs {states}; {done}") from e
        survivor = w2 if killed is w1 else w1
        killed.proc.kill()
        killed.proc.wait()

        def all_done():
            js = jobs()
            return js if len(js) == STUDIES and all(j["state"] == "done" for j in js) else None

        final = wait_until(all_done, 240, "every job done after the kill")
        assert sorted(j["study_instance_uid"] for j in final) == sorted(studies)  # one job per study
        taken_over = next(j for j in final if j["id"] == victim["id"])
        assert taken_over["attempts"] == 2 and survivor.owns(taken_over)
        assert not any(killed.owns(j) for j in final if j["id"] not in killed.done_jobs())
        # each job finished exactly once, by one of the two workers, and both did some
        finished = w1.done_jobs() + w2.done_jobs()
        assert sorted(finished) == sorted(j["id"] for j in final)
        assert killed.done_jobs() and victim["id"] in survivor.done_jobs()
        for j in final:
            result_dir = tmp_path / "data" / "outbox" / nodal.api(f"/api/jobs/{j['id']}")["result_dir"]
            assert any(result_dir.glob("*.dcm")), f"job {j['id']}: no result files in {result_dir}"
        assert "taken up again" in nodal.log()
        # the index really is the PostgreSQL cluster (no SQLite file beside the spool)
        engine = create_engine(pg.url)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM jobs WHERE state = 'done'")).scalar() == STUDIES
        engine.dispose()
        assert not (tmp_path / "data" / "index.sqlite3").exists()
    finally:
        for w in workers:
            w.stop()
        assert nodal.stop() == 0
