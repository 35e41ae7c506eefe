"""The `nodal` command line: defaults come from the dataclasses they configure."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.cli import main


class _Stop(Exception):
    pass


def test_the_training_command_is_recorded_however_nodal_was_run(tmp_path: Path, monkeypatch) -> None:
    """`nodal train`, `python -m dicom_node.cli train` and `main([...])` record one command
    (the card's `training.command`), without the configuration file's local path."""
    import sys

    import inference.train as train_module

    seen = {}

    def fake_train(out, cfg, data, **kwargs):
        seen["command"] = kwargs["command"]
        raise _Stop

    monkeypatch.setattr(train_module, "train", fake_train)
    config = tmp_path / "nodal.yaml"
    config.write_text("{}\n")
    out = str(tmp_path / "m")
    expected = f"nodal train --out {out} --cases 3 --verifier-cases 0"
    for argv in (
        ["train", "--out", out, "--cases", "3", "--verifier-cases", "0"],
        [
            "--config",
            str(config),
            "train",
            "--out",
            out,
            "--cases",
            "3",
            "--config",
            str(config),
            "--verifier-cases",
            "0",
        ],
    ):
        for program in ("/usr/local/bin/nodal", "/x/dicom_node/cli.py"):  # the entry point, or -m
            monkeypatch.setattr(sys, "argv", [program, *argv])
            with pytest.raises(_Stop):
                main()
            assert seen.pop("command") == expected
        with pytest.raises(_Stop):
            main(argv)
        assert seen.pop("command") == expected


def test_train_defaults_are_train_configs(tmp_path: Path, monkeypatch) -> None:
    import inference.train as train_module

    seen = {}

    def fake_train(out, cfg, data, **kwargs):
        seen["cfg"] = cfg
        raise _Stop

    monkeypatch.setattr(train_module, "train", fake_train)
    with pytest.raises(_Stop):
        main(["train", "--out", str(tmp_path / "m"), "--verifier-cases", "0"])
    assert seen["cfg"] == train_module.TrainConfig()
    with pytest.raises(_Stop):
        main(["train", "--out", str(tmp_path / "m"), "--cases", "3", "--seg-lr", "0.01", "--name", "x"])
    assert seen["cfg"] == train_module.TrainConfig(cases=3, seg_lr=0.01, name="x")
    with pytest.raises(_Stop):
        main(["train", "--out", str(tmp_path / "m"), "--mixed", "--verifier-cases", "0"])
    assert seen["cfg"] == train_module.TrainConfig(mixed=True)
    for flags, power in ((["--per-node"], 0.0), (["--node-power", "0.5"], 0.5)):
        with pytest.raises(_Stop):
            main(["train", "--out", str(tmp_path / "m"), *flags, "--verifier-cases", "0"])
        assert seen["cfg"] == train_module.TrainConfig(node_power=power)
    for flags, given in (
        (["--augment", "0.2"], {"augment": 0.2}),
        (["--thick-share", "0.25"], {"thick_share": 0.25}),
    ):
        with pytest.raises(_Stop):
            main(["train", "--out", str(tmp_path / "m"), *flags, "--verifier-cases", "0"])
        assert seen["cfg"] == train_module.TrainConfig(**given)
    seen.clear()
    assert main(["train", "--out", str(tmp_path / "m"), "--mixed", "--variety"]) == 2
    assert main(["train", "--out", str(tmp_path / "m"), "--per-node", "--node-power", "0.5"]) == 2
    assert main(["train", "--out", str(tmp_path / "m"), "--mixed", "--data", str(tmp_path)]) == 2
    assert not seen  # refused before training


def test_phantom_defaults_are_phantom_specs(tmp_path: Path, monkeypatch) -> None:
    from inference import phantoms

    seen = {}

    def fake_generate(seed, spec):
        seen["spec"] = spec
        raise _Stop

    monkeypatch.setattr(phantoms, "generate", fake_generate)
    with pytest.raises(_Stop):
        main(["phantom", "--seed", "1", "--out", str(tmp_path)])
    assert seen["spec"] == phantoms.PhantomSpec()
    with pytest.raises(_Stop):
        main(["phantom", "--seed", "1", "--out", str(tmp_path), "--rows", "128", "--slice-spacing", "3"])
    assert seen["spec"] == phantoms.PhantomSpec(rows=128, columns=128, slice_spacing_mm=3.0)


def test_train_verifier_keep_share_default_is_the_functions(tmp_path: Path, monkeypatch) -> None:
    import inspect

    import inference.train_verifier as tv

    seen = {}
    default = inspect.signature(tv.train_verifier).parameters["keep_share"].default

    def fake(model_dir, cases, keep_share=default, cache_dir=None, command="", variety=False, mixed=False):
        seen.update(cases=cases, keep_share=keep_share, command=command)
        raise _Stop

    monkeypatch.setattr(tv, "train_verifier", fake)
    with pytest.raises(_Stop):
        main(["train-verifier", "--model-dir", str(tmp_path)])
    assert seen["keep_share"] == default and seen["cases"] == 32
    assert seen["command"].endswith(f"--keep-share {default}")


def test_train_checker_defaults_are_the_functions(tmp_path: Path, monkeypatch) -> None:
    import inspect

    import inference.train_checker as tc

    seen = {}
    defaults = {k: v.default for k, v in inspect.signature(tc.train_checker).parameters.items()}

    def fake(
        model_dir,
        cases=defaults["cases"],
        keep_share=defaults["keep_share"],
        epochs=defaults["epochs"],
        **kwargs,
    ):
        seen.update(kwargs, cases=cases, keep_share=keep_share, epochs=epochs)
        raise _Stop

    monkeypatch.setattr(tc, "train_checker", fake)
    with pytest.raises(_Stop):
        main(["train-checker", "--model-dir", str(tmp_path)])
    assert (seen["cases"], seen["keep_share"], seen["epochs"]) == (
        defaults["cases"],
        defaults["keep_share"],
        defaults["epochs"],
    )
    assert seen["version"] is None and "--version" not in seen["command"]
    with pytest.raises(_Stop):
        main(["train-checker", "--model-dir", str(tmp_path), "--cases", "60", "--version", "0.4.1"])
    assert seen["cases"] == 60 and seen["command"].endswith("--epochs 8 --version 0.4.1")
