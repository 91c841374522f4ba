"""The Kubernetes launcher: run a `TrainJob` as a PyTorchJob (`resources.launcher: kubernetes`) or as
a Kubeflow Trainer v2 TrainJob (`trainjob`) and follow it to the end. What differs between the two
kinds (API, status, pod labels) is a `kinds.JobKind`; everything below is the same for both.

What it does, in order (docs/kubernetes.md has the operator's view and the RBAC it needs):

1. Build the job (`pytorchjob.build_pytorchjob`, `trainjob.build_trainjob`), owned by the run's Argo
   Workflow when the step knows it (env FULLTUNE_WORKFLOW_NAME) and may read it. A TrainJob's
   runtime is read first: a missing one is refused before anything is created.
2. Create it. If a job of the same name exists (409), an earlier attempt of this same task made it:
   follow that one instead of starting a second, unless it already failed, in which case it is
   deleted and created again (a retry that resumes from the newest complete checkpoint), or is
   still being deleted (a Foreground deletion waits for its pods), which is waited out the same way.
3. Watch it (one object, by field selector) with a server-side timeout, reconnecting from the last
   resourceVersion; on 410 Gone list it again and watch from the list's resourceVersion. Each new
   condition becomes a log line.
4. While it runs, copy the rank-0 pod's log into this step's log. The stream is followed with
   timestamps; after a dropped connection it is read again from a little before the last timestamp
   seen (`since_seconds`), and lines up to and including that timestamp that were already copied
   are skipped, so nothing is copied twice. A recreated rank-0 pod (new uid) starts a new copy.
5. Succeeded: return. Failed: raise LaunchError with the condition's reason and message, the recent
   events of the job and its pods, and the last log lines; the finished job is left in place for
   inspection (its pods hold no GPU; the TTL after finishing removes it).
6. SIGTERM/SIGINT (a cancelled KFP run terminates this pod), a set `stop` event, or any error of the
   launcher itself after the job exists: delete the job (propagationPolicy Foreground) so no GPU job
   is orphaned, then raise. A plain success deletes nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from calendar import timegm
from collections import deque
from dataclasses import dataclass, field
from typing import IO, Any

from fulltune.config import RunConfig
from fulltune.launch.base import LaunchError, TrainJob
from fulltune.launch.kinds import JobKind
from fulltune.launch.pytorchjob import PYTORCHJOB, build_pytorchjob, workflow_owner
from fulltune.launch.trainjob import (
    OVERRIDES_FIELDS,
    RUNTIME_PLURALS,
    TRAINJOB,
    build_trainjob,
    configured_overrides_field,
    overrides_field_fix,
    runtime_missing,
    served_overrides_field,
)
from fulltune.train.exit_codes import is_retryable

log = logging.getLogger(__name__)

SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
WORKFLOW_ENV = "FULLTUNE_WORKFLOW_NAME"
SINCE_MARGIN_S = 30  # re-read this much more than strictly needed: clocks of this pod and the node differ
_TRANSIENT_LIMIT = 5  # consecutive failed watch requests before giving up

# resources.launcher -> the kind of job it creates, and how it builds one.
KINDS: dict[str, JobKind] = {"kubernetes": PYTORCHJOB, "trainjob": TRAINJOB}
_BUILDERS = {"kubernetes": build_pytorchjob, "trainjob": build_trainjob}


def read_runtime(custom: Any, cfg: RunConfig, namespace: str) -> dict[str, Any]:
    """The runtime `cfg`'s TrainJob names: a ClusterTrainingRuntime, or a TrainingRuntime in
    `namespace` (the kubernetes client's ApiException when it cannot be read, 404 when missing)."""
    runtime = cfg.resources.trainjob
    group, version, plural = TRAINJOB.group, TRAINJOB.version, RUNTIME_PLURALS[runtime.runtime_kind]
    if runtime.runtime_kind == "ClusterTrainingRuntime":
        return custom.get_cluster_custom_object(group, version, plural, runtime.runtime)
    return custom.get_namespaced_custom_object(group, version, namespace, plural, runtime.runtime)


def launcher_access(launcher: str) -> tuple[tuple[str, str, str], ...]:
    """(API group, resource, verb): everything the launcher asks of the Kubernetes API. The chart's
    RBAC grants exactly these (a test compares), and `fulltune doctor` checks them."""
    return KINDS[launcher].access


LAUNCHER_ACCESS = launcher_access("kubernetes")  # the PyTorchJob launcher's, the chart's default


def required_access(cfg: RunConfig) -> list[tuple[str, str, str, str]]:
    """(API group, resource, verb, resource name or "") that the launcher of `cfg` asks for: its
    `launcher_access`, where a TrainJob's launcher reads only the one runtime its config names (the
    chart grants no more)."""
    if cfg.resources.launcher not in KINDS:
        return []
    runtime = cfg.resources.trainjob
    wanted = RUNTIME_PLURALS[runtime.runtime_kind]
    return [
        (group, resource, verb, runtime.runtime if resource == wanted else "")
        for group, resource, verb in launcher_access(cfg.resources.launcher)
        if resource not in RUNTIME_PLURALS.values() or resource == wanted
    ]


class LaunchCancelled(LaunchError):
    """The launcher was told to stop (signal or stop event); the job was deleted."""


@dataclass
class _State:
    """What the watch thread has learnt, shared with the main thread and the log thread."""

    done: threading.Event = field(default_factory=threading.Event)  # watch thread ended
    finished: threading.Event = field(default_factory=threading.Event)  # job reached Succeeded/Failed
    running: threading.Event = field(default_factory=threading.Event)  # pods have started
    outcome: str = ""
    final: dict[str, Any] = field(default_factory=dict)
    started_ns: int | None = None  # the job's status.startTime, while it is not suspended
    error: BaseException | None = None
    seen: set = field(default_factory=set)


class KubernetesLauncher:
    """Runs the job as a PyTorchJob or TrainJob (`resources.launcher`) through the Kubernetes API
    (in-cluster, kubeconfig or explicit)."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        run_id: str = "",
        image: str | None = None,
        optional_secrets: tuple[str, ...] = (),
        configuration: Any = None,
        stream: IO[str] | None = None,
        stop: threading.Event | None = None,
        handle_signals: bool = True,
        poll_seconds: float = 2.0,
        drain_seconds: float = 10.0,
        waiting_report_seconds: float = 30.0,
        deadline_grace_seconds: float = 120.0,
        tail_lines: int = 40,
        namespace_file: str = SA_NAMESPACE_FILE,
    ):
        from kubernetes import client

        from fulltune._image import default_trainer_image

        self.cfg = cfg
        self.k8s = cfg.resources.kubernetes
        launcher = cfg.resources.launcher if cfg.resources.launcher in KINDS else "kubernetes"
        self.kind, self._build = KINDS[launcher], _BUILDERS[launcher]
        self.run_id = run_id
        self.image = self.k8s.image or image or default_trainer_image()
        self.optional_secrets = tuple(optional_secrets)
        self.stream = stream or sys.stdout
        self.stop = stop or threading.Event()
        self.handle_signals = handle_signals
        self.poll_seconds = poll_seconds
        self.drain_seconds = drain_seconds
        self.waiting_report_seconds = waiting_report_seconds
        self.deadline_grace_seconds = deadline_grace_seconds  # the operator's turn first, if it comes
        self.own_namespace = _read_namespace(namespace_file)
        self.namespace = self.k8s.namespace or self.own_namespace or "default"
        self.api = client.ApiClient(configuration or load_configuration())
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)
        self._tail: deque[str] = deque(maxlen=tail_lines)
        self._out_lock = threading.Lock()

    # -- the Launcher interface -----------------------------------------------------------------

    def run(self, job: TrainJob) -> None:
        ns, name = self.namespace, job.name
        served = {}
        if self.kind is TRAINJOB:
            self._check_runtime()
            served = {"overrides_field": self._overrides_field()}
        manifest = self._build(
            self.cfg,
            job,
            name=name,
            namespace=ns,
            image=self.image,
            run_id=self.run_id,
            owner=self._workflow_owner(),
            optional_secrets=self.optional_secrets,
            **served,
        )
        previous = self._install_signal_handlers()
        try:
            self._create_or_adopt(manifest)
            try:
                if self.stop.is_set():
                    raise LaunchCancelled(f"cancelled: {self.kind.kind} {ns}/{name} deleted")
                state = self._follow(ns, name)
            except BaseException:
                log.warning(
                    "stopping: deleting %s %s/%s so that no training pod is left", self.kind.kind, ns, name
                )
                self._delete(ns, name)
                raise
            if state.outcome == "Failed":
                culprit = self._failed_pod(ns, name)
                report = self._failure_report(ns, name, state.final, culprit)
                raise LaunchError(report, exit_code=culprit.code if culprit else None)
            log.info("%s %s/%s succeeded", self.kind.kind, ns, name)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # -- create / adopt / delete ----------------------------------------------------------------

    def _api(self, ns: str) -> tuple[str, str, str, str]:
        """(group, version, namespace, plural) of this kind, as the custom-objects calls take them."""
        return self.kind.group, self.kind.version, ns, self.kind.plural

    def _create_or_adopt(self, manifest: dict[str, Any]) -> dict[str, Any]:
        from kubernetes.client.rest import ApiException

        ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        try:
            created = self._create(ns, manifest)
            log.info(
                "created %s %s/%s: %d node(s) x %d process(es), image %s",
                self.kind.kind,
                ns,
                name,
                self.cfg.resources.num_nodes,
                self.cfg.resources.nproc_per_node,
                self.image,
            )
            return created
        except ApiException as exc:
            if exc.status != 409:
                raise LaunchError(
                    _api_error(f"cannot create {self.kind.kind} {ns}/{name}", exc, self.kind.missing_hint)
                ) from None
        existing = self.custom.get_namespaced_custom_object(*self._api(ns), name)
        # Being deleted (an earlier attempt was cancelled): a Foreground deletion keeps the job,
        # with a deletionTimestamp, until its pods have terminated; following it would end at its
        # DELETED event.
        deleting = bool((existing.get("metadata") or {}).get("deletionTimestamp"))
        if deleting or self.kind.terminal(existing) == "Failed":
            log.warning(
                "%s %s/%s exists from an earlier attempt of this task and %s: %s, then creating it "
                "again (training resumes from the newest complete checkpoint)",
                self.kind.kind,
                ns,
                name,
                "is being deleted" if deleting else "has failed",
                "waiting until it is gone" if deleting else "deleting it",
            )
            if not deleting:
                self._delete(ns, name)
            self._wait_deleted(ns, name)
            return self._create(ns, manifest)
        log.info(
            "%s %s/%s already exists (created by an earlier attempt of this task, state %s): "
            "following it instead of starting a second one",
            self.kind.kind,
            ns,
            name,
            self.kind.terminal(existing) or self.kind.latest_condition(existing) or "new",
        )
        return existing

    def _create(self, ns: str, manifest: dict[str, Any]) -> dict[str, Any]:
        # Strict: a field the cluster's CRD does not know is refused, naming it, where the API
        # server's default would drop it and the pods would start without what it carried.
        return self.custom.create_namespaced_custom_object(
            *self._api(ns), manifest, field_validation="Strict"
        )

    def _check_runtime(self) -> None:
        """A TrainJob's runtime must exist before the TrainJob is created (the Trainer would only mark
        it failed); say how often it restarts the group, which is the runtime's to decide."""
        from kubernetes.client.rest import ApiException

        runtime = self.cfg.resources.trainjob
        what = f"{runtime.runtime_kind} {runtime.runtime}"
        try:
            obj = read_runtime(self.custom, self.cfg, self.namespace)
        except ApiException as exc:
            if exc.status == 404 and not _names_object(exc):  # the kind is not served: no Trainer
                raise LaunchError(
                    _api_error(f"cannot read {what}", exc, self.kind.missing_hint)
                    + "; with the Kubeflow Training Operator instead, set resources.launcher: kubernetes",
                    exit_code=1,
                ) from None
            if exc.status == 404:
                missing, fix = runtime_missing(self.cfg, self.namespace)
                raise LaunchError(f"{missing}: {fix}", exit_code=1) from None
            log.warning("%s", _api_error(f"cannot read {what}; creating the TrainJob anyway", exc))
            return
        policy = (((obj.get("spec") or {}).get("template") or {}).get("spec") or {}).get(
            "failurePolicy"
        ) or {}
        log.info(
            "%s: the training group restarts at most %d time(s) after a retryable failure (its failurePolicy)",
            what,
            policy.get("maxRestarts", 0),
        )

    def _overrides_field(self) -> str:
        """The TrainJob field through which this cluster's Trainer takes the run's pod settings: the
        config's, or the one the cluster's TrainJob schema has. Refused when unknown: a guess the
        API server does not serve would be dropped, and the pods would start without the run's
        volumes, Secrets and scheduling settings."""
        from kubernetes.client.rest import ApiException

        if field := configured_overrides_field(self.cfg):
            return field
        fix = overrides_field_fix()
        try:
            served = served_overrides_field(self.api)
        except ApiException as exc:
            raise LaunchError(
                _api_error(f"cannot read the TrainJob schema the API server publishes; {fix}", exc),
                exit_code=1,
            ) from None
        if served is None:
            raise LaunchError(
                f"this cluster's TrainJob ({TRAINJOB.group}/{TRAINJOB.version}) has none of {', '.join(OVERRIDES_FIELDS)}: a "
                f"Kubeflow Trainer release fulltune does not know; {fix}",
                exit_code=1,
            )
        log.info(
            "the TrainJob carries its pod settings in %s (%s)", served, OVERRIDES_FIELDS[served].releases
        )
        return served

    def _delete(self, ns: str, name: str) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        try:
            self.custom.delete_namespaced_custom_object(
                *self._api(ns), name, body=client.V1DeleteOptions(propagation_policy="Foreground")
            )
            log.info("deleted %s %s/%s (propagationPolicy Foreground)", self.kind.kind, ns, name)
        except ApiException as exc:
            if exc.status != 404:
                log.error(
                    "%s", _api_error(f"could not delete {self.kind.kind} {ns}/{name}; delete it by hand", exc)
                )
        except Exception as exc:  # noqa: BLE001 — best effort while already failing
            log.error("could not delete %s %s/%s (%s); delete it by hand", self.kind.kind, ns, name, exc)

    def _wait_deleted(self, ns: str, name: str, timeout: float = 600.0) -> None:
        from kubernetes.client.rest import ApiException

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop.is_set():
            try:
                self.custom.get_namespaced_custom_object(*self._api(ns), name)
            except ApiException as exc:
                if exc.status == 404:
                    return
                raise
            time.sleep(self.poll_seconds)
        raise LaunchError(f"{self.kind.kind} {ns}/{name} was not deleted within {timeout:.0f}s")

    def _workflow_owner(self) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        workflow = os.environ.get(WORKFLOW_ENV, "").strip()
        if not workflow:
            return None
        if self.own_namespace and self.own_namespace != self.namespace:
            log.info(
                "the %s runs in %s, not in the run's namespace: no ownerReference",
                self.kind.kind,
                self.namespace,
            )
            return None
        try:
            obj = self.custom.get_namespaced_custom_object(
                "argoproj.io", "v1alpha1", self.namespace, "workflows", workflow
            )
        except ApiException as exc:
            log.warning(
                "cannot read Workflow %s/%s (%s %s): the %s is not owned by the run and is not "
                "deleted with it",
                self.namespace,
                workflow,
                exc.status,
                exc.reason,
                self.kind.kind,
            )
            return None
        uid = (obj.get("metadata") or {}).get("uid")
        return workflow_owner(workflow, uid) if uid else None

    # -- following the job ----------------------------------------------------------------------

    def _follow(self, ns: str, name: str) -> _State:
        state = _State()
        watcher = threading.Thread(target=self._watch, args=(ns, name, state), daemon=True, name="watch")
        logs = threading.Thread(target=self._copy_logs, args=(ns, name, state), daemon=True, name="logs")
        watcher.start()
        logs.start()
        try:
            while not state.done.is_set():
                if self.stop.is_set():
                    raise LaunchCancelled(f"cancelled: {self.kind.kind} {ns}/{name} deleted")
                self._check_deadline(ns, name, state)
                state.done.wait(self.poll_seconds)
            if state.error is not None:
                raise state.error
        finally:
            state.finished.set()  # also tells the log thread to finish when this ends by an error
        logs.join(self.drain_seconds)
        return state

    def _check_deadline(self, ns: str, name: str, state: _State) -> None:
        """LaunchError (the caller deletes the job) once the job has run `deadline_grace_seconds`
        past `active_deadline_seconds` without ending. The Training Operator checks the deadline
        only when it next reconciles the job, on a change of its pods: one whose ranks hang would
        hold its GPUs until the operator's periodic resync, hours later."""
        deadline = self.k8s.active_deadline_seconds
        if deadline is None or state.started_ns is None or state.finished.is_set():
            return
        ran = time.time() - state.started_ns / 1e9
        if ran > deadline + self.deadline_grace_seconds:
            raise LaunchError(
                f"{self.kind.kind} {ns}/{name} has run {ran:.0f}s, past resources.kubernetes."
                f"active_deadline_seconds ({deadline}), and the operator has not ended it (it checks "
                "the deadline only when the job's pods change): deleting it; a retry resumes from "
                "the newest complete checkpoint"
            )

    def _watch(self, ns: str, name: str, state: _State) -> None:
        from kubernetes import watch
        from kubernetes.client.rest import ApiException
        from urllib3.exceptions import HTTPError

        selector = f"metadata.name={name}"
        failures = 0
        try:
            version = self._relist(ns, name, state)
            while not state.finished.is_set():
                try:
                    for event in watch.Watch().stream(
                        self.custom.list_namespaced_custom_object,
                        *self._api(ns),
                        field_selector=selector,
                        resource_version=version,
                        timeout_seconds=self.k8s.watch_timeout_seconds,
                        allow_watch_bookmarks=True,
                    ):
                        failures = 0
                        obj = event["raw_object"]
                        version = (obj.get("metadata") or {}).get("resourceVersion") or version
                        if event["type"] == "DELETED":
                            raise LaunchError(f"{self.kind.kind} {ns}/{name} was deleted while training ran")
                        if event["type"] in ("ADDED", "MODIFIED"):
                            self._observe(obj, ns, name, state)
                        if state.finished.is_set():
                            return
                    log.debug(
                        "watch of %s %s/%s ended; reconnecting from %s", self.kind.kind, ns, name, version
                    )
                except ApiException as exc:
                    if exc.status == 410:
                        log.info("watch position %s expired (410 Gone): listing the job again", version)
                        version = self._relist(ns, name, state)
                        continue
                    if exc.status not in (429, 500, 502, 503, 504) or failures >= _TRANSIENT_LIMIT:
                        raise LaunchError(
                            _api_error(f"watching {self.kind.kind} {ns}/{name} failed", exc)
                        ) from None
                    failures += 1
                    time.sleep(min(30.0, self.poll_seconds * 2**failures))
                except HTTPError as exc:
                    if failures >= _TRANSIENT_LIMIT:
                        raise LaunchError(f"watching {self.kind.kind} {ns}/{name} failed: {exc}") from None
                    failures += 1
                    time.sleep(min(30.0, self.poll_seconds * 2**failures))
        except ApiException as exc:
            state.error = LaunchError(_api_error(f"following {self.kind.kind} {ns}/{name} failed", exc))
        except BaseException as exc:  # noqa: BLE001 — handed to the main thread
            state.error = exc
        finally:
            state.done.set()

    def _relist(self, ns: str, name: str, state: _State) -> str:
        listing = self.custom.list_namespaced_custom_object(
            *self._api(ns), field_selector=f"metadata.name={name}"
        )
        items = listing.get("items") or []
        if not items:
            raise LaunchError(f"{self.kind.kind} {ns}/{name} no longer exists (deleted outside fulltune?)")
        self._observe(items[0], ns, name, state)
        return (listing.get("metadata") or {}).get("resourceVersion") or ""

    def _observe(self, obj: dict[str, Any], ns: str, name: str, state: _State) -> None:
        for cond in (obj.get("status") or {}).get("conditions") or []:
            if cond.get("status") != "True":
                continue
            key = (cond.get("type"), cond.get("reason"), cond.get("lastTransitionTime"), cond.get("message"))
            if key in state.seen:
                continue
            state.seen.add(key)
            log.info("%s", self.kind.describe(cond, ns, name))
            if self.kind.started(cond):
                state.running.set()
        outcome = self.kind.terminal(obj)
        if outcome:
            state.outcome, state.final = outcome, obj
            state.finished.set()
        suspended = self.kind.latest_condition(obj) == "Suspended"
        start = (obj.get("status") or {}).get("startTime")
        state.started_ns = None if suspended or not start else _parse_timestamp(start)

    # -- the rank-0 pod's log --------------------------------------------------------------------

    def _copy_logs(self, ns: str, name: str, state: _State) -> None:
        cursor = _LogCursor()
        said: set = set()  # the waiting reasons logged already
        next_report = 0.0
        while True:
            last_pass = state.finished.is_set()
            # a PyTorchJob's condition says when its pods run; no TrainJob condition does
            looking = state.running.is_set() or not self.kind.announces_start
            if last_pass and not looking:
                return  # never ran while followed (an adopted finished job): nothing to copy
            # until a rank-0 pod runs
            if cursor.uid is None and not last_pass and time.monotonic() >= next_report:
                self._report_waiting(ns, name, said)
                next_report = time.monotonic() + self.waiting_report_seconds
            if looking:
                try:
                    pod = self._rank0_pod(ns, name)
                    if (
                        pod is not None
                        and pod.status
                        and pod.status.phase not in (None, "Pending", "Unknown")
                    ):
                        self._copy_pod_log(ns, pod, cursor, follow=not last_pass)
                except Exception as exc:  # noqa: BLE001 — the log copy never fails the step
                    log.debug("log copy interrupted: %s", exc)
            if last_pass or self.stop.is_set():
                return
            state.finished.wait(self.poll_seconds)

    def _report_waiting(self, ns: str, name: str, said: set) -> None:
        """Until the pods run, log once each Warning event of the job and of what its controller
        makes for it (its pods, a TrainJob's Jobs: all named after it): a quota that forbids the
        pods, no node that fits them, an image that cannot be pulled. The controllers say so only
        in events while the job's conditions stay as they were (a PyTorchJob Created, a TrainJob none),
        so the step would otherwise wait in silence."""
        try:
            events = self.core.list_namespaced_event(ns, field_selector="type=Warning").items
        except Exception as exc:  # noqa: BLE001 — what the log says only; following goes on
            log.debug("events not readable: %s", exc)
            return
        for event in sorted(events, key=_event_time):
            obj, message = event.involved_object, (event.message or "").strip()
            ours = obj.name == name or (obj.name or "").startswith(f"{name}-")
            key = (obj.kind, obj.name, event.reason, message)
            if event.type != "Warning" or not ours or key in said:
                continue
            said.add(key)
            hint = _QUOTA_HINT if "exceeded quota" in message else ""
            log.warning(
                "%s %s/%s waits: %s/%s %s: %s%s",
                self.kind.kind,
                ns,
                name,
                obj.kind,
                obj.name,
                event.reason,
                message,
                hint,
            )

    def _rank0_pod(self, ns: str, name: str):
        pods = self.core.list_namespaced_pod(ns, label_selector=self.kind.rank0_selector(name)).items
        live = [p for p in pods if not p.metadata.deletion_timestamp] or pods
        return max(live, key=_created_at, default=None)

    def _copy_pod_log(self, ns: str, pod, cursor: _LogCursor, *, follow: bool) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        uid, pod_name = pod.metadata.uid, pod.metadata.name
        if uid != cursor.uid:
            if cursor.uid is not None:
                self._emit(f"--- {self.kind.rank0} pod {pod_name} was recreated; its log follows ---")
            cursor.attach(uid)
        elif cursor.done:
            return  # this pod's log was read to its end and the pod has finished
        kwargs: dict[str, Any] = {"container": self.kind.container, "follow": follow, "timestamps": True}
        if cursor.last_ns is not None:
            cursor.rewind()
            kwargs["since_seconds"] = max(1, int(time.time() - cursor.last_ns / 1e9) + SINCE_MARGIN_S)
        resp = self.core.read_namespaced_pod_log(pod_name, ns, _preload_content=False, **kwargs)
        try:
            for line in iter_resp_lines(resp):
                stamp, _, text = line.partition(" ")
                if cursor.accept(_parse_timestamp(stamp)):
                    self._emit(text)
                if self.stop.is_set():
                    return
        finally:
            resp.release_conn()
        cursor.done = pod.status.phase in ("Succeeded", "Failed")

    def _emit(self, text: str) -> None:
        line = f"[{self.kind.rank0}] {text.rstrip()}\n"
        with self._out_lock:
            self._tail.append(line)
            self.stream.write(line)
            self.stream.flush()

    # -- failure report -------------------------------------------------------------------------

    def _failure_report(self, ns: str, name: str, obj: dict[str, Any], culprit: _FailedPod | None) -> str:
        failed = self.kind.failed_condition(obj)
        parts = [
            f"{self.kind.kind} {ns}/{name} failed: {failed.get('reason') or 'Failed'}: {failed.get('message') or ''}"
        ]
        events = self._recent_events(ns, name)
        if events:
            parts.append("Recent events:\n" + "\n".join(events))
        tail = list(self._tail) or self._fetch_tail(ns, name)
        if tail:
            parts.append(f"Last log lines of the {self.kind.rank0} pod:\n" + "".join(tail).rstrip())
        if culprit and not culprit.rank0:
            # the failure's own words: the rank-0 pod's log shows at most its peers' lost connections
            lines = self._pod_tail(ns, culprit.name).rstrip()
            if lines:
                parts.append(f"Last log lines of pod {culprit.name}, which exited {culprit.code}:\n{lines}")
        return "\n".join(parts)

    def _failed_pod(self, ns: str, name: str) -> _FailedPod | None:
        """The pod whose training container failed the job: one that exited 1-127 if any did, else
        one that exited 128+, else None (not known).

        The Failed condition cannot tell: the Training Operator also fails a job past its
        activeDeadlineSeconds or backoffLimit, with the same reason and after deleting every pod,
        and a retry of such a run resumes from its newest checkpoint. Only a permanent code marks
        the failure as the input's (`fulltune.failure`), which `fulltune retry` then refuses."""
        try:
            pods = self.core.list_namespaced_pod(ns, label_selector=self.kind.pods_selector(name)).items
        except Exception as exc:  # noqa: BLE001 — not known: not taken as the input's fault
            log.debug("exit codes not readable: %s", exc)
            return None
        rank0 = dict(term.split("=", 1) for term in self.kind.rank0_selector(name).split(","))
        failed = [
            _FailedPod(pod.metadata.name, code, rank0.items() <= (pod.metadata.labels or {}).items())
            for pod in pods
            for code in _failed_exit_codes(pod, self.kind.container)
        ]
        return next((f for f in failed if not is_retryable(f.code)), failed[0] if failed else None)

    def _pod_tail(self, ns: str, pod: str) -> str:
        """The last lines of `pod`'s training container log, as many as the step keeps; "" when they
        cannot be read (the report is best effort)."""
        try:
            return self.core.read_namespaced_pod_log(
                pod, ns, container=self.kind.container, tail_lines=self._tail.maxlen
            )
        except Exception as exc:  # noqa: BLE001 — the report is best effort
            log.debug("no log tail of %s: %s", pod, exc)
            return ""

    def _recent_events(self, ns: str, name: str, limit: int = 10) -> list[str]:
        try:
            pods = self.core.list_namespaced_pod(ns, label_selector=self.kind.pods_selector(name)).items
            names = [name] + [p.metadata.name for p in pods]
            events = []
            for involved in names:
                events += self.core.list_namespaced_event(
                    ns, field_selector=f"involvedObject.name={involved}"
                ).items
        except Exception as exc:  # noqa: BLE001 — the report is best effort
            return [f"  (events not readable: {exc})"]
        events.sort(key=_event_time)
        return [
            f"  {e.type} {e.reason} {e.involved_object.kind}/{e.involved_object.name}: {(e.message or '').strip()}"
            for e in events[-limit:]
        ]

    def _fetch_tail(self, ns: str, name: str) -> list[str]:
        try:
            pod = self._rank0_pod(ns, name)
        except Exception as exc:  # noqa: BLE001 — the report is best effort
            log.debug("no log tail: %s", exc)
            return []
        text = self._pod_tail(ns, pod.metadata.name) if pod is not None else ""
        return [f"[{self.kind.rank0}] {line}\n" for line in text.splitlines()]

    # -- signals --------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> dict[int, Any]:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum, _frame):
            log.warning("received %s: cancelling training", signal.Signals(signum).name)
            self.stop.set()

        return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}


@dataclass(frozen=True)
class _FailedPod:
    name: str
    code: int  # its training container's exit code
    rank0: bool  # the pod whose log the step copies


class _LogCursor:
    """Where the copy of one pod's log stands: the newest timestamp copied and how many lines had it."""

    def __init__(self) -> None:
        self.uid: str | None = None
        self.last_ns: int | None = None
        self.count = 0  # lines copied with timestamp == last_ns
        self.skip = 0  # of those, how many a re-read has yet to replay
        self.done = False

    def attach(self, uid: str) -> None:
        self.uid, self.last_ns, self.count, self.skip, self.done = uid, None, 0, 0, False

    def rewind(self) -> None:
        self.skip = self.count

    def accept(self, ts: int | None) -> bool:
        if ts is None:  # no timestamp: cannot be matched, copy it
            return True
        if self.last_ns is None or ts > self.last_ns:
            self.last_ns, self.count, self.skip = ts, 1, 0
            return True
        if ts == self.last_ns:
            if self.skip:
                self.skip -= 1
                return False
            self.count += 1
            return True
        return False


_QUOTA_HINT = (
    " (the namespace's ResourceQuota has no room for the training pods: they are created once it "
    "has; `fulltune doctor` compares the quota with what they request)"
)


def _parse_timestamp(stamp: str) -> int | None:
    """RFC 3339 (nano) UTC timestamp, as the kubelet writes it, to integer nanoseconds."""
    if not stamp.endswith("Z") or "T" not in stamp:
        return None
    whole, _, frac = stamp[:-1].partition(".")
    try:
        seconds = timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))
        nanos = int((frac + "000000000")[:9]) if frac else 0
    except ValueError:
        return None
    return seconds * 1_000_000_000 + nanos


def _failed_exit_codes(pod, container: str) -> list[int]:
    """The non-zero exit code of `container` in `pod`, if it has ended with one."""
    statuses = (pod.status and pod.status.container_statuses) or []
    ended = [s.state.terminated for s in statuses if s.name == container and s.state and s.state.terminated]
    return [t.exit_code for t in ended if t.exit_code]


def _created_at(obj) -> float:
    when = obj.metadata.creation_timestamp
    return when.timestamp() if when else 0.0


def _event_time(event) -> float:
    when = (
        event.last_timestamp or event.event_time or event.first_timestamp or event.metadata.creation_timestamp
    )
    return when.timestamp() if when else 0.0


def _api_error(what: str, exc, missing_hint: str = "") -> str:
    import json

    message = exc.reason
    try:
        message = json.loads(exc.body).get("message") or message
    except (TypeError, ValueError, AttributeError):
        pass
    hint = ""
    if exc.status == 403:
        hint = " (the step's service account needs the RBAC of docs/kubernetes.md)"
    elif exc.status == 404 and missing_hint:
        hint = f" ({missing_hint})"
    return f"{what}: {exc.status} {message}{hint}"


def _names_object(exc) -> bool:
    """Whether a 404 is about a missing object (its Status names it) rather than a resource type the
    API server does not serve, whose 404 names nothing."""
    import json

    try:
        return bool((json.loads(exc.body).get("details") or {}).get("name"))
    except (TypeError, ValueError, AttributeError):
        return True  # no Status to tell by: taken as the object's


def _read_namespace(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def load_configuration():
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        # KUBECONFIG read now, not when the kubernetes package was imported
        config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or None, client_configuration=configuration
        )
    return configuration
