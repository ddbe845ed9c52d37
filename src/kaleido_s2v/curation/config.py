"""Curation config: a YAML or JSON mapping of stage name -> that stage's fields.

```yaml
scenes:  {detector: adaptive, min_clip_s: 2.0}
quality: {min_luma: 40, min_sharpness: 50}
caption: {model: /models/Qwen2.5-VL-7B-Instruct, num_frames: 8}
ground:  {model: /models/grounding-dino-base}
export:  {mix: {crop: 1, segment: 5, inpaint: 3, redux: 1}}
```

Unknown stages or fields and values of the wrong type raise `UserInputError` naming the key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..errors import UserInputError
from ..fileio import read_mapping
from .stage import Stage
from .stages import STAGES, stage_class

_NOT_SETTABLE = {"output_dir"}


def load_config(path: str | Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return {}
    path = Path(path)
    data = read_mapping(path, "config", "stage name -> settings")
    for name, section in data.items():
        if name not in STAGES:
            raise UserInputError(f"config '{path}': unknown stage '{name}': use one of {', '.join(STAGES)}")
        if section is None:
            data[name] = {}
        elif not isinstance(section, dict):
            raise UserInputError(f"config '{path}': '{name}' must be a mapping of settings")
    return data


def _coerce(stage: str, key: str, value: Any, default: Any) -> Any:
    where = f"config: {stage}.{key}"
    if default is None or isinstance(default, str) and value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserInputError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserInputError(f"{where} must be a number, got {value!r}")
        return type(default)(value) if isinstance(default, float) or float(value).is_integer() else value
    if isinstance(default, str) and not isinstance(value, str):
        raise UserInputError(f"{where} must be a string, got {value!r}")
    if isinstance(default, (list, dict)) and not isinstance(value, type(default)):
        raise UserInputError(f"{where} must be a {type(default).__name__}, got {value!r}")
    return value


def build_stage(name: str, settings: dict[str, Any] | None = None, output_dir: str | Path = "") -> Stage:
    cls = stage_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in (settings or {}).items():
        if key not in fields or key in _NOT_SETTABLE:
            valid = ", ".join(k for k in fields if k not in _NOT_SETTABLE)
            raise UserInputError(f"config: unknown setting '{name}.{key}': valid settings are {valid}")
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs[key] = _coerce(name, key, value, default)
    stage = cls(output_dir=str(output_dir), **kwargs)
    stage.check()
    return stage


def parse_stage_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise UserInputError("--stages is empty: give a comma-separated list such as scenes,quality")
    for n in names:
        if n not in STAGES:
            raise UserInputError(f"--stages: unknown stage '{n}': use names from {','.join(STAGES)}")
    if len(set(names)) != len(names):
        raise UserInputError(f"--stages lists a stage twice: {text}")
    if "scenes" in names and names[0] != "scenes":
        raise UserInputError("--stages: 'scenes' splits videos into clips and must come first")
    return names
