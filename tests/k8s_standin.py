"""A small stateful stand-in for the Kubernetes API, over real HTTP on 127.0.0.1.

It serves exactly what the Kubernetes launcher uses, the way the API server does it:

* PyTorchJobs (kubeflow.org/v1) and TrainJobs (trainer.kubeflow.org/v1alpha1): create (201, or 409
  AlreadyExists), get, delete, list, and watch with a field selector: JSON lines in a chunked
  response, from a resourceVersion, ended after `timeoutSeconds`; a resourceVersion older than the
  compacted history answers an ERROR event with code 410 (Expired), as the API server does.
* A job kind or Trainer resource whose group/version is not in `api_resources` (its operator not
  installed) answers 404 with no object named, as the API server does for a type it does not serve.
* Trainer v2 runtimes: get a ClusterTrainingRuntime (cluster-scoped) or a TrainingRuntime; with a
  TrainJob schema installed (`trainjob_schema`), its OpenAPI v3 document, and a TrainJob created with
  fieldValidation=Strict refused (400) for each field that schema does not declare.
* Pods: list by label selector; a pod's log with `follow`, `timestamps` (RFC 3339 nano, trailing
  zeros trimmed like Go's), `sinceSeconds`, `tailLines`.
* Events: list by `involvedObject.name`. Argo Workflows: get.

Every request is recorded (method, path, query, JSON body). The operator is played by a script: a
function `script(kube, namespace, name)` run in a thread after each create, calling the helpers
below (`set_condition`, `start_master`, `log`, `end_log`, `add_event`, `drop_streams`, `compact`).
For a PyTorchJob it plays the Training Operator (v1.8, v1.9) as its source reads: only the
operator's condition types, each with its one reason (`PYTORCHJOB_CONDITIONS`), Running and
Restarting replacing each other, nothing changed once Failed; the operator's pod labels;
`replica_exits` applies `restartPolicy: ExitCode` and the job's cleanPodPolicy, and
`limit_reached` fails the job for its deadline or backoff limit, deleting every pod.
For a TrainJob the Trainer and JobSet controllers are played the same way (`start_node`), and
`node_exits` applies the failure policy of the runtime the TrainJob names, as Kubernetes and JobSet
do: the Job's podFailurePolicy on the container's exit code, then the JobSet's failurePolicy rules
and maxRestarts, restarting the group (new pods) or failing the TrainJob.
"""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema

from standin_http import LoopbackServer, send_bytes, send_json
from support.crd_schema import strict

JOBS = "/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs"
# The only condition types Kubeflow Trainer v2.0 and later give a TrainJob (trainjob_types.go); its
# pre-release "Created" was removed before v2.0.0 (kubeflow/trainer#2621): no condition says the
# pods have started.
TRAINJOB_CONDITIONS = ("Suspended", "Complete", "Failed")
# The only condition types the Training Operator (v1.8, v1.9) gives a PyTorchJob (JobConditionType),
# each always with the reason "PyTorchJob<type>" (util.NewReason): a deadline, a backoff limit and a
# permanent exit code all read PyTorchJobFailed, told apart only by the message.
PYTORCHJOB_CONDITIONS = ("Created", "Running", "Restarting", "Succeeded", "Failed", "Suspended")
# The job kinds served: (group, version, plural) -> the label that names a pod's job.
JOB_KINDS = {
    ("kubeflow.org", "v1", "pytorchjobs"): "training.kubeflow.org/job-name",
    ("trainer.kubeflow.org", "v1alpha1", "trainjobs"): "jobset.sigs.k8s.io/jobset-name",
}
TRAINER = "trainer.kubeflow.org"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339nano(ts_ns: int) -> str:
    seconds, nanos = divmod(ts_ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    frac = f"{nanos:09d}".rstrip("0")
    return f"{base}.{frac}Z" if frac else f"{base}Z"


def _strict_decoding_error(kube: FakeKube, body: dict, what: str, query: dict) -> str:
    """The API server's answer to a TrainJob created with fieldValidation=Strict whose fields its
    schema does not declare ("" when none, or when no schema is installed)."""
    if not (
        what.startswith("trainjobs.") and kube.trainjob_schema and query.get("fieldValidation") == "Strict"
    ):
        return ""
    unknown = []
    for error in jsonschema.Draft7Validator(strict(kube.trainjob_schema)).iter_errors(body):
        if error.validator == "additionalProperties":
            where = ".".join(map(str, error.absolute_path))
            extra = set(error.instance) - set(error.schema.get("properties", {}))
            unknown += [f'unknown field "{where}.{field}"' for field in sorted(extra)]
    if not unknown:
        return ""
    return f'TrainJob in version "v1alpha1" cannot be handled as a TrainJob: strict decoding error: {", ".join(unknown)}'


def _status(code: int, reason: str, message: str, details: dict | None = None) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details or {},
        "code": code,
    }


# The API server's 404 for a resource type it does not serve (its group not installed): unlike a
# missing object's, its details name nothing.
UNSERVED = "the server could not find the requested resource"


def _grants(allowed: set, attrs: dict, resource: str) -> bool:
    """Whether `allowed` grants the reviewed access: a (group, resource, verb) entry on any object, a
    (group, resource, verb, name) entry on that object only, as an RBAC rule with resourceNames (a
    review that names no object is refused by it)."""
    key = (attrs.get("group") or "", resource, attrs["verb"])
    return key in allowed or (bool(attrs.get("name")) and (*key, attrs["name"]) in allowed)


def _job_failure_reason(job_spec: dict, pod_template: dict, code: int) -> str:
    """Why a Job fails when its container exits `code` (Kubernetes' Job controller): a podFailurePolicy
    rule with action FailJob matching the code gives "PodFailurePolicy"; otherwise the failure counts
    against backoffLimit, and the stand-in's Jobs have none left: "BackoffLimitExceeded"."""
    containers = {c["name"] for c in pod_template["spec"]["containers"]}
    for rule in (job_spec.get("podFailurePolicy") or {}).get("rules", []):
        on = rule.get("onExitCodes")
        if not on or (on.get("containerName") and on["containerName"] not in containers):
            continue
        hit = code in on["values"] if on["operator"] == "In" else code not in on["values"]
        if hit:
            return "PodFailurePolicy" if rule["action"] == "FailJob" else "BackoffLimitExceeded"
    return "BackoffLimitExceeded"


def _jobset_action(policy: dict, reason: str) -> str:
    """The JobSet failurePolicy's action for a Job that failed with `reason`: the first rule whose
    onJobFailureReasons holds it (an empty list matches any), else RestartJobSet."""
    for rule in policy.get("rules") or []:
        reasons = rule.get("onJobFailureReasons") or []
        if not reasons or reason in reasons:
            return rule["action"]
    return "RestartJobSet"


def _selected(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


def _field_selected(obj: dict, selector: str) -> bool:
    """The API server's field selectors: comma-separated `path=value` / `path!=value` terms, each
    path dotted (`status.phase`, `spec.nodeName`); an absent field reads as ""."""
    for term in filter(None, selector.split(",")):
        negated = "!=" in term
        path, _, value = term.partition("!=" if negated else "=")
        found: Any = obj
        for part in path.split("."):
            found = found.get(part, "") if isinstance(found, dict) else ""
        if (str(found) == value.lstrip("=")) == negated:
            return False
    return True


JOB_NAME = "training.kubeflow.org/job-name"


def _replica_labels(job: str, replica_type: str, index: int) -> dict[str, str]:
    """The labels the operator (v1.8, v1.9) puts on a replica's pod: the replica type in lower case
    ("master", "worker"), and job-role=master on the master only."""
    labels = {
        "training.kubeflow.org/operator-name": "pytorchjob-controller",
        JOB_NAME: job,
        "training.kubeflow.org/replica-type": replica_type,
        "training.kubeflow.org/replica-index": str(index),
    }
    if replica_type == "master":
        labels["training.kubeflow.org/job-role"] = "master"
    return labels


def _check_pytorchjob_condition(kind: str, reason: str) -> None:
    """ValueError for a PyTorchJob condition the Training Operator never sets."""
    if kind not in PYTORCHJOB_CONDITIONS:
        raise ValueError(f"the Training Operator never sets a PyTorchJob condition {kind!r}")
    if reason and reason != f"PyTorchJob{kind}":
        raise ValueError(
            f"the Training Operator's reason for a PyTorchJob {kind} condition is PyTorchJob{kind}, never {reason!r}"
        )


# The operator's filterOutCondition: Running and Restarting replace each other (the one set removes
# the other), and a finished job's Running condition stays, False.
_REPLACED = {"Running": ("Running", "Restarting"), "Restarting": ("Restarting", "Running")}


def _without_running(cond: dict, kind: str) -> dict:
    if kind in ("Succeeded", "Failed", "Complete") and cond["type"] == "Running":
        return {**cond, "status": "False"}
    return cond


class FakeKube:
    def __init__(self, script: Callable[[FakeKube, str, str], None] | None = None):
        self.cond = threading.Condition()
        self.rv = 100
        self.min_rv = 0  # watches from an older resourceVersion get 410 Gone
        self.history: list[tuple[int, str, dict]] = []  # (rv, event type, job) for watches
        self.jobs: dict[tuple[str, str], dict] = {}
        self.pods: dict[tuple[str, str], dict] = {}
        self.logs: dict[tuple[str, str], dict] = {}  # pod uid -> {"lines": [(ts, text)], "closed": bool}
        self.events: list[dict] = []
        self.workflows: dict[tuple[str, str], dict] = {}
        self.runtimes: dict[tuple[str, str], dict] = {}  # ("", name): ClusterTrainingRuntime, (ns, name)
        self.restarts: dict[tuple[str, str], int] = {}  # JobSet restarts of a TrainJob so far
        self.requests: list[Request] = []
        self.script = script
        self.generation = 0  # bumped by drop_streams(): open watches and log follows end
        self.script_errors: list[BaseException] = []
        self.watch_error: int | None = None  # answer watches with this HTTP status (e.g. 403)
        self.create_error: int | None = None  # answer creates with this HTTP status
        # How long a deleted pod takes to terminate: a job deleted with propagationPolicy Foreground
        # stays that long, with a deletionTimestamp, as the garbage collector deletes its pods first.
        self.pod_grace_seconds = 0.0
        # What `fulltune doctor` inspects: served API groups/versions and their resources (discovery),
        # what the caller may do (SelfSubjectAccessReview: (group, resource, verb); None allows all),
        # Secrets, namespaces (their labels) and ResourceQuotas.
        self.api_resources: dict[str, list[str]] = {"kubeflow.org/v1": ["pytorchjobs", "pytorchjobs/status"]}
        self.allowed: set[tuple[str, str, str]] | None = None
        self.secrets: dict[tuple[str, str], dict] = {}
        self.namespaces: dict[str, dict] = {}
        self.quotas: dict[str, list[dict]] = {}
        self.nodes: list[dict] = []  # Node objects: metadata (name, labels), spec (taints), status
        self.claims: dict[tuple[str, str], dict] = {}  # PersistentVolumeClaims by (namespace, name)
        self.service_accounts: dict[tuple[str, str], dict] = {}  # by (namespace, name)
        self.priority_classes: dict[tuple[str, str], dict] = {}  # cluster-scoped: ("", name)
        # The installed Trainer's TrainJob schema (support.crd_schema.crd_schema of its CRD): published
        # at /openapi/v3/apis/trainer.kubeflow.org/v1alpha1, and a TrainJob created with
        # fieldValidation=Strict is checked against it. None: no schema published, none checked.
        self.trainjob_schema: dict | None = None
        self.forbidden: set[str] = set()  # resource kinds whose reads answer 403 ("secrets", "namespaces")
        # SubjectAccessReview: what each user may do (the user's set of (group, resource, verb)); a
        # "subjectaccessreviews" in `forbidden` refuses the review itself (403).
        self.allowed_for: dict[str, set[tuple[str, str, str]]] = {}
        self._http = LoopbackServer(_handler(self), poll_interval=0.05)

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._http.url

    def __enter__(self) -> FakeKube:
        self._http.start()
        return self

    def __exit__(self, *exc) -> None:
        with self.cond:
            self.generation += 1
            self.cond.notify_all()
        self._http.stop()

    # -- what tests look at ---------------------------------------------------------------------

    def calls(self, method: str, suffix: str = "", **query: str) -> list[Request]:
        with self.cond:
            return [
                r
                for r in self.requests
                if r.method == method
                and r.path.endswith(suffix)
                and all(r.query.get(k) == v for k, v in query.items())
            ]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError("stand-in: condition not reached in time")

    # -- the operator's side --------------------------------------------------------------------

    def put_job(self, manifest: dict) -> dict:
        """Store a job as if created earlier (for adoption tests)."""
        with self.cond:
            return self._create(manifest)

    def set_condition(self, ns: str, name: str, kind: str, reason: str = "", message: str = "") -> None:
        with self.cond:
            job = self.jobs[(ns, name)]
            job_kind = job.get("kind", "PyTorchJob")
            if job_kind == "TrainJob" and kind not in TRAINJOB_CONDITIONS:
                raise ValueError(f"Kubeflow Trainer v2.0+ never sets a TrainJob condition {kind!r}")
            if job_kind == "PyTorchJob":
                _check_pytorchjob_condition(kind, reason)
            conds = job.setdefault("status", {}).setdefault("conditions", [])
            if job_kind == "PyTorchJob":  # set by the operator's first status update, with Created
                job["status"].setdefault("startTime", _now())
            if job_kind == "PyTorchJob" and any(
                c["type"] == "Failed" and c["status"] == "True" for c in conds
            ):
                return  # the operator's setCondition changes nothing once a job has failed
            stamp = _now()
            conds[:] = [
                _without_running(c, kind) for c in conds if c["type"] not in _REPLACED.get(kind, (kind,))
            ]
            conds.append(
                {
                    "type": kind,
                    "status": "True",
                    "reason": reason or f"{job_kind}{kind}",
                    "message": message or f"{job_kind} {name} is {kind.lower()}.",
                    "lastUpdateTime": stamp,
                    "lastTransitionTime": f"{stamp}#{self.rv}",  # distinct per transition
                }
            )
            self._record("MODIFIED", job)

    def start_master(self, ns: str, name: str, phase: str = "Running") -> str:
        """(Re)create the master pod with a new uid, labelled as the operator labels it; returns its name."""
        return self._start_pod(ns, f"{name}-master-0", _replica_labels(name, "master", 0), phase)

    def start_worker(self, ns: str, name: str, index: int = 0, phase: str = "Running") -> str:
        """(Re)create Worker pod `index` with a new uid, labelled as the operator labels it."""
        return self._start_pod(ns, f"{name}-worker-{index}", _replica_labels(name, "worker", index), phase)

    def replica_exits(self, ns: str, name: str, code: int, replica: str = "master", index: int = 0) -> str:
        """Replica pod `<name>-<replica>-<index>`'s container exits `code`; the outcome the operator's
        `restartPolicy: ExitCode` gives (common/pod.go ReconcilePods, v1.8+): "succeeded" (exit 0),
        "restarted" (128-255: the pod deleted and created again, the job Restarting, then Running
        again) or "failed" (1-127 at once; 128-255 too under `backoffLimit: 0`)."""
        pod = f"{name}-{replica}-{index}"
        self.set_pod_phase(ns, pod, "Succeeded" if code == 0 else "Failed", exit_code=code)
        self.end_log(ns, pod)
        self.add_event(
            ns, "PyTorchJob", name, "Normal", "ExitedWithCode", f"Pod: {ns}.{pod} exited with code {code}"
        )
        rtype = replica.capitalize()
        if code == 0:
            if replica == "master":
                self.set_condition(
                    ns, name, "Succeeded", message=f"PyTorchJob {name} is successfully completed."
                )
                self._clean_up(ns, name)
            return "succeeded"
        if code < 128:
            message = f'job "{name}" is failing because "{rtype}" replica(s) failed.'
            self.add_event(ns, "PyTorchJob", name, "Warning", "PyTorchJobFailed", message)
            self.set_condition(ns, name, "Failed", message=message)
            self._clean_up(ns, name)
            return "failed"
        if (self.jobs[(ns, name)]["spec"].get("runPolicy") or {}).get("backoffLimit") == 0:
            self.limit_reached(ns, name, "it has reached the specified backoff limit")
            return "failed"
        message = f"job {name} is restarting because {rtype} replica(s) failed."
        self.add_event(ns, "PyTorchJob", name, "Warning", "PyTorchJobRestarting", message)
        self.set_condition(ns, name, "Restarting", message=message)
        self._start_pod(ns, pod, _replica_labels(name, replica, index), "Running")
        self.set_condition(ns, name, "Running", message=f"PyTorchJob {name} is running.")
        return "restarted"

    def limit_reached(
        self, ns: str, name: str, why: str = "it was active longer than specified deadline"
    ) -> None:
        """The operator fails the job for its runPolicy (activeDeadlineSeconds by default; `why` "it has
        reached the specified backoff limit" for backoffLimit): it deletes every pod first, whatever
        cleanPodPolicy says, then sets Failed (common/job.go ReconcileJobs)."""
        with self.cond:
            for key in [k for k, p in self.pods.items() if p["metadata"]["labels"].get(JOB_NAME) == name]:
                self._remove_pod(key)
        message = f"Job {name} has failed because {why}"
        self.add_event(ns, "PyTorchJob", name, "Normal", "PyTorchJobFailed", message)
        self.set_condition(ns, name, "Failed", message=message)

    def _clean_up(self, ns: str, name: str) -> None:
        """What the operator deletes of a finished job's pods: runPolicy.cleanPodPolicy (default None)."""
        policy = (self.jobs[(ns, name)]["spec"].get("runPolicy") or {}).get("cleanPodPolicy") or "None"
        with self.cond:
            for key, pod in list(self.pods.items()):
                ours = key[0] == ns and pod["metadata"]["labels"].get(JOB_NAME) == name
                live = pod["status"]["phase"] in ("Running", "Pending")
                if ours and (policy == "All" or (policy == "Running" and live)):
                    self._remove_pod(key)

    def _remove_pod(self, key: tuple[str, str]) -> None:
        self.logs[self.pods.pop(key)["metadata"]["uid"]]["closed"] = True
        self.cond.notify_all()

    def _start_pod(self, ns: str, pod: str, labels: dict[str, str], phase: str) -> str:
        """(Re)create pod `pod` with a new uid and an empty log; the old one's log ends."""
        with self.cond:
            old = self.pods.get((ns, pod))
            if old:
                self.logs[old["metadata"]["uid"]]["closed"] = True
            uid = str(uuid.uuid4())
            self.pods[(ns, pod)] = {
                "metadata": {
                    "name": pod,
                    "namespace": ns,
                    "uid": uid,
                    "creationTimestamp": _now(),
                    "labels": labels,
                },
                "status": {"phase": phase},
            }
            self.logs[uid] = {"lines": [], "closed": False}
            self.cond.notify_all()
        return pod

    def put_runtime(self, runtime: dict) -> None:
        """Install a ClusterTrainingRuntime or (with metadata.namespace) a TrainingRuntime."""
        with self.cond:
            meta = runtime["metadata"]
            key = (meta.get("namespace", "") if runtime["kind"] == "TrainingRuntime" else "", meta["name"])
            self.runtimes[key] = copy.deepcopy(runtime)

    def start_node(self, ns: str, name: str, index: int = 0, phase: str = "Running") -> str:
        """(Re)create a TrainJob's node pod `index` with a new uid, labelled as JobSet labels it;
        returns its name."""
        labels = {
            "jobset.sigs.k8s.io/jobset-name": name,
            "jobset.sigs.k8s.io/replicatedjob-name": "node",
            "jobset.sigs.k8s.io/job-index": "0",
            "batch.kubernetes.io/job-completion-index": str(index),
            "jobset.sigs.k8s.io/restart-attempt": str(self.restarts.get((ns, name), 0)),
        }
        return self._start_pod(ns, f"{name}-node-0-{index}", labels, phase)

    def node_exits(self, ns: str, name: str, code: int, index: int = 0) -> str:
        """Node `index`'s container exits with `code`: the outcome its runtime's failure policy gives,
        "restarted" (the group's pods recreated), "failed" (the TrainJob Failed) or "succeeded"."""
        pod = f"{name}-node-0-{index}"
        self.set_pod_phase(ns, pod, "Succeeded" if code == 0 else "Failed", exit_code=code)
        self.end_log(ns, pod)
        if code == 0:
            self.set_condition(ns, name, "Complete", "JobSetCompleted", "jobset completed successfully")
            return "succeeded"
        template = self._runtime_of(ns, name)["spec"]["template"]["spec"]
        (replicated,) = template["replicatedJobs"]
        reason = _job_failure_reason(
            replicated["template"]["spec"], replicated["template"]["spec"]["template"], code
        )
        policy = template.get("failurePolicy") or {}
        action = _jobset_action(policy, reason)
        restarts = self.restarts.get((ns, name), 0)
        self.add_event(ns, "Pod", pod, "Warning", "Failed", f"container node exited with code {code}")
        if action != "FailJobSet" and (
            action == "RestartJobSetAndIgnoreMaxRestarts" or restarts < policy.get("maxRestarts", 0)
        ):
            with self.cond:
                self.restarts[(ns, name)] = restarts + 1
            self.add_event(
                ns,
                "JobSet",
                name,
                "Warning",
                "Restarting",
                f"restarting jobset ({reason}), attempt {restarts + 1}",
            )
            self.start_node(ns, name, index)
            return "restarted"
        why = "FailJobSet rule matched" if action == "FailJobSet" else f"reached max restarts ({restarts})"
        self.add_event(ns, "JobSet", name, "Warning", "FailedJobs", f"jobset failed: {reason}: {why}")
        self.set_condition(ns, name, "Failed", "FailedJobs", f"jobset failed: {reason}: {why}")
        return "failed"

    def _runtime_of(self, ns: str, name: str) -> dict:
        ref = self.jobs[(ns, name)]["spec"]["runtimeRef"]
        key = (
            "" if ref.get("kind", "ClusterTrainingRuntime") == "ClusterTrainingRuntime" else ns,
            ref["name"],
        )
        return self.runtimes[key]

    def set_pod_phase(self, ns: str, pod: str, phase: str, exit_code: int | None = None) -> None:
        """The pod's phase; with `exit_code`, its training container terminated with that code."""
        with self.cond:
            status = self.pods[(ns, pod)]["status"]
            status["phase"] = phase
            if exit_code is not None:
                container = (
                    "node"
                    if "jobset.sigs.k8s.io/jobset-name" in self.pods[(ns, pod)]["metadata"]["labels"]
                    else "pytorch"
                )
                terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error"}
                status["containerStatuses"] = [
                    {
                        "name": container,
                        "state": {"terminated": terminated},
                        "ready": False,
                        "restartCount": 0,
                        "image": "img:0",
                        "imageID": "img@sha256:" + "0" * 64,
                    }
                ]

    def log(self, ns: str, pod: str, *lines: str) -> None:
        with self.cond:
            uid = self.pods[(ns, pod)]["metadata"]["uid"]
            for text in lines:
                self.logs[uid]["lines"].append((time.time_ns(), text))
            self.cond.notify_all()

    def end_log(self, ns: str, pod: str) -> None:
        """The container exited: follows of its log end."""
        with self.cond:
            self.logs[self.pods[(ns, pod)]["metadata"]["uid"]]["closed"] = True
            self.cond.notify_all()

    def add_event(self, ns: str, kind: str, name: str, type_: str, reason: str, message: str) -> None:
        with self.cond:
            self.events.append(
                {
                    "metadata": {"name": f"{name}.{uuid.uuid4().hex[:8]}", "namespace": ns},
                    "involvedObject": {"kind": kind, "name": name, "namespace": ns},
                    "type": type_,
                    "reason": reason,
                    "message": message,
                    "lastTimestamp": _now(),
                }
            )

    def drop_streams(self) -> None:
        """End every open watch and log stream, as a restarting API server or a proxy would."""
        with self.cond:
            self.generation += 1
            self.cond.notify_all()

    def compact(self) -> None:
        """Forget the watch history: watches from any earlier resourceVersion now get 410 Gone."""
        with self.cond:
            self.rv += 1
            self.min_rv = self.rv

    # -- internals ------------------------------------------------------------------------------

    def _pods_of(self, ns: str, name: str) -> list[tuple[str, str]]:
        return [
            key
            for key, pod in self.pods.items()
            if key[0] == ns and name in (pod["metadata"]["labels"].get(label) for label in JOB_KINDS.values())
        ]

    def _gone(self, ns: str, name: str) -> None:
        """The job's pods, then the job itself, deleted."""
        with self.cond:
            for key in self._pods_of(ns, name):
                self._remove_pod(key)
            job = self.jobs.pop((ns, name), None)
            if job is not None:
                self._record("DELETED", job)

    def _record(self, kind: str, job: dict) -> None:
        self.rv += 1
        job["metadata"]["resourceVersion"] = str(self.rv)
        self.history.append((self.rv, kind, copy.deepcopy(job)))
        self.cond.notify_all()

    def _create(self, manifest: dict) -> dict:
        ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        job = copy.deepcopy(manifest)
        job["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=_now())
        job.setdefault("status", {})
        self.jobs[(ns, name)] = job
        self._record("ADDED", job)
        return job

    def _run_script(self, ns: str, name: str) -> None:
        try:
            self.script(self, ns, name)
        except BaseException as exc:  # noqa: BLE001 — surfaced by the tests
            self.script_errors.append(exc)


def _handler(kube: FakeKube):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        # -- plumbing ---------------------------------------------------------------------------

        def _send(self, code: int, obj: Any) -> None:
            send_json(self, code, obj)

        def _start_chunked(self, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def _end_chunked(self) -> None:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def _parse(self) -> tuple[list[str], dict[str, str], Any]:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            body = None
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                raw = self.rfile.read(length)
                body = json.loads(raw) if raw else None
            with kube.cond:
                kube.requests.append(Request(self.command, url.path, query, body))
            return url.path.strip("/").split("/"), query, body

        def _route(self) -> None:
            parts, query, body = self._parse()
            try:
                if (
                    parts[:1] == ["apis"]
                    and len(parts) >= 3
                    and f"{parts[1]}/{parts[2]}" not in kube.api_resources
                ):
                    if (parts[1], parts[2]) in {(g, v) for g, v, _ in JOB_KINDS} or parts[1] == TRAINER:
                        # a job kind or Trainer resource whose operator is not installed
                        return self._send(404, _status(404, "NotFound", UNSERVED))
                if len(parts) >= 6 and parts[0] == "apis" and (parts[1], parts[2], parts[5]) in JOB_KINDS:
                    ns, what = parts[4], f"{parts[5]}.{parts[1]}"  # one kind of job per stand-in
                    if len(parts) == 6:
                        if self.command == "POST":
                            return self._create_job(ns, body, what, query)
                        if query.get("watch") in ("true", "1", "True"):
                            return self._watch_jobs(ns, query)
                        return self._list_jobs(ns, query, f"{parts[1]}/{parts[2]}")
                    name = parts[6]
                    if self.command == "DELETE":
                        return self._delete_job(ns, name, what, body)
                    return self._get(kube.jobs, ns, name, what)
                if parts[:2] == ["apis", TRAINER] and parts[-2:-1] in (
                    ["clustertrainingruntimes"],
                    ["trainingruntimes"],
                ):
                    ns = parts[4] if parts[3] == "namespaces" else ""
                    if parts[-2] in kube.forbidden:
                        return self._send(403, _status(403, "Forbidden", f"{parts[-2]} is forbidden"))
                    return self._get(kube.runtimes, ns, parts[-1], f"{parts[-2]}.{TRAINER}")
                if parts == ["openapi", "v3", "apis", TRAINER, "v1alpha1"] and self.command == "GET":
                    return self._trainer_openapi()
                if parts == ["api", "v1", "pods"] and self.command == "GET":
                    return self._list_all_pods(query)
                if parts[:2] == ["api", "v1"] and len(parts) >= 5 and parts[4] == "pods":
                    ns = parts[3]
                    if len(parts) == 7 and parts[6] == "log":
                        return self._pod_log(ns, parts[5], query)
                    return self._list_pods(ns, query)
                if parts[:2] == ["api", "v1"] and len(parts) == 5 and parts[4] == "events":
                    return self._list_events(parts[3], query)
                if parts[:2] == ["apis", "argoproj.io"] and len(parts) == 7 and parts[5] == "workflows":
                    return self._get(kube.workflows, parts[4], parts[6], "workflows.argoproj.io")
                if self._cluster_inspection(parts, body):
                    return None
                self._send(404, _status(404, "NotFound", f"stand-in does not serve {self.path}"))
            except (BrokenPipeError, ConnectionResetError):
                pass

        do_GET = do_POST = do_DELETE = _route

        # -- endpoints --------------------------------------------------------------------------

        def _cluster_inspection(self, parts: list[str], body: Any) -> bool:
            """Discovery, access reviews, nodes, Secrets, ServiceAccounts, namespaces, claims and
            quotas; False if not one of them."""
            if parts[0] == "apis" and len(parts) == 3 and self.command == "GET":
                group_version = f"{parts[1]}/{parts[2]}"
                if group_version not in kube.api_resources:
                    self._send(
                        404, _status(404, "NotFound", "the server could not find the requested resource")
                    )
                else:
                    names = kube.api_resources[group_version]
                    resources = [{"name": n, "namespaced": True, "kind": n, "verbs": []} for n in names]
                    self._send(
                        200,
                        {"kind": "APIResourceList", "groupVersion": group_version, "resources": resources},
                    )
                return True
            if parts[:4] == ["apis", "scheduling.k8s.io", "v1", "priorityclasses"] and len(parts) == 5:
                self._get(kube.priority_classes, "", parts[4], "priorityclasses.scheduling.k8s.io")
                return True
            if parts[:3] == ["apis", "authorization.k8s.io", "v1"] and parts[3:] == [
                "selfsubjectaccessreviews"
            ]:
                attrs = body["spec"]["resourceAttributes"]
                resource = attrs["resource"] + (
                    f"/{attrs['subresource']}" if attrs.get("subresource") else ""
                )
                allowed = kube.allowed is None or _grants(kube.allowed, attrs, resource)
                self._send(201, {**body, "status": {"allowed": allowed}})
                return True
            if parts == ["apis", "authorization.k8s.io", "v1", "subjectaccessreviews"]:
                self._subject_access_review(body)
                return True
            if parts == ["api", "v1", "nodes"] and self.command == "GET":
                if "nodes" in kube.forbidden:
                    self._send(403, _status(403, "Forbidden", "nodes is forbidden at the cluster scope"))
                else:
                    self._send(200, {"kind": "NodeList", "apiVersion": "v1", "items": kube.nodes})
                return True
            if parts[:2] != ["api", "v1"] or len(parts) < 3 or parts[2] != "namespaces":
                return False
            kind = parts[4] if len(parts) >= 5 else "namespaces"
            if kind in kube.forbidden:
                self._send(403, _status(403, "Forbidden", f"{kind} is forbidden"))
            elif len(parts) == 4:
                ns = kube.namespaces.get(parts[3])
                found = {"metadata": {"name": parts[3], **ns}} if ns is not None else None
                self._send(200, found) if found else self._send(404, _status(404, "NotFound", "no namespace"))
            elif kind == "secrets" and len(parts) == 6:
                self._get(kube.secrets, parts[3], parts[5], "secrets")
            elif kind == "serviceaccounts" and len(parts) == 6:
                self._get(kube.service_accounts, parts[3], parts[5], "serviceaccounts")
            elif kind == "persistentvolumeclaims" and len(parts) == 6:
                self._get(kube.claims, parts[3], parts[5], "persistentvolumeclaims")
            elif kind == "resourcequotas" and len(parts) == 5:
                self._send(200, {"kind": "ResourceQuotaList", "items": kube.quotas.get(parts[3], [])})
            else:
                return False
            return True

        def _subject_access_review(self, body: dict) -> None:
            """What `allowed_for[user]` lets that user do (none when absent)."""
            if "subjectaccessreviews" in kube.forbidden:
                return self._send(403, _status(403, "Forbidden", "subjectaccessreviews is forbidden"))
            attrs = body["spec"]["resourceAttributes"]
            resource = attrs["resource"] + (f"/{attrs['subresource']}" if attrs.get("subresource") else "")
            allowed = _grants(kube.allowed_for.get(body["spec"]["user"], set()), attrs, resource)
            self._send(201, {**body, "status": {"allowed": allowed}})

        def _get(self, store: dict, ns: str, name: str, what: str) -> None:
            with kube.cond:
                obj = copy.deepcopy(store.get((ns, name)))
            if obj is None:
                plural, _, group = what.partition(".")
                details = {"name": name, "group": group, "kind": plural}
                return self._send(404, _status(404, "NotFound", f'{what} "{name}" not found', details))
            self._send(200, obj)

        def _trainer_openapi(self) -> None:
            """The OpenAPI v3 document of trainer.kubeflow.org/v1alpha1, as the API server publishes a
            CRD's schema: whole, under a name of its own, marked with its group, version and kind."""
            if kube.trainjob_schema is None or f"{TRAINER}/v1alpha1" not in kube.api_resources:
                return self._send(
                    404, _status(404, "NotFound", "the server could not find the requested resource")
                )
            gvk = [{"group": TRAINER, "version": "v1alpha1", "kind": "TrainJob"}]
            schema = {**kube.trainjob_schema, "x-kubernetes-group-version-kind": gvk}
            doc = {
                "openapi": "3.0.0",
                "components": {"schemas": {"org.kubeflow.trainer.v1alpha1.TrainJob": schema}},
            }
            self._send(200, doc)

        def _create_job(self, ns: str, body: dict, what: str, query: dict) -> None:
            name = body["metadata"]["name"]
            if kube.create_error:
                return self._send(
                    kube.create_error, _status(kube.create_error, "Forbidden", "create refused")
                )
            if problem := _strict_decoding_error(kube, body, what, query):
                return self._send(400, _status(400, "BadRequest", problem))
            with kube.cond:
                if (ns, name) in kube.jobs:
                    return self._send(
                        409,
                        _status(409, "AlreadyExists", f'{what} "{name}" already exists'),
                    )
                job = copy.deepcopy(kube._create(body))
            if kube.script:
                threading.Thread(target=kube._run_script, args=(ns, name), daemon=True).start()
            self._send(201, job)

        def _delete_job(self, ns: str, name: str, what: str, body: Any) -> None:
            with kube.cond:
                job = kube.jobs.get((ns, name))
                if job is None:
                    return self._send(404, _status(404, "NotFound", f'{what} "{name}" not found'))
                foreground = (body or {}).get("propagationPolicy") == "Foreground"
                if foreground and kube.pod_grace_seconds and kube._pods_of(ns, name):
                    if not job["metadata"].get("deletionTimestamp"):
                        job["metadata"].update(deletionTimestamp=_now(), finalizers=["foregroundDeletion"])
                        kube._record("MODIFIED", job)
                        threading.Timer(kube.pod_grace_seconds, kube._gone, (ns, name)).start()
                    return self._send(200, copy.deepcopy(job))
                kube._gone(ns, name)
            self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}})

        def _matches(self, job: dict, query: dict) -> bool:
            selector = query.get("fieldSelector", "")
            key, _, value = selector.partition("=")
            return not selector or (key == "metadata.name" and job["metadata"]["name"] == value)

        def _list_jobs(self, ns: str, query: dict, api_version: str) -> None:
            with kube.cond:
                items = [
                    copy.deepcopy(j) for (n, _), j in kube.jobs.items() if n == ns and self._matches(j, query)
                ]
                rv = str(kube.rv)
            self._send(
                200,
                {
                    "apiVersion": api_version,
                    "kind": "List",
                    "metadata": {"resourceVersion": rv},
                    "items": items,
                },
            )

        def _watch_jobs(self, ns: str, query: dict) -> None:
            if kube.watch_error:
                return self._send(kube.watch_error, _status(kube.watch_error, "Forbidden", "watch refused"))
            since = int(query.get("resourceVersion") or 0)
            deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
            self._start_chunked("application/json")
            with kube.cond:
                generation = kube.generation
                if since < kube.min_rv:
                    error = _status(410, "Expired", f"too old resource version: {since} ({kube.min_rv})")
                    self._chunk(json.dumps({"type": "ERROR", "object": error}).encode() + b"\n")
                    return self._end_chunked()
                sent = since
                while kube.generation == generation:
                    for rv, kind, job in kube.history:
                        if rv > sent and job["metadata"]["namespace"] == ns and self._matches(job, query):
                            self._chunk(json.dumps({"type": kind, "object": job}).encode() + b"\n")
                    sent = kube.rv
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    kube.cond.wait(min(remaining, 0.2))
            self._end_chunked()

        def _list_pods(self, ns: str, query: dict) -> None:
            selector = query.get("labelSelector", "")
            with kube.cond:
                items = [
                    copy.deepcopy(p)
                    for (n, _), p in kube.pods.items()
                    if n == ns and _selected(p["metadata"]["labels"], selector)
                ]
                rv = str(kube.rv)
            self._send(
                200,
                {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": rv}, "items": items},
            )

        def _list_all_pods(self, query: dict) -> None:
            """Pods in every namespace (what the scheduler weighs on each node), by field selector."""
            if "pods" in kube.forbidden:
                return self._send(403, _status(403, "Forbidden", "pods is forbidden at the cluster scope"))
            selector = query.get("fieldSelector", "")
            with kube.cond:
                items = [copy.deepcopy(p) for p in kube.pods.values() if _field_selected(p, selector)]
            self._send(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})

        def _pod_log(self, ns: str, pod: str, query: dict) -> None:
            with kube.cond:
                obj = kube.pods.get((ns, pod))
                if obj is None:
                    return self._send(404, _status(404, "NotFound", f'pods "{pod}" not found'))
                entry = kube.logs[obj["metadata"]["uid"]]
            follow = query.get("follow") in ("true", "True", "1")
            stamps = query.get("timestamps") in ("true", "True", "1")
            since = query.get("sinceSeconds")
            floor = time.time_ns() - int(since) * 1_000_000_000 if since else 0

            def render(lines):
                return b"".join(
                    ((f"{rfc3339nano(ts)} {text}" if stamps else text) + "\n").encode()
                    for ts, text in lines
                    if ts >= floor
                )

            if not follow:
                with kube.cond:
                    lines = list(entry["lines"])
                if query.get("tailLines"):
                    lines = lines[-int(query["tailLines"]) :]
                send_bytes(self, 200, render(lines), "text/plain")
                return
            self._start_chunked("text/plain")
            with kube.cond:
                generation, sent = kube.generation, 0
                while kube.generation == generation:  # a dropped stream delivers nothing more
                    fresh = entry["lines"][sent:]
                    sent = len(entry["lines"])
                    if fresh:
                        data = render(fresh)
                        if data:
                            self._chunk(data)
                    if entry["closed"]:
                        break
                    kube.cond.wait(0.2)
            self._end_chunked()

        def _list_events(self, ns: str, query: dict) -> None:
            key, _, value = query.get("fieldSelector", "").partition("=")
            with kube.cond:
                items = [
                    copy.deepcopy(e)
                    for e in kube.events
                    if e["metadata"]["namespace"] == ns
                    and (key != "involvedObject.name" or e["involvedObject"]["name"] == value)
                ]
            self._send(200, {"apiVersion": "v1", "kind": "EventList", "metadata": {}, "items": items})

    return Handler
