"""The base model's files, checked before any GPU is asked for, without loading a weight.

`check_model_files(uri)` reads the directory's (or S3 prefix's) listing, `config.json`, the
safetensors index and each safetensors file's header (on S3: one ranged GET for the header's length
and one for the header, so a 70B model costs a few requests per shard, not its 140 GB), and compares
them with the tensors the config implies (the model built on the meta device: names, shapes;
nothing allocated). Each problem has a code, the file (and tensor) it is about, and what to do:

    no_config              config.json missing or not a JSON object
    unknown_architecture   model_type not known to the installed transformers, or custom code that
                           model.trust_remote_code does not allow, or that does not load (its .py
                           files missing, a package it imports not installed)
    bad_config             config.json with a value no model can be built from: text for a number,
                           a text_config that is not an object, zero attention heads
    no_weights             no weight files at all
    pickle_weights         weights only as pickle (.bin, .pt, .pth, .ckpt): never loaded, since
                           unpickling runs code; convert them to safetensors
    bad_index              model.safetensors.index.json unreadable, without a weight_map, or naming a
                           tensor in a shard whose header lacks it
    missing_shard          a file the index names does not exist
    bad_header             a safetensors header that does not parse
    truncated_shard        a file shorter (or longer) than its header says, or tensors whose byte
                           ranges do not fit their shapes
    missing_tensor         a tensor the config implies is in no file (from_pretrained would start it
                           from random values)
    shape_mismatch         a tensor whose shape is not the one the config implies
    dtype_mismatch         a tensor that is not floating point where the model has a float weight
    storage                the bucket does not exist or the credentials are refused (an unreachable
                           endpoint is not a verdict on the model: it raises, and the step fails
                           naming the endpoint)

The tokenizer files and the vocabulary against the embedding rows are check_tokenizer's own checks.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from fulltune import storage

INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on a header
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


@dataclass(frozen=True)
class ModelProblem:
    code: str
    location: str  # the file, with the tensor where one is meant
    message: str  # what is wrong, and what to do

    def __str__(self) -> str:
        return f"{self.location}: {self.code}: {self.message}"


class _Refused(Exception):
    def __init__(self, problem: ModelProblem):
        self.problem = problem


def check_model_files(uri: str, trust_remote_code: bool = False) -> list[ModelProblem]:
    """Every problem found in the model at `uri` (local directory or s3:// prefix); [] when it loads."""
    try:
        files = _top_level_files(uri)
        config = _read_config(uri, files)
        model_config = _model_config(uri, config, trust_remote_code)
        headers, problems = _weight_headers(uri, files)
        if problems:
            return problems
        expected = _expected_tensors(uri, model_config, trust_remote_code)
    except _Refused as refused:
        return [refused.problem]
    except storage.StorageConfigError as exc:  # a missing bucket, refused credentials: permanent
        return [ModelProblem("storage", uri, str(exc).removeprefix(f"{uri}: "))]
    return _compare(uri, headers, expected)


def _top_level_files(uri: str) -> dict[str, str]:
    """name -> URI of the files directly in the model directory."""
    prefix = uri.rstrip("/") + "/"
    try:
        listed = storage.list_files(uri)
    except FileNotFoundError:
        listed = []
    files = {f[len(prefix) :]: f for f in listed if f.startswith(prefix) and "/" not in f[len(prefix) :]}
    if not files:
        raise _Refused(
            ModelProblem("no_config", uri, "no files here: set model.base_model_uri to the model directory")
        )
    return files


def _read_config(uri: str, files: dict[str, str]) -> dict[str, Any]:
    where = storage.join(uri, "config.json")
    if "config.json" not in files:
        raise _Refused(ModelProblem("no_config", where, "missing: a Hugging Face model directory has one"))
    try:
        config = json.loads(storage.read_bytes(files["config.json"]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Refused(ModelProblem("no_config", where, f"not valid JSON ({exc})")) from None
    if not isinstance(config, dict):
        raise _Refused(ModelProblem("no_config", where, "not a JSON object"))
    return config


def _model_config(uri: str, config: dict[str, Any], trust_remote_code: bool) -> Any:
    """The transformers config object, or the refusal that says why there is none."""
    from fulltune.hf import load_config

    where = storage.join(uri, "config.json")
    custom = bool(config.get("auto_map"))
    if custom and not trust_remote_code:
        raise _Refused(
            ModelProblem(
                "unknown_architecture",
                where,
                f"the model ships its own code (auto_map: {sorted(config['auto_map'])}); set "
                "model.trust_remote_code: true if you trust it, since that code runs in every step",
            )
        )
    try:
        return load_config(uri, trust_remote_code)
    except storage.StorageError:
        raise  # the bucket or the endpoint, not the model: check_model_files and its caller say so
    except Exception as exc:  # noqa: BLE001 — a model's own code may raise anything on import
        if not custom and not isinstance(exc, (ValueError, KeyError, OSError)):
            raise
        raise _Refused(_unloadable_config(where, config, exc)) from None


def _unloadable_config(where: str, config: dict[str, Any], exc: Exception) -> ModelProblem:
    """Why transformers made no config of config.json: the model's own code, its values, or a
    model_type it does not know."""
    from fulltune.hf import BadModelConfig

    if config.get("auto_map"):  # trusted (else refused before loading): its own code failed
        return _custom_code_problem(where, config["auto_map"], exc)
    if isinstance(exc, BadModelConfig):
        return _bad_config(where, str(exc).removeprefix(f"{where}: "))
    model_type = config.get("model_type")
    # a model type transformers has, refused by its own validation (rope_parameters without the
    # keys its rope_type needs): the values are wrong, not the transformers release
    if not isinstance(exc, OSError) and _known_model_type(model_type):
        return _bad_config(where, f"{type(exc).__name__}: {exc}")
    hint = (
        f"model_type {model_type!r} is not known to the installed transformers: use an image with a "
        "transformers release that has it, or set model.trust_remote_code for a model with its own code"
        if model_type
        else "it has no model_type"
    )
    return ModelProblem("unknown_architecture", where, f"{hint} ({type(exc).__name__}: {exc})")


def _custom_code_problem(where: str, auto_map: dict[str, Any], exc: Exception) -> ModelProblem:
    said = " ".join(str(exc).split())
    return ModelProblem(
        "unknown_architecture",
        where,
        f"the model's own code (auto_map: {sorted(auto_map)}) does not load ({type(exc).__name__}: "
        f"{said}): copy its .py files beside config.json, and run an image with the packages they import",
    )


def _known_model_type(model_type: Any) -> bool:
    from transformers import CONFIG_MAPPING

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


def _bad_config(where: str, why: str) -> ModelProblem:
    return ModelProblem(
        "bad_config",
        where,
        f"no model can be built from its values ({why}): correct the value, or download the model's "
        "config.json again",
    )


# -- weights ----------------------------------------------------------------------------------------


@dataclass
class _Tensor:
    file: str
    dtype: str
    shape: tuple[int, ...]


def _weight_headers(uri: str, files: dict[str, str]) -> tuple[dict[str, _Tensor], list[ModelProblem]]:
    """Every tensor of the safetensors files (those the index names, or every *.safetensors), with
    the problems of the files themselves."""
    safetensors = sorted(n for n in files if n.endswith(".safetensors"))
    if not safetensors and INDEX not in files:
        pickles = sorted(n for n in files if n.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise _Refused(
                ModelProblem(
                    "pickle_weights",
                    storage.join(uri, pickles[0]),
                    "weights only as pickle files, which are never loaded (unpickling runs code): convert "
                    "them to safetensors (transformers: from_pretrained then save_pretrained(..., "
                    "safe_serialization=True))",
                )
            )
        raise _Refused(ModelProblem("no_weights", uri, "no model.safetensors or sharded *.safetensors files"))
    problems: list[ModelProblem] = []
    weight_map: dict[str, str] | None = None
    if INDEX in files:
        weight_map, problem = _read_index(files[INDEX])
        if problem:
            return {}, [problem]
        named = sorted(set(weight_map.values()))
        problems += [
            ModelProblem(
                "missing_shard",
                storage.join(uri, n),
                f"named by {INDEX} but not there: the upload is incomplete",
            )
            for n in named
            if n not in files
        ]
        safetensors = [n for n in named if n in files]
    tensors: dict[str, _Tensor] = {}
    for name in safetensors:
        header, problem = _read_header(files[name])
        if problem:
            problems.append(problem)
            continue
        for tensor, (dtype, shape) in header.items():
            tensors[tensor] = _Tensor(files[name], dtype, shape)
    if weight_map is not None and not problems:
        problems += [
            ModelProblem(
                "bad_index",
                f"{files[INDEX]} ({tensor})",
                f"maps the tensor to {shard}, whose header lacks it",
            )
            for tensor, shard in weight_map.items()
            if tensor not in tensors or storage.basename(tensors[tensor].file) != shard
        ][:5]
    return tensors, problems


def _read_index(uri: str) -> tuple[dict[str, str], ModelProblem | None]:
    try:
        index = json.loads(storage.read_bytes(uri))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not a mapping of tensor names to file names")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return {}, ModelProblem(
            "bad_index", uri, f"unreadable ({type(exc).__name__}: {exc}): save the model again"
        )
    return weight_map, None


def _read_header(uri: str) -> tuple[dict[str, tuple[str, tuple[int, ...]]], ModelProblem | None]:
    """{tensor: (dtype, shape)} from a safetensors file's header, checking that the file holds
    exactly the bytes the header says: 8-byte length, JSON header, then the tensors back to back."""

    def bad(code: str, why: str) -> tuple[dict, ModelProblem]:
        return {}, ModelProblem(code, uri, f"{why}: download or save the file again")

    size = storage.size(uri)
    head = storage.read_range(uri, 0, 8)
    if len(head) < 8:
        return bad("truncated_shard", f"{size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        return bad(
            "bad_header" if n > MAX_HEADER_BYTES else "truncated_shard",
            f"a header of {n} bytes in a {size}-byte file",
        )
    try:
        header = json.loads(storage.read_range(uri, 8, n))
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        spans = sorted(
            (tuple(v["data_offsets"]), k, v["dtype"], tuple(v["shape"])) for k, v in entries.items()
        )
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        return bad("bad_header", f"the header does not parse ({type(exc).__name__}: {exc})")
    end = 0
    for (begin, stop), name, dtype, shape in spans:
        want = math.prod(shape) * DTYPE_BYTES.get(dtype, 0)
        if begin != end or stop - begin != want:
            return bad(
                "truncated_shard", f"tensor {name} spans bytes {begin}-{stop}, expected {end}-{end + want}"
            )
        end = stop
    if 8 + n + end != size:
        return bad("truncated_shard", f"{size} bytes, the header describes {8 + n + end}")
    return {name: (dtype, shape) for _, name, dtype, shape in spans}, None


# -- against the config -----------------------------------------------------------------------------


@dataclass
class _Expected:
    """The tensors the config implies, from the model built on the meta device."""

    # One entry per tensor: its names (a tied weight has several), shape, and whether it is floating point.
    tensors: dict[int, tuple[list[str], tuple[int, ...], bool]]
    prefix: str  # the base model's attribute, which checkpoints may or may not put before the names
    renames: bool  # the class renames checkpoint keys when loading: names are not checked


def _expected_tensors(uri: str, model_config: Any, trust_remote_code: bool) -> _Expected:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 — on the meta device nothing is read or allocated, so
        # whatever the model's code raises (AttributeError for a text_config that is a string,
        # ZeroDivisionError for zero heads; a model's own code: a missing modeling file) is the model's
        where = storage.join(uri, "config.json")
        if auto_map := getattr(model_config, "auto_map", None):
            raise _Refused(_custom_code_problem(where, auto_map, exc)) from None
        raise _Refused(_bad_config(where, f"{type(exc).__name__}: {' '.join(str(exc).split())}")) from None
    tensors: dict[int, tuple[list[str], tuple[int, ...], bool]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        entry = tensors.setdefault(id(tensor), ([], tuple(tensor.shape), tensor.is_floating_point()))
        entry[0].append(name)
    renames = bool(getattr(model, "_checkpoint_conversion_mapping", None))
    return _Expected(tensors, model.base_model_prefix, renames)


MAX_LISTED = 8  # problems of one code listed one by one; the rest are counted


def _compare(uri: str, tensors: dict[str, _Tensor], expected: _Expected) -> list[ModelProblem]:
    prefix = expected.prefix

    def find(name: str) -> _Tensor | None:
        for key in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
            if key in tensors:
                return tensors[key]
        return None

    problems: list[ModelProblem] = []
    for names, shape, is_float in expected.tensors.values():
        found = next((t for t in map(find, names) if t is not None), None)
        name = names[0]
        if found is None:
            if not expected.renames:  # a class that renames keys on load is not checked by name
                problems.append(
                    ModelProblem(
                        "missing_tensor",
                        f"{uri} ({name})",
                        f"the config implies this {list(shape)} tensor but no weight file has it: "
                        "from_pretrained would start it from random values; use the complete checkpoint",
                    )
                )
            continue
        where = f"{found.file} ({name})"
        if found.shape != shape:
            problems.append(
                ModelProblem(
                    "shape_mismatch",
                    where,
                    f"shape {list(found.shape)}, the config implies {list(shape)}: the weights belong to "
                    "another configuration of the model",
                )
            )
        elif is_float and found.dtype not in FLOAT_DTYPES:
            problems.append(
                ModelProblem(
                    "dtype_mismatch", where, f"dtype {found.dtype}, a floating-point weight is expected"
                )
            )
    return _capped(problems)


def _capped(problems: list[ModelProblem]) -> list[ModelProblem]:
    """At most MAX_LISTED problems of each code, the last of them saying how many more there are."""
    out: list[ModelProblem] = []
    for code in dict.fromkeys(p.code for p in problems):
        same = [p for p in problems if p.code == code]
        out += same[:MAX_LISTED]
        if len(same) > MAX_LISTED:
            last = out[-1]
            out[-1] = ModelProblem(code, last.location, f"{last.message} (and {len(same) - MAX_LISTED} more)")
    return out
