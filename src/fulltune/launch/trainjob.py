"""The TrainJob (Kubeflow Trainer v2, trainer.kubeflow.org/v1alpha1) that runs a `TrainJob` on Kubernetes.

Pure functions from (RunConfig, TrainJob, name, namespace, image, owner) to a plain dict, like
`pytorchjob.py`; nothing here talks to a cluster. Tests validate every variant against the CRD.

A TrainJob names a runtime (`resources.trainjob.runtime`, by default the ClusterTrainingRuntime the
Helm chart installs) whose JobSet template holds what is the same for every run: the security
contexts, the writable emptyDir for /tmp, and the failure policy. The TrainJob adds what is this
run's: the image and command, nodes, processes and resources per node (`trainer`), and through
`podSpecOverrides` on the trainer's replicated job the /dev/shm volume, PVC mounts, Secrets as
environment, node selector, tolerations and service account.

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

This version of the TrainJob API has no place for affinity, a priority class, pod annotations, an
active deadline or a TTL: those are the runtime's (`unsupported` refuses them in the config, naming
where to set them instead).
"""

from __future__ import annotations

from typing import Any

from fulltune.config import ConfigError, RunConfig
from fulltune.launch.base import NODE_MODULE, TrainJob
from fulltune.launch.kinds import JobKind
from fulltune.launch.pytorchjob import (
    container_env,
    job_metadata,
    pod_requests,
    pod_resources,
    pvc_volumes,
    secret_env_from,
    shm_volume,
    toleration,
    volume_mounts,
)
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
    conditions={
        "Created": ("created its JobSet; the pods start", True),
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
) -> dict[str, Any]:
    """The TrainJob manifest; ConfigError when the config asks for what it cannot carry."""
    if problems := unsupported(cfg):
        raise ConfigError("; ".join(problems))
    metadata = job_metadata(name, namespace, run_id, owner)
    runtime = cfg.resources.trainjob
    spec = {
        "runtimeRef": {"apiGroup": GROUP, "kind": runtime.runtime_kind, "name": runtime.runtime},
        "trainer": trainer_spec(cfg, job, image),
        "podSpecOverrides": [pod_overrides(cfg, optional_secrets)],
        "labels": metadata["labels"],  # on the JobSet and its Jobs
    }
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


def trainer_spec(cfg: RunConfig, job: TrainJob, image: str) -> dict[str, Any]:
    resources = pod_resources(cfg, job.nproc_per_node, gpu=job.accelerator == "gpu")
    return {
        "image": image,
        "command": pod_command(job),
        "numNodes": job.num_nodes,
        "numProcPerNode": job.nproc_per_node,
        "resourcesPerNode": {"requests": pod_requests(cfg, resources), "limits": dict(resources)},
        "env": container_env(job),
    }


def pod_command(job: TrainJob) -> list[str]:
    """torchrun through launch/node.py; nodes, node rank and master address come from the PET_*
    variables the Trainer sets."""
    return ["python", "-m", NODE_MODULE, f"--nproc-per-node={job.nproc_per_node}", *job.entry_command()]


def pod_overrides(cfg: RunConfig, optional_secrets: tuple[str, ...]) -> dict[str, Any]:
    """This run's pod settings, applied to the trainer's replicated job."""
    k8s = cfg.resources.kubernetes
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "volumeMounts": [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}] + volume_mounts(cfg),
    }
    if env_from := secret_env_from(cfg, optional_secrets):
        container["envFrom"] = env_from
    overrides: dict[str, Any] = {
        "targetJobs": [{"name": TRAINER_JOB}],
        "containers": [container],
        "volumes": [shm_volume(SHM_VOLUME, k8s.shm_size)] + pvc_volumes(cfg),
    }
    if k8s.service_account_name:
        overrides["serviceAccountName"] = k8s.service_account_name
    if k8s.node_selector:
        overrides["nodeSelector"] = dict(k8s.node_selector)
    if k8s.tolerations:
        overrides["tolerations"] = [toleration(t) for t in k8s.tolerations]
    return overrides
