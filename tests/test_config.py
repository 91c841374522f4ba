"""RunConfig: defaults, precise errors, overrides, and every example config loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fulltune.config import ConfigError, RunConfig, deep_merge, describe

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_complete_and_described():
    cfg = RunConfig()
    assert cfg.training.lr_scheduler_type == "cosine"
    assert cfg.preprocess.max_seq_len == 1024
    text = describe()
    # every leaf field appears with its description
    for section in (
        "model",
        "data",
        "tokenizer",
        "preprocess",
        "training",
        "resources",
        "evaluation",
        "registry",
    ):
        assert f"{section}:" in text
    for line in text.splitlines():
        assert "# " in line and not line.rstrip().endswith("# None"), line


def test_bad_yaml_names_file_field_and_value(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("training:\n  learning_rate: fast\n  warmup_ratio: 2\n")
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_yaml(p)
    msg = str(exc.value)
    assert str(p) in msg
    assert "training.learning_rate" in msg and "'fast'" in msg
    assert "training.warmup_ratio" in msg


def test_unknown_field_is_refused_with_its_path(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("training:\n  learning_rat: 1e-5\n")
    with pytest.raises(ConfigError, match=r"training\.learning_rat: unknown field"):
        RunConfig.from_yaml(p)


def test_yaml_syntax_error_has_line(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("training:\n  learning_rate: [1\n")
    with pytest.raises(ConfigError, match=rf"{p}:\d+:\d+: not valid YAML"):
        RunConfig.from_yaml(p)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        RunConfig.from_yaml(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        RunConfig.from_yaml(p)


def test_a_parameters_file_submit_takes_is_read_as_the_config_it_stands_for(tmp_path, capsys):
    """`fulltune check` and `run` read the file `submit --params` is given: typed parameters and
    `config`; a parameter and config setting one field two ways are named, as submit names them."""
    from fulltune.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(
        "base_model_uri: /models/base\ntrain_uri: /data/train.jsonl\nmodel_name: my-clinical\n"
        "learning_rate: 1.0e-4\nmax_seq_len: 128\nconfig:\n  work_dir: /runs\n"
        "  training: {per_device_train_batch_size: 8}\n"
    )
    cfg = RunConfig.from_yaml(params)
    assert (cfg.model.base_model_uri, cfg.data.train_uri, cfg.model.name) == (
        "/models/base",
        "/data/train.jsonl",
        "my-clinical",
    )
    assert cfg.training.learning_rate == 1e-4 and cfg.preprocess.max_seq_len == 128
    assert cfg.training.per_device_train_batch_size == 8 and cfg.work_dir == "/runs"
    assert main(["config", "--check", str(params)]) == 0
    params.write_text(params.read_text() + "  preprocess: {max_seq_len: 256}\n")
    with pytest.raises(ConfigError, match="one field set two different ways") as refused:
        RunConfig.from_yaml(params)
    assert f"{params} max_seq_len=128" in str(refused.value)


def test_overrides_nested_and_dotted():
    cfg = RunConfig().with_overrides({"training.learning_rate": 3e-5, "preprocess": {"num_shards": 7}})
    assert cfg.training.learning_rate == 3e-5
    assert cfg.preprocess.num_shards == 7
    assert cfg.preprocess.max_seq_len == 1024  # untouched siblings survive


def test_to_dict_round_trips_without_nulls():
    cfg = RunConfig.from_dict({"model": {"base_model_uri": "/m"}, "data": {"train_uri": "/d.jsonl"}})
    d = cfg.to_dict()

    def has_none(x):
        if isinstance(x, dict):
            return any(has_none(v) for v in x.values())
        return x is None

    assert not has_none(d)  # KFP struct parameters cannot carry nulls
    assert RunConfig.from_dict(d) == cfg


def test_require_names_empty_fields():
    with pytest.raises(ConfigError, match="model.base_model_uri, data.train_uri"):
        RunConfig().require("model.base_model_uri", "data.train_uri")


@pytest.mark.parametrize(
    "path", sorted((ROOT / "pipelines" / "examples").glob("*.yaml")), ids=lambda p: p.name
)
def test_example_configs_load(path):
    cfg = RunConfig.from_yaml(path)
    assert cfg.model.base_model_uri and cfg.data.train_uri and cfg.registry.uri


def test_there_are_example_configs():
    assert len(list((ROOT / "pipelines" / "examples").glob("*.yaml"))) >= 2


def test_describe_lists_every_field_of_every_section_optional_and_repeated_ones_too():
    """The Model Registry settings (an optional section), the evaluation tasks and the pods'
    tolerations and volumes (lists of sections) are documented by `config --describe` like the rest:
    every field of every model reachable from RunConfig appears, each with its description."""
    from pydantic import BaseModel

    from fulltune.config import _section_of

    text = describe()
    seen: set[type] = set()

    def fields(model: type[BaseModel]):
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            yield model, name, field
            section, _ = _section_of(field.annotation)
            if section is not None:
                yield from fields(section)

    every = list(fields(RunConfig))
    assert len(seen) >= 15  # all the sections, the registry's Kubeflow one and the list items included
    for model, name, field in every:
        assert field.description, f"{model.__name__}.{name} has no description"
        assert f"{name}: " in text and field.description in text, f"{model.__name__}.{name} is not described"
    assert "kubeflow: None" in text and "server_address: <required>" in text


# -- property: any mapping either validates or names the field ---------------------------------------


def _field_names(model) -> dict[str, object]:
    """{field name: its nested section model, or None} of a pydantic section."""
    from pydantic import BaseModel

    out = {}
    for name, info in model.model_fields.items():
        annotation = info.annotation
        out[name] = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return out


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
)


@st.composite
def _mapping(draw, model=None, depth: int = 0) -> dict:
    """A mapping whose keys are mostly the section's real field names (a few misspelt), with values
    of any JSON type, nested sections recursing."""
    fields = _field_names(model) if model is not None else {}
    keys = (
        draw(
            st.lists(
                st.sampled_from(sorted(fields)) | st.text(min_size=1, max_size=8), max_size=5, unique=True
            )
        )
        if fields
        else []
    )
    out = {}
    for key in keys:
        section = fields.get(key)
        if section is not None and depth < 3 and draw(st.booleans()):
            out[key] = draw(_mapping(section, depth + 1))
        else:
            out[key] = draw(_SCALARS)
    return out


@settings(max_examples=300, deadline=None)
@given(_mapping(RunConfig))
def test_any_mapping_validates_or_names_the_field(data):
    """Never a traceback: a ConfigError with one line per invalid field, `<dotted path>: <what is
    wrong>`, the path printable (odd keys quoted) and the offending value shown."""
    try:
        RunConfig.from_dict(data)
    except ConfigError as exc:
        lines = str(exc).splitlines()
        assert lines[0].startswith("config: ") and len(lines) > 1
        for line in lines[1:]:
            path, sep, what = line.strip().partition(": ")
            assert sep and what and path and path.isprintable(), line


# What plan or validate_data would refuse on the cluster, after a run was created, that depends on
# nothing but the config: refused when the config is read.
CONTRADICTIONS = {
    "data": {"checks": {"pii_emial": {"action": "fail"}}},
    "training": {"bf16": True, "fp16": True, "early_stopping_patience": 2},
}


def example_with_contradictions(tmp_path: Path) -> Path:
    import yaml

    from fulltune.config import deep_merge

    data = yaml.safe_load((ROOT / "pipelines" / "examples" / "llama-8b-clinical.yaml").read_text())
    path = tmp_path / "ex-bad.yaml"
    path.write_text(yaml.safe_dump(deep_merge(data, CONTRADICTIONS)))
    return path


def test_config_check_refuses_contradictions_naming_each_field(tmp_path, capsys):
    from fulltune.cli import main

    path = example_with_contradictions(tmp_path)
    assert main(["config", "--check", str(path), "--for-cluster"]) == 1
    out, err = capsys.readouterr()
    assert "ok" not in out
    assert f"{path}: 3 invalid field(s)" in err
    assert "  data.checks.pii_emial: unknown code (did you mean pii_email? known: " in err
    assert "  training.fp16: training.bf16 and training.fp16 are both true: choose one" in err
    assert (
        "  training.early_stopping_patience: set but training.eval_steps is 0: early stopping needs "
        "periodic evaluation; set training.eval_steps (e.g. 50) or early_stopping_patience: 0 (got 2)"
    ) in err


@pytest.mark.parametrize("option", ["--for-cluster", "--resolved"])
def test_a_check_option_without_check_is_a_usage_error(option, capsys):
    """`fulltune config --for-cluster` alone printed every field and exited 0, which reads as a
    config that passed."""
    from fulltune.cli import main

    assert main(["config", option]) == 2
    out, err = capsys.readouterr()
    assert out == "" and f"{option} goes with --check FILE" in err


def test_a_fatal_check_code_is_refused_when_the_config_is_read():
    with pytest.raises(ConfigError, match=r"  data\.checks\.no_data: 'no_data' is fatal and has no policy"):
        RunConfig.from_dict({"data": {"checks": {"no_data": {"action": "warn"}}}})
    assert RunConfig.from_dict({"data": {"checks": {"pii_email": {"action": "fail"}}}})


def test_a_percentage_where_a_fraction_goes_is_refused_saying_it_is_a_fraction(tmp_path, capsys):
    """`min_domain_loss_improvement: 5` meant as 5% asks for a 500% drop: a gate no model passes."""
    from fulltune.cli import main

    path = tmp_path / "pct.yaml"
    path.write_text("evaluation:\n  min_domain_loss_improvement: 5\npreprocess:\n  replay_fraction: 10\n")
    assert main(["config", "--check", str(path)]) == 1
    err = capsys.readouterr().err
    assert (
        "  evaluation.min_domain_loss_improvement: Input should be less than 1: a fraction, 0.05 = 5% (got 5)"
        in err
    )
    # the other fields that are fractions say so too
    assert "  preprocess.replay_fraction: Input should be less than 1: a fraction, 0.05 = 5% (got 10)" in err
    ok = {"evaluation": {"min_domain_loss_improvement": 0.05, "max_general_ppl_increase": 1.5}}
    assert RunConfig.from_dict(ok).evaluation.max_general_ppl_increase == 1.5  # perplexity may double


def test_a_key_given_twice_is_refused_naming_the_key_and_both_lines(tmp_path, capsys):
    """PyYAML keeps the last of a repeated key silently: the run would use whichever came last."""
    from fulltune.cli import main

    p = tmp_path / "dup.yaml"
    p.write_text("work_dir: /tmp/x\ntraining:\n  max_steps: 5\n  seed: 1\n  max_steps: 50\n")
    assert main(["check", str(p)]) == 1
    assert capsys.readouterr().err == (
        f"error: {p}:5:3: not valid YAML: key 'max_steps' given twice, at lines 3 and 5 (only the last "
        "would count): remove one\n"
    )
    p.write_text("work_dir: /tmp/x\nwork_dir: /tmp/y\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml:2:1: .*key 'work_dir' given twice, at lines 1 and 2"):
        RunConfig.from_yaml(p)
    j = tmp_path / "dup.json"
    j.write_text('{"work_dir": "/tmp/x", "work_dir": "/tmp/y"}')
    with pytest.raises(ConfigError, match=r"dup\.json: not valid JSON: key 'work_dir' given twice"):
        RunConfig.from_yaml(j)
    # the same key in two sections, and a merge key's defaults overridden, are not repeats
    p.write_text(
        "model: {name: a}\nregistry: {uri: /r}\ndata: &d {train_uri: /t}\n_x: {<<: *d, train_uri: /u}\n"
    )
    from fulltune.config import read_config_file

    assert read_config_file(p)["_x"] == {"train_uri": "/u"}


def test_a_parameters_file_with_a_key_given_twice_is_refused_before_submit_sends_anything(tmp_path):
    from fulltune.kfp.run_parameters import build_request

    p = tmp_path / "params.yaml"
    p.write_text("learning_rate: 1.0e-5\nlearning_rate: 2.0e-5\n")
    with pytest.raises(ConfigError, match=r"params\.yaml:2:1: .*key 'learning_rate' given twice"):
        build_request({}, p, [])


def test_a_chunk_stride_leaving_no_room_is_refused_when_the_config_is_read():
    """Unpacked text is cut into max_seq_len windows max_seq_len - chunk_stride apart: a stride of
    max_seq_len or more was accepted, and failed only in preprocess_shard, after validate_data,
    check_tokenizer and plan had run."""
    unpacked = {"data": {"train_uri": "/d"}, "preprocess": {"packing": False, "max_seq_len": 512}}
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_dict(deep_merge(unpacked, {"preprocess": {"chunk_stride": 512}}))
    assert str(exc.value).splitlines()[1:] == [
        "  preprocess.chunk_stride: must be below preprocess.max_seq_len 512: each window of unpacked text "
        "starts max_seq_len - chunk_stride tokens after the one before it (got 512)"
    ]
    assert RunConfig.from_dict(deep_merge(unpacked, {"preprocess": {"chunk_stride": 511}}))
    # packed text has no windows: the stride is not used
    assert RunConfig.from_dict({"preprocess": {"packing": True, "chunk_stride": 4096}})


def test_an_infinite_number_is_refused_naming_the_field(tmp_path, capsys):
    """YAML's .inf is a float that passed every lower bound: plan then crashed converting the epochs
    to steps, and submit sent KFP `Infinity`, which is not JSON."""
    from fulltune.cli import main

    p = tmp_path / "inf.yaml"
    p.write_text("training:\n  num_train_epochs: .inf\nresources:\n  gpu_memory_gib: .inf\n")
    assert main(["config", "--check", str(p)]) == 1
    err = capsys.readouterr().err
    assert f"{p}: 2 invalid field(s)" in err
    assert "  training.num_train_epochs: Input should be a finite number (got inf)" in err
    assert "  resources.gpu_memory_gib: Input should be a finite number (got inf)" in err
    with pytest.raises(ConfigError, match=r"training\.learning_rate: Input should be a finite number"):
        RunConfig.from_dict({"training": {"learning_rate": float("nan")}})


def test_an_unquoted_date_is_read_as_the_text_written(tmp_path, capsys):
    """YAML reads `as_of: 2026-11-27`, the field's own example, as a date object, which the field
    refused as "not a valid string" (and a date does not serialize to the pipeline's JSON)."""
    from fulltune.cli import main

    p = tmp_path / "backfill.yaml"
    p.write_text("data:\n  as_of: 2026-11-27\n")
    assert main(["config", "--check", str(p)]) == 0, capsys.readouterr().err
    assert RunConfig.from_yaml(p).data.as_of == "2026-11-27"
    p.write_text("data:\n  as_of: 2026-11-27T03:00:00Z\n")
    assert RunConfig.from_yaml(p).data.as_of == "2026-11-27T03:00:00Z"


def test_bf16s_description_says_what_turning_it_off_trains_in():
    """It said "Set it false to use fp16", but bf16: false alone trains in float32."""
    from fulltune.config import TrainingSection

    gpu = {"resources": {"accelerator": "gpu", "gpu_type": "H100"}}
    assert RunConfig.from_dict({**gpu, "training": {"bf16": False}}).precision == "fp32"
    assert RunConfig.from_dict({**gpu, "training": {"bf16": False, "fp16": True}}).precision == "fp16"
    said = TrainingSection.model_fields["bf16"].description
    assert "set it false and training.fp16 true" in said and "both false trains in float32" in said
    assert "bf16: True  # " + said in describe()
