"""The query role and the followup section of the configuration (issue 17)."""

from __future__ import annotations

import pytest

from dicom_node.config import ConfigError, DimseDestination, load_settings

PACS = {"name": "pacs", "kind": "dimse", "ae_title": "PACS", "host": "pacs", "port": 104}
WEB = {"name": "web", "kind": "dicomweb", "url": "http://pacs:8042/dicom-web"}


def settings(tmp_path, **doc):
    import yaml

    f = tmp_path / "node.yaml"
    f.write_text(yaml.safe_dump(doc))
    return load_settings(f)


def test_no_query_role_means_no_query_peer(tmp_path):
    s = settings(tmp_path, destinations=[PACS, WEB])
    assert s.followup.enabled and s.query_peer() is None


def test_the_first_destination_with_a_query_role_is_asked(tmp_path):
    s = settings(tmp_path, destinations=[PACS, {**WEB, "query": {}}, {**PACS, "name": "p2", "query": {}}])
    assert s.query_peer().name == "web"
    assert s.query_peer().query.url is None and s.query_peer().query.timeout_seconds == 300.0


def test_query_destination_picks_one_and_defaults_fill_in(tmp_path):
    s = settings(
        tmp_path,
        destinations=[{**WEB, "query": {}}, {**PACS, "query": {"retrieve": "move"}}],
        followup={"query_destination": "pacs", "lookback_days": 365},
    )
    peer = s.query_peer()
    assert isinstance(peer, DimseDestination) and peer.query.retrieve == "move"
    assert peer.query.move_destination is None and s.followup.lookback_days == 365


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"destinations": [PACS], "followup": {"query_destination": "nope"}}, "no destination named 'nope'"),
        ({"destinations": [PACS], "followup": {"query_destination": "pacs"}}, "has no query role"),
        ({"destinations": [{**PACS, "query": {"retrieve": "fetch"}}]}, "destinations.0.dimse.query.retrieve"),
        ({"destinations": [{**PACS, "query": {"move_destination": "x" * 17}}]}, "move_destination"),
        ({"destinations": [{**WEB, "query": {"url": "ftp://pacs"}}]}, "destinations.0.dicomweb.query.url"),
        ({"followup": {"lookback_days": 0}}, "followup.lookback_days"),
        ({"followup": {"registration": "elastic"}}, "followup.registration"),
        ({"destinations": [{"name": "b", "kind": "reply", "query": {}}]}, "unknown key"),
        ({"destinations": [{**PACS, "send_results": False}]}, "send_results is false and there is no query"),
    ],
)
def test_wrong_query_settings_stop_start_up_with_the_reason(tmp_path, doc, message):
    with pytest.raises(ConfigError, match=message):
        settings(tmp_path, **doc)


def test_the_environment_sets_followup_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("NODAL_FOLLOWUP__ENABLED", "false")
    monkeypatch.setenv("NODAL_FOLLOWUP__LOOKBACK_DAYS", "90")
    s = settings(tmp_path, destinations=[{**PACS, "query": {}}])
    assert not s.followup.enabled and s.followup.lookback_days == 90
