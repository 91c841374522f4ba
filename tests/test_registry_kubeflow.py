"""registry.kubeflow: a committed version is recorded in the Kubeflow Model Registry.

The Model Registry is the stand-in in tests/mr_standin.py, a real HTTP server on localhost that
serves the REST endpoints the `model-registry` client calls and records every request.
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from eval_samples import eval_result, loss_set, scored
from fulltune import steps, storage
from fulltune.cli import main
from fulltune.config import ConfigError, RunConfig
from fulltune.evaluate.result import EvalResult, GateCheck
from fulltune.registry import kubeflow
from fulltune.registry.kubeflow import KubeflowRegistryError, register_version
from fulltune.registry.store import RegistryError, list_versions, register_model, verify_version
from mr_standin import ModelRegistryStandIn
from tiny_models import fake_model_dir

NAME = "tiny"
TOKEN = "token-from-the-environment"
EVAL_PASS = eval_result(
    tuned_model_uri="s3://work/run-42/train/model",
    sets={
        "domain_eval": loss_set((3.91, 49.9), (3.07, 21.5)),
        # a base perplexity that is not a number: forgetting is NaN
        "general_eval": loss_set((float("nan"), float("nan")), (2.6, 13.46), sequences=9, loss_tokens=70),
    },
    confidence_intervals={"domain_loss_improvement": {"estimate": 0.214, "low": 0.1, "high": 0.3}},
)
EVAL_FAIL = EVAL_PASS.model_copy(
    update={
        "checks": [
            GateCheck(name="forgetting", passed=False, reason="general perplexity rose 7.3% > 5.0% allowed")
        ]
    }
)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return fake_model_dir(tmp_path / "tuned")


@pytest.fixture
def mr(monkeypatch):
    monkeypatch.setenv("MODEL_REGISTRY_TOKEN", TOKEN)
    with ModelRegistryStandIn() as standin:
        yield standin


def _cfg(registry_uri: str, mr: ModelRegistryStandIn | None, **kubeflow: Any) -> RunConfig:
    registry: dict[str, Any] = {"uri": registry_uri}
    if mr is not None:
        section = {"server_address": mr.address, "port": mr.port, "is_secure": False, "author": "ml-team"}
        registry["kubeflow"] = {**section, **kubeflow}
    return RunConfig.from_dict({"model": {"name": NAME}, "registry": registry})


def _props(custom_properties: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The REST API's typed metadata values as plain Python values."""
    out = {}
    for key, meta in custom_properties.items():
        kind = meta["metadataType"].removeprefix("Metadata").removesuffix("Value").lower()
        out[key] = meta[f"{kind}_value"]
    return out


def _eval_file(path: Path, result: EvalResult) -> Path:
    """`result` as the eval.json the evaluate step leaves for the register step."""
    path.write_text(json.dumps(result.to_json()))
    return path


def _register_args(config: Path, cfg: RunConfig, model_dir: Path) -> list[str]:
    """`fulltune registry register` for `model_dir`, with `cfg` written to `config` as its YAML; the
    test adds --eval and the rest."""
    config.write_text(cfg.to_yaml())
    return ["registry", "register", "--config", str(config), "--model", str(model_dir)]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_committed_version_is_recorded_as_model_version_and_artifact(
    model_dir, tmp_path, request, mr, where
):
    registry = f"{request.getfixturevalue('s3')}/registry" if where == "s3" else str(tmp_path / "registry")
    uri = register_model(
        _cfg(registry, mr), str(model_dir), scored(EVAL_PASS, str(model_dir)), {}, run_id="run-42"
    )
    assert uri == f"{registry}/{NAME}/v1" if where == "s3" else str(Path(registry, NAME, "v1"))

    writes = mr.writes()
    v1 = mr.version_named(NAME, "v1")["id"]
    assert [(w.method, w.path) for w in writes] == [
        ("POST", "/registered_models"),
        ("POST", "/model_versions"),
        ("POST", f"/model_versions/{v1}/artifacts"),
        # the first version becomes production and latest: mirrored on the model and the version
        ("PATCH", f"/registered_models/{next(iter(mr.models))}"),
        ("PATCH", f"/model_versions/{v1}"),
    ]
    model, version, artifact = (w.body for w in writes[:3])
    assert model["name"] == NAME and model["owner"] == "ml-team"
    assert version["name"] == "v1" and version["author"] == "ml-team"
    assert version["registeredModelId"] == next(iter(mr.models))
    manifest_bytes = storage.read_bytes(f"{uri}/manifest.json")
    props = _props(version["customProperties"])
    assert props == {
        "fulltune_run_id": "run-42",
        "verdict": True,
        "verdict_reasons": EVAL_PASS.reasons[0],
        "forced": False,
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "fulltune_version": json.loads(manifest_bytes)["fulltune_version"],
        "domain_eval_tuned_loss": 3.07,
        "domain_eval_tuned_perplexity": 21.5,
        "general_eval_tuned_loss": 2.6,
        "general_eval_tuned_perplexity": 13.46,
        "domain_loss_improvement": pytest.approx(1 - 3.07 / 3.91),
        "forgetting": "nan",  # not a JSON number: recorded as text
    }
    assert artifact["artifactType"] == "model-artifact"
    assert artifact["uri"] == uri and artifact["modelFormatName"] == "safetensors"
    assert artifact["name"] == NAME
    # every request carries the token from the environment as a bearer token
    assert {r.headers.get("authorization") for r in mr.requests} == {f"Bearer {TOKEN}"}
    assert json.loads(manifest_bytes)["run_id"] == "run-42" and verify_version(uri) == []


def test_recording_again_is_idempotent_and_a_conflicting_version_is_refused(model_dir, s3, mr):
    registry = f"{s3}/registry"
    uri = register_model(
        _cfg(registry, mr), str(model_dir), scored(EVAL_PASS, str(model_dir)), {}, run_id="run-1"
    )
    first = register_version(_cfg(registry, mr).registry.kubeflow, uri)
    writes = len(mr.writes())
    assert register_version(_cfg(registry, mr).registry.kubeflow, uri) == first
    assert len(mr.writes()) == writes == 5  # model, version, artifact, then the pointers: once
    assert len(mr.versions) == 1 and len(mr.artifacts) == 1

    # v1 of the same name registered elsewhere, pointing at other files: a clear error, no change
    other = _cfg(f"{s3}/other-registry", mr)
    other_uri = register_model(
        other.with_overrides({"registry.kubeflow": None}),
        str(model_dir),
        scored(EVAL_PASS, str(model_dir)),
        {},
    )
    mr.versions[first["model_version_id"]]["customProperties"] = {}  # recorded by hand: no manifest hash
    with pytest.raises(
        KubeflowRegistryError, match=rf"{NAME} v1: .*artifact URI {uri}, not {other_uri}"
    ) as err:
        register_version(other.registry.kubeflow, other_uri)
    assert f"Model Registry at http://127.0.0.1:{mr.port}" in str(err.value)
    assert f"the files at {other_uri} stay committed" in str(err.value)
    assert len(mr.artifacts) == 1 and len(mr.writes()) == writes


def test_a_version_recorded_for_another_manifest_is_refused(model_dir, tmp_path, mr):
    uri = register_model(_cfg(str(tmp_path / "a"), mr), str(model_dir), scored(EVAL_PASS, str(model_dir)), {})
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "changed": True}))
    with pytest.raises(KubeflowRegistryError, match=r"tiny v1: .*different manifest") as err:
        register_model(_cfg(str(tmp_path / "b"), mr), str(model_dir), scored(EVAL_PASS, str(model_dir)), {})
    assert str(tmp_path / "b" / NAME / "v1") in str(err.value)
    assert verify_version(str(tmp_path / "b" / NAME / "v1")) == []  # the files stay committed
    assert [a["uri"] for a in mr.artifacts.values()] == [uri]


def test_failure_after_the_upload_keeps_the_version_and_a_retry_completes_it(model_dir, s3, tmp_path, mr):
    registry = f"{s3}/registry"
    config = _cfg(registry, mr)
    eval_path = _eval_file(tmp_path / "eval.json", scored(EVAL_PASS, str(model_dir)))
    mr.fail(1, method="POST", path="/model_versions/")  # the version is created, its artifact is not

    with pytest.raises(KubeflowRegistryError) as err:
        steps.register(config, str(model_dir), str(eval_path), run_id="run-7")
    message = str(err.value)
    uri = f"{registry}/{NAME}/v1"
    assert f"{NAME} v1 is committed at {uri} (intact)" in message
    assert f"Kubeflow Model Registry at http://127.0.0.1:{mr.port} failed: HTTP 503" in message
    assert "run id" in message
    assert [v["version"] for v in list_versions(registry, NAME)] == [1] and verify_version(uri) == []
    assert len(mr.versions) == 1 and mr.artifacts == {}

    # the retry of the step (same run id) finds v1, allocates nothing and adds the missing artifact
    assert steps.register(config, str(model_dir), str(eval_path), run_id="run-7") == uri
    assert [v["version"] for v in list_versions(registry, NAME)] == [1]
    assert storage.list_files(f"{registry}/{NAME}/v2") == []
    assert len(mr.versions) == 1
    (artifact,) = mr.artifacts.values()
    assert artifact["uri"] == uri and artifact["_versionId"] == mr.version_named(NAME, "v1")["id"]
    assert [(w.method, w.path.split("/")[1]) for w in mr.writes()] == [
        ("POST", "registered_models"),
        ("POST", "model_versions"),
        ("POST", "model_versions"),  # refused with 503
        ("POST", "model_versions"),  # the retry's artifact
        ("PATCH", "registered_models"),  # and the pointers, which the first attempt moved: v1 serves
        ("PATCH", "model_versions"),
    ]
    # and a later run gets v2, as always
    assert steps.register(config, str(model_dir), str(eval_path), run_id="run-8") == f"{registry}/{NAME}/v2"


def test_an_unreachable_model_registry_names_the_endpoint(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_REGISTRY_TOKEN", TOKEN)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    cfg = RunConfig.from_dict(
        {
            "model": {"name": NAME},
            "registry": {
                "uri": str(tmp_path / "r"),
                "kubeflow": {"server_address": "127.0.0.1", "port": port, "is_secure": False},
            },
        }
    )
    with pytest.raises(
        KubeflowRegistryError, match=rf"tiny v1 is committed .* at http://127.0.0.1:{port} failed"
    ):
        register_model(cfg, str(model_dir), scored(EVAL_PASS, str(model_dir)), {}, run_id="r")
    assert [v["version"] for v in list_versions(str(tmp_path / "r"), NAME)] == [1]


def test_without_kubeflow_settings_nothing_is_sent(model_dir, tmp_path, mr):
    register_model(_cfg(str(tmp_path / "r"), None), str(model_dir), scored(EVAL_PASS, str(model_dir)), {})
    assert mr.requests == []


# -- credentials ----------------------------------------------------------------------------------


def test_the_token_comes_from_the_environment_or_the_service_account_file(
    model_dir, tmp_path, mr, monkeypatch
):
    sa_token = tmp_path / "token"
    sa_token.write_text("service-account-token\n")
    monkeypatch.setattr(kubeflow, "SA_TOKEN_PATH", str(sa_token))
    monkeypatch.delenv("MODEL_REGISTRY_TOKEN")
    register_model(_cfg(str(tmp_path / "a"), mr), str(model_dir), scored(EVAL_PASS, str(model_dir)), {})
    assert {r.headers.get("authorization") for r in mr.requests} == {"Bearer service-account-token"}

    mr.requests.clear()
    sa_token.unlink()
    register_model(
        _cfg(str(tmp_path / "b"), mr).with_overrides({"model.name": "other"}),
        str(model_dir),
        scored(EVAL_PASS, str(model_dir)),
        {},
    )
    assert len(mr.versions) == 2
    assert mr.requests and all("authorization" not in r.headers for r in mr.requests)


def test_a_token_cannot_travel_as_config_or_argument(model_dir, tmp_path, mr):
    with pytest.raises(ConfigError, match="registry.kubeflow.token: unknown field"):
        RunConfig.from_dict({"registry": {"kubeflow": {"server_address": "http://mr", "token": "x"}}})
    config = tmp_path / "config.yaml"
    args = _register_args(config, _cfg(str(tmp_path / "r"), mr), model_dir)
    eval_path = _eval_file(tmp_path / "eval.json", scored(EVAL_PASS, str(model_dir)))
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--eval", str(eval_path), "--token", "x"])
    assert exit_.value.code == 2
    assert TOKEN not in config.read_text()


# -- command line -----------------------------------------------------------------------------------


def test_cli_register_records_in_kubeflow_and_repeats_idempotently(model_dir, s3, tmp_path, mr, capsys):
    registry = f"{s3}/registry"
    args = _register_args(tmp_path / "config.yaml", _cfg(registry, mr), model_dir)
    eval_path = _eval_file(tmp_path / "eval.json", scored(EVAL_PASS, str(model_dir)))
    storage.upload_file(str(eval_path), f"{s3}/work/eval.json")
    assert main([*args, "--eval", f"{s3}/work/eval.json", "--run-id", "cli-1"]) == 0
    assert capsys.readouterr().out.strip() == f"{registry}/{NAME}/v1"
    assert main([*args, "--eval", str(eval_path), "--run-id", "cli-1"]) == 0
    assert capsys.readouterr().out.strip() == f"{registry}/{NAME}/v1"
    assert len(mr.versions) == 1 and len(mr.artifacts) == 1
    assert {r.headers.get("authorization") for r in mr.requests} == {f"Bearer {TOKEN}"}


def test_cli_register_leaves_nothing_in_the_configs_work_dir(model_dir, tmp_path, capsys):
    """`fulltune registry register --config my-run.yaml` (README) names the config whose work_dir
    holds every run: a refusal recorded there made `fulltune runs` list a run called 'failures'."""
    work = tmp_path / "work"
    cfg = _cfg(str(tmp_path / "registry"), None).model_copy(update={"work_dir": str(work)})
    args = _register_args(tmp_path / "config.yaml", cfg, model_dir)
    args += ["--eval", str(_eval_file(tmp_path / "eval.json", scored(EVAL_FAIL, str(model_dir))))]
    assert main(args) == 1
    assert main([*args, "--force"]) == 0
    capsys.readouterr()
    assert not work.exists() or not any(work.iterdir())
    assert main(["runs", str(tmp_path / "config.yaml")]) == 0
    assert "failures" not in capsys.readouterr().out


def test_cli_refuses_a_failed_gate_unless_forced(model_dir, tmp_path, mr, capsys):
    registry = tmp_path / "registry"
    args = _register_args(tmp_path / "config.yaml", _cfg(str(registry), mr), model_dir)
    args += ["--eval", str(_eval_file(tmp_path / "eval.json", scored(EVAL_FAIL, str(model_dir))))]

    assert main(args) == 1
    err = capsys.readouterr().err
    assert "not registered, the evaluation gate did not pass" in err and EVAL_FAIL.reasons[0] in err
    assert "`fulltune registry register --force` registers it anyway" in err  # the option, by its name
    assert not registry.exists() and mr.requests == []

    assert main([*args, "--force"]) == 0
    uri = capsys.readouterr().out.strip()
    assert uri == str(registry / NAME / "v1")
    lineage = json.loads(Path(uri, "lineage.json").read_text())
    assert lineage["forced"] is True and lineage["forced_reasons"] == EVAL_FAIL.reasons
    assert list_versions(str(registry), NAME)[0]["forced"] is True
    props = _props(mr.writes()[1].body["customProperties"])
    assert props["forced"] is True and props["verdict"] is False
    assert props["verdict_reasons"] == EVAL_FAIL.reasons[0]


def test_cli_names_a_missing_eval_file(model_dir, tmp_path, capsys):
    args = _register_args(tmp_path / "config.yaml", _cfg(str(tmp_path / "r"), None), model_dir)
    missing = tmp_path / "nope.json"
    rc = main([*args, "--eval", str(missing)])
    assert rc == 1 and f"{missing}: not found" in capsys.readouterr().err


def test_cli_names_an_eval_file_that_is_not_an_eval_result(model_dir, tmp_path, capsys):
    args = _register_args(tmp_path / "config.yaml", _cfg(str(tmp_path / "r"), None), model_dir)
    bad = tmp_path / "eval.json"
    bad.write_text(json.dumps({"verdict": True, "reasons": []}))  # no checks, no figures
    rc = main([*args, "--eval", str(bad)])
    err = capsys.readouterr().err
    assert rc == 1 and f"{bad}: not a fulltune eval result" in err and "checks" in err
    assert not (tmp_path / "r").exists()


def test_same_run_id_with_another_model_is_an_error(model_dir, tmp_path):
    cfg = _cfg(str(tmp_path / "r"), None)
    register_model(cfg, str(model_dir), scored(EVAL_PASS, str(model_dir)), {}, run_id="run-1")
    other = tmp_path / "other"
    other.mkdir()
    for f in model_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    with pytest.raises(RegistryError, match=f"run run-1 already registered v1 from {model_dir}, not {other}"):
        register_model(cfg, str(other), scored(EVAL_PASS, str(other)), {}, run_id="run-1")


def test_a_model_created_concurrently_by_another_writer_is_reused(model_dir, tmp_path, mr):
    """The registered model appeared between this writer's lookup and its create: the 409 is not an error."""
    registry = str(tmp_path / "registry")
    register_model(_cfg(registry, mr), str(model_dir), scored(EVAL_PASS, str(model_dir)), {})
    mr.fail(
        1, status=404, method="GET", path="/registered_model"
    )  # looked before the other writer created it
    uri = register_model(_cfg(registry, mr), str(model_dir), scored(EVAL_PASS, str(model_dir)), {})
    assert uri.endswith("v2")
    lookups = [
        ("GET", "/registered_model"),  # 404
        ("POST", "/registered_models"),  # 409: it exists
        ("GET", "/registered_model"),  # found
    ]
    calls = mr.calls()
    assert any(calls[i : i + 3] == lookups for i in range(len(calls)))
    (model_id,) = mr.models
    assert sorted(v["name"] for v in mr.versions.values() if v["registeredModelId"] == model_id) == [
        "v1",
        "v2",
    ]


@pytest.mark.parametrize(
    ("address", "port", "secure", "url"),
    [
        (
            "model-registry-service.kubeflow.svc.cluster.local",
            8080,
            False,
            "http://model-registry-service.kubeflow.svc.cluster.local:8080",
        ),
        ("model-registry.example.com", 443, True, "https://model-registry.example.com:443"),
        ("https://model-registry.example.com/", 443, True, "https://model-registry.example.com:443"),
        ("http://10.0.0.5:9090", 8080, False, "http://10.0.0.5:9090"),
    ],
)
def test_endpoint(address, port, secure, url):
    section = RunConfig.from_dict(
        {"registry": {"kubeflow": {"server_address": address, "port": port, "is_secure": secure}}}
    ).registry.kubeflow
    assert kubeflow.endpoint(section) == url


def test_pointer_moves_are_mirrored_on_the_registered_model_and_its_versions(model_dir, tmp_path, mr, capsys):
    registry = str(tmp_path / "registry")
    cfg = _cfg(registry, mr)
    register_model(cfg, str(model_dir), scored(EVAL_PASS, str(model_dir)), {}, run_id="run-1")
    register_model(cfg, str(model_dir), scored(EVAL_PASS, str(model_dir)), {}, run_id="run-2")
    model = _props(next(iter(mr.models.values()))["customProperties"])
    assert (model["production_version"], model["latest_version"]) == ("v1", "v2")
    assert model["production_changed_by"] == "pipeline run run-1"
    config = tmp_path / "run.yaml"
    config.write_text(cfg.to_yaml())
    promote = [
        "registry",
        "promote",
        "--uri",
        registry,
        "--name",
        NAME,
        "--version",
        "2",
        "--config",
        str(config),
    ]
    assert main([*promote, "--reason", "audited by the clinical team"]) == 0
    assert "recorded in the Kubeflow Model Registry" in capsys.readouterr().out
    model = _props(next(iter(mr.models.values()))["customProperties"])
    assert (
        model["production_version"] == "v2" and model["production_reason"] == "audited by the clinical team"
    )
    serving = {
        v: _props(mr.version_named(NAME, v)["customProperties"]).get("production") for v in ("v1", "v2")
    }
    assert serving == {"v1": False, "v2": True}


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/model_versions/"), ("PATCH", "/registered_models/")],
    ids=["recording-the-version", "mirroring-the-pointers"],
)
def test_a_retry_after_the_model_registry_failed_mirrors_where_the_pointers_stand(
    model_dir, tmp_path, mr, method, path
):
    from fulltune.evaluate.result import Champion
    from fulltune.registry import pointers

    registry = str(tmp_path / "registry")
    cfg = _cfg(registry, mr)
    register_model(cfg, str(model_dir), scored(EVAL_PASS, str(model_dir)), {}, run_id="run-1")
    champion = Champion(compare_to="registered", version=1)
    beat_v1 = scored(EVAL_PASS.model_copy(update={"champion": champion}), str(model_dir))
    mr.fail(1, method=method, path=path)  # once, after run-2 moved both pointers in the registry
    with pytest.raises(KubeflowRegistryError, match="HTTP 503"):
        register_model(cfg, str(model_dir), beat_v1, {}, run_id="run-2")
    assert pointers.current(registry, NAME, pointers.PRODUCTION).version == 2

    # the step is retried, as the error says: the Model Registry learns where both pointers stand
    register_model(cfg, str(model_dir), beat_v1, {}, run_id="run-2")
    model = _props(next(iter(mr.models.values()))["customProperties"])
    assert (model["production_version"], model["latest_version"]) == ("v2", "v2")
    assert model["production_changed_by"] == "pipeline run run-2"
    assert model["production_reason"] == "passed the gate against v1"
    serving = {
        v: _props(mr.version_named(NAME, v)["customProperties"]).get("production") for v in ("v1", "v2")
    }
    assert serving == {"v1": False, "v2": True}
    # mirrored once: another retry writes nothing
    writes = len(mr.writes())
    register_model(cfg, str(model_dir), beat_v1, {}, run_id="run-2")
    assert len(mr.writes()) == writes


def test_a_move_never_mirrored_leaves_no_second_version_marked_production(model_dir, tmp_path, mr):
    from fulltune.evaluate.result import Champion

    registry = str(tmp_path / "registry")
    cfg = _cfg(registry, mr)

    def beat(version: int) -> EvalResult:
        champion = Champion(compare_to="registered", version=version)
        return scored(EVAL_PASS.model_copy(update={"champion": champion}), str(model_dir))

    register_model(cfg, str(model_dir), scored(EVAL_PASS, str(model_dir)), {}, run_id="run-1")
    register_model(cfg, str(model_dir), beat(1), {}, run_id="run-2")  # v2 serves, marked so
    # rolled back by hand as docs/cycles.md shows it, without --config: the Model Registry still says v2
    assert (
        main(["registry", "rollback", "--uri", registry, "--name", NAME, "--reason", "v2 misreads eGFR"]) == 0
    )
    register_model(cfg, str(model_dir), beat(1), {}, run_id="run-3")  # the next cycle beats v1: v3 serves
    serving = {
        v: _props(mr.version_named(NAME, v)["customProperties"]).get("production") for v in ("v1", "v2", "v3")
    }
    assert serving == {"v1": False, "v2": False, "v3": True}
