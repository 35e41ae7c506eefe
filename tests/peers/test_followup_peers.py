"""Follow-up studies end to end, Orthanc as the PACS and the real model (issue 17):

(a) Orthanc holds a baseline that nodal analysed (its SEG and SR stored there); a follow-up
    arrives by C-STORE; nodal finds the prior by C-FIND (QIDO-RS), reads its own SR, fetches
    the prior CT by C-MOVE to itself (WADO-RS), compares, and sends an SR whose nodes keep the
    baseline's tracking UIDs: over DIMSE and over DICOMweb;
(b) the prior has no nodal results: its CT is fetched by C-GET and analysed first, and its
    own SEG/SR go to the PACS beside the follow-up's (the follow-up itself fetched from the
    PACS by `nodal retrieve`);
(c) failures: the query peer down, or the prior not retrievable: results sent as without a
    prior, the reason on the job.

The studies are a follow-up phantom pair (`inference.phantom_pairs`, scenario progression):
the same patient re-positioned, nodes grown, resolved or new by known amounts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import requests

from inference import phantoms
from inference.ct_series import PatientInfo
from inference.phantom_pairs import make_pair
from tests.helpers.followup import register_modality, restamp, upload
from tests.helpers.peers import (
    Nodal,
    Orthanc,
    free_port,
    model_dir,
    node_config,
    skip_reason,
    storescu,
    study_series,
    wait_until,
)

pytestmark = [pytest.mark.peers, pytest.mark.slow]

if (_why := skip_reason("storescu", dicomweb=True)) is not None:
    pytest.skip(_why, allow_module_level=True)

SPEC = phantoms.PhantomSpec(rows=256, columns=256, pixel_spacing_mm=1.45, slices=48, slice_spacing_mm=2.5)
SEED = 4_170_001
BASELINE_DATE, FOLLOW_UP_DATE = "20260301", "20260601"


@pytest.fixture(scope="module")
def pair():
    return make_pair(SEED, "progression", SPEC)


def write_study(phantom, folder: Path, patient_id: str, name: str, date: str) -> tuple[list[Path], str]:
    paths = phantoms.write_phantom(
        phantom, folder / name, patient=PatientInfo(id=patient_id), uid_seed=f"nodal-fu-{patient_id}-{name}"
    )
    restamp(paths, StudyDate=date, SeriesDate=date)
    return paths, str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    o = Orthanc(tmp_path_factory.mktemp("fu-orthanc")).start()
    yield o
    o.stop()


def start_nodal(root: Path, orthanc: Orthanc, destinations: list[dict]) -> Nodal:
    port = free_port()
    register_modality(orthanc, "nodal", "NODAL", port)  # query, C-GET, C-MOVE destination
    cfg = node_config(root / "var", port, model_dir(), destinations=destinations)
    return Nodal(root, cfg).start()


def dimse(orthanc: Orthanc, **query) -> dict:
    return {
        "name": "pacs",
        "kind": "dimse",
        "ae_title": orthanc.aet,
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
        "query": query,
    }


def dicomweb(orthanc: Orthanc) -> dict:
    return {"name": "pacs", "kind": "dicomweb", "url": f"{orthanc.url}/dicom-web", "query": {}}


def finished_job(nodal: Nodal, study_uid: str, timeout: float = 420) -> dict:
    def done():
        jobs = nodal.api(f"/api/jobs?study={study_uid}")["jobs"]
        return jobs[0] if jobs and jobs[0]["state"] in ("done", "failed", "skipped") else None

    job = wait_until(done, timeout, "the job to finish")
    assert job["state"] == "done", job
    return nodal.api(f"/api/jobs/{job['id']}")


def delivered(nodal: Nodal, job_id: int) -> bool:
    deliveries = nodal.api(f"/api/jobs/{job_id}")["deliveries"]
    return bool(deliveries) and all(d["pending"] == 0 and d["failed"] == 0 for d in deliveries.values())


def observed(nodal: Nodal, job_id: int) -> bool:
    events = nodal.api("/api/audit?event=job_finished&limit=500")["events"]
    return any(e["job_id"] == job_id for e in events)


def findings_json(nodal: Nodal, job: dict) -> dict:
    return json.loads(
        (Path(nodal.config["node"]["data_dir"]) / "outbox" / job["result_dir"] / "findings.json").read_text()
    )


def srs_in(orthanc: Orthanc, study_uid: str, modality: str = "SR") -> list[pydicom.Dataset]:
    out = []
    for s in study_series(orthanc, study_uid):
        if s["modality"] == modality:
            for i in s["instances"]:
                r = requests.get(f"{orthanc.url}/instances/{i}/file", timeout=30)
                out.append(pydicom.dcmread(__import__("io").BytesIO(r.content)))
    return out


def assert_changes_follow_the_truth(comparison: dict, pair) -> None:
    """Matched nodes lie where registration puts them, and the node that grew most grows by
    about as much as it truly did. (Whether every node is found again is the model's part:
    a node it misses at follow-up is reported gone, and the response follows from that;
    inference.evaluate_followup scores response and matching on many pairs.)"""
    matched = [n for n in comparison["nodes"] if n["status"] == "matched"]
    assert matched, comparison["nodes"]
    assert all(n["distance_mm"] < 5.0 for n in matched), matched
    true_growth = max(n.short_axis_change_mm for n in pair.nodes if n.status == "matched")
    seen_growth = max(n["short_axis_mm"]["change_mm"] for n in matched)
    assert abs(seen_growth - true_growth) < 4.0, (true_growth, matched)


def assert_follow_up_objects(orthanc: Orthanc, study_uid: str, comparison: dict, summary: dict) -> None:
    """The SEG keeps the prior tracking UID of each matched node; the SR names every matched
    and gone node by its prior tracking UID and codes the RECIST 1.1 response (in the
    report's Qualitative Evaluations)."""
    from sr_templates import codes

    by_status: dict[str, set] = {"matched": set(), "gone": set()}
    for n in comparison["nodes"]:
        if n["status"] in by_status:
            by_status[n["status"]].add(n["prior_tracking_uid"])
    [seg] = srs_in(orthanc, study_uid, "SEG")
    segments = {str(s.TrackingUID) for s in seg.SegmentSequence}
    assert by_status["matched"] <= segments and not by_status["gone"] & segments
    [sr] = srs_in(orthanc, study_uid)
    assert by_status["matched"] | by_status["gone"] <= tracking_uids(sr)
    evaluations = next(
        i
        for i in sr.ContentSequence
        if i.ConceptNameCodeSequence[0].CodeValue == codes.QUALITATIVE_EVALUATIONS.value
    )
    methods = [
        i.ConceptCodeSequence[0].CodeValue
        for i in evaluations.ContentSequence
        if i.ConceptNameCodeSequence[0].CodeValue == codes.RESPONSE_EVALUATION_METHOD.value
    ]
    assert methods == [codes.RECIST_1_1.value]
    comments = [i.TextValue for i in evaluations.ContentSequence if i.ValueType == "TEXT"]
    assert any(summary["recist_response"] in c for c in comments), comments


def tracking_uids(sr: pydicom.Dataset) -> set[str]:
    out: set[str] = set()

    def walk(items):
        for item in items:
            if item.get("ValueType") == "UIDREF" and item.ConceptNameCodeSequence[0].CodeValue == "112040":
                out.add(str(item.UID))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return out


@pytest.mark.parametrize("protocol", ["dimse", "dicomweb"])
def test_follow_up_compared_with_nodals_own_sr_of_the_baseline(tmp_path, orthanc, pair, protocol):
    patient = f"FU-A-{protocol}"
    dest = dimse(orthanc, retrieve="move") if protocol == "dimse" else dicomweb(orthanc)
    nodal = start_nodal(tmp_path, orthanc, [dest])
    try:
        base_paths, base_uid = write_study(pair.prior, tmp_path, patient, "baseline", BASELINE_DATE)
        upload(orthanc, base_paths)  # the PACS holds the baseline CT ...
        storescu(base_paths, nodal.config["node"]["dimse_port"])  # ... and nodal analyses it
        base_job = finished_job(nodal, base_uid)
        assert base_job["followup"]["outcome"] == "no_prior", base_job["followup"]
        wait_until(lambda: delivered(nodal, base_job["id"]), 120, "the baseline's SEG and SR in Orthanc")
        [base_sr] = srs_in(orthanc, base_uid)
        base_tracking = tracking_uids(base_sr)
        assert base_tracking, "the baseline SR has no node"

        fu_paths, fu_uid = write_study(pair.current, tmp_path, patient, "follow-up", FOLLOW_UP_DATE)
        upload(orthanc, fu_paths)
        storescu(fu_paths, nodal.config["node"]["dimse_port"])
        job = finished_job(nodal, fu_uid)
        fu = job["followup"]
        assert fu["outcome"] == "compared", fu
        assert fu["prior_study_instance_uid"] == base_uid and fu["prior_source"] == "sr"
        assert fu["prior_results"] == 0  # nothing re-sent for the baseline
        ops = {(o["operation"], o["level"]) for o in fu["operations"]}
        find, fetch = ("find", "move") if protocol == "dimse" else ("qido", "wado")
        assert {(find, "STUDY"), (find, "SERIES"), (fetch, "SERIES")} <= ops, ops
        assert all(o["outcome"] == "success" for o in fu["operations"])
        doc = findings_json(nodal, job)
        assert doc["comparison"]["summary"] == fu["summary"]
        assert_changes_follow_the_truth(doc["comparison"], pair)
        matched = {n["prior_tracking_uid"] for n in doc["comparison"]["nodes"] if n["status"] == "matched"}
        assert matched and matched <= base_tracking, doc["comparison"]["nodes"]
        wait_until(lambda: delivered(nodal, job["id"]), 120, "the follow-up's results in Orthanc")
        assert_follow_up_objects(orthanc, fu_uid, doc["comparison"], fu["summary"])
        # the prior fetched for the comparison was not taken for a study to analyse
        assert len(nodal.api(f"/api/jobs?study={base_uid}")["jobs"]) == 1
        # The serve process observes a finished job in the metrics on its next round, then
        # writes the job's audit event: wait for the event, then the metrics hold the job.
        wait_until(lambda: observed(nodal, job["id"]), 60, "the serve process to observe the job")
        metrics = requests.get(f"{nodal.http}/metrics", timeout=10).text
        assert 'nodal_followups_total{outcome="compared"} 1.0' in metrics
        assert (
            f'nodal_qr_requests_total{{destination="pacs",operation="{fetch}",outcome="success"}}' in metrics
        )
        events = {e["event"] for e in nodal.api("/api/audit?limit=500")["events"]}
        assert {"query", "retrieve"} <= events
    finally:
        nodal.stop()


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_prior_without_nodal_results_is_fetched_and_analysed_first(tmp_path, orthanc, pair, retrieve):
    """Both the study asked for by `nodal retrieve` and its prior come by C-GET, or by C-MOVE
    to nodal's own SCP (the one on-demand, through the receiver; the prior into holding)."""
    patient = f"FU-B-{retrieve}"
    nodal = start_nodal(tmp_path, orthanc, [dimse(orthanc, retrieve=retrieve)])
    try:
        base_paths, base_uid = write_study(pair.prior, tmp_path, patient, "baseline", BASELINE_DATE)
        upload(orthanc, base_paths)  # only in the PACS: nodal never saw it
        fu_paths, fu_uid = write_study(pair.current, tmp_path, patient, "follow-up", FOLLOW_UP_DATE)
        upload(orthanc, fu_paths)  # the follow-up too: `nodal retrieve` fetches it on request
        asked = subprocess.run(
            [
                sys.executable,
                "-m",
                "dicom_node.cli",
                "--config",
                str(nodal.folder / "node.yaml"),
                "retrieve",
                "--study",
                fu_uid,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert asked.returncode == 0, asked.stderr
        assert json.loads(asked.stdout)["instances"]["stored"] == len(fu_paths)
        job = finished_job(nodal, fu_uid)
        fu = job["followup"]
        assert fu["outcome"] == "compared" and fu["prior_source"] == "analysed", fu
        assert fu["prior_results"] >= 2  # the prior's SEG and SR (and result images)
        assert retrieve in {o["operation"] for o in fu["operations"]}
        comparison = findings_json(nodal, job)["comparison"]
        assert_changes_follow_the_truth(comparison, pair)
        matched = {n["prior_tracking_uid"] for n in comparison["nodes"] if n["status"] == "matched"}
        wait_until(lambda: delivered(nodal, job["id"]), 120, "results in Orthanc")
        [prior_sr] = srs_in(orthanc, base_uid)  # the prior's own results are in the PACS now
        assert matched <= tracking_uids(prior_sr)
        assert_follow_up_objects(orthanc, fu_uid, comparison, fu["summary"])
        assert nodal.api(f"/api/jobs?study={base_uid}")["jobs"] == []  # analysed inside the job only
    finally:
        nodal.stop()


@pytest.mark.parametrize("failure", ["peer_down", "not_retrievable"])
def test_a_prior_that_cannot_be_had_never_blocks_the_results(tmp_path, orthanc, pair, failure):
    patient = f"FU-C-{failure}"
    results = {
        "name": "results",
        "kind": "dimse",
        "ae_title": orthanc.aet,
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
    }
    if failure == "peer_down":
        query = {
            "name": "query",
            "kind": "dicomweb",
            "url": f"http://127.0.0.1:{free_port()}/dicom-web",
            "query": {"timeout_seconds": 5},
        }
        dests = [results, query]
    else:  # Orthanc answers the C-FIND but cannot move to an AE it does not know
        dests = [dict(results, query={"retrieve": "move", "move_destination": "NOWHERE"})]
    nodal = start_nodal(tmp_path, orthanc, dests)
    try:
        base_paths, _ = write_study(pair.prior, tmp_path, patient, "baseline", BASELINE_DATE)
        upload(orthanc, base_paths)
        fu_paths, fu_uid = write_study(pair.current, tmp_path, patient, "follow-up", FOLLOW_UP_DATE)
        storescu(fu_paths, nodal.config["node"]["dimse_port"])
        job = finished_job(nodal, fu_uid)
        fu = job["followup"]
        want = "query_failed" if failure == "peer_down" else "retrieve_failed"
        assert fu["outcome"] == want and fu["reason"], fu
        assert findings_json(nodal, job)["comparison"] is None
        wait_until(
            lambda: {s["modality"] for s in study_series(orthanc, fu_uid)} >= {"SEG", "SR"},
            120,
            "the results in Orthanc, as without a prior",
        )
    finally:
        nodal.stop()
