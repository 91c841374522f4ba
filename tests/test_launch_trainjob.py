"""The TrainJob launcher (Kubeflow Trainer v2): manifests checked against the TrainJob CRD made strict,
the pod the Trainer builds from them checked against Kubernetes' schema, and the launcher driven through
the real kubernetes client against the stateful stand-in API (tests/k8s_standin.py), whose JobSet
applies the failure policy of the runtime the Helm chart installs."""

from __future__ import annotations

import copy
import io
import logging
import threading
from pathlib import Path

import kubernetes_validate
import pytest

from fulltune.config import ConfigError, RunConfig
from fulltune.launch.base import LaunchError, TrainJob
from fulltune.launch.kubernetes import KubernetesLauncher, LaunchCancelled, launcher_access
from fulltune.launch.pytorchjob import RESTRICTED_CONTAINER, workflow_owner
from fulltune.launch.secret_env import SECRET_ENV_DIRS
from fulltune.launch.trainjob import (
    PATCH_MANAGER,
    SHM_VOLUME,
    TRAINER_CONTAINER,
    TRAINER_JOB,
    build_trainjob,
)
from fulltune.train.args import TrainerArgs
from k8s_standin import FakeKube
from support.crd_schema import TRAINJOB_CRDS, crd_schema
from support.crd_schema import crd_validator as support_crd_validator
from test_launch_kubernetes import launcher as pytorchjob_tests_launcher

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "tests" / "data" / "crds" / "trainer.kubeflow.org_trainjobs.yaml"
NS = "team-a"
NAME = "fulltune-train-0123456789"


def make_cfg(**resources) -> RunConfig:
    base = {"work_dir": "s3://bucket/runs/r1", "resources": {"launcher": "trainjob", **resources}}
    return RunConfig.from_dict(base)


def make_job(cfg: RunConfig) -> TrainJob:
    r = cfg.resources
    return TrainJob(
        name=NAME,
        args=TrainerArgs(
            config="s3://bucket/runs/r1/plan/config.yaml",
            deepspeed="s3://bucket/runs/r1/plan/ds_config.json",
            dataset="s3://bucket/runs/r1/data/dataset.json",
            output="s3://bucket/runs/r1/train/model",
            metrics="s3://bucket/runs/r1/train/metrics.jsonl",
            checkpoints="s3://bucket/runs/r1/train/checkpoints",
        ),
        num_nodes=r.num_nodes,
        nproc_per_node=r.nproc_per_node,
        accelerator=r.accelerator,
    )


def manifest_for(resources: dict, **kwargs) -> dict:
    cfg = make_cfg(**resources)
    return build_trainjob(
        cfg, make_job(cfg), name=NAME, namespace=NS, image="img:1", run_id="run-1", **kwargs
    )


EVERYTHING = {
    "num_nodes": 4,
    "nproc_per_node": 8,
    "trainjob": {"runtime": "team-runtime", "runtime_kind": "TrainingRuntime"},
    "kubernetes": {
        "service_account_name": "trainer",
        "node_selector": {"nvidia.com/gpu.product": "H100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "volumes": [
            {"claim_name": "work", "mount_path": "/work"},
            {"claim_name": "models", "mount_path": "/models", "read_only": True},
        ],
        "secret_env": ["hf-token"],
        "cpu": "96",
        "memory": "1000Gi",
        "shm_size": "64Gi",
        "ephemeral_storage": "120Gi",
    },
}
VARIANTS = {
    "1-node-gpu": {"num_nodes": 1, "nproc_per_node": 4},
    "2-nodes-cpu": {"num_nodes": 2, "nproc_per_node": 1, "accelerator": "cpu"},
    "everything": EVERYTHING,
}


@pytest.fixture(scope="module")
def runtime() -> dict:
    """The runtime fulltune's Helm chart installs, rendered by the real Helm engine with a restart
    bound of 2 (the chart's own tests check the rendering itself): what the stand-in's JobSet applies
    and the effective pod is built from."""
    from test_chart import CHART, helm, render

    values = {"training": {"launcher": "trainjob"}, "trainJob": {"runtime": {"maxRestarts": 2}}}
    with helm.Chart.load(CHART) as chart:
        objects = render(chart, values)
    return next(o for o in objects if o["kind"] == "ClusterTrainingRuntime")


# The TrainJob CRD of each Kubeflow Trainer release and the field through which its TrainJob patches
# the runtime's pods; "shared" is the project's copy (tests/data/crds).
RELEASES = {
    "shared": (CRD, "podSpecOverrides"),
    **{
        release: (path, field)
        for (release, path), field in zip(
            TRAINJOB_CRDS.items(), ("podSpecOverrides", "podTemplateOverrides", "runtimePatches"), strict=True
        )
    },
}


def pod_patch_of(trainjob: dict) -> tuple[list[dict], dict]:
    """(the replicated jobs it targets, the patch of their pods) of a TrainJob, whichever field
    carries it."""
    spec = trainjob["spec"]
    if "podSpecOverrides" in spec:
        ((override,),) = (spec["podSpecOverrides"],)
        return override["targetJobs"], {k: v for k, v in override.items() if k != "targetJobs"}
    if "podTemplateOverrides" in spec:
        (override,) = spec["podTemplateOverrides"]
        return override["targetJobs"], override["spec"]
    (patch,) = spec["runtimePatches"]
    assert patch["manager"] == PATCH_MANAGER
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    return [{"name": job["name"]}], job["template"]["spec"]["template"]["spec"]


def pod_labels_of(trainjob: dict) -> dict:
    """The labels a TrainJob's patch adds to its pods ({} where the release's field has no pod
    metadata: v2.0's podSpecOverrides). The TrainJob's own and its JobSet's labels stay on the JobSet:
    JobSet copies none of its labels to its Jobs or pods."""
    spec = trainjob["spec"]
    if "podTemplateOverrides" in spec:
        (override,) = spec["podTemplateOverrides"]
        return (override.get("metadata") or {}).get("labels") or {}
    if "runtimePatches" in spec:
        (patch,) = spec["runtimePatches"]
        (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
        return (job["template"]["spec"]["template"].get("metadata") or {}).get("labels") or {}
    return {}


def effective_pod(runtime: dict, trainjob: dict, node_rank: int = 0) -> dict:
    """The pod the Trainer and JobSet make for one node: the runtime's template, the TrainJob's
    `trainer` on the trainer container, its patch of the pod, and the PET_* variables of torch."""
    (replicated,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    pod = copy.deepcopy(replicated["template"]["spec"]["template"])
    spec, trainer = pod["spec"], trainjob["spec"]["trainer"]
    container = next(c for c in spec["containers"] if c["name"] == TRAINER_CONTAINER)
    container.update(
        image=trainer["image"], command=trainer["command"], resources=trainer["resourcesPerNode"]
    )
    pet = {
        "PET_NNODES": str(trainer["numNodes"]),
        "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
        "PET_NODE_RANK": str(node_rank),
        "PET_MASTER_ADDR": f"{trainjob['metadata']['name']}-{TRAINER_JOB}-0-0.{trainjob['metadata']['name']}",
        "PET_MASTER_PORT": "29500",
    }
    container["env"] = trainer["env"] + [{"name": k, "value": v} for k, v in pet.items()]
    targets, patch = pod_patch_of(trainjob)
    assert targets == [{"name": replicated["name"]}]
    pod["metadata"]["labels"] = {**pod["metadata"].get("labels", {}), **pod_labels_of(trainjob)}
    for key in ("serviceAccountName", "nodeSelector", "tolerations"):
        if key in patch:
            spec[key] = patch[key]
    spec["volumes"] = spec.get("volumes", []) + patch.get("volumes", [])
    for change in patch.get("containers", []):
        target = next(c for c in spec["containers"] if c["name"] == change["name"])
        target["volumeMounts"] = target.get("volumeMounts", []) + change.get("volumeMounts", [])
    return pod


@pytest.fixture(scope="module")
def crd_validator():
    return support_crd_validator(CRD, "v1alpha1")


def validate(validator, runtime: dict, manifest: dict) -> None:
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    pod_template = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": f"{manifest['metadata']['name']}-node"},
        "template": effective_pod(runtime, manifest),
    }
    kubernetes_validate.validate(pod_template, "1.30", strict=True)


# -- manifests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("release", sorted(RELEASES))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_trainjob_validates_against_each_releases_crd_and_makes_a_valid_pod(runtime, variant, release):
    crd, field = RELEASES[release]
    owner = workflow_owner("full-finetune-abc12", "6f0c1f5e-0000-4000-8000-000000000001")
    manifest = manifest_for(
        VARIANTS[variant], owner=owner, optional_secrets=("fulltune-s3",), overrides_field=field
    )
    validate(support_crd_validator(crd, "v1alpha1"), runtime, manifest)


def test_the_config_offers_exactly_the_fields_the_launcher_can_build():
    """`resources.trainjob.overrides_field` lists the fields by name; one the launcher cannot build
    would fail at launch, one it can build but the config refuses could not be named."""
    from typing import get_args

    from fulltune.config import TrainJobSection
    from fulltune.launch.trainjob import NEWEST_OVERRIDES_FIELD, OVERRIDES_FIELDS

    offered = get_args(TrainJobSection.model_fields["overrides_field"].annotation)
    assert set(offered) == {"auto", *OVERRIDES_FIELDS} and NEWEST_OVERRIDES_FIELD == "runtimePatches"


@pytest.mark.parametrize("release", ["v2.1.0", "v2.3.0"])
def test_the_field_of_one_release_is_unknown_to_the_next(release):
    """Why the field is chosen per cluster: v2.0's podSpecOverrides is not a field of v2.1 or later,
    whose API server would drop it, and the pods would start without the run's settings."""
    crd, _ = RELEASES[release]
    errors = list(
        support_crd_validator(crd, "v1alpha1").iter_errors(
            manifest_for(EVERYTHING, overrides_field="podSpecOverrides")
        )
    )
    assert any("podSpecOverrides" in e.message for e in errors)


def test_a_trainjob_with_a_wrong_field_fails_validation(crd_validator, runtime):
    manifest = manifest_for(VARIANTS["1-node-gpu"])
    manifest["spec"]["trainer"]["numNode"] = 2
    with pytest.raises(AssertionError, match="numNode"):
        validate(crd_validator, runtime, manifest)


def test_the_trainjob_carries_the_runs_topology_command_and_pod_settings():
    m = manifest_for(EVERYTHING, optional_secrets=("fulltune-s3", "fulltune-mlflow"))
    assert m["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "TrainingRuntime",
        "name": "team-runtime",
    }
    trainer = m["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (4, 8, "img:1")
    # torchrun through the node wrapper; nodes, rank and master address come from the Trainer's PET_*
    cmd = trainer["command"]
    assert cmd[:4] == ["python", "-m", "fulltune.launch.node", "--nproc-per-node=8"]
    assert not any(a.startswith(("--nnodes", "--standalone", "--rdzv")) for a in cmd)
    assert cmd[cmd.index("fulltune.train") + 1 :] == make_job(make_cfg(**EVERYTHING)).args.to_argv()
    want = {"nvidia.com/gpu": "8", "cpu": "96", "memory": "1000Gi"}
    requests = {**want, "ephemeral-storage": "120Gi"}  # requested only, as on a PyTorchJob
    assert trainer["resourcesPerNode"] == {"requests": requests, "limits": want}
    assert {"name": "HOME", "value": "/tmp"} in trainer["env"]
    targets, patch = pod_patch_of(m)
    assert targets == [{"name": TRAINER_JOB}]
    assert patch["serviceAccountName"] == "trainer"
    assert patch["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    assert patch["tolerations"] == [{"operator": "Exists", "key": "nvidia.com/gpu", "effect": "NoSchedule"}]
    volumes = {v["name"]: v for v in patch["volumes"]}
    assert volumes[SHM_VOLUME] == {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}
    (container,) = patch["containers"]
    assert container["name"] == TRAINER_CONTAINER and "env" not in container and "envFrom" not in container
    mounts = {v["mountPath"]: v for v in container["volumeMounts"]}
    assert mounts["/dev/shm"]["name"] == SHM_VOLUME and mounts["/models"]["readOnly"]
    # credentials only as Secret references, mounted for the node to export: the configured one
    # required, the pipeline's optional, in envFrom's order (a later Secret's key wins)
    secrets = [
        volumes[mount["name"]]["secret"]
        for mount in container["volumeMounts"]
        if mount["name"] in volumes and "secret" in volumes[mount["name"]]
    ]
    assert secrets == [
        {"secretName": "hf-token", "optional": False},
        {"secretName": "fulltune-s3", "optional": True},
        {"secretName": "fulltune-mlflow", "optional": True},
    ]
    secret_dirs = [m["mountPath"] for m in container["volumeMounts"] if "secret" in volumes[m["name"]]]
    assert {"name": SECRET_ENV_DIRS, "value": ":".join(secret_dirs)} in trainer["env"]
    assert all(m["readOnly"] for m in container["volumeMounts"] if "secret" in volumes[m["name"]])
    labels = m["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["metadata"]["labels"]
    assert m["metadata"]["labels"]["pipeline/runid"] == "run-1" and labels == m["metadata"]["labels"]


@pytest.mark.parametrize("release", ["v2.1.0", "v2.3.0"])
def test_the_pods_carry_the_run_id_where_the_release_lets_the_trainjob_label_them(runtime, release):
    """`kubectl get pods -l pipeline/runid=<id>` finds a run's training pods, as with a PyTorchJob:
    the TrainJob's labels reach only its JobSet, so they are given to the pod template as well."""
    _, field = RELEASES[release]
    pod = effective_pod(runtime, manifest_for(EVERYTHING, overrides_field=field))
    labels = pod["metadata"]["labels"]
    assert labels["pipeline/runid"] == "run-1" and labels["app.kubernetes.io/component"] == "train"
    assert labels["sidecar.istio.io/inject"] == "false"  # the runtime's own labels stay


def test_the_effective_pod_meets_pod_security_restricted(runtime):
    pod = effective_pod(runtime, manifest_for(EVERYTHING))["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["securityContext"] == RESTRICTED_CONTAINER
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert {"/tmp", "/dev/shm"} <= writable  # what the read-only root leaves to write


@pytest.mark.parametrize(
    "kubernetes, field",
    [
        ({"affinity": {"nodeAffinity": {}}}, "affinity"),
        ({"priority_class_name": "high"}, "priority_class_name"),
        ({"istio_sidecar": True}, "istio_sidecar"),
        ({"active_deadline_seconds": 3600}, "active_deadline_seconds"),
    ],
)
def test_what_a_trainjob_cannot_carry_is_refused_naming_where_it_goes(kubernetes, field):
    with pytest.raises(ConfigError, match=rf"resources\.kubernetes\.{field}: .*trainJob\.runtime\."):
        manifest_for({"kubernetes": kubernetes})


def test_the_launcher_asks_for_trainjobs_and_reads_only_its_runtime_beyond_them():
    access = set(launcher_access("trainjob"))
    assert {v for g, r, v in access if r == "trainjobs"} == {"create", "get", "list", "watch", "delete"}
    assert {(r, v) for g, r, v in access if "runtimes" in r} == {
        ("clustertrainingruntimes", "get"),
        ("trainingruntimes", "get"),
    }
    assert not any(r == "pytorchjobs" for _, r, _ in access)


# -- the launcher against the stand-in ----------------------------------------------------------


@pytest.fixture
def kube(runtime):
    """The stand-in with the chart's runtime and the newest Trainer release's TrainJob schema."""
    with FakeKube() as k:
        k.api_resources = {"trainer.kubeflow.org/v1alpha1": ["trainjobs", "trainjobs/status"]}
        k.put_runtime(runtime)
        k.trainjob_schema = crd_schema(RELEASES["v2.3.0"][0], "v1alpha1")
        yield k
        assert not k.script_errors, k.script_errors


def launcher(
    kube: FakeKube, cfg: RunConfig | None = None, **kwargs
) -> tuple[KubernetesLauncher, io.StringIO]:
    """The launcher the PyTorchJob tests drive, for a two-node TrainJob config by default."""
    cfg = cfg or make_cfg(
        num_nodes=2, nproc_per_node=2, kubernetes={"namespace": NS, "watch_timeout_seconds": 30}
    )
    return pytorchjob_tests_launcher(kube, cfg, **kwargs)


def copied(out: io.StringIO) -> list[str]:
    return [line.removeprefix("[node 0] ") for line in out.getvalue().splitlines()]


def trainjob_watches(kube: FakeKube) -> list:
    return [r for r in kube.calls("GET", "/trainjobs") if r.query.get("watch", "").lower() == "true"]


def test_success_reads_the_runtime_creates_once_and_streams_node_0(kube, caplog):
    def trainer(k: FakeKube, ns, name):
        pod = k.start_node(ns, name)
        k.start_node(ns, name, index=1)
        k.log(ns, pod, "step 1 loss 2.30", "step 2 loss 2.10")
        k.wait_for(lambda: "step 2" in out.getvalue())
        k.log(ns, pod, "saved model")
        assert k.node_exits(ns, name, 0) == "succeeded"

    kube.script = trainer
    launch, out = launcher(kube)
    with caplog.at_level(logging.INFO, logger="fulltune.launch.kubernetes"):
        launch.run(make_job(launch.cfg))
    assert copied(out) == ["step 1 loss 2.30", "step 2 loss 2.10", "saved model"]
    (runtime_read,) = kube.calls("GET", "/clustertrainingruntimes/fulltune-torch-distributed")
    (post,) = kube.calls("POST", f"/namespaces/{NS}/trainjobs")
    assert kube.requests.index(runtime_read) < kube.requests.index(post)
    assert post.body["kind"] == "TrainJob" and post.body["metadata"]["name"] == NAME
    assert "restarts at most 2 time(s)" in caplog.text and "TrainJob team-a/" in caplog.text
    assert "complete" in caplog.text
    assert not kube.calls("DELETE")


def succeed(k: FakeKube, ns, name):
    k.start_node(ns, name)
    assert k.node_exits(ns, name, 0) == "succeeded"


@pytest.mark.parametrize("release", ["v2.0.0", "v2.1.0", "v2.3.0"])
def test_the_launcher_carries_the_pod_settings_in_the_field_the_clusters_trainer_serves(
    kube, release, caplog
):
    crd, field = RELEASES[release]
    kube.trainjob_schema, kube.script = crd_schema(crd, "v1alpha1"), succeed
    launch, _ = launcher(kube)
    with caplog.at_level(logging.INFO, logger="fulltune.launch.kubernetes"):
        launch.run(make_job(launch.cfg))
    (post,) = kube.calls("POST", f"/namespaces/{NS}/trainjobs")
    assert post.query["fieldValidation"] == "Strict"  # the stand-in refuses what the release does not know
    assert field in post.body["spec"] and f"pod settings in {field}" in caplog.text
    (read,) = kube.calls("GET", "/openapi/v3/apis/trainer.kubeflow.org/v1alpha1")
    assert kube.requests.index(read) < kube.requests.index(post)


def test_a_field_the_clusters_trainer_does_not_serve_is_refused_naming_it(kube):
    """Named wrongly in the config, the field is refused at create instead of being dropped."""
    cfg = make_cfg(kubernetes={"namespace": NS}, trainjob={"overrides_field": "podSpecOverrides"})
    launch, _ = launcher(kube, cfg)
    with pytest.raises(LaunchError, match='unknown field "spec.podSpecOverrides"'):
        launch.run(make_job(launch.cfg))
    assert not kube.calls(
        "GET", "/openapi/v3/apis/trainer.kubeflow.org/v1alpha1"
    )  # the config's field is taken as it is


def test_a_trainjob_schema_that_cannot_be_read_is_refused_saying_what_to_set(kube):
    kube.trainjob_schema = None  # the API server publishes none (404)
    launch, _ = launcher(kube)
    with pytest.raises(LaunchError) as info:
        launch.run(make_job(launch.cfg))
    assert info.value.exit_code == 1 and not kube.calls("POST")
    message = str(info.value)
    assert "cannot read the TrainJob schema" in message and "resources.trainjob.overrides_field" in message
    assert "runtimePatches (Kubeflow Trainer v2.2 and later)" in message


@pytest.mark.parametrize("code", [1, 2])
def test_a_permanent_exit_fails_the_trainjob_at_once_with_reason_events_and_log_tail(kube, code):
    def trainer(k: FakeKube, ns, name):
        pod = k.start_node(ns, name)
        k.log(ns, pod, "loading config", "fulltune.train: data.train_uri: no data files found")
        k.wait_for(lambda: "no data files" in out.getvalue())
        assert k.node_exits(ns, name, code) == "failed"

    kube.script = trainer
    launch, out = launcher(kube)
    with pytest.raises(LaunchError) as info:
        launch.run(make_job(launch.cfg))
    message = str(info.value)
    assert "TrainJob team-a/" in message and "PodFailurePolicy" in message and "FailJobSet" in message
    assert f"exited with code {code}" in message  # the pod's event
    assert "no data files found" in message  # the log tail
    assert kube.restarts.get((NS, NAME), 0) == 0  # never restarted
    assert not kube.calls("DELETE")


@pytest.mark.parametrize("code", [137, 138])
def test_a_retryable_exit_restarts_the_group_which_then_succeeds(kube, caplog, code):
    def trainer(k: FakeKube, ns, name):
        pod = k.start_node(ns, name)
        k.log(ns, pod, "step 10 loss 1.5")
        k.wait_for(lambda: "step 10" in out.getvalue())
        assert k.node_exits(ns, name, code) == "restarted"  # a new node-0 pod
        k.log(ns, pod, "resumed from checkpoint step-10", "step 11 loss 1.4")
        k.wait_for(lambda: "step 11" in out.getvalue())
        assert k.node_exits(ns, name, 0) == "succeeded"

    kube.script = trainer
    launch, out = launcher(kube)
    launch.run(make_job(launch.cfg))
    lines = copied(out)
    assert lines[0] == "step 10 loss 1.5" and lines[-2:] == [
        "resumed from checkpoint step-10",
        "step 11 loss 1.4",
    ]
    assert any("node 0 pod" in line and "was recreated" in line for line in lines)
    assert kube.restarts[(NS, NAME)] == 1


def test_restarts_are_bounded_by_the_runtimes_max_restarts(kube):
    def trainer(k: FakeKube, ns, name):
        k.start_node(ns, name)
        assert [k.node_exits(ns, name, 138) for _ in range(3)] == ["restarted", "restarted", "failed"]

    kube.script = trainer
    launch, _ = launcher(kube)
    with pytest.raises(LaunchError, match="reached max restarts"):
        launch.run(make_job(launch.cfg))
    assert kube.restarts[(NS, NAME)] == 2


def test_a_missing_runtime_is_refused_before_anything_is_created(kube):
    cfg = make_cfg(kubernetes={"namespace": NS}, trainjob={"runtime": "nope"})
    launch, _ = launcher(kube, cfg)
    with pytest.raises(LaunchError, match="ClusterTrainingRuntime nope does not exist: install the chart"):
        launch.run(make_job(cfg))
    assert not kube.calls("POST")


def test_a_cluster_without_kubeflow_trainer_is_named_as_such_not_as_a_missing_runtime(kube):
    """Where Trainer v2 is not installed, reading the runtime answers 404 for the resource type, not
    for an object: the launcher says the Trainer is missing instead of telling to install a runtime
    whose kind the cluster does not have."""
    kube.api_resources = {"kubeflow.org/v1": ["pytorchjobs"]}  # the Training Operator only
    launch, _ = launcher(kube)
    with pytest.raises(LaunchError) as info:
        launch.run(make_job(launch.cfg))
    message = str(info.value)
    assert "is Kubeflow Trainer v2 installed?" in message and "resources.launcher: kubernetes" in message
    assert "does not exist" not in message and "install the chart's runtime" not in message
    assert info.value.exit_code == 1 and not kube.calls("POST")


def test_an_existing_trainjob_is_adopted_and_a_410_relists(kube, caplog):
    launch, out = launcher(kube)
    job = make_job(launch.cfg)
    existing = kube.put_job(build_trainjob(launch.cfg, job, name=job.name, namespace=NS, image="img:0"))
    pod = kube.start_node(NS, job.name)
    kube.log(NS, pod, "step 41 loss 0.9")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(ok=launch.run(job) is None), daemon=True)
    with caplog.at_level(logging.INFO, logger="fulltune.launch.kubernetes"):
        thread.start()
        kube.wait_for(lambda: "step 41" in out.getvalue() and trainjob_watches(kube))
        kube.compact()  # the watch's history is gone and its connection drops: the reconnect gets 410
        kube.drop_streams()
        kube.wait_for(
            lambda: len([r for r in kube.calls("GET", "/trainjobs") if "watch" not in r.query]) >= 2
        )
        kube.log(NS, pod, "step 42 loss 0.8")
        kube.node_exits(NS, job.name, 0)
        thread.join(10)
    assert result == {"ok": True}
    assert len(kube.calls("POST")) == 1  # the create that answered 409
    assert kube.jobs[(NS, job.name)]["metadata"]["uid"] == existing["metadata"]["uid"]
    assert "already exists" in caplog.text and "410 Gone" in caplog.text
    assert copied(out)[-1] == "step 42 loss 0.8"


def test_cancel_deletes_the_trainjob(kube):
    def trainer(k: FakeKube, ns, name):
        k.log(ns, k.start_node(ns, name), "step 1")

    kube.script = trainer
    stop = threading.Event()
    launch, out = launcher(kube, stop=stop)
    result: dict = {}

    def target():
        try:
            launch.run(make_job(launch.cfg))
        except BaseException as exc:  # noqa: BLE001
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    kube.wait_for(lambda: "step 1" in out.getvalue())
    stop.set()
    thread.join(10)
    assert isinstance(result.get("error"), LaunchCancelled)
    (delete,) = kube.calls("DELETE", f"/trainjobs/{NAME}")
    assert delete.body["propagationPolicy"] == "Foreground"
    assert not kube.pods  # nothing orphaned


def test_watch_timeouts_reconnect_from_the_last_resource_version(kube):
    cfg = make_cfg(kubernetes={"namespace": NS, "watch_timeout_seconds": 1})

    def trainer(k: FakeKube, ns, name):
        k.start_node(ns, name)
        k.wait_for(lambda: len(trainjob_watches(k)) >= 3)  # two watches have timed out meanwhile
        k.node_exits(ns, name, 0)

    kube.script = trainer
    launch, _ = launcher(kube, cfg)
    launch.run(make_job(cfg))
    versions = [int(w.query["resourceVersion"]) for w in trainjob_watches(kube)]
    assert len(versions) >= 3 and versions == sorted(versions)
    assert len([r for r in kube.calls("GET", "/trainjobs") if "watch" not in r.query]) == 1  # no re-list


def test_pods_the_quota_forbids_are_said_while_the_trainjob_waits(kube, caplog):
    """A TrainJob has no condition until it ends; when the quota forbids its pods, the Job
    controller says so only in a Warning event of the node's Job, which the step's log shows."""
    forbidden = 'Error creating: pods "{job}-abcde" is forbidden: exceeded quota: kf-resource-quota'

    def trainer(k: FakeKube, ns, name):
        job = f"{name}-node-0"
        k.add_event(ns, "Job", job, "Warning", "FailedCreate", forbidden.format(job=job))

    kube.script = trainer
    stop = threading.Event()
    launch, _ = launcher(kube, stop=stop, waiting_report_seconds=0.05)
    with caplog.at_level(logging.INFO, logger="fulltune.launch.kubernetes"):
        thread = threading.Thread(
            target=lambda: pytest.raises(LaunchCancelled, launch.run, make_job(launch.cfg))
        )
        thread.start()
        try:
            kube.wait_for(lambda: "exceeded quota" in caplog.text, timeout=5)
        finally:
            stop.set()
            thread.join(10)
    assert f"TrainJob {NS}/{NAME} waits: Job/{NAME}-node-0 FailedCreate: " in caplog.text
