"""Loss and perplexity of the base and the tuned model on the held-out sets, and the gate verdict.

`evaluate_models` is what the `evaluate` step calls. It scores both models on the preprocessed
`domain_eval` split and, when the dataset has one, the `general_eval` split: the token-mean
cross-entropy over every position whose label is not -100, and its exponential, the perplexity.
The models are scored one after the other, so only one is in memory at a time. Then the gate
(`gate.decide`) turns the numbers into a verdict with reasons, and `eval.json` and `report.html`
are written. A failed gate is a result, not an exception.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fulltune
from fulltune import storage
from fulltune.config import RunConfig
from fulltune.evaluate.gate import decide, domain_loss_improvement, forgetting
from fulltune.evaluate.report import render_report
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


class EvaluateError(RuntimeError):
    """Evaluation could not produce a meaningful number (e.g. a set without loss tokens)."""


@dataclass(frozen=True)
class LossResult:
    """Token-mean cross-entropy over `tokens` loss positions of `sequences` sequences."""

    loss: float
    tokens: int
    sequences: int

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
    model.to(device)
    model.eval()
    try:
        yield model
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def sequence_loss(model: Any, data: dict[str, torch.Tensor], *, batch_size: int) -> LossResult:
    """Token-mean cross-entropy of `model` over every position whose label is not -100.

    `data` holds `input_ids`, `labels` and `attention_mask` as [N, L] tensors with labels aligned to
    the inputs (Hugging Face convention): the logits at position t are scored against label t + 1.
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    sequences = int(data["input_ids"].shape[0])
    with torch.no_grad():
        for start in range(0, sequences, batch_size):
            input_ids = data["input_ids"][start : start + batch_size].to(device)
            labels = data["labels"][start : start + batch_size].to(device)
            attention_mask = data["attention_mask"][start : start + batch_size].to(device)
            shift_labels = labels[:, 1:]
            mask = shift_labels != IGNORE_INDEX
            count = int(mask.sum())
            if count == 0:
                continue
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            selected = logits[:, :-1][mask]
            targets = shift_labels[mask]
            del logits
            for i in range(0, count, _CE_CHUNK):
                chunk = selected[i : i + _CE_CHUNK].float()
                total += F.cross_entropy(chunk, targets[i : i + _CE_CHUNK], reduction="sum").double()
            tokens += count
    if tokens == 0:
        raise EvaluateError("no positions with a label other than -100: the set carries no loss tokens")
    return LossResult(loss=float(total) / tokens, tokens=tokens, sequences=sequences)


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

    device, dtype = pick_device()
    scores: dict[str, dict[str, LossResult]] = {name: {} for name in set_names}
    for role, uri in (("base", base_model_uri), ("tuned", tuned_model_uri)):
        with load_model(cfg, uri, device, dtype) as model:
            for name in set_names:
                try:
                    result = sequence_loss(
                        model, data[name], batch_size=cfg.evaluation.per_device_eval_batch_size
                    )
                except EvaluateError as exc:
                    raise EvaluateError(f"{name}: {exc}") from None
                scores[name][role] = result
                log.info(
                    "%s model on %s: loss %.4f, perplexity %.3f", role, name, result.loss, result.perplexity
                )

    domain = scores[DOMAIN]
    general = scores.get(GENERAL)
    verdict = decide(
        base_domain_loss=domain["base"].loss,
        tuned_domain_loss=domain["tuned"].loss,
        base_general_ppl=general["base"].perplexity if general else None,
        tuned_general_ppl=general["tuned"].perplexity if general else None,
        min_domain_loss_improvement=cfg.evaluation.min_domain_loss_improvement,
        max_general_ppl_increase=cfg.evaluation.max_general_ppl_increase,
    )

    metrics: dict[str, float] = {}
    sets: dict[str, Any] = {}
    for name, by_role in scores.items():
        sets[name] = {
            "sequences": by_role["base"].sequences,
            "loss_tokens": by_role["base"].tokens,
            **{role: {"loss": r.loss, "perplexity": r.perplexity} for role, r in by_role.items()},
        }
        for role, r in by_role.items():
            metrics[f"{name}_{role}_loss"] = r.loss
            metrics[f"{name}_{role}_perplexity"] = r.perplexity
    metrics["domain_loss_improvement"] = domain_loss_improvement(domain["base"].loss, domain["tuned"].loss)
    if general:
        metrics["forgetting"] = forgetting(general["base"].perplexity, general["tuned"].perplexity)
    metrics["gate_passed"] = 1.0 if verdict.passed else 0.0

    result: dict[str, Any] = {
        "format": EVAL_FORMAT,
        "base_model_uri": base_model_uri,
        "tuned_model_uri": tuned_model_uri,
        "dataset_manifest": dataset_manifest if isinstance(dataset_manifest, str) else None,
        "sets": sets,
        "metrics": metrics,
        "verdict": verdict.passed,
        "reasons": verdict.reasons,
        "checks": [check._asdict() for check in verdict.checks],
        "thresholds": {
            "min_domain_loss_improvement": cfg.evaluation.min_domain_loss_improvement,
            "max_general_ppl_increase": cfg.evaluation.max_general_ppl_increase,
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
