"""Whether a cluster's nodes could hold a training pod, read from the Node objects: what `fulltune
doctor` reports before a run is created, instead of pods that stay Pending.

A node can hold one when it is schedulable, carries `resources.kubernetes.node_selector`'s labels,
has no NoSchedule/NoExecute taint `resources.kubernetes.tolerations` does not tolerate, and has the
pod's requests within its allocatable; and, where GPU feature discovery labels it (the NVIDIA GPU
operator does), GPUs with the memory `resources.gpu_memory_gib` planned for and, for bf16 training,
compute capability 8 or more. Whether it has room now is the same sum less what the pods already
bound to it request (`requested_on_nodes`), as the scheduler counts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fulltune.config import BF16_CAPABILITY, GPU_MEMORY_SLACK, RunConfig, Toleration

# GPU feature discovery's labels (NVIDIA GPU operator): each GPU's memory in MiB, its model, and its
# CUDA compute capability's major number.
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_COMPUTE_MAJOR_LABEL = "nvidia.com/gpu.compute.major"

# What to change for each reason `why_unfit` gives.
AUTOSCALER = "without them the pods stay Pending, unless a cluster autoscaler adds fitting nodes on demand"
NODE_FIXES = {
    "cordoned": "uncordon the node",
    "label": "set resources.kubernetes.node_selector to labels the training nodes carry",
    "taint": "add the taint to resources.kubernetes.tolerations (key, operator, effect)",
    "gpu": (
        "lower resources.nproc_per_node to the GPUs one node has and raise resources.num_nodes (a node "
        "with no GPUs allocatable runs no GPU device plugin)"
    ),
    "gpu memory": (
        "set resources.gpu_memory_gib (and gpu_type) to the training nodes' GPUs and plan again, or pick "
        "nodes with larger GPUs (resources.kubernetes.node_selector)"
    ),
    "bf16": (
        "set training.bf16: false and training.fp16: true, or pick nodes with Ampere or newer GPUs "
        "(resources.kubernetes.node_selector)"
    ),
    "cpu": "lower resources.kubernetes.cpu",
    "memory": "lower resources.kubernetes.memory",
    "ephemeral-storage": "put work_dir on a volume, or use nodes with larger disks (resources.kubernetes.ephemeral_storage)",
}

_SUFFIXES = {
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def parse_quantity(text: str) -> float:
    """A Kubernetes quantity ("500m", "16", "200Gi") as a number."""
    text = str(text)
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * _SUFFIXES[suffix]
    return float(text)


@dataclass(frozen=True)
class TrainingPod:
    """What the scheduler weighs of one training pod: its requests, as its manifest has them, its
    node selector and its tolerations."""

    requests: dict[str, str]
    node_selector: dict[str, str]
    tolerations: tuple[Toleration, ...]

    @classmethod
    def of(cls, cfg: RunConfig, runtime: dict[str, Any] | None = None) -> TrainingPod:
        """The pod `cfg`'s launcher makes; for a TrainJob on `runtime` (None: unread), with the
        runtime pod template's node selector and tolerations as the TrainJob's pod patch
        combines them: the selector key by key, the run's value winning; the run's tolerations, when
        it has any, in place of the runtime's."""
        from fulltune.launch.pytorchjob import pod_requests, pod_resources

        res, k8s = cfg.resources, cfg.resources.kubernetes
        requests = pod_requests(cfg, pod_resources(cfg, res.nproc_per_node, gpu=res.accelerator == "gpu"))
        template = _trainer_pod_spec(runtime) if res.launcher == "trainjob" else {}
        selector = {**(template.get("nodeSelector") or {}), **k8s.node_selector}
        tolerations = tuple(k8s.tolerations) or tuple(
            Toleration(
                key=t.get("key"),
                operator=t.get("operator", "Equal"),
                value=t.get("value"),
                effect=t.get("effect"),
            )
            for t in template.get("tolerations") or []
        )
        return cls(requests, selector, tolerations)


def trainer_pod_template(runtime: dict[str, Any] | None) -> dict[str, Any]:
    """The pod template (metadata and spec) of a TrainingRuntime's trainer job
    (`trainjob.TRAINER_JOB`); {} when none."""
    from fulltune.launch.trainjob import TRAINER_JOB

    spec = ((runtime or {}).get("spec") or {}).get("template", {}).get("spec") or {}
    for job in spec.get("replicatedJobs") or []:
        if job.get("name") == TRAINER_JOB:
            return job.get("template", {}).get("spec", {}).get("template") or {}
    return {}


def _trainer_pod_spec(runtime: dict[str, Any] | None) -> dict[str, Any]:
    return trainer_pod_template(runtime).get("spec") or {}


def why_unfit(node, cfg: RunConfig, pod: TrainingPod) -> tuple[str, str] | None:
    """Why a training pod cannot go on `node`: (its `NODE_FIXES` key, the reason); None if it can."""
    spec, labels = node.spec, node.metadata.labels or {}
    if spec and spec.unschedulable:
        return "cordoned", "cordoned"
    for key, value in pod.node_selector.items():
        if labels.get(key) != value:
            return "label", f"no label {key}={value} (node_selector)"
    for taint in (spec.taints if spec else None) or []:
        if taint.effect in ("NoSchedule", "NoExecute") and not any(
            _tolerates(t, taint) for t in pod.tolerations
        ):
            shown = f"{taint.key}={taint.value}" if taint.value else taint.key
            return "taint", f"taint {shown}:{taint.effect} not tolerated"
    allocatable = (node.status.allocatable if node.status else None) or {}
    for key, amount in pod.requests.items():
        if parse_quantity(allocatable.get(key, "0")) < parse_quantity(amount):
            kind = key if key in NODE_FIXES else "gpu"
            return kind, f"{key} {allocatable.get(key, '0')} allocatable, {amount} needed"
    return _why_gpus_unfit(labels, cfg) if cfg.resources.accelerator == "gpu" else None


def _why_gpus_unfit(labels: dict[str, str], cfg: RunConfig) -> tuple[str, str] | None:
    """What GPU feature discovery's labels say the node's GPUs lack: the memory plan sized for, bf16."""
    product, res = labels.get(GPU_PRODUCT_LABEL, "its GPUs"), cfg.resources
    gib = _gpu_memory_gib(labels)
    if gib is not None and gib < GPU_MEMORY_SLACK * res.gpu_memory_gib:
        why = f"{product} has {gib:.1f} GiB a GPU, the memory plan assumed {res.gpu_memory_gib:g} (resources.gpu_memory_gib)"
        return "gpu memory", why
    major = labels.get(GPU_COMPUTE_MAJOR_LABEL, "")
    if cfg.precision == "bf16" and major.isdigit() and int(major) < BF16_CAPABILITY[0]:
        return "bf16", f"{product} has compute capability {major}.x, no bf16 (training.bf16)"
    return None


def _gpu_memory_gib(labels: dict[str, str]) -> float | None:
    try:
        return float(labels[GPU_MEMORY_LABEL]) / 1024
    except (KeyError, ValueError):
        return None


def unused_gpu_memory(nodes: list, planned_gib: float) -> str:
    """A note when every fitting node's GPUs are well larger than the memory plan assumed: plan
    chose micro batch and recomputation for the smaller GPU, leaving speed unused."""
    sizes = [_gpu_memory_gib(n.metadata.labels or {}) for n in nodes]
    if not sizes or None in sizes or min(sizes) < 1.15 * planned_gib:
        return ""
    return (
        f"; their GPUs have {min(sizes):.0f} GiB, the memory plan assumed {planned_gib:g}: set "
        "resources.gpu_memory_gib to theirs for a faster plan"
    )


def requested_on_nodes(pods: list) -> dict[str, dict[str, float]]:
    """What the pods bound to each node request, by node name, as the scheduler counts a pod: its
    containers' requests summed (a limit alone stands for the request, as the API server defaults
    it), restartable init containers (sidecars) added, or one ordinary init container's if that is
    larger, plus the pod's overhead. Pods that ended (Succeeded, Failed) hold nothing."""
    used: dict[str, dict[str, float]] = {}
    for pod in pods:
        if not (pod.spec and pod.spec.node_name) or (
            pod.status and pod.status.phase in ("Succeeded", "Failed")
        ):
            continue
        _add(used.setdefault(pod.spec.node_name, {}), _pod_request(pod.spec))
    return used


def _pod_request(spec) -> dict[str, float]:
    """Kubernetes' effective request: the larger of the running containers (sidecars included) and
    the peak of the init phase, where each ordinary init container runs beside the sidecars started
    before it."""
    sidecars: dict[str, float] = {}
    init_peak: dict[str, float] = {}
    for container in spec.init_containers or []:
        asked = _container_request(container)
        if getattr(container, "restart_policy", None) == "Always":
            _add(sidecars, asked)
        else:
            during = dict(sidecars)
            _add(during, asked)
            init_peak = {k: max(init_peak.get(k, 0.0), during.get(k, 0.0)) for k in {*init_peak, *during}}
    running = dict(sidecars)
    for container in spec.containers:
        _add(running, _container_request(container))
    total = {k: max(running.get(k, 0.0), init_peak.get(k, 0.0)) for k in {*running, *init_peak}}
    _add(total, {k: parse_quantity(v) for k, v in (spec.overhead or {}).items()})
    return total


def _add(into: dict[str, float], amounts: dict[str, float]) -> None:
    for key, amount in amounts.items():
        into[key] = into.get(key, 0.0) + amount


def _container_request(container) -> dict[str, float]:
    resources = container.resources
    limits = (resources.limits if resources else None) or {}
    requests = (resources.requests if resources else None) or {}
    return {key: parse_quantity(value) for key, value in {**limits, **requests}.items()}


def why_busy(node, pod: TrainingPod, used: dict[str, float]) -> str | None:
    """What the pods already on `node` (`used`: their requests) leave too little of for a training
    pod, the node otherwise fitting it; None when it has room now."""
    allocatable = node.status.allocatable or {}
    for key, amount in pod.requests.items():
        total, taken = parse_quantity(allocatable.get(key, "0")), used.get(key, 0.0)
        if total - taken < parse_quantity(amount):
            return f"{key} {format_quantity(key, taken)} of {allocatable.get(key)} requested by pods there, {amount} needed"
    return None


def format_quantity(key: str, amount: float) -> str:
    """An amount of resource `key` (`memory`, `requests.memory`, ...) as Kubernetes writes it: bytes
    in Gi, the rest as a number."""
    if key.endswith(("memory", "ephemeral-storage")):
        return f"{amount / 2**30:g}Gi"
    return f"{amount:g}"


def _tolerates(toleration, taint) -> bool:
    """Kubernetes' matching: an empty effect tolerates every effect; Exists with no key every taint."""
    if toleration.effect and toleration.effect != taint.effect:
        return False
    if toleration.operator == "Exists":
        return toleration.key in (None, "") or toleration.key == taint.key
    return toleration.key == taint.key and (toleration.value or "") == (taint.value or "")
