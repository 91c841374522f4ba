"""The parameters `fulltune submit` and `schedule` send, and the defaults an uploaded pipeline carries.

What a user gives, lowest layer first:

1. the package's own parameter defaults (for the chart's pipeline, the cluster's settings:
   `stamp_defaults`);
2. `--params FILE`: a RunConfig (sections; it is the run's `config`) or a parameters file
   ({typed parameter: value, config: {...}});
3. `--param NAME=VALUE`, repeatable: a typed parameter; it wins over the same parameter in a
   parameters file.

Layers 2 and 3 go through `fulltune.parameters.resolve`, the very rule the pipeline's `configure`
step applies: a typed parameter and the config setting one field differently is an error naming
both. The user's result is merged over the package's defaults, and the request carries every typed
parameter explicitly plus the remaining config, so the run's parameters in the UI say everything it
ran with, whatever the defaults of the version it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fulltune import parameters
from fulltune.config import ConfigError, RunConfig, deep_merge, read_config_file


@dataclass(frozen=True)
class RunRequest:
    """What a run or recurring run is created with: `parameters` as sent, `config` as it will run."""

    parameters: dict[str, Any]
    config: RunConfig


def build_request(
    declared: dict[str, dict[str, Any]], params_file: str | Path | None, assignments: list[str]
) -> RunRequest:
    """The request parameters for a package whose root input definitions are `declared`.

    Raises:
        ConfigError: naming the file, the `--param` or the field, and nothing is sent.
    """
    config, values, config_source = _user_layers(params_file, assignments)
    user = parameters.resolve(config, values, config_source=config_source, value_source="--param")
    merged = deep_merge(_package_config(declared), user)
    cfg = RunConfig.from_dict(merged, source="the package's defaults with the given parameters")
    # Typed parameters the package lacks (one compiled before them) travel in config.
    typed = [n for n in parameters.NAMES if n in declared]
    _, rest = parameters.split(merged, typed)
    return RunRequest({**parameters.typed_values(cfg, typed), parameters.CONFIG: rest}, cfg)


def _user_layers(
    params_file: str | Path | None, assignments: list[str]
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(config, typed values, where the config came from) from --params and --param."""
    data = read_config_file(params_file) if params_file else {}
    config, values = data, {}
    if parameters.is_parameters_file(data):
        config = data.get(parameters.CONFIG) or {}
        if not isinstance(config, dict):
            raise ConfigError(f"{params_file}: `{parameters.CONFIG}` must be a mapping of RunConfig sections")
        values = {k: v for k, v in data.items() if k != parameters.CONFIG}
        unknown = sorted(set(values) - set(parameters.BY_NAME))
        if unknown:
            raise ConfigError(f"{params_file}: unknown parameter(s) {', '.join(unknown)}")
        values = {k: parameters.coerce(parameters.BY_NAME[k], v, str(params_file)) for k, v in values.items()}
    for text in assignments:
        name, value = parameters.parse_assignment(text)
        values[name] = value
    return config, values, str(params_file) if params_file else "config"


def _package_config(declared: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The config a run of the package gets when nothing is given: its parameters' defaults merged."""
    default_config = declared.get(parameters.CONFIG, {}).get("defaultValue") or {}
    defaults = {
        name: spec["defaultValue"]
        for name, spec in declared.items()
        if name in parameters.BY_NAME and "defaultValue" in spec
    }
    return parameters.resolve(default_config, defaults, config_source="the package's default config")


# -- the defaults of an uploaded pipeline ------------------------------------------------------------


def stamp_defaults(package: Path, defaults_file: str | Path, dest: Path) -> Path:
    """Write `package` to `dest` with the RunConfig in `defaults_file` as its parameters' defaults.

    The Kubeflow UI's form then starts from those values (the chart's cluster settings: work
    directory, registry, launcher, trainer image, S3 Secret), so a user starting a run there fills
    in the model, the data and a name. Only `defaultValue`s change; the DAG is the same.
    """
    config = read_config_file(defaults_file)
    RunConfig.from_dict(config, source=str(defaults_file))
    docs = list(yaml.safe_load_all(package.read_text()))
    declared = docs[0].get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    if parameters.CONFIG not in declared:
        raise ConfigError(f"{package}: has no `{parameters.CONFIG}` parameter")
    for name, value in parameters.package_defaults(config, declared).items():
        declared[name]["defaultValue"] = value
    dest.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return dest
