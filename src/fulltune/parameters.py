"""The pipeline's typed parameters: the fields people set on every run, a form in the Kubeflow UI.

`PARAMETERS` maps each parameter to one RunConfig field. Its type, default and description come from
that field, so the form cannot drift from the config; everything else travels in the `config`
parameter (a RunConfig mapping). The table is read by the pipeline's signature (`signature`), its
first step `configure` (`resolve`), `fulltune submit`/`schedule` (`request_parameters`) and the
defaults the Helm chart gives the pipeline it uploads (`package_defaults`).

Precedence: a value equal to fulltune's default for its field sets nothing (for fields whose default
is "unset" the parameter's default is "" or 0, e.g. learning_rate 0: plan chooses). A field then
takes the typed parameter's value when that is set, else its value in `config`, else fulltune's
default. A typed parameter and `config` setting one field to two different values is an error that
names both: neither silently wins.

Only the standard library and the config are imported: the command line builds its help from here.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fulltune.config import ConfigError, RunConfig, deep_merge, expand_dotted

CONFIG = "config"  # the pipeline parameter that carries the rest of the RunConfig

CONFIG_DESCRIPTION = (
    "Everything else, as a RunConfig mapping (JSON): tokenizer, preprocess, training, resources, evaluation "
    "and registry settings, the work directory. `fulltune config --describe` lists every field and "
    "pipelines/examples/ has complete configs. A typed parameter left at its default leaves its field to "
    "this mapping; a typed parameter and this mapping setting one field differently is an error."
)


@dataclass(frozen=True)
class Parameter:
    """One typed pipeline parameter: `name` in the form, `field` (dotted) in the RunConfig.

    `unset_means`: what the parameter's default ("" or 0) means, for a field whose own default is
    None; it replaces the field description's wording about None.
    """

    name: str
    field: str
    unset_means: str = ""

    @property
    def _info(self):
        model: Any = RunConfig
        *sections, leaf = self.field.split(".")
        for section in sections:
            model = model.model_fields[section].annotation
        return model.model_fields[leaf]

    @property
    def type(self) -> type:
        """str, int or float: the field's type without its None."""
        args = [a for a in typing.get_args(self._info.annotation) if a is not type(None)]
        return args[0] if args else self._info.annotation

    @property
    def default(self) -> Any:
        """The form's default: the field's, with None as the type's zero ("" or 0)."""
        value = self._info.default
        return self.type() if value is None else value

    @property
    def description(self) -> str:
        text = self._info.description or ""
        if self.unset_means:
            text = text.split(";")[0].rstrip(".") + "; " + self.unset_means
        return f"{text} (RunConfig {self.field})"

    def is_set(self, value: Any) -> bool:
        return value is not None and not _same(value, self.default)


PARAMETERS: tuple[Parameter, ...] = (
    Parameter("base_model_uri", "model.base_model_uri"),
    Parameter("train_uri", "data.train_uri"),
    Parameter("eval_uri", "data.eval_uri", "empty: a stable hash split of train_uri is held out."),
    Parameter("general_uri", "data.general_uri", "empty: no replay, and forgetting is not measured."),
    Parameter("model_name", "model.name"),
    Parameter("registry_uri", "registry.uri"),
    Parameter("learning_rate", "training.learning_rate", "0 lets plan choose by model size."),
    Parameter("num_train_epochs", "training.num_train_epochs", "0 lets plan choose by data size."),
    Parameter("max_steps", "training.max_steps"),
    Parameter("max_seq_len", "preprocess.max_seq_len"),
    Parameter("replay_fraction", "preprocess.replay_fraction"),
    Parameter("num_nodes", "resources.num_nodes"),
    Parameter("nproc_per_node", "resources.nproc_per_node"),
    Parameter("max_general_ppl_increase", "evaluation.max_general_ppl_increase"),
    Parameter("min_domain_loss_improvement", "evaluation.min_domain_loss_improvement"),
)
BY_NAME = {p.name: p for p in PARAMETERS}
NAMES = tuple(BY_NAME)


# -- the pipeline's signature --------------------------------------------------------------------------


def signature() -> inspect.Signature:
    """The pipeline function's parameters: every typed one with its default, then `config`."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(p.name, kind, default=p.default, annotation=p.type) for p in PARAMETERS]
    params.append(inspect.Parameter(CONFIG, kind, default={}, annotation=dict))
    return inspect.Signature(params)


def docstring(summary: str, returns: str = "", times: bool = False) -> str:
    """A Google-style docstring whose Args are the descriptions the Kubeflow UI shows in the form
    (with `times`, also the run-time inputs of the configure step)."""
    lines = [summary, "", "Args:"]
    if times:
        lines += [
            "    scheduled_time: The time a recurring run was scheduled for (KFP fills it in); fixes {date} data URIs.",
            "    created_time: The run's creation time (KFP fills it in); fixes {date} data URIs of a manual run.",
        ]
    lines += [f"    {p.name}: {p.description}" for p in PARAMETERS]
    lines.append(f"    {CONFIG}: {CONFIG_DESCRIPTION}")
    if returns:
        lines += ["", "Returns:", f"    {returns}"]
    return "\n".join(lines) + "\n"


# -- resolving a run's parameters into one config ----------------------------------------------------


def resolve(
    config: dict[str, Any] | None,
    values: dict[str, Any],
    *,
    config_source: str = "pipeline parameter 'config'",
    value_source: str = "pipeline parameter",
) -> dict[str, Any]:
    """`config` with every typed parameter that is set merged in, validated as a RunConfig.

    Raises:
        ConfigError: a parameter is unknown or of the wrong type; a typed parameter and `config`
            set one field to different values (every such pair named); or the merged config is
            invalid (fields set by a typed parameter are named by it).
    """
    config = dict(config or {})
    _refuse_parameters_in_config(config, config_source)
    unknown = sorted(set(values) - set(BY_NAME))
    if unknown:
        raise ConfigError(f"unknown {value_source}(s) {', '.join(unknown)}; known: {', '.join(NAMES)}")
    overlay: dict[str, Any] = {}
    conflicts = []
    for name, value in values.items():
        param = BY_NAME[name]
        value = coerce(param, value, value_source)
        if not param.is_set(value):
            continue
        written = _written(param, config)
        if param.is_set(written) and not _same(written, value):
            conflicts.append(
                f"  {value_source} {name}={value!r} and {config_source} {param.field}={written!r}"
            )
        overlay = deep_merge(overlay, expand_dotted({param.field: value}))
    if conflicts:
        raise ConfigError(
            "one field set two different ways (set it in one place; a typed parameter at its default "
            "leaves the field to config):\n" + "\n".join(conflicts)
        )
    merged = deep_merge(config, overlay)
    by_field = {p.field: f"{value_source} {p.name}" for p in PARAMETERS if _get(overlay, p.field) is not None}
    source = f"{config_source} with the typed parameters" if overlay else config_source
    try:
        RunConfig.from_dict(merged, source=source)
    except ConfigError as exc:
        raise ConfigError(_name_parameters(str(exc), by_field)) from None
    return merged


def _refuse_parameters_in_config(config: dict[str, Any], config_source: str) -> None:
    """A pipeline parameter's name at the top of `config` (the Kubeflow UI's `config` box filled with
    {"learning_rate": ...}, or a whole parameters file pasted there) is refused naming where its value
    belongs; the RunConfig's own check would call the correctly spelled name an unknown field."""
    lines = [
        f"  {name}: a pipeline parameter, not a RunConfig field: set the parameter {name}, "
        f"or {BY_NAME[name].field} in {CONFIG} ({_nested(BY_NAME[name].field, config[name])})"
        for name in config
        if name in BY_NAME
    ]
    if CONFIG in config:
        lines.append(f"  {CONFIG}: the run configuration's own name: put its sections at the top level")
    if lines:
        raise ConfigError(f"{config_source}: holds pipeline parameters:\n" + "\n".join(lines))


def _nested(field: str, value: Any) -> str:
    """`field` = `value` as the config's JSON writes it: {"training": {"learning_rate": 2e-05}}."""
    return json.dumps(expand_dotted({field: value}))


def coerce(param: Parameter, value: Any, source: str = "parameter") -> Any:
    """`value` as the parameter's type: a JSON integer for a float, a whole float for an int, and a
    number written as text (YAML 1.1 reads `2e-5` as the string "2e-5")."""
    if param.type in (int, float) and isinstance(value, str):
        try:
            value = float(value) if param.type is float else int(value)
        except ValueError:
            pass
    if param.type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if param.type is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if param.type is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source} {param.name}: must be a finite number (got {value!r})")
    if not isinstance(value, param.type) or isinstance(value, bool):
        raise ConfigError(f"{source} {param.name}: expected {param.type.__name__} (got {value!r})")
    return value


def parse_assignment(text: str) -> tuple[str, Any]:
    """`name=value` from the command line, the value parsed as the parameter's type."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep:
        raise ConfigError(f"--param {text!r}: expected NAME=VALUE, e.g. learning_rate=2e-5")
    if name not in BY_NAME:
        raise ConfigError(f"--param {name}: not a pipeline parameter; known: {', '.join(NAMES)}")
    param = BY_NAME[name]
    if param.type is str:
        return name, raw
    try:
        number = param.type(raw)
    except ValueError:
        raise ConfigError(f"--param {name}: expected {param.type.__name__} (got {raw!r})") from None
    return name, coerce(param, number, "--param")


def split(config: dict[str, Any], names: Iterable[str] = NAMES) -> tuple[dict[str, Any], dict[str, Any]]:
    """(typed values, the rest of `config`): every field `config` writes that has a typed parameter
    among `names` moves into the values (None as the parameter's default); a section that held only
    such fields is dropped."""
    values: dict[str, Any] = {}
    rest = copy.deepcopy(config)
    for param in (BY_NAME[n] for n in names if n in BY_NAME):
        *sections, leaf = param.field.split(".")
        path = [rest]
        for section in sections:
            node = path[-1].get(section)
            if not isinstance(node, dict):
                break
            path.append(node)
        else:
            if leaf in path[-1]:
                value = path[-1].pop(leaf)
                values[param.name] = param.default if value is None else value
                for parent, section in zip(reversed(path[:-1]), reversed(sections), strict=True):
                    if not parent[section]:
                        del parent[section]
    return values, rest


def file_layers(data: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, typed values) of a parameters or config file's contents: a parameters file
    `{typed parameter: value, config: {...}}` split into both, a RunConfig as the config alone."""
    if not is_parameters_file(data):
        return data, {}
    config = data.get(CONFIG) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: `{CONFIG}` must be a mapping of RunConfig sections")
    # is_parameters_file admitted only parameter names besides `config`
    values = {k: coerce(BY_NAME[k], v, source) for k, v in data.items() if k != CONFIG}
    return config, values


def file_config(data: dict[str, Any], source: str) -> dict[str, Any]:
    """The RunConfig mapping a file's contents stand for, whichever of the two kinds it is: a
    RunConfig as written, or a parameters file's typed values merged into its `config` (`resolve`).
    Every command that takes a config file reads it so: the file a run is submitted with can be
    checked, run and uploaded as the defaults as it is."""
    config, values = file_layers(data, source)
    if values:
        config = resolve(config, values, config_source=f"{source} config", value_source=source)
    return config


def is_parameters_file(data: dict[str, Any]) -> bool:
    """True for {parameter name: value, config: {...}}; False for a RunConfig (its sections).

    Raises:
        ConfigError: the keys mix both kinds, naming them.
    """
    typed = sorted(k for k in data if k in BY_NAME or k == CONFIG)
    other = sorted(k for k in data if k not in BY_NAME and k != CONFIG)
    if typed and other:
        raise ConfigError(
            f"mixes pipeline parameters ({', '.join(typed)}) and RunConfig fields ({', '.join(other)}): "
            f"put the RunConfig fields under `{CONFIG}:`"
        )
    return bool(typed)


# -- defaults of an uploaded pipeline -------------------------------------------------------------------


def package_defaults(config: dict[str, Any], names: Iterable[str] = NAMES) -> dict[str, Any]:
    """The pipeline parameters' defaults that make `config` (e.g. the cluster's settings from the
    Helm chart) what a run gets when nobody changes the form: every typed parameter among `names`
    its field's value, the rest of the mapping as `config`'s."""
    names = [n for n in names if n in BY_NAME]
    _, rest = split(config, names)
    return {**typed_values(RunConfig.from_dict(config), names), CONFIG: rest}


def typed_values(cfg: RunConfig, names: Iterable[str] = NAMES) -> dict[str, Any]:
    """The typed parameters' values in a validated config (None as the parameter's default)."""
    out = {}
    for param in (BY_NAME[n] for n in names):
        value: Any = cfg
        for part in param.field.split("."):
            value = getattr(value, part)
        out[param.name] = param.default if value is None else value
    return out


# -- helpers -----------------------------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return not isinstance(b, bool) and float(a) == float(b)
    return a == b


def _written(param: Parameter, config: dict[str, Any]) -> Any:
    """The parameter's field in `config` as the parameter's type where it is a number written as
    text (PyYAML reads `learning_rate: 2e-5` as "2e-5", and the config takes it as 2e-5), so the same
    value in the config file and on the form is no conflict; as written otherwise."""
    value = _get(config, param.field)
    try:
        return coerce(param, value)
    except ConfigError:  # not a value of the parameter's type: the config's validation names it
        return value


def _get(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _name_parameters(message: str, by_field: dict[str, str]) -> str:
    """A validation message whose lines about a field a typed parameter set say which parameter."""
    lines = []
    for line in message.splitlines():
        field = line.strip().split(":", 1)[0]
        lines.append(f"{line} [{by_field[field]}]" if field in by_field else line)
    return "\n".join(lines)
