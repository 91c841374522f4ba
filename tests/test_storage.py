"""Storage by URI, locally and against a real S3 endpoint (moto server over HTTP on localhost)."""

from __future__ import annotations

import contextlib
import re
import threading

import pytest

from fulltune import storage


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3") + "/prefix"


def test_write_read_exists_list(base):
    uri = storage.join(base, "a", "b.json")
    assert not storage.exists(uri)
    storage.write_json(uri, {"x": 1})
    assert storage.exists(uri)
    assert storage.read_json(uri) == {"x": 1}
    storage.write_text(storage.join(base, "a", "c.txt"), "hello")
    assert storage.list_files(storage.join(base, "a")) == [
        storage.join(base, "a", "b.json"),
        storage.join(base, "a", "c.txt"),
    ]
    assert storage.expand(storage.join(base, "a", "*.txt")) == [storage.join(base, "a", "c.txt")]
    assert storage.sha256_uri(storage.join(base, "a", "c.txt")) == (
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    )


def test_a_path_with_brackets_that_exists_is_the_file_it_names_and_a_class_otherwise(base):
    """`runs[2]/notes.jsonl` (brackets in a folder's name) used to be read as a character class
    matching `runs2/...` only: 'no data files found' for a file that is there."""
    literal = storage.join(base, "runs[2]", "notes.jsonl")
    storage.write_text(literal, "{}\n")
    assert storage.expand(literal) == [literal]
    assert storage.expand(storage.join(base, "runs[2]")) == [literal]  # the folder, listed
    # where nothing is named so, the brackets still match a character, as in a shell
    for n in (1, 3):
        storage.write_text(storage.join(base, f"part-{n}.jsonl"), "{}\n")
    pattern = storage.join(base, "part-[0-9].jsonl")
    assert storage.expand(pattern) == [storage.join(base, f"part-{n}.jsonl") for n in (1, 3)]


def test_missing_object_error_names_uri(base):
    uri = storage.join(base, "missing.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        storage.read_bytes(uri)


def test_create_exclusive_has_one_winner(base):
    uri = storage.join(base, "claim")
    results = []
    barrier = threading.Barrier(4)

    def claim(i):
        barrier.wait()
        results.append((storage.create_exclusive(uri, f"writer {i}".encode()), i))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for ok, i in results if ok]
    assert len(winners) == 1
    assert storage.read_text(uri) == f"writer {winners[0]}"


@contextlib.contextmanager
def first_put_answer_lost(client):
    """Every conditional PUT through `client` succeeds, but its answer is lost: the client sends it
    again, as botocore does after a timeout, and that retry is refused (412). Yields the HTTP status
    of each conditional attempt."""
    statuses = []

    def lose_the_answer(attempts: int, response=None, request_dict=None, **_):
        if "If-None-Match" not in (request_dict or {}).get("headers", {}):
            return None
        status = response[0].status_code if response else None
        statuses.append(status)
        return 0 if attempts == 1 and status == 200 else None  # 0: retry at once

    client.meta.events.register("needs-retry.s3.PutObject", lose_the_answer)
    try:
        yield statuses
    finally:
        client.meta.events.unregister("needs-retry.s3.PutObject", lose_the_answer)


def test_a_create_whose_retried_put_is_refused_after_it_succeeded_is_still_this_writers(s3):
    uri = f"{s3}/pointers/production/00000001.json"
    with first_put_answer_lost(storage.s3_client()) as statuses:
        assert storage.create_exclusive(uri, b"record of writer A")
    assert statuses == [200, 412]  # the write succeeded; the client's retry of it was refused
    assert storage.read_bytes(uri) == b"record of writer A"
    # another writer is refused, with other bytes and with the same bytes alike: one winner only
    assert not storage.create_exclusive(uri, b"record of writer B")
    assert not storage.create_exclusive(uri, b"record of writer A")
    assert storage.read_bytes(uri) == b"record of writer A"


def test_upload_dir_and_local_dir_round_trip(base, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "w.bin").write_bytes(b"\x00" * 1000)
    (src / "sub" / "t.txt").write_text("t")
    dest = storage.join(base, "model")
    assert storage.upload_dir(src, dest) == ["sub/t.txt", "w.bin"]
    with storage.local_dir(dest) as local:
        assert (local / "w.bin").read_bytes() == b"\x00" * 1000
        assert (local / "sub" / "t.txt").read_text() == "t"
        assert [f["path"] for f in storage.file_manifest(local)] == ["sub/t.txt", "w.bin"]


def test_folders_made_in_the_s3_console_are_not_files(s3, tmp_path):
    """The S3 console's "Create folder" (and s3fs, Hadoop's S3A) store a folder as an empty object
    whose key ends in "/": it is no file of the model, and downloading it as one collides with the
    directory of the same name."""
    src = tmp_path / "src"
    (src / "original").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "original" / "params.json").write_text("{}")
    dest = f"{s3}/models/llama"
    bucket, key = storage.split_s3(dest)
    for marker in (f"{key}/", f"{key}/original/"):
        storage.s3_client().put_object(Bucket=bucket, Key=marker, Body=b"")
    storage.upload_dir(src, dest)
    assert storage.list_files(dest) == [f"{dest}/config.json", f"{dest}/original/params.json"]
    with storage.local_dir(dest) as local:
        assert [f["path"] for f in storage.file_manifest(local)] == ["config.json", "original/params.json"]


def test_local_write_is_atomic_and_leaves_no_temp_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    storage.write_text(str(target), "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        storage.write_text(str(target), "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_s3_credentials_come_from_environment(s3, monkeypatch):
    # a wrong endpoint in the environment is what the client uses: proof nothing else configures it
    storage.write_text(s3 + "/k", "v")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    storage.s3_client.cache_clear()
    with pytest.raises(Exception):  # noqa: B017 — connection refused surfaces as a botocore error
        storage.read_bytes(s3 + "/k")
    storage.s3_client.cache_clear()


# -- misconfigured storage: one clear error per cause, naming the URI ----------------------------------


def test_a_missing_bucket_is_a_configuration_error_not_a_missing_file(s3):
    """A misspelt bucket is not 'no such object': every operation says the bucket does not exist,
    and it is permanent (StorageConfigError), so nothing retries it."""
    uri = "s3://no-such-bucket-anywhere/runs/x.json"
    for call in (
        lambda: storage.exists(uri),
        lambda: storage.read_bytes(uri),
        lambda: storage.list_files("s3://no-such-bucket-anywhere/runs"),
        lambda: storage.size(uri),
        lambda: storage.write_bytes(uri, b"{}"),
    ):
        with pytest.raises(
            storage.StorageConfigError, match="the bucket 'no-such-bucket-anywhere' does not exist"
        ):
            call()
    assert not storage.exists(f"{s3}/really/missing.json")  # a missing key in a real bucket stays a miss
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{s3}/really/missing.json")


def test_an_unreachable_endpoint_and_missing_credentials_are_named(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    storage.s3_client.cache_clear()
    with pytest.raises(storage.StorageError, match=rf"{s3}/x: cannot reach the S3 endpoint") as exc:
        storage.read_bytes(f"{s3}/x")
    assert not isinstance(exc.value, storage.StorageConfigError)  # maybe transient: retryable
    storage.s3_client.cache_clear()


def test_an_unreachable_endpoint_is_named_without_the_credentials_in_its_url(s3, monkeypatch):
    """An endpoint behind an authenticating proxy may carry user:token@ in AWS_ENDPOINT_URL; the
    error (a step's log, its failures/<step>.json, doctor's finding) names the endpoint without it."""
    secret = "FAKE-proxy-t0ken"  # noqa: S105 - a made-up credential the message must not show
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://minio:{secret}@127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    storage.s3_client.cache_clear()
    with pytest.raises(storage.StorageError) as exc:
        storage.read_bytes(f"{s3}/x")
    assert "cannot reach the S3 endpoint" in str(exc.value) and "http://***@127.0.0.1:9/" in str(exc.value)
    assert secret not in str(exc.value)
    storage.s3_client.cache_clear()


def test_an_endpoint_whose_tls_is_refused_is_a_config_error_without_the_credentials(
    s3, s3_server, monkeypatch
):
    """https:// to an endpoint whose certificate is not trusted (here: one that speaks plain HTTP)
    fails every attempt alike: a StorageConfigError saying what to set, not botocore's raw SSLError
    quoting AWS_ENDPOINT_URL with its user:token@."""
    from fulltune.failure import is_permanent

    secret = "FAKE-proxy-t0ken"  # noqa: S105 - a made-up credential the message must not show
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.replace("http://", f"https://minio:{secret}@"))
    storage.s3_client.cache_clear()
    with pytest.raises(storage.StorageConfigError, match="the S3 endpoint's TLS was refused") as exc:
        storage.read_bytes(f"{s3}/x")
    assert "AWS_CA_BUNDLE" in str(exc.value) and "https://***@127.0.0.1:" in str(exc.value)
    assert secret not in str(exc.value) and is_permanent(exc.value)
    storage.s3_client.cache_clear()


def test_an_unreachable_endpoint_fails_validate_data_as_storage_not_as_bad_data(s3, tmp_path, monkeypatch):
    """The data may be fine: the step fails naming the endpoint, with no verdict on the dataset."""
    from fulltune import steps
    from fulltune.config import RunConfig

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    storage.s3_client.cache_clear()
    cfg = RunConfig.from_dict({"work_dir": str(tmp_path / "w"), "data": {"train_uri": f"{s3}/notes.jsonl"}})
    with pytest.raises(storage.StorageError, match=f"{s3}/notes.jsonl: cannot reach the S3 endpoint") as exc:
        steps.validate_data(cfg, str(tmp_path / "report"))
    assert not isinstance(exc.value, storage.StorageConfigError)
    storage.s3_client.cache_clear()


def test_refused_credentials_are_a_configuration_error_everywhere(s3, tmp_path, capsys):
    """The moto server checking keys (its IAM authentication on: the test's keys are unknown to it):
    storage, the first checking step and the registry CLI each name the URI and what to check, as a
    permanent error."""
    from moto.core import set_initial_no_auth_action_count

    from fulltune import steps
    from fulltune.cli import main
    from fulltune.config import RunConfig
    from fulltune.data.validate.verdict import DataValidationError

    refused = r"access refused \((InvalidAccessKeyId|403)\): check the credentials"  # HEAD has no error body

    @set_initial_no_auth_action_count(0)
    def with_keys_checked() -> None:
        with pytest.raises(storage.StorageConfigError, match=rf"{s3}/x: {refused}"):
            storage.read_bytes(f"{s3}/x")
        cfg = RunConfig.from_dict(
            {"work_dir": str(tmp_path / "w"), "data": {"train_uri": f"{s3}/notes.jsonl"}}
        )
        with pytest.raises(DataValidationError, match=rf"{s3}/notes.jsonl: no_data: {refused}"):
            steps.validate_data(cfg, str(tmp_path / "report"))
        assert main(["registry", "list", "--uri", f"{s3}/models", "--name", "m"]) == 1
        assert re.search(refused, capsys.readouterr().err)

    with_keys_checked()


def test_validate_data_on_a_misspelt_bucket_names_the_bucket(s3, tmp_path):
    """The first step that touches the data says what is wrong, not a botocore traceback."""
    from fulltune import steps
    from fulltune.config import RunConfig

    cfg = RunConfig.from_dict(
        {"work_dir": str(tmp_path / "w"), "data": {"train_uri": "s3://no-such-data-bucket/notes.jsonl"}}
    )
    from fulltune.data.validate.verdict import DataValidationError

    with pytest.raises(DataValidationError) as exc:
        steps.validate_data(cfg, str(tmp_path / "report"))
    message = str(exc.value)
    assert "s3://no-such-data-bucket/notes.jsonl" in message
    assert "the bucket 'no-such-data-bucket' does not exist" in message and "botocore" not in message
    # the message points to the report where it still is: the step's artifact, not a deleted /tmp
    report = tmp_path / "report"
    assert f"report: {report} (this step's `report` artifact)" in message
    assert "no_data" in report.read_text()
