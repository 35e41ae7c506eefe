"""Configuration: one YAML file, every key overridable by a `NODAL_...` environment variable.

The defaults here are the embedded defaults (`conf/node.yaml` spells them out for people
and a test keeps the two equal). Sources, strongest first: environment variables
(`NODAL_NODE__AE_TITLE=...`, `__` between levels), the YAML file (`--config` or
`NODAL_CONFIG`), the defaults. Unknown keys and wrong values stop start-up with one line
per problem.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

CONFIG_ENV = "NODAL_CONFIG"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeSection(_Section):
    ae_title: str = Field("NODAL", min_length=1, max_length=16, pattern=r"^[ -~]*[!-~][ -~]*$")
    dimse_port: int = Field(11112, ge=1, le=65535)
    http_port: int = Field(8080, ge=1, le=65535)
    data_dir: Path = Path("var")


class SlidingWindow(_Section):
    roi: int = Field(96, ge=32, description="cube side of a window, working voxels")
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    batch_size: int = Field(2, ge=1)


class InferenceSection(_Section):
    model_dir: Path | None = None  # None: the demo model shipped in inference/models
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    threads: int = Field(0, ge=0, description="CPU threads for torch; 0 = all cores")
    sliding_window: SlidingWindow = SlidingWindow()
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    min_node_volume_mm3: float = Field(20.0, ge=0.0)
    malignancy_threshold: float = Field(0.5, gt=0.0, lt=1.0)


class VolumeSection(_Section):
    min_slices: int = Field(8, ge=2)
    max_tilt_degrees: float = Field(2.0, ge=0.0, le=45.0)
    gap_factor: float = Field(1.5, gt=1.0)


class ResultsSection(_Section):
    result_images: bool = True
    omit_empty_frames: bool = True


class LoggingSection(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_lines: bool = False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="NODAL_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    node: NodeSection = NodeSection()
    inference: InferenceSection = InferenceSection()
    volume: VolumeSection = VolumeSection()
    results: ResultsSection = ResultsSection()
    logging: LoggingSection = LoggingSection()

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
