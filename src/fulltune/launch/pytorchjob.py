"""The PyTorchJob (Kubeflow Training Operator, kubeflow.org/v1) that runs a `TrainJob` on Kubernetes.

Pure functions from (RunConfig, TrainJob, name, namespace, image, owner) to a plain dict; nothing here
talks to a cluster. Tests validate every variant against the CRD's schema.

What the pods run is what the local launcher runs: torchrun starting `TrainJob.entry_command()`
(`-m fulltune.train` and the trainer's arguments), P processes per pod. The operator supplies the rest of the distributed
environment (PET_NODE_RANK, MASTER_ADDR/PORT, and for several nodes the elastic rendezvous
PET_RDZV_ENDPOINT/PET_RDZV_BACKEND/PET_MAX_RESTARTS), so no address is written here.

Restarts, as the operator (v1.8+) actually implements them:

* `restartPolicy: ExitCode` on every replica. The operator recreates a pod whose container ended
  with a retryable code (128+signal: OOM-kill 137, SIGTERM 143 on eviction or node loss, ...) and
  fails the job on any other non-zero code, so exit 1 (bad config, bad data, a bug) is not retried.
  (`OnFailure` would retry those forever; `Never` would not survive a lost node.)
* `elasticPolicy` (c10d rendezvous, min = max = num_nodes, maxRestarts) only when there is more than
  one node. The operator's validating webhook rejects an elasticPolicy without a Worker replica spec
  ("must be configured if elastic policy is used"), and nothing in it conflicts with ExitCode: the
  webhook checks neither restartPolicy nor its combination with elasticPolicy. With it, a recreated
  pod rejoins the rendezvous and torchrun restarts the whole worker group (at most maxRestarts times);
  the new ranks resume from the newest complete checkpoint. A single node needs no rendezvous: the
  recreated pod simply starts again and resumes the same way.
* `runPolicy.backoffLimit = max_restarts`. Operators v1.8 and v1.9 do not count ExitCode
  recreations against it (kubeflow/trainer#2045; only 0 fails the job at its first retryable exit),
  so `active_deadline_seconds` is the hard bound. They check that deadline only when they next
  reconcile the job (a change of its pods), so the launcher enforces it too (`_check_deadline`).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from fulltune.config import RunConfig, VolumeMount
from fulltune.launch.base import NODE_MODULE, TrainJob
from fulltune.launch.kinds import JobKind

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
CONTAINER = "pytorch"  # the operator injects its environment into the container with this name
PORT_NAME, PORT = "pytorchjob-port", 23456  # the operator's defaults, written out
RUN_ID_LABEL = "pipeline/runid"  # the label KFP puts on its own pods: one selector finds both
MAX_NAME = 50  # pods and services are named <job>-worker-<i>; keep those within 63 characters
_HASH_CHARS = 10
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"

PYTORCHJOB = JobKind(
    kind=KIND,
    group=GROUP,
    version=VERSION,
    plural=PLURAL,
    container=CONTAINER,
    rank0_selector=lambda name: f"{JOB_NAME_LABEL}={name},{REPLICA_TYPE_LABEL}=master",
    pods_selector=lambda name: f"{JOB_NAME_LABEL}={name}",
    conditions={
        "Created": ("created; waiting for its pods to be scheduled", False),
        "Running": ("running", True),
        "Restarting": (
            "restarting (a pod was lost or failed with a retryable exit code); the ranks resume from the "
            "newest complete checkpoint",
            True,
        ),
        "Succeeded": ("succeeded", False),
        "Failed": ("failed", False),
        "Suspended": ("suspended", False),
    },
    succeeded="Succeeded",
    missing_hint="is the Kubeflow Training Operator installed?",
)


def job_name(run_id: str, task_name: str) -> str:
    """A stable DNS-1035 name for the (pipeline run, task) pair: `fulltune-<task>-<hash>`.

    The same run and task always give the same name, so a retried or restarted launcher finds the job
    its predecessor created instead of starting a second one.
    """
    digest = hashlib.sha256(f"{run_id}\x00{task_name}".encode()).hexdigest()[:_HASH_CHARS]
    readable = re.sub(r"[^a-z0-9]+", "-", task_name.lower()).strip("-")
    room = MAX_NAME - len("fulltune-") - len(digest) - 1
    readable = readable[:room].strip("-")
    return f"fulltune-{readable}-{digest}" if readable else f"fulltune-{digest}"


def label_value(value: str) -> str:
    """`value` made a valid label value (63 characters of [A-Za-z0-9._-], alphanumeric at both ends)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", value)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", cleaned)


def workflow_owner(name: str, uid: str) -> dict[str, Any]:
    """An ownerReference to the Argo Workflow of the pipeline run: deleting the run deletes the job.

    Neither `controller` nor `blockOwnerDeletion` is set: the latter needs update rights on
    workflows/finalizers, which the pipeline's service account does not usually have.
    """
    return {"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow", "name": name, "uid": uid}


def job_metadata(name: str, namespace: str, run_id: str, owner: dict[str, Any] | None) -> dict[str, Any]:
    """A training job's metadata, whatever its kind: fulltune's labels (the NetworkPolicy selects the
    pods by them), the pipeline run's id (the label KFP puts on its own pods) and the Workflow owner."""
    labels = {
        "app.kubernetes.io/name": "fulltune",
        "app.kubernetes.io/component": "train",
        "app.kubernetes.io/managed-by": "fulltune",
    }
    if run_id and label_value(run_id):
        labels[RUN_ID_LABEL] = label_value(run_id)
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if owner:
        metadata["ownerReferences"] = [owner]
    return metadata


def build_pytorchjob(
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
    """The PyTorchJob manifest: Master (1) + Worker (num_nodes - 1), P processes each."""
    k8s = cfg.resources.kubernetes
    metadata = job_metadata(name, namespace, run_id, owner)
    labels = metadata["labels"]

    template = pod_template(cfg, job, image=image, labels=labels, optional_secrets=optional_secrets)
    replicas = {"Master": replica_spec(1, template)}
    if job.num_nodes > 1:
        replicas["Worker"] = replica_spec(job.num_nodes - 1, template)

    run_policy: dict[str, Any] = {"cleanPodPolicy": k8s.clean_pod_policy, "backoffLimit": k8s.max_restarts}
    if k8s.active_deadline_seconds is not None:
        run_policy["activeDeadlineSeconds"] = k8s.active_deadline_seconds
    if k8s.ttl_seconds_after_finished is not None:
        run_policy["ttlSecondsAfterFinished"] = k8s.ttl_seconds_after_finished

    spec: dict[str, Any] = {
        "nprocPerNode": str(job.nproc_per_node),  # a string in the CRD ("auto", "gpu" or a number)
        "pytorchReplicaSpecs": replicas,
        "runPolicy": run_policy,
    }
    if job.num_nodes > 1:
        spec["elasticPolicy"] = {
            "rdzvBackend": "c10d",
            "rdzvId": name,
            "minReplicas": job.num_nodes,
            "maxReplicas": job.num_nodes,
            "maxRestarts": k8s.max_restarts,
        }
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


def replica_spec(replicas: int, template: dict[str, Any]) -> dict[str, Any]:
    # ExitCode: see the module docstring.
    return {"replicas": replicas, "restartPolicy": "ExitCode", "template": template}


def pod_command(job: TrainJob) -> list[str]:
    """torchrun (through launch/node.py, which keeps the ranks' exit codes) + the entry point. One node: a standalone rendezvous inside the pod. Several: the
    operator's elastic c10d rendezvous (endpoint, backend, max restarts arrive as PET_* variables)."""
    topology = (
        ["--standalone", "--nnodes=1"]
        if job.num_nodes == 1
        else [f"--nnodes={job.num_nodes}:{job.num_nodes}"]
    )
    return [
        "python",
        "-m",
        NODE_MODULE,
        *topology,
        f"--nproc-per-node={job.nproc_per_node}",
        *job.entry_command(),
    ]


def pod_template(
    cfg: RunConfig,
    job: TrainJob,
    *,
    image: str,
    labels: dict[str, str],
    optional_secrets: tuple[str, ...] = (),
) -> dict[str, Any]:
    k8s = cfg.resources.kubernetes
    resources = pod_resources(cfg, job.nproc_per_node, gpu=job.accelerator == "gpu")
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": pod_command(job),
        "env": container_env(job),
        "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}],
        "securityContext": RESTRICTED_CONTAINER,
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]
        + volume_mounts(cfg),
    }
    env_from = secret_env_from(cfg, optional_secrets)
    if env_from:
        container["envFrom"] = env_from
    if resources:
        container["resources"] = {"requests": pod_requests(cfg, resources), "limits": dict(resources)}

    pod: dict[str, Any] = {
        "containers": [container],
        "securityContext": RESTRICTED_POD,
        "volumes": [shm_volume("dshm", k8s.shm_size), {"name": "tmp", "emptyDir": {}}] + pvc_volumes(cfg),
    }
    if k8s.service_account_name:
        pod["serviceAccountName"] = k8s.service_account_name
    if k8s.priority_class_name:
        pod["priorityClassName"] = k8s.priority_class_name
    if k8s.node_selector:
        pod["nodeSelector"] = dict(k8s.node_selector)
    if k8s.tolerations:
        pod["tolerations"] = [toleration(t) for t in k8s.tolerations]
    if k8s.affinity:
        pod["affinity"] = k8s.affinity
    pod_labels, annotations = istio_metadata(k8s.istio_sidecar)
    return {"metadata": {"labels": {**labels, **pod_labels}, "annotations": annotations}, "spec": pod}


# Pod Security "restricted": the training image runs as a non-root user; the root filesystem is
# read-only, so what is written goes to emptyDirs.
RESTRICTED_CONTAINER: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_POD: dict[str, Any] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def container_env(job: TrainJob) -> list[dict[str, str]]:
    """The training container's plain variables (never credentials: those come from Secrets)."""
    # HOME on the /tmp emptyDir: the root filesystem is read-only, and caches (torch extensions,
    # Triton kernels, Hugging Face) go under $HOME.
    env = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HOME": "/tmp", **job.env}
    if job.accelerator == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    return [{"name": key, "value": value} for key, value in env.items()]


def env_secrets(cfg: RunConfig, optional_secrets: tuple[str, ...]) -> list[tuple[str, bool]]:
    """(Secret, optional) of the Secrets whose keys become the training container's environment, in
    order (a later one's key wins). Credentials stay in their Secrets: the pod reads them, the
    manifest only names them. The configured ones must exist; the optional ones (the pipeline's S3
    and MLflow Secrets) may not."""
    configured = cfg.resources.kubernetes.secret_env
    optional = [s for s in dict.fromkeys(optional_secrets) if s and s not in configured]
    return [(secret, False) for secret in configured] + [(secret, True) for secret in optional]


def secret_env_from(cfg: RunConfig, optional_secrets: tuple[str, ...]) -> list[dict[str, Any]]:
    """`env_secrets` as the container's envFrom."""
    return [
        {"secretRef": {"name": secret, "optional": True} if optional else {"name": secret}}
        for secret, optional in env_secrets(cfg, optional_secrets)
    ]


def shm_volume(name: str, size: str) -> dict[str, Any]:
    """/dev/shm as a memory-backed emptyDir: the container runtime's 64 MiB default starves NCCL and
    the data loader."""
    return {"name": name, "emptyDir": {"medium": "Memory", "sizeLimit": size}}


def volume_mounts(cfg: RunConfig) -> list[dict[str, Any]]:
    return [
        {"name": _volume_name(i), "mountPath": v.mount_path, "readOnly": v.read_only}
        for i, v in enumerate(cfg.resources.kubernetes.volumes)
    ]


def pvc_volumes(cfg: RunConfig) -> list[dict[str, Any]]:
    return [_pvc_volume(i, v) for i, v in enumerate(cfg.resources.kubernetes.volumes)]


ISTIO_INJECT = "sidecar.istio.io/inject"
RENDEZVOUS_PORTS = f"{PORT},29500"  # the operator's master port and torchrun's default


def istio_metadata(sidecar: bool) -> tuple[dict[str, str], dict[str, str]]:
    """(labels, annotations) of a training pod for Istio.

    Without a sidecar (the default): the opt-out, as a label (what current Istio reads first) and as
    the annotation older versions read. With one: the application starts once the proxy is ready
    (else the first rendezvous connections fail), and the rendezvous ports bypass the proxy in both
    directions so that torchrun's c10d store is reached directly; NCCL's own connections still go
    through it.
    """
    if not sidecar:
        return {ISTIO_INJECT: "false"}, {ISTIO_INJECT: "false"}
    return {}, {
        "proxy.istio.io/config": '{"holdApplicationUntilProxyStarts": true}',
        "traffic.sidecar.istio.io/excludeInboundPorts": RENDEZVOUS_PORTS,
        "traffic.sidecar.istio.io/excludeOutboundPorts": RENDEZVOUS_PORTS,
    }


CPU_PER_PROCESS = 4
MEMORY_GIB_PER_PROCESS = 32


def pod_resources(cfg: RunConfig, nproc_per_node: int, *, gpu: bool) -> dict[str, str]:
    """Requests (= limits) of one training pod: one GPU per process, and CPU and memory from the
    config or, unset, per process (a profile's ResourceQuota rejects pods without them)."""
    k8s = cfg.resources.kubernetes
    out: dict[str, str] = {}
    if gpu:
        out[k8s.gpu_resource_name] = str(nproc_per_node)
    out["cpu"] = k8s.cpu or str(CPU_PER_PROCESS * nproc_per_node)
    out["memory"] = k8s.memory or f"{MEMORY_GIB_PER_PROCESS * nproc_per_node}Gi"
    return out


def pod_requests(cfg: RunConfig, resources: dict[str, str]) -> dict[str, str]:
    """What one training pod requests: its `pod_resources`, and the ephemeral storage its /tmp
    needs, which is requested only (a limit would evict the pod at an estimate)."""
    scratch = cfg.resources.kubernetes.ephemeral_storage
    return {**resources, "ephemeral-storage": scratch} if scratch else dict(resources)


def _volume_name(index: int) -> str:
    return f"pvc-{index}"


def _pvc_volume(index: int, volume: VolumeMount) -> dict[str, Any]:
    return {
        "name": _volume_name(index),
        "persistentVolumeClaim": {"claimName": volume.claim_name, "readOnly": volume.read_only},
    }


def toleration(t) -> dict[str, Any]:
    out: dict[str, Any] = {"operator": t.operator}
    if t.key is not None:
        out["key"] = t.key
    if t.value is not None:
        out["value"] = t.value
    if t.effect is not None:
        out["effect"] = t.effect
    if t.toleration_seconds is not None:
        out["tolerationSeconds"] = t.toleration_seconds
    return out
