"""`fulltune run CONFIG --until STEP` and `fulltune check CONFIG`: the dry run on the user's own model
and data, as a user runs it from a shell."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

from fulltune.cli import main


def user_config(tmp_path: Path, demo_assets, **data) -> Path:
    """The demo's model and notes given as a user's own config file."""
    cfg = {
        "work_dir": str(tmp_path / "work"),
        "model": {"base_model_uri": str(demo_assets.base_model_dir), "name": "my-notes-model"},
        "data": {"train_uri": demo_assets.train_uri, "general_uri": demo_assets.general_uri, **data},
        "preprocess": {"max_seq_len": 128},
        "training": {"learning_rate": 1e-4, "num_train_epochs": 1},
        "resources": {"accelerator": "cpu", "nproc_per_node": 2},
    }
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_dry_run_passes_a_good_config_with_one_line_per_step(tmp_path, demo_assets, capsys):
    import json

    train = Path(demo_assets.train_uri).read_text().splitlines()
    eval_file = tmp_path / "eval.jsonl"  # 3 of its 60 notes also in train: under the 10% that fails
    eval_file.write_text(
        "\n".join(train[:3] + [json.dumps({"text": f"note {i}: stable."}) for i in range(57)])
    )
    config = user_config(tmp_path, demo_assets, eval_uri=str(eval_file))
    assert main(["check", str(config), "--dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out.splitlines()
    # a warning is named by its code on the step's line (the report has each record)
    assert (
        "train 1,500 records, 0 bad, no warnings; eval 60 records, 0 bad, warnings: 3 train_overlap" in out[0]
    )
    assert [line.split()[:2] for line in out[:3]] == [
        ["ok", "validate_data"],
        ["ok", "check_tokenizer"],
        ["ok", "plan"],
    ]
    assert (
        "train " in out[0]
        and "records" in out[0]
        and f"report: {tmp_path / 'out' / 'validate_data.html'}" in out[0]
    )
    assert "model files complete" in out[1] and "GiB per GPU" in out[2]
    assert ", work_dir needs ~" in out[2] and " free" in out[2]  # the disk its checkpoints take, checked
    # the demo notes are text, longer than 128 tokens: packed across sequences, nothing cut off
    assert "over max_seq_len (split, not truncated)" in out[1]
    assert out[3].startswith("verdict: passed plan") and len(out) == 4
    assert (tmp_path / "out" / "plan.md").read_text().startswith("# Training plan")
    assert not (tmp_path / "work").exists()  # nothing trained, nothing written to the work directory


def test_a_dry_run_until_an_earlier_step_says_how_to_check_the_rest(tmp_path, demo_assets, capsys):
    config = user_config(tmp_path, demo_assets)
    assert main(["run", str(config), "--until", "validate_data", "--dir", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "verdict: passed validate_data and every step before it; next: "
        "`fulltune run CONFIG --until plan` checks check_tokenizer and plan too"
    )


def test_the_dry_run_checks_the_disk_a_run_with_the_same_dir_would_use(tmp_path, demo_assets, capsys):
    """No work_dir in the config: `fulltune run --dir D` would put it under D/runs, so the dry run
    with the same --dir checks that disk, and writes nothing there."""
    config = user_config(tmp_path, demo_assets)
    cfg = yaml.safe_load(config.read_text())
    del cfg["work_dir"]
    del cfg["data"]["general_uri"]  # and no general set: plan's warning has a line of its own
    config.write_text(yaml.safe_dump(cfg))
    out_dir = tmp_path / "out"
    assert main(["check", str(config), "--dir", str(out_dir)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    planned = next(i for i, line in enumerate(lines) if line.startswith("ok     plan"))
    assert lines[planned + 1].startswith(
        "  warning: data.general_uri is not set: forgetting will not be measured"
    )
    assert "general_uri is not set" not in err  # said once, where the dry run's lines are
    assert ", work_dir needs ~" in lines[planned]
    assert f"| disk | work_dir {out_dir}: ~" in (out_dir / "plan.md").read_text()  # runs/ is made later
    assert not (out_dir / "runs").exists()


def test_the_dry_run_finds_a_registry_base_where_a_run_with_the_same_dir_would(tmp_path, demo_assets, capsys):
    """No registry.uri in the config: `fulltune run --dir D` keeps the registry under D/registry and
    starts a retraining cycle from registry://NAME/production there, so `fulltune check` with the
    same --dir looks the version up there too, rather than refusing the config `run` accepts."""
    from eval_samples import scored
    from fulltune.config import RunConfig
    from fulltune.registry.layout import version_uri
    from fulltune.registry.store import register_model
    from test_registry import EVAL_PASS, LINEAGE

    out_dir = tmp_path / "out"
    registry = str((out_dir / "registry").resolve())
    model = str(demo_assets.base_model_dir)
    own = RunConfig.from_dict({"model": {"name": "my-notes-model"}, "registry": {"uri": registry}})
    register_model(own, model, scored(EVAL_PASS, model), {**LINEAGE, "base_model_uri": model})
    config = user_config(tmp_path, demo_assets)
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["base_model_uri"] = "registry://my-notes-model/production"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(config), "--until", "validate_data", "--dir", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert f"base model: {version_uri(registry, 'my-notes-model', 1)} (original: {model})" in out


def test_a_dry_run_from_a_registry_version_that_is_not_there_is_refused_not_a_traceback(
    tmp_path, demo_assets, capsys
):
    """A retraining config naming a version the registry lacks (a typo, a pruned version): the
    configure step's refusal, as `fulltune run` prints it, not a RegistryError traceback."""
    config = user_config(tmp_path, demo_assets)
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["base_model_uri"] = "registry://my-notes-model/v9"
    cfg["registry"] = {"uri": str(tmp_path / "registry")}
    config.write_text(yaml.safe_dump(cfg))
    assert main(["check", str(config), "--dir", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED configure\nmy-notes-model: v9 is not a committed version (")
    assert out.endswith("verdict: refused before any step; nothing was trained\n")


def broken_notes(tmp_path: Path, demo_assets) -> tuple[Path, str]:
    """(a user config whose notes end in a truncated record, where validate_data must point)."""
    notes = tmp_path / "notes.jsonl"
    shutil.copyfile(demo_assets.train_uri, notes)
    with open(notes, "a") as f:
        f.write('{"text": "a broken record\n')
    config = user_config(tmp_path, demo_assets, train_uri=str(notes))
    return config, f"{notes}:{sum(1 for _ in open(notes))}: invalid_json"


def test_the_dry_run_stops_at_the_step_that_refuses_and_names_the_place(tmp_path, demo_assets, capsys):
    config, problem = broken_notes(tmp_path, demo_assets)
    assert main(["run", str(config), "--until", "plan", "--dir", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED validate_data")
    assert problem in out and "verdict: refused at validate_data" in out
    assert "check_tokenizer" not in out


def test_a_full_run_that_fails_prints_the_step_its_message_and_the_log(tmp_path, demo_assets, capsys):
    config, problem = broken_notes(tmp_path, demo_assets)
    assert main(["run", str(config), "--dir", str(tmp_path / "out")]) == 1
    lines = capsys.readouterr().out.splitlines()
    failed = next(i for i, line in enumerate(lines) if line.startswith("FAILED validate-data"))
    message = "\n".join(lines[failed + 1 :])
    assert problem in message
    assert re.match(r"  [A-Z]\w*: ", lines[failed + 1]), lines[
        failed + 1
    ]  # the error's name, not its module path
    assert lines[-1].startswith("full log: ") and "Traceback" not in message
    assert Path(lines[-1].removeprefix("full log: ")).read_text()  # kfp.local's own output is kept there
    # the refused run is listed with the others under work_dir, in the directory the run named
    (root,) = [line.removeprefix("the run's directory: ") for line in lines if line.startswith("the run's")]
    assert main(["runs", str(config), "--dir", str(tmp_path / "out")]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith(Path(root).name)]
    # its failure recorded where the run would have been: said as what it was
    assert row.startswith(f"{Path(root).name}  failed at validate_data on its input before plan"), row


def test_a_demo_that_fails_at_a_step_ends_as_a_failed_run_does_not_with_a_traceback(
    tmp_path, demo_assets, capsys
):
    """The step, its message and the log, exit 1; and a --nproc that cannot run is a usage error."""
    import pytest

    from fulltune.demo.assets import CACHE_KEY

    demo = tmp_path / "demo"
    (demo / "assets").mkdir(parents=True)
    (demo / "assets" / CACHE_KEY).symlink_to(Path(demo_assets.base_model_dir).parent)  # built already
    (demo / "runs").write_text("")  # where the demo's runs go: plan cannot make the run's directory
    assert main(["demo", "--dir", str(demo)]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[-2].startswith("  PlanError: work_dir ") and lines[-1].startswith("full log: ")
    assert "Traceback" not in captured.err and "RuntimeError" not in captured.err

    with pytest.raises(SystemExit) as usage:
        main(["demo", "--dir", str(demo), "--nproc", "0"])
    assert usage.value.code == 2
    assert "argument --nproc: '0': a whole number, 1 or more" in capsys.readouterr().err


def test_until_check_tokenizer_refuses_a_broken_model(tmp_path, demo_assets, capsys):
    model = tmp_path / "model"
    shutil.copytree(demo_assets.base_model_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    config = user_config(tmp_path, demo_assets)
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["base_model_uri"] = str(model)
    config.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(config), "--until", "check_tokenizer", "--dir", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert out.startswith("ok     validate_data") and "FAILED check_tokenizer" in out
    assert f"{weights}: truncated_shard" in out
    assert "truncated_shard" in (tmp_path / "out" / "check_tokenizer.html").read_text()


def test_a_config_that_does_not_validate_is_named_not_a_traceback(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("training:\n  learning_rate: fast\n")
    assert main(["check", str(config)]) == 1
    err = capsys.readouterr().err
    assert "training.learning_rate" in err and "Traceback" not in err


def test_a_config_path_that_is_a_directory_or_not_utf8_is_named_not_a_traceback(tmp_path, capsys):
    assert main(["check", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path}: a directory, not a config file (name a YAML or JSON file)\n"
    config = tmp_path / "badenc.yaml"
    config.write_bytes(b"model:\n  name: x\nwork_dir: /tmp/x\xff\n")
    assert main(["config", "--check", str(config)]) == 1
    assert capsys.readouterr().err == (
        f"error: {config}:3:17: not valid UTF-8: byte 0xff at byte offset 33 (save the file as UTF-8)\n"
    )


def test_a_dir_that_is_a_file_is_named_before_anything_runs(tmp_path, capsys):
    config = tmp_path / "my.yaml"
    config.write_text("work_dir: /tmp/x\n")
    a_file = tmp_path / "train.csv"
    a_file.write_text("text\nhello\n")
    assert main(["check", str(config), "--dir", str(a_file)]) == 1
    assert capsys.readouterr().err == (
        f"error: --dir {a_file}: is a file, not a directory (name a directory for the run's files)\n"
    )
    below = a_file / "run"
    for command in (["run", str(config)], ["runs"]):
        assert main([*command, "--dir", str(below)]) == 1
        assert capsys.readouterr().err == (
            f"error: --dir {below}: is under {a_file}, a file, not a directory (name a directory for the "
            "run's files)\n"
        )


def test_runs_of_a_work_dir_that_does_not_exist_says_so(tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    assert main(["runs", "--work-dir", str(missing)]) == 1
    assert capsys.readouterr().err == f"error: --work-dir {missing}: does not exist\n"
    (tmp_path / "a-file").write_text("x")
    assert main(["runs", "--work-dir", str(tmp_path / "a-file")]) == 1
    assert capsys.readouterr().err == f"error: --work-dir {tmp_path / 'a-file'}: is not a directory\n"
    assert main(["runs", "--work-dir", str(tmp_path)]) == 0  # there, without runs yet
    assert capsys.readouterr().out == f"no runs under {tmp_path} (work_dir)\n"


def test_runs_with_a_config_and_a_work_dir_refuses_rather_than_ignore_one(tmp_path, capsys):
    """The config's work_dir was listed and --work-dir dropped without a word."""
    config = tmp_path / "run.yaml"
    config.write_text(f"work_dir: {tmp_path / 'a'}\n")
    assert main(["runs", str(config), "--work-dir", str(tmp_path / "b")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and f"--work-dir {tmp_path / 'b'}: give CONFIG or --work-dir, not both" in err


def test_output_into_a_closed_pipe_is_not_a_traceback():
    """`fulltune config --describe | head -1`: the reader stops early; fulltune exits quietly."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "fulltune.cli", "config", "--describe"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout.read(40)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_no_library_chatter_on_the_console(s3):
    """botocore's "Found credentials in environment variables." (INFO) does not reach the user."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "fulltune.cli", "registry", "list", "--uri", f"{s3}/models", "--name", "m"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 1 and "no committed version of 'm'" in done.stderr
    assert "Found credentials" not in done.stderr, done.stderr


def test_the_kfp_sdks_endpoint_variable_is_honoured_after_ours(monkeypatch):
    from fulltune.kfp.submit import resolve_host

    monkeypatch.delenv("KFP_HOST", raising=False)
    monkeypatch.setenv("KF_PIPELINES_ENDPOINT", "http://kfp.example:8888/")
    assert resolve_host(None) == "http://kfp.example:8888"
    monkeypatch.setenv("KFP_HOST", "http://ours:80")
    assert resolve_host(None) == "http://ours:80" and resolve_host("http://flag") == "http://flag"


COMMANDS = [
    ["compile"], ["demo"], ["run"], ["check"], ["config"], ["submit"], ["schedule"], ["unschedule"],
    ["doctor"], ["registry"], ["registry", "list"], ["registry", "show"], ["registry", "verify"],
    ["registry", "register"],
]  # fmt: skip


def test_every_command_says_what_it_does_and_its_exit_codes(capsys):
    import pytest

    for command in [[], *COMMANDS]:
        with pytest.raises(SystemExit) as done:
            main([*command, "--help"])
        assert done.value.code == 0
        text = capsys.readouterr().out
        description = text.split("\n\n")[1]  # after the usage block
        assert description.strip() and not description.startswith(("options:", "positional")), command
        assert "exit codes:" in text and "  3  submit --wait" in text, command
