"""`fulltune doctor`: check, from a pod or a kube context, that a cluster can run this config.

A first install trips on things no config check sees: the Training Operator missing, a Role not
bound to the account the runs use, the S3 Secret in another namespace, Istio injecting sidecars,
a quota too small for the training pods. Each check here says what it found and, when it fails,
what to do; the command exits 1 if any check failed (warnings and checks it could not make do not
fail it). `helm test` runs it in the release's namespace as the runs' ServiceAccount.

Checks (in the namespace the runs go to):
- KFP: the API answers, with its version and whether it is multi-user;
- the training API of `resources.launcher` is served: discovery of both PyTorchJob
  (`kubeflow.org/v1`, launcher kubernetes) and TrainJob (`trainer.kubeflow.org/v1alpha1`, launcher
  trainjob), so that a cluster serving the other one is told which launcher to set;
- for launcher trainjob, the runtime it names exists, the TrainJob field that carries the run's pod
  settings is one the cluster's Trainer serves (`launch.trainjob.served_overrides_field`), and no
  config setting is one a TrainJob cannot carry (`launch.trainjob.unsupported`);
- every verb the launcher needs (`launch.kubernetes.launcher_access`), by SelfSubjectAccessReview
  (or, with a ServiceAccount named, by SubjectAccessReview for that account);
- the S3 Secret exists (or the pod already has S3 credentials), and the work directory's bucket
  answers with them;
- the Kubeflow Model Registry's REST endpoint answers, when `registry.kubeflow` is set;
- the MLflow Secret, when one is named (`--mlflow-secret`), exists and holds MLFLOW_TRACKING_URI;
- Istio injection on the namespace, and what that means for the training pods;
- room in the namespace's ResourceQuotas for the training pods' GPUs, CPU and memory;
- the training pods' ServiceAccount and `secret_env` Secrets exist;
- each PersistentVolumeClaim the training pods mount exists, is bound, and can be mounted by all of
  them (ReadWriteMany when they run on several nodes);
- enough nodes that could each hold a training pod: its GPUs, CPU, memory and ephemeral storage
  within a node's allocatable, the node_selector's labels, every NoSchedule taint tolerated.

The launcher's checks (`LAUNCHER_CHECKS`: its API, its runtime, its RBAC, what its pods name, the
nodes they could go on) need no KFP run;
`fulltune submit --check-cluster` runs the same functions before it creates a run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fulltune.config import RunConfig
from fulltune.kfp.cluster import S3_SECRET, secret_name_argument
from fulltune.launch.scheduling import (
    AUTOSCALER,
    NODE_FIXES,
    TrainingPod,
    format_quantity,
    parse_quantity,
    requested_on_nodes,
    unused_gpu_memory,
    why_busy,
    why_unfit,
)

OK, WARN, FAIL, UNKNOWN = "ok", "warn", "FAIL", "unknown"


@dataclass(frozen=True)
class Finding:
    check: str
    status: str  # OK | WARN | FAIL | UNKNOWN
    detail: str
    fix: str = ""

    def line(self) -> str:
        fix = f"\n        fix: {self.fix}" if self.fix and self.status != OK else ""
        return f"[{self.status:>7}] {self.check}: {self.detail}{fix}"


@dataclass
class Cluster:
    """What the checks talk to: a kubernetes ApiClient, the namespace, and the KFP host (or None)."""

    api: Any
    namespace: str
    kfp_host: str | None = None
    s3_secret: str = S3_SECRET
    mlflow_secret: str = ""  # none: MLflow is optional, and so is its check
    service_account: str = ""  # whose launcher RBAC is checked; none: the caller's


Check = Callable[[RunConfig, Cluster], list[Finding]]


def run_checks(cfg: RunConfig, cluster: Cluster) -> list[Finding]:
    cfg, findings = with_planned_scratch(cfg)
    checks = [
        check_kfp,
        *LAUNCHER_CHECKS,
        check_s3,
        check_model_registry,
        check_mlflow,
        check_istio,
        check_quota,
    ]
    return findings + _run(checks, cfg, cluster)


def launcher_checks(cfg: RunConfig, cluster: Cluster) -> list[Finding]:
    """The checks that need no KFP run: the launcher's API, runtime and RBAC; what its pods name
    (ServiceAccount, Secrets, volume claims) and the nodes they could go on."""
    return _run(LAUNCHER_CHECKS, cfg, cluster)


def _run(checks, cfg: RunConfig, cluster: Cluster) -> list[Finding]:
    findings: list[Finding] = []
    for check in checks:
        findings += check(cfg, cluster)
    return findings


def with_planned_scratch(cfg: RunConfig) -> tuple[RunConfig, list[Finding]]:
    """`cfg` with the ephemeral storage plan will request for each training pod when the config
    leaves it unset (`plan.scratch_request`, from the model's size), so that the node and quota
    checks count it; read from the base model's config.json, which must be readable here. The
    doctor's, which runs where the runs' S3 Secret is; not `submit --check-cluster`'s, whose machine
    need not reach the model."""
    from fulltune.launch.kubernetes import KINDS

    k8s, check = cfg.resources.kubernetes, "ephemeral storage"
    if cfg.resources.launcher not in KINDS or k8s.ephemeral_storage or not cfg.model.base_model_uri:
        return cfg, []
    from fulltune.plan import load_model_config, model_shape, scratch_request

    try:
        params = model_shape(load_model_config(cfg)).params
    except Exception as exc:  # noqa: BLE001 — plan reports it; here it is only what cannot be counted
        why = f"not counted: the base model's config cannot be read here ({str(exc).splitlines()[0]})"
        return cfg, [Finding(check, UNKNOWN, why)]
    request, why = scratch_request(cfg, params)
    planned = cfg.with_overrides({"resources.kubernetes.ephemeral_storage": request})
    return planned, [Finding(check, OK, f"{request} a training pod, as plan will request it: {why}")]


# -- the checks ------------------------------------------------------------------------------------


def check_kfp(cfg: RunConfig, cluster: Cluster) -> list[Finding]:
    from fulltune.kfp.submit import connect

    if not cluster.kfp_host:
        return [Finding("KFP API", UNKNOWN, "no address", "pass --host or set KFP_HOST")]
    try:
        client = connect(cluster.kfp_host, cluster.namespace)
        health = client.get_kfp_healthz()
    except Exception as exc:  # noqa: BLE001 — any failure to reach it (SubmitError included) is the finding
        return [Finding("KFP API", FAIL, f"{cluster.kfp_host}: {exc}", _KFP_FIX)]
    version = (
        getattr(health, "tag_name", None) or getattr(health, "commit_sha", None) or "version not reported"
    )
    mode = "multi-user" if health.multi_user else "standalone"
    return [Finding("KFP API", OK, f"{cluster.kfp_host} answers ({version}, {mode})")]


_KFP_FIX = (
    "check the address (--host, KFP_HOST; in a pod the ml-pipeline service of the kubeflow namespace) "
    "and the token (KFP_BEARER_TOKEN or the pod's pipelines.kubeflow.org token)"
)


def check_training_api(cfg: RunConfig, cluster: Cluster) -> list[Finding]:
    """Discovers both job kinds, so that a cluster serving the other one says which launcher to set."""
    from fulltune.launch.kubernetes import KINDS

    launcher = cfg.resources.launcher
    if launcher not in KINDS:
        return [Finding("training API", OK, f"not needed: resources.launcher is {launcher}")]
    kind, check = KINDS[launcher], f"{KINDS[launcher].kind} API"
    try:
        served = {name: _serves(cluster.api, k) for name, k in KINDS.items()}
    except _ApiError as exc:
        return [Finding(check, UNKNOWN, f"discovery answered {exc.status}")]
    detail = f"{_api_name(kind)} is{'' if served[launcher] else ' not'} served; " + "; ".join(
        f"{k.kind} is{'' if served[name] else ' not'} served ({_api_name(k)})"
        for name, k in KINDS.items()
        if name != launcher
    )
    if served[launcher]:
        return [Finding(check, OK, detail)]
    other = next((name for name in KINDS if served[name]), None)
    if other is None:
        return [Finding(check, FAIL, detail, _INSTALL[launcher])]
    fix = (
        f"this cluster serves {KINDS[other].kind} ({_PROVIDER[other]}), not {kind.kind}: "
        f"set resources.launcher: {other}"
    )
    return [Finding(check, FAIL, detail, fix)]


def _serves(api, kind) -> bool:
    """Whether discovery lists the kind's resource (404: its group version is not served)."""
    try:
        return kind.plural in _discover(api, f"/apis/{kind.group}/{kind.version}")
    except _ApiError as exc:
        if exc.status == 404:
            return False
        raise


def _api_name(kind) -> str:
    return f"{kind.plural}.{kind.group}/{kind.version}"


_PROVIDER = {"kubernetes": "Kubeflow Training Operator", "trainjob": "Kubeflow Trainer v2"}
_INSTALL = {
    "kubernetes": "install the Kubeflow Training Operator (v1.8 or later), which serves PyTorchJob; or "
    "install Kubeflow Trainer v2 and set resources.launcher: trainjob",
    "trainjob": "install Kubeflow Trainer v2 (v2.0 or later), which serves TrainJob, and the chart's "
    "runtime; or install the Kubeflow Training Operator and set resources.launcher: kubernetes",
}


def check_runtime(cfg: RunConfig, cluster: Cluster) -> list[Finding]:
    """launcher trainjob: the runtime the TrainJob names exists, and the config asks for nothing a
    TrainJob cannot carry."""
    from fulltune.launch.trainjob import unsupported

    if cfg.resources.launcher != "trainjob":
        return []
    findings = [_runtime_finding(cfg, cluster), _overrides_finding(cfg, cluster)]
    for problem in unsupported(cfg):
        detail, _, fix = problem.partition("; ")
        findings.append(Finding("TrainJob settings", FAIL, detail, fix))
    return findings


def _runtime_finding(cfg: RunConfig, cluster: Cluster) -> Finding:
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.exceptions import ApiException

    from fulltune.launch.kubernetes import read_runtime
    from fulltune.launch.trainjob import runtime_missing

    runtime = cfg.resources.trainjob
    what = f"{runtime.runtime_kind} {runtime.runtime}"
    where = "" if runtime.runtime_kind == "ClusterTrainingRuntime" else f" in {cluster.namespace}"
    try:
        read_runtime(CustomObjectsApi(cluster.api), cfg, cluster.namespace)
    except ApiException as exc:
        if exc.status == 404 and not _trainer_served(cluster):  # the API check says so, with the fix
            return Finding("TrainJob runtime", UNKNOWN, f"cannot read {what}: {_NO_TRAINER}")
        if exc.status == 404:
            missing, fix = runtime_missing(cfg, cluster.namespace)
            return Finding("TrainJob runtime", FAIL, missing, fix)
        return Finding("TrainJob runtime", UNKNOWN, f"cannot read {what}{where} ({exc.status})")
    return Finding("TrainJob runtime", OK, f"{what} exists{where}")


_NO_TRAINER = "this cluster does not serve Kubeflow Trainer v2's API (the TrainJob API check says what to do)"


def _trainer_served(cluster: Cluster) -> bool:
    """Whether discovery lists the TrainJob (True when it cannot be told): a 404 of its runtime or
    schema on a cluster without Kubeflow Trainer is that, not a runtime or field to set."""
    from fulltune.launch.trainjob import TRAINJOB

    try:
        return _serves(cluster.api, TRAINJOB)
    except _ApiError:
        return True


def _overrides_finding(cfg: RunConfig, cluster: Cluster) -> Finding:
    """The TrainJob field the cluster's Trainer takes the run's pod settings in, against the config's."""
    from kubernetes.client.exceptions import ApiException

    from fulltune.launch.trainjob import (
        OVERRIDES_FIELDS,
        configured_overrides_field,
        overrides_field_fix,
        served_overrides_field,
    )

    name, configured = "TrainJob pod settings", configured_overrides_field(cfg)
    fix = overrides_field_fix()
    try:
        served = served_overrides_field(cluster.api)
    except ApiException as exc:
        if exc.status == 404 and not _trainer_served(cluster):  # nothing to set: Trainer is missing
            return Finding(name, UNKNOWN, f"cannot read the TrainJob schema: {_NO_TRAINER}")
        if configured:
            return Finding(
                name,
                UNKNOWN,
                f"cannot read the TrainJob schema ({exc.status}); the config names {configured}",
            )
        return Finding(
            name, FAIL, f"cannot read the TrainJob schema the API server publishes ({exc.status})", fix
        )
    if served is None:
        return Finding(name, FAIL, f"the cluster's TrainJob has none of {', '.join(OVERRIDES_FIELDS)}", fix)
    served_text = f"{served} ({OVERRIDES_FIELDS[served].releases})"
    if configured and configured != served:
        detail = (
            f"resources.trainjob.overrides_field is {configured}; this cluster's TrainJob takes {served_text}"
        )
        return Finding(name, FAIL, detail, f"set resources.trainjob.overrides_field: auto (or {served})")
    return Finding(name, OK, f"the TrainJob carries them in {served_text}")


def check_access(cfg: RunConfig, cluster: Cluster) -> list[Finding]:
    from kubernetes.client.exceptions import ApiException

    from fulltune.launch.kubernetes import required_access

    access = required_access(cfg)
    if not access:
        return []
    who = _subject(cluster)
    try:
        missing = [a for a in access if not _allowed(cluster, *a)]
    except ApiException as exc:
        return [Finding("launcher RBAC", UNKNOWN, f"cannot review the access of {who} ({exc.status})")]
    if not missing:
        return [
            Finding(
                "launcher RBAC",
                OK,
                f"all {len(access)} verbs the launcher needs are allowed (checked as {who})",
            )
        ]
    names = ", ".join(
        f"{verb} {resource}" + (f".{group}" if group else "") + (f" {name}" if name else "")
        for group, resource, verb, name in missing
    )
    fix = (
        "run the pipeline as the chart's ServiceAccount (fulltune submit/schedule --service-account), or "
        "bind the chart's launcher Role to this one (rbac.extraServiceAccounts)"
    )
    return [
        Finding("launcher RBAC", FAIL, f"not allowed in {cluster.namespace}: {names} (checked as {who})", fix)
    ]


def check_nodes(cfg: RunConfig, cluster: Cluster) -> list[Finding]:
    """Whether `resources.num_nodes` nodes could each hold a training pod: schedulable, carrying the
    node_selector's labels, no NoSchedule/NoExecute taint the pods do not tolerate, and the pod's
    requests within the node's allocatable; and whether enough of them have that room now, beside
    the pods already on them. A shortfall warns rather than fails: a cluster autoscaler may add the
    nodes when the pods ask for them, and other pods end."""
    from kubernetes.client import CoreV1Api
    from kubernetes.client.exceptions import ApiException

    from fulltune.launch.kubernetes import KINDS

    res = cfg.resources
    if res.launcher not in KINDS:
        return []
    try:
        nodes = CoreV1Api(cluster.api).list_node().items
    except ApiException as exc:
        fix = "run the doctor as someone who may list nodes, or ask the platform team which nodes fit"
        return [Finding("nodes", UNKNOWN, f"cannot list nodes ({exc.status})", fix)]
    pod = TrainingPod.of(cfg, _runtime_or_none(cfg, cluster))
    unfit: dict[tuple[str, str], list[str]] = {}  # (kind, why) -> node names
    fitting = []
    for node in nodes:
        if why := why_unfit(node, cfg, pod):
            unfit.setdefault(why, []).append(node.metadata.name)
        else:
            fitting.append(node)
    requests = ", ".join(f"{key} {value}" for key, value in pod.requests.items())
    detail = f"{len(fitting)} of {len(nodes)} nodes can each hold a training pod ({requests}), {res.num_nodes} needed"
    if len(fitting) >= res.num_nodes:
        return [_room_now(cluster, fitting, pod, res.num_nodes, detail, res.gpu_memory_gib)]
    for (_, why), names in unfit.items():
        detail += f"; {_names(names)}: {why}"
    fixes = "; ".join(dict.fromkeys(NODE_FIXES[kind] for kind, _ in unfit))
    return [Finding("nodes", WARN, detail, f"{fixes} ({AUTOSCALER})" if fixes else AUTOSCALER)]


def _room_now(cluster: Cluster, fitting: list, pod, needed: int, detail: str, planned_gib: float) -> Finding:
    """The nodes finding when enough nodes fit by allocatable: whether enough of them have the room
    now, beside the pods already bound to them (pods in every namespace; without leave to list them,
    said and not counted)."""
    from kubernetes.client import CoreV1Api
    from kubernetes.client.exceptions import ApiException

    try:
        pods = CoreV1Api(cluster.api).list_pod_for_all_namespaces(field_selector=_UNFINISHED).items
    except ApiException as exc:
        return Finding(
            "nodes", OK, f"{detail} (cannot list pods ({exc.status}): what runs there not counted)"
        )
    used = requested_on_nodes(pods)
    busy = {n.metadata.name: why for n in fitting if (why := why_busy(n, pod, used.get(n.metadata.name, {})))}
    detail += f"; {len(fitting) - len(busy)} with room now"
    if len(fitting) - len(busy) >= needed:
        return Finding("nodes", OK, detail + unused_gpu_memory(fitting, planned_gib))
    by_reason: dict[str, list[str]] = {}
    for name, why in busy.items():
        by_reason.setdefault(why, []).append(name)
    detail += "".join(f"; {_names(names)}: {why}" for why, names in by_reason.items())
    fix = "the training pods wait until those pods end (or an autoscaler adds nodes); ask for fewer GPUs, or run later"
    return Finding("nodes", WARN, detail, fix)


# Pods that still hold what they requested: the scheduler frees a pod's share when it ends.
_UNFINISHED = "status.phase!=Succeeded,status.phase!=Failed"


def _names(names: list[str]) -> str:
    return f"{', '.join(names[:3])}{' and more' if len(names) > 3 else ''}"


def check_volumes(cfg: RunConfig, cluster: Cluster) -> list[Finding]:
    """Each PersistentVolumeClaim of `resources.kubernetes.volumes`: it exists, is bound, and its
    access modes let every training pod mount it. A ReadWriteOnce volume attaches to one node: with
    the training pods on several nodes all but the first stay in ContainerCreating ("Multi-Attach
    error"), which no config check sees."""
    from kubernetes.client import CoreV1Api
    from kubernetes.client.exceptions import ApiException

    from fulltune.launch.kubernetes import KINDS

    res = cfg.resources
    if res.launcher not in KINDS:
        return []
    findings = []
    for i, volume in enumerate(res.kubernetes.volumes):
        check, name = f"volume {volume.claim_name}", volume.claim_name
        try:
            claim = CoreV1Api(cluster.api).read_namespaced_persistent_volume_claim(name, cluster.namespace)
        except ApiException as exc:
            if exc.status != 404:
                findings.append(
                    Finding(check, UNKNOWN, f"cannot read PersistentVolumeClaim {name} ({exc.status})")
                )
                continue
            fix = f"create it in {cluster.namespace}, or fix resources.kubernetes.volumes[{i}].claim_name"
            findings.append(
                Finding(check, FAIL, f"no PersistentVolumeClaim {name} in {cluster.namespace}", fix)
            )
            continue
        findings.append(_volume_finding(check, claim, volume, res.num_nodes))
    return findings


_SHARED_MODES = {"ReadWriteMany", "ReadOnlyMany"}
_RWX_FIX = "use a ReadWriteMany claim (NFS, CephFS, EFS, Filestore, Azure Files), or put work_dir on s3://"


def _volume_finding(check: str, claim, volume, num_nodes: int) -> Finding:
    """What a claim that exists means for the training pods: its access modes, then its phase."""
    modes = set((claim.status.access_modes if claim.status else None) or claim.spec.access_modes or [])
    phase = (claim.status.phase if claim.status else None) or "Pending"
    shared = modes & (_SHARED_MODES if volume.read_only else {"ReadWriteMany"})
    shown = ", ".join(sorted(modes)) or "no access modes"
    if not shared and num_nodes > 1:
        why = f"{shown}: it attaches to one node, and the {num_nodes} training pods run on {num_nodes} nodes"
        return Finding(
            check, FAIL, f"{why} (the others stay in ContainerCreating: Multi-Attach error)", _RWX_FIX
        )
    if phase == "Lost":
        return Finding(
            check, FAIL, "Lost: its PersistentVolume is gone", "restore the volume or make a new claim"
        )
    if not shared:
        why = f"{shown}: every pod that mounts it must share one node (the steps given --work-pvc too)"
        return Finding(check, WARN, why, _RWX_FIX)
    if phase != "Bound":
        why = f"{phase}, not bound yet ({shown})"
        fix = "a WaitForFirstConsumer storage class binds it when the first pod starts; else no volume matches it"
        return Finding(check, WARN, why, fix)
    return Finding(check, OK, f"Bound, {shown}")


def check_pod_references(cfg: RunConfig, cluster: Cluster) -> list[Finding]:
    """What the training pods name that must exist: their ServiceAccount
    (`resources.kubernetes.service_account_name`), the Secrets of `secret_env`, which they read whole
    (not optional), and their PriorityClass. A missing one leaves the pods uncreated or in
    CreateContainerConfigError, seen only after the job was created."""
    from kubernetes.client import CoreV1Api, SchedulingV1Api

    from fulltune.launch.kubernetes import KINDS

    k8s = cfg.resources.kubernetes
    if cfg.resources.launcher not in KINDS:
        return []
    api, ns = CoreV1Api(cluster.api), cluster.namespace
    findings = []
    if name := k8s.service_account_name:
        read = lambda n: api.read_namespaced_service_account(n, ns)  # noqa: E731
        findings.append(
            _exists("ServiceAccount", name, read, "resources.kubernetes.service_account_name", ns)
        )
    for i, name in enumerate(k8s.secret_env):
        read = lambda n: api.read_namespaced_secret(n, ns)  # noqa: E731
        findings.append(_exists("Secret", name, read, f"resources.kubernetes.secret_env[{i}]", ns))
    if name := k8s.priority_class_name:
        read = SchedulingV1Api(cluster.api).read_priority_class
        findings.append(_exists("PriorityClass", name, read, "resources.kubernetes.priority_class_name"))
    return findings


def _exists(kind: str, name: str, read: Callable[[str], Any], field: str, namespace: str = "") -> Finding:
    """Whether the `kind` called `name` is there: in `namespace`, or cluster-scoped without one."""
    from kubernetes.client.exceptions import ApiException

    check, where = f"training pods' {kind} {name}", namespace or "the cluster"
    try:
        read(name)
    except ApiException as exc:
        if exc.status == 404:
            fix = f"create it in {where}, or fix {field}"
            return Finding(check, FAIL, f"not in {where}: the training pods could not start", fix)
        return Finding(check, UNKNOWN, f"cannot read {kind}s ({exc.status})")
    return Finding(check, OK, f"exists in {where}")


LAUNCHER_CHECKS: tuple[Check, ...] = (
    check_training_api,
    check_runtime,
    check_access,
    check_pod_references,
    check_volumes,
    check_nodes,
)


def check_s3(cfg: RunConfig, cluster: Cluster) -> list[Finding]:
    from fulltune.storage import is_s3

    if not is_s3(cfg.work_dir):
        return [Finding("S3", OK, f"not needed: work_dir is {cfg.work_dir or 'unset'}")]
    findings = [_secret_finding(cluster), _bucket_finding("work_dir", cfg.work_dir)]
    if is_s3(cfg.registry.uri) and _bucket_root(cfg.registry.uri) != _bucket_root(cfg.work_dir):
        findings.append(_bucket_finding("registry.uri", cfg.registry.uri))
    return findings


def _bucket_root(uri: str) -> str:
    from fulltune.storage import split_s3

    return f"s3://{split_s3(uri)[0]}"


def _secret_finding(cluster: Cluster) -> Finding:
    from kubernetes.client import CoreV1Api
    from kubernetes.client.exceptions import ApiException

    name = cluster.s3_secret
    if not name:  # workload identity (IRSA, GKE): the chart's s3.existingSecret "", compile --s3-secret ''
        return Finding(
            "S3 Secret", OK, "none named: S3 credentials come from the pods' ServiceAccount identity"
        )
    try:
        CoreV1Api(cluster.api).read_namespaced_secret(name, cluster.namespace)
        return Finding("S3 Secret", OK, f"{name} exists in {cluster.namespace}")
    except ApiException as exc:
        if exc.status == 404:
            fix = (
                f"kubectl -n {cluster.namespace} create secret generic {name} "
                "--from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=... "
                "(or use workload identity and compile with --s3-secret '')"
            )
            return Finding("S3 Secret", FAIL, f"{name} is not in {cluster.namespace}", fix)
        held = "AWS_ACCESS_KEY_ID" in os.environ
        detail = f"cannot read Secrets ({exc.status}); this pod {'has' if held else 'has no'} S3 keys"
        return Finding("S3 Secret", OK if held else UNKNOWN, detail, "")


def check_mlflow(cfg: RunConfig, cluster: Cluster) -> list[Finding]:
    """The named MLflow Secret exists and names the server: without MLFLOW_TRACKING_URI the mlflow
    client in the steps and the training pods would log to a local ./mlruns that nobody sees."""
    from kubernetes.client import CoreV1Api
    from kubernetes.client.exceptions import ApiException

    name, namespace = cluster.mlflow_secret, cluster.namespace
    if not name:
        return []
    uri = "MLFLOW_TRACKING_URI"  # the one key of kfp.cluster.MLFLOW_SECRET_KEYS it cannot do without
    create = (
        f"kubectl -n {namespace} create secret generic {name} --from-literal={uri}=https://mlflow.example.com "
        "--from-literal=MLFLOW_TRACKING_TOKEN=... (or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)"
    )
    try:
        secret = CoreV1Api(cluster.api).read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return [Finding("MLflow Secret", FAIL, f"{name} is not in {namespace}", create)]
        held = uri in os.environ
        detail = f"cannot read Secrets ({exc.status}); this pod {'has' if held else 'has no'} {uri}"
        return [Finding("MLflow Secret", OK if held else UNKNOWN, detail)]
    if uri not in (secret.data or {}):
        keys = ", ".join(sorted(secret.data or {})) or "none"
        patch = json.dumps({"stringData": {uri: "https://mlflow.example.com"}})
        fix = f"kubectl -n {namespace} patch secret {name} --type merge -p '{patch}'"
        return [Finding("MLflow Secret", FAIL, f"{name} has no {uri} key (its keys: {keys})", fix)]
    return [Finding("MLflow Secret", OK, f"{name} exists in {namespace} and names the server ({uri})")]


def _bucket_finding(field: str, uri: str) -> Finding:
    from fulltune import storage

    root = _bucket_root(uri)
    try:
        storage.require_bucket(root)  # plan's own check of the registry's bucket
    except Exception as exc:  # noqa: BLE001 — any failure to reach it is the finding
        fix = "check the Secret's keys and endpoint (AWS_ENDPOINT_URL), the bucket's name and its policy"
        # storage's errors name the bucket already; anything else gets it in front
        detail = str(exc) if isinstance(exc, storage.StorageError) else f"{root}: {exc}"
        return Finding(f"{field} bucket", FAIL, detail, fix)
    return Finding(f"{field} bucket", OK, f"{root} answers")


def check_model_registry(cfg: RunConfig, cluster: Cluster) -> list[Finding]:
    """registry.kubeflow, when set: its REST endpoint answers. register records the version there
    last, after training; an address or port that is wrong would fail only then."""
    from fulltune.registry.kubeflow import probe

    section = cfg.registry.kubeflow
    if section is None:
        return []
    status, where = probe(section)
    check = "Model Registry"
    if status is None:
        fix = (
            "check registry.kubeflow.server_address and port, and that a NetworkPolicy lets the pods reach it"
        )
        return [Finding(check, FAIL, f"cannot reach {where}", fix)]
    if status in (401, 403):
        fix = (
            "the register step sends MODEL_REGISTRY_TOKEN from the fulltune-model-registry Secret, else its "
            "pod's service-account token: check that identity may write there"
        )
        return [Finding(check, WARN, f"{where} answers HTTP {status} to this identity", fix)]
    if not 200 <= status < 300:
        fix = "registry.kubeflow.server_address and port must name the Model Registry's REST service"
        return [Finding(check, FAIL, f"{where} answers HTTP {status}: not a Model Registry REST API", fix)]
    return [Finding(check, OK, f"{where} answers")]


def check_istio(cfg: RunConfig, cluster: Cluster) -> list[Finding]:
    from kubernetes.client import CoreV1Api
    from kubernetes.client.exceptions import ApiException

    try:
        labels = CoreV1Api(cluster.api).read_namespace(cluster.namespace).metadata.labels or {}
    except ApiException as exc:
        return [Finding("Istio", UNKNOWN, f"cannot read namespace {cluster.namespace} ({exc.status})")]
    injected = labels.get("istio-injection") == "enabled" or "istio.io/rev" in labels
    if not injected:
        return [Finding("Istio", OK, f"no sidecar injection in {cluster.namespace}")]
    on = f"injection on in {cluster.namespace}"
    sidecar, why = _training_pods_sidecar(cfg, cluster)
    if sidecar is None:
        return [Finding("Istio", WARN, f"{on}; {why}", "check that its pod template opts out")]
    if sidecar:
        return [Finding("Istio", WARN, f"{on}; training pods keep sidecars{why}", _sidecar_fix(cfg, why))]
    fix = (
        "nothing for the training pods (they opt out); pods you add to the runs (e.g. via PodDefaults) "
        "need sidecar.istio.io/inject: 'false' too"
    )
    return [Finding("Istio", WARN, f"{on}; training pods opt out", fix)]


def _training_pods_sidecar(cfg: RunConfig, cluster: Cluster) -> tuple[bool | None, str]:
    """(whether the training pods get an Istio sidecar, why): a PyTorchJob's pods as the config says
    (`resources.kubernetes.istio_sidecar`); a TrainJob's as its runtime's pod template says, which
    the TrainJob cannot change (None when the runtime cannot be read)."""
    from fulltune.launch.pytorchjob import ISTIO_INJECT
    from fulltune.launch.scheduling import trainer_pod_template

    if cfg.resources.launcher != "trainjob":
        return cfg.resources.kubernetes.istio_sidecar, ""
    runtime = cfg.resources.trainjob
    what = f"{runtime.runtime_kind} {runtime.runtime}"
    obj = _runtime_or_none(cfg, cluster)
    if obj is None:
        return None, f"the training pods' injection is set by {what}, which cannot be read here"
    meta = trainer_pod_template(obj).get("metadata") or {}
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    # Istio reads the label first, then the annotation
    if labels.get(ISTIO_INJECT, annotations.get(ISTIO_INJECT)) == "false":
        return False, ""
    if "proxy.istio.io/config" in annotations:  # the chart's runtime with trainJob.runtime.istioSidecar
        return True, ""
    return True, f" ({what}'s pod template does not opt out)"


def _sidecar_fix(cfg: RunConfig, why: str) -> str:
    """How to run the training pods with sidecars, or without them, for the config's launcher."""
    mesh = (
        "sidecars in training pods need Istio's native sidecars (ENABLE_NATIVE_SIDECARS) and the chart's "
        "networkPolicy.mesh.enabled; or "
    )
    if cfg.resources.launcher != "trainjob":
        return mesh + "set resources.kubernetes.istio_sidecar: false"
    if why:  # another runtime than the chart's, which neither opts out nor lets the rendezvous bypass
        return (
            "a sidecar keeps a finished pod running and breaks torchrun's rendezvous: use the chart's "
            "runtime (trainJob.runtime.create: true), or give this runtime's pod template the label "
            'sidecar.istio.io/inject: "false"'
        )
    return mesh + "set trainJob.runtime.istioSidecar: false"


def check_quota(cfg: RunConfig, cluster: Cluster) -> list[Finding]:
    from kubernetes.client import CoreV1Api
    from kubernetes.client.exceptions import ApiException

    try:
        quotas = CoreV1Api(cluster.api).list_namespaced_resource_quota(cluster.namespace).items
    except ApiException as exc:
        return [Finding("quota", UNKNOWN, f"cannot list ResourceQuotas ({exc.status})")]
    need = training_pod_needs(cfg)
    short = []
    for quota in quotas:
        hard, used = quota.status.hard or {}, quota.status.used or {}
        for need_key, amount in need.items():
            for key in (need_key, *_QUOTA_ALIASES.get(need_key, ())):
                if key in hard and parse_quantity(hard[key]) - parse_quantity(used.get(key, "0")) < amount:
                    short.append(
                        f"{quota.metadata.name}: {key} needs {format_quantity(key, amount)}, {hard[key]} hard, {used.get(key, '0')} used"
                    )
    if short:
        fix = "ask the platform team to raise the profile's quota, or ask for fewer nodes/GPUs per node"
        return [Finding("quota", FAIL, "; ".join(short), fix)]
    return [
        Finding("quota", OK, f"room for the training pods ({_needs_text(need)}) in {len(quotas)} quota(s)")
    ]


# The other names a ResourceQuota may give the same amount: `cpu`, `memory` and `ephemeral-storage`
# are requests (the form Kubeflow's Profile examples use), `count/pods` is `pods`.
_QUOTA_ALIASES = {
    "requests.cpu": ("cpu",),
    "requests.memory": ("memory",),
    "requests.ephemeral-storage": ("ephemeral-storage",),
    "pods": ("count/pods",),
}


def _runtime_or_none(cfg: RunConfig, cluster: Cluster) -> dict[str, Any] | None:
    """A TrainJob's runtime, whose pod template the training pods start from; None for a PyTorchJob
    or when it cannot be read (the runtime check says why)."""
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.exceptions import ApiException

    from fulltune.launch.kubernetes import read_runtime

    if cfg.resources.launcher != "trainjob":
        return None
    try:
        return read_runtime(CustomObjectsApi(cluster.api), cfg, cluster.namespace)
    except ApiException:
        return None


def training_pod_needs(cfg: RunConfig) -> dict[str, float]:
    """What the training pods request together, in quota keys (the manifest's own numbers: a
    PyTorchJob's replicas and a TrainJob's resourcesPerNode are the same `pod_resources`)."""
    from fulltune.launch.kubernetes import KINDS

    res = cfg.resources
    if res.launcher not in KINDS:
        return {}
    need: dict[str, float] = {"pods": float(res.num_nodes)}
    for key, value in TrainingPod.of(cfg).requests.items():
        need[f"requests.{key}"] = total = res.num_nodes * parse_quantity(value)
        if key in ("cpu", "memory"):
            need[f"limits.{key}"] = total
    return need


def _needs_text(need: dict[str, float]) -> str:
    return ", ".join(f"{k} {format_quantity(k, v)}" for k, v in need.items()) or "none"


# -- the Kubernetes API ----------------------------------------------------------------------------


class _ApiError(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def _discover(api, path: str) -> set[str]:
    """The resource names an API group version serves (discovery, allowed for any authenticated user)."""
    from kubernetes.client.exceptions import ApiException

    try:
        body = api.call_api(
            path, "GET", response_type="object", auth_settings=["BearerToken"], _return_http_data_only=True
        )
    except ApiException as exc:
        raise _ApiError(exc.status) from None
    return {r["name"] for r in body.get("resources", [])}


# Resources of the launcher's access that are cluster-scoped: reviewed without a namespace, as the
# API server authorizes them (only a ClusterRole bound cluster-wide grants them).
_CLUSTER_SCOPED = {"clustertrainingruntimes"}


def _subject(cluster: Cluster) -> str:
    sa = cluster.service_account
    return f"system:serviceaccount:{cluster.namespace}:{sa}" if sa else "the caller"


def _allowed(cluster: Cluster, group: str, resource: str, verb: str, name: str = "") -> bool:
    """SelfSubjectAccessReview, or SubjectAccessReview for `cluster.service_account` (which the caller
    needs `create subjectaccessreviews` for: ApiException 403 otherwise); `name` for access that RBAC
    grants on named objects only."""
    from kubernetes import client

    main, _, sub = resource.partition("/")
    namespace = None if main in _CLUSTER_SCOPED else cluster.namespace
    attrs = client.V1ResourceAttributes(
        namespace=namespace, group=group, resource=main, verb=verb, subresource=sub or None, name=name or None
    )
    api = client.AuthorizationV1Api(cluster.api)
    if not cluster.service_account:
        review = client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(resource_attributes=attrs)
        )
        return bool(api.create_self_subject_access_review(review).status.allowed)
    user = f"system:serviceaccount:{cluster.namespace}:{cluster.service_account}"
    groups = ["system:serviceaccounts", f"system:serviceaccounts:{cluster.namespace}", "system:authenticated"]
    spec = client.V1SubjectAccessReviewSpec(user=user, groups=groups, resource_attributes=attrs)
    return bool(api.create_subject_access_review(client.V1SubjectAccessReview(spec=spec)).status.allowed)


# -- the command -----------------------------------------------------------------------------------


def cli_doctor(args) -> int:
    """`fulltune doctor`: 0 when nothing failed, 1 when a check failed, 2 for a bad config file."""
    import sys

    from fulltune.config import ConfigError
    from fulltune.kfp.submit import SubmitError, resolve_host, resolve_namespace
    from fulltune.launch.kubernetes import load_configuration

    try:
        cfg = RunConfig.from_yaml(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    namespace = resolve_namespace(args.namespace)[0] or cfg.resources.kubernetes.namespace or "default"
    try:
        host = resolve_host(args.host)
    except SubmitError:
        host = None
    from kubernetes import client

    cluster = Cluster(
        client.ApiClient(load_configuration()),
        namespace,
        host,
        args.s3_secret,
        args.mlflow_secret,
        args.service_account or "",
    )
    findings = run_checks(cfg, cluster)
    print(f"fulltune doctor: {args.config} in namespace {namespace}")
    for finding in findings:
        print(finding.line())
    failed = [f for f in findings if f.status == FAIL]
    print(f"{len(failed)} failed, {sum(f.status == WARN for f in findings)} warnings")
    return 1 if failed else 0


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="the run configuration to check for")
    p.add_argument("--namespace", default=None, help="default: KFP_NAMESPACE, this pod's, the kube context's")
    p.add_argument("--host", default=None, help="KFP API address (default: KFP_HOST; in a pod: in-cluster)")
    p.add_argument(
        "--s3-secret",
        type=secret_name_argument,
        default=S3_SECRET,
        metavar="NAME",
        help=f"the S3 Secret (default: {S3_SECRET}; '' for none: workload identity, not checked)",
    )
    p.add_argument(
        "--mlflow-secret",
        type=secret_name_argument,
        default="",
        metavar="NAME",
        help="the MLflow Secret, checked for MLFLOW_TRACKING_URI (default: none, not checked)",
    )
    p.add_argument(
        "--service-account",
        default=None,
        metavar="NAME",
        help="check the launcher RBAC of this ServiceAccount of the namespace (needs create "
        "subjectaccessreviews) instead of the caller's (default: the caller, as under helm test)",
    )
