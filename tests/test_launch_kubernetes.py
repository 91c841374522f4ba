"""The Kubernetes launcher: PyTorchJob manifests checked against the CRD, and the launcher driven through
the real kubernetes client against a stateful stand-in API server on localhost (tests/k8s_standin.py)."""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes import client

from fulltune import failure, storage
from fulltune.config import RunConfig
from fulltune.launch.base import LaunchError, TrainJob
from fulltune.launch.kubernetes import KubernetesLauncher, LaunchCancelled
from fulltune.launch.pytorchjob import build_pytorchjob, job_name, workflow_owner
from fulltune.preprocess.dataset import load_manifest
from fulltune.train import checkpoint
from fulltune.train.args import TrainerArgs
from fulltune.train.exit_codes import TrainInputError
from k8s_standin import FakeKube
from support.crd_schema import strict as _strict  # test_launch_trainjob imports it from here too

ROOT = Path(__file__).resolve().parents[1]
# The Training Operator's CRD, vendored so a bare clone tests against it; kept equal to the
# project's shared copy (../shared/crds) by test_vendored_crd_matches_the_shared_copy.
CRD = ROOT / "tests" / "data" / "crds" / "kubeflow.org_pytorchjobs.yaml"
SHARED_CRDS = ROOT.parent / "shared" / "crds"
NS = "team-a"
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


# -- helpers ------------------------------------------------------------------------------------


def make_cfg(**resources) -> RunConfig:
    base = {"work_dir": "s3://bucket/runs/r1", "resources": {"launcher": "kubernetes", **resources}}
    return RunConfig.from_dict(base)


def make_job(cfg: RunConfig, name: str = "fulltune-train-0123456789") -> TrainJob:
    r = cfg.resources
    return TrainJob(
        name=name,
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


ALL_OPTIONS = {
    "num_nodes": 3,
    "nproc_per_node": 8,
    "kubernetes": {
        "namespace": NS,
        "image": "registry.example/fulltune@sha256:" + "a" * 64,
        "service_account_name": "trainer",
        "priority_class_name": "high",
        "node_selector": {"nvidia.com/gpu.product": "H100"},
        "tolerations": [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {
                "key": "spot",
                "operator": "Equal",
                "value": "yes",
                "effect": "NoExecute",
                "toleration_seconds": 60,
            },
        ],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "train"}},
                        },
                    }
                ]
            }
        },
        "volumes": [
            {"claim_name": "work", "mount_path": "/work"},
            {"claim_name": "models", "mount_path": "/models", "read_only": True},
        ],
        "secret_env": ["s3-credentials", "hf-token"],
        "gpu_resource_name": "amd.com/gpu",
        "cpu": "96",
        "memory": "1000Gi",
        "shm_size": "64Gi",
        "ephemeral_storage": "120Gi",
        "max_restarts": 5,
        "active_deadline_seconds": 86400,
        "ttl_seconds_after_finished": 3600,
        "clean_pod_policy": "All",
    },
}

VARIANTS = {
    "1-node-gpu": {"num_nodes": 1, "nproc_per_node": 4},
    "3-nodes-gpu": {"num_nodes": 3, "nproc_per_node": 8},
    "1-node-cpu": {"num_nodes": 1, "nproc_per_node": 2, "accelerator": "cpu"},
    "2-nodes-cpu": {"num_nodes": 2, "nproc_per_node": 1, "accelerator": "cpu"},
    "all-options": ALL_OPTIONS,
    "istio-sidecar": {"num_nodes": 2, "nproc_per_node": 8, "kubernetes": {"istio_sidecar": True}},
}


def manifest_for(resources: dict, owner: dict | None = None) -> dict:
    cfg = make_cfg(**resources)
    return build_pytorchjob(
        cfg,
        make_job(cfg),
        name="fulltune-train-0123456789",
        namespace=NS,
        image="img:1",
        run_id="run-1",
        owner=owner,
    )


@pytest.fixture(scope="module")
def crd_validator():
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def test_vendored_crd_matches_the_shared_copy():
    if not SHARED_CRDS.is_dir():
        pytest.skip(f"{SHARED_CRDS} not beside this checkout")
    for shared in SHARED_CRDS.glob("*.yaml"):
        vendored = CRD.parent / shared.name
        assert vendored.read_bytes() == shared.read_bytes(), f"refresh {vendored} from {shared}"


def validate_manifest(validator, manifest: dict) -> None:
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    # The pod templates once more against Kubernetes' own (strict) schema for PodTemplate.
    for rtype, spec in manifest["spec"]["pytorchReplicaSpecs"].items():
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{manifest['metadata']['name']}-{rtype.lower()}"},
            "template": spec["template"],
        }
        kubernetes_validate.validate(pod_template, "1.30", strict=True)


# -- manifests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_manifest_validates_against_the_crd(crd_validator, variant):
    owner = workflow_owner("full-finetune-abc12", "6f0c1f5e-0000-4000-8000-000000000001")
    validate_manifest(crd_validator, manifest_for(VARIANTS[variant], owner=owner))


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda m: m["spec"].__setitem__("nprocPerNode", 8), "nprocPerNode"),  # the CRD wants a string
        (lambda m: m["spec"]["runPolicy"].__setitem__("cleanupPolicy", "All"), "cleanupPolicy"),
        (lambda m: m["spec"]["elasticPolicy"].__setitem__("maxRestart", 3), "maxRestart"),
        (
            lambda m: m["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][
                0
            ].__setitem__("imagePullPolicyy", "Always"),
            "imagePullPolicyy",
        ),
        (lambda m: m["spec"]["pytorchReplicaSpecs"]["Master"].__setitem__("replicas", "1"), "replicas"),
    ],
)
def test_a_manifest_with_a_wrong_field_fails_validation(crd_validator, mutate, where):
    manifest = manifest_for(VARIANTS["3-nodes-gpu"])
    validate_manifest(crd_validator, copy.deepcopy(manifest))  # the unmodified one passes
    mutate(manifest)
    with pytest.raises(AssertionError, match=where):
        validate_manifest(crd_validator, manifest)


def test_one_node_is_a_master_alone_without_elastic_policy():
    m = manifest_for({"num_nodes": 1, "nproc_per_node": 4})
    specs = m["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master"} and specs["Master"]["replicas"] == 1
    # the operator's webhook rejects elasticPolicy without a Worker replica spec
    assert "elasticPolicy" not in m["spec"]
    assert m["spec"]["nprocPerNode"] == "4"
    container = specs["Master"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch"
    cmd = container["command"]
    assert cmd[:3] == ["python", "-m", "fulltune.launch.node"] and "--standalone" in cmd
    assert "--nproc-per-node=4" in cmd
    tail = cmd[cmd.index("fulltune.train") + 1 :]
    assert cmd[cmd.index("fulltune.train") - 1] == "-m"
    assert tail == make_job(make_cfg(num_nodes=1, nproc_per_node=4)).args.to_argv()
    # a GPU per process, and CPU and memory per process when the config sets none (quota-ready)
    want = {"nvidia.com/gpu": "4", "cpu": "16", "memory": "128Gi"}
    assert container["resources"] == {"requests": want, "limits": want}
    assert {"name": "DS_ACCELERATOR", "value": "cpu"} not in container["env"]
    assert specs["Master"]["restartPolicy"] == "ExitCode"


def test_three_nodes_are_master_plus_two_workers_in_an_elastic_group():
    m = manifest_for({"num_nodes": 3, "nproc_per_node": 8, "kubernetes": {"max_restarts": 7}})
    specs = m["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 2
    assert {s["restartPolicy"] for s in specs.values()} == {"ExitCode"}
    assert m["spec"]["elasticPolicy"] == {
        "rdzvBackend": "c10d",
        "rdzvId": "fulltune-train-0123456789",
        "minReplicas": 3,
        "maxReplicas": 3,
        "maxRestarts": 7,
    }
    cmd = specs["Worker"]["template"]["spec"]["containers"][0]["command"]
    assert "--nnodes=3:3" in cmd and "--standalone" not in cmd
    assert m["spec"]["runPolicy"]["backoffLimit"] == 7


def test_cpu_training_sets_ds_accelerator_and_requests_no_gpu():
    m = manifest_for({"num_nodes": 2, "nproc_per_node": 2, "accelerator": "cpu", "kubernetes": {"cpu": "4"}})
    container = m["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert {"name": "DS_ACCELERATOR", "value": "cpu"} in container["env"]
    assert container["resources"] == {
        "requests": {"cpu": "4", "memory": "64Gi"},
        "limits": {"cpu": "4", "memory": "64Gi"},
    }


def test_every_option_reaches_the_pods():
    owner = workflow_owner("wf", "uid-1")
    m = manifest_for(ALL_OPTIONS, owner=owner)
    assert m["metadata"]["ownerReferences"] == [
        {"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow", "name": "wf", "uid": "uid-1"}
    ]
    assert m["metadata"]["labels"]["pipeline/runid"] == "run-1"
    assert m["metadata"]["labels"]["app.kubernetes.io/name"] == "fulltune"
    assert m["spec"]["runPolicy"] == {
        "cleanPodPolicy": "All",
        "backoffLimit": 5,
        "activeDeadlineSeconds": 86400,
        "ttlSecondsAfterFinished": 3600,
    }
    for spec in m["spec"]["pytorchReplicaSpecs"].values():
        pod = spec["template"]["spec"]
        assert spec["template"]["metadata"]["labels"]["pipeline/runid"] == "run-1"
        assert pod["serviceAccountName"] == "trainer"
        assert pod["priorityClassName"] == "high"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
        assert pod["tolerations"] == [
            {"operator": "Exists", "key": "nvidia.com/gpu", "effect": "NoSchedule"},
            {
                "operator": "Equal",
                "key": "spot",
                "value": "yes",
                "effect": "NoExecute",
                "tolerationSeconds": 60,
            },
        ]
        assert pod["affinity"] == ALL_OPTIONS["kubernetes"]["affinity"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"] == {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}
        claims = {
            v["persistentVolumeClaim"]["claimName"]: v for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        assert set(claims) == {"work", "models"} and claims["models"]["persistentVolumeClaim"]["readOnly"]
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/dev/shm"]["name"] == "dshm"
        assert mounts["/work"]["name"] == claims["work"]["name"] and not mounts["/work"]["readOnly"]
        assert mounts["/models"]["readOnly"]
        assert container["envFrom"] == [
            {"secretRef": {"name": "s3-credentials"}},
            {"secretRef": {"name": "hf-token"}},
        ]
        limits = {"amd.com/gpu": "8", "cpu": "96", "memory": "1000Gi"}
        # the disk /tmp needs is requested, never a limit: exceeding an estimate must not evict the pod
        requests = {**limits, "ephemeral-storage": "120Gi"}
        assert container["resources"] == {"requests": requests, "limits": limits}


def test_training_pods_meet_pod_security_restricted():
    """A namespace enforcing Pod Security "restricted" admits the job's pods."""
    m = manifest_for({"num_nodes": 2, "nproc_per_node": 8})
    for spec in m["spec"]["pytorchReplicaSpecs"].values():
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["readOnlyRootFilesystem"] is True
            # with a read-only root, /tmp is an emptyDir and HOME points there for caches
            tmp = next(v for v in container["volumeMounts"] if v["mountPath"] == "/tmp")
            assert {"name": tmp["name"], "emptyDir": {}} in pod["volumes"]
            assert {"name": "HOME", "value": "/tmp"} in container["env"]


def test_training_pods_in_a_profile_namespace_opt_out_of_the_istio_sidecar():
    """Kubeflow profile namespaces inject Istio sidecars; a sidecar breaks the rendezvous and keeps
    finished pods running, so every replica opts out (label and annotation) unless the config asks
    for the mesh, and then it waits for the proxy and keeps the rendezvous ports off it."""
    for spec in manifest_for({"num_nodes": 3, "nproc_per_node": 8})["spec"]["pytorchReplicaSpecs"].values():
        meta = spec["template"]["metadata"]
        assert meta["labels"]["sidecar.istio.io/inject"] == "false"
        assert meta["annotations"]["sidecar.istio.io/inject"] == "false"
        assert meta["labels"]["app.kubernetes.io/component"] == "train"  # the NetworkPolicy's selector
    meshed = manifest_for(VARIANTS["istio-sidecar"])
    for spec in meshed["spec"]["pytorchReplicaSpecs"].values():
        meta = spec["template"]["metadata"]
        assert "sidecar.istio.io/inject" not in meta["labels"]
        assert "sidecar.istio.io/inject" not in meta["annotations"]
        assert json.loads(meta["annotations"]["proxy.istio.io/config"]) == {
            "holdApplicationUntilProxyStarts": True
        }
        for direction in ("Inbound", "Outbound"):
            ports = meta["annotations"][f"traffic.sidecar.istio.io/exclude{direction}Ports"].split(",")
            assert "23456" in ports and "29500" in ports


def test_the_pipelines_s3_secret_reaches_the_pods_as_an_optional_reference(crd_validator):
    cfg = make_cfg(num_nodes=2, kubernetes={"secret_env": ["hf-token", "fulltune-s3"]})
    m = build_pytorchjob(
        cfg,
        make_job(cfg),
        name="fulltune-train-0123456789",
        namespace=NS,
        image="img:1",
        optional_secrets=("fulltune-s3", "team-s3"),
    )
    validate_manifest(crd_validator, m)
    container = m["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    # configured Secrets must exist; the pipeline's may be absent (workload identity), never twice
    assert container["envFrom"] == [
        {"secretRef": {"name": "hf-token"}},
        {"secretRef": {"name": "fulltune-s3"}},
        {"secretRef": {"name": "team-s3", "optional": True}},
    ]


def test_credentials_reach_the_pods_only_as_secret_references(monkeypatch):
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEYID")
    monkeypatch.setenv("HF_TOKEN", "hf_exampletokenvalue")
    m = manifest_for(ALL_OPTIONS)
    text = json.dumps(m)
    for value in (secret, "AKIAEXAMPLEKEYID", "hf_exampletokenvalue"):
        assert value not in text
    for spec in m["spec"]["pytorchReplicaSpecs"].values():
        container = spec["template"]["spec"]["containers"][0]
        names = {e["name"] for e in container["env"]}
        assert not names & {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "HF_TOKEN"}
        assert all(set(ref) == {"secretRef"} for ref in container["envFrom"])


def test_job_names_are_stable_distinct_and_valid():
    a = job_name("8d1f6d0e-1b5e-4f0c-9a55-3c1e8d3c2a10", "train")
    assert a == job_name("8d1f6d0e-1b5e-4f0c-9a55-3c1e8d3c2a10", "train")
    assert a.startswith("fulltune-train-")
    assert a != job_name("8d1f6d0e-1b5e-4f0c-9a55-3c1e8d3c2a11", "train")
    assert a != job_name("8d1f6d0e-1b5e-4f0c-9a55-3c1e8d3c2a10", "train-2")
    names = [
        a,
        job_name("run", "Train_Step With.Odd/Chars" * 5),
        job_name("", ""),
        job_name("r" * 300, "-" * 80),
        job_name("run", "9-starts-with-a-digit"),
    ]
    for name in names:
        assert DNS_1035.match(name), name
        # the operator names pods and services <job>-worker-<i>: those must fit 63 characters too
        assert len(name) <= 50 and len(f"{name}-worker-9999") <= 63, name


# -- the launcher against the stand-in ----------------------------------------------------------


@pytest.fixture
def kube():
    with FakeKube() as k:
        yield k
        assert not k.script_errors, k.script_errors


def launcher(
    kube: FakeKube, cfg: RunConfig | None = None, **kwargs
) -> tuple[KubernetesLauncher, io.StringIO]:
    cfg = cfg or make_cfg(
        num_nodes=1, nproc_per_node=2, kubernetes={"namespace": NS, "watch_timeout_seconds": 30}
    )
    configuration = client.Configuration()
    configuration.host = kube.host
    out = io.StringIO()
    kwargs.setdefault("poll_seconds", 0.05)
    kwargs.setdefault("drain_seconds", 5)
    kwargs.setdefault("namespace_file", "/nonexistent")
    return KubernetesLauncher(cfg, run_id="run-1", configuration=configuration, stream=out, **kwargs), out


def run_in_thread(launch: KubernetesLauncher, job: TrainJob) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target():
        try:
            launch.run(job)
            result["ok"] = True
        except BaseException as exc:  # noqa: BLE001
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def log_requests(kube: FakeKube) -> list:
    return kube.calls("GET", "/log")


def watches(kube: FakeKube) -> list:
    return [r for r in kube.calls("GET", "/pytorchjobs") if r.query.get("watch", "").lower() == "true"]


def lists(kube: FakeKube) -> list:
    return [r for r in kube.calls("GET", "/pytorchjobs") if "watch" not in r.query]


def copied(out: io.StringIO) -> list[str]:
    return [line.removeprefix("[master] ") for line in out.getvalue().splitlines()]


def test_the_standin_sets_only_what_the_training_operator_sets(kube):
    """The stand-in plays the Training Operator (v1.8, v1.9) as its source reads, so that a test
    cannot pass on a condition, reason or label the real operator never produces."""
    cfg = make_cfg(kubernetes={"namespace": NS})
    job = make_job(cfg)
    kube.put_job(build_pytorchjob(cfg, job, name=job.name, namespace=NS, image="img:0"))
    with pytest.raises(ValueError, match="never sets a PyTorchJob condition 'Complete'"):
        kube.set_condition(NS, job.name, "Complete")
    with pytest.raises(ValueError, match="never 'DeadlineExceeded'"):
        kube.set_condition(NS, job.name, "Failed", "DeadlineExceeded")
    pod = kube.start_master(NS, job.name)
    assert kube.pods[(NS, pod)]["metadata"]["labels"] == {
        "training.kubeflow.org/operator-name": "pytorchjob-controller",
        "training.kubeflow.org/job-name": job.name,
        "training.kubeflow.org/replica-type": "master",
        "training.kubeflow.org/replica-index": "0",
        "training.kubeflow.org/job-role": "master",
    }

    def conditions() -> dict[str, str]:
        return {c["type"]: c["status"] for c in kube.jobs[(NS, job.name)]["status"]["conditions"]}

    kube.set_condition(NS, job.name, "Running")
    kube.set_condition(NS, job.name, "Restarting")
    assert conditions() == {"Restarting": "True"}  # Restarting and Running replace each other
    kube.set_condition(NS, job.name, "Running")
    assert conditions() == {"Running": "True"}
    kube.set_condition(NS, job.name, "Failed")
    kube.set_condition(NS, job.name, "Restarting")  # nothing changes once a job has failed
    assert conditions() == {"Running": "False", "Failed": "True"}


def test_success_creates_once_streams_the_master_log_and_deletes_nothing(kube, caplog):
    def operator(k: FakeKube, ns, name):
        k.set_condition(ns, name, "Created")
        pod = k.start_master(ns, name)
        k.set_condition(ns, name, "Running")
        k.log(ns, pod, "step 1 loss 2.30", "step 2 loss 2.10")
        k.wait_for(lambda: log_requests(k))
        k.log(ns, pod, "step 3 loss 1.90", "saved model")
        k.set_pod_phase(ns, pod, "Succeeded")
        k.end_log(ns, pod)
        k.set_condition(ns, name, "Succeeded")

    kube.script = operator
    launch, out = launcher(kube)
    job = make_job(launch.cfg)
    with caplog.at_level(logging.INFO, logger="fulltune.launch.kubernetes"):
        launch.run(job)
    assert copied(out) == ["step 1 loss 2.30", "step 2 loss 2.10", "step 3 loss 1.90", "saved model"]
    (post,) = kube.calls("POST", f"/namespaces/{NS}/pytorchjobs")
    assert (
        post.body["metadata"]["name"] == job.name
        and post.body["metadata"]["labels"]["pipeline/runid"] == "run-1"
    )
    assert "ownerReferences" not in post.body["metadata"]
    assert not kube.calls("DELETE")
    messages = caplog.text
    assert "created; waiting for its pods" in messages and "running" in messages and "succeeded" in messages
    # the watch asks for exactly this job, with the configured server-side timeout
    assert {(w.query["fieldSelector"], w.query["timeoutSeconds"]) for w in watches(kube)} == {
        (f"metadata.name={job.name}", "30")
    }


def test_failure_reports_reason_events_and_last_log_lines_and_keeps_the_job(kube):
    def operator(k: FakeKube, ns, name):
        pod = k.start_master(ns, name)
        k.set_condition(ns, name, "Running")
        k.log(
            ns,
            pod,
            "loading config",
            "Traceback (most recent call last):",
            "ValueError: max_seq_len too large",
        )
        k.wait_for(lambda: log_requests(k))
        k.add_event(ns, "Pod", pod, "Warning", "BackOff", "Back-off pulling image")
        k.add_event(ns, "Pod", "someone-elses-pod", "Warning", "Unrelated", "not ours")
        assert k.replica_exits(ns, name, 1) == "failed"

    kube.script = operator
    launch, _ = launcher(kube)
    with pytest.raises(LaunchError) as info:
        launch.run(make_job(launch.cfg))
    message = str(info.value)
    assert "PyTorchJobFailed" in message and '"Master" replica(s) failed' in message
    assert "exited with code 1" in message and "Back-off pulling image" in message
    assert "not ours" not in message
    assert "ValueError: max_seq_len too large" in message
    assert not isinstance(info.value, LaunchCancelled)
    assert not kube.calls("DELETE")  # a finished job holds no GPU; it stays for inspection until its TTL


@pytest.mark.parametrize(
    ("exits", "max_restarts", "says", "permanent"),
    [
        (1, 3, '"Master" replica(s) failed', True),  # the ranks refused the input
        (None, 3, "active longer than specified deadline", False),  # activeDeadlineSeconds
        (138, 0, "reached the specified backoff limit", False),  # a lost node, no restarts allowed
    ],
)
def test_only_a_permanent_exit_code_marks_a_failed_job_as_the_inputs_fault(
    kube, exits, max_restarts, says, permanent
):
    """The operator fails a PyTorchJob with the same reason for a permanent exit code, its deadline
    and its backoff limit; only the first is the input's fault, which `fulltune retry` refuses to
    retry. The others resume from the newest checkpoint on a retry."""
    cfg = make_cfg(
        kubernetes={"namespace": NS, "max_restarts": max_restarts, "active_deadline_seconds": 3600}
    )

    def operator(k: FakeKube, ns, name):
        pod = k.start_master(ns, name)
        k.set_condition(ns, name, "Running")
        k.log(ns, pod, "step 10 loss 1.5")
        k.wait_for(lambda: log_requests(k))
        if exits is None:
            k.limit_reached(ns, name)
        else:
            assert k.replica_exits(ns, name, exits) == "failed"

    kube.script = operator
    launch, _ = launcher(kube, cfg)
    with pytest.raises(LaunchError) as info:
        launch.run(make_job(cfg))
    assert says in str(info.value) and "PyTorchJobFailed" in str(info.value)
    assert failure.is_permanent(info.value) is permanent
    assert info.value.exit_code == (exits if permanent else None)


def test_a_job_past_its_deadline_that_the_operator_has_not_ended_is_deleted(kube):
    """The operator checks activeDeadlineSeconds only when it next reconciles the job (a change of
    its pods): a job whose ranks hang, pods unchanged, would hold its GPUs for hours past it."""
    cfg = make_cfg(kubernetes={"namespace": NS, "active_deadline_seconds": 1})

    def operator(k: FakeKube, ns, name):
        k.set_condition(ns, name, "Created")
        pod = k.start_master(ns, name)
        k.set_condition(ns, name, "Running")
        k.log(ns, pod, "step 1 loss 2.30")  # and then nothing: a hung collective

    kube.script = operator
    launch, out = launcher(kube, cfg, deadline_grace_seconds=0.5)
    job = make_job(cfg)
    thread, result = run_in_thread(launch, job)
    thread.join(15)
    error = result.get("error")
    assert isinstance(error, LaunchError) and not isinstance(error, LaunchCancelled)
    assert "past resources.kubernetes.active_deadline_seconds (1)" in str(error)
    assert not failure.is_permanent(error)  # a retry resumes from the newest checkpoint
    (delete,) = kube.calls("DELETE", f"/pytorchjobs/{job.name}")
    assert delete.body["propagationPolicy"] == "Foreground"
    assert "step 1 loss 2.30" in out.getvalue()


def test_a_worker_that_failed_the_job_shows_its_own_log_lines(kube):
    """A rank on another node fails (here out of GPU memory): the master's log shows only its lost
    peers, so the report adds the failed pod's own last lines."""
    cfg = make_cfg(num_nodes=2, nproc_per_node=1, kubernetes={"namespace": NS})

    def operator(k: FakeKube, ns, name):
        master, worker = k.start_master(ns, name), k.start_worker(ns, name)
        k.set_condition(ns, name, "Running")
        k.log(ns, worker, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
        k.log(ns, master, "step 3 loss 2.1", "NCCL watchdog: collective operation timed out")
        k.wait_for(lambda: "timed out" in out.getvalue())
        assert k.replica_exits(ns, name, 1, replica="worker") == "failed"

    kube.script = operator
    launch, out = launcher(kube, cfg)
    job = make_job(cfg)
    with pytest.raises(LaunchError) as info:
        launch.run(job)
    message = str(info.value)
    assert f"Last log lines of pod {job.name}-worker-0, which exited 1:" in message
    assert "CUDA out of memory" in message and info.value.exit_code == 1


def test_failure_before_the_log_was_followed_still_shows_the_log_tail(kube):
    def operator(k: FakeKube, ns, name):
        pod = k.start_master(ns, name, phase="Failed")
        k.log(ns, pod, "RuntimeError: CUDA error: no kernel image is available")
        k.set_condition(ns, name, "Failed", "PyTorchJobFailed", "1 Master replica(s) failed.")

    kube.script = operator
    launch, _ = launcher(kube)
    with pytest.raises(LaunchError, match="no kernel image is available"):
        launch.run(make_job(launch.cfg))


def test_restarting_then_succeeded_follows_the_recreated_master(kube, caplog):
    def operator(k: FakeKube, ns, name):
        pod = k.start_master(ns, name)
        k.set_condition(ns, name, "Running")
        k.log(ns, pod, "step 10 loss 1.5")
        k.wait_for(lambda: "step 10" in out.getvalue())
        assert k.replica_exits(ns, name, 138) == "restarted"  # recreated: new uid, fresh log
        k.log(ns, pod, "resumed from checkpoint step-10", "step 11 loss 1.4")
        k.wait_for(lambda: "step 11" in out.getvalue())
        assert k.replica_exits(ns, name, 0) == "succeeded"

    kube.script = operator
    launch, out = launcher(kube)
    with caplog.at_level(logging.INFO, logger="fulltune.launch.kubernetes"):
        launch.run(make_job(launch.cfg))
    lines = copied(out)
    assert lines[0] == "step 10 loss 1.5" and lines[-2:] == [
        "resumed from checkpoint step-10",
        "step 11 loss 1.4",
    ]
    assert any("was recreated" in line for line in lines)
    assert "restarting" in caplog.text and "PyTorchJobRestarting" in caplog.text
    assert not kube.calls("DELETE")


def test_an_existing_job_is_adopted_not_created_twice(kube, caplog):
    launch, out = launcher(kube)
    job = make_job(launch.cfg)
    existing = kube.put_job(
        build_pytorchjob(launch.cfg, job, name=job.name, namespace=NS, image="img:0", run_id="run-1")
    )
    pod = kube.start_master(NS, job.name)
    kube.set_condition(NS, job.name, "Running")
    kube.log(NS, pod, "step 41 loss 0.9")
    with caplog.at_level(logging.INFO, logger="fulltune.launch.kubernetes"):
        thread, result = run_in_thread(launch, job)
        kube.wait_for(lambda: "step 41" in out.getvalue())
        kube.log(NS, pod, "step 42 loss 0.8")
        kube.end_log(NS, pod)
        kube.set_condition(NS, job.name, "Succeeded")
        thread.join(10)
    assert result == {"ok": True}
    assert len(kube.calls("POST")) == 1  # the create that answered 409, and no other
    assert kube.calls("GET", f"/pytorchjobs/{job.name}")
    assert kube.jobs[(NS, job.name)]["metadata"]["uid"] == existing["metadata"]["uid"]
    assert "already exists" in caplog.text
    assert copied(out) == ["step 41 loss 0.9", "step 42 loss 0.8"]
    assert not kube.calls("DELETE")


def test_a_failed_job_from_an_earlier_attempt_is_replaced(kube):
    launch, _ = launcher(kube)
    job = make_job(launch.cfg)
    old = kube.put_job(build_pytorchjob(launch.cfg, job, name=job.name, namespace=NS, image="img:0"))
    kube.set_condition(NS, job.name, "Failed", "PyTorchJobFailed", "old failure")

    def operator(k: FakeKube, ns, name):
        k.set_condition(ns, name, "Running")
        k.set_condition(ns, name, "Succeeded")

    kube.script = operator
    launch.run(job)
    posts = kube.calls("POST")
    assert len(posts) == 2
    (delete,) = kube.calls("DELETE")
    assert delete.body["propagationPolicy"] == "Foreground"
    assert kube.jobs[(NS, job.name)]["metadata"]["uid"] != old["metadata"]["uid"]


def test_a_job_still_being_deleted_by_an_earlier_attempt_is_waited_for_then_created_again(kube, caplog):
    """An earlier attempt was cancelled and deleted its job with propagationPolicy Foreground: the
    API server keeps the job, with a deletionTimestamp, until its pods have terminated. Adopting it
    would follow a job about to vanish."""
    launch, out = launcher(kube)
    job = make_job(launch.cfg)
    old = kube.put_job(build_pytorchjob(launch.cfg, job, name=job.name, namespace=NS, image="img:0"))
    kube.set_condition(NS, job.name, "Running")
    kube.start_master(NS, job.name)
    kube.pod_grace_seconds = 1.0
    client.CustomObjectsApi(launch.api).delete_namespaced_custom_object(
        "kubeflow.org",
        "v1",
        NS,
        "pytorchjobs",
        job.name,
        body=client.V1DeleteOptions(propagation_policy="Foreground"),
    )
    assert kube.jobs[(NS, job.name)]["metadata"]["deletionTimestamp"]

    def operator(k: FakeKube, ns, name):
        pod = k.start_master(ns, name)
        k.set_condition(ns, name, "Running")
        k.log(ns, pod, "step 1 loss 2.30")
        k.wait_for(lambda: "step 1" in out.getvalue())
        assert k.replica_exits(ns, name, 0) == "succeeded"

    kube.script = operator
    with caplog.at_level(logging.INFO, logger="fulltune.launch.kubernetes"):
        launch.run(job)
    assert "is being deleted: waiting until it is gone" in caplog.text
    assert len(kube.calls("POST")) == 2  # the create that answered 409, and the new one
    assert kube.jobs[(NS, job.name)]["metadata"]["uid"] != old["metadata"]["uid"]
    assert copied(out) == ["step 1 loss 2.30"]


def test_watch_timeouts_reconnect_from_the_last_resource_version(kube):
    cfg = make_cfg(num_nodes=1, nproc_per_node=1, kubernetes={"namespace": NS, "watch_timeout_seconds": 1})

    def operator(k: FakeKube, ns, name):
        k.set_condition(ns, name, "Running")
        k.wait_for(lambda: len(watches(k)) >= 3)  # two watches have timed out meanwhile
        k.set_condition(ns, name, "Succeeded")

    kube.script = operator
    launch, _ = launcher(kube, cfg)
    launch.run(make_job(cfg))
    versions = [int(w.query["resourceVersion"]) for w in watches(kube)]
    assert len(versions) >= 3 and versions == sorted(versions)
    running_rv = max(
        rv
        for rv, kind, job in kube.history
        if job["status"].get("conditions", [{}])[-1].get("type") == "Running"
    )
    assert versions[-1] >= running_rv  # later watches start where the earlier ones left off
    assert len(lists(kube)) == 1  # no re-list was needed


def test_410_gone_relists_and_watches_from_the_new_version(kube):
    def operator(k: FakeKube, ns, name):
        k.set_condition(ns, name, "Running")
        k.wait_for(lambda: watches(k))
        k.compact()  # the history the watch stands on is gone ...
        k.drop_streams()  # ... and the connection drops: the reconnect gets 410
        k.wait_for(lambda: len(lists(k)) >= 2)
        k.set_condition(ns, name, "Succeeded")

    kube.script = operator
    launch, _ = launcher(kube)
    launch.run(make_job(launch.cfg))
    assert len(lists(kube)) == 2
    versions = [int(w.query["resourceVersion"]) for w in watches(kube)]
    assert versions[1] < kube.min_rv <= versions[-1]  # the stale one, then one from the re-list


def test_a_dropped_log_stream_resumes_without_repeating_lines(kube):
    def operator(k: FakeKube, ns, name):
        pod = k.start_master(ns, name)
        k.set_condition(ns, name, "Running")
        k.log(ns, pod, "line 1", "line 2", "line 3")
        k.wait_for(lambda: "line 3" in out.getvalue())
        k.drop_streams()
        k.log(ns, pod, "line 4", "line 5")
        k.wait_for(lambda: "line 5" in out.getvalue())
        k.end_log(ns, pod)
        k.set_condition(ns, name, "Succeeded")

    kube.script = operator
    launch, out = launcher(kube)
    launch.run(make_job(launch.cfg))
    assert copied(out) == ["line 1", "line 2", "line 3", "line 4", "line 5"]
    follows = [r for r in log_requests(kube) if r.query.get("follow", "").lower() == "true"]
    assert len(follows) >= 2 and "sinceSeconds" not in follows[0].query and "sinceSeconds" in follows[1].query
    assert all(r.query.get("timestamps", "").lower() == "true" for r in follows)


def test_a_stop_event_deletes_the_job(kube):
    def operator(k: FakeKube, ns, name):
        pod = k.start_master(ns, name)
        k.set_condition(ns, name, "Running")
        k.log(ns, pod, "step 1")

    kube.script = operator
    stop = threading.Event()
    launch, out = launcher(kube, stop=stop)
    job = make_job(launch.cfg)
    thread, result = run_in_thread(launch, job)
    kube.wait_for(lambda: "step 1" in out.getvalue())
    assert not kube.calls("DELETE")
    stop.set()
    thread.join(10)
    assert isinstance(result.get("error"), LaunchCancelled)
    (delete,) = kube.calls("DELETE", f"/pytorchjobs/{job.name}")
    assert delete.body["propagationPolicy"] == "Foreground"
    assert (NS, job.name) not in kube.jobs


def test_pods_the_quota_forbids_are_said_while_the_job_waits(kube, caplog):
    """A ResourceQuota without room: the operator cannot create the pods and says so only in a
    Warning event, while the job stays Created. The step's log says why it waits, once, with what
    to do, instead of waiting in silence."""
    forbidden = (
        'Error creating: pods "{name}-master-0" is forbidden: exceeded quota: kf-resource-quota, '
        "requested: requests.nvidia.com/gpu=2, used: requests.nvidia.com/gpu=8, limited: requests.nvidia.com/gpu=8"
    )

    def operator(k: FakeKube, ns, name):
        k.set_condition(ns, name, "Created")
        k.add_event(ns, "PyTorchJob", name, "Warning", "FailedCreatePod", forbidden.format(name=name))
        k.add_event(ns, "Pod", "someone-elses-pod", "Warning", "FailedScheduling", "not ours")

    kube.script = operator
    stop = threading.Event()
    launch, _ = launcher(kube, stop=stop, waiting_report_seconds=0.05)
    job = make_job(launch.cfg)
    with caplog.at_level(logging.INFO, logger="fulltune.launch.kubernetes"):
        thread, result = run_in_thread(launch, job)
        try:
            kube.wait_for(lambda: "exceeded quota" in caplog.text, timeout=5)
            kube.wait_for(lambda: len(kube.calls("GET", "/events")) >= 3, timeout=5)
        finally:
            stop.set()
            thread.join(10)
    assert isinstance(result.get("error"), LaunchCancelled)
    waiting = [r.getMessage() for r in caplog.records if "exceeded quota" in r.getMessage()]
    assert len(waiting) == 1, waiting  # said once, though read again
    assert f"PyTorchJob {NS}/{job.name} waits: PyTorchJob/{job.name} FailedCreatePod" in waiting[0]
    assert "fulltune doctor" in waiting[0]
    assert "not ours" not in caplog.text


def test_an_error_of_the_launcher_after_creation_deletes_the_job(kube):
    kube.watch_error = 403
    launch, _ = launcher(kube)
    job = make_job(launch.cfg)
    with pytest.raises(LaunchError, match="403 .*RBAC"):
        launch.run(job)
    assert kube.calls("DELETE", f"/pytorchjobs/{job.name}")


def test_a_refused_create_fails_with_the_reason_and_deletes_nothing(kube):
    kube.create_error = 403
    launch, _ = launcher(kube)
    with pytest.raises(LaunchError, match="cannot create PyTorchJob .*403 create refused .*RBAC"):
        launch.run(make_job(launch.cfg))
    assert not kube.calls("DELETE") and not watches(kube)


def test_sigterm_deletes_the_job(kube, tmp_path):
    kubeconfig = write_kubeconfig(tmp_path, kube.host)
    started = threading.Event()

    def operator(k: FakeKube, ns, name):
        pod = k.start_master(ns, name)
        k.set_condition(ns, name, "Running")
        k.log(ns, pod, "step 1")
        started.set()

    kube.script = operator
    code = textwrap.dedent(
        f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        from fulltune.config import RunConfig
        from fulltune.launch.base import TrainJob
        from fulltune.launch.kubernetes import KubernetesLauncher
        from fulltune.train.args import TrainerArgs
        cfg = RunConfig.from_dict({{"resources": {{"launcher": "kubernetes", "kubernetes": {{"namespace": "{NS}"}}}}}})
        args = TrainerArgs(config="c", deepspeed="d", dataset="x", output="o", metrics="m")
        job = TrainJob(name="fulltune-train-sigterm", args=args)
        KubernetesLauncher(cfg, run_id="run-1", poll_seconds=0.05, namespace_file="/nonexistent").run(job)
        """
    )
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONPATH": str(ROOT / "src")}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        kube.wait_for(lambda: started.is_set() and log_requests(kube), timeout=60)
        kube.wait_for(
            lambda: "step 1" in (proc.stdout.readline() if proc.poll() is None else "x"), timeout=30
        )
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "SIGTERM" in err and "cancelled" in err
    (delete,) = kube.calls("DELETE", "/pytorchjobs/fulltune-train-sigterm")
    assert delete.body["propagationPolicy"] == "Foreground"


def test_owner_is_the_runs_workflow_and_namespace_comes_from_the_pod(kube, tmp_path, monkeypatch, caplog):
    ns_file = tmp_path / "namespace"
    ns_file.write_text("kubeflow-user\n")
    monkeypatch.setenv("FULLTUNE_WORKFLOW_NAME", "full-finetune-x7k2p")
    kube.workflows[("kubeflow-user", "full-finetune-x7k2p")] = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "full-finetune-x7k2p", "namespace": "kubeflow-user", "uid": "wf-uid-42"},
    }
    kube.script = lambda k, ns, name: k.set_condition(ns, name, "Succeeded")
    cfg = make_cfg(num_nodes=1, nproc_per_node=1)  # no namespace configured
    launch, _ = launcher(kube, cfg, namespace_file=str(ns_file))
    launch.run(make_job(cfg))
    (post,) = kube.calls("POST", "/namespaces/kubeflow-user/pytorchjobs")
    assert post.body["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "Workflow",
            "name": "full-finetune-x7k2p",
            "uid": "wf-uid-42",
        }
    ]

    # an unreadable Workflow: logged, and the job is created without an owner
    monkeypatch.setenv("FULLTUNE_WORKFLOW_NAME", "not-there")
    kube.jobs.clear()
    with caplog.at_level(logging.WARNING, logger="fulltune.launch.kubernetes"):
        launcher(kube, cfg, namespace_file=str(ns_file))[0].run(make_job(cfg))
    assert "cannot read Workflow kubeflow-user/not-there" in caplog.text
    assert "ownerReferences" not in kube.calls("POST")[-1].body["metadata"]


def test_namespace_defaults_to_default_outside_a_pod(kube):
    kube.script = lambda k, ns, name: k.set_condition(ns, name, "Succeeded")
    cfg = make_cfg(num_nodes=1, nproc_per_node=1)
    launch, _ = launcher(kube, cfg)
    launch.run(make_job(cfg))
    assert kube.calls("POST", "/namespaces/default/pytorchjobs")


# -- the train step with launcher: kubernetes ---------------------------------------------------


def write_kubeconfig(tmp_path: Path, host: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "standin", "cluster": {"server": host}}],
                "users": [{"name": "standin", "user": {}}],
                "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin"}}],
                "current-context": "standin",
            }
        )
    )
    return path


def succeeding_operator(work: Path, identity: dict | None = None):
    """What the Training Operator and the training pods do in the stand-in: write a two-step model
    (recording the run's `identity`, as the ranks do) and its metrics to the shared work directory,
    then mark the job Succeeded. Returns the summary."""
    from fulltune.train.metrics import StepRecord, TrainingSummary
    from fulltune.train.recipe import MODEL_MANIFEST

    summary = TrainingSummary(2, 2, False, 4, 2, 2.0, 1.25, 3.5)

    def operator(k: FakeKube, ns, name):
        model = work / "train" / "model"
        model.mkdir(parents=True)
        manifest = {"summary": summary.to_json(), **({"run": identity} if identity else {})}
        (model / MODEL_MANIFEST).write_text(json.dumps(manifest))
        records = [StepRecord(step, loss, 1e-4, 1.0, 100, 10.0, 1.0) for step, loss in ((0, 2.0), (1, 1.25))]
        (work / "train" / "metrics.jsonl").write_text(
            "".join(json.dumps(r.to_json()) + "\n" for r in records)
        )
        k.set_condition(ns, name, "Succeeded")

    return operator, summary


def dataset_manifest(tmp_path: Path, sequences: int = 64) -> str:
    """A dataset manifest with a training split of `sequences`: the train step reads it before it
    launches anything (enough sequences for a global batch?)."""
    from fulltune.preprocess.dataset import MANIFEST_FORMAT

    path = tmp_path / "dataset.json"
    splits = {"train": {"sequences": sequences, "tokens": sequences * 8}}
    path.write_text(json.dumps({"format": MANIFEST_FORMAT, "max_seq_len": 8, "splits": splits}))
    return str(path)


def kubernetes_cfg(kube, tmp_path: Path, monkeypatch) -> tuple[RunConfig, Path]:
    """A launcher: kubernetes config whose work directory is tmp_path/work, with the kube context
    pointing at the stand-in."""
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path, kube.host)))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    work = tmp_path / "work"
    cfg = RunConfig.from_dict(
        {
            "work_dir": str(work),
            "training": {"max_steps": 2},  # as plan resolves the length
            "resources": {"launcher": "kubernetes", "nproc_per_node": 2, "kubernetes": {"namespace": NS}},
        }
    )
    return cfg, work


def test_run_training_dispatches_to_kubernetes_and_checks_the_model(kube, tmp_path, monkeypatch):
    from fulltune.train.run import run_training

    cfg, work = kubernetes_cfg(kube, tmp_path, monkeypatch)
    dataset = dataset_manifest(tmp_path)
    identity = checkpoint.run_identity(cfg, load_manifest(dataset))
    kube.script, SUMMARY = succeeding_operator(work, identity)  # noqa: N806 — a constant of this test
    result = run_training(cfg, dataset, run_id="run-7", task_name="train", image="img:9")
    assert result.summary == SUMMARY and [r.loss for r in result.records] == [2.0, 1.25]
    (post,) = kube.calls("POST")
    assert post.body["metadata"]["name"] == job_name("run-7", "train")
    container = post.body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["image"] == "img:9"
    assert str(work / "train" / "model") in container["command"]

    # the step again once the run's model is complete (its pod lost after the job finished, a resumed
    # run whose evaluate failed): that model, not a second training; one of other settings refused
    assert run_training(cfg, dataset, run_id="run-7", task_name="train") == result
    other = cfg.with_overrides({"training.seed": 7})
    with pytest.raises(
        checkpoint.CheckpointError, match="training.seed: 42 when it was written, 7 in this run"
    ):
        run_training(other, dataset, run_id="run-7", task_name="train")
    assert len(kube.calls("POST")) == 1

    # the same run and task again: the job is adopted, and a job without a model fails the step
    kube.script = None
    for path in sorted((work / "train").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    with pytest.raises(LaunchError, match="model is incomplete"):
        run_training(cfg, dataset, run_id="run-7", task_name="train", image="img:9")
    assert len(kube.calls("POST")) == 2 and not kube.calls("DELETE")

    # a dataset smaller than one global batch (2 ranks x 1 sequence): refused, no job created
    with pytest.raises(TrainInputError, match="fewer than one global batch of 2"):
        run_training(cfg, dataset_manifest(tmp_path, sequences=1), run_id="run-9", task_name="train")
    assert len(kube.calls("POST")) == 2

    # a checkpoint to resume that a run with another learning rate and batch wrote: refused, each
    # field named; no job created. One that records no run is resumed as it is.
    dataset = dataset_manifest(tmp_path)
    tag = work / "train" / "checkpoints" / checkpoint.tag_for(1)
    tag.mkdir(parents=True)
    other = cfg.with_overrides({"training.learning_rate": 3e-4, "training.per_device_train_batch_size": 4})
    identity = checkpoint.run_identity(other, load_manifest(dataset))
    (tag / checkpoint.MANIFEST).write_text(json.dumps({"step": 1, "run": identity, "files": []}))
    with pytest.raises(checkpoint.CheckpointError) as refused:
        run_training(cfg, dataset, run_id="run-10", task_name="train")
    assert str(refused.value).splitlines()[1:3] == [
        "  - training.per_device_train_batch_size: 4 when it was written, 1 in this run",
        "  - training.learning_rate: 0.0003 when it was written, None in this run",
    ]
    assert len(kube.calls("POST")) == 2
    (tag / checkpoint.MANIFEST).write_text(json.dumps({"step": 1, "files": []}))
    checkpoint.check_newest(
        str(work / "train" / "checkpoints"), checkpoint.run_identity(cfg, load_manifest(dataset)), 1
    )


def test_the_train_step_hands_the_pipelines_s3_and_mlflow_secrets_to_the_training_pods(
    kube, tmp_path, monkeypatch, crd_validator
):
    """The train component's s3_secret and mlflow_secret (names only) become optional envFrom
    references of every training pod, so the mlflow client there finds MLFLOW_TRACKING_* too."""
    from fulltune import steps

    cfg, work = kubernetes_cfg(kube, tmp_path, monkeypatch)
    kube.script, _ = succeeding_operator(work)
    model_uri = steps.train(
        cfg,
        dataset_manifest(tmp_path),
        run_id="run-8",
        task_name="train",
        image="img:9",
        s3_secret="fulltune-s3",
        mlflow_secret="team-mlflow",
    )
    assert model_uri == str(work / "train" / "model")
    (post,) = kube.calls("POST")
    validate_manifest(crd_validator, post.body)
    container = post.body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [
        {"secretRef": {"name": "fulltune-s3", "optional": True}},
        {"secretRef": {"name": "team-mlflow", "optional": True}},
    ]
    assert not [e for e in container["env"] if e["name"].startswith("MLFLOW_")]  # never as values


def test_the_mlflow_secret_reaches_every_training_pod_as_an_optional_reference(crd_validator):
    cfg = make_cfg(num_nodes=3, kubernetes={"secret_env": ["hf-token"]})
    m = build_pytorchjob(
        cfg,
        make_job(cfg),
        name="fulltune-train-0123456789",
        namespace=NS,
        image="img:1",
        optional_secrets=("fulltune-s3", "team-mlflow"),
    )
    validate_manifest(crd_validator, m)
    for role in ("Master", "Worker"):
        container = m["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]["containers"][0]
        assert container["envFrom"] == [
            {"secretRef": {"name": "hf-token"}},
            {"secretRef": {"name": "fulltune-s3", "optional": True}},
            {"secretRef": {"name": "team-mlflow", "optional": True}},
        ], role


def test_the_compiled_train_task_gets_its_run_task_image_secret_and_workflow_name(monkeypatch):
    from fulltune._image import default_image, default_trainer_image

    monkeypatch.delenv("FULLTUNE_IMAGE", raising=False)
    monkeypatch.delenv("FULLTUNE_TRAINER_IMAGE", raising=False)
    spec, platform = yaml.safe_load_all((ROOT / "pipelines" / "full_finetune.yaml").read_text())
    params = spec["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]
    assert params["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    assert params["task_name"]["runtimeValue"]["constant"] == "{{$.pipeline_task_name}}"
    # training pods run the trainer image (CUDA, DeepSpeed); so does the GPU evaluate step
    assert params["image"]["runtimeValue"]["constant"] == default_trainer_image()
    images = {name: e["container"]["image"] for name, e in spec["deploymentSpec"]["executors"].items()}
    assert images.pop("exec-evaluate") == default_trainer_image()
    assert set(images.values()) == {default_image()}
    # and read the S3 credentials from the same Secret as the step pods
    secret = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]["secretAsEnv"]
    assert params["s3_secret"]["runtimeValue"]["constant"] == secret[0]["secretName"]
    train = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    workflow = {
        "name": "FULLTUNE_WORKFLOW_NAME",
        "fieldPath": "metadata.labels['workflows.argoproj.io/workflow']",
    }
    assert workflow in train["fieldPathAsEnv"]


@pytest.mark.parametrize("delete", [False, True])
def test_a_finished_run_keeps_or_deletes_its_checkpoints_and_says_so(tmp_path, s3, caplog, delete):
    from fulltune.train.run import _checkpoints_after_success

    root = f"{s3}/work/train/checkpoints"
    storage.write_bytes(f"{root}/step-00000002/mp_rank_00_model_states.pt", b"x" * 2048)
    storage.write_bytes(f"{root}/step-00000002/checkpoint_manifest.json", b"{}")
    cfg = RunConfig.from_dict({"training": {"delete_checkpoints_after_success": delete}})
    with caplog.at_level("INFO", logger="fulltune.train.run"):
        _checkpoints_after_success(cfg, root)
    assert (storage.list_files(root) == []) is delete
    said = "deleted the run's checkpoints" if delete else "kept the run's checkpoints"
    assert f"{said} at {root}" in caplog.text
