"""registry: versioned, atomic, verifiable model registration on a local directory and on S3."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from eval_samples import DOMAIN_GAIN, eval_result, scored
from fulltune import storage
from fulltune.config import RunConfig
from fulltune.evaluate.result import EvalResult, GateCheck
from fulltune.registry import store
from fulltune.registry.store import RegistryError, list_versions, register_model, verify_version
from test_storage import first_put_answer_lost
from tiny_models import fake_model_dir, save_tiny_llama

NAME = "tiny"

EVAL_PASS = eval_result(
    base_model_uri="s3://models/base-llama",
    tuned_model_uri="s3://work/run-123/train/model",
    checks=[
        DOMAIN_GAIN,
        {"name": "forgetting", "passed": True, "reason": "no general eval set: forgetting was not measured"},
    ],
)
EVAL_FAIL = EVAL_PASS.model_copy(
    update={
        "checks": [
            GateCheck(
                name="forgetting",
                passed=False,
                reason="general perplexity rose 7.3% (12.10 → 12.98) > 5.0% allowed",
            )
        ]
    }
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama in HF format, with tokenizer files beside it."""
    return save_tiny_llama(tmp_path_factory.mktemp("model") / "tuned")


def _cfg(registry_uri: str) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"name": NAME, "base_model_uri": "s3://models/base-llama"},
            "registry": {"uri": registry_uri},
        }
    )


LINEAGE = {"run_id": "run-123", "dataset_manifest": "s3://work/run-123/dataset/manifest.json"}


# -- local --------------------------------------------------------------------------------------


def test_register_locally_twice_gives_v1_then_v2(model_dir, tmp_path):
    registry = str(tmp_path / "registry")
    v1 = register_model(_cfg(registry), str(model_dir), scored(EVAL_PASS, str(model_dir)), LINEAGE)
    v2 = register_model(_cfg(registry), str(model_dir), scored(EVAL_PASS, str(model_dir)), LINEAGE)
    assert v1 == str(tmp_path / "registry" / NAME / "v1")
    assert v2 == str(tmp_path / "registry" / NAME / "v2")

    versions = list_versions(registry, NAME)
    assert [v["version"] for v in versions] == [1, 2]
    assert [v["uri"] for v in versions] == [v1, v2]
    manifest = versions[0]
    assert manifest["name"] == NAME and manifest["created_at"] and manifest["forced"] is False

    # the manifest lists every model file plus card, lineage and eval, with matching hashes
    on_disk = storage.file_manifest(v1)
    assert manifest["files"] == [f for f in on_disk if f["path"] not in ("manifest.json", ".claim")]
    listed = {f["path"] for f in manifest["files"]}
    source = {f["path"]: f for f in storage.file_manifest(model_dir)}
    assert set(source) | {"model_card.md", "lineage.json", "eval.json"} == listed
    for f in manifest["files"]:
        if f["path"] in source:
            assert f == source[f["path"]]
    assert verify_version(v1) == [] and verify_version(v2) == []

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(v1, use_safetensors=True)


def test_card_lineage_and_eval(model_dir, tmp_path):
    evaluated = scored(EVAL_PASS, str(model_dir))
    uri = register_model(_cfg(str(tmp_path / "r")), str(model_dir), evaluated, LINEAGE)
    card = Path(uri, "model_card.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == "s3://models/base-llama"
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["fulltune", "full-fine-tune"]
    assert meta["metrics"] == ["loss", "perplexity"]
    result = meta["model-index"][0]["results"][0]
    assert result["dataset"]["name"] == "domain_eval"
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"loss": 3.07, "perplexity": 21.5}
    assert f"# {NAME} v1" in body and "| domain_eval | 3.9100 | 3.0700 |" in body
    assert "**Passed**" in body and EVAL_PASS.reasons[0] in body and "run-123" in body

    lineage = json.loads(Path(uri, "lineage.json").read_text())
    assert lineage["run_id"] == "run-123" and lineage["dataset_manifest"] == LINEAGE["dataset_manifest"]
    assert lineage["eval"] == evaluated.to_json()
    assert lineage["forced"] is False and "forced_reasons" not in lineage
    assert lineage["fulltune_version"] and lineage["config"]["model"]["name"] == NAME
    assert lineage["source_model_uri"] == str(model_dir)
    assert json.loads(Path(uri, "eval.json").read_text()) == evaluated.to_json()
    assert EvalResult.load(str(Path(uri, "eval.json"))) == evaluated


@pytest.mark.parametrize(
    ("training", "accelerator", "precision"),
    [({"bf16": False, "fp16": True}, "gpu", "fp16"), ({}, "cpu", "fp32"), ({}, "gpu", "bf16")],
)
def test_the_card_names_the_precision_training_computed_in(
    model_dir, tmp_path, training, accelerator, precision
):
    """fp16 on a GPU without bf16, and float32 on the CPU (where both flags are ignored): the card
    says what the weights were trained in, as the train step and eval.json do."""
    cfg = _cfg(str(tmp_path / "r")).with_overrides(
        {"training": training, "resources": {"accelerator": accelerator}}
    )
    uri = register_model(cfg, str(model_dir), scored(EVAL_PASS, str(model_dir)), LINEAGE)
    assert f"| precision | {precision} |" in Path(uri, "model_card.md").read_text()


@pytest.mark.parametrize(
    ("general_uri", "replay"),
    [(None, "none (no data.general_uri)"), ("s3://data/general.jsonl", "10% of training tokens")],
)
def test_the_card_claims_replay_only_where_there_was_general_data(model_dir, tmp_path, general_uri, replay):
    """Without data.general_uri nothing is replayed (the dataset manifest says so): the card must not
    promise the default replay_fraction's 10% defence against forgetting."""
    cfg = _cfg(str(tmp_path / "r")).with_overrides({"data": {"general_uri": general_uri}})
    uri = register_model(cfg, str(model_dir), scored(EVAL_PASS, str(model_dir)), LINEAGE)
    assert f"| general replay | {replay} |" in Path(uri, "model_card.md").read_text()


def test_the_card_gives_no_epochs_to_a_run_max_steps_ended(model_dir, tmp_path):
    """With max_steps the run trains that many steps whatever num_train_epochs (filled in by plan)
    says: 8 steps of a 400-record set are a fifth of an epoch, not the 3 epochs the card claimed."""
    cfg = _cfg(str(tmp_path / "r")).with_overrides({"training": {"max_steps": 8, "num_train_epochs": 3}})
    card = Path(
        register_model(cfg, str(model_dir), scored(EVAL_PASS, str(model_dir)), LINEAGE), "model_card.md"
    )
    assert "| epochs | not used: max steps set the length |" in card.read_text()
    assert "| max steps | 8 |" in card.read_text()
    by_epochs = cfg.with_overrides({"training": {"max_steps": -1}})
    card = Path(
        register_model(by_epochs, str(model_dir), scored(EVAL_PASS, str(model_dir)), LINEAGE), "model_card.md"
    )
    assert "| epochs | 3 |" in card.read_text()


def test_the_card_of_a_retrained_version_says_whose_figures_the_base_columns_are(model_dir, tmp_path):
    """v2 tuned from v1 (a retraining cycle): evaluate scores the original pre-trained model as the
    base, so the card's base columns are its figures, not v1's, and the card says so."""
    registry = str(tmp_path / "r")
    v1 = register_model(_cfg(registry), str(model_dir), scored(EVAL_PASS, str(model_dir)), LINEAGE)
    assert "Base is the original" not in Path(v1, "model_card.md").read_text()  # tuned from the original
    from_v1 = _cfg(registry).with_overrides(
        {"model": {"base_model_uri": v1, "original_base_model_uri": "s3://models/base-llama"}}
    )
    v2 = register_model(from_v1, str(model_dir), scored(EVAL_PASS, str(model_dir)), LINEAGE)
    body = Path(v2, "model_card.md").read_text().split("## Evaluation", 1)[1]
    assert body.lstrip().startswith(
        "Base is the original pre-trained model `s3://models/base-llama`, which the domain gain and "
        f"forgetting are measured against, not `{v1}` that this version was tuned from."
    )
    assert "| domain_eval | 3.9100 | 3.0700 |" in body


def test_failed_gate_is_refused_unless_forced(model_dir, tmp_path):
    registry = str(tmp_path / "registry")
    with pytest.raises(RegistryError, match="gate did not pass.*12.10 → 12.98"):
        register_model(_cfg(registry), str(model_dir), scored(EVAL_FAIL, str(model_dir)), LINEAGE)
    assert not (tmp_path / "registry").exists()
    uri = register_model(
        _cfg(registry), str(model_dir), scored(EVAL_FAIL, str(model_dir)), LINEAGE, force=True
    )
    assert uri.endswith("v1")
    lineage = json.loads(Path(uri, "lineage.json").read_text())
    assert lineage["forced"] is True and lineage["forced_reasons"] == EVAL_FAIL.reasons
    assert list_versions(registry, NAME)[0]["forced"] is True
    assert "Registered by force" in Path(uri, "model_card.md").read_text()
    # The first version of a model serves, but not one its gate failed: only a promote moves it there.
    from fulltune.registry import pointers

    assert pointers.current(registry, NAME, pointers.LATEST).version == 1
    assert pointers.current(registry, NAME, pointers.PRODUCTION) is None


def test_verify_detects_tampering(model_dir, tmp_path):
    uri = Path(
        register_model(_cfg(str(tmp_path / "r")), str(model_dir), scored(EVAL_PASS, str(model_dir)), LINEAGE)
    )
    weights = uri / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    (uri / "config.json").write_text("{}")
    (uri / "tokenizer_config.json").unlink()
    (uri / "extra.py").write_text("import os")
    problems = verify_version(str(uri))
    assert any(p.startswith("model.safetensors: sha256") for p in problems)
    assert not any(p.startswith("model.safetensors: size") for p in problems)
    assert any(p.startswith("config.json: size") for p in problems)
    assert "tokenizer_config.json: missing" in problems
    assert "extra.py: not in the manifest" in problems
    assert verify_version(str(tmp_path / "r" / NAME / "v9")) == [
        "manifest.json: missing, the version was never committed"
    ]


def test_uncommitted_versions_are_invisible_and_never_reused(model_dir, tmp_path):
    registry = tmp_path / "registry"
    register_model(_cfg(str(registry)), str(model_dir), scored(EVAL_PASS, str(model_dir)), LINEAGE)
    partial = registry / NAME / "v2"  # a crashed writer: claim and some files, no manifest
    partial.mkdir(parents=True)
    (partial / ".claim").write_text("{}")
    (partial / "config.json").write_text("{}")
    (registry / NAME / "notes").mkdir()  # not a version directory
    assert [v["version"] for v in list_versions(str(registry), NAME)] == [1]
    uri = register_model(_cfg(str(registry)), str(model_dir), scored(EVAL_PASS, str(model_dir)), LINEAGE)
    assert uri.endswith("v3")
    assert [v["version"] for v in list_versions(str(registry), NAME)] == [1, 3]
    assert list_versions(str(registry), "other") == []


def test_failure_before_the_manifest_removes_the_version(model_dir, tmp_path, monkeypatch):
    registry = tmp_path / "registry"

    def broken_card(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store, "render_model_card", broken_card)
    with pytest.raises(RegistryError, match=r"tiny v1: registration failed.*disk full"):
        register_model(_cfg(str(registry)), str(model_dir), scored(EVAL_PASS, str(model_dir)), LINEAGE)
    assert not (registry / NAME / "v1").exists()
    assert list_versions(str(registry), NAME) == []


def test_a_writer_that_takes_the_number_as_a_failed_one_gives_it_up_keeps_its_files(
    small_model, s3, monkeypatch
):
    """The failed registration removes its claim last: had it gone first, a writer claiming the
    free number at once would have had its files removed with the failed one's."""
    registry = f"{s3}/registry"
    v1 = f"{registry}/{NAME}/v1"
    remove = storage.remove

    def other_writer_claims_at_once(uri: str) -> None:
        remove(uri)
        if uri == f"{v1}/.claim":  # the number is free: another registration takes it
            assert storage.create_exclusive(uri, b'{"run_id": "other"}')
            storage.write_bytes(f"{v1}/config.json", b"{}")

    monkeypatch.setattr(
        store, "render_model_card", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
    )
    monkeypatch.setattr(storage, "remove", other_writer_claims_at_once)
    with pytest.raises(RegistryError, match="registration failed"):
        register_model(_cfg(registry), str(small_model), scored(EVAL_PASS, str(small_model)), LINEAGE)
    assert sorted(f.rsplit("/", 1)[1] for f in storage.list_files(v1)) == [".claim", "config.json"]
    assert storage.read_json(f"{v1}/.claim") == {"run_id": "other"}


def test_incomplete_model_directory_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(RegistryError, match="no .safetensors"):
        register_model(
            _cfg(str(tmp_path / "r")),
            str(tmp_path / "model"),
            scored(EVAL_PASS, str(tmp_path / "model")),
            LINEAGE,
        )
    with pytest.raises(RegistryError, match="no such model directory"):
        register_model(
            _cfg(str(tmp_path / "r")),
            str(tmp_path / "missing"),
            scored(EVAL_PASS, str(tmp_path / "missing")),
            LINEAGE,
        )
    assert not (tmp_path / "r").exists()


def test_an_eval_result_of_another_model_neither_registers_nor_promotes_it(model_dir, tmp_path):
    from fulltune.evaluate.result import Champion
    from fulltune.registry import pointers

    registry = str(tmp_path / "registry")
    register_model(_cfg(registry), str(model_dir), scored(EVAL_PASS, str(model_dir)), LINEAGE)
    # an eval.json without the evaluated model's digest (written before evaluate recorded one) for
    # model_dir, which beat v1, given with a model directory that was never evaluated
    beat_v1 = EVAL_PASS.model_copy(
        update={"tuned_model_uri": str(model_dir), "champion": Champion(compare_to="registered", version=1)}
    )
    assert beat_v1.tuned_model_manifest_sha256 is None
    never_evaluated = fake_model_dir(tmp_path / "never-evaluated")
    for force in (False, True):  # force overrides a failed gate, not whose result it is
        with pytest.raises(RegistryError) as err:
            register_model(_cfg(registry), str(never_evaluated), beat_v1, LINEAGE, force=force)
        assert f"{never_evaluated} is not the model the eval result describes ({model_dir})" in str(err.value)
    assert [v["version"] for v in list_versions(registry, NAME)] == [1]
    assert pointers.current(registry, NAME, pointers.PRODUCTION).version == 1
    # the evaluated directory itself, however its URI ends, is registered and promoted
    assert register_model(_cfg(registry), f"{model_dir}/", beat_v1, LINEAGE).endswith("v2")
    assert pointers.current(registry, NAME, pointers.PRODUCTION).version == 2


def test_a_lost_claim_moves_on_to_the_next_version(model_dir, tmp_path, monkeypatch):
    registry = str(tmp_path / "registry")
    assert storage.create_exclusive(store.version_uri(registry, NAME, 1) + "/.claim", b"other writer")
    monkeypatch.setattr(store, "_version_numbers", lambda root: [])  # a scan that missed the claim
    uri = register_model(_cfg(registry), str(model_dir), scored(EVAL_PASS, str(model_dir)), LINEAGE)
    assert uri.endswith("v2")
    assert Path(registry, NAME, "v1", ".claim").read_bytes() == b"other writer"


# -- S3 and concurrency -------------------------------------------------------------------------


def test_register_on_s3_twice(model_dir, s3):
    registry = f"{s3}/registry"
    v1 = register_model(_cfg(registry), str(model_dir), scored(EVAL_PASS, str(model_dir)), LINEAGE)
    v2 = register_model(_cfg(registry), str(model_dir), scored(EVAL_PASS, str(model_dir)), LINEAGE)
    assert (v1, v2) == (f"{registry}/{NAME}/v1", f"{registry}/{NAME}/v2")
    assert [v["version"] for v in list_versions(registry, NAME)] == [1, 2]
    assert verify_version(v1) == []

    storage.write_text(f"{v2}/config.json", "{}")
    assert any(p.startswith("config.json: size") for p in verify_version(v2))

    # an S3 source is copied server-side, and the copy loads
    storage.upload_dir(model_dir, f"{s3}/work/model")
    v3 = register_model(_cfg(registry), f"{s3}/work/model", scored(EVAL_PASS, f"{s3}/work/model"), LINEAGE)
    assert v3.endswith("/v3") and verify_version(v3) == []
    from transformers import AutoModelForCausalLM

    with storage.local_dir(v3) as path:
        AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)


def test_conditional_puts_retried_after_they_succeeded_still_register_and_promote(model_dir, s3):
    """The claim, the manifest and the pointer records are conditional PUTs. When the client retries
    one whose answer was lost after it succeeded, the retry's 412 is still this registration's write:
    not a lost claim, not a manifest that appeared meanwhile, not a pointer another writer moved."""
    from fulltune.registry import pointers

    registry = f"{s3}/registry"
    with first_put_answer_lost(storage.s3_client()) as statuses:
        uri = register_model(_cfg(registry), str(model_dir), scored(EVAL_PASS, str(model_dir)), LINEAGE)
    assert statuses == [200, 412] * 4  # claim, manifest, latest, production: each retried, refused
    assert uri == f"{registry}/{NAME}/v1" and verify_version(uri) == []
    assert [v["version"] for v in list_versions(registry, NAME)] == [1]
    assert [pointers.current(registry, NAME, p).version for p in pointers.POINTERS] == [1, 1]


def test_s3_claim_refusal_is_skipped(model_dir, s3, monkeypatch):
    registry = f"{s3}/registry"
    assert storage.create_exclusive(f"{registry}/{NAME}/v1/.claim", b"other writer")
    assert not storage.create_exclusive(f"{registry}/{NAME}/v1/.claim", b"me")
    scan = store._version_numbers
    monkeypatch.setattr(store, "_version_numbers", lambda root: [])
    assert register_model(
        _cfg(registry), str(model_dir), scored(EVAL_PASS, str(model_dir)), LINEAGE
    ).endswith("/v2")
    monkeypatch.setattr(store, "_version_numbers", scan)  # (undo() would also drop the S3 endpoint)
    assert [v["version"] for v in list_versions(registry, NAME)] == [2]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_registrations_get_distinct_versions(model_dir, tmp_path, request, monkeypatch, where):
    registry = f"{request.getfixturevalue('s3')}/registry" if where == "s3" else str(tmp_path / "registry")
    writers = 4
    barrier = threading.Barrier(writers)
    scan = store._version_numbers

    def scan_then_wait(root: str) -> list[int]:
        found = scan(root)
        barrier.wait(timeout=30)  # every writer has seen the same highest version before claiming
        return found

    monkeypatch.setattr(store, "_version_numbers", scan_then_wait)
    results: list[str] = []
    errors: list[BaseException] = []

    def register() -> None:
        try:
            results.append(
                register_model(_cfg(registry), str(model_dir), scored(EVAL_PASS, str(model_dir)), LINEAGE)
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=register) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert sorted(int(uri.rsplit("v", 1)[1]) for uri in results) == [1, 2, 3, 4]
    monkeypatch.setattr(store, "_version_numbers", scan)
    assert [v["version"] for v in list_versions(registry, NAME)] == [1, 2, 3, 4]
    assert all(verify_version(uri) == [] for uri in results)


def test_s3_uploads_carry_a_verified_sha256_checksum(model_dir, s3):
    """S3 checks every uploaded byte against the SHA-256 the client sends (x-amz-checksum-sha256)."""
    import base64

    registry = f"{s3}/registry"
    uri = register_model(_cfg(registry), str(model_dir), scored(EVAL_PASS, str(model_dir)), LINEAGE)
    manifest = storage.read_json(f"{uri}/manifest.json")
    client = storage.s3_client()
    for f in manifest["files"]:
        bucket, key = storage.split_s3(f"{uri}/{f['path']}")
        head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        assert base64.b64decode(head["ChecksumSHA256"]).hex() == f["sha256"], f["path"]


def test_write_options_come_from_the_registry_config():
    cfg = RunConfig.from_dict(
        {
            "registry": {
                "uri": "s3://r",
                "sse_kms_key_id": "alias/models",
                "request_checksum_calculation": "when_required",
            }
        }
    )
    options = store.write_options(cfg)
    assert options.extra_args() == {
        "ChecksumAlgorithm": "SHA256",
        "ServerSideEncryption": "aws:kms",
        "SSEKMSKeyId": "alias/models",
    }
    assert options.request_checksum_calculation == "when_required"


# -- separate processes -------------------------------------------------------------------------

# A registering process. "race": after scanning for the highest version it waits until the other
# process has scanned too, so both try to claim the same version. "hang": after its second file
# upload it signals the test and stalls, to be killed mid-upload.
_WRITER = r"""
import json, os, sys, time
from pathlib import Path
from fulltune import storage
from fulltune.config import RunConfig
from fulltune.evaluate.result import EvalResult
from fulltune.registry import store

registry, model, sync, mode, eval_json = sys.argv[1:6]
sync = Path(sync)
if mode == "race":
    scan = store._version_numbers
    def scan_then_wait(root):
        found = scan(root)
        (sync / f"scanned-{os.getpid()}").touch()
        deadline = time.monotonic() + 60
        while len(list(sync.glob("scanned-*"))) < 2:
            if time.monotonic() > deadline:
                sys.exit("the other writer never scanned")
            time.sleep(0.01)
        return found
    store._version_numbers = scan_then_wait
elif mode == "hang":
    upload, uploaded = storage.upload_file, []
    def upload_then_hang(*args, **kwargs):
        upload(*args, **kwargs)
        uploaded.append(args[1])
        if len(uploaded) == 2:
            (sync / "uploading").touch()
            time.sleep(600)
    storage.upload_file = upload_then_hang
cfg = RunConfig.from_dict({"model": {"name": "tiny"}, "registry": {"uri": registry}})
eval_result = EvalResult.model_validate_json(eval_json)
run_id = f"pid-{os.getpid()}"
print(store.register_model(cfg, model, eval_result, {"run_id": run_id}, run_id=run_id))
"""


@pytest.fixture
def small_model(tmp_path) -> Path:
    return fake_model_dir(tmp_path / "small", weights_bytes=64 * 1024)


def _writer(registry: str, model: Path, sync: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            _WRITER,
            registry,
            str(model),
            str(sync),
            mode,
            scored(EVAL_PASS, str(model)).model_dump_json(),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_processes_registering_at_once_get_v1_and_v2(small_model, s3, tmp_path):
    registry = f"{s3}/registry"
    writers = [_writer(registry, small_model, tmp_path, "race") for _ in range(2)]
    outputs = [w.communicate(timeout=120) for w in writers]
    assert [w.returncode for w in writers] == [0, 0], [err for _, err in outputs]
    assert len(list(tmp_path.glob("scanned-*"))) == 2  # both scanned before either claimed
    uris = sorted(out.strip().splitlines()[-1] for out, _ in outputs)
    assert uris == [f"{registry}/{NAME}/v1", f"{registry}/{NAME}/v2"]
    versions = list_versions(registry, NAME)
    assert [v["version"] for v in versions] == [1, 2]
    assert all(verify_version(uri) == [] for uri in uris)
    assert {f["path"] for f in versions[0]["files"]} == {f["path"] for f in versions[1]["files"]}
    # each version holds the lineage of the process that wrote it
    run_ids = {storage.read_json(f"{uri}/lineage.json")["run_id"] for uri in uris}
    assert run_ids == {f"pid-{w.pid}" for w in writers}


def test_a_writer_killed_mid_upload_leaves_no_visible_version(small_model, s3, tmp_path, capsys):
    from fulltune.cli import main

    registry = f"{s3}/registry"
    writer = _writer(registry, small_model, tmp_path, "hang")
    deadline = time.monotonic() + 60
    while not (tmp_path / "uploading").exists():
        assert writer.poll() is None, writer.communicate()
        assert time.monotonic() < deadline, "the writer never started uploading"
        time.sleep(0.05)
    writer.kill()
    writer.wait(timeout=30)

    partial = f"{registry}/{NAME}/v1"
    left = {f.rsplit("/", 1)[1] for f in storage.list_files(partial)}
    assert {".claim", "config.json", "model.safetensors"} <= left and "manifest.json" not in left
    assert list_versions(registry, NAME) == []
    assert main(["registry", "list", "--uri", registry, "--name", NAME]) == 1  # nothing committed: says so
    assert f"no committed version of {NAME!r} under {registry}" in capsys.readouterr().err
    assert main(["registry", "show", "--uri", registry, "--name", NAME, "--version", "1"]) == 1
    assert f"{partial}: no committed version" in capsys.readouterr().err
    assert main(["registry", "verify", "--uri", registry, "--name", NAME, "--version", "1"]) == 1
    assert "manifest.json: missing, the version was never committed" in capsys.readouterr().err

    # the next registration by another run does not touch the half-written v1
    uri = register_model(_cfg(registry), str(small_model), scored(EVAL_PASS, str(small_model)), LINEAGE)
    assert uri == f"{registry}/{NAME}/v2" and verify_version(uri) == []
    assert main(["registry", "list", "--uri", registry, "--name", NAME]) == 0
    assert capsys.readouterr().out.split("\t")[0] == "v2"
    assert storage.list_files(partial)

    # the retry of the killed writer's run removes what it left, instead of stranding a partial copy
    retried = register_model(
        _cfg(registry),
        str(small_model),
        scored(EVAL_PASS, str(small_model)),
        LINEAGE,
        run_id=f"pid-{writer.pid}",
    )
    assert retried == f"{registry}/{NAME}/v3" and verify_version(retried) == []
    assert storage.list_files(partial) == []
    assert [v["version"] for v in list_versions(registry, NAME)] == [2, 3]


def test_a_retry_with_the_same_run_id_reuses_its_version(small_model, tmp_path):
    registry = str(tmp_path / "registry")
    first = register_model(
        _cfg(registry), str(small_model), scored(EVAL_PASS, str(small_model)), LINEAGE, run_id="run-9"
    )
    again = register_model(
        _cfg(registry), str(small_model), scored(EVAL_PASS, str(small_model)), LINEAGE, run_id="run-9"
    )
    other = register_model(
        _cfg(registry), str(small_model), scored(EVAL_PASS, str(small_model)), LINEAGE, run_id="run-10"
    )
    assert (first, again, other) == (str(Path(registry, NAME, "v1")),) * 2 + (
        str(Path(registry, NAME, "v2")),
    )
    assert [v["run_id"] for v in list_versions(registry, NAME)] == ["run-9", "run-10"]
    assert json.loads(Path(first, "lineage.json").read_text())["run_id"] == "run-9"


def test_the_registry_cli_on_misconfigured_storage_names_the_cause(s3, capsys, monkeypatch):
    """A misspelt bucket is not "never committed", an unknown name is not an empty success, an
    unreachable endpoint is not a traceback: each exits 1 with what to check."""
    from fulltune.cli import main

    missing = "s3://no-such-registry-bucket/models"
    for action in (["list"], ["show", "--version", "1"], ["verify", "--version", "1"]):
        assert main(["registry", *action, "--uri", missing, "--name", NAME]) == 1
        err = capsys.readouterr().err
        assert "the bucket 'no-such-registry-bucket' does not exist" in err, action
        assert "never committed" not in err and "Traceback" not in err
    assert main(["registry", "list", "--uri", f"{s3}/models", "--name", "nobody"]) == 1
    assert "no committed version of 'nobody'" in capsys.readouterr().err
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    storage.s3_client.cache_clear()
    assert main(["registry", "list", "--uri", f"{s3}/models", "--name", NAME]) == 1
    assert "cannot reach the S3 endpoint" in capsys.readouterr().err
    storage.s3_client.cache_clear()


def register_argv(config: Path, model: Path | str, eval_json: Path) -> list[str]:
    """`fulltune registry register` as README shows it: a config, the model, its eval.json."""
    return ["registry", "register", "--config", str(config), "--model", str(model), "--eval", str(eval_json)]


def test_registry_register_on_a_missing_bucket_names_it(small_model, s3, tmp_path, capsys):
    """`registry register` into a misspelt bucket, or from one, is an error line naming the bucket,
    as for the other registry commands, not a traceback."""
    from fulltune.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_cfg("s3://no-such-registry-bucket/models").to_dict()))
    for model, bucket in (
        (str(small_model), "no-such-registry-bucket"),
        ("s3://no-such-model-bucket/tuned", "no-such-model-bucket"),
    ):
        eval_json = tmp_path / "eval.json"
        eval_json.write_text(EVAL_PASS.model_copy(update={"tuned_model_uri": model}).model_dump_json())
        argv = register_argv(config, model, eval_json)
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"error: s3://{bucket}/" in err and f"the bucket '{bucket}' does not exist" in err, err
        assert "Traceback" not in err


def test_a_base_still_naming_a_registry_pointer_is_refused(small_model, tmp_path, capsys):
    """A config written by hand with `registry://NAME/production` (a pipeline run fixes it to one
    version first) would put the pointer into the lineage as the base and the original base: the
    next run from this version would measure forgetting against "registry://...". Refused, nothing
    written; the config the run resolved registers."""
    from fulltune.cli import main

    registry = str(tmp_path / "registry")
    register_model(_cfg(registry), str(small_model), scored(EVAL_PASS, str(small_model)), LINEAGE)
    by_hand = _cfg(registry).with_overrides({"model": {"base_model_uri": f"registry://{NAME}/production"}})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(by_hand.to_dict()))
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(scored(EVAL_PASS, str(small_model)).model_dump_json())
    argv = register_argv(config, small_model, eval_json)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"model.base_model_uri is registry://{NAME}/production, a pointer" in err, err
    assert [v["version"] for v in list_versions(registry, NAME)] == [1]
    # finishing a registration that committed already (what a Model Registry failure asks for)
    # writes no lineage, and is not refused
    assert main([*argv, "--run-id", "run-1"]) == 1
    capsys.readouterr()
    register_model(
        _cfg(registry), str(small_model), scored(EVAL_PASS, str(small_model)), LINEAGE, run_id="run-2"
    )
    assert main([*argv, "--run-id", "run-2"]) == 0
    assert capsys.readouterr().out.strip() == str(Path(registry, NAME, "v2"))

    resolved = by_hand.with_overrides({"model": {"base_model_uri": f"{registry}/{NAME}/v1"}})
    config.write_text(yaml.safe_dump(resolved.to_dict()))
    assert main(argv) == 0
    lineage = json.loads(Path(registry, NAME, "v3", "lineage.json").read_text())
    assert lineage["base_model_uri"] == f"{registry}/{NAME}/v1"
    assert not lineage["original_base_model_uri"].startswith("registry://")


def test_registry_register_with_the_config_as_written_leaves_the_work_dir_alone(
    small_model, tmp_path, capsys
):
    """The config as written names the work_dir runs are made under, not a run's own directory: a
    failed registration writes no failure record there (`fulltune runs` would list a run named
    "failures"), and the lineage names no dataset manifest of a run that is not this model's."""
    from fulltune.cli import main
    from fulltune.run_list import run_statuses

    work, registry = tmp_path / "work", str(tmp_path / "registry")
    work.mkdir()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_cfg(registry).with_overrides({"work_dir": str(work)}).to_dict()))
    for evaluated, code in ((EVAL_FAIL, 1), (EVAL_PASS, 0)):
        eval_json = tmp_path / "eval.json"
        eval_json.write_text(scored(evaluated, str(small_model)).model_dump_json())
        argv = register_argv(config, small_model, eval_json)
        assert main(argv) == code, capsys.readouterr().err
        assert list(work.iterdir()) == [] and run_statuses(str(work)) == []
    data = json.loads(Path(registry, NAME, "v1", "lineage.json").read_text())["data"]
    assert data["dataset_manifest_uri"] is None and data["dataset_manifest_sha256"] is None
