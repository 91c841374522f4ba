"""The Helm chart (charts/fulltune), rendered and linted by the real Helm engine (helm-python).

Every values file in charts/fulltune/ci/ is rendered, linted and each object validated against the
Kubernetes schemas (strict: unknown fields are errors; the Trainer v2 runtime against its vendored CRD
made strict). On top of that: the Role grants exactly what the train launcher needs, nothing is
cluster-wide but the ClusterTrainingRuntime and the reading of it, every pod is Pod Security
"restricted", the runtime maps exit codes to the JobSet's failure policy as the trainer reads them,
credentials come only from Secrets, the values schema refuses typos and wrong types, the default
RunConfig is a valid RunConfig naming the chart's launcher and runtime, and the pipeline the upload
hook ships is the compiled one.

`python tests/test_chart.py --write-schema` regenerates the RunConfig part of values.schema.json
after a change to fulltune.config.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fulltune.launch.kubernetes import launcher_access
from fulltune.launch.pytorchjob import RESTRICTED_CONTAINER, RESTRICTED_POD, istio_metadata
from fulltune.launch.trainjob import (
    ANCESTOR_LABEL,
    ANCESTOR_TRAINER,
    GROUP,
    JOBSET_LABEL,
    PERMANENT_EXIT_CODES,
    SHM_VOLUME,
    TRAINER_CONTAINER,
    TRAINER_JOB,
)
from fulltune.train.exit_codes import is_retryable
from support.crd_schema import CRDS, TRAINER_RELEASES, crd_validator

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "fulltune"
CHART_DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())
VALUES_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
PIPELINE = ROOT / "pipelines" / "full_finetune.yaml"
NAMESPACE = "team-a"
# The least a run configuration needs for the upload hook to start runs (the schema requires it).
RUNNABLE = {
    "work_dir": "s3://ml-work/fulltune",
    "model": {"base_model_uri": "s3://ml-models/llama"},
    "data": {"train_uri": "s3://ml-data/notes.jsonl"},
}
RELEASE = "ft"
FULLNAME = "ft-fulltune"
# The newest Kubernetes release kubernetes-validate bundles schemas for, and the oldest the chart
# supports (Chart.yaml kubeVersion).
KUBE_VERSION = kubernetes_validate.utils.latest_version()
OLDEST_KUBE_VERSION = "1.27.0"
# Kubeflow Trainer v2.0 needs 1.29 (its chart's README); older schemas mark podFailurePolicy rules'
# onPodConditions required, which the API server never asked for.
TRAINER_OLDEST_KUBE_VERSION = "1.29.0"

# Trainer v2's runtime kinds and their vendored CRDs (tests/data/crds/README.md): the chart's
# runtime must be one that the oldest (v2.0) and the newest (v2.3) release we test take.
RUNTIME_CRDS = {
    "ClusterTrainingRuntime": CRDS / "trainer.kubeflow.org_clustertrainingruntimes.yaml",
    "TrainingRuntime": CRDS / "trainer.kubeflow.org_trainingruntimes.yaml",
}
NEWEST_RUNTIME_CRDS = {
    kind: TRAINER_RELEASES / f"v2.3.0-{path.name}.gz" for kind, path in RUNTIME_CRDS.items()
}
CLUSTER_RESOURCES = {"clustertrainingruntimes"}  # what the launcher reads outside its namespace
KFP = "pipelines.kubeflow.org"
UPLOADER_VERSION_RULES = {
    (KFP, resource, verb)
    for resource in ("pipelines", "pipelines/versions")
    for verb in ("create", "get", "list")
}
# the modes that schedule nothing delete what an earlier mode schedule left: find it, delete it
UNSCHEDULE_RULES = {(KFP, "experiments", "get"), (KFP, "experiments", "list")} | {
    (KFP, "jobs", verb) for verb in ("list", "delete")
}
UPLOADER_UPLOAD_RULES = UPLOADER_VERSION_RULES | UNSCHEDULE_RULES
UPLOADER_COMMON_RULES = UPLOADER_VERSION_RULES | {
    (KFP, "experiments", verb) for verb in ("create", "get", "list")
}
UPLOADER_SCHEDULE_RULES = UPLOADER_COMMON_RULES | {
    (KFP, "jobs", verb) for verb in ("create", "get", "list", "delete", "enable", "disable")
}
UPLOADER_SUBMIT_RULES = (
    UPLOADER_COMMON_RULES | UNSCHEDULE_RULES | {(KFP, "runs", "create"), (KFP, "runs", "get")}
)

CLUSTER_SCOPED_KINDS = {
    "ClusterRole",
    "ClusterRoleBinding",
    "ClusterTrainingRuntime",
    "Namespace",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
}
# Environment variable names that carry credentials: their value may only come from a Secret.
CREDENTIAL_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|API_KEY|PRIVATE_KEY|CREDENTIAL", re.I)


# -- rendering ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def load_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def render(chart, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart renders (hooks included), as dicts."""
    manifests = chart.render(values=values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for template, text in sorted(manifests.items()):
        if not template.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                objects.append(doc)
    return objects


def only(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def launcher_of(values: dict) -> str:
    return values.get("training", {}).get("launcher", CHART_DEFAULTS["training"]["launcher"])


def runtime_values(values: dict) -> dict:
    """trainJob.runtime as the chart sees it: the values file over the chart's defaults."""
    return {**CHART_DEFAULTS["trainJob"]["runtime"], **values.get("trainJob", {}).get("runtime", {})}


def namespaced(access) -> set[tuple[str, str, str]]:
    """The launcher's (group, resource, verb) a namespaced Role can grant."""
    return {a for a in access if a[1] not in CLUSTER_RESOURCES}


def runtimes(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in RUNTIME_CRDS]


def trainer_job(runtime: dict) -> dict:
    """The runtime's one replicated job, the trainer's."""
    (replicated,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    return replicated


def pod_specs(objects: list[dict]) -> Iterator[tuple[str, dict]]:
    """(object name, pod spec) of everything that creates pods."""
    for obj in objects:
        spec = obj.get("spec", {})
        if obj["kind"] in RUNTIME_CRDS:
            yield obj["metadata"]["name"], trainer_job(obj)["template"]["spec"]["template"]["spec"]
        elif obj["kind"] == "Pod":
            yield obj["metadata"]["name"], spec
        elif obj["kind"] == "CronJob":
            yield obj["metadata"]["name"], spec["jobTemplate"]["spec"]["template"]["spec"]
        elif "template" in spec and "spec" in spec["template"]:
            yield obj["metadata"]["name"], spec["template"]["spec"]


def rules_of(role: dict) -> set[tuple[str, str, str]]:
    out = set()
    for rule in role["rules"]:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb))
    return out


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


@pytest.fixture(scope="module", params=VALUES_FILES, ids=lambda p: p.name.removesuffix("-values.yaml"))
def rendered(request, chart) -> tuple[dict, list[dict]]:
    values = load_values(request.param)
    return values, render(chart, values)


@pytest.fixture(scope="module")
def full(chart) -> list[dict]:
    return render(chart, load_values(CHART / "ci" / "full-values.yaml"))


def test_ci_values_files_cover_defaults_everything_minimal_and_both_runtime_kinds():
    assert {p.name for p in VALUES_FILES} >= {
        "default-values.yaml",
        "full-values.yaml",
        "minimal-values.yaml",
        "trainjob-values.yaml",  # ClusterTrainingRuntime, every runtime setting
        "trainjob-namespaced-values.yaml",  # TrainingRuntime
    }


# -- lint and Kubernetes schemas ------------------------------------------------------------------


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=lambda p: p.name.removesuffix("-values.yaml"))
def test_helm_lint_strict_has_no_warnings(values_file):
    report = helm.lint(CHART, load_values(values_file), strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


def test_helm_lint_reports_a_schema_violation():
    report = helm.lint(CHART, {"networkPolicy": {"enabled": "yes"}}, strict=True)
    assert report["errors"], report


def _validate(obj: dict, version: str = KUBE_VERSION) -> None:
    if obj["kind"] == "PodDefault":
        _validate_pod_default(obj)
    elif obj["kind"] in RUNTIME_CRDS:
        _validate_runtime(obj, version)
    else:
        kubernetes_validate.validate(obj, version, strict=True)


@functools.cache
def _runtime_validators(kind: str):
    return [crd_validator(crds[kind], "v1alpha1") for crds in (RUNTIME_CRDS, NEWEST_RUNTIME_CRDS)]


def _validate_runtime(obj: dict, version: str) -> None:
    """A Trainer v2 runtime: against its CRD made strict (what kubernetes-validate cannot know), then
    its trainer's Job and pod template against Kubernetes' own schemas, which the CRD leaves open."""
    version = max(version, TRAINER_OLDEST_KUBE_VERSION, key=lambda v: tuple(map(int, v.split("."))))
    errors = sorted(
        (e for validator in _runtime_validators(obj["kind"]) for e in validator.iter_errors(obj)),
        key=lambda e: list(e.path),
    )
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    job = trainer_job(obj)["template"]
    name = {"name": f"{obj['metadata']['name']}-{TRAINER_JOB}"}
    kubernetes_validate.validate(
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": name, "spec": job["spec"]}, version, strict=True
    )
    pod_template = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": name,
        "template": job["spec"]["template"],
    }
    kubernetes_validate.validate(pod_template, version, strict=True)


def _validate_pod_default(obj: dict) -> None:
    """kubernetes-validate has no PodDefault (a Kubeflow CRD): check its shape, and its env entries as
    core/v1 EnvVars by validating them inside a Pod."""
    assert obj["apiVersion"] == "kubeflow.org/v1alpha1"
    spec = obj["spec"]
    assert set(spec) <= {
        "desc",
        "selector",
        "env",
        "envFrom",
        "volumes",
        "volumeMounts",
        "serviceAccountName",
    }
    assert isinstance(spec["selector"]["matchLabels"], dict) and spec["selector"]["matchLabels"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "check"},
        "spec": {
            "containers": [
                {"name": "c", "image": "x", "env": spec.get("env", []), "envFrom": spec.get("envFrom", [])}
            ]
        },
    }
    kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("version", [KUBE_VERSION, OLDEST_KUBE_VERSION])
def test_every_object_is_valid_for_kubernetes(rendered, version):
    _, objects = rendered
    assert objects
    for obj in objects:
        _validate(obj, version)


def test_oldest_supported_kubernetes_is_the_charts():
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["kubeVersion"] == f">={OLDEST_KUBE_VERSION}-0"


def test_kubernetes_validation_catches_a_misspelt_field(full):
    job = copy.deepcopy(only(full, "Job", f"{FULLNAME}-upload"))
    job["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(job)


# -- RBAC: least privilege, nothing cluster-wide but a ClusterTrainingRuntime and reading it ----------


def test_nothing_cluster_wide_but_the_runtime_and_everything_in_the_release_namespace(rendered):
    """Cluster-wide only with Trainer v2 on a ClusterTrainingRuntime: the runtime (when the chart
    installs it) and the ClusterRole that reads it, with its binding."""
    values, objects = rendered
    runtime = runtime_values(values)
    expected = set()
    if launcher_of(values) == "trainjob" and runtime["kind"] == "ClusterTrainingRuntime":
        expected |= {"ClusterTrainingRuntime"} if runtime["create"] else set()
        expected |= (
            {"ClusterRole", "ClusterRoleBinding"} if values.get("rbac", {}).get("create", True) else set()
        )
    assert {o["kind"] for o in objects if o["kind"] in CLUSTER_SCOPED_KINDS} == expected
    for obj in objects:
        where = (obj["kind"], obj["metadata"]["name"])
        if obj["kind"] in CLUSTER_SCOPED_KINDS:
            assert "namespace" not in obj["metadata"], where
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, where


def test_launcher_role_grants_exactly_what_the_launcher_needs(rendered):
    values, objects = rendered
    role = only(objects, "Role", f"{FULLNAME}-launcher")
    # what the chart's launcher asks of the API, from its one definition, less what is cluster-wide
    assert rules_of(role) == namespaced(launcher_access(launcher_of(values)))
    binding = only(objects, "RoleBinding", f"{FULLNAME}-launcher")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    sa = values.get("serviceAccount", {})
    expected = [sa["name"]] if sa.get("create") is False else [FULLNAME]
    expected += values.get("rbac", {}).get("extraServiceAccounts", [])
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE} for name in expected
    ]
    if sa.get("create", True):
        assert only(objects, "ServiceAccount", FULLNAME)
    else:
        assert not [
            o for o in objects if o["kind"] == "ServiceAccount" and o["metadata"]["name"] == sa["name"]
        ]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("schedule", UPLOADER_SCHEDULE_RULES),
        ("submit", UPLOADER_SUBMIT_RULES),
        ("upload", UPLOADER_UPLOAD_RULES),
    ],
)
def test_upload_hook_may_only_call_the_kfp_api_it_uses(chart, mode, expected):
    objects = render(chart, {"pipelineUpload": {"enabled": True, "mode": mode}, "runConfig": RUNNABLE})
    role = only(objects, "Role", f"{FULLNAME}-uploader")
    assert rules_of(role) == expected
    binding = only(objects, "RoleBinding", f"{FULLNAME}-uploader")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": f"{FULLNAME}-uploader", "namespace": NAMESPACE}
    ]
    # The hook has no Kubernetes API token at all.
    assert only(objects, "ServiceAccount", f"{FULLNAME}-uploader")["automountServiceAccountToken"] is False
    _, spec = next(pod_specs([only(objects, "Job", f"{FULLNAME}-upload")]))
    assert spec["automountServiceAccountToken"] is False


def test_the_hooks_runs_use_the_service_account_the_launcher_role_is_bound_to(chart):
    objects = render(chart, {"pipelineUpload": {"enabled": True}, "runConfig": RUNNABLE})
    job = only(objects, "Job", f"{FULLNAME}-upload")
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    binding = only(objects, "RoleBinding", f"{FULLNAME}-launcher")
    assert env["FULLTUNE_SERVICE_ACCOUNT"] == binding["subjects"][0]["name"] == FULLNAME
    assert "KFP_NAMESPACE" in env  # from the pod: the profile namespace the runs go to


def test_lifecycle_hooks_keep_the_kfp_side_consistent(chart):
    """Install, upgrade and rollback re-apply the schedule (a rollback restores the old one); the
    schedule carries the release as its owner, so a rename deletes the old name; uninstall deletes
    every schedule of the release first. Both Jobs fit within Helm's default 5m hook timeout."""
    objects = render(chart, {"pipelineUpload": {"enabled": True}, "runConfig": RUNNABLE})
    for obj in objects:
        _validate(obj)
    upload = only(objects, "Job", f"{FULLNAME}-upload")
    assert upload["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade,post-rollback"
    args = upload["spec"]["template"]["spec"]["containers"][0]["args"]
    owner = f"--owner={NAMESPACE}/{RELEASE}"
    assert owner in args and "--name=fulltune-weekly" in args
    delete = only(objects, "Job", f"{FULLNAME}-unschedule")
    assert delete["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    container = delete["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["fulltune", "unschedule"]
    assert owner in container["args"] and "--experiment=fulltune" in container["args"]
    # the same identity as the upload (the KFP-audience token only), without the config files
    assert delete["spec"]["template"]["spec"]["serviceAccountName"] == f"{FULLNAME}-uploader"
    assert {m["name"] for m in container["volumeMounts"]} == {"tmp", "kfp-token"}
    role = only(objects, "Role", f"{FULLNAME}-uploader")
    assert ("pipelines.kubeflow.org", "jobs", "delete") in rules_of(role)
    for job in (upload, delete):
        assert job["spec"]["activeDeadlineSeconds"] < 300  # Helm's default --timeout

    submit_mode = render(
        chart, {"pipelineUpload": {"enabled": True, "mode": "submit"}, "runConfig": RUNNABLE}
    )
    assert not [o for o in submit_mode if o["metadata"]["name"] == f"{FULLNAME}-unschedule"]


@pytest.mark.parametrize("mode", ["submit", "upload"])
def test_a_mode_that_schedules_nothing_first_deletes_the_releases_recurring_runs(chart, mode):
    """A release upgraded from mode schedule to submit or upload keeps no schedule firing: before
    its upload, the hook deletes the recurring runs the release made (its owner mark), as the
    uninstall hook of mode schedule does, which the new mode no longer has."""
    values = {"pipelineUpload": {"enabled": True, "mode": mode, "host": "http://kfp:8888"}}
    objects = render(chart, {**values, "runConfig": RUNNABLE})
    upload = only(objects, "Job", f"{FULLNAME}-upload")
    _validate(upload)
    spec = upload["spec"]["template"]["spec"]
    (first,) = spec["initContainers"]
    assert first["command"] == ["fulltune", "unschedule"]
    owner = f"--owner={NAMESPACE}/{RELEASE}"
    assert first["args"] == [owner, "--experiment=fulltune", "--host=http://kfp:8888"]
    assert first["securityContext"] == spec["containers"][0]["securityContext"]
    assert first["resources"] == spec["containers"][0]["resources"]
    assert {m["name"] for m in first["volumeMounts"]} == {"tmp", "kfp-token"}
    assert spec["containers"][0]["command"] == ["fulltune", mode]

    schedule = render(chart, {"pipelineUpload": {"enabled": True}, "runConfig": RUNNABLE})
    assert "initContainers" not in only(schedule, "Job", f"{FULLNAME}-upload")["spec"]["template"]["spec"]


def test_helm_test_runs_fulltune_doctor_as_the_runs_account_with_the_release_config(chart):
    from fulltune.cli import build_parser

    objects = render(chart, {"runConfig": RUNNABLE})
    pod = only(objects, "Pod", f"{FULLNAME}-doctor")
    _validate(pod)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"  # or it never ends
    spec = pod["spec"]
    assert spec["serviceAccountName"] == FULLNAME  # the account the launcher Role is bound to
    container = spec["containers"][0]
    args = build_parser().parse_args(container["command"][1:] + container["args"])
    assert args.command == "doctor" and args.s3_secret == "fulltune-s3"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    config_volume = next(v for v in spec["volumes"] if v["name"] == mounts["/etc/fulltune/config"])
    assert config_volume["configMap"]["name"] == f"{FULLNAME}-config"
    assert args.config == "/etc/fulltune/config/config.yaml"
    assert container["envFrom"] == [{"secretRef": {"name": "fulltune-s3", "optional": True}}]

    # workload identity: no Secret, and the doctor is told so rather than checking its default name
    objects = render(chart, {"runConfig": RUNNABLE, "s3": {"existingSecret": ""}})
    container = only(objects, "Pod", f"{FULLNAME}-doctor")["spec"]["containers"][0]
    assert build_parser().parse_args(container["command"][1:] + container["args"]).s3_secret == ""
    assert "envFrom" not in container


def test_cluster_role_reads_only_the_named_cluster_training_runtime(rendered):
    """With a ClusterTrainingRuntime, the launcher's one cluster-wide need (get it, by name) and
    nothing more; with the Role, exactly what the launcher asks of the API."""
    values, objects = rendered
    cluster_roles = [o for o in objects if o["kind"] == "ClusterRole"]
    runtime = runtime_values(values)
    if launcher_of(values) != "trainjob" or runtime["kind"] != "ClusterTrainingRuntime":
        assert not cluster_roles and not [o for o in objects if o["kind"] == "ClusterRoleBinding"]
        return
    (cluster_role,) = cluster_roles
    assert cluster_role["rules"] == [
        {
            "apiGroups": [GROUP],
            "resources": ["clustertrainingruntimes"],
            "resourceNames": [runtime["name"]],
            "verbs": ["get"],
        }
    ]
    cluster_access = {(GROUP, "clustertrainingruntimes", "get")}
    role = only(objects, "Role", f"{FULLNAME}-launcher")
    assert rules_of(role) | cluster_access == set(launcher_access("trainjob"))
    binding = only(objects, "ClusterRoleBinding")
    assert binding["metadata"]["name"] == cluster_role["metadata"]["name"]
    assert NAMESPACE in cluster_role["metadata"]["name"]  # one per release and namespace
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": cluster_role["metadata"]["name"],
    }
    assert binding["subjects"] == only(objects, "RoleBinding", f"{FULLNAME}-launcher")["subjects"]


def test_rbac_can_be_left_to_the_platform(chart):
    for values in (
        {"pipelineUpload": {"enabled": True}, "runConfig": RUNNABLE},
        {"training": {"launcher": "trainjob"}},
    ):
        objects = render(chart, {"rbac": {"create": False}, **values})
        kinds = {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
        assert not [o for o in objects if o["kind"] in kinds]


# -- pods: Pod Security "restricted" ------------------------------------------------------------------


def test_every_pod_is_restricted_with_a_read_only_root_and_a_writable_tmp(rendered):
    values, objects = rendered
    specs = list(pod_specs(objects))
    if values.get("pipelineUpload", {}).get("enabled"):
        assert specs, "the upload hook's pod is missing"
    for name, spec in specs:
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, name
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod_sc.get("runAsUser", 1) != 0, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), (
                name,
                c["name"],
            )
            assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert not sc.get("privileged"), (name, c["name"])
            assert sc.get("seccompProfile", pod_sc["seccompProfile"]) == {"type": "RuntimeDefault"}
            assert sc.get("runAsNonRoot", True) is True
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1 and "emptyDir" in volumes[tmp[0]["name"]], (name, c["name"])
            for m in c.get("volumeMounts", []):
                assert "hostPath" not in volumes[m["name"]]


def test_openshift_can_assign_the_user(chart):
    objects = render(
        chart,
        {
            "pipelineUpload": {"enabled": True},
            "runConfig": RUNNABLE,
            "podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None},
        },
    )
    _, spec = next(pod_specs(objects))
    assert spec["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


# -- Kubeflow Trainer v2: the runtime ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainjob_runtime(chart) -> tuple[dict, dict]:
    """(values, runtime) of the values file that sets every runtime setting."""
    values = load_values(CHART / "ci" / "trainjob-values.yaml")
    return values, only(render(chart, values), "ClusterTrainingRuntime")


def test_no_runtime_unless_trainer_v2_is_the_launcher(chart):
    assert not runtimes(render(chart))
    objects = render(
        chart, {"training": {"launcher": "trainjob"}, "trainJob": {"runtime": {"create": False}}}
    )
    assert not runtimes(objects)
    assert only(objects, "ClusterRole")  # the launcher still reads the runtime it was told to use


def test_the_runtime_is_torch_distributed_with_one_trainer_job_of_trainer_v2s_names(rendered):
    values, objects = rendered
    found = runtimes(objects)
    runtime = runtime_values(values)
    if launcher_of(values) != "trainjob" or not runtime["create"]:
        assert not found
        return
    (obj,) = found
    assert (obj["kind"], obj["metadata"]["name"]) == (runtime["kind"], runtime["name"])
    # torch, its processes per node from each TrainJob (Trainer v2.3 has no runtime-level setting)
    assert obj["spec"]["mlPolicy"] == {"numNodes": 1, "torch": {}}
    assert set(obj["spec"]) == {"mlPolicy", "template"}  # no podGroupPolicy: no gang scheduler assumed
    replicated = trainer_job(obj)
    assert replicated["name"] == TRAINER_JOB
    assert replicated["template"]["metadata"]["labels"] == {ANCESTOR_LABEL: ANCESTOR_TRAINER}
    pod = replicated["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]  # no sshd, no MPI launcher, no initializers
    assert container["name"] == TRAINER_CONTAINER and "initContainers" not in pod
    trainer = values.get("images", {}).get("trainer", {})
    assert container["image"].startswith(trainer.get("repository", "ghcr.io/fulltune/fulltune-trainer"))
    # /dev/shm is the TrainJob's (its size is the run's): no volume of that name or mount here
    assert SHM_VOLUME not in {v["name"] for v in pod["volumes"]}
    assert "/dev/shm" not in {m["mountPath"] for m in container["volumeMounts"]}


def test_the_runtime_is_pod_security_restricted_exactly_as_the_pytorchjob_pods(rendered):
    _, objects = rendered
    for obj in runtimes(objects):
        pod = trainer_job(obj)["template"]["spec"]["template"]["spec"]
        assert pod["securityContext"].items() >= RESTRICTED_POD.items()
        for container in pod["containers"]:
            assert container["securityContext"] == RESTRICTED_CONTAINER
        tmp = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/tmp")
        assert {"name": tmp["name"], "emptyDir": {}} in pod["volumes"]


def _outcome(runtime: dict, reason: str) -> str:
    """The JobSet failurePolicy's action for a Job that failed with `reason`: the first rule that
    names it (an empty list names every reason), else RestartJobSet (JobSet's documented default)."""
    for rule in runtime["spec"]["template"]["spec"]["failurePolicy"]["rules"]:
        if not rule.get("onJobFailureReasons") or reason in rule["onJobFailureReasons"]:
            return rule["action"]
    return "RestartJobSet"


def _job_failure_reason(runtime: dict, code: int) -> str:
    """Why the trainer's Job fails when its container exits `code` (Kubernetes' Job controller): a
    FailJob rule of its podFailurePolicy that matches, else its backoffLimit (0) is exceeded."""
    job = trainer_job(runtime)["template"]["spec"]
    assert job["backoffLimit"] == 0  # one failed pod fails the Job: its peers would hang
    for rule in job["podFailurePolicy"]["rules"]:
        on = rule["onExitCodes"]
        if on["containerName"] == TRAINER_CONTAINER and (code in on["values"]) == (on["operator"] == "In"):
            return {"FailJob": "PodFailurePolicy"}[rule["action"]]
    return "BackoffLimitExceeded"


def test_exit_codes_map_to_the_jobset_failure_policy_as_the_trainer_reads_them(trainjob_runtime):
    """A permanent code (fulltune.train.exit_codes) fails the whole JobSet at once; any other failure
    restarts the group, bounded by maxRestarts; a deadline ends it."""
    values, runtime = trainjob_runtime
    job = trainer_job(runtime)["template"]["spec"]
    ((rule,),) = [job["podFailurePolicy"]["rules"]]
    assert rule == {
        "action": "FailJob",
        "onExitCodes": {
            "containerName": TRAINER_CONTAINER,
            "operator": "In",
            "values": list(PERMANENT_EXIT_CODES),
        },
    }
    assert job["template"]["spec"]["restartPolicy"] == "Never"  # what a podFailurePolicy requires
    for code in range(1, 256):
        expected = "RestartJobSet" if is_retryable(code) else "FailJobSet"
        assert _outcome(runtime, _job_failure_reason(runtime, code)) == expected, code
    assert _outcome(runtime, "DeadlineExceeded") == "FailJobSet"
    spec = runtime["spec"]["template"]["spec"]
    assert spec["failurePolicy"]["maxRestarts"] == values["trainJob"]["runtime"]["maxRestarts"]
    assert spec["ttlSecondsAfterFinished"] == values["trainJob"]["runtime"]["ttlSecondsAfterFinished"]
    assert job["activeDeadlineSeconds"] == values["trainJob"]["runtime"]["activeDeadlineSeconds"]


def test_the_runtimes_defaults(chart):
    runtime = only(render(chart, {"training": {"launcher": "trainjob"}}), "ClusterTrainingRuntime")
    spec = runtime["spec"]["template"]["spec"]
    assert (spec["failurePolicy"]["maxRestarts"], spec["ttlSecondsAfterFinished"]) == (3, 86400)
    pod = trainer_job(runtime)["template"]["spec"]["template"]
    assert "activeDeadlineSeconds" not in trainer_job(runtime)["template"]["spec"]
    assert not {"affinity", "priorityClassName", "nodeSelector", "tolerations"} & set(pod["spec"])
    labels, annotations = istio_metadata(False)
    assert (
        pod["metadata"]["labels"].items() >= labels.items() and pod["metadata"]["annotations"] == annotations
    )


def test_the_runtime_carries_the_pod_settings_a_trainjob_cannot(trainjob_runtime):
    """Affinity, priority class and the Istio sidecar (unsupported() in fulltune.launch.trainjob
    sends them here) on the pod template, with the node selector, tolerations and pull Secrets; the
    sidecar's annotations are those of the PyTorchJob's pods."""
    values, runtime = trainjob_runtime
    settings = values["trainJob"]["runtime"]
    template = trainer_job(runtime)["template"]["spec"]["template"]
    pod = template["spec"]
    assert pod["affinity"] == settings["affinity"]
    assert pod["priorityClassName"] == settings["priorityClassName"]
    assert pod["nodeSelector"] == settings["nodeSelector"]
    assert pod["tolerations"] == settings["tolerations"]
    assert pod["imagePullSecrets"] == [{"name": n} for n in values["imagePullSecrets"]]
    labels, annotations = istio_metadata(True)
    istio_labels = {k: v for k, v in template["metadata"]["labels"].items() if "istio" in k}
    assert (istio_labels, template["metadata"]["annotations"]) == (labels, annotations)


def test_the_runtime_validation_catches_a_misspelt_field(trainjob_runtime):
    runtime = copy.deepcopy(trainjob_runtime[1])
    runtime["spec"]["template"]["spec"]["failurePolicy"]["maxRestart"] = 3
    with pytest.raises(AssertionError, match="maxRestart"):
        _validate(runtime)


@pytest.mark.parametrize(
    "runtime",
    [
        {},
        {"kind": "TrainingRuntime", "name": "team-torch"},
        {"create": False, "name": "platform-torch"},
    ],
    ids=["default", "namespaced", "existing"],
)
def test_the_uploaded_defaults_name_the_runtime_the_chart_installs(chart, tmp_path, runtime):
    """A run started from the Kubeflow UI (the uploaded version's defaults) creates a TrainJob that
    references the chart's runtime, whatever its kind and name."""
    from fulltune.config import RunConfig
    from fulltune.kfp.run_parameters import ClusterPackage
    from fulltune.kfp.submit import package_file
    from fulltune.launch.trainjob import build_trainjob

    values = {
        "training": {"launcher": "trainjob"},
        "trainJob": {"runtime": runtime},
        "pipelineUpload": {"enabled": True, "mode": "upload"},
    }
    objects = render(chart, values)
    config = tmp_path / "config.yaml"
    config.write_text(only(objects, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    with package_file(PIPELINE, ClusterPackage(defaults=config)) as package:
        defaults = package.parameters["config"]["defaultValue"]
    ref = _launcher_manifest(RunConfig.from_dict(defaults), build_trainjob)["spec"]["runtimeRef"]
    expected = runtime_values(values)
    assert ref == {"apiGroup": GROUP, "kind": expected["kind"], "name": expected["name"]}
    installed = [(o["kind"], o["metadata"]["name"]) for o in runtimes(objects)]
    assert installed == ([(ref["kind"], ref["name"])] if expected["create"] else [])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"runConfig": {"resources": {"launcher": "trainjob"}}}, "set training.launcher: trainjob"),
        (
            {"training": {"launcher": "trainjob"}, "runConfig": {"resources": {"launcher": "kubernetes"}}},
            "set training.launcher: kubernetes",
        ),
        (
            {
                "training": {"launcher": "trainjob"},
                "runConfig": {"resources": {"trainjob": {"runtime": "x"}}},
            },
            "set trainJob.runtime.name and .kind",
        ),
        (
            {
                "training": {"launcher": "trainjob"},
                "runConfig": {"resources": {"trainjob": {"runtime_kind": "TrainingRuntime"}}},
            },
            "set trainJob.runtime.name and .kind",
        ),
    ],
)
def test_the_run_configuration_cannot_leave_the_launcher_or_runtime_the_rbac_serves(chart, values, message):
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(chart, values)


@pytest.mark.parametrize(
    "kubernetes",
    [
        {"affinity": {"nodeAffinity": {}}},
        {"priority_class_name": "high"},
        {"istio_sidecar": True},
        {"active_deadline_seconds": 3600},
    ],
    ids=lambda k: next(iter(k)),
)
def test_pod_settings_a_trainjob_cannot_carry_are_refused_at_install(chart, kubernetes):
    """What the launcher would refuse at run time (fulltune.launch.trainjob.unsupported) the chart
    refuses at install, naming the same trainJob.runtime value to set instead."""
    from fulltune.config import RunConfig
    from fulltune.launch.trainjob import unsupported

    cfg = {"work_dir": "s3://w", "resources": {"launcher": "trainjob", "kubernetes": kubernetes}}
    (problem,) = unsupported(RunConfig.from_dict(cfg))
    field = re.match(r"(resources\.kubernetes\.\w+)", problem).group(1)
    value = re.search(r"trainJob\.runtime\.\w+", problem).group()
    run_config = {"resources": {"kubernetes": kubernetes}}
    with pytest.raises(helm.HelmError) as err:
        render(chart, {"training": {"launcher": "trainjob"}, "runConfig": run_config})
    assert f"runConfig.{field}" in str(err.value) and f"set {value} instead" in str(err.value)
    render(chart, {"runConfig": run_config})  # a PyTorchJob carries it


# -- credentials ----------------------------------------------------------------------------------


def credential_problems(obj: dict) -> list[str]:
    """Environment variables with credential names that do not come from a Secret."""
    problems = []
    for path, node in walk(obj):
        if not isinstance(node, dict):
            continue
        for i, var in enumerate(node.get("env") or []):
            if not isinstance(var, dict) or not CREDENTIAL_NAME.search(var.get("name", "")):
                continue
            if var["name"].endswith("_PATH"):  # where a token file is, not the token
                continue
            if "value" in var or set(var.get("valueFrom", {})) != {"secretKeyRef"}:
                problems.append(f"{obj['kind']} {path}.env[{i}] {var['name']}: not from a Secret")
        for ref in node.get("envFrom") or []:
            if isinstance(ref, dict) and not set(ref) <= {"secretRef", "configMapRef", "prefix"}:
                problems.append(f"{obj['kind']} {path}.envFrom: {ref}")
    return problems


def test_credentials_come_only_from_existing_secrets(rendered):
    _, objects = rendered
    assert not [o for o in objects if o["kind"] == "Secret"], "the chart must not create Secrets"
    for obj in objects:
        assert not credential_problems(obj)
    # The run configuration names Secrets (secret_env), never holds what is in them.
    config = yaml.safe_load(only(objects, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    for path, node in walk(config):
        if isinstance(node, dict):
            assert not [k for k in node if CREDENTIAL_NAME.search(k) and k != "secret_env"], path


def test_credential_check_flags_a_key_in_clear():
    pod = {
        "kind": "Pod",
        "spec": {"containers": [{"name": "c", "env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}]}]},
    }
    assert credential_problems(pod)


def test_s3_secret_is_referenced_not_copied(full):
    pod_default = only(full, "PodDefault")
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in pod_default["spec"]["env"]}
    assert set(env) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
    assert {ref["name"] for ref in env.values()} == {"team-s3"}
    assert all(ref["key"] == name for name, ref in env.items())
    assert not env["AWS_ACCESS_KEY_ID"].get("optional") and not env["AWS_SECRET_ACCESS_KEY"].get("optional")
    assert pod_default["spec"]["selector"] == {"matchLabels": {f"{FULLNAME}-s3": "true"}}
    config = yaml.safe_load(only(full, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    assert config["resources"]["kubernetes"]["secret_env"] == ["team-s3"]


def test_pod_default_needs_the_secret_name(chart):
    with pytest.raises(helm.HelmError, match="s3.existingSecret"):
        chart.render(values={"podDefault": {"enabled": True}, "s3": {"existingSecret": ""}}, name=RELEASE)


# -- the values schema ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"bogus": 1}, "'bogus'"),
        ({"networkPolicy": {"enabeld": True}}, "'enabeld'"),
        ({"networkPolicy": {"enabled": "yes"}}, "/networkPolicy/enabled"),
        ({"pipelineUpload": {"mode": "daily"}}, "/pipelineUpload/mode"),
        ({"pipelineUpload": {"cron": "every sunday"}}, "/pipelineUpload/cron"),
        ({"workDir": {"pvc": {"size": "lots"}}}, "/workDir/pvc/size"),
        ({"images": {"trainer": {"repository": "x/trainer", "tag": "latest"}}}, "/images/trainer/tag"),
        ({"s3": {"existingSecret": "Not_A_Name"}}, "/s3/existingSecret"),
        ({"mlflow": {"existingSecret": "Not_A_Name"}}, "/mlflow/existingSecret"),
        ({"mlflow": {"trackingUri": "https://mlflow"}}, "'trackingUri'"),  # a Secret, never the values
        ({"networkPolicy": {"mlflow": {"ports": [{"port": "https"}]}}}, "/networkPolicy/mlflow/ports/0/port"),
        ({"podSecurityContext": {"runAsUser": 0}}, "/podSecurityContext/runAsUser"),
        ({"runConfig": {"training": {"learning_rte": 1e-5}}}, "'learning_rte'"),
        ({"runConfig": {"resources": {"num_nodes": "two"}}}, "/runConfig/resources/num_nodes"),
        ({"runConfig": {"resources": {"launcher": "slurm"}}}, "/runConfig/resources/launcher"),
        ({"training": {"launcher": "pytorchjob"}}, "/training/launcher"),
        ({"trainJob": {"runtime": {"kind": "Runtime"}}}, "/trainJob/runtime/kind"),
        ({"trainJob": {"runtime": {"name": "Fulltune_Torch"}}}, "/trainJob/runtime/name"),
        ({"trainJob": {"runtime": {"maxRestarts": -1}}}, "/trainJob/runtime/maxRestarts"),
        (
            {"trainJob": {"runtime": {"activeDeadlineSeconds": "2d"}}},
            "/trainJob/runtime/activeDeadlineSeconds",
        ),
        ({"trainJob": {"runtime": {"shmSize": "64Gi"}}}, "'shmSize'"),  # the run's, in the TrainJob
        ({"trainJob": {"runtime": {"affinity": {"nodeAfinity": {}}}}}, "'nodeAfinity'"),
    ],
)
def test_schema_refuses_unknown_values_and_wrong_types(chart, values, where):
    with pytest.raises(helm.HelmValuesError) as err:
        chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    assert where in str(err.value)


@pytest.mark.parametrize("run_config", [{}, {"model": {"base_model_uri": "s3://m/llama"}}])
def test_a_hook_that_starts_runs_needs_a_model_and_data(chart, run_config):
    """The chart's default runConfig is {}: with the upload hook on, the install would schedule runs
    with no model and no data every week. The schema refuses it at `helm install`."""
    with pytest.raises(helm.HelmValuesError) as err:
        chart.render(values={"pipelineUpload": {"enabled": True}, "runConfig": run_config}, name=RELEASE)
    assert "runConfig" in str(err.value)
    render(chart, {"runConfig": run_config})  # without the hook, nothing runs: accepted
    # only uploading the pipeline starts nothing either: the UI's form asks for the model and data
    render(chart, {"pipelineUpload": {"enabled": True, "mode": "upload"}, "runConfig": run_config})


def test_schema_is_strict_at_the_top():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(defaults) <= set(schema["properties"])


def _runconfig_defs() -> dict[str, Any]:
    from fulltune.config import RunConfig

    generated = RunConfig.model_json_schema()
    defs = generated.pop("$defs")
    defs["RunConfig"] = generated
    return defs


def test_schema_runconfig_matches_fulltune_config():
    """values.schema.json checks runConfig with the RunConfig schema of this source's fulltune."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    stale = {k: v for k, v in _runconfig_defs().items() if schema["$defs"].get(k) != v}
    assert not stale, (
        f"stale RunConfig schema ({sorted(stale)}): run `.venv/bin/python tests/test_chart.py --write-schema`"
    )


def write_schema() -> None:
    """Replace the RunConfig part of values.schema.json's $defs with the current one."""
    path = CHART / "values.schema.json"
    schema = json.loads(path.read_text())
    previous = _previous_generated_names(schema)
    chart_defs = {k: v for k, v in schema["$defs"].items() if k not in previous}
    generated = _runconfig_defs()
    clash = set(chart_defs) & set(generated)
    if clash:
        raise SystemExit(f"chart $defs clash with RunConfig models: {sorted(clash)}")
    schema["$defs"] = {**chart_defs, **dict(sorted(generated.items()))}
    path.write_text(json.dumps(schema, indent=2) + "\n")


def _previous_generated_names(schema: dict) -> set[str]:
    """$defs names that came from RunConfig: those reachable from $defs/RunConfig."""
    defs, seen, todo = schema["$defs"], set(), ["RunConfig"]
    while todo:
        name = todo.pop()
        if name in seen or name not in defs:
            continue
        seen.add(name)
        todo += re.findall(r'"#/\$defs/([^"]+)"', json.dumps(defs[name]))
    return seen


# -- the default RunConfig ----------------------------------------------------------------------------


def test_configmap_holds_a_valid_runconfig_for_the_charts_launcher(rendered):
    from fulltune.config import RunConfig

    values, objects = rendered
    text = only(objects, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"]
    config = RunConfig.from_dict(yaml.safe_load(text))
    k8s = config.resources.kubernetes
    assert config.resources.launcher == launcher_of(values)
    if launcher_of(values) == "trainjob":
        runtime = runtime_values(values)
        assert (config.resources.trainjob.runtime, config.resources.trainjob.runtime_kind) == (
            runtime["name"],
            runtime["kind"],
        )
    trainer = values.get("images", {}).get("trainer", {})
    assert k8s.image.startswith(trainer.get("repository", "ghcr.io/fulltune/fulltune-trainer"))
    secret = values.get("s3", {}).get("existingSecret", "fulltune-s3")
    assert k8s.secret_env == ([secret] if secret else [])


def test_runconfig_values_are_kept_and_win_over_the_chart(full, chart):
    from fulltune.config import RunConfig

    config = RunConfig.from_dict(
        yaml.safe_load(only(full, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    )
    assert config.training.learning_rate == pytest.approx(1e-5)
    assert config.resources.num_nodes == 2 and config.resources.nproc_per_node == 8
    assert config.resources.kubernetes.image == "registry.example.com/mirror/fulltune-trainer:0.1.0-cu128"
    assert [(v.claim_name, v.mount_path) for v in config.resources.kubernetes.volumes] == [
        (f"{FULLNAME}-work", "/mnt/fulltune")
    ]
    assert config.resources.kubernetes.tolerations[0].key == "nvidia.com/gpu"

    objects = render(
        chart, {"runConfig": {"resources": {"launcher": "local", "kubernetes": {"image": "my/trainer:1"}}}}
    )
    config = RunConfig.from_dict(
        yaml.safe_load(only(objects, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    )
    assert config.resources.launcher == "local"
    assert config.resources.kubernetes.image == "my/trainer:1"


def test_default_images_are_the_package_version():
    """The chart's appVersion is the fulltune version: the images it names are the ones
    `make images` builds and the compiled pipeline references."""
    from fulltune import __version__
    from fulltune._image import DEFAULT_REPOSITORY

    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert meta["appVersion"] == __version__
    assert values["images"]["runtime"]["repository"] == DEFAULT_REPOSITORY
    assert values["images"]["trainer"]["repository"] == f"{DEFAULT_REPOSITORY}-trainer"


# -- work directory ---------------------------------------------------------------------------------


def test_work_directory_claim_is_rwx_and_kept(full):
    pvc = only(full, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == f"{FULLNAME}-work"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "2Ti"
    assert pvc["spec"]["storageClassName"] == "efs-sc"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_existing_claim_is_mounted_not_created(chart):
    from fulltune.config import RunConfig

    objects = render(
        chart, {"workDir": {"pvc": {"enabled": True, "existingClaim": "shared-nfs", "mountPath": "/work"}}}
    )
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    config = RunConfig.from_dict(
        yaml.safe_load(only(objects, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    )
    assert [(v.claim_name, v.mount_path) for v in config.resources.kubernetes.volumes] == [
        ("shared-nfs", "/work")
    ]


def uploaded_as_compiled(settings, tmp_path, **compile_options) -> list[dict]:
    """The package uploaded with `settings` (a `ClusterPackage`), checked to be the one compiling
    with `compile_options` makes."""
    from fulltune.kfp.compile import compile_pipeline
    from fulltune.kfp.submit import package_file

    with package_file(PIPELINE, settings) as package:
        uploaded = list(yaml.safe_load_all(package.path.read_text()))
    compiled = compile_pipeline(tmp_path / "compiled.yaml", **compile_options)
    assert uploaded == list(yaml.safe_load_all(compiled.read_text()))
    return uploaded


def test_the_work_volume_is_mounted_into_every_step_pod_of_the_uploaded_pipeline(chart, tmp_path):
    """A work_dir on the chart's volume is written by the steps too (shards, plan, evaluation): the
    hook uploads the pipeline with the claim mounted where the training pods mount it, the same
    package `fulltune compile --work-pvc` makes; without the volume nothing is mounted."""
    from fulltune.cli import build_parser
    from fulltune.kfp.compile import compile_pipeline
    from fulltune.kfp.run_parameters import ClusterPackage
    from fulltune.kfp.submit import package_file

    values = {"pipelineUpload": {"enabled": True, "mode": "upload"}}
    volume = {"workDir": {"pvc": {"enabled": True, "existingClaim": "shared-nfs", "mountPath": "/work"}}}
    _, _, container = _job_container(render(chart, {**values, **volume}))
    upload = build_parser().parse_args(container["command"][1:] + container["args"])
    assert upload.work_pvc == "shared-nfs:/work"
    settings = ClusterPackage(s3_secret=upload.s3_secret, work_pvc=upload.work_pvc)
    uploaded = uploaded_as_compiled(settings, tmp_path, work_pvc="shared-nfs:/work")
    executors = uploaded[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    steps = uploaded[0]["deploymentSpec"]["executors"]
    assert {name for name in steps if executors[name]["pvcMount"][0]["mountPath"] == "/work"} == set(steps)

    _, _, container = _job_container(render(chart, values))
    assert build_parser().parse_args(container["command"][1:] + container["args"]).work_pvc is None
    mounted = compile_pipeline(tmp_path / "mounted.yaml", work_pvc="shared-nfs:/work")
    with package_file(mounted, ClusterPackage(work_pvc="")) as package:  # '' takes the mount away
        assert list(yaml.safe_load_all(package.path.read_text())) == list(
            yaml.safe_load_all(PIPELINE.read_text())
        )


# -- network policy ---------------------------------------------------------------------------------


def test_network_policy_isolates_training_pods(full):
    policy = only(full, "NetworkPolicy")["spec"]
    selector = policy["podSelector"]
    # The labels the launcher gives its PyTorchJob's pods (fulltune.launch.pytorchjob), and one the
    # Training Operator adds: other teams' jobs and the chart's own pods are not selected.
    assert selector["matchLabels"] == {
        "app.kubernetes.io/name": "fulltune",
        "app.kubernetes.io/component": "train",
    }
    assert selector["matchExpressions"] == [{"key": "training.kubeflow.org/job-name", "operator": "Exists"}]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    # Ingress: only from the other training pods (rendezvous 23456/29500 and NCCL's ephemeral ports).
    assert policy["ingress"] == [{"from": [{"podSelector": selector}]}]
    egress = policy["egress"]
    assert {"to": [{"podSelector": selector}]} in egress
    dns = [r for r in egress if any("namespaceSelector" in p and "podSelector" in p for p in r.get("to", []))]
    assert len(dns) == 1 and sorted((p["port"], p["protocol"]) for p in dns[0]["ports"]) == [
        (53, "TCP"),
        (53, "UDP"),
    ]
    store = [r for r in egress if r not in dns and r != {"to": [{"podSelector": selector}]}]
    assert store == [
        {
            "ports": [{"port": 9000, "protocol": "TCP"}],
            "to": [
                {"ipBlock": {"cidr": "10.20.0.0/16"}},
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "minio"}}},
            ],
        }
    ]
    for rule in egress:  # no rule that opens everything
        assert rule.get("to") or rule.get("ports")


def test_network_policy_lets_sidecars_reach_istiod_only_when_the_mesh_is_on(chart):
    """Training pods opt out of the sidecar by default, so istiod is not reachable; with the mesh on
    (pods with sidecars) their proxies may reach istiod's xDS port, and nothing more opens."""
    default = only(render(chart), "NetworkPolicy")["spec"]["egress"]
    assert not any(p.get("port") == 15012 for rule in default for p in rule.get("ports", []))
    objects = render(chart, {"networkPolicy": {"mesh": {"enabled": True}}})
    policy = only(objects, "NetworkPolicy")
    _validate(policy)
    istiod = [r for r in policy["spec"]["egress"] if {"port": 15012, "protocol": "TCP"} in r.get("ports", [])]
    assert istiod == [
        {
            "to": [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "istio-system"}},
                    "podSelector": {"matchLabels": {"app": "istiod"}},
                }
            ],
            "ports": [{"port": 15012, "protocol": "TCP"}],
        }
    ]
    assert len(policy["spec"]["egress"]) == len(default) + 1


def test_every_pod_the_chart_creates_fits_a_profile_quota(full):
    """A Kubeflow profile's ResourceQuota counts requests and, with limits.* set, needs limits: every
    container of the chart's pods has CPU and memory in both."""
    for where, pod in pod_specs(full):
        for c in pod["containers"]:
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), (
                    where,
                    c["name"],
                    kind,
                )


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        present = expr["key"] in labels
        ok = {
            "Exists": present,
            "DoesNotExist": not present,
            "In": present and labels[expr["key"]] in expr.get("values", []),
            "NotIn": not present or labels[expr["key"]] not in expr.get("values", []),
        }[expr["operator"]]
        if not ok:
            return False
    return True


def _chart_config(objects: list[dict]):
    """The default RunConfig the chart rendered."""
    from fulltune.config import RunConfig

    return RunConfig.from_dict(
        yaml.safe_load(only(objects, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    )


def _launcher_manifest(cfg, build) -> dict:
    """The job the launcher would create for `cfg` (build: build_pytorchjob or build_trainjob)."""
    from fulltune.launch.base import TrainJob
    from fulltune.train.args import TrainerArgs

    job = TrainJob(
        "train",
        TrainerArgs("s3://w/c.json", "s3://w/ds.json", "s3://w/data", "s3://w/model", "s3://w/m.json"),
        num_nodes=cfg.resources.num_nodes,
        nproc_per_node=cfg.resources.nproc_per_node,
    )
    return build(
        cfg,
        job,
        name="fulltune-train-0123456789",
        namespace=NAMESPACE,
        image=cfg.resources.kubernetes.image,
        run_id="run-1",
    )


def test_network_policy_selects_the_pods_the_launcher_builds(full):
    """From the chart's own default RunConfig, the launcher's PyTorchJob pods (plus the label the
    Training Operator adds) are selected; the chart's upload hook pod is not."""
    from fulltune.launch.pytorchjob import build_pytorchjob

    manifest = _launcher_manifest(_chart_config(full), build_pytorchjob)
    selector = only(full, "NetworkPolicy")["spec"]["podSelector"]
    for replica in manifest["spec"]["pytorchReplicaSpecs"].values():
        labels = dict(replica["template"]["metadata"]["labels"])
        assert not _selects(selector, labels), "selected before the operator made it a pod of a job"
        labels["training.kubeflow.org/job-name"] = manifest["metadata"]["name"]
        assert _selects(selector, labels)
    hook_labels = only(full, "Job", f"{FULLNAME}-upload")["spec"]["template"]["metadata"]["labels"]
    assert not _selects(selector, hook_labels)


def test_network_policy_selects_the_pods_of_the_charts_trainjob_runtime(chart):
    """With Trainer v2, the runtime's pods (plus the label JobSet adds to every pod it creates) are
    selected, and the upload hook's pod is not; a selector in the values replaces the launcher's."""
    objects = render(chart, load_values(CHART / "ci" / "trainjob-values.yaml"))
    selector = only(objects, "NetworkPolicy")["spec"]["podSelector"]
    labels = dict(
        trainer_job(only(objects, "ClusterTrainingRuntime"))["template"]["spec"]["template"]["metadata"][
            "labels"
        ]
    )
    assert not _selects(selector, labels), "selected before JobSet made it a pod of a job"
    labels[JOBSET_LABEL] = "fulltune-train-0123456789"
    assert _selects(selector, labels)
    hook_labels = only(objects, "Job", f"{FULLNAME}-upload")["spec"]["template"]["metadata"]["labels"]
    assert not _selects(selector, hook_labels)
    own = {"matchLabels": {"team": "a", "role": "trainer"}}
    policy = only(render(chart, {"networkPolicy": {"trainingPodSelector": own}}), "NetworkPolicy")
    assert policy["spec"]["podSelector"] == own == policy["spec"]["ingress"][0]["from"][0]["podSelector"]


def test_network_policy_lets_training_pods_reach_mlflow_only_when_told(chart):
    """Training pods report to MLflow from inside the NetworkPolicy: networkPolicy.mlflow opens
    egress to its server (peers, ports or both), and nothing opens without it."""
    default = only(render(chart), "NetworkPolicy")["spec"]["egress"]
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mlflow"}}}
    port = {"port": 5000, "protocol": "TCP"}
    for setting, rule in [
        ({"to": [peer], "ports": [port]}, {"ports": [port], "to": [peer]}),
        ({"ports": [port]}, {"ports": [port]}),
        ({"to": [peer]}, {"to": [peer]}),
    ]:
        policy = only(render(chart, {"networkPolicy": {"mlflow": setting}}), "NetworkPolicy")
        _validate(policy)
        egress = policy["spec"]["egress"]
        assert [r for r in egress if r not in default] == [rule], setting
        assert len(egress) == len(default) + 1


def test_network_policy_takes_the_clusters_own_egress_rules(chart):
    """Workload identity without an S3 Secret fetches credentials from a node-local endpoint on port
    80 (EKS Pod Identity), which the policy's object-store rule does not open: networkPolicy.extraEgress
    adds it, after the chart's rules and validated with them."""
    default = only(render(chart), "NetworkPolicy")["spec"]["egress"]
    identity = {
        "to": [{"ipBlock": {"cidr": "169.254.170.23/32"}}],
        "ports": [{"port": 80, "protocol": "TCP"}],
    }
    policy = only(render(chart, {"networkPolicy": {"extraEgress": [identity]}}), "NetworkPolicy")
    _validate(policy)
    assert policy["spec"]["egress"] == [*default, identity]
    with pytest.raises(Exception, match="extraEgress"):
        render(chart, {"networkPolicy": {"extraEgress": [{"too": []}]}})


def test_network_policy_can_be_turned_off(chart):
    assert not [
        o for o in render(chart, {"networkPolicy": {"enabled": False}}) if o["kind"] == "NetworkPolicy"
    ]


# -- the pipeline upload hook -------------------------------------------------------------------------


def test_chart_ships_the_compiled_pipeline():
    with helm.Chart.load(CHART) as loaded:
        shipped = {f["name"]: f["data"] for f in loaded.files}
    assert "files/full_finetune.yaml" in shipped, "the chart lost files/full_finetune.yaml"
    assert shipped["files/full_finetune.yaml"] == PIPELINE.read_text(), "stale pipeline in the chart"


def test_packaged_chart_carries_the_pipeline_itself(tmp_path):
    """`helm package` resolves the link: the archive holds the file's content, not a link."""
    import tarfile

    archive = helm.package(CHART, destination=tmp_path)
    with tarfile.open(archive) as tar:
        member = tar.getmember("fulltune/files/full_finetune.yaml")
        assert member.isfile()
        assert tar.extractfile(member).read() == PIPELINE.read_bytes()
        assert not [m for m in tar.getnames() if m.startswith("fulltune/ci/")]
    with helm.Chart.load(archive) as packaged:
        objects = render(packaged, {"pipelineUpload": {"enabled": True}, "runConfig": RUNNABLE})
    assert (
        only(objects, "ConfigMap", f"{FULLNAME}-pipeline")["data"]["full_finetune.yaml"]
        == PIPELINE.read_text()
    )


def test_upload_configmap_carries_the_pipeline_byte_for_byte(full, tmp_path):
    """Same bytes, same pipeline version name: the hook and `fulltune submit` agree on the version."""
    from fulltune.kfp.submit import read_package

    data = only(full, "ConfigMap", f"{FULLNAME}-pipeline")["data"]["full_finetune.yaml"]
    assert data == PIPELINE.read_text()
    copy_path = tmp_path / "full_finetune.yaml"
    copy_path.write_text(data)
    assert read_package(copy_path).version_name == read_package(PIPELINE).version_name


def _job_container(objects):
    job = only(objects, "Job", f"{FULLNAME}-upload")
    _, spec = next(pod_specs([job]))
    return job, spec, spec["containers"][0]


def test_upload_hook_runs_fulltune_schedule_with_the_shipped_files(full):
    from fulltune.cli import build_parser

    job, spec, container = _job_container(full)
    hooks = set(job["metadata"]["annotations"]["helm.sh/hook"].split(","))
    assert hooks == {"post-install", "post-upgrade", "post-rollback"}  # a rollback restores the schedule
    assert "before-hook-creation" in job["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
    assert container["image"] == (
        "registry.example.com/mirror/fulltune@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    )
    assert container["imagePullPolicy"] == "Always"
    args = build_parser().parse_args(container["command"][1:] + container["args"])
    assert args.command == "schedule"
    assert (args.name, args.cron, args.experiment) == ("clinical-weekly", "0 3 * * 0", "clinical")
    assert args.host == "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
    assert not args.paused
    assert args.owner == f"{NAMESPACE}/{RELEASE}"  # its other schedules go when it is renamed
    # The files it reads are the ConfigMaps' keys, mounted where the arguments say.
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts[str(Path(args.params).parent)]["configMap"]["name"] == f"{FULLNAME}-config"
    assert Path(args.params).name == "config.yaml"
    assert mounts[str(Path(args.package).parent)]["configMap"]["name"] == f"{FULLNAME}-pipeline"
    assert Path(args.package).name == "full_finetune.yaml"
    assert args.defaults == args.params  # the uploaded version's form starts from the same settings
    # the uploaded version pulls the chart's images and reads the chart's Secret
    assert args.image == container["image"] and args.trainer_image.startswith("registry.example.com/")
    assert args.s3_secret == load_values(CHART / "ci" / "full-values.yaml")["s3"]["existingSecret"]
    assert args.mlflow_secret == load_values(CHART / "ci" / "full-values.yaml")["mlflow"]["existingSecret"]
    # Auth: a projected token for the KFP audience, where kfp looks for it.
    env = {e["name"]: e for e in container["env"]}
    token_dir = env["KF_PIPELINES_SA_TOKEN_PATH"]["value"].rsplit("/", 1)[0]
    projected = mounts[token_dir]["projected"]["sources"][0]["serviceAccountToken"]
    assert projected["audience"] == "pipelines.kubeflow.org"
    assert env["KFP_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_the_mlflow_secret_reaches_the_uploaded_pipeline_and_helm_test_only_when_set(chart, tmp_path):
    """mlflow.existingSecret: the hook uploads the pipeline with it on the steps that report to
    MLflow and the training pods (`--mlflow-secret`, as `fulltune compile --mlflow-secret` would have
    compiled it), and `helm test` checks it; unset, neither mentions MLflow."""
    from fulltune.cli import build_parser
    from fulltune.kfp.cluster import MLFLOW_STEPS
    from fulltune.kfp.run_parameters import ClusterPackage

    def hook_and_doctor(values: dict):
        objects = render(chart, {"pipelineUpload": {"enabled": True, "mode": "upload"}, **values})
        _, _, container = _job_container(objects)
        doctor = only(objects, "Pod", f"{FULLNAME}-doctor")["spec"]["containers"][0]
        parse = build_parser().parse_args
        return (
            container["args"],
            parse(container["command"][1:] + container["args"]),
            parse(doctor["command"][1:] + doctor["args"]),
        )

    raw, upload, doctor = hook_and_doctor({"mlflow": {"existingSecret": "team-mlflow"}})
    assert "--mlflow-secret=team-mlflow" in raw
    assert (upload.mlflow_secret, doctor.mlflow_secret) == ("team-mlflow", "team-mlflow")
    settings = ClusterPackage(s3_secret=upload.s3_secret, mlflow_secret=upload.mlflow_secret)
    uploaded = uploaded_as_compiled(settings, tmp_path, mlflow_secret="team-mlflow")
    executors = uploaded[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    reading = {
        name
        for name, e in executors.items()
        if "team-mlflow" in [s["secretName"] for s in e.get("secretAsEnv", [])]
    }
    assert reading == {f"exec-{step}" for step in MLFLOW_STEPS}
    train = uploaded[0]["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]
    assert train["mlflow_secret"]["runtimeValue"]["constant"] == "team-mlflow"  # the training pods'

    raw, upload, doctor = hook_and_doctor({})
    assert not [a for a in raw if a.startswith("--mlflow-secret")]
    assert (upload.mlflow_secret, doctor.mlflow_secret) == (None, "")  # the package's own: none


def test_upload_hook_can_submit_a_run_instead(chart):
    from fulltune.cli import build_parser

    objects = render(chart, load_values(CHART / "ci" / "submit-values.yaml"))
    _, spec, container = _job_container(objects)
    args = build_parser().parse_args(container["command"][1:] + container["args"])
    assert args.command == "submit" and args.host is None and not args.wait
    assert spec["serviceAccountName"] == "pipeline-runner"
    assert not [
        o for o in objects if o["kind"] == "ServiceAccount" and o["metadata"]["name"].endswith("uploader")
    ]


def test_upload_hook_params_pass_fulltune_validation(full, tmp_path):
    from fulltune.kfp.run_parameters import ClusterPackage
    from fulltune.kfp.submit import build_run_request, package_file

    path = tmp_path / "config.yaml"
    path.write_text(only(full, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    with package_file(PIPELINE, ClusterPackage(defaults=path)) as package:
        request = build_run_request(package, path, [])
    assert request.config.model.name == "llama-3.1-8b-clinical"
    # the chart's schedule: each weekly cycle reads its own week, judged against production
    with package_file(PIPELINE, ClusterPackage(defaults=path)) as package:
        scheduled = build_run_request(package, path, [], scheduled=True)
    assert scheduled.parameters["train_uri"] == "s3://ml-data/clinical-notes/dt={date}/*.jsonl.gz"
    assert scheduled.config.data.window_days == 7 and scheduled.config.evaluation.compare_to == "registered"
    assert request.parameters["model_name"] == "llama-3.1-8b-clinical"  # what the UI shows for the run


def test_upload_mode_only_uploads_the_pipeline_with_the_clusters_settings_as_its_defaults(chart, tmp_path):
    from fulltune.cli import build_parser
    from fulltune.kfp.run_parameters import ClusterPackage
    from fulltune.kfp.submit import package_file

    values = {
        "pipelineUpload": {"enabled": True, "mode": "upload"},
        "runConfig": {"work_dir": "s3://team/work"},
    }
    objects = render(chart, values)
    _, _, container = _job_container(objects)
    args = build_parser().parse_args(container["command"][1:] + container["args"])
    assert args.command == "upload" and args.defaults == "/etc/fulltune/config/config.yaml"
    assert not [o for o in objects if o["kind"] == "Job" and o["metadata"]["name"].endswith("-unschedule")]
    config = tmp_path / "config.yaml"
    config.write_text(only(objects, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    with package_file(PIPELINE, ClusterPackage(defaults=config)) as package:
        defaults = package.parameters["config"]["defaultValue"]
    assert defaults["work_dir"] == "s3://team/work"
    assert defaults["resources"]["launcher"] == "kubernetes"  # the chart's own additions too
    assert defaults["resources"]["kubernetes"]["secret_env"] == ["fulltune-s3"]


def test_no_upload_hook_by_default(chart):
    objects = render(chart)
    assert not [o for o in objects if o["kind"] in ("Job", "PodDefault", "PersistentVolumeClaim")]
    assert not [o for o in objects if o["metadata"]["name"] == f"{FULLNAME}-pipeline"]


# -- the chart README -----------------------------------------------------------------------------


def _value_paths(node: dict, prefix: str = "") -> Iterator[str]:
    """Dotted paths of values.yaml; free-form maps (labels, selectors, runConfig...) are one value."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        yield path
        if isinstance(value, dict) and value and not _free_form(path):
            yield from _value_paths(value, path + ".")


def _free_form(path: str) -> bool:
    last = path.rsplit(".", 1)[-1]
    return last in {
        "annotations",
        "podAnnotations",
        "commonLabels",
        "nodeSelector",
        "resources",
        "runConfig",
    } or (last.endswith("Selector"))


def test_readme_lists_every_value():
    readme = (CHART / "README.md").read_text().split("\n## Values\n", 1)[1]
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, re.M))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [p for p in _value_paths(values) if p not in documented]
    assert not missing, f"charts/fulltune/README.md does not list: {missing}"
    unknown = [p for p in documented if p not in set(_value_paths(values))]
    assert not unknown, f"README lists values that do not exist: {unknown}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-schema"]:
        write_schema()
    else:
        raise SystemExit(__doc__)
