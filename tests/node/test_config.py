"""Configuration: embedded defaults = conf/node.yaml, env overrides, one clear line per mistake."""

import argparse
from pathlib import Path

import pytest
import yaml

from dicom_node.config import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for k in list(os.environ):
        if k.startswith("NODAL_"):
            monkeypatch.delenv(k)


def test_conf_node_yaml_spells_out_the_embedded_defaults():
    from_file = load_settings(ROOT / "conf" / "node.yaml")
    assert from_file == Settings()
    assert yaml.safe_load((ROOT / "conf" / "node.yaml").read_text()) == yaml.safe_load(
        yaml.safe_dump(__import__("json").loads(Settings().model_dump_json()))
    )


def test_environment_overrides_file(monkeypatch, tmp_path):
    f = tmp_path / "node.yaml"
    f.write_text("node: {ae_title: FROMFILE, dimse_port: 104}\n")
    monkeypatch.setenv("NODAL_NODE__AE_TITLE", "FROMENV")
    monkeypatch.setenv("NODAL_INFERENCE__SLIDING_WINDOW__OVERLAP", "0.5")
    s = load_settings(f)
    assert s.node.ae_title == "FROMENV"
    assert s.node.dimse_port == 104
    assert s.inference.sliding_window.overlap == 0.5


def test_config_path_from_environment(monkeypatch, tmp_path):
    f = tmp_path / "node.yaml"
    f.write_text("node: {ae_title: VIAENV}\n")
    monkeypatch.setenv("NODAL_CONFIG", str(f))
    assert load_settings().node.ae_title == "VIAENV"


def test_every_wrong_key_gets_a_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("node: {dimse_port: abc, ae_titel: X}\ninference: {device: tpu}\nextra: 1\n")
    with pytest.raises(ConfigError) as e:
        load_settings(f)
    msg = str(e.value)
    assert "node.dimse_port" in msg and "NODAL_NODE__DIMSE_PORT" in msg
    assert "node.ae_titel: unknown key" in msg
    assert "inference.device" in msg
    assert "extra: unknown key" in msg


def test_ae_title_longer_than_16_is_refused(monkeypatch):
    monkeypatch.setenv("NODAL_NODE__AE_TITLE", "A" * 17)
    with pytest.raises(ConfigError, match=r"node\.ae_title"):
        load_settings()


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_is_taken_before_or_after_the_command(tmp_path: Path, capsys, where: str) -> None:
    from dicom_node.cli import main

    path = tmp_path / "node.yaml"
    path.write_text("node:\n  ae_title: WHEREVER\n")
    argv = ["--config", str(path), "config"] if where == "before" else ["config", "--config", str(path)]
    assert main(argv) == 0
    assert yaml.safe_load(capsys.readouterr().out)["node"]["ae_title"] == "WHEREVER"


def test_every_command_takes_config_and_the_help_names_no_stale_make_target(capsys) -> None:
    from dicom_node.cli import _parser

    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        assert any("--config" in a.option_strings for a in command._actions), name
    parser.print_help()
    assert "make run" not in capsys.readouterr().out
