"""Broken base-model directories: each is refused by check_tokenizer, before any GPU is asked for,
with the problem's code and the file it is about, reading headers only and writing nothing to the
run's work directory."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fulltune import storage
from fulltune.config import RunConfig
from fulltune.model_check import check_model_files
from fulltune.tokenizer.check import TokenizerCheckError, check_tokenizer
from tiny_models import tiny_llama_config

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def good_models(tmp_path_factory, demo_assets) -> dict[str, Path]:
    """A tiny Llama saved whole and in shards (with an index), with the demo tokenizer beside it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("models")
    tok = AutoTokenizer.from_pretrained(str(demo_assets.base_model_dir))
    model = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=max(len(tok), 64)))
    out = {}
    for name, shard in (("whole", "50MB"), ("sharded", "40KB")):
        model.save_pretrained(root / name, max_shard_size=shard)
        tok.save_pretrained(root / name)
        out[name] = root / name
    assert (out["sharded"] / "model.safetensors.index.json").exists()
    return out


def copy(good: Path, tmp: Path) -> Path:
    d = tmp / "model"
    shutil.copytree(good, d)
    return d


def rewrite_config(d: Path, **fields) -> None:
    """config.json with `fields` changed."""
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **fields}))


def shards(d: Path) -> list[Path]:
    return sorted(d.glob("model-*.safetensors"))


def rewrite_header(path: Path, edit: Callable[[dict], None]) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def save_state(d: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(state, str(d / WEIGHTS), metadata={"format": "pt"})


def state_of(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / WEIGHTS))


# Each case breaks a copy of a good model and returns (code, where the problem is reported).
CASES: dict[str, Callable[[dict[str, Path], Path], tuple[str, str]]] = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


@case
def empty_directory(good, tmp):
    d = tmp / "model"
    d.mkdir()
    return "no_config", str(d)


@case
def no_config(good, tmp):
    d = copy(good["whole"], tmp)
    (d / "config.json").unlink()
    return "no_config", str(d / "config.json")


@case
def config_not_json(good, tmp):
    d = copy(good["whole"], tmp)
    (d / "config.json").write_text('{"model_type": "llama",')
    return "no_config", str(d / "config.json")


@case
def config_a_list(good, tmp):
    d = copy(good["whole"], tmp)
    (d / "config.json").write_text("[]")
    return "no_config", str(d / "config.json")


@case
def unknown_model_type(good, tmp):
    d = copy(good["whole"], tmp)
    rewrite_config(d, model_type="llama-next-2031")
    return "unknown_architecture", str(d / "config.json")


@case
def custom_code_not_trusted(good, tmp):
    d = copy(good["whole"], tmp)
    rewrite_config(d, auto_map={"AutoModelForCausalLM": "modeling_mine.MyModel"})
    return "unknown_architecture", str(d / "config.json")


@case
def text_config_not_an_object(good, tmp):
    # a multimodal model keeps vocab_size in its text_config: the embedding check reads it there too
    d = copy(good["whole"], tmp)
    config = json.loads((d / "config.json").read_text())
    del config["vocab_size"]
    (d / "config.json").write_text(json.dumps({**config, "text_config": "llama"}))
    return "bad_config", str(d / "config.json")


@case
def a_number_written_as_text(good, tmp):
    d = copy(good["whole"], tmp)
    rewrite_config(d, hidden_size="64")
    return "bad_config", str(d / "config.json")


@case
def zero_attention_heads(good, tmp):
    d = copy(good["whole"], tmp)
    rewrite_config(d, num_attention_heads=0)
    return "bad_config", str(d / "config.json")


@case
def rope_parameters_without_their_keys(good, tmp):
    d = copy(good["whole"], tmp)
    rewrite_config(d, rope_parameters={"rope_type": "linear"})  # linear needs a factor
    return "bad_config", str(d / "config.json")


@case
def pickle_only(good, tmp):
    d = copy(good["whole"], tmp)
    torch.save(state_of(d), d / "pytorch_model.bin")
    (d / WEIGHTS).unlink()
    return "pickle_weights", str(d / "pytorch_model.bin")


@case
def no_weights(good, tmp):
    d = copy(good["whole"], tmp)
    (d / WEIGHTS).unlink()
    return "no_weights", str(d)


@case
def index_not_json(good, tmp):
    d = copy(good["sharded"], tmp)
    (d / "model.safetensors.index.json").write_text("{not json")
    return "bad_index", str(d / "model.safetensors.index.json")


@case
def index_names_a_missing_shard(good, tmp):
    d = copy(good["sharded"], tmp)
    gone = shards(d)[-1]
    gone.unlink()
    return "missing_shard", str(gone)


@case
def index_points_to_the_wrong_shard(good, tmp):
    d = copy(good["sharded"], tmp)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first, other = shards(d)[0].name, shards(d)[1].name
    tensor = next(t for t, f in index["weight_map"].items() if f == first)
    index["weight_map"][tensor] = other
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return "bad_index", f"{d / 'model.safetensors.index.json'} ({tensor})"


@case
def shard_truncated(good, tmp):
    d = copy(good["sharded"], tmp)
    shard = shards(d)[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    return "truncated_shard", str(shard)


@case
def shard_with_bytes_appended(good, tmp):
    d = copy(good["whole"], tmp)
    with open(d / WEIGHTS, "ab") as f:
        f.write(b"\0" * 64)
    return "truncated_shard", str(d / WEIGHTS)


@case
def shard_cut_inside_the_header(good, tmp):
    d = copy(good["whole"], tmp)
    (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:40])
    return "truncated_shard", str(d / WEIGHTS)


@case
def header_length_absurd(good, tmp):
    d = copy(good["whole"], tmp)
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(struct.pack("<Q", 2**40) + data[8:])
    return "bad_header", str(d / WEIGHTS)


@case
def header_not_json(good, tmp):
    d = copy(good["whole"], tmp)
    data = bytearray((d / WEIGHTS).read_bytes())
    data[8:12] = b"XXXX"
    (d / WEIGHTS).write_bytes(bytes(data))
    return "bad_header", str(d / WEIGHTS)


@case
def offsets_overlap(good, tmp):
    d = copy(good["whole"], tmp)

    def shift(header):
        name = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[1]
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin - 4, end - 4]

    rewrite_header(d / WEIGHTS, shift)
    return "truncated_shard", str(d / WEIGHTS)


@case
def a_layer_missing(good, tmp):
    d = copy(good["whole"], tmp)
    state = state_of(d)
    name = "model.layers.0.mlp.down_proj.weight"
    del state[name]
    save_state(d, state)
    return "missing_tensor", f"{d} ({name})"


@case
def weights_of_another_size(good, tmp):
    d = copy(good["whole"], tmp)
    width = json.loads((d / "config.json").read_text())["intermediate_size"]
    rewrite_config(d, intermediate_size=2 * width)
    return "shape_mismatch", f"{d / WEIGHTS} (model.layers.0.mlp.gate_proj.weight)"


@case
def integer_weights(good, tmp):
    d = copy(good["whole"], tmp)
    state = state_of(d)
    name = "model.norm.weight"
    state[name] = state[name].to(torch.int32)
    save_state(d, state)
    return "dtype_mismatch", f"{d / WEIGHTS} ({name})"


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 15


@pytest.mark.parametrize("name", sorted(CASES))
def test_broken_model_is_refused_naming_the_file(tmp_path, demo_assets, good_models, name):
    code, location = CASES[name](good_models, tmp_path)
    model = str(tmp_path / "model")
    problems = check_model_files(model)
    assert (problems[0].code, problems[0].location) == (code, location), problems
    work = tmp_path / "work"
    cfg = RunConfig.from_dict(
        {
            "work_dir": str(work),
            "model": {"base_model_uri": model, "tokenizer_uri": str(demo_assets.base_model_dir)},
            "data": {"train_uri": demo_assets.train_uri},
        }
    )
    with pytest.raises(TokenizerCheckError) as refused:
        check_tokenizer(cfg, tmp_path / "out")
    assert f"{location}: {code}:" in str(refused.value)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model_files"][0] == {"code": code, "location": location, "message": problems[0].message}
    if code == "bad_config":  # the value transformers refused, not advice about its release
        assert "no model can be built from its values" in problems[0].message, problems
    assert not work.exists() or not any(work.iterdir())


@pytest.mark.parametrize("name", ["whole", "sharded"])
def test_good_models_pass(good_models, name):
    assert check_model_files(str(good_models[name])) == []


def test_a_tied_output_head_need_not_be_stored(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_llama_config(tie_word_embeddings=True))
    model.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in state_of(tmp_path / "tied")
    assert check_model_files(str(tmp_path / "tied")) == []


def test_on_s3_headers_are_read_and_a_truncated_shard_is_refused(good_models, s3):
    prefix = f"{s3}/models/tiny"
    storage.upload_dir(good_models["sharded"], prefix)
    assert check_model_files(prefix) == []
    shard = shards(good_models["sharded"])[0]
    storage.write_bytes(f"{prefix}/{shard.name}", shard.read_bytes()[:-10])
    problems = check_model_files(prefix)
    assert [(p.code, p.location) for p in problems] == [("truncated_shard", f"{prefix}/{shard.name}")]


def test_a_missing_bucket_is_named_in_the_report_not_a_traceback(s3, tmp_path, demo_assets):
    model = "s3://no-such-model-bucket/m"
    cfg = RunConfig.from_dict(
        {"model": {"base_model_uri": model}, "data": {"train_uri": demo_assets.train_uri}}
    )
    with pytest.raises(TokenizerCheckError) as refused:
        check_tokenizer(cfg, tmp_path / "out")
    assert f"{model}: storage: the bucket 'no-such-model-bucket' does not exist" in str(refused.value)


OWN_CODE = {"AutoConfig": "configuration_mine.MyConfig", "AutoModelForCausalLM": "modeling_mine.MyModel"}
CONFIGURATION_PY = (
    "from transformers import LlamaConfig\n\n\nclass MyConfig(LlamaConfig):\n    model_type = 'mine'\n"
)
MODELING_PY = (
    "from transformers import LlamaForCausalLM\n\nfrom .configuration_mine import MyConfig\n\n\n"
    "class MyModel(LlamaForCausalLM):\n    config_class = MyConfig\n"
)


@pytest.mark.parametrize(
    ("files", "said"),
    [
        ({}, "OSError: "),  # neither file copied beside config.json
        (
            {"configuration_mine.py": "import not_a_real_package\n" + CONFIGURATION_PY},
            "ImportError: This modeling file requires the following packages that were not found in "
            "your environment: not_a_real_package",
        ),
        ({"configuration_mine.py": CONFIGURATION_PY}, "a file named modeling_mine.py"),
    ],
    ids=["no_code_files", "a_package_not_installed", "no_modeling_file"],
)
def test_a_trusted_models_own_code_that_does_not_load_is_named_not_blamed_on_transformers(
    tmp_path, good_models, files, said
):
    """With model.trust_remote_code set, a missing .py file was reported as a model_type unknown to
    transformers (advising to set trust_remote_code), and an import the code needs was a traceback."""
    d = tmp_path / tmp_path.name  # transformers imports the code as a module named after the directory
    shutil.copytree(good_models["whole"], d)
    rewrite_config(d, auto_map=OWN_CODE)
    for name, text in files.items():
        (d / name).write_text(text)
    problems = check_model_files(str(d), trust_remote_code=True)
    assert [(p.code, p.location) for p in problems] == [("unknown_architecture", str(d / "config.json"))]
    message = problems[0].message
    assert message.startswith(
        "the model's own code (auto_map: ['AutoConfig', 'AutoModelForCausalLM']) does not load ("
    )
    assert said in message and message.endswith(
        "copy its .py files beside config.json, and run an image with the packages they import"
    )
    (d / "configuration_mine.py").write_text(CONFIGURATION_PY)
    (d / "modeling_mine.py").write_text(MODELING_PY)
    assert check_model_files(str(d), trust_remote_code=True) == []
