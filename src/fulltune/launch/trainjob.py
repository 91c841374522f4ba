"""The TrainJob (Kubeflow Trainer v2, trainer.kubeflow.org/v1alpha1) that runs a `TrainJob` on Kubernetes.

Pure functions from (RunConfig, TrainJob, name, namespace, image, owner) to a plain dict, like
`pytorchjob.py`; nothing here talks to a cluster. Tests validate every variant against the CRD.

A TrainJob names a runtime (`resources.trainjob.runtime`, by default the ClusterTrainingRuntime the
Helm chart installs) whose JobSet template holds what is the same for every run: the security
contexts, the writable emptyDir for /tmp, and the failure policy. The TrainJob adds what is this
run's: the image and command, nodes, processes and resources per node (`trainer`), and, patched onto
the trainer's replicated job, the /dev/shm volume, PVC mounts, the Secrets whose keys become the
environment, node selector, tolerations and service account (`pod_patch`).

Each Trainer release takes that patch through another TrainJob field (`OVERRIDES_FIELDS`): v2.0
`podSpecOverrides`, v2.1 `podTemplateOverrides`, v2.2 and later `runtimePatches`; an API server drops
a field its CRD does not know, so the patch must go where the installed release reads it. The
launcher reads which one the cluster serves (`served_overrides_field`) unless the config names it
(`resources.trainjob.overrides_field`). The trainer's container takes plain variables only
(`trainer.env`: every release's webhook refuses `env` for it in the patch, and none has `envFrom`), so
Secrets are mounted as files and `fulltune.launch.node` exports their keys (`SECRET_ENV_DIRS`) before
torchrun starts the ranks: what `envFrom` gives a PyTorchJob's pod.

What the pods run is what the other launchers run: `fulltune.launch.node` (torchrun keeping the
ranks' exit codes) starting `TrainJob.entry_command()`. The Trainer's torch plugin sets the
distributed environment torchrun reads (PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR/PORT), so no
topology is written here.

Exit codes and restarts belong to the runtime (the chart's runtime, `charts/fulltune`): a container
exiting with a permanent code (PERMANENT_EXIT_CODES: bad config or data, a bug, unusable
checkpoints) fails its Job through the Job's podFailurePolicy, and the JobSet's failurePolicy fails
the whole JobSet at once on that reason; any other failure (a lost node, an NCCL or storage error,
138) fails the Job by its backoffLimit of 0 and the JobSet restarts the group, at most its
maxRestarts times; each restart resumes from the newest complete checkpoint.

Trainer v2.0's TrainJob has no place for affinity, a priority class, pod annotations, an active
deadline or a TTL, and later releases only some of them: they are the runtime's for every release
(`unsupported` refuses them in the config, naming where to set them instead), so that a run's config
means the same whichever release the cluster has.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fulltune.config import ConfigError, RunConfig
from fulltune.launch.base import NODE_MODULE, TrainJob
from fulltune.launch.kinds import JobKind
from fulltune.launch.pytorchjob import (
    container_env,
    env_secrets,
    job_metadata,
    pod_requests,
    pod_resources,
    pvc_volumes,
    shm_volume,
    toleration,
    volume_mounts,
)
from fulltune.launch.secret_env import SECRET_ENV_DIRS
from fulltune.train.exit_codes import is_retryable

API_VERSION = "trainer.kubeflow.org/v1alpha1"
KIND = "TrainJob"
GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
# Trainer v2's names (v2.0 and later) for the trainer's replicated job and container, and the label
# that marks the replicated job as the trainer in a runtime.
TRAINER_JOB = "node"
TRAINER_CONTAINER = "node"
ANCESTOR_LABEL, ANCESTOR_TRAINER = "trainer.kubeflow.org/trainjob-ancestor-step", "trainer"
# JobSet and Job labels on every pod: the JobSet is named as the TrainJob.
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"  # the node's rank
SHM_VOLUME = "fulltune-dshm"  # prefixed: the runtime may bring volumes of its own
SECRET_ENV_ROOT = "/var/run/fulltune/secret-env"
# The exit codes that must fail the TrainJob at once (the runtime's podFailurePolicy): 1-127, as
# `exit_codes.is_retryable` reads them.
PERMANENT_EXIT_CODES = tuple(code for code in range(1, 256) if not is_retryable(code))

RUNTIME_PLURALS = {"ClusterTrainingRuntime": "clustertrainingruntimes", "TrainingRuntime": "trainingruntimes"}

TRAINJOB = JobKind(
    kind=KIND,
    group=GROUP,
    version=VERSION,
    plural=PLURAL,
    container=TRAINER_CONTAINER,
    rank0_selector=lambda name: (
        f"{JOBSET_LABEL}={name},{REPLICATED_JOB_LABEL}={TRAINER_JOB},{COMPLETION_INDEX_LABEL}=0"
    ),
    pods_selector=lambda name: f"{JOBSET_LABEL}={name}",
    # the only conditions Trainer v2.0 and later set (its pre-release "Created" was removed before
    # v2.0.0): none says the pods have started, so the log copy looks for node 0's pod from the start
    conditions={
        "Suspended": ("suspended", False),
        "Complete": ("complete", False),
        "Failed": ("failed", False),
    },
    succeeded="Complete",
    missing_hint="is Kubeflow Trainer v2 installed?",
    rank0="node 0",
    # the runtime is read before the TrainJob is created (does it exist, how often does it restart)
    extra_access=tuple((GROUP, plural, "get") for plural in RUNTIME_PLURALS.values()),
)


def runtime_missing(cfg: RunConfig, namespace: str) -> tuple[str, str]:
    """(what does not exist, what to do) when the runtime the config's TrainJob names is missing."""
    runtime = cfg.resources.trainjob
    where = "" if runtime.runtime_kind == "ClusterTrainingRuntime" else f" in {namespace}"
    return (
        f"{runtime.runtime_kind} {runtime.runtime} does not exist{where}",
        "install the chart's runtime (trainJob.runtime.create) or set resources.trainjob.runtime (and "
        "runtime_kind) to one that exists (kubectl get clustertrainingruntimes,trainingruntimes -A)",
    )


def unsupported(cfg: RunConfig) -> list[str]:
    """The config's pod settings a TrainJob of this API version cannot carry, each naming the field
    and where the setting goes instead."""
    k8s = cfg.resources.kubernetes
    elsewhere = "set it in the runtime (the chart: trainJob.runtime.%s) or use resources.launcher: kubernetes"
    settings = [
        ("affinity", bool(k8s.affinity), "affinity"),
        ("priority_class_name", bool(k8s.priority_class_name), "priorityClassName"),
        ("istio_sidecar", k8s.istio_sidecar, "istioSidecar"),
        ("active_deadline_seconds", k8s.active_deadline_seconds is not None, "activeDeadlineSeconds"),
    ]
    return [
        f"resources.kubernetes.{field}: a TrainJob (resources.launcher: trainjob) has no place for it; "
        + elsewhere % value
        for field, is_set, value in settings
        if is_set
    ]


def build_trainjob(
    cfg: RunConfig,
    job: TrainJob,
    *,
    name: str,
    namespace: str,
    image: str,
    run_id: str = "",
    owner: dict[str, Any] | None = None,
    optional_secrets: tuple[str, ...] = (),
    overrides_field: str = "",
) -> dict[str, Any]:
    """The TrainJob manifest, its pod settings in `overrides_field` (by default the config's, and when
    that is `auto`, the newest release's); ConfigError when the config asks for what it cannot carry."""
    if problems := unsupported(cfg):
        raise ConfigError("; ".join(problems))
    field = overrides_field or configured_overrides_field(cfg) or NEWEST_OVERRIDES_FIELD
    metadata = job_metadata(name, namespace, run_id, owner)
    runtime = cfg.resources.trainjob
    spec = {
        "runtimeRef": {"apiGroup": GROUP, "kind": runtime.runtime_kind, "name": runtime.runtime},
        "trainer": trainer_spec(cfg, job, image, optional_secrets),
        # the patch of the trainer's pods, and the labels of the JobSet and its Jobs
        **OVERRIDES_FIELDS[field].wrap(pod_patch(cfg, optional_secrets), metadata["labels"]),
    }
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


def trainer_spec(
    cfg: RunConfig, job: TrainJob, image: str, optional_secrets: tuple[str, ...] = ()
) -> dict[str, Any]:
    resources = pod_resources(cfg, job.nproc_per_node, gpu=job.accelerator == "gpu")
    return {
        "image": image,
        "command": pod_command(job),
        "numNodes": job.num_nodes,
        "numProcPerNode": job.nproc_per_node,
        "resourcesPerNode": {"requests": pod_requests(cfg, resources), "limits": dict(resources)},
        "env": container_env(job) + secret_dirs_env(cfg, optional_secrets),
    }


def pod_command(job: TrainJob) -> list[str]:
    """torchrun through launch/node.py; nodes, node rank and master address come from the PET_*
    variables the Trainer sets."""
    return ["python", "-m", NODE_MODULE, f"--nproc-per-node={job.nproc_per_node}", *job.entry_command()]


def pod_patch(cfg: RunConfig, optional_secrets: tuple[str, ...]) -> dict[str, Any]:
    """This run's settings of the trainer's pods, the fields every release's patch of a pod spec has."""
    k8s = cfg.resources.kubernetes
    secrets = env_secrets(cfg, optional_secrets)
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "volumeMounts": [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
        + volume_mounts(cfg)
        + [
            {"name": _secret_volume(i), "mountPath": secret_env_dir(secret), "readOnly": True}
            for i, (secret, _) in enumerate(secrets)
        ],
    }
    patch: dict[str, Any] = {
        "containers": [container],
        "volumes": [shm_volume(SHM_VOLUME, k8s.shm_size)]
        + pvc_volumes(cfg)
        + [
            {"name": _secret_volume(i), "secret": {"secretName": secret, "optional": optional}}
            for i, (secret, optional) in enumerate(secrets)
        ],
    }
    if k8s.service_account_name:
        patch["serviceAccountName"] = k8s.service_account_name
    if k8s.node_selector:
        patch["nodeSelector"] = dict(k8s.node_selector)
    if k8s.tolerations:
        patch["tolerations"] = [toleration(t) for t in k8s.tolerations]
    return patch


def secret_env_dir(secret: str) -> str:
    """Where the trainer's container finds Secret `secret`'s keys, one file each."""
    return f"{SECRET_ENV_ROOT}/{secret}"


def _secret_volume(index: int) -> str:
    return f"fulltune-secret-env-{index}"  # prefixed as SHM_VOLUME; Secret names may be too long


def secret_dirs_env(cfg: RunConfig, optional_secrets: tuple[str, ...]) -> list[dict[str, str]]:
    """The variable telling `fulltune.launch.node` which mounted Secrets to export, in order."""
    dirs = [secret_env_dir(secret) for secret, _ in env_secrets(cfg, optional_secrets)]
    return [{"name": SECRET_ENV_DIRS, "value": ":".join(dirs)}] if dirs else []


@dataclass(frozen=True)
class OverridesField:
    """How one Trainer release takes a TrainJob's patch of the trainer's pods and its JobSet labels."""

    releases: str
    wrap: Callable[[dict[str, Any], dict[str, str]], dict[str, Any]]


def _pod_spec_overrides(patch: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    return {"podSpecOverrides": [{"targetJobs": [{"name": TRAINER_JOB}], **patch}], "labels": labels}


# The TrainJob's labels reach its JobSet only (JobSet does not copy its own labels to its Jobs or
# pods), so from v2.1, whose patch has the pod template's metadata, they are put on the pods too: one
# selector (pipeline/runid) finds a run's step pods and training pods, as with a PyTorchJob. v2.0's
# podSpecOverrides has no metadata.


def _pod_template_overrides(patch: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    overrides = [{"targetJobs": [{"name": TRAINER_JOB}], "metadata": {"labels": labels}, "spec": patch}]
    return {"podTemplateOverrides": overrides, "labels": labels}


def _runtime_patches(patch: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    pod = {"metadata": {"labels": labels}, "spec": patch}
    job = {"name": TRAINER_JOB, "template": {"spec": {"template": pod}}}
    template = {"metadata": {"labels": labels}, "spec": {"replicatedJobs": [job]}}
    return {"runtimePatches": [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": template}}]}


OVERRIDES_FIELDS = {
    "podSpecOverrides": OverridesField("Kubeflow Trainer v2.0", _pod_spec_overrides),
    "podTemplateOverrides": OverridesField("Kubeflow Trainer v2.1", _pod_template_overrides),
    "runtimePatches": OverridesField("Kubeflow Trainer v2.2 and later", _runtime_patches),
}
NEWEST_OVERRIDES_FIELD = list(OVERRIDES_FIELDS)[-1]  # the mapping runs from the oldest release
# The owner of a runtimePatches entry: Trainer requires a domain-prefixed path.
PATCH_MANAGER = "fulltune.dev/launcher"


def overrides_field_fix() -> str:
    """What to do where the field cannot be read from the cluster: name it, by release."""
    return "set resources.trainjob.overrides_field to the installed Kubeflow Trainer's: " + ", ".join(
        f"{field} ({f.releases})" for field, f in OVERRIDES_FIELDS.items()
    )


def configured_overrides_field(cfg: RunConfig) -> str | None:
    """The field the config names; None for `auto` (read it from the cluster)."""
    field = cfg.resources.trainjob.overrides_field
    return None if field == "auto" else field


def served_overrides_field(api_client: Any) -> str | None:
    """Which of `OVERRIDES_FIELDS` the cluster's TrainJob takes, from the OpenAPI v3 schema the API
    server publishes for trainer.kubeflow.org/v1alpha1 (readable by every authenticated identity,
    so the launcher needs no access to CustomResourceDefinitions); None when it names none of them.
    Raises the client's ApiException when the schema cannot be read."""
    data, _, _ = api_client.call_api(
        f"/openapi/v3/apis/{GROUP}/{VERSION}",
        "GET",
        auth_settings=["BearerToken"],
        _preload_content=False,
        _request_timeout=60,
    )
    schemas = json.loads(data.data).get("components", {}).get("schemas", {})
    for schema in schemas.values():
        kinds = schema.get("x-kubernetes-group-version-kind") or []
        if any(k.get("group") == GROUP and k.get("kind") == KIND for k in kinds):
            spec = (schema.get("properties") or {}).get("spec") or {}
            if ref := spec.get("$ref") or next(
                (a["$ref"] for a in spec.get("allOf", []) if "$ref" in a), None
            ):
                spec = schemas.get(ref.rsplit("/", 1)[-1], {})
            served = [field for field in OVERRIDES_FIELDS if field in (spec.get("properties") or {})]
            return served[0] if served else None
    return None
