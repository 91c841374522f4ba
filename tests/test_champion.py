"""Champion and challenger: the candidate is also scored against the version production names, in the
same pass, and only a candidate not worse than it is promoted (a compare-and-swap on production)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from eval_samples import scored
from fulltune import storage
from fulltune.config import ConfigError, RunConfig
from fulltune.evaluate.champion import ChampionRef, resolve
from fulltune.evaluate.core import evaluate_models
from fulltune.model_identity import MODEL_MANIFEST
from fulltune.registry import pointers
from fulltune.registry.layout import RegistryError
from fulltune.registry.store import list_versions, register_model
from test_evaluate import _cfg, _manifest
from test_registry import EVAL_PASS, LINEAGE
from tiny_models import save_tiny_llama

NAME = "clinical"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """'same' is 'base' again, file for file; 'tuned' is 'base' plus seeded noise (as in test_evaluate)."""
    root = tmp_path_factory.mktemp("models")
    return {
        "base": save_tiny_llama(root / "base"),
        "tuned": save_tiny_llama(root / "tuned", seed=1, perturb=0.05),
        "same": save_tiny_llama(root / "same"),
    }


@pytest.fixture
def dataset(tmp_path) -> dict:
    return _manifest(tmp_path / "data")


def champion(version: int, uri) -> ChampionRef:
    return ChampionRef("registered", version, str(uri), "production since today")


@pytest.mark.parametrize("together", [True, False])
def test_the_champion_is_scored_over_the_same_batches_and_the_check_compares_the_candidate_with_it(
    models, dataset, tmp_path, together
):
    # the candidate is `tuned` (noisier than base): against a champion that is `base` it is worse
    result = evaluate_models(
        _cfg(compare_to="registered"),
        str(models["base"]),
        str(models["tuned"]),
        dataset,
        tmp_path / "out",
        models_together=together,
        champion=champion(3, models["same"]),
    )
    domain = result.sets["domain_eval"]
    figures = result.champion.sets["domain_eval"]
    assert figures.loss == pytest.approx(domain.base.loss, abs=1e-6)  # `same` is `base`, file for file
    assert set(result.champion.sets) == {"domain_eval", "general_eval"}
    [check] = [c for c in result.checks if c.name == "champion"]
    improvement = 1 - domain.tuned.loss / figures.loss
    assert result.confidence_intervals["champion_domain_loss_improvement"].estimate == pytest.approx(
        improvement
    )
    assert check.passed == (improvement >= 0) and "promoted v3" in check.reason
    m = result.kfp_metrics()
    assert m["domain_eval_champion_loss"] == figures.loss and m["champion_version"] == 3.0
    assert m["compared_to_champion"] == 1.0
    # one pass for all three when they fit together, else one per model over the same prepared batches
    roles = [p.roles for p in result.scoring.passes]
    assert roles == ([["base", "tuned", "champion"]] if together else [["base"], ["tuned"], ["champion"]])
    assert all(p.seconds >= 0 for p in result.scoring.passes)
    assert "champion" in (tmp_path / "out" / "report.html").read_text()


def test_a_tolerance_lets_a_slightly_worse_candidate_pass(models, dataset, tmp_path):
    args = (str(models["base"]), str(models["tuned"]), dataset)
    strict = evaluate_models(
        _cfg(compare_to="registered"), *args, tmp_path / "a", champion=champion(1, models["same"])
    )
    worse_by = -strict.confidence_intervals["champion_domain_loss_improvement"].estimate
    assert worse_by > 0
    cfg = _cfg(compare_to="registered", max_domain_loss_regression=worse_by * 1.5)
    loose = evaluate_models(cfg, *args, tmp_path / "b", champion=champion(1, models["same"]))
    assert [c.passed for c in loose.checks if c.name == "champion"] == [True]


def test_without_a_promoted_version_the_report_says_it_compared_with_the_base_only(tmp_path):
    cfg = RunConfig.from_dict(
        {
            "model": {"name": NAME},
            "registry": {"uri": str(tmp_path)},
            "evaluation": {"compare_to": "registered"},
        }
    )
    ref = resolve(cfg)
    assert ref.version is None and "no promoted version of clinical yet" in ref.note
    with pytest.raises(ConfigError, match="needs registry.uri"):
        resolve(cfg.with_overrides({"registry.uri": ""}))
    assert resolve(cfg.with_overrides({"evaluation.compare_to": "base"})) is None


def _registry_cfg(registry: str) -> RunConfig:
    return RunConfig.from_dict({"model": {"name": NAME}, "registry": {"uri": registry}})


def test_register_promotes_a_candidate_that_beat_the_champion_and_only_from_it(models, tmp_path):
    from fulltune.evaluate.result import Champion

    registry = str(tmp_path / "registry")
    cfg = _registry_cfg(registry)
    tuned = str(models["tuned"])
    beat = lambda v: scored(  # noqa: E731
        EVAL_PASS.model_copy(update={"champion": Champion(compare_to="registered", version=v)}), tuned
    )
    register_model(cfg, tuned, scored(EVAL_PASS, tuned), LINEAGE)  # v1: the first version serves
    register_model(cfg, tuned, beat(1), LINEAGE)  # v2 beat v1: promoted
    assert pointers.current(registry, NAME, pointers.PRODUCTION).version == 2
    assert pointers.current(registry, NAME, pointers.PRODUCTION).reason == "passed the gate against v1"
    # v3 was evaluated against v1, but v2 was promoted meanwhile: the compare-and-swap refuses it
    register_model(cfg, tuned, beat(1), LINEAGE)
    assert pointers.current(registry, NAME, pointers.PRODUCTION).version == 2
    assert pointers.current(registry, NAME, pointers.LATEST).version == 3
    # compared with the base only (compare_to base): committed, never promoted
    register_model(cfg, tuned, scored(EVAL_PASS, tuned), LINEAGE)
    assert pointers.current(registry, NAME, pointers.PRODUCTION).version == 2
    moves = [(r.action, r.previous, r.version) for r in pointers.history(registry, NAME, pointers.PRODUCTION)]
    assert moves == [("promote", None, 1), ("promote", 1, 2)]


def _reindexed_tokenizer():
    """The word tokenizer's words under other ids (the same specials, the same size): a model family
    with a vocabulary of its own, whose loss on this run's ids would stand for other text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tiny_models import WORDS

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(reversed(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def test_a_champion_with_another_tokenizer_is_refused_not_scored_on_this_runs_ids(models, dataset, tmp_path):
    """The version in production reads ids with another vocabulary: scored on this run's ids it
    looks far worse than it is and any candidate would beat it. plan refuses before training;
    evaluate (production may move after plan) fails the champion check without scoring it."""
    from fulltune import plan as planmod
    from test_plan import small_text_data

    registry = str(tmp_path / "registry")
    other = save_tiny_llama(tmp_path / "other-family", tokenizer=_reindexed_tokenizer())
    register_model(_registry_cfg(registry), str(other), scored(EVAL_PASS, str(other)), LINEAGE)  # v1 serves
    cfg = RunConfig.from_dict(
        {
            "work_dir": str(tmp_path / "work"),
            "model": {"name": NAME, "base_model_uri": str(models["base"])},
            "data": {"train_uri": str(small_text_data(tmp_path))},
            "registry": {"uri": registry},
            "evaluation": {"compare_to": "registered", "per_device_eval_batch_size": 3},
            "resources": {"accelerator": "cpu"},
        }
    )
    ref = resolve(cfg)
    assert ref.version == 1 and ref.refused.startswith(
        "v1 in production cannot be compared with this run's model: its tokenizer gives "
    )
    assert "other ids than this run's" in ref.refused and "evaluation.compare_to: base" in ref.refused
    with pytest.raises(
        planmod.PlanError, match="^evaluation.compare_to: registered: v1 in production cannot"
    ):
        planmod.make_plan(cfg, train_tokens=10_000)

    result = evaluate_models(
        cfg, str(models["base"]), str(models["tuned"]), dataset, tmp_path / "out", champion=ref
    )
    [check] = [c for c in result.checks if c.name == "champion"]
    assert not check.passed and not result.verdict and check.reason == ref.refused
    assert result.champion.sets == {}  # not scored: its figures would say nothing
    assert [p.roles for p in result.scoring.passes] == [["base", "tuned"]]

    same = save_tiny_llama(tmp_path / "same-family", seed=2, perturb=0.01)  # another model, same tokenizer
    register_model(_registry_cfg(registry), str(same), scored(EVAL_PASS, str(same)), LINEAGE)
    pointers.move(registry, NAME, pointers.PRODUCTION, 2, expected=1, action="promote", reason="test")
    assert resolve(cfg).refused == ""
    assert planmod.make_plan(cfg, train_tokens=10_000).config.evaluation.compare_to == "registered"


def _as_trained(model: Path, dest: Path) -> Path:
    """A copy of `model` as training leaves it: the files, then model_manifest.json listing them."""
    shutil.copytree(model, dest)
    (dest / MODEL_MANIFEST).write_text(json.dumps({"files": storage.file_manifest(dest), "summary": {}}))
    return dest


def test_register_publishes_only_the_model_evaluate_scored(models, dataset, tmp_path):
    trained = _as_trained(models["same"], tmp_path / "run-1" / "model")
    result = evaluate_models(_cfg(), str(models["base"]), str(trained), dataset, tmp_path / "eval")
    digest = hashlib.sha256((trained / MODEL_MANIFEST).read_bytes()).hexdigest()
    assert result.verdict and result.tuned_model_manifest_sha256 == digest
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["tuned_model_manifest_sha256"] == digest
    registry = str(tmp_path / "registry")
    cfg = _registry_cfg(registry)

    # run-1's eval.json given with another run's model, never evaluated: refused, nothing written
    other = _as_trained(models["tuned"], tmp_path / "run-2" / "model")
    with pytest.raises(RegistryError, match="is not the model the eval result describes") as err:
        register_model(cfg, str(other), result, LINEAGE)
    assert all(part in str(err.value) for part in (str(other), str(trained), digest))
    assert list_versions(registry, NAME) == []

    # the evaluated files at another location are the evaluated model
    copy = shutil.copytree(trained, tmp_path / "copy")
    assert register_model(cfg, str(copy), result, LINEAGE).endswith("v1")
    # a weight changed after training, its manifest kept: not the evaluated model either
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(RegistryError, match="model.safetensors missing or not as its model_manifest.json"):
        register_model(cfg, str(copy), result, LINEAGE)
    assert [v["version"] for v in list_versions(registry, NAME)] == [1]


def test_the_model_manifest_is_the_file_training_writes():
    from fulltune.train.recipe import MODEL_MANIFEST as WRITTEN

    assert MODEL_MANIFEST == WRITTEN


def _scored_sets(domain: tuple[float, float, float], general: tuple[float, float, float]):
    """Scored loss sets from per-token losses (base, candidate, champion), 40 sequences of 20 tokens."""
    import numpy as np
    import torch

    from fulltune.evaluate.core import Placement, Scored, ScoredTask
    from fulltune.evaluate.loss import LossResult, LossSet
    from fulltune.evaluate.tasks import Pair

    rng = np.random.default_rng(0)

    def result(loss: float) -> LossResult:
        tokens = np.full(40, 20, dtype=np.int64)
        noise = rng.normal(0, 0.01, 40)  # zero mean: the set's loss is `loss`, its interval not a point
        sums = (loss + noise - noise.mean()) * tokens
        return LossResult(float(sums.sum() / tokens.sum()), 800, 40, sums, tokens)

    tasks = [
        ScoredTask(LossSet(name, None), Pair(result(base), result(tuned)), result(champ))
        for name, (base, tuned, champ) in (("domain_eval", domain), ("general_eval", general))
    ]
    return Scored(Placement(torch.device("cpu"), torch.float32, None, True, "test"), tasks, {}, [])


def test_a_candidate_that_forgot_far_more_than_the_champion_is_not_promoted_for_a_small_domain_gain():
    """Slightly better than v4 on the domain set and within the forgetting budget against the base,
    but general perplexity 10% above v4's: the cycle would replace the serving model by a worse one."""
    from fulltune.evaluate.core import summarise
    from fulltune.evaluate.eval_page import render_report
    from fulltune.evaluate.tasks import Pair

    scores = _scored_sets(domain=(3.0, 2.49, 2.50), general=(2.0, 2.045, 1.95))
    cfg = _cfg(compare_to="registered")
    result = summarise(cfg, Pair("base", "tuned"), {}, scores, champion(4, "s3://registry/v4"))
    checks = {c.name: c for c in result.checks}
    assert checks["forgetting"].passed and checks["champion"].passed  # what the gate checked before
    general = checks["champion_general"]
    assert not general.passed and not result.verdict
    assert general.reason.startswith("general perplexity 10.0% above the promoted v4 (7.03 → 7.73, 95% CI")
    assert general.reason.endswith("> 5.0% allowed")
    assert result.kfp_metrics()["champion_forgetting"] == pytest.approx(0.1, abs=0.002)
    assert result.thresholds.max_general_ppl_regression == 0.05
    page = render_report(result)
    assert "general_eval perplexity" in page and "max general perplexity rise over the champion" in page

    # a looser tolerance, or a candidate that forgot no more than the champion, passes
    loose = summarise(
        _cfg(compare_to="registered", max_general_ppl_regression=0.12),
        Pair("base", "tuned"),
        {},
        scores,
        champion(4, "s3://registry/v4"),
    )
    assert loose.verdict
    fine = summarise(
        cfg,
        Pair("base", "tuned"),
        {},
        _scored_sets(domain=(3.0, 2.49, 2.50), general=(2.0, 2.0, 2.01)),
        champion(4, "s3://registry/v4"),
    )
    assert fine.verdict
    assert "general perplexity 1.0% below the promoted v4" in fine.reasons[-1]
