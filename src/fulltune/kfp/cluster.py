"""Names the compiled pipeline shares with the cluster, in one place and without importing kfp, so the
command line can offer them as defaults without paying for the kfp import."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

# The Kubernetes Secret whose keys reach every step pod as environment variables. The keys are the
# variable names boto3 reads; a key missing from the Secret leaves its variable unset (region and
# endpoint are often absent on AWS proper).
S3_SECRET = "fulltune-s3"
S3_SECRET_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",  # temporary credentials (STS)
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)
# The Secret whose MODEL_REGISTRY_TOKEN reaches the register step (Kubeflow Model Registry behind an
# authenticating proxy); optional, like the S3 one: without it the pod's service-account token is used.
REGISTRY_SECRET = "fulltune-model-registry"
REGISTRY_SECRET_KEYS = ("MODEL_REGISTRY_TOKEN",)
# The Secret whose keys reach the steps that report to MLflow (training.report_to: mlflow) and the
# training pods: the variables the mlflow client reads its server and credentials from, so nothing
# about them travels as a parameter or an argument. None by default (`--mlflow-secret NAME`);
# optional like the others: a key missing from it leaves its variable unset.
MLFLOW_SECRET_KEYS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
)
MLFLOW_STEPS = ("train", "evaluate", "register")  # the steps whose pods get it

# A Secret's name is a DNS-1123 subdomain. Anything else where a name belongs is most likely the
# credential itself, pasted in its place: it would be written into the compiled pipeline, a run's
# config, the pods' manifests and messages, and Kubernetes would refuse it only at the pods. It is
# refused first, and never shown.
_SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
NOT_A_SECRET_NAME = (
    "is not a Kubernetes Secret name (lowercase letters, digits, '-' and '.'; not shown, in case it is "
    "a credential): give the name of the Secret that holds the credentials, never a credential"
)


def is_secret_name(name: str) -> bool:
    return len(name) <= 253 and bool(_SECRET_NAME.fullmatch(name))


def secret_name_argument(value: str) -> str:
    """argparse type of a --*-secret option: a Secret's name, or '' for none."""
    import argparse

    if value and not is_secret_name(value):
        raise argparse.ArgumentTypeError(NOT_A_SECRET_NAME)
    return value


GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class StepResources:
    """CPU and memory of one step's pod: requests (what a profile's ResourceQuota counts and the
    scheduler reserves) and limits (a quota with limits.* rejects pods without them)."""

    cpu: str
    memory: str
    cpu_limit: str
    memory_limit: str


# Per step, sized for a 7-8B model and a few GB of data; `fulltune compile --step-resources FILE`
# overrides any of them. The training pods of the kubernetes launcher are sized by
# resources.kubernetes.cpu/memory instead: the `train` step pod only launches and watches them.
STEP_RESOURCES: dict[str, StepResources] = {
    "configure": StepResources("250m", "512Mi", "1", "1Gi"),  # merges the parameters into the config
    "validate_data": StepResources("2", "4Gi", "4", "8Gi"),  # streams the data; worker processes
    "check_tokenizer": StepResources("1", "2Gi", "2", "4Gi"),
    "plan": StepResources("1", "2Gi", "2", "4Gi"),  # the model on the meta device, a token sample
    "list_shards": StepResources("250m", "512Mi", "1", "1Gi"),
    "preprocess_shard": StepResources("2", "4Gi", "4", "8Gi"),  # tokenizes one shard
    "gather_shards": StepResources("250m", "512Mi", "1", "1Gi"),
    "train": StepResources("500m", "1Gi", "2", "4Gi"),  # launches and watches the PyTorchJob
    "evaluate": StepResources("4", "32Gi", "8", "64Gi"),  # base and tuned model in host memory while loading
    "register": StepResources("1", "2Gi", "2", "8Gi"),  # checksums and uploads the model files
}


def step_resources(
    overrides: Mapping[str, Mapping[str, str]] | None, source: str = ""
) -> dict[str, StepResources]:
    """STEP_RESOURCES with `overrides` ({step: {cpu, memory, cpu_limit, memory_limit}}) applied; a
    ValueError names an unknown step or field, a value that is no quantity or a request above its
    limit, and `source`."""
    out = dict(STEP_RESOURCES)
    where = f" in {source}" if source else ""
    for step, fields in (overrides or {}).items():
        if step not in out:
            raise ValueError(f"step resources{where}: unknown step {step!r}; steps: {', '.join(out)}")
        if not isinstance(fields, Mapping):
            raise ValueError(
                f"step resources{where}: {step}: expected a mapping of cpu, memory, cpu_limit, "
                f"memory_limit (got {fields!r})"
            )
        unknown = set(fields) - set(StepResources.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"step resources{where}: {step}: unknown field(s) {sorted(unknown)}; "
                "fields: cpu, memory, cpu_limit, memory_limit"
            )
        out[step] = replace(out[step], **{k: str(v) for k, v in fields.items()})
        _check_step_resources(out[step], f"step resources{where}: {step}")
    return out


# Kubernetes quantities as KFP's compiler accepts them (kfp.dsl.PipelineTask): CPU in cores or
# millicores, memory in bytes with an optional decimal or binary suffix.
_CPU = re.compile(r"(?P<n>([0-9]*[.])?[0-9]+)(?P<unit>m?)")
_MEMORY = re.compile(r"(?P<n>[0-9]+)(?P<unit>E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki|)")
_MEMORY_UNITS = {"": 1} | {
    unit + binary: (1024 if binary else 1000) ** (i + 1)
    for i, unit in enumerate("KMGTPE")
    for binary in ("", "i")
}


def _quantity(value: str, memory: bool) -> float | None:
    """`value` in cores or bytes, or None where KFP's compiler would refuse it."""
    m = (_MEMORY if memory else _CPU).fullmatch(value)
    if m is None:
        return None
    if memory:
        return float(m["n"]) * _MEMORY_UNITS[m["unit"]]
    return float(m["n"]) / (1000 if m["unit"] else 1)


def _check_step_resources(res: StepResources, where: str) -> None:
    """Refuse, naming the field, a value KFP cannot compile (found here rather than as kfp's
    traceback) or a request above its limit (Kubernetes would refuse the step's pod at run time)."""
    for request, limit, memory in (("cpu", "cpu_limit", False), ("memory", "memory_limit", True)):
        amounts = {}
        for field in (request, limit):
            amounts[field] = _quantity(getattr(res, field), memory)
            if amounts[field] is None:
                form = "e.g. 8Gi or 512Mi" if memory else "cores or millicores, e.g. 4 or 500m"
                raise ValueError(f"{where}: {field} {getattr(res, field)!r} is not a quantity ({form})")
        if amounts[request] > amounts[limit]:
            raise ValueError(
                f"{where}: {request} {getattr(res, request)!r} is more than {limit} "
                f"{getattr(res, limit)!r}; Kubernetes refuses a pod whose request exceeds its limit"
            )
