"""Loss and perplexity of the base and the tuned model on the held-out sets, and the gate verdict.

`evaluate_models` is what the `evaluate` step calls. It scores both models on the preprocessed
`domain_eval` split and, when the dataset has one, the `general_eval` split: the token-mean
cross-entropy over every position whose label is not -100, and its exponential, the perplexity.
The models are scored one after the other, so only one is in memory at a time. Configured
multiple-choice tasks (`evaluation.mc_tasks`, see `mc.py`) are scored by log-likelihood with each
model's own tokenizer. Every number gets a paired bootstrap confidence interval over examples
(`stats.py`): sequences for the losses, questions for the accuracies. Then the gate
(`gate.decide`) turns the point estimates into a verdict with reasons that quote the intervals, and
`eval.json` and `report.html` are written. A failed gate is a result, not an exception.

Efficiency: scoring runs under `torch.inference_mode`, in bfloat16 on CUDA; batches are formed from
sequences sorted by length and trailing padding common to a batch is cut off, so a set of short
answers padded to `max_seq_len` does not pay for the padding.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import fulltune
from fulltune import storage
from fulltune.config import RunConfig
from fulltune.evaluate import mc as mc_tasks
from fulltune.evaluate.gate import MCComparison, decide, domain_loss_improvement, forgetting
from fulltune.evaluate.report import render_report
from fulltune.evaluate.stats import Interval, bootstrap, ratio_of_sums
from fulltune.preprocess.dataset import IGNORE_INDEX, load_manifest, load_split

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

EVAL_FORMAT = "fulltune.eval/v1"
EVAL_FILE = "eval.json"
REPORT_FILE = "report.html"
DOMAIN, GENERAL = "domain_eval", "general_eval"
# Cross-entropy is computed in float32 over at most this many positions at once, so the upcast
# copy of the logits stays small even for large vocabularies.
_CE_CHUNK = 4096
# Per-example regressions listed in eval.json and the report.
WORST = 10


class EvaluateError(RuntimeError):
    """Evaluation could not produce a meaningful number (e.g. a set without loss tokens)."""


@dataclass(frozen=True)
class LossResult:
    """Token-mean cross-entropy over `tokens` loss positions of `sequences` sequences."""

    loss: float
    tokens: int
    sequences: int
    # Per sequence, in data order: summed cross-entropy and number of loss positions.
    sequence_sums: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)
    sequence_tokens: np.ndarray = field(
        default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False, compare=False
    )

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)


def perplexity(loss: float) -> float:
    """exp(loss); infinity instead of an overflow."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def pick_device() -> tuple[torch.device, torch.dtype]:
    """bfloat16 on the first CUDA device when there is one, else float32 on the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


@contextmanager
def load_model(cfg: RunConfig, uri: str, device: torch.device, dtype: torch.dtype) -> Iterator[Any]:
    """A causal LM from a local directory or s3:// prefix (safetensors only), in eval mode on `device`.

    The model is released on exit, so the next one can take its memory.
    """
    with load_model_and_tokenizer(cfg, uri, device, dtype, tokenizer=False) as (model, _):
        yield model


@contextmanager
def load_model_and_tokenizer(
    cfg: RunConfig, uri: str, device: torch.device, dtype: torch.dtype, *, tokenizer: bool = True
) -> Iterator[tuple[Any, Any]]:
    """`load_model`, plus the tokenizer saved beside the model (None when `tokenizer` is False).

    A model directory without a tokenizer falls back to the run's tokenizer (`model.tokenizer_uri`,
    else the base model's).
    """
    import torch
    import transformers
    from packaging.version import Version
    from transformers import AutoModelForCausalLM

    # `torch_dtype` was renamed `dtype` in transformers 4.56.
    dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    with storage.local_dir(uri) as path:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            use_safetensors=True,
            trust_remote_code=cfg.model.trust_remote_code,
            **{dtype_key: dtype},
        )
        tok = None
        if tokenizer:
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
            except (OSError, ValueError) as exc:
                if not cfg.tokenizer_uri or cfg.tokenizer_uri == uri:
                    raise EvaluateError(f"{uri}: no tokenizer beside the model ({exc})") from None
                from fulltune.hf import load_tokenizer

                log.info("%s has no tokenizer; using the run's tokenizer %s", uri, cfg.tokenizer_uri)
                tok = load_tokenizer(cfg.tokenizer_uri, cfg.model.trust_remote_code)
    model.to(device)
    model.eval()
    try:
        yield model, tok
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def sequence_loss(
    model: Any, data: dict[str, torch.Tensor], *, batch_size: int, sort_by_length: bool = True
) -> LossResult:
    """Token-mean cross-entropy of `model` over every position whose label is not -100.

    `data` holds `input_ids`, `labels` and `attention_mask` as [N, L] tensors with labels aligned to
    the inputs (Hugging Face convention): the logits at position t are scored against label t + 1.
    Sequences are batched longest first (`sort_by_length`) and each batch is cut after its last
    attended or labelled column; with a causal model that changes no logit that is scored. The
    per-sequence sums come back in data order.
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    input_ids, labels, attention = data["input_ids"], data["labels"], data["attention_mask"]
    sequences, width = (int(x) for x in input_ids.shape)
    used = (attention != 0) | (labels != IGNORE_INDEX)
    lengths = torch.where(used.any(dim=1), width - used.flip(1).int().argmax(dim=1), 0)
    if sort_by_length:
        order = torch.argsort(-lengths, stable=True)
    else:
        order = torch.arange(sequences)
    sums = np.zeros(sequences, dtype=np.float64)
    counts = np.zeros(sequences, dtype=np.int64)
    with torch.inference_mode():
        for start in range(0, sequences, batch_size):
            idx = order[start : start + batch_size]
            cut = int(lengths[idx].max())
            batch_labels = labels[idx, :cut].to(device)
            shift_labels = batch_labels[:, 1:]
            mask = shift_labels != IGNORE_INDEX
            count = int(mask.sum())
            if count == 0:
                continue
            logits = model(
                input_ids=input_ids[idx, :cut].to(device), attention_mask=attention[idx, :cut].to(device)
            ).logits
            selected = logits[:, :-1][mask]
            targets = shift_labels[mask]
            rows = mask.nonzero()[:, 0]
            del logits
            per_row = torch.zeros(len(idx), dtype=torch.float64, device=device)
            for i in range(0, count, _CE_CHUNK):
                chunk = selected[i : i + _CE_CHUNK].float()
                ce = F.cross_entropy(chunk, targets[i : i + _CE_CHUNK], reduction="none")
                per_row.index_add_(0, rows[i : i + _CE_CHUNK], ce.double())
            sums[idx.numpy()] = per_row.cpu().numpy()
            counts[idx.numpy()] = mask.sum(dim=1).cpu().numpy()
    tokens = int(counts.sum())
    if tokens == 0:
        raise EvaluateError("no positions with a label other than -100: the set carries no loss tokens")
    return LossResult(
        loss=float(sums.sum()) / tokens,
        tokens=tokens,
        sequences=sequences,
        sequence_sums=sums,
        sequence_tokens=counts,
    )


def evaluate_models(
    cfg: RunConfig,
    base_model_uri: str,
    tuned_model_uri: str,
    dataset_manifest: str | dict[str, Any],
    out_dir: Path,
) -> dict[str, Any]:
    """Score the base and the tuned model, apply the gate, write `eval.json` and `report.html`.

    Args:
        cfg: The resolved run config; `evaluation` sets batch size, the cap on sequences per set and
            the gate thresholds; `model.trust_remote_code` is honoured when loading.
        base_model_uri: The model before tuning: a local directory or s3:// prefix (HF format).
        tuned_model_uri: The tuned model, same format.
        dataset_manifest: The preprocessed dataset manifest (URI or the parsed dict); its
            `domain_eval` split is required, `general_eval` is used when present.
        out_dir: Local directory receiving `eval.json` and `report.html`.

    Returns:
        Everything written to `eval.json`: `metrics` (flat numbers for KFP Metrics), `verdict`
        (bool), `reasons` (one sentence per gate check), `checks`, `sets`, the model URIs, ...
    """
    manifest = load_manifest(dataset_manifest)
    limit = cfg.evaluation.max_eval_sequences
    set_names = [DOMAIN] + ([GENERAL] if GENERAL in manifest["splits"] else [])
    data = {name: load_split(manifest, name, limit=limit) for name in set_names}
    for name, split in data.items():
        if split["input_ids"].shape[0] == 0:
            raise EvaluateError(f"the {name} split has no sequences")

    ev = cfg.evaluation
    names = [task.name for task in ev.mc_tasks]
    if len(set(names)) != len(names):
        raise EvaluateError(f"evaluation.mc_tasks: task names must be unique (got {names})")
    questions = {task.name: mc_tasks.load_task(task.uri, limit=limit) for task in ev.mc_tasks}

    device, dtype = pick_device()
    scores: dict[str, dict[str, LossResult]] = {name: {} for name in set_names}
    mc_scores: dict[str, dict[str, mc_tasks.MCScores]] = {name: {} for name in questions}
    for role, uri in (("base", base_model_uri), ("tuned", tuned_model_uri)):
        with load_model_and_tokenizer(cfg, uri, device, dtype, tokenizer=bool(questions)) as (model, tok):
            for name in set_names:
                try:
                    result = sequence_loss(model, data[name], batch_size=ev.per_device_eval_batch_size)
                except EvaluateError as exc:
                    raise EvaluateError(f"{name}: {exc}") from None
                scores[name][role] = result
                log.info(
                    "%s model on %s: loss %.4f, perplexity %.3f", role, name, result.loss, result.perplexity
                )
            for name, task_questions in questions.items():
                got = mc_tasks.evaluate_task(
                    model, tok, task_questions, batch_size=ev.per_device_eval_batch_size
                )
                mc_scores[name][role] = got
                log.info("%s model on %s: acc %.4f, acc_norm %.4f", role, name, got.acc, got.acc_norm)

    boot = {"resamples": ev.bootstrap_resamples, "seed": ev.bootstrap_seed, "level": ev.confidence_level}
    intervals: dict[str, Interval] = {}
    for name, by_role in scores.items():
        intervals.update(_loss_intervals(name, by_role["base"], by_role["tuned"], **boot))
    for name, by_role in mc_scores.items():
        intervals.update(_mc_intervals(name, by_role["base"], by_role["tuned"], **boot))

    domain = scores[DOMAIN]
    general = scores.get(GENERAL)
    verdict = decide(
        base_domain_loss=domain["base"].loss,
        tuned_domain_loss=domain["tuned"].loss,
        base_general_ppl=general["base"].perplexity if general else None,
        tuned_general_ppl=general["tuned"].perplexity if general else None,
        min_domain_loss_improvement=ev.min_domain_loss_improvement,
        max_general_ppl_increase=ev.max_general_ppl_increase,
        domain_ci=_bounds(intervals["domain_loss_improvement"]),
        forgetting_ci=_bounds(intervals["forgetting"]) if general else None,
        mc=[
            MCComparison(name, r["base"].acc, r["tuned"].acc, _bounds(intervals[f"mc_{name}_acc_change"]))
            for name, r in mc_scores.items()
        ],
        max_mc_accuracy_drop=ev.max_mc_accuracy_drop,
        ci_level=ev.confidence_level,
    )

    metrics: dict[str, float] = {}
    sets: dict[str, Any] = {}
    for name, by_role in scores.items():
        sets[name] = {
            "sequences": by_role["base"].sequences,
            "loss_tokens": by_role["base"].tokens,
            **{role: {"loss": r.loss, "perplexity": r.perplexity} for role, r in by_role.items()},
            "worst_regressions": _worst_sequences(by_role["base"], by_role["tuned"]),
        }
        for role, r in by_role.items():
            metrics[f"{name}_{role}_loss"] = r.loss
            metrics[f"{name}_{role}_perplexity"] = r.perplexity
    metrics["domain_loss_improvement"] = domain_loss_improvement(domain["base"].loss, domain["tuned"].loss)
    if general:
        metrics["forgetting"] = forgetting(general["base"].perplexity, general["tuned"].perplexity)
    mc_result: dict[str, Any] = {}
    for name, by_role in mc_scores.items():
        for role, r in by_role.items():
            metrics[f"mc_{name}_{role}_acc"] = r.acc
            metrics[f"mc_{name}_{role}_acc_norm"] = r.acc_norm
        metrics[f"mc_{name}_acc_change"] = intervals[f"mc_{name}_acc_change"].estimate
        metrics[f"mc_{name}_acc_norm_change"] = intervals[f"mc_{name}_acc_norm_change"].estimate
        mc_result[name] = {
            "questions": len(questions[name]),
            **{role: {"acc": r.acc, "acc_norm": r.acc_norm} for role, r in by_role.items()},
            "acc_change_points": metrics[f"mc_{name}_acc_change"],
            "acc_norm_change_points": metrics[f"mc_{name}_acc_norm_change"],
            "worst_regressions": _worst_questions(questions[name], by_role["base"], by_role["tuned"]),
        }
    for key, interval in intervals.items():
        if key not in metrics:
            metrics[key] = interval.estimate
        if interval.known:  # no NaN placeholders in KFP Metrics when the bootstrap is off
            metrics[f"{key}_ci_low"] = interval.low
            metrics[f"{key}_ci_high"] = interval.high
    metrics["gate_passed"] = 1.0 if verdict.passed else 0.0
    metrics = {key: float(value) for key, value in metrics.items()}

    result: dict[str, Any] = {
        "format": EVAL_FORMAT,
        "base_model_uri": base_model_uri,
        "tuned_model_uri": tuned_model_uri,
        "dataset_manifest": dataset_manifest if isinstance(dataset_manifest, str) else None,
        "sets": sets,
        "mc": mc_result,
        "metrics": metrics,
        "confidence_intervals": {
            key: {"estimate": i.estimate, "low": i.low, "high": i.high} for key, i in intervals.items()
        },
        "bootstrap": boot,
        "verdict": verdict.passed,
        "reasons": verdict.reasons,
        "checks": [check._asdict() for check in verdict.checks],
        "thresholds": {
            "min_domain_loss_improvement": ev.min_domain_loss_improvement,
            "max_general_ppl_increase": ev.max_general_ppl_increase,
            "max_mc_accuracy_drop": ev.max_mc_accuracy_drop,
        },
        "device": f"{device.type} ({str(dtype).removeprefix('torch.')})",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "fulltune_version": fulltune.__version__,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    storage.write_json(str(out_dir / EVAL_FILE), result)
    storage.write_text(str(out_dir / REPORT_FILE), render_report(result))
    log.info("gate %s: %s", "passed" if verdict.passed else "failed", "; ".join(verdict.reasons))
    return result


# -- confidence intervals and per-example regressions ------------------------------------------------


def _bounds(interval: Interval) -> tuple[float, float] | None:
    return (interval.low, interval.high) if interval.known else None


def _loss_intervals(
    name: str, base: LossResult, tuned: LossResult, *, resamples: int, seed: int, level: float
) -> dict[str, Interval]:
    """Paired bootstrap over sequences of the absolute and relative change of loss / perplexity.

    domain_eval: `domain_loss_change` (tuned - base loss) and `domain_loss_improvement`;
    general_eval: `general_perplexity_change` (tuned - base perplexity) and `forgetting`.
    """
    base_loss = ratio_of_sums(base.sequence_sums, base.sequence_tokens)
    tuned_loss = ratio_of_sums(tuned.sequence_sums, tuned.sequence_tokens)
    n = base.sequences
    kw = {"resamples": resamples, "seed": seed, "level": level}
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if name == DOMAIN:
            return {
                "domain_loss_change": bootstrap(lambda i: tuned_loss(i) - base_loss(i), n, **kw),
                "domain_loss_improvement": bootstrap(lambda i: 1.0 - tuned_loss(i) / base_loss(i), n, **kw),
            }
        return {
            f"{name.removesuffix('_eval')}_perplexity_change": bootstrap(
                lambda i: np.exp(tuned_loss(i)) - np.exp(base_loss(i)), n, **kw
            ),
            "forgetting" if name == GENERAL else f"{name}_forgetting": bootstrap(
                lambda i: np.exp(tuned_loss(i) - base_loss(i)) - 1.0, n, **kw
            ),
        }


def _mc_intervals(
    name: str, base: mc_tasks.MCScores, tuned: mc_tasks.MCScores, *, resamples: int, seed: int, level: float
) -> dict[str, Interval]:
    """Paired bootstrap over questions of the accuracy change, in percentage points."""
    kw = {"resamples": resamples, "seed": seed, "level": level}
    diff = (tuned.correct - base.correct) * 100.0
    diff_norm = (tuned.correct_norm - base.correct_norm) * 100.0
    n = len(diff)
    return {
        f"mc_{name}_acc_change": bootstrap(lambda i: diff[i].mean(axis=-1), n, **kw),
        f"mc_{name}_acc_norm_change": bootstrap(lambda i: diff_norm[i].mean(axis=-1), n, **kw),
    }


def _worst_sequences(base: LossResult, tuned: LossResult) -> list[dict[str, Any]]:
    """The sequences whose token-mean loss rose most (index into the eval set, in data order)."""
    has = base.sequence_tokens > 0
    tokens = np.maximum(base.sequence_tokens, 1)
    b, t = base.sequence_sums / tokens, tuned.sequence_sums / tokens
    rise = np.where(has, t - b, -np.inf)
    out = []
    for i in np.argsort(-rise, kind="stable")[:WORST]:
        if not has[i] or not rise[i] > 0:
            break
        out.append(
            {"index": int(i), "base_loss": float(b[i]), "tuned_loss": float(t[i]), "change": float(rise[i])}
        )
    return out


def _worst_questions(
    questions: list[mc_tasks.Question], base: mc_tasks.MCScores, tuned: mc_tasks.MCScores
) -> list[dict[str, Any]]:
    """The questions whose answer loss (minus the right choice's log-likelihood) rose most."""
    rise = base.answer_loglikelihood - tuned.answer_loglikelihood
    out = []
    for i in np.argsort(-rise, kind="stable")[:WORST]:
        if not rise[i] > 0:
            break
        text = questions[i].question
        out.append(
            {
                "index": int(i),
                "question": text if len(text) <= 120 else text[:119] + "…",
                "base_loss": float(-base.answer_loglikelihood[i]),
                "tuned_loss": float(-tuned.answer_loglikelihood[i]),
                "change": float(rise[i]),
                "base_correct": bool(base.correct[i]),
                "tuned_correct": bool(tuned.correct[i]),
            }
        )
    return out
