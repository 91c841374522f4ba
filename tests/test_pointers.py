"""Registry pointers: `production` and `latest`, moved only by compare-and-swap, with their history."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from eval_samples import scored
from fulltune.cli import main
from fulltune.config import RunConfig
from fulltune.registry import pointers
from fulltune.registry.layout import RegistryError
from fulltune.registry.pointers import LATEST, PRODUCTION, PointerConflict
from fulltune.registry.store import register_model
from test_registry import EVAL_PASS, LINEAGE, NAME
from tiny_models import save_tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("model") / "tuned")


def registry_with(model_dir: Path, registry: str, versions: int, run_ids=None) -> str:
    cfg = RunConfig.from_dict({"model": {"name": NAME}, "registry": {"uri": registry}})
    for i in range(versions):
        register_model(
            cfg, str(model_dir), scored(EVAL_PASS, str(model_dir)), LINEAGE, run_id=(run_ids or {}).get(i, "")
        )
    return registry


def named(registry: str, pointer: str) -> int | None:
    record = pointers.current(registry, NAME, pointer)
    return record.version if record else None


def test_the_first_version_serves_and_later_ones_are_only_latest_until_promoted(model_dir, tmp_path, capsys):
    registry = registry_with(model_dir, str(tmp_path / "registry"), 2, {0: "run-1", 1: "run-2"})
    assert (named(registry, PRODUCTION), named(registry, LATEST)) == (1, 2)
    [first] = pointers.history(registry, NAME, PRODUCTION)
    assert first.by == "pipeline run run-1" and first.reason == "first registered version of the model"
    assert main(["registry", "list", "--uri", registry, "--name", NAME]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("v1\tproduction\t") and lines[1].startswith("v2\tlatest\t")


def test_promote_and_rollback_move_production_and_say_who_when_and_why(model_dir, tmp_path, capsys):
    registry = registry_with(model_dir, str(tmp_path / "registry"), 3)
    base = ["registry", "promote", "--uri", registry, "--name", NAME]
    assert main([*base, "--version", "3", "--reason", "beats v1 on the March notes"]) == 0
    assert "production v1 -> v3" in capsys.readouterr().out
    rollback = ["registry", "rollback", "--uri", registry, "--name", NAME]
    assert main([*rollback, "--reason", "v3 misreads eGFR units in production"]) == 0
    assert named(registry, PRODUCTION) == 1  # back to the version before
    assert main(["registry", "history", "--uri", registry, "--name", NAME]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[1:3] for line in out[-3:]] == [
        ["promote", "unset -> v1"],
        ["promote", "v1 -> v3"],
        ["rollback", "v3 -> v1"],
    ]
    assert out[-1].endswith("v3 misreads eGFR units in production") and "@" in out[-1].split("\t")[3]
    # a rollback names its target when asked, and always needs a reason
    assert main([*rollback, "--version", "2", "--reason", "v2 is the audited one"]) == 0
    assert named(registry, PRODUCTION) == 2
    with pytest.raises(SystemExit):
        main(rollback)
    # so does a promotion: a blank one is refused, and production stays where it is
    assert main([*base, "--version", "3", "--reason", "  "]) == 1
    assert "a promotion needs a reason" in capsys.readouterr().err
    assert named(registry, PRODUCTION) == 2


def test_a_pointer_only_names_committed_versions(model_dir, tmp_path, capsys):
    registry = registry_with(model_dir, str(tmp_path / "registry"), 1)
    assert (
        main(["registry", "promote", "--uri", registry, "--name", NAME, "--version", "7", "--reason", "x"])
        == 1
    )
    assert "v7 is not a committed version" in capsys.readouterr().err
    assert named(registry, PRODUCTION) == 1


def test_a_move_from_a_stale_value_is_refused_naming_who_moved_it(model_dir, tmp_path):
    registry = registry_with(model_dir, str(tmp_path / "registry"), 3)
    pointers.promote(registry, NAME, 2, reason="cycle 2 won", by="pipeline run run-2", expected=1)
    with pytest.raises(PointerConflict) as err:
        pointers.promote(registry, NAME, 3, reason="cycle 3 won", expected=1)
    assert "production names v2, not v1" in str(err.value) and "pipeline run run-2" in str(err.value)
    assert named(registry, PRODUCTION) == 2


@pytest.mark.parametrize("where", ["local", "s3"])
def test_racing_promotions_from_the_same_value_have_exactly_one_winner(
    model_dir, tmp_path, request, monkeypatch, where
):
    registry = f"{request.getfixturevalue('s3')}/registry" if where == "s3" else str(tmp_path / "registry")
    registry_with(model_dir, registry, 4)
    racers = 3
    barrier = threading.Barrier(racers)
    read = pointers.current
    first_read = threading.local()

    def read_then_wait(*args):
        record = read(*args)
        if not getattr(first_read, "done", False):
            first_read.done = True
            barrier.wait(timeout=30)  # every racer has read production = v1 before any writes
        return record

    monkeypatch.setattr(pointers, "current", read_then_wait)
    won, lost = [], []

    def race(version: int) -> None:
        try:
            won.append(pointers.promote(registry, NAME, version, reason=f"cycle {version}", expected=1))
        except PointerConflict as exc:
            lost.append(exc)

    threads = [threading.Thread(target=race, args=(v,)) for v in (2, 3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    monkeypatch.setattr(pointers, "current", read)
    assert len(won) == 1 and len(lost) == racers - 1
    assert named(registry, PRODUCTION) == won[0].version
    assert [r.version for r in pointers.history(registry, NAME, PRODUCTION)] == [1, won[0].version]


def test_latest_names_the_newest_version_when_an_older_registration_moved_it_first(
    model_dir, tmp_path, monkeypatch
):
    """Two registrations committed v1 and v2 at once and both read `latest` unset: v1's writer
    creating the pointer's record first must not leave `latest` at v1, behind the newest version
    (what registry://NAME/latest resolves to)."""
    from fulltune import storage
    from fulltune.registry import store

    registry = str(tmp_path / "registry")
    with monkeypatch.context() as m:  # both committed, neither has moved a pointer yet
        m.setattr(store.pointers, "on_register", lambda *a, **k: [])
        registry_with(model_dir, registry, 2)
    create, raced = storage.create_exclusive, []

    def v1_moves_first(uri, data, options=storage.DEFAULT_WRITE):
        if f"/{LATEST}/" in uri and not raced:
            raced.append(uri)
            pointers.on_register(registry, NAME, 1, run_id="run-1")  # after v2's read, before its write
        return create(uri, data, options)

    monkeypatch.setattr(storage, "create_exclusive", v1_moves_first)
    pointers.on_register(registry, NAME, 2, run_id="run-2")
    assert [r.version for r in pointers.history(registry, NAME, LATEST)] == [1, 2]
    assert pointers.resolve_ref(f"registry://{NAME}/latest", registry).version == 2
    assert named(registry, PRODUCTION) == 1  # production's compare-and-swap is v1's: it moved first


def test_a_retried_registration_moves_no_pointer_twice(model_dir, tmp_path):
    registry = str(tmp_path / "registry")
    registry_with(model_dir, registry, 1, {0: "run-1"})
    registry_with(model_dir, registry, 1, {0: "run-1"})  # the same run again: its v1, nothing new
    assert len(pointers.history(registry, NAME, PRODUCTION)) == 1
    assert len(pointers.history(registry, NAME, LATEST)) == 1


def test_rollback_of_a_pointer_never_set_or_unknown_pointer_is_refused(tmp_path):
    with pytest.raises(RegistryError, match="production was never set"):
        pointers.rollback(str(tmp_path), NAME, reason="why")
    with pytest.raises(RegistryError, match="unknown pointer 'staging'"):
        pointers.history(str(tmp_path), NAME, "staging")


# -- registry:// base models ---------------------------------------------------------------------------


def test_a_registry_reference_is_fixed_to_one_version_and_carries_the_original_base(model_dir, tmp_path):
    from fulltune import steps
    from fulltune.registry.layout import version_uri

    registry = str(tmp_path / "registry")
    cfg = RunConfig.from_dict({"model": {"name": NAME}, "registry": {"uri": registry}})
    lineage = {**LINEAGE, "base_model_uri": "s3://models/llama-3.1-8b"}
    register_model(cfg, str(model_dir), scored(EVAL_PASS, str(model_dir)), lineage)
    # v2 was tuned from v1: its lineage names the original base it descends from
    register_model(
        cfg,
        str(model_dir),
        scored(EVAL_PASS, str(model_dir)),
        {**lineage, "original_base_model_uri": "s3://models/llama-3.1-8b"},
    )
    ref = pointers.resolve_ref(f"registry://{NAME}/production", registry)
    assert (ref.version, ref.uri) == (1, version_uri(registry, NAME, 1))
    assert pointers.resolve_ref(f"registry://{NAME}/latest", registry).version == 2
    assert (
        pointers.resolve_ref(f"registry://{NAME}/v2", registry).original_base_model_uri
        == "s3://models/llama-3.1-8b"
    )
    # a run that starts from production: fixed by the first step, the original base beside it
    run = cfg.with_overrides({"model.base_model_uri": f"registry://{NAME}/production"})
    fixed = run.with_overrides(steps.run_inputs(run))
    assert fixed.model.base_model_uri == version_uri(registry, NAME, 1)
    assert fixed.model.original_base_model_uri == "s3://models/llama-3.1-8b"


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        (f"registry://{NAME}/staging", "expected registry://NAME/production"),
        (f"registry://{NAME}/v0", "expected registry://NAME/production"),
    ],
)
def test_a_malformed_registry_reference_is_refused_at_load(ref, message):
    from fulltune.config import ConfigError

    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"model": {"base_model_uri": ref}})
    assert "model.base_model_uri" in str(err.value) and message in str(err.value)


def test_a_reference_to_a_pointer_never_set_names_it(tmp_path):
    with pytest.raises(RegistryError, match=f"{NAME} has no production version under"):
        pointers.resolve_ref(f"registry://{NAME}/production", str(tmp_path))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("missing.yaml", "config file not found"),
        ("no-kubeflow.yaml", "no registry.kubeflow to mirror the move in"),
    ],
)
def test_a_config_that_cannot_mirror_the_move_leaves_production_where_it_was(
    model_dir, tmp_path, capsys, config, message
):
    registry = registry_with(model_dir, str(tmp_path / "registry"), 2)
    (tmp_path / "no-kubeflow.yaml").write_text(f"registry: {{uri: {registry}}}\n")
    promote = ["registry", "promote", "--uri", registry, "--name", NAME, "--version", "2", "--reason", "x"]
    assert main([*promote, "--config", str(tmp_path / config)]) == 1
    err = capsys.readouterr().err
    assert message in err and "production not moved" in err and "Traceback" not in err
    assert named(registry, PRODUCTION) == 1 and len(pointers.history(registry, NAME, PRODUCTION)) == 1


def test_promoting_the_version_in_production_moves_nothing_and_rollback_still_goes_back(
    model_dir, tmp_path, capsys
):
    registry = registry_with(model_dir, str(tmp_path / "registry"), 2)
    promote = ["registry", "promote", "--uri", registry, "--name", NAME, "--version", "2"]
    assert main([*promote, "--reason", "signed off"]) == 0
    assert main([*promote, "--reason", "signed off, again"]) == 0
    assert "production already names v2 (promote by " in capsys.readouterr().out
    assert [r.version for r in pointers.history(registry, NAME, PRODUCTION)] == [1, 2]
    assert (
        main(["registry", "rollback", "--uri", registry, "--name", NAME, "--reason", "v2 misreads eGFR"]) == 0
    )
    assert "production v2 -> v1" in capsys.readouterr().out
    assert named(registry, PRODUCTION) == 1


def test_the_history_of_a_model_never_registered_is_an_error_not_an_empty_list(model_dir, tmp_path, capsys):
    registry = registry_with(model_dir, str(tmp_path / "registry"), 1)
    assert main(["registry", "history", "--uri", registry, "--name", "tiny-typo"]) == 1
    assert f"tiny-typo: production was never set under {registry}" in capsys.readouterr().err
