"""evaluate: loss/perplexity against a hand computation, the gate's logic and wording, the outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fulltune import storage
from fulltune.config import RunConfig
from fulltune.evaluate.core import EvaluateError, evaluate_models, load_model, pick_device, sequence_loss
from fulltune.evaluate.gate import decide
from fulltune.evaluate.report import render_report
from fulltune.preprocess.dataset import IGNORE_INDEX, MANIFEST_FORMAT, load_split

VOCAB = 64
SEQ_LEN = 16


# -- fixtures -----------------------------------------------------------------------------------


def _save_tiny_llama(path: Path, *, seed: int, perturb: float = 0.0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if perturb:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=gen) * perturb)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "base": _save_tiny_llama(root / "base", seed=0),
        "tuned": _save_tiny_llama(root / "tuned", seed=1, perturb=0.05),
        "same": _save_tiny_llama(root / "same", seed=0),
    }


def _write_split(path: Path, *, rows: int, seed: int) -> dict:
    """Rows with a masked prompt, a loss-carrying answer and right padding, like preprocess writes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    input_ids, labels, masks = [], [], []
    for _ in range(rows):
        length = int(rng.integers(SEQ_LEN // 2, SEQ_LEN + 1))
        prompt = int(rng.integers(1, length // 2))
        ids = rng.integers(3, VOCAB, size=SEQ_LEN).astype(np.int32)
        ids[length:] = 0
        lab = ids.copy()
        lab[:prompt] = IGNORE_INDEX
        lab[length:] = IGNORE_INDEX
        mask = np.zeros(SEQ_LEN, dtype=np.int8)
        mask[:length] = 1
        input_ids.append(ids.tolist())
        labels.append(lab.tolist())
        masks.append(mask.tolist())
    table = pa.table(
        {
            "input_ids": pa.array(input_ids, type=pa.list_(pa.int32())),
            "labels": pa.array(labels, type=pa.list_(pa.int32())),
            "attention_mask": pa.array(masks, type=pa.list_(pa.int8())),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    loss_tokens = sum(sum(1 for x in lab if x != IGNORE_INDEX) for lab in labels)
    entry = {
        "uri": str(path),
        "sequences": rows,
        "sha256": storage.sha256_file(path),
        "size": path.stat().st_size,
    }
    return {"entry": entry, "tokens": sum(sum(m) for m in masks), "loss_tokens": loss_tokens}


def _manifest(root: Path, *, general: bool = True) -> dict:
    splits = {}
    layout = {"domain_eval": [(7, 1), (6, 2)]}  # two files: rows, seed
    if general:
        layout["general_eval"] = [(9, 3)]
    for split, files in layout.items():
        written = [
            _write_split(root / split / f"part-{i}.parquet", rows=n, seed=s) for i, (n, s) in enumerate(files)
        ]
        splits[split] = {
            "sequences": sum(w["entry"]["sequences"] for w in written),
            "tokens": sum(w["tokens"] for w in written),
            "loss_tokens": sum(w["loss_tokens"] for w in written),
            "files": [w["entry"] for w in written],
        }
    return {"format": MANIFEST_FORMAT, "max_seq_len": SEQ_LEN, "pad_token_id": 0, "splits": splits}


@pytest.fixture
def dataset(tmp_path) -> dict:
    return _manifest(tmp_path / "data")


def _cfg(**evaluation) -> RunConfig:
    return RunConfig.from_dict({"evaluation": {"per_device_eval_batch_size": 3, **evaluation}})


def _hand_loss(model_dir: Path, data: dict) -> float:
    """Cross-entropy over shifted logits, ignoring -100, on the whole set at once (fp32)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), data["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    ).item()


# -- loss ---------------------------------------------------------------------------------------


def test_sequence_loss_matches_hand_computed_cross_entropy(models, dataset):
    data = load_split(dataset, "domain_eval")
    expected = _hand_loss(models["tuned"], data)
    device, dtype = pick_device()
    if device.type != "cpu":
        pytest.skip("the 1e-5 comparison is for fp32 on the CPU")
    with load_model(_cfg(), str(models["tuned"]), device, dtype) as model:
        for batch_size in (1, 3, 64):  # partial last batch, one batch
            result = sequence_loss(model, data, batch_size=batch_size)
            assert result.loss == pytest.approx(expected, abs=1e-5)
    assert result.tokens == dataset["splits"]["domain_eval"]["loss_tokens"]
    assert result.sequences == 13
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)


def test_sequence_loss_without_loss_tokens_is_an_error(models, dataset):
    data = load_split(dataset, "domain_eval")
    data["labels"][:] = IGNORE_INDEX
    device, dtype = pick_device()
    with load_model(_cfg(), str(models["base"]), device, dtype) as model:
        with pytest.raises(EvaluateError, match="no positions"):
            sequence_loss(model, data, batch_size=4)


# -- gate ---------------------------------------------------------------------------------------


def _decide(base_loss=3.91, tuned_loss=3.0732, base_ppl=12.10, tuned_ppl=12.30, min_gain=0.0, max_rise=0.05):
    return decide(
        base_domain_loss=base_loss,
        tuned_domain_loss=tuned_loss,
        base_general_ppl=base_ppl,
        tuned_general_ppl=tuned_ppl,
        min_domain_loss_improvement=min_gain,
        max_general_ppl_increase=max_rise,
    )


def test_gate_passes_with_a_reason_per_check():
    verdict = _decide()
    assert verdict.passed
    assert verdict.reasons == [
        "domain loss fell 21.4% (3.91 → 3.07) ≥ 0.0% required",
        "general perplexity rose 1.7% (12.10 → 12.30) ≤ 5.0% allowed",
    ]
    assert [c.passed for c in verdict.checks] == [True, True]


def test_gate_fails_on_forgetting():
    verdict = _decide(tuned_ppl=12.98)
    assert not verdict.passed
    assert verdict.checks[0].passed and not verdict.checks[1].passed
    assert verdict.reasons[1] == "general perplexity rose 7.3% (12.10 → 12.98) > 5.0% allowed"


def test_gate_fails_without_domain_gain():
    rose = _decide(tuned_loss=4.10)
    assert not rose.passed
    assert rose.reasons[0] == "domain loss rose 4.9% (3.91 → 4.10); a fall of ≥ 0.0% is required"
    too_little = _decide(tuned_loss=3.87, min_gain=0.02)
    assert not too_little.passed
    assert too_little.reasons[0] == "domain loss fell 1.0% (3.91 → 3.87) < 2.0% required"


def test_gate_without_general_set_checks_the_domain_only():
    verdict = _decide(base_ppl=None, tuned_ppl=None)
    assert verdict.passed
    assert verdict.reasons[1] == "no general eval set: forgetting was not measured"
    assert not _decide(tuned_loss=4.0, base_ppl=None, tuned_ppl=None).passed


def test_gate_wording_edge_cases():
    # a tolerated domain rise (negative threshold)
    assert _decide(tuned_loss=3.93, min_gain=-0.01).reasons[0] == (
        "domain loss rose 0.5% (3.91 → 3.93) ≤ 1.0% rise allowed"
    )
    assert not _decide(tuned_loss=4.0, min_gain=-0.01).passed
    # general perplexity fell: no forgetting
    assert (
        _decide(tuned_ppl=11.5).reasons[1]
        == "general perplexity fell 5.0% (12.10 → 11.50): no forgetting (5.0% rise allowed)"
    )
    # just over the limit prints enough digits to show it
    over = _decide(base_ppl=10.0, tuned_ppl=10.504)
    assert not over.passed
    assert over.reasons[1] == "general perplexity rose 5.04% (10.00 → 10.50) > 5.00% allowed"
    # a diverged model fails, it does not crash
    nan = _decide(tuned_loss=math.nan, tuned_ppl=math.inf)
    assert not nan.passed and [c.passed for c in nan.checks] == [False, False]
    assert "not a finite number" in nan.reasons[0]
    with pytest.raises(ValueError):
        _decide(base_ppl=None)


# -- evaluate_models ----------------------------------------------------------------------------


def test_evaluate_models_writes_eval_json_and_report(models, dataset, tmp_path):
    out = tmp_path / "out"
    result = evaluate_models(_cfg(), str(models["base"]), str(models["tuned"]), dataset, out)

    on_disk = json.loads((out / "eval.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert set(result["sets"]) == {"domain_eval", "general_eval"}
    domain = result["sets"]["domain_eval"]
    assert (
        domain["sequences"] == 13 and domain["loss_tokens"] == dataset["splits"]["domain_eval"]["loss_tokens"]
    )
    if pick_device()[0].type == "cpu":
        data = load_split(dataset, "domain_eval")
        assert domain["base"]["loss"] == pytest.approx(_hand_loss(models["base"], data), abs=1e-5)
        assert domain["tuned"]["loss"] == pytest.approx(_hand_loss(models["tuned"], data), abs=1e-5)

    m = result["metrics"]
    assert all(isinstance(v, float) for v in m.values())
    assert m["domain_eval_base_perplexity"] == pytest.approx(math.exp(m["domain_eval_base_loss"]))
    assert m["domain_loss_improvement"] == pytest.approx(
        1 - m["domain_eval_tuned_loss"] / m["domain_eval_base_loss"]
    )
    assert m["forgetting"] == pytest.approx(
        m["general_eval_tuned_perplexity"] / m["general_eval_base_perplexity"] - 1
    )
    assert isinstance(result["verdict"], bool) and len(result["reasons"]) == 2
    assert m["gate_passed"] == float(result["verdict"])
    assert result["base_model_uri"] == str(models["base"]) and result["tuned_model_uri"] == str(
        models["tuned"]
    )

    html = (out / "report.html").read_text()
    assert "domain_eval" in html and "general_eval" in html
    for reason in result["reasons"]:
        assert reason in html
    assert ("PASSED" if result["verdict"] else "FAILED") in html


def test_identical_models_pass_and_a_failed_gate_is_not_an_exception(models, dataset, tmp_path):
    same = evaluate_models(_cfg(), str(models["base"]), str(models["same"]), dataset, tmp_path / "a")
    assert same["verdict"] is True
    assert same["metrics"]["domain_loss_improvement"] == pytest.approx(0.0, abs=1e-6)
    assert same["metrics"]["forgetting"] == pytest.approx(0.0, abs=1e-6)

    strict = _cfg(min_domain_loss_improvement=0.5)
    failed = evaluate_models(strict, str(models["base"]), str(models["tuned"]), dataset, tmp_path / "b")
    assert failed["verdict"] is False
    assert failed["checks"][0]["passed"] is False and "50.0%" in failed["reasons"][0]
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["verdict"] is False


def test_without_general_set_and_with_a_sequence_cap(models, tmp_path):
    manifest = _manifest(tmp_path / "data", general=False)
    result = evaluate_models(
        _cfg(max_eval_sequences=5), str(models["base"]), str(models["same"]), manifest, tmp_path / "out"
    )
    assert set(result["sets"]) == {"domain_eval"}
    assert result["sets"]["domain_eval"]["sequences"] == 5
    assert "forgetting" not in result["metrics"]
    assert result["reasons"][1] == "no general eval set: forgetting was not measured"
    assert result["verdict"] is True


def test_models_and_dataset_on_s3(models, tmp_path, s3):
    manifest = _manifest(tmp_path / "data", general=False)
    for entry in manifest["splits"]["domain_eval"]["files"]:
        uri = f"{s3}/data/{Path(entry['uri']).name}"
        storage.upload_file(entry["uri"], uri)
        entry["uri"] = uri
    storage.write_json(f"{s3}/data/manifest.json", manifest)
    storage.upload_dir(models["base"], f"{s3}/models/base")
    storage.upload_dir(models["tuned"], f"{s3}/models/tuned")
    remote = evaluate_models(
        _cfg(), f"{s3}/models/base", f"{s3}/models/tuned", f"{s3}/data/manifest.json", tmp_path / "s3out"
    )
    local = evaluate_models(_cfg(), str(models["base"]), str(models["tuned"]), manifest, tmp_path / "out")
    assert remote["metrics"] == pytest.approx(local["metrics"])
    assert remote["dataset_manifest"] == f"{s3}/data/manifest.json"


def test_report_renders_from_eval_json_alone():
    html = render_report({"verdict": False, "reasons": ["domain loss rose <b>"], "sets": {}})
    assert "FAILED" in html and "&lt;b&gt;" in html
