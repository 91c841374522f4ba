"""What the Kubernetes launcher needs to know about a kind of training job, one record per kind.

The launcher (`launch/kubernetes.py`) creates the job, adopts it on a retry, watches it, copies the
rank-0 pod's log and reports a failure the same way whatever the kind; a `JobKind` says where the
kind lives in the API, how its status reads and how its pods are labelled. Two kinds:
`pytorchjob.PYTORCHJOB` (Training Operator, kubeflow.org/v1) and `trainjob.TRAINJOB` (Trainer v2,
trainer.kubeflow.org/v1alpha1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Access = tuple[str, str, str]  # (API group, resource, verb)

# What every cluster launcher reads besides its own kind: the rank-0 pod, its log, the events of the
# job and its pods, and the run's Workflow (to own the job).
POD_ACCESS: tuple[Access, ...] = (
    ("", "pods", "get"),
    ("", "pods", "list"),
    ("", "pods/log", "get"),
    ("", "events", "list"),
    ("argoproj.io", "workflows", "get"),
)
JOB_VERBS = ("create", "get", "list", "watch", "delete")


@dataclass(frozen=True)
class JobKind:
    kind: str  # "PyTorchJob", "TrainJob": in every message
    group: str
    version: str
    plural: str
    container: str  # the training container, whose log is copied
    # label selector of the job's rank-0 pod, and of all its pods
    rank0_selector: Callable[[str], str]
    pods_selector: Callable[[str], str]
    # condition type -> (what it means in words, whether the pods have started)
    conditions: Mapping[str, tuple[str, bool]]
    succeeded: str  # the condition type that means success ("Succeeded", "Complete")
    missing_hint: str  # what a 404 from the kind's API means
    rank0: str = "master"  # how the log names the rank-0 pod
    extra_access: tuple[Access, ...] = ()  # what else this kind's launcher reads

    @property
    def access(self) -> tuple[Access, ...]:
        """Everything the launcher asks of the API for this kind: the chart's RBAC grants exactly
        these, and `fulltune doctor` checks them."""
        return (*((self.group, self.plural, verb) for verb in JOB_VERBS), *POD_ACCESS, *self.extra_access)

    def terminal(self, obj: dict[str, Any]) -> str:
        """ "Succeeded", "Failed" or "" (still going), from the object's true conditions."""
        for cond in _true_conditions(obj):
            if cond.get("type") == self.succeeded:
                return "Succeeded"
            if cond.get("type") == "Failed":
                return "Failed"
        return ""

    def failed_condition(self, obj: dict[str, Any]) -> dict[str, Any]:
        return next((c for c in reversed(_true_conditions(obj)) if c.get("type") == "Failed"), {})

    def latest_condition(self, obj: dict[str, Any]) -> str:
        conds = _true_conditions(obj)
        return conds[-1].get("type", "") if conds else ""

    def started(self, cond: dict[str, Any]) -> bool:
        return self.conditions.get(cond.get("type", ""), ("", False))[1]

    @property
    def announces_start(self) -> bool:
        """Whether a condition of this kind says its pods have started (a PyTorchJob's Running); a
        TrainJob has none, so its rank-0 pod is looked for from the start."""
        return any(started for _, started in self.conditions.values())

    def describe(self, cond: dict[str, Any], ns: str, name: str) -> str:
        kind, reason, message = cond.get("type"), cond.get("reason") or "", cond.get("message") or ""
        what = self.conditions.get(str(kind), (str(kind), False))[0]
        return f"{self.kind} {ns}/{name} {what}" + (f" [{reason}] {message}" if reason or message else "")


def _true_conditions(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
