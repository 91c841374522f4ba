"""`fulltune doctor` against the Kubernetes stand-in, the KFP stand-in and a moto S3 server, through
the real clients: each broken thing a first install meets is reported with its fix; a cluster with
everything in place passes."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import yaml

from fulltune.cli import main
from fulltune.launch.kubernetes import LAUNCHER_ACCESS, launcher_access
from fulltune.launch.scheduling import requested_on_nodes
from k8s_standin import FakeKube
from kfp_standin import KFPStandIn
from support.crd_schema import TRAINJOB_CRDS, crd_schema

NS = "team-a"
TRAINER_V2 = {"trainer.kubeflow.org/v1alpha1": ["trainjobs", "trainjobs/status"]}
RUNTIME = {
    "apiVersion": "trainer.kubeflow.org/v1alpha1",
    "kind": "ClusterTrainingRuntime",
    "metadata": {"name": "fulltune-torch-distributed"},
    "spec": {"template": {"spec": {"replicatedJobs": []}}},
}


def node(
    name: str, allocatable: dict[str, str], labels: dict | None = None, taints: list | None = None
) -> dict:
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"taints": taints or []},
        "status": {"allocatable": {"pods": "110", "ephemeral-storage": "400Gi", **allocatable}},
    }


@pytest.fixture
def cluster(tmp_path, monkeypatch, s3):
    """A namespace with everything a run needs: the operator's API, the launcher's verbs, the S3
    Secret, a bucket, no injection, a roomy quota. Tests break one thing each."""
    with FakeKube() as kube, KFPStandIn(multi_user=True) as kfp:
        kube.trainjob_schema = crd_schema(TRAINJOB_CRDS["v2.3.0"], "v1alpha1")  # read for launcher trainjob
        kube.allowed = set(LAUNCHER_ACCESS)
        kube.secrets[(NS, "fulltune-s3")] = {"metadata": {"name": "fulltune-s3", "namespace": NS}}
        kube.namespaces[NS] = {"labels": {}}
        kube.quotas[NS] = [
            {
                "metadata": {"name": "kf-resource-quota"},
                "status": {
                    "hard": {
                        "requests.nvidia.com/gpu": "16",
                        "requests.cpu": "200",
                        "requests.memory": "2Ti",
                    },
                    "used": {
                        "requests.nvidia.com/gpu": "4",
                        "requests.cpu": "10",
                        "requests.memory": "100Gi",
                    },
                },
            }
        ]
        kube.nodes = [
            node("gpu-a", {"nvidia.com/gpu": "8", "cpu": "95500m", "memory": "1900Gi"}),
            node("gpu-b", {"nvidia.com/gpu": "8", "cpu": "95500m", "memory": "1900Gi"}),
            node("system-1", {"cpu": "7910m", "memory": "29Gi"}),
        ]
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": {"server": kube.host}}],
                    "users": [{"name": "u", "user": {"token": "t"}}],
                    "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": NS}}],
                    "current-context": "x",
                }
            )
        )
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.delenv("KFP_NAMESPACE", raising=False)
        monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-token"))
        monkeypatch.setattr("fulltune.kfp.submit.POD_NAMESPACE_FILE", str(tmp_path / "no-namespace"))
        config = tmp_path / "run.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "work_dir": f"{s3}/runs",
                    "model": {"base_model_uri": f"{s3}/models/llama"},
                    "data": {"train_uri": f"{s3}/data/train.jsonl"},
                    "resources": {
                        "launcher": "kubernetes",
                        "num_nodes": 2,
                        "nproc_per_node": 4,
                        "kubernetes": {"cpu": "32", "memory": "256Gi"},
                    },
                }
            )
        )
        yield kube, kfp, str(config)


def doctor(kfp, config, capsys) -> tuple[int, str]:
    code = main(["doctor", "--config", config, "--host", kfp.url])
    return code, capsys.readouterr().out


def test_a_cluster_with_everything_in_place_passes(cluster, capsys):
    kube, kfp, config = cluster
    code, out = doctor(kfp, config, capsys)
    assert code == 0, out
    assert f"in namespace {NS}" in out  # from the kube context
    assert "FAIL" not in out
    for check in (
        "KFP API",
        "PyTorchJob API",
        "launcher RBAC",
        "S3 Secret",
        "work_dir bucket",
        "Istio",
        "quota",
        "nodes",
    ):
        assert f"] {check}:" in out
    assert "multi-user" in out
    assert "requests.nvidia.com/gpu 8" in out  # 2 nodes x 4 GPUs
    assert "requests.memory 512Gi, limits.memory 512Gi" in out  # as a quota writes it
    assert (
        "[     ok] nodes: 2 of 3 nodes can each hold a training pod (nvidia.com/gpu 4, cpu 32, memory 256Gi), 2 needed"
        in out
    )


def test_a_missing_training_operator_is_reported_with_its_fix(cluster, capsys):
    kube, kfp, config = cluster
    kube.api_resources.clear()
    code, out = doctor(kfp, config, capsys)
    assert code == 1
    assert (
        "[   FAIL] PyTorchJob API: pytorchjobs.kubeflow.org/v1 is not served; "
        "TrainJob is not served (trainjobs.trainer.kubeflow.org/v1alpha1)" in out
    )
    assert "install the Kubeflow Training Operator" in out


def with_launcher(config: str, launcher: str, **kubernetes) -> None:
    data = yaml.safe_load(open(config))
    data["resources"]["launcher"] = launcher
    data["resources"]["kubernetes"].update(kubernetes)
    with open(config, "w") as f:
        yaml.safe_dump(data, f)


def test_a_cluster_with_trainer_v2_only_says_to_set_the_trainjob_launcher(cluster, capsys):
    kube, kfp, config = cluster
    kube.api_resources = dict(TRAINER_V2)
    code, out = doctor(kfp, config, capsys)
    assert code == 1
    assert (
        "[   FAIL] PyTorchJob API: pytorchjobs.kubeflow.org/v1 is not served; "
        "TrainJob is served (trainjobs.trainer.kubeflow.org/v1alpha1)" in out
    )
    assert (
        "fix: this cluster serves TrainJob (Kubeflow Trainer v2), not PyTorchJob: set resources.launcher: trainjob"
        in out
    )


def test_a_cluster_with_the_training_operator_only_says_to_set_the_kubernetes_launcher(cluster, capsys):
    kube, kfp, config = cluster
    with_launcher(config, "trainjob")
    kube.allowed = set(launcher_access("trainjob"))
    kube.put_runtime(RUNTIME)
    code, out = doctor(kfp, config, capsys)
    assert code == 1
    assert "[   FAIL] TrainJob API: trainjobs.trainer.kubeflow.org/v1alpha1 is not served" in out
    assert (
        "fix: this cluster serves PyTorchJob (Kubeflow Training Operator), not TrainJob: "
        "set resources.launcher: kubernetes" in out
    )


def test_a_cluster_without_trainer_is_not_sent_to_install_a_runtime_or_set_a_field(cluster, capsys):
    """Without Kubeflow Trainer the runtime and the TrainJob schema are missing because their API is:
    the API check names the fix; the runtime and field checks do not add fixes that cannot help."""
    kube, kfp, config = cluster
    with_launcher(config, "trainjob")
    kube.allowed = set(launcher_access("trainjob"))
    code, out = doctor(kfp, config, capsys)
    assert code == 1
    assert "[   FAIL] TrainJob API: trainjobs.trainer.kubeflow.org/v1alpha1 is not served" in out
    assert (
        "[unknown] TrainJob runtime: cannot read ClusterTrainingRuntime fulltune-torch-distributed: " in out
    )
    assert (
        "[unknown] TrainJob pod settings: cannot read the TrainJob schema: this cluster does not serve" in out
    )
    assert "install the chart's runtime" not in out and "overrides_field" not in out


def test_a_trainjob_cluster_with_everything_in_place_passes(cluster, capsys):
    kube, kfp, config = cluster
    with_launcher(config, "trainjob")
    kube.api_resources.update(TRAINER_V2)  # both served: either launcher would do
    # what the chart grants: the namespaced verbs, and a read of the one runtime by name (resourceNames)
    runtime_read = ("trainer.kubeflow.org", "clustertrainingruntimes", "get")
    kube.allowed = {a for a in launcher_access("trainjob") if "runtimes" not in a[1]}
    kube.allowed.add((*runtime_read, "fulltune-torch-distributed"))
    kube.put_runtime(RUNTIME)
    code, out = doctor(kfp, config, capsys)
    assert code == 0, out
    assert (
        "[     ok] TrainJob API: trainjobs.trainer.kubeflow.org/v1alpha1 is served; "
        "PyTorchJob is served (pytorchjobs.kubeflow.org/v1)" in out
    )
    assert "[     ok] TrainJob runtime: ClusterTrainingRuntime fulltune-torch-distributed exists" in out
    assert (
        "[     ok] TrainJob pod settings: the TrainJob carries them in runtimePatches "
        "(Kubeflow Trainer v2.2 and later)" in out
    )
    n = len(launcher_access("trainjob")) - 1  # one runtime kind is read, not both
    assert (
        f"[     ok] launcher RBAC: all {n} verbs the launcher needs are allowed (checked as the caller)"
        in out
    )
    assert "requests.nvidia.com/gpu 8" in out  # the same pods, whichever kind makes them
    # the runtime is read cluster-wide, and its access reviewed without a namespace, as the API
    # server authorizes a cluster-scoped resource
    assert kube.calls(
        "GET", "/apis/trainer.kubeflow.org/v1alpha1/clustertrainingruntimes/fulltune-torch-distributed"
    )
    reviews = [r.body["spec"]["resourceAttributes"] for r in kube.calls("POST", "/selfsubjectaccessreviews")]
    scope = {
        (a["resource"], a.get("namespace"), a.get("name")) for a in reviews if "runtimes" in a["resource"]
    }
    assert scope == {("clustertrainingruntimes", None, "fulltune-torch-distributed")}


def test_a_missing_runtime_is_named_with_its_fix_and_an_unreadable_one_is_unknown(cluster, capsys):
    kube, kfp, config = cluster
    kube.api_resources = dict(TRAINER_V2)
    kube.allowed = set(launcher_access("trainjob"))
    with_launcher(config, "trainjob")
    code, out = doctor(kfp, config, capsys)
    assert code == 1
    assert (
        "[   FAIL] TrainJob runtime: ClusterTrainingRuntime fulltune-torch-distributed does not exist" in out
    )
    assert "install the chart's runtime" in out and "set resources.trainjob.runtime" in out

    data = yaml.safe_load(open(config))
    data["resources"]["trainjob"] = {"runtime": "team-torch", "runtime_kind": "TrainingRuntime"}
    with open(config, "w") as f:
        yaml.safe_dump(data, f)
    code, out = doctor(kfp, config, capsys)
    assert code == 1
    assert "TrainJob runtime: TrainingRuntime team-torch does not exist in team-a" in out
    kube.put_runtime(
        {**RUNTIME, "kind": "TrainingRuntime", "metadata": {"name": "team-torch", "namespace": NS}}
    )
    code, out = doctor(kfp, config, capsys)
    assert code == 0, out
    assert "[     ok] TrainJob runtime: TrainingRuntime team-torch exists in team-a" in out

    kube.forbidden = {"trainingruntimes"}
    code, out = doctor(kfp, config, capsys)
    assert code == 0
    assert "[unknown] TrainJob runtime: cannot read TrainingRuntime team-torch in team-a (403)" in out


def test_settings_a_trainjob_cannot_carry_are_named_with_where_they_go(cluster, capsys):
    kube, kfp, config = cluster
    kube.api_resources = dict(TRAINER_V2)
    kube.allowed = set(launcher_access("trainjob"))
    kube.put_runtime(RUNTIME)
    with_launcher(config, "trainjob", priority_class_name="high")
    code, out = doctor(kfp, config, capsys)
    assert code == 1
    assert "[   FAIL] TrainJob settings: resources.kubernetes.priority_class_name: a TrainJob" in out
    assert "fix: set it in the runtime (the chart: trainJob.runtime.priorityClassName)" in out


def test_the_trainjob_field_the_clusters_trainer_serves_is_checked_against_the_config(cluster, capsys):
    kube, kfp, config = cluster
    kube.api_resources = dict(TRAINER_V2)
    kube.allowed = set(launcher_access("trainjob"))
    kube.put_runtime(RUNTIME)
    kube.trainjob_schema = crd_schema(TRAINJOB_CRDS["v2.1.0"], "v1alpha1")
    with_launcher(config, "trainjob")
    code, out = doctor(kfp, config, capsys)
    assert code == 0, out
    assert (
        "[     ok] TrainJob pod settings: the TrainJob carries them in podTemplateOverrides (Kubeflow Trainer v2.1)"
        in out
    )

    data = yaml.safe_load(open(config))
    data["resources"]["trainjob"] = {"overrides_field": "runtimePatches"}
    with open(config, "w") as f:
        yaml.safe_dump(data, f)
    code, out = doctor(kfp, config, capsys)
    assert code == 1
    assert (
        "[   FAIL] TrainJob pod settings: resources.trainjob.overrides_field is runtimePatches; this cluster's "
        "TrainJob takes podTemplateOverrides (Kubeflow Trainer v2.1)" in out
    )
    assert "fix: set resources.trainjob.overrides_field: auto (or podTemplateOverrides)" in out

    kube.trainjob_schema = None  # not published: the config's field is taken as it is
    code, out = doctor(kfp, config, capsys)
    assert code == 0 and "[unknown] TrainJob pod settings: cannot read the TrainJob schema (404)" in out


def test_a_trainjob_launcher_missing_its_verbs_names_them(cluster, capsys):
    kube, kfp, config = cluster
    kube.api_resources = dict(TRAINER_V2)
    kube.put_runtime(RUNTIME)
    with_launcher(config, "trainjob")  # the PyTorchJob launcher's verbs are not the TrainJob's
    code, out = doctor(kfp, config, capsys)
    assert code == 1
    assert "launcher RBAC: not allowed in team-a: create trainjobs.trainer.kubeflow.org" in out
    assert "get clustertrainingruntimes.trainer.kubeflow.org" in out
    assert "pytorchjobs" not in out.split("launcher RBAC")[1].splitlines()[0]


def test_a_named_service_account_has_its_own_access_reviewed(cluster, capsys):
    kube, kfp, config = cluster
    user = f"system:serviceaccount:{NS}:fulltune"

    def as_account() -> tuple[int, str]:
        code = main(["doctor", "--config", config, "--host", kfp.url, "--service-account", "fulltune"])
        return code, capsys.readouterr().out

    code, out = as_account()
    assert code == 1
    assert "launcher RBAC: not allowed in team-a: create pytorchjobs.kubeflow.org" in out
    assert f"(checked as {user})" in out
    kube.allowed_for[user] = set(LAUNCHER_ACCESS)
    code, out = as_account()
    assert code == 0, out
    assert f"verbs the launcher needs are allowed (checked as {user})" in out
    kube.forbidden = {"subjectaccessreviews"}
    code, out = as_account()
    assert code == 0
    assert f"[unknown] launcher RBAC: cannot review the access of {user} (403)" in out


def test_a_missing_verb_is_named_with_its_fix(cluster, capsys):
    kube, kfp, config = cluster
    kube.allowed = set(LAUNCHER_ACCESS) - {("", "pods/log", "get"), ("kubeflow.org", "pytorchjobs", "delete")}
    code, out = doctor(kfp, config, capsys)
    assert code == 1
    assert "launcher RBAC: not allowed in team-a: delete pytorchjobs.kubeflow.org, get pods/log" in out
    assert "(checked as the caller)" in out
    assert "--service-account" in out and "rbac.extraServiceAccounts" in out


def test_a_missing_s3_secret_is_reported_with_the_command_that_creates_it(cluster, capsys):
    kube, kfp, config = cluster
    kube.secrets.clear()
    code, out = doctor(kfp, config, capsys)
    assert code == 1
    assert "S3 Secret: fulltune-s3 is not in team-a" in out
    assert "kubectl -n team-a create secret generic fulltune-s3" in out


def test_no_s3_secret_under_workload_identity_is_not_a_failure(cluster, capsys):
    """s3.existingSecret "" (IRSA, GKE workload identity), which the chart passes as --s3-secret='':
    there is no Secret to find, so `helm test` must not fail on one named ''."""
    kube, kfp, config = cluster
    kube.secrets.clear()
    code = main(["doctor", "--config", config, "--host", kfp.url, "--s3-secret", ""])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[     ok] S3 Secret: none named" in out


def test_the_model_registry_is_asked_before_register_would_find_it_wrong(
    cluster, capsys, tmp_path, monkeypatch
):
    """registry.kubeflow names the endpoint register records versions in, after the training: the
    doctor asks it now, as its own identity, and tells a wrong address from a refusal."""
    from mr_standin import ModelRegistryStandIn
    from test_train import closed_port

    kube, kfp, config = cluster
    monkeypatch.setenv("MODEL_REGISTRY_TOKEN", "doctor-token")

    def with_registry(address: str, port: int) -> str:
        run = yaml.safe_load(open(config))
        run["registry"] = {"kubeflow": {"server_address": address, "port": port, "is_secure": False}}
        path = tmp_path / f"mr-{port}.yaml"
        path.write_text(yaml.safe_dump(run))
        return str(path)

    with ModelRegistryStandIn() as mr:
        code, out = doctor(kfp, with_registry(mr.address, mr.port), capsys)
        assert code == 0, out
        assert (
            f"[     ok] Model Registry: {mr.address}:{mr.port}/api/model_registry/v1/registered_models" in out
        )
        assert mr.requests[-1].headers["authorization"] == "Bearer doctor-token"
        mr.fail(1, status=403)
        code, out = doctor(kfp, with_registry(mr.address, mr.port), capsys)
        assert code == 0  # the register step may have another identity: a warning
        assert "answers HTTP 403 to this identity" in out and "fulltune-model-registry Secret" in out
    code, out = doctor(kfp, with_registry("http://127.0.0.1", closed_port()), capsys)
    assert code == 1
    assert "[   FAIL] Model Registry: cannot reach http://127.0.0.1:" in out
    assert "check registry.kubeflow.server_address and port" in out


def test_a_registry_in_a_bucket_that_does_not_answer_fails(cluster, capsys, tmp_path):
    """The registry is written last, with the same S3 Secret: its bucket is checked beside work_dir's."""
    kube, kfp, config = cluster
    run = yaml.safe_load(open(config))
    run["registry"] = {"uri": "s3://fulltune-no-such-registry/models"}
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump(run))
    code, out = doctor(kfp, str(tmp_path / "registry.yaml"), capsys)
    assert code == 1
    assert "[     ok] work_dir bucket: " in out
    assert "[   FAIL] registry.uri bucket: s3://fulltune-no-such-registry: " in out


def test_istio_injection_on_is_reported_with_what_it_means(cluster, capsys):
    kube, kfp, config = cluster
    kube.namespaces[NS] = {"labels": {"istio-injection": "enabled"}}
    code, out = doctor(kfp, config, capsys)
    assert code == 0  # the training pods opt out: a warning, not a failure
    assert "[   warn] Istio: injection on in team-a; training pods opt out" in out
    assert "sidecar.istio.io/inject" in out


def chart_runtime(**runtime_values) -> dict:
    """The ClusterTrainingRuntime the chart installs, rendered by the Helm engine."""
    from test_chart import CHART, helm, render

    values = {"training": {"launcher": "trainjob"}, "trainJob": {"runtime": runtime_values}}
    with helm.Chart.load(CHART) as chart:
        return next(o for o in render(chart, values) if o["kind"] == "ClusterTrainingRuntime")


def trainjob_in_an_injected_namespace(cluster, runtime: dict) -> None:
    kube, kfp, config = cluster
    with_launcher(config, "trainjob")
    kube.api_resources = dict(TRAINER_V2)
    kube.allowed = set(launcher_access("trainjob"))
    kube.namespaces[NS] = {"labels": {"istio-injection": "enabled"}}
    kube.put_runtime(runtime)


def test_istio_for_a_trainjob_is_what_its_runtime_says(cluster, capsys):
    """A TrainJob's pods get their Istio setting from the runtime, not from the config (which the
    TrainJob cannot carry): the chart's runtime opts out; a runtime that does not (Kubeflow's own
    torch-distributed) gives the training pods sidecars, which the doctor says, with the fix."""
    kube, kfp, config = cluster
    trainjob_in_an_injected_namespace(cluster, chart_runtime())
    code, out = doctor(kfp, config, capsys)
    assert "[   warn] Istio: injection on in team-a; training pods opt out" in out, out

    bare = copy.deepcopy(chart_runtime())
    pod_meta = bare["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"][
        "metadata"
    ]
    pod_meta["labels"].pop("sidecar.istio.io/inject")
    pod_meta["annotations"].pop("sidecar.istio.io/inject")
    kube.put_runtime(bare)
    code, out = doctor(kfp, config, capsys)
    assert (
        "[   warn] Istio: injection on in team-a; training pods keep sidecars "
        "(ClusterTrainingRuntime fulltune-torch-distributed's pod template does not opt out)" in out
    ), out
    assert 'sidecar.istio.io/inject: "false"' in out and "trainJob.runtime.create" in out
    assert "resources.kubernetes.istio_sidecar" not in out  # refused with a TrainJob: no fix

    kube.put_runtime(chart_runtime(istioSidecar=True))
    code, out = doctor(kfp, config, capsys)
    assert "training pods keep sidecars" in out and "trainJob.runtime.istioSidecar: false" in out


def test_a_quota_without_room_for_the_gpus_fails(cluster, capsys):
    kube, kfp, config = cluster
    kube.quotas[NS][0]["status"]["used"]["requests.nvidia.com/gpu"] = "12"
    code, out = doctor(kfp, config, capsys)
    assert code == 1
    assert "kf-resource-quota: requests.nvidia.com/gpu needs 8, 16 hard, 12 used" in out


def test_a_quota_in_the_kubeflow_profile_form_is_counted(cluster, capsys):
    """Kubeflow's Profile examples write the quota's requests as bare `cpu` and `memory` (the same
    amounts as requests.cpu and requests.memory): a quota without room there fails too, rather than
    the pods being forbidden ("exceeded quota") once the job exists."""
    kube, kfp, config = cluster
    kube.quotas[NS][0]["status"] = {
        "hard": {"cpu": "48", "memory": "1Ti", "requests.nvidia.com/gpu": "16", "count/pods": "20"},
        "used": {"cpu": "10", "memory": "100Gi", "requests.nvidia.com/gpu": "0", "count/pods": "19"},
    }
    code, out = doctor(kfp, config, capsys)
    assert code == 1, out
    assert "kf-resource-quota: cpu needs 64, 48 hard, 10 used" in out
    assert "kf-resource-quota: count/pods needs 2, 20 hard, 19 used" in out
    assert "memory needs" not in out  # 1Ti - 100Gi has room for 512Gi


def test_gpu_nodes_the_pods_cannot_go_on_are_named_with_what_to_set(cluster, capsys, tmp_path):
    """The usual first-install Pending pods: the GPU nodes carry a taint the pods do not tolerate."""
    kube, kfp, config = cluster
    for gpu_node in kube.nodes[:2]:
        gpu_node["spec"]["taints"] = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    kube.nodes[2]["spec"]["taints"] = [{"key": "spot", "effect": "PreferNoSchedule"}]  # a preference only
    code, out = doctor(kfp, config, capsys)
    assert code == 0, out  # a cluster autoscaler may add fitting nodes: a warning, not a failure
    assert (
        "[   warn] nodes: 0 of 3 nodes can each hold a training pod (nvidia.com/gpu 4, cpu 32, memory "
    ) in out
    assert "gpu-a, gpu-b: taint nvidia.com/gpu=present:NoSchedule not tolerated" in out
    assert "system-1: nvidia.com/gpu 0 allocatable, 4 needed" in out
    assert "add the taint to resources.kubernetes.tolerations" in out and "no GPU device plugin" in out

    tolerating = yaml.safe_load(open(config))
    tolerating["resources"]["kubernetes"]["tolerations"] = [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    (tmp_path / "tolerating.yaml").write_text(yaml.safe_dump(tolerating))
    code, out = doctor(kfp, str(tmp_path / "tolerating.yaml"), capsys)
    assert "[     ok] nodes: 2 of 3 nodes can each hold a training pod" in out, out


def bound_pod(name: str, node_name: str, phase: str = "Running", ns: str = "team-b", **resources) -> dict:
    """Another team's pod the scheduler has put on `node_name`, with its container's resources."""
    return {
        "metadata": {"name": name, "namespace": ns, "labels": {}},
        "spec": {"nodeName": node_name, "containers": [{"name": "main", "resources": resources}]},
        "status": {"phase": phase},
    }


def test_gpus_other_pods_hold_now_are_told_from_gpus_a_node_lacks(cluster, capsys):
    """Both GPU nodes fit by allocatable, but another team's job holds 6 of gpu-a's 8 GPUs: the
    training pods would wait for it. Pods that ended hold nothing; a limit alone is the request."""
    kube, kfp, config = cluster
    kube.pods[("team-b", "sweep-0")] = bound_pod("sweep-0", "gpu-a", limits={"nvidia.com/gpu": "6"})
    kube.pods[("team-b", "sweep-1")] = bound_pod("sweep-1", "gpu-b", requests={"nvidia.com/gpu": "2"})
    kube.pods[("team-b", "done")] = bound_pod("done", "gpu-b", "Succeeded", requests={"nvidia.com/gpu": "8"})
    code, out = doctor(kfp, config, capsys)
    assert code == 0, out  # other pods end: a warning
    assert "[   warn] nodes: 2 of 3 nodes can each hold a training pod" in out, out
    assert "2 needed; 1 with room now; gpu-a: nvidia.com/gpu 6 of 8 requested by pods there, 4 needed" in out
    assert "the training pods wait until those pods end" in out

    del kube.pods[("team-b", "sweep-0")]
    code, out = doctor(kfp, config, capsys)
    assert "[     ok] nodes: 2 of 3 nodes can each hold a training pod" in out and "2 with room now" in out

    kube.forbidden.add("pods")  # a profile's user may not list every namespace's pods
    code, out = doctor(kfp, config, capsys)
    assert (
        "[     ok] nodes: 2 of 3 nodes" in out
        and "cannot list pods (403): what runs there not counted" in out
    )


def test_a_pods_request_is_counted_as_the_scheduler_counts_it():
    """Containers summed, sidecars (restartable init containers) with them, an ordinary init
    container's peak beside the sidecars started before it when larger, the overhead on top."""
    from kubernetes.client import ApiClient

    def pod(spec: dict):  # as the client reads it from the API server's JSON
        response = SimpleNamespace(data=json.dumps({"metadata": {"name": "p"}, "spec": spec}))
        return ApiClient().deserialize(response, "V1Pod")

    gpu = "nvidia.com/gpu"
    spec = {
        "nodeName": "gpu-a",
        "initContainers": [
            {"name": "proxy", "restartPolicy": "Always", "resources": {"requests": {"cpu": "500m"}}},
            {"name": "fetch", "resources": {"requests": {"cpu": "4", "memory": "1Gi"}}},
        ],
        "containers": [
            {"name": "a", "resources": {"requests": {"cpu": "1", gpu: "1"}, "limits": {gpu: "1"}}},
            {"name": "b", "resources": {"limits": {"cpu": "2", "memory": "2Gi"}}},
        ],
        "overhead": {"memory": "64Mi"},
    }
    used = requested_on_nodes([pod(spec), pod({**spec, "nodeName": None})])
    assert used == {"gpu-a": {"cpu": 4.5, "memory": 2 * 2**30 + 64 * 2**20, gpu: 1.0}}


def test_nodes_too_small_cordoned_or_unlabelled_for_the_pods_are_told_apart(cluster, capsys, tmp_path):
    kube, kfp, config = cluster
    kube.nodes[0]["spec"]["unschedulable"] = True
    kube.nodes[1]["metadata"]["labels"] = {"pool": "h100"}
    kube.nodes.append(
        node("gpu-c", {"nvidia.com/gpu": "4", "cpu": "95500m", "memory": "1900Gi"}, {"pool": "h100"})
    )
    wide = yaml.safe_load(open(config))
    wide["resources"].update(nproc_per_node=8, num_nodes=1)
    wide["resources"]["kubernetes"]["node_selector"] = {"pool": "h100"}
    (tmp_path / "wide.yaml").write_text(yaml.safe_dump(wide))
    code, out = doctor(kfp, str(tmp_path / "wide.yaml"), capsys)
    assert "[   warn] nodes: 1 of 4 nodes can each hold a training pod" not in out
    assert "nodes: 1 of 4 nodes can each hold a training pod (nvidia.com/gpu 8, " in out, out  # gpu-b
    assert "[     ok] nodes:" in out

    wide["resources"].update(num_nodes=2)
    (tmp_path / "wide.yaml").write_text(yaml.safe_dump(wide))
    code, out = doctor(kfp, str(tmp_path / "wide.yaml"), capsys)
    assert "[   warn] nodes: 1 of 4 nodes can each hold a training pod" in out and ", 2 needed" in out
    assert "gpu-a: cordoned" in out
    assert "system-1: no label pool=h100 (node_selector)" in out
    assert "gpu-c: nvidia.com/gpu 4 allocatable, 8 needed" in out
    assert "lower resources.nproc_per_node to the GPUs one node has" in out
    assert "set resources.kubernetes.node_selector" in out and "uncordon" in out


def test_nodes_whose_gpus_lack_the_memory_or_the_bf16_the_plan_assumed_do_not_count(
    cluster, capsys, tmp_path
):
    """GPU feature discovery's labels give each node's GPU memory and compute capability: a pod planned
    for 80 GiB GPUs would run out of memory at its first step on 24 GiB ones, and a bf16 one fail on a
    T4; GPUs well above the plan's are said, since plan left their memory (and speed) unused."""
    kube, kfp, config = cluster
    gfd = {"nvidia.com/gpu.product": "NVIDIA-A10G", "nvidia.com/gpu.memory": "23028"}
    kube.nodes[0]["metadata"]["labels"] = gfd
    h100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.memory": "81559"}
    kube.nodes[1]["metadata"]["labels"] = h100  # 79.6 GiB: what an "80 GB" GPU shows
    code, out = doctor(kfp, config, capsys)
    assert code == 0
    assert "[   warn] nodes: 1 of 3 nodes can each hold a training pod" in out, out
    assert (
        "gpu-a: NVIDIA-A10G has 22.5 GiB a GPU, the memory plan assumed 80 (resources.gpu_memory_gib)" in out
    )
    assert "set resources.gpu_memory_gib (and gpu_type) to the training nodes' GPUs and plan again" in out

    t4 = {
        "nvidia.com/gpu.product": "Tesla-T4",
        "nvidia.com/gpu.memory": "15360",
        "nvidia.com/gpu.compute.major": "7",
    }
    kube.nodes[0]["metadata"]["labels"] = t4
    small = yaml.safe_load(open(config))
    small["resources"]["gpu_memory_gib"] = 15
    (tmp_path / "t4.yaml").write_text(yaml.safe_dump(small))
    code, out = doctor(kfp, str(tmp_path / "t4.yaml"), capsys)
    assert "gpu-a: Tesla-T4 has compute capability 7.x, no bf16 (training.bf16)" in out, out
    assert "set training.bf16: false and training.fp16: true" in out

    h200 = {"nvidia.com/gpu.product": "NVIDIA-H200", "nvidia.com/gpu.memory": "143771"}
    kube.nodes[0]["metadata"]["labels"] = kube.nodes[1]["metadata"]["labels"] = h200
    code, out = doctor(kfp, config, capsys)
    assert "[     ok] nodes: 2 of 3 nodes can each hold a training pod" in out
    assert "their GPUs have 140 GiB, the memory plan assumed 80: set resources.gpu_memory_gib" in out


def test_a_trainjobs_nodes_are_weighed_with_its_runtimes_selector_and_tolerations(cluster, capsys):
    """A TrainJob's pods start from its runtime's pod template: the runtime's tolerations count unless
    the run sets its own, which replace them; the run's node_selector adds to the runtime's."""
    kube, kfp, config = cluster
    kube.api_resources.update(TRAINER_V2)
    for gpu_node in kube.nodes[:2]:
        gpu_node["spec"]["taints"] = [{"key": "dedicated", "value": "training", "effect": "NoSchedule"}]
        gpu_node["metadata"]["labels"] = {"pool": "h100"}
    node_pod = {
        "nodeSelector": {"pool": "h100"},
        "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoSchedule"}
        ],
    }
    runtime = copy.deepcopy(RUNTIME)
    runtime["spec"]["template"]["spec"]["replicatedJobs"] = [
        {"name": "node", "template": {"spec": {"template": {"spec": node_pod}}}}
    ]
    kube.put_runtime(runtime)
    with_launcher(config, "trainjob")
    code, out = doctor(kfp, config, capsys)
    assert "[     ok] nodes: 2 of 3 nodes can each hold a training pod" in out, out

    with_launcher(config, "trainjob", tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}])
    code, out = doctor(kfp, config, capsys)
    assert "[   warn] nodes: 0 of 3 nodes can each hold a training pod" in out, out
    assert "gpu-a, gpu-b: taint dedicated=training:NoSchedule not tolerated" in out  # replaced
    assert "system-1: no label pool=h100 (node_selector)" in out  # the runtime's selector still holds


def test_the_service_account_and_secrets_the_training_pods_name_must_exist(cluster, capsys):
    """A missing ServiceAccount or PriorityClass leaves the pods uncreated, a missing secret_env
    Secret in CreateContainerConfigError: each only after the job exists. Named with the field."""
    kube, kfp, config = cluster
    with_launcher(
        config, "kubernetes", service_account_name="trainer", secret_env=["fulltune-s3", "hf-token"]
    )
    code, out = doctor(kfp, config, capsys)
    assert code == 1
    assert (
        "[   FAIL] training pods' ServiceAccount trainer: not in team-a: the training pods could not start"
        in out
    )
    assert "fix resources.kubernetes.service_account_name" in out
    assert "[     ok] training pods' Secret fulltune-s3: exists in team-a" in out
    assert "[   FAIL] training pods' Secret hf-token: not in team-a" in out
    assert "fix resources.kubernetes.secret_env[1]" in out
    with_launcher(config, "kubernetes", priority_class_name="training-high")
    code, out = doctor(kfp, config, capsys)
    assert "[   FAIL] training pods' PriorityClass training-high: not in the cluster" in out
    assert "fix resources.kubernetes.priority_class_name" in out
    kube.priority_classes[("", "training-high")] = {"metadata": {"name": "training-high"}, "value": 1000}
    kube.service_accounts[(NS, "trainer")] = {"metadata": {"name": "trainer", "namespace": NS}}
    kube.secrets[(NS, "hf-token")] = {"metadata": {"name": "hf-token", "namespace": NS}}
    code, out = doctor(kfp, config, capsys)
    assert code == 0, out
    assert "[     ok] training pods' ServiceAccount trainer: exists in team-a" in out
    assert "[     ok] training pods' PriorityClass training-high: exists in the cluster" in out


def test_the_ephemeral_storage_plan_will_request_counts_against_quotas_and_nodes(cluster, capsys, tmp_path):
    """Left unset, plan sizes each training pod's ephemeral storage from the model (its /tmp stages a
    node's share of each s3:// checkpoint, plus compile caches): the doctor reads the model's config
    as plan will, and counts that request against the quota and each node's allocatable disk."""
    from fulltune import storage
    from tiny_models import tiny_llama_config

    kube, kfp, config = cluster
    run = yaml.safe_load(open(config))
    code, out = doctor(kfp, config, capsys)  # no model there yet: said, and nothing counted
    assert "[unknown] ephemeral storage: not counted: the base model's config cannot be read here" in out
    tiny_llama_config().save_pretrained(tmp_path / "llama")
    storage.upload_dir(tmp_path / "llama", run["model"]["base_model_uri"])
    kube.nodes[1]["status"]["allocatable"]["ephemeral-storage"] = "5Gi"  # a small root disk
    kube.quotas[NS][0]["status"]["hard"]["requests.ephemeral-storage"] = "100Gi"
    code, out = doctor(kfp, config, capsys)
    assert "[     ok] ephemeral storage: 9Gi a training pod, as plan will request it" in out, out
    assert "requests.ephemeral-storage 18Gi" in out  # two nodes' pods, against the quota
    assert "gpu-b: ephemeral-storage 5Gi allocatable, 9Gi needed" in out


def claim(name: str, modes: list[str], phase: str = "Bound") -> dict:
    return {
        "metadata": {"name": name, "namespace": NS},
        "spec": {"accessModes": modes, "resources": {"requests": {"storage": "2Ti"}}},
        "status": {"phase": phase, "accessModes": modes if phase == "Bound" else None},
    }


def with_volumes(config: str, tmp_path, *volumes: dict, num_nodes: int = 2) -> str:
    run = yaml.safe_load(open(config))
    run["work_dir"] = "/work/runs"
    run["resources"]["num_nodes"] = num_nodes
    run["resources"]["kubernetes"]["volumes"] = list(volumes)
    path = tmp_path / f"volumes-{len(volumes)}-{num_nodes}.yaml"
    path.write_text(yaml.safe_dump(run))
    return str(path)


def test_a_read_write_once_work_volume_for_pods_on_several_nodes_fails_before_they_hang(
    cluster, capsys, tmp_path
):
    """An RWO claim attaches to one node: the second training pod would sit in ContainerCreating."""
    kube, kfp, config = cluster
    kube.claims[(NS, "work")] = claim("work", ["ReadWriteOnce"])
    kube.claims[(NS, "models")] = claim("models", ["ReadOnlyMany"])
    volumes = (
        {"claim_name": "work", "mount_path": "/work"},
        {"claim_name": "models", "mount_path": "/models", "read_only": True},
    )
    code, out = doctor(kfp, with_volumes(config, tmp_path, *volumes), capsys)
    assert code == 1, out
    assert (
        "[   FAIL] volume work: ReadWriteOnce: it attaches to one node, and the 2 training pods run on 2 nodes"
        in out
    )
    assert "use a ReadWriteMany claim" in out
    assert "[     ok] volume models: Bound, ReadOnlyMany" in out  # mounted read-only: shared is enough

    kube.claims[(NS, "work")] = claim("work", ["ReadWriteMany"], phase="Pending")
    code, out = doctor(kfp, with_volumes(config, tmp_path, *volumes), capsys)
    assert code == 0, out
    assert "[   warn] volume work: Pending, not bound yet (ReadWriteMany)" in out
    assert "WaitForFirstConsumer" in out

    # one training node: an RWO claim works while every pod mounting it shares that node
    kube.claims[(NS, "work")] = claim("work", ["ReadWriteOnce"])
    code, out = doctor(kfp, with_volumes(config, tmp_path, *volumes, num_nodes=1), capsys)
    assert code == 0, out
    assert "[   warn] volume work: ReadWriteOnce: every pod that mounts it must share one node" in out


def test_a_missing_volume_claim_is_named_with_the_setting_that_names_it(cluster, capsys, tmp_path):
    kube, kfp, config = cluster
    kube.claims[(NS, "work")] = claim("work", ["ReadWriteMany"])
    volumes = ({"claim_name": "work", "mount_path": "/work"}, {"claim_name": "ckpt", "mount_path": "/ckpt"})
    code, out = doctor(kfp, with_volumes(config, tmp_path, *volumes), capsys)
    assert code == 1
    assert "[     ok] volume work: Bound, ReadWriteMany" in out
    assert "[   FAIL] volume ckpt: no PersistentVolumeClaim ckpt in team-a" in out
    assert "resources.kubernetes.volumes[1].claim_name" in out
    kube.forbidden = {"persistentvolumeclaims"}
    code, out = doctor(kfp, with_volumes(config, tmp_path, *volumes), capsys)
    assert code == 0
    assert "[unknown] volume ckpt: cannot read PersistentVolumeClaim ckpt (403)" in out


def test_what_it_may_not_read_is_unknown_not_failed(cluster, capsys):
    """A profile's account often may not read Secrets or its Namespace: said, and not a failure."""
    kube, kfp, config = cluster
    kube.forbidden = {"secrets", "namespaces", "nodes"}
    code, out = doctor(kfp, config, capsys)
    assert code == 0
    assert "[unknown] nodes: cannot list nodes (403)" in out
    assert "S3 Secret: cannot read Secrets (403)" in out
    assert "[unknown] Istio: cannot read namespace team-a (403)" in out


def test_an_unreachable_kfp_fails_with_its_fix(cluster, capsys):
    kube, kfp, config = cluster
    code = main(["doctor", "--config", config, "--host", "http://127.0.0.1:9"])
    out = capsys.readouterr().out
    assert code == 1
    assert "[   FAIL] KFP API: http://127.0.0.1:9" in out and "KFP_HOST" in out


def test_the_mlflow_secret_is_checked_only_when_named_and_must_name_the_server(cluster, capsys, monkeypatch):
    import base64

    kube, kfp, config = cluster
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def with_mlflow(name: str = "team-mlflow") -> tuple[int, str]:
        code = main(["doctor", "--config", config, "--host", kfp.url, "--mlflow-secret", name])
        return code, capsys.readouterr().out

    _, out = doctor(kfp, config, capsys)
    assert "MLflow Secret" not in out  # MLflow is optional: no Secret named, nothing checked

    code, out = with_mlflow()
    assert code == 1
    assert "[   FAIL] MLflow Secret: team-mlflow is not in team-a" in out
    assert "kubectl -n team-a create secret generic team-mlflow --from-literal=MLFLOW_TRACKING_URI=" in out

    # a Secret with credentials but no server: the client would log to a local ./mlruns
    token = base64.b64encode(b"t0ken").decode()
    kube.secrets[(NS, "team-mlflow")] = {
        "metadata": {"name": "team-mlflow", "namespace": NS},
        "data": {"MLFLOW_TRACKING_TOKEN": token},
    }
    code, out = with_mlflow()
    assert code == 1
    assert (
        "MLflow Secret: team-mlflow has no MLFLOW_TRACKING_URI key (its keys: MLFLOW_TRACKING_TOKEN)" in out
    )
    assert "kubectl -n team-a patch secret team-mlflow" in out
    assert "t0ken" not in out and token not in out  # names keys, never values

    uri = base64.b64encode(b"https://mlflow.example.com").decode()
    kube.secrets[(NS, "team-mlflow")]["data"]["MLFLOW_TRACKING_URI"] = uri
    code, out = with_mlflow()
    assert code == 0, out
    assert "[     ok] MLflow Secret: team-mlflow exists in team-a" in out

    kube.forbidden = {"secrets"}
    code, out = with_mlflow()
    assert code == 0
    assert "[unknown] MLflow Secret: cannot read Secrets (403); this pod has no MLFLOW_TRACKING_URI" in out
