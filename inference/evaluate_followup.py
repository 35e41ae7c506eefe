"""`nodal evaluate-followup`: the follow-up comparison scored on phantom pairs of known truth.

Each pair (`inference.phantom_pairs`) is a prior phantom and its follow-up (the patient
re-positioned, nodes grown, shrunk, resolved or new). The model analyses both; the
comparison (`inference.followup.compare`) registers, matches and assesses. Scored against
the truth:

* matching: of the nodes present in both studies and found by the model in both, the share
  whose prior finding the comparison paired with their current finding;
* short-axis change: |measured change - true change| of those correctly paired nodes (for a
  node cut by the edge of a scan, the true change of its part in view, as it is measured:
  `PhantomPair.true_short_axis_change_mm`);
* response: the RECIST 1.1 nodal response of the comparison against that of the true sizes,
  and the same without the look at the place of nodes found in one study only
  (`inference.followup.look`), and, for a model with a checker, with the look's structures
  not judged by it (`inference.pipeline.look_judge`), from the same analyses;
* registration: the distance between where the registration and the true motion put each
  true prior node centre.
"""

from __future__ import annotations

import time

import numpy as np

from inference.evaluate import array_volume, hit_rule, match
from inference.findings import Finding, StudyFindings, rounded
from inference.followup import FROM_ANALYSIS, MATCHED, FollowUpSettings, PriorStudy, compare, prior_nodes
from inference.model_store import LoadedModel
from inference.phantom_pairs import SCENARIOS, make_pair
from inference.phantoms import PhantomSpec
from inference.pipeline import PipelineSettings, analyse, look_judge
from inference.progress import progress
from inference.train import EVAL_SEED_BASE

FOLLOWUP_SEED_BASE = EVAL_SEED_BASE + 7000  # held out from training, apart from `nodal evaluate`'s seeds


def evaluate_followup(
    model: LoadedModel,
    pairs: int = 12,
    seed: int = FOLLOWUP_SEED_BASE,
    settings: PipelineSettings | None = None,
    spec: PhantomSpec | None = None,
) -> dict:
    """Score the comparison on `pairs` phantom pairs; pair n uses seed `seed + n` and
    scenario ``SCENARIOS[n % len(SCENARIOS)]`` (phantoms of `spec`, the default one if None)."""
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    if seed < EVAL_SEED_BASE:
        raise ValueError(f"evaluation seeds start at {EVAL_SEED_BASE} (training seeds are below)")
    settings = settings or PipelineSettings()
    rows = []
    for n in progress(range(pairs), pairs, "phantom pairs"):
        rows.append(_one(model, seed + n, SCENARIOS[n % len(SCENARIOS)], settings, spec))
    in_both = sum(r["truth_in_both"] for r in rows)
    found = sum(r["found_in_both"] for r in rows)
    correct = sum(r["matched_correctly"] for r in rows)
    errors = [e for r in rows for e in r["sa_change_errors_mm"]]
    agree = sum(r["response"] == r["truth_response"] for r in rows)
    agree_without = sum(r["response_without_look"] == r["truth_response"] for r in rows)
    agree_unjudged = sum(r["response_look_unjudged"] == r["truth_response"] for r in rows)
    reg = [r["registration_error_mm"] for r in rows if r["registration_error_mm"] is not None]
    return {
        "pairs": pairs,
        "first_seed": seed,
        "hit_rule": hit_rule(),  # which finding found a true node (`_truth_of`)
        "nodes_in_both_truth": in_both,
        "nodes_in_both_found": found,
        "matched_correctly": correct,
        "matching_accuracy": rounded(correct / found if found else None, 4),
        "sa_change_error_mm": {
            "median": rounded(float(np.median(errors)) if errors else None, 2),
            "p90": rounded(float(np.percentile(errors, 90)) if errors else None, 2),
            "max": rounded(max(errors) if errors else None, 2),
            "n": len(errors),
        },
        "response_agreement": f"{agree}/{pairs}",
        "response_agreement_without_look": f"{agree_without}/{pairs}",
        # the look's structures not judged by the model's checker (= response_agreement without one)
        "response_agreement_look_unjudged": f"{agree_unjudged}/{pairs}",
        "registration_error_mm": {
            "median": rounded(float(np.median(reg)) if reg else None, 2),
            "max": rounded(max(reg) if reg else None, 2),
        },
        "seconds_per_pair": rounded(float(np.mean([r["seconds"] for r in rows])), 1),
        "per_pair": rows,
    }


def _one(
    model: LoadedModel, seed: int, scenario: str, settings: PipelineSettings, spec: PhantomSpec | None
) -> dict:
    started = time.perf_counter()
    pair = make_pair(seed, scenario, spec)
    key = ("nodal-followup-pair", str(seed), scenario)
    prior_volume = array_volume(pair.prior.hu.astype(np.float32), pair.prior.affine, *key, "prior")
    current_volume = array_volume(pair.current.hu.astype(np.float32), pair.current.affine, *key, "current")
    prior_findings = analyse(prior_volume, model, settings).findings
    current_findings = analyse(current_volume, model, settings).findings
    prior = PriorStudy(
        study_instance_uid=prior_volume.study_instance_uid,
        series_instance_uid=prior_volume.series_instance_uid,
        study_date="",
        nodes=prior_nodes(prior_findings),
        volume=prior_volume,
        source=FROM_ANALYSIS,
    )
    judge = look_judge(model)
    comparison = compare(prior, current_volume, current_findings, judge=judge)
    registered = comparison.registration  # the same pair: registered once for the three
    without_look = compare(
        prior,
        current_volume,
        current_findings,
        settings=FollowUpSettings(look_at_place=False),
        registration=registered,
    )
    unjudged = (
        compare(prior, current_volume, current_findings, registration=registered)
        if judge is not None
        else comparison
    )
    prior_truth = _truth_of(pair.prior.labels, prior_findings)  # truth index -> finding
    current_truth = _truth_of(pair.current.labels, current_findings)
    paired = {n.prior_tracking_uid: n.current_tracking_uid for n in comparison.nodes if n.status == MATCHED}
    in_both = [f for f in pair.nodes if f.status == MATCHED]
    found = correct = 0
    errors = []
    for fate in in_both:
        p = prior_truth.get(fate.prior_index)  # type: ignore[arg-type]
        c = current_truth.get(fate.current_index)  # type: ignore[arg-type]
        if p is None or c is None:
            continue
        found += 1
        if paired.get(p.tracking_uid) == c.tracking_uid:
            correct += 1
            measured = c.short_axis.length_mm - p.short_axis.length_mm
            errors.append(abs(measured - float(pair.true_short_axis_change_mm(fate) or 0.0)))
    m = np.asarray(comparison.registration.matrix)
    centres = np.array([f.prior_centre_lps_mm for f in pair.nodes if f.prior_centre_lps_mm is not None])
    reg_error = None
    if len(centres):
        by_reg = centres @ m[:3, :3].T + m[:3, 3]
        true = centres @ pair.motion[:3, :3].T + pair.motion[:3, 3]
        reg_error = float(np.linalg.norm(by_reg - true, axis=1).mean())
    truth = pair.truth_response()
    return {
        "seed": seed,
        "scenario": scenario,
        "truth_response": truth.recist_response,
        "response": comparison.summary.recist_response,
        "response_reason": comparison.summary.recist_reason,
        "response_without_look": without_look.summary.recist_response,
        "response_look_unjudged": unjudged.summary.recist_response,  # = response without a checker
        "looks": sorted(n.look.outcome for n in comparison.nodes if n.look is not None),
        "truth_in_both": len(in_both),
        "found_in_both": found,
        "matched_correctly": correct,
        "sa_change_errors_mm": [round(e, 2) for e in errors],
        "registration": comparison.registration.method,
        "bone_residual_mm": rounded(comparison.registration.bone_residual_mm, 2),
        "registration_error_mm": rounded(reg_error, 2),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _truth_of(labels: np.ndarray, findings: StudyFindings) -> dict[int, Finding]:
    """Truth node index -> the finding that overlaps it most (one finding per node)."""
    out: dict[int, tuple[float, Finding]] = {}
    for m, f in zip(
        match(labels, [(f.bbox, f.mask) for f in findings.findings]), findings.findings, strict=True
    ):
        if m.gt and (m.gt not in out or m.dice > out[m.gt][0]):
            out[m.gt] = (m.dice, f)
    return {k: v[1] for k, v in out.items()}


__all__ = ["FOLLOWUP_SEED_BASE", "evaluate_followup"]
