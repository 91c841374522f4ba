"""Loss sets: token-mean cross-entropy and perplexity of a preprocessed eval split.

The loss is the mean cross-entropy over every position whose label is not -100 (the logits at
position t scored against label t + 1); the perplexity is its exponential. A set is batched once
for every model (`loss_batches`): sequences sorted longest first, each batch cut after its last
attended or labelled column, so a set of short answers padded to `max_seq_len` does not pay for the
padding. `score_loss` moves each batch to a model's device once and scores it with every model.

The bootstrap intervals resample sequences: `domain_loss_change` and `domain_loss_improvement` on
domain_eval, `general_perplexity_change` and `forgetting` on general_eval.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fulltune.evaluate.result import (
    DOMAIN,
    LossFigures,
    LossSetSection,
    SequenceRegression,
)
from fulltune.evaluate.stats import Interval, ratio_of_sums
from fulltune.evaluate.tasks import EvaluateError, OnDevices, Pair, paired_interval
from fulltune.preprocess.dataset import IGNORE_INDEX, model_inputs

if TYPE_CHECKING:
    import torch

    from fulltune.evaluate.result import BootstrapSettings

log = logging.getLogger(__name__)

# Cross-entropy is computed in float32 over at most this many positions at once, so the upcast
# copy of the logits stays small even for large vocabularies.
_CE_CHUNK = 4096
# Sequences listed as worst regressions in eval.json and the report.
WORST = 10


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


# -- batching and scoring --------------------------------------------------------------------------


@dataclass(frozen=True)
class LossBatch:
    """Rows `rows` of a set, cut after their last attended or labelled column (CPU tensors): the
    model's inputs (`dataset.model_inputs`: per packed document or across the row) and the labels."""

    rows: np.ndarray
    inputs: dict[str, Any]
    labels: Any


@dataclass(frozen=True)
class LossBatches:
    """A loss set, batched once for every model that scores it."""

    sequences: int
    sequence_tokens: np.ndarray  # [N] loss positions per sequence, data order
    batches: list[LossBatch]


def loss_batches(
    data: dict[str, torch.Tensor], *, batch_size: int, sort_by_length: bool = True
) -> LossBatches:
    """Batches of `data` (a loaded split: `input_ids`, `labels`, `attention_mask` and, when the
    documents attend alone, `position_ids`, [N, L], labels aligned to inputs).

    Sequences are batched longest first (`sort_by_length`) and each batch is cut after its last
    attended or labelled column; with a causal model that changes no logit that is scored. Batches
    without a loss position are left out.
    """
    import torch

    input_ids, labels, attention = data["input_ids"], data["labels"], data["attention_mask"]
    sequences, width = (int(x) for x in input_ids.shape)
    used = (attention != 0) | (labels != IGNORE_INDEX)
    lengths = torch.where(used.any(dim=1), width - used.flip(1).int().argmax(dim=1), 0)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).numpy().astype(np.int64)
    if int(counts.sum()) == 0:
        raise EvaluateError("no positions with a label other than -100: the set carries no loss tokens")
    order = torch.argsort(-lengths, stable=True) if sort_by_length else torch.arange(sequences)
    inputs_of = model_inputs(data)
    batches = []
    for start in range(0, sequences, batch_size):
        idx = order[start : start + batch_size]
        rows = idx.numpy()
        if counts[rows].sum() == 0:
            continue
        cut = int(lengths[idx].max())
        inputs = {k: v[idx, :cut] for k, v in inputs_of.items()}
        batches.append(LossBatch(rows, inputs, labels[idx, :cut]))
    return LossBatches(sequences, counts, batches)


def score_loss(models: Mapping[str, Any], prepared: LossBatches) -> dict[str, LossResult]:
    """Token-mean cross-entropy of each model over every position whose label is not -100.

    The logits at position t are scored against label t + 1. One pass over the batches: each is
    moved to a model's device once and scored by every model in `models`. Per-sequence sums come
    back in data order.
    """
    import torch

    n = prepared.sequences
    sums = {role: np.zeros(n, dtype=np.float64) for role in models}
    with torch.inference_mode():
        for batch in prepared.batches:
            moved = OnDevices(batch.labels, *batch.inputs.values())
            for role, model in models.items():
                labels, *inputs = moved.on(model)
                sums[role][batch.rows] = _sequence_sums(
                    model, dict(zip(batch.inputs, inputs, strict=True)), labels
                )
    tokens = int(prepared.sequence_tokens.sum())
    return {
        role: LossResult(
            loss=float(s.sum()) / tokens,
            tokens=tokens,
            sequences=n,
            sequence_sums=s,
            sequence_tokens=prepared.sequence_tokens,
        )
        for role, s in sums.items()
    }


def _sequence_sums(model: Any, inputs: dict[str, Any], labels: Any) -> np.ndarray:
    """Summed cross-entropy of each row of one batch, over its positions with a label (float64)."""
    import torch
    import torch.nn.functional as F

    logits = model(**inputs, use_cache=False).logits
    shift_labels = labels[:, 1:].to(logits.device)
    mask = shift_labels != IGNORE_INDEX
    count = int(mask.sum())
    selected = logits[:, :-1][mask]
    targets = shift_labels[mask]
    row_of = mask.nonzero()[:, 0]
    del logits
    per_row = torch.zeros(labels.shape[0], dtype=torch.float64, device=selected.device)
    for i in range(0, count, _CE_CHUNK):
        chunk = selected[i : i + _CE_CHUNK].float()
        ce = F.cross_entropy(chunk, targets[i : i + _CE_CHUNK], reduction="none")
        per_row.index_add_(0, row_of[i : i + _CE_CHUNK], ce.double())
    return per_row.cpu().numpy()


def sequence_loss(
    model: Any, data: dict[str, torch.Tensor], *, batch_size: int, sort_by_length: bool = True
) -> LossResult:
    """Token-mean cross-entropy of one model on `data` (see `loss_batches` and `score_loss`)."""
    prepared = loss_batches(data, batch_size=batch_size, sort_by_length=sort_by_length)
    return score_loss({"model": model}, prepared)["model"]


# -- the loss set as an evaluation task --------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LossSet:
    """An eval split of the preprocessed dataset (domain_eval, general_eval), batched once."""

    name: str
    batches: LossBatches

    @classmethod
    def prepare(cls, name: str, data: dict[str, torch.Tensor], *, batch_size: int) -> LossSet:
        try:
            return cls(name, loss_batches(data, batch_size=batch_size))
        except EvaluateError as exc:
            raise EvaluateError(f"{name}: {exc}") from None

    def score(self, models: Mapping[str, Any]) -> dict[str, LossResult]:
        results = score_loss(models, self.batches)
        for role, result in results.items():
            log.info(
                "%s model on %s: loss %.4f, perplexity %.3f", role, self.name, result.loss, result.perplexity
            )
        return results

    def intervals(self, scores: Pair[LossResult], boot: BootstrapSettings) -> dict[str, Interval]:
        """Paired bootstrap over sequences of the absolute and relative change of loss / perplexity.

        Named by `LossSetSection.interval_keys`: on domain_eval the change of the loss (tuned - base)
        and the improvement; on general_eval the change of the perplexity (tuned - base) and forgetting.
        """
        base = ratio_of_sums(scores.base.sequence_sums, scores.base.sequence_tokens)
        tuned = ratio_of_sums(scores.tuned.sequence_sums, scores.tuned.sequence_tokens)
        n = scores.base.sequences
        change, relative = LossSetSection.interval_keys(self.name)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            if self.name == DOMAIN:
                return {
                    change: paired_interval(lambda i: tuned(i) - base(i), n, boot),
                    relative: paired_interval(lambda i: 1.0 - tuned(i) / base(i), n, boot),
                }
            return {
                change: paired_interval(lambda i: np.exp(tuned(i)) - np.exp(base(i)), n, boot),
                relative: paired_interval(lambda i: np.exp(tuned(i) - base(i)) - 1.0, n, boot),
            }

    def section(self, scores: Pair[LossResult], intervals: Mapping[str, Interval]) -> LossSetSection:
        return LossSetSection(
            sequences=scores.base.sequences,
            loss_tokens=scores.base.tokens,
            base=LossFigures(loss=scores.base.loss, perplexity=scores.base.perplexity),
            tuned=LossFigures(loss=scores.tuned.loss, perplexity=scores.tuned.perplexity),
            worst_regressions=_worst_sequences(scores),
        )


def _worst_sequences(scores: Pair[LossResult]) -> list[SequenceRegression]:
    """The sequences whose token-mean loss rose most (index into the eval set, in data order)."""
    has = scores.base.sequence_tokens > 0
    tokens = np.maximum(scores.base.sequence_tokens, 1)
    b, t = scores.base.sequence_sums / tokens, scores.tuned.sequence_sums / tokens
    rise = np.where(has, t - b, -np.inf)
    out = []
    for i in np.argsort(-rise, kind="stable")[:WORST]:
        if not has[i] or not rise[i] > 0:
            break
        out.append(
            SequenceRegression(
                index=int(i), base_loss=float(b[i]), tuned_loss=float(t[i]), change=float(rise[i])
            )
        )
    return out
