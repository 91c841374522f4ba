"""The parameters `fulltune submit` and `schedule` send, and the defaults an uploaded pipeline carries.

What a user gives, lowest layer first:

1. the package's own parameter defaults (for the chart's pipeline, the cluster's settings:
   `ClusterPackage`, which also puts the cluster's images, S3 Secret and MLflow Secret into the
   package);
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
from fulltune.kfp.cluster import MLFLOW_SECRET_KEYS, MLFLOW_STEPS


@dataclass(frozen=True)
class RunRequest:
    """What a run or recurring run is created with: `parameters` as sent, `config` as it will run."""

    parameters: dict[str, Any]
    config: RunConfig


# A recurring run is a retraining cycle: unless told otherwise it is judged against the version in
# production and promoted only when it is not worse (evaluation.compare_to).
SCHEDULED_DEFAULTS = {"evaluation": {"compare_to": "registered"}}


def build_request(
    declared: dict[str, dict[str, Any]],
    params_file: str | Path | None,
    assignments: list[str],
    *,
    scheduled: bool = False,
) -> RunRequest:
    """The request parameters for a package whose root input definitions are `declared`; with
    `scheduled`, `SCHEDULED_DEFAULTS` fill what neither the package nor the user set.

    Raises:
        ConfigError: naming the file, the `--param` or the field, and nothing is sent.
    """
    config, values, config_source = _user_layers(params_file, assignments)
    user = parameters.resolve(config, values, config_source=config_source, value_source="--param")
    merged = deep_merge(_package_config(declared), user)
    if scheduled:
        merged = deep_merge(SCHEDULED_DEFAULTS, merged)
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
    config, values = parameters.file_layers(data, str(params_file))
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


# -- the cluster's settings in an uploaded pipeline -----------------------------------------------------


@dataclass(frozen=True)
class ClusterPackage:
    """What a cluster changes in the compiled pipeline before uploading it (the Helm chart: its
    images, its S3 and MLflow Secrets, its run configuration); None keeps the package's own.

    defaults: a RunConfig (or parameters) file whose values become the parameters' defaults, so
        the Kubeflow UI's form starts from the cluster's settings and a run started there needs only
        the model, the data and a name.
    image: the CPU steps' image (a mirror, a digest).
    trainer_image: the image of the GPU evaluate step and of the training pods.
    s3_secret: the Secret every step pod reads its S3 credentials from; "" reads none.
    mlflow_secret: the Secret the train, evaluate and register steps and the training pods read the
        MLflow server and credentials from; "" reads none.
    work_pvc: "CLAIM:/PATH", a ReadWriteMany claim mounted into every step pod, for a work_dir on a
        volume (the training pods mount it through `resources.kubernetes.volumes`); "" mounts none.
    """

    defaults: str | Path | None = None
    image: str | None = None
    trainer_image: str | None = None
    s3_secret: str | None = None
    mlflow_secret: str | None = None
    work_pvc: str | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in vars(self).values())


AS_COMPILED = ClusterPackage()  # nothing changed: the package as it is


def write_cluster_package(package: Path, settings: ClusterPackage, dest: Path) -> Path:
    """`package` with `settings` applied, written to `dest`; only images, the Secrets' names and
    parameter defaults change, never the DAG."""
    docs = list(yaml.safe_load_all(package.read_text()))
    declared = docs[0].get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    if parameters.CONFIG not in declared:
        raise ConfigError(f"{package}: has no `{parameters.CONFIG}` parameter")
    _retarget(docs, settings, package)
    if settings.defaults is not None:
        # a parameters file too, as `submit --params` takes it (typed values merged into its config)
        config = parameters.file_config(read_config_file(settings.defaults), str(settings.defaults))
        RunConfig.from_dict(config, source=str(settings.defaults))
        for name, value in parameters.package_defaults(config, declared).items():
            declared[name]["defaultValue"] = value
    dest.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return dest


def _retarget(docs: list[dict], settings: ClusterPackage, package: Path) -> None:
    """Replace the compiled images and S3 Secret name wherever they occur as a whole value (executor
    images, the train step's constants, the platform spec's secretAsEnv), then set the MLflow Secret
    (`_set_mlflow_secret`)."""
    executors = docs[0].get("deploymentSpec", {}).get("executors", {})
    train_inputs = docs[0].get("root", {}).get("dag", {}).get("tasks", {}).get("train", {})
    constants = {
        name: spec.get("runtimeValue", {}).get("constant")
        for name, spec in train_inputs.get("inputs", {}).get("parameters", {}).items()
    }
    images = [e.get("container", {}).get("image") for e in executors.values()]
    compiled = {
        "image": max(set(images), key=images.count) if images else None,
        "trainer_image": constants.get("image"),
        "s3_secret": constants.get("s3_secret"),
    }
    for field, old in compiled.items():
        new = getattr(settings, field)
        if new is None or new == old:
            continue
        if old is None:
            raise ConfigError(f"{package}: cannot tell which {field.replace('_', ' ')} it was compiled with")
        for doc in docs:
            _replace_values(doc, old, new)
        if field == "s3_secret" and not new:  # no Secret at all: drop it from every step pod
            _drop_unnamed_secrets(docs)
    # Set after the replacements, and even when unchanged: an MLflow Secret that shares its name
    # with the S3 one was just replaced (or dropped) with it.
    mlflow = settings.mlflow_secret if settings.mlflow_secret is not None else constants.get("mlflow_secret")
    if mlflow is not None:
        _set_mlflow_secret(docs, train_inputs, mlflow, package)
    if settings.work_pvc is not None:
        _set_work_pvc(docs, settings.work_pvc)


def _set_work_pvc(docs: list[dict], spec: str) -> None:
    """Mount the claim of `spec` ("CLAIM:/PATH"; "" none) into every step pod, as compiling with
    `--work-pvc` does: one pvcMount in each executor's platform settings."""
    from fulltune.kfp.pipeline import parse_pvc

    mounts = []
    if spec:
        try:
            claim, path = parse_pvc(spec)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        name = {"runtimeValue": {"constant": claim}}
        mounts = [{"constant": claim, "mountPath": path, "pvcNameParameter": name}]
    if len(docs) < 2:  # no platform settings at all
        docs.append({})
    platform = docs[1].setdefault("platforms", {}).setdefault("kubernetes", {})
    executors = platform.setdefault("deploymentSpec", {}).setdefault("executors", {})
    for step in docs[0].get("deploymentSpec", {}).get("executors", {}):
        settings = {k: v for k, v in executors.get(step, {}).items() if k != "pvcMount"}
        if mounts:
            settings["pvcMount"] = mounts
        if settings:
            executors[step] = dict(sorted(settings.items()))  # the compiler's key order
        else:
            executors.pop(step, None)


def _set_mlflow_secret(docs: list[dict], train_task: dict, name: str, package: Path) -> None:
    """Make `name` ("" for none) the MLflow Secret of the package, as compiling with it does: the
    train step's `mlflow_secret` constant, and the last secretAsEnv entry of the MLFLOW_STEPS'
    executors. Not a value replacement: a package compiled without one has "" to replace."""
    params = train_task.get("inputs", {}).get("parameters", {})
    if "mlflow_secret" not in params:
        raise ConfigError(
            f"{package}: its train step takes no mlflow_secret (compiled before MLflow tracking); "
            "compile it again with `fulltune compile --mlflow-secret`"
        )
    params["mlflow_secret"] = {"runtimeValue": {"constant": name}}
    if len(docs) < 2:  # no platform settings at all
        docs.append({})
    platform = docs[1].setdefault("platforms", {}).setdefault("kubernetes", {})
    executors = platform.setdefault("deploymentSpec", {}).setdefault("executors", {})
    entry = {  # as kfp-kubernetes writes use_secret_as_env(..., optional=True)
        "keyToEnv": [{"envVar": k, "secretKey": k} for k in MLFLOW_SECRET_KEYS],
        "optional": True,
        "secretName": name,
        "secretNameParameter": {"runtimeValue": {"constant": name}},
    }
    for step in MLFLOW_STEPS:
        executor = executors.setdefault(f"exec-{step}", {})
        entries = executor.get("secretAsEnv", [])
        kept = [e for e in entries if not _is_mlflow_entry(e)] + ([entry] if name else [])
        if kept != entries:  # else untouched: the same package stays the same bytes
            executor["secretAsEnv"] = kept
        if not executor.get("secretAsEnv"):
            executor.pop("secretAsEnv", None)
        if not executor:
            del executors[f"exec-{step}"]


def _is_mlflow_entry(entry: dict) -> bool:
    return {k.get("secretKey") for k in entry.get("keyToEnv", [])} == set(MLFLOW_SECRET_KEYS)


def _drop_unnamed_secrets(docs: list[dict]) -> None:
    """Remove secretAsEnv entries left without a name from the platform settings (the compiled
    file's second document), and executors left with no settings, as compiling without does."""
    if len(docs) < 2:
        return
    platform = docs[1].get("platforms", {}).get("kubernetes", {})
    executors = platform.get("deploymentSpec", {}).get("executors", {})
    for name, executor in list(executors.items()):
        kept = [e for e in executor.pop("secretAsEnv", []) if e.get("secretName")]
        if kept:
            executor["secretAsEnv"] = kept
        if not executor:
            del executors[name]


def _replace_values(node: Any, old: str, new: str) -> None:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in list(items):
        if value == old:
            node[key] = new
        else:
            _replace_values(value, old, new)
