"""The pipeline's typed parameters: the form the Kubeflow UI shows, and how they meet `config`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fulltune import parameters
from fulltune.config import ConfigError, RunConfig
from fulltune.kfp.compile import PIPELINE_FILE
from fulltune.parameters import parse_assignment, resolve, split

ROOT = Path(__file__).resolve().parents[1]
KFP_TYPES = {str: "STRING", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE"}


def root_inputs(path: Path) -> dict:
    return next(yaml.safe_load_all(path.read_text()))["root"]["inputDefinitions"]["parameters"]


# -- the compiled form -------------------------------------------------------------------------------


def test_the_compiled_pipeline_takes_the_fields_set_on_every_run_as_typed_parameters():
    inputs = root_inputs(ROOT / PIPELINE_FILE)
    assert set(inputs) == {
        "base_model_uri",
        "train_uri",
        "eval_uri",
        "general_uri",
        "model_name",
        "registry_uri",
        "learning_rate",
        "num_train_epochs",
        "max_steps",
        "max_seq_len",
        "replay_fraction",
        "num_nodes",
        "nproc_per_node",
        "max_general_ppl_increase",
        "min_domain_loss_improvement",
        "config",
    }
    for name, spec in inputs.items():
        assert spec["description"].strip() and "\n" not in spec["description"], name
        assert spec["isOptional"] is True, name  # every one has a default: the UI can start a run as is
    assert inputs["config"]["parameterType"] == "STRUCT" and inputs["config"]["defaultValue"] == {}


@pytest.mark.parametrize("param", parameters.PARAMETERS, ids=lambda p: p.name)
def test_each_typed_parameter_has_the_type_default_and_description_of_its_config_field(param):
    spec = root_inputs(ROOT / PIPELINE_FILE)[param.name]
    assert spec["parameterType"] == KFP_TYPES[param.type]
    field = RunConfig().model_dump()
    for part in param.field.split("."):
        field = field[part]
    # fulltune's own default; where that is "unset" (None), the type's zero, and the text says what it means
    assert spec["defaultValue"] == (param.type() if field is None else field)
    assert f"(RunConfig {param.field})" in spec["description"]
    if field is None:
        assert "None" not in spec["description"] and (
            "0" in spec["description"] or "empty" in spec["description"]
        )


def test_the_configure_step_takes_exactly_the_typed_parameters_and_the_runs_times():
    inputs = root_inputs(ROOT / "components" / "configure" / "component.yaml")
    assert set(inputs) == set(parameters.NAMES) | {"config", "scheduled_time", "created_time"}
    tasks = next(yaml.safe_load_all((ROOT / PIPELINE_FILE).read_text()))["root"]["dag"]["tasks"]
    given = tasks["configure"]["inputs"]["parameters"]
    assert given["scheduled_time"]["runtimeValue"]["constant"] == "{{$.pipeline_job_schedule_time_utc}}"
    assert given["created_time"]["runtimeValue"]["constant"] == "{{$.pipeline_job_create_time_utc}}"
    for param in parameters.PARAMETERS:
        assert inputs[param.name]["parameterType"] == KFP_TYPES[param.type]


# -- precedence ------------------------------------------------------------------------------------


def test_a_typed_parameter_that_is_set_fills_a_field_the_config_leaves_out():
    merged = resolve({"model": {"name": "clinical"}}, {"learning_rate": 2e-5, "max_seq_len": 2048})
    cfg = RunConfig.from_dict(merged)
    assert cfg.training.learning_rate == 2e-5 and cfg.preprocess.max_seq_len == 2048
    assert cfg.model.name == "clinical"


def test_a_typed_parameter_at_its_default_leaves_the_field_to_the_config():
    config = {"preprocess": {"max_seq_len": 4096}, "training": {"learning_rate": 1e-5}}
    merged = resolve(config, {"max_seq_len": 1024, "learning_rate": 0.0, "model_name": "fulltune-model"})
    assert merged == config


def test_the_same_value_set_both_ways_is_not_a_conflict():
    config = {"training": {"learning_rate": 2e-5}, "preprocess": {"max_seq_len": 2048}}
    assert resolve(config, {"learning_rate": 2e-5, "max_seq_len": 2048.0}) == config


def test_a_number_yaml_reads_as_text_in_the_config_is_the_same_value_as_the_parameter(tmp_path):
    """PyYAML reads `learning_rate: 2e-5` in a config file as the string "2e-5"; the config takes it
    as 2e-5, so `--param learning_rate=2e-5` beside it sets the field once, not two different ways."""
    from fulltune.kfp.run_parameters import build_request

    p = tmp_path / "run.yaml"
    p.write_text("training:\n  learning_rate: 2e-5\n  num_train_epochs: 3\n")
    request = build_request({}, p, ["learning_rate=2e-5", "num_train_epochs=3"])
    assert request.config.training.learning_rate == 2e-5
    assert request.config.training.num_train_epochs == 3.0
    with pytest.raises(ConfigError, match=r"--param learning_rate=3e-05 and .*training\.learning_rate=2e-05"):
        build_request({}, p, ["learning_rate=3e-5"])


def test_a_field_set_two_different_ways_is_an_error_naming_both_and_every_such_field():
    config = {"training": {"learning_rate": 1e-5}, "data": {"train_uri": "s3://a/train.jsonl"}}
    with pytest.raises(ConfigError) as err:
        resolve(config, {"learning_rate": 2e-5, "train_uri": "s3://b/train.jsonl", "max_seq_len": 2048})
    text = str(err.value)
    assert (
        "pipeline parameter learning_rate=2e-05 and pipeline parameter 'config' training.learning_rate=1e-05"
        in text
    )
    assert "train_uri='s3://b/train.jsonl'" in text and "data.train_uri='s3://a/train.jsonl'" in text
    assert "max_seq_len" not in text  # no conflict there


def test_a_config_value_equal_to_the_default_sets_nothing_so_the_parameter_wins():
    """A config dumped with every default (RunConfig.to_yaml) does not block the form's fields."""
    dumped = RunConfig().to_dict()
    # replay_fraction 0.0 is not the default 0.1, so it is set: the form may ask for no replay at all
    merged = resolve(dumped, {"max_seq_len": 2048, "replay_fraction": 0.0})
    cfg = RunConfig.from_dict(merged)
    assert cfg.preprocess.max_seq_len == 2048 and cfg.preprocess.replay_fraction == 0.0


def test_a_pipeline_parameter_written_into_config_is_refused_naming_where_it_belongs():
    # the Kubeflow UI's `config` box filled with parameter names, as a parameters file has them
    with pytest.raises(ConfigError) as err:
        resolve({"work_dir": "/w", "learning_rate": 1e-5, "model_name": "x"}, {})
    text = str(err.value)
    assert "pipeline parameter 'config': holds pipeline parameters" in text
    assert "learning_rate: a pipeline parameter, not a RunConfig field" in text
    assert 'training.learning_rate in config ({"training": {"learning_rate": 1e-05}})' in text
    assert "model.name in config" in text
    assert "unknown field" not in text
    with pytest.raises(ConfigError, match="config: the run configuration's own name"):
        resolve({"config": {"work_dir": "/w"}}, {})


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"train_uri": "s3://data/notes.jsonl "}, "data.train_uri"),
        ({"base_model_uri": " s3://models/llama"}, "model.base_model_uri"),
        ({"eval_uri": " "}, "data.eval_uri"),
        ({"registry_uri": "s3://registry\n"}, "registry.uri"),
    ],
)
def test_a_location_pasted_with_whitespace_around_it_is_refused_at_configure(values, field):
    # else validate_data says "s3://data/notes.jsonl : does not exist", the space unseen
    with pytest.raises(ConfigError) as err:
        resolve({"work_dir": "/w"}, values)
    text = str(err.value)
    name = next(iter(values))
    assert f"{field}: " in text and "leading or trailing whitespace" in text
    assert f"[pipeline parameter {name}]" in text


def test_a_work_dir_with_whitespace_around_it_is_refused_too():
    with pytest.raises(ConfigError, match="work_dir: .*leading or trailing whitespace"):
        RunConfig.from_dict({"work_dir": "s3://bucket/runs "})


SECRET = "FAKE-s3cr3t-t0ken"  # noqa: S105 - a made-up credential no message may show


@pytest.mark.parametrize(
    ("config", "values", "field", "where"),
    [
        ({}, {"train_uri": f"s3://AKIAFAKE:{SECRET}@data/notes.jsonl"}, "data.train_uri", "S3 Secret"),
        (
            {"registry": {"kubeflow": {"server_address": f"https://ci-bot:{SECRET}@mr.example.com"}}},
            {},
            "registry.kubeflow.server_address",
            "MODEL_REGISTRY_TOKEN",
        ),
        (  # no scheme: the endpoint gets https:// in front, the credentials with it
            {"registry": {"kubeflow": {"server_address": f"ci-bot:{SECRET}@mr.example.com"}}},
            {},
            "registry.kubeflow.server_address",
            "MODEL_REGISTRY_TOKEN",
        ),
    ],
)
def test_credentials_in_a_config_address_are_refused_without_showing_them(config, values, field, where):
    """The config is a pipeline parameter, MLflow params and lineage.json: a user:secret@ in it
    would be shown in all of them, so it is refused where it is written, and the refusal does not
    quote it either."""
    with pytest.raises(ConfigError) as err:
        resolve({"work_dir": "/w", **config}, values)
    text = str(err.value)
    assert f"{field}: " in text and "holds credentials (user:secret@)" in text and where in text
    assert SECRET not in text


def test_a_credential_in_place_of_a_secret_name_is_refused_without_showing_it():
    """resources.kubernetes.secret_env names Secrets; a key pasted there instead would travel in
    the config (a pipeline parameter, MLflow, lineage.json) and reach Kubernetes only at the pods."""
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(
            {"resources": {"kubernetes": {"secret_env": ["fulltune-s3", f"AKIAFAKEFAKEFAKEFAKE:{SECRET}"]}}}
        )
    text = str(err.value)
    assert "resources.kubernetes.secret_env.1: is not a Kubernetes Secret name" in text
    assert SECRET not in text and "AKIAFAKE" not in text and "secret_env.0" not in text
    ok = RunConfig.from_dict({"resources": {"kubernetes": {"secret_env": ["fulltune-s3", "team.mlflow"]}}})
    assert ok.resources.kubernetes.secret_env == ["fulltune-s3", "team.mlflow"]


def test_an_address_with_an_at_sign_but_no_credentials_is_taken():
    cfg = RunConfig.from_dict(
        {
            "data": {"train_uri": "s3://data/team@example.com/notes.jsonl"},
            "registry": {"kubeflow": {"server_address": "https://mr.example.com/a@b"}},
        }
    )
    assert cfg.data.train_uri == "s3://data/team@example.com/notes.jsonl"


def test_a_dotted_field_name_in_config_says_to_nest_it_not_to_check_its_spelling():
    # fields are named dotted everywhere (messages, docs); the UI's config box takes them nested
    with pytest.raises(ConfigError) as err:
        resolve({"work_dir": "/w", "resources.kubernetes.image": "x", "trainig.learning_rate": 1}, {})
    text = str(err.value)
    assert (
        "'resources.kubernetes.image': a dotted name: a config nests its sections, "
        '{"resources": {"kubernetes": {"image": ...}}}'
    ) in text
    assert "'trainig.learning_rate': unknown field (check the spelling" in text  # no such field


def test_an_invalid_typed_value_names_the_parameter_and_its_field():
    with pytest.raises(ConfigError) as err:
        resolve({}, {"model_name": "has spaces", "num_nodes": -1})
    text = str(err.value)
    assert "model.name" in text and "[pipeline parameter model_name]" in text
    assert "resources.num_nodes" in text and "[pipeline parameter num_nodes]" in text


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learning_rate": "fast"}, "pipeline parameter learning_rate: expected float (got 'fast')"),
        ({"max_seq_len": 1024.5}, "pipeline parameter max_seq_len: expected int (got 1024.5)"),
        ({"train_uri": 3}, "pipeline parameter train_uri: expected str"),
        ({"num_nodes": True}, "pipeline parameter num_nodes: expected int"),
        ({"learning_rate": float("nan")}, "learning_rate: must be a finite number"),
        ({"lr": 1e-5}, "unknown pipeline parameter(s) lr; known: base_model_uri"),
    ],
)
def test_a_value_of_the_wrong_type_or_an_unknown_name_is_refused(values, message):
    with pytest.raises(ConfigError) as err:
        resolve({}, values)
    assert message in str(err.value)


def test_whole_numbers_kfp_sends_as_floats_and_numbers_yaml_reads_as_text_are_accepted():
    # KFP's JSON has one number type; PyYAML reads 2e-5 (no dot) as the string "2e-5"
    merged = resolve(
        {}, {"max_seq_len": 2048.0, "num_nodes": 2.0, "learning_rate": 1, "num_train_epochs": "2e0"}
    )
    assert merged["training"]["num_train_epochs"] == 2.0
    assert merged["preprocess"]["max_seq_len"] == 2048 and isinstance(
        merged["preprocess"]["max_seq_len"], int
    )
    assert merged["training"]["learning_rate"] == 1.0


# -- splitting a config into the form and the rest ------------------------------------------------------


@pytest.mark.parametrize(
    "example", sorted((ROOT / "pipelines" / "examples").glob("*.yaml")), ids=lambda p: p.name
)
def test_a_config_split_into_typed_parameters_and_config_resolves_back_to_itself(example):
    config = yaml.safe_load(example.read_text())
    values, rest = split(config)
    assert values and all(name in parameters.BY_NAME for name in values)
    for param in parameters.PARAMETERS:  # no typed field stays behind in config
        section, leaf = param.field.split(".")
        assert leaf not in rest.get(section, {}), param.field
    assert RunConfig.from_dict(resolve(rest, values)) == RunConfig.from_dict(config)


def test_split_turns_an_explicit_none_into_the_form_default_and_drops_emptied_sections():
    values, rest = split(
        {"training": {"learning_rate": None}, "data": {"train_uri": "t", "max_error_rate": 0.01}}
    )
    assert values == {"learning_rate": 0.0, "train_uri": "t"}
    assert rest == {"data": {"max_error_rate": 0.01}}  # training held only the typed field


# -- --param NAME=VALUE ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("learning_rate=2e-5", ("learning_rate", 2e-5)),
        ("max_seq_len=4096", ("max_seq_len", 4096)),
        ("train_uri=s3://b/k=v/train.jsonl", ("train_uri", "s3://b/k=v/train.jsonl")),
        ("eval_uri=", ("eval_uri", "")),
    ],
)
def test_a_command_line_assignment_is_parsed_as_the_parameters_type(text, expected):
    assert parse_assignment(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learning_rate", "expected NAME=VALUE"),
        ("lr=1e-5", "--param lr: not a pipeline parameter; known: base_model_uri"),
        ("max_seq_len=4k", "--param max_seq_len: expected int (got '4k')"),
        ("learning_rate=inf", "learning_rate: must be a finite number"),
    ],
)
def test_a_bad_command_line_assignment_names_the_parameter(text, message):
    with pytest.raises(ConfigError) as err:
        parse_assignment(text)
    assert message in str(err.value)


def test_the_pipelines_readme_lists_every_typed_parameter_with_its_field():
    text = (ROOT / "pipelines" / "README.md").read_text()
    for param in parameters.PARAMETERS:
        assert f"| `{param.name}` | `{param.field}` |" in text, param.name


# -- a package carrying a cluster's settings ---------------------------------------------------------


@pytest.fixture(scope="module")
def compiled_pipeline(tmp_path_factory):
    """`fulltune compile` with the given settings; each set compiled once (a compile takes seconds)
    and shared by the tests that start from it or compare with it."""
    from fulltune.kfp.compile import compile_pipeline

    out = tmp_path_factory.mktemp("compiled")
    packages: dict[tuple, Path] = {}

    def compiled(**settings) -> Path:
        key = tuple(sorted(settings.items()))
        if key not in packages:
            packages[key] = compile_pipeline(out / f"{len(packages)}.yaml", **settings)
        return packages[key]

    return compiled


@pytest.mark.parametrize("secret", ["team-s3", ""])
def test_a_package_retargeted_to_a_clusters_images_and_secret_is_the_pipeline_compiled_for_them(
    tmp_path, secret
):
    """The chart's hook rewrites the shipped package instead of compiling: the result must be exactly
    what `fulltune compile --image --trainer-image --s3-secret` would have written."""
    from fulltune.kfp.compile import compile_pipeline
    from fulltune.kfp.run_parameters import ClusterPackage, write_cluster_package

    image, trainer = "mirror.example/ft@sha256:" + "a" * 64, "mirror.example/ft-trainer:1.2"
    written = write_cluster_package(
        ROOT / PIPELINE_FILE,
        ClusterPackage(image=image, trainer_image=trainer, s3_secret=secret),
        tmp_path / "x.yaml",
    )
    compiled = compile_pipeline(tmp_path / "c.yaml", image, trainer_image=trainer, s3_secret=secret)
    assert list(yaml.safe_load_all(written.read_text())) == list(yaml.safe_load_all(compiled.read_text()))


@pytest.mark.parametrize(
    ("compiled_with", "settings"),
    [
        ({}, {"mlflow_secret": "team-mlflow"}),  # the shipped package has none: added
        ({"mlflow_secret": "team-mlflow"}, {"mlflow_secret": ""}),  # dropped
        ({"mlflow_secret": "team-mlflow"}, {"mlflow_secret": "other-mlflow"}),  # renamed
        # one Secret for both: renaming the S3 one leaves the MLflow one as it was
        ({"mlflow_secret": "fulltune-s3"}, {"s3_secret": "team-s3"}),
        ({"mlflow_secret": "fulltune-s3"}, {"s3_secret": ""}),
        ({}, {"s3_secret": "", "mlflow_secret": "team-mlflow"}),
    ],
)
def test_a_package_retargeted_to_a_clusters_mlflow_secret_is_the_pipeline_compiled_with_it(
    tmp_path, compiled_pipeline, compiled_with, settings
):
    """`fulltune upload/submit --mlflow-secret` (the chart's mlflow.existingSecret) on an already
    compiled package: exactly what `fulltune compile --mlflow-secret` would have written."""
    from fulltune.kfp.run_parameters import ClusterPackage, write_cluster_package

    package = compiled_pipeline(**compiled_with) if compiled_with else ROOT / PIPELINE_FILE
    written = write_cluster_package(package, ClusterPackage(**settings), tmp_path / "x.yaml")
    compiled = compiled_pipeline(**{**compiled_with, **settings})
    assert list(yaml.safe_load_all(written.read_text())) == list(yaml.safe_load_all(compiled.read_text()))


def test_a_package_compiled_before_mlflow_cannot_take_an_mlflow_secret(tmp_path):
    from fulltune.kfp.run_parameters import ClusterPackage, write_cluster_package

    docs = list(yaml.safe_load_all((ROOT / PIPELINE_FILE).read_text()))
    del docs[0]["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]["mlflow_secret"]
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    with pytest.raises(ConfigError, match="train step takes no mlflow_secret.*--mlflow-secret"):
        write_cluster_package(old, ClusterPackage(mlflow_secret="team-mlflow"), tmp_path / "x.yaml")
    # without the option it is uploaded as before
    write_cluster_package(old, ClusterPackage(s3_secret="team-s3"), tmp_path / "y.yaml")


def test_upload_and_submit_take_the_mlflow_secret_for_the_package():
    from fulltune.cli import build_parser
    from fulltune.kfp.run_parameters import AS_COMPILED
    from fulltune.kfp.submit import cluster_package

    for command in ("upload", "submit", "schedule"):
        extra = ["--name", "n", "--cron", "0 3 * * 0"] if command == "schedule" else []
        args = build_parser().parse_args([command, "--mlflow-secret", "team-mlflow", *extra])
        assert cluster_package(args).mlflow_secret == "team-mlflow", command
        args = build_parser().parse_args([command, *extra])
        assert cluster_package(args) == AS_COMPILED and not cluster_package(args), command
