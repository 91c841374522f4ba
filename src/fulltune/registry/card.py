"""The model card of a registered version, in Hugging Face model-card format.

YAML front matter (`base_model`, `library_name`, `tags`, `metrics` and a `model-index` holding the
eval numbers, the fields the Hub reads) followed by a Markdown body: what the model is, how it was
trained, base against tuned on every eval set, and the gate's verdict with its reasons.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

import fulltune
from fulltune.config import RunConfig
from fulltune.evaluate.result import EvalResult
from fulltune.report_kit import MISSING, markdown_table

TAGS = ["fulltune", "full-fine-tune"]


def render_model_card(
    cfg: RunConfig, *, version: int, eval_result: EvalResult, lineage: dict[str, Any], forced: bool
) -> str:
    """Markdown with YAML front matter for `cfg.model.name` v`version`."""
    lines = [
        "---",
        yaml.safe_dump(_front_matter(cfg, eval_result), sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {cfg.model.name} v{version}",
        "",
        f"A full-parameter fine-tune of `{cfg.model.base_model_uri or 'the base model'}` on domain data, "
        f"trained and registered by fulltune {fulltune.__version__}. Every weight was updated (no adapters); "
        "load it like the base model with `AutoModelForCausalLM.from_pretrained`.",
        "",
        *_training(cfg),
        "",
        *_evaluation(cfg, eval_result),
        "",
        *_verdict(eval_result, forced),
        *_provenance(lineage),
    ]
    return "\n".join(lines) + "\n"


def _front_matter(cfg: RunConfig, eval_result: EvalResult) -> dict[str, Any]:
    """The fields the Hub reads; `model-index` holds the tuned model's loss and perplexity per set."""
    front: dict[str, Any] = {}
    if cfg.model.base_model_uri:
        front["base_model"] = cfg.model.base_model_uri
    front["library_name"] = "transformers"
    front["pipeline_tag"] = "text-generation"
    front["tags"] = list(TAGS)
    front["metrics"] = ["loss", "perplexity"]
    results = [
        {
            "task": {"type": "text-generation"},
            "dataset": {"name": name, "type": f"fulltune/{name}"},
            "metrics": [
                {"type": "loss", "name": f"{name} loss", "value": _yaml_number(entry.tuned.loss)},
                {
                    "type": "perplexity",
                    "name": f"{name} perplexity",
                    "value": _yaml_number(entry.tuned.perplexity),
                },
            ],
        }
        for name, entry in eval_result.sets.items()
    ]
    if results:
        front["model-index"] = [{"name": cfg.model.name, "results": results}]
    return front


def _training(cfg: RunConfig) -> list[str]:
    t, p, r = cfg.training, cfg.preprocess, cfg.resources
    rows = [
        ("learning rate", _or_auto(t.learning_rate)),
        # max_steps wins over num_train_epochs (which plan fills in regardless): not what was trained
        (
            "epochs",
            _or_auto(t.num_train_epochs) if t.max_steps <= 0 else "not used: max steps set the length",
        ),
        ("max steps", t.max_steps if t.max_steps > 0 else MISSING),
        (
            "batch size per device × accumulation × devices",
            f"{t.per_device_train_batch_size} × {t.gradient_accumulation_steps} × {cfg.world_size}",
        ),
        ("schedule", f"{t.lr_scheduler_type}, warm-up {t.warmup_ratio:g}"),
        ("weight decay", f"{t.weight_decay:g}"),
        ("precision", cfg.precision),  # what training computed in: fp16 as set, fp32 on the CPU
        ("sequence length", f"{p.max_seq_len} ({'packed' if p.packing else 'padded'})"),
        ("general replay", _replay(cfg)),
        ("seed", t.seed),
        ("compute", f"{r.num_nodes} node(s) × {r.nproc_per_node} {r.accelerator} process(es)"),
    ]
    return ["## Training", "", markdown_table(["setting", "value"], rows)]


def _replay(cfg: RunConfig) -> str:
    """Replay's share of the training tokens: none without a general set to draw from, whatever
    preprocess.replay_fraction says."""
    from fulltune.plan import training_replay

    if not cfg.data.general_uri:
        return "none (no data.general_uri)"
    replay = training_replay(cfg)
    return f"{replay:.0%} of training tokens" if replay else "none"


def _evaluation(cfg: RunConfig, eval_result: EvalResult) -> list[str]:
    """Base against tuned on every loss set (an eval result always has the domain set). The base
    evaluate scored is the original pre-trained model; a version tuned from a registered one (a
    retraining cycle) says so, or its base columns would read as the figures of the version it
    was tuned from."""
    header = ["set", "base loss", "tuned loss", "base perplexity", "tuned perplexity"]
    rows = [
        (
            name,
            _num(section.base.loss),
            _num(section.tuned.loss),
            _num(section.base.perplexity),
            _num(section.tuned.perplexity),
        )
        for name, section in eval_result.sets.items()
    ]
    lines = ["## Evaluation", ""]
    if eval_result.base_model_uri != cfg.model.base_model_uri:
        lines += [
            f"Base is the original pre-trained model `{eval_result.base_model_uri}`, which the domain "
            f"gain and forgetting are measured against, not `{cfg.model.base_model_uri}` that this "
            "version was tuned from.",
            "",
        ]
    return [*lines, markdown_table(header, rows)]


def _verdict(eval_result: EvalResult, forced: bool) -> list[str]:
    lines = ["## Verdict", "", f"**{'Passed' if eval_result.verdict else 'Failed'}** the evaluation gate."]
    lines += [f"- {reason}" for reason in eval_result.reasons]
    if forced:
        lines += ["", "> **Registered by force** although the gate did not pass: review before use."]
    return lines


def _provenance(lineage: dict[str, Any]) -> list[str]:
    """The lineage's plain values (run id, dataset manifest, ...); the rest stays in lineage.json."""
    provenance = {
        k: v for k, v in lineage.items() if isinstance(v, (str, int, float, bool)) and k != "forced"
    }
    if not provenance:
        return []
    lines = ["", "## Lineage", ""] + [f"- {k}: `{v}`" for k, v in sorted(provenance.items())]
    return [*lines, "", "The full lineage (config, eval result) is in `lineage.json`."]


def _num(value: float) -> str:
    return f"{value:.4f}"


def _or_auto(value: float | None) -> str:
    return "chosen by plan" if value is None else f"{value:g}"


def _yaml_number(value: Any) -> Any:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else str(value)
