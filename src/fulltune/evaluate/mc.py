"""Multiple-choice tasks scored by log-likelihood, the way lm-evaluation-harness scores them.

A task is a JSONL file (local or s3://), one question a line:

    {"question": "The capital of France is", "choices": ["Paris", "Rome"], "answer": 0}

For every choice the model scores the continuation `" " + choice` given the question (the
harness's default `target_delimiter`), as the summed log-probability of the continuation's tokens.
Tokenization follows the harness's `_encode_pair`: the continuation tokens are those of
`encode(question + continuation)` past `encode(question)`, so a merge across the boundary is
scored the way the model would see it. The tokens are preceded by the tokenizer's BOS token when
it has one (the harness leaves BOS out by default; Llama-family models expect it).

- `acc`: the choice with the highest summed log-probability is the answer;
- `acc_norm`: the same after dividing by the choice's length in **characters** (`len(choice)`, as
  the harness's `acc_norm` does; its `acc_bytes` divides by UTF-8 bytes instead).

Ties go to the first choice (numpy argmax, as in the harness). Requests are batched sorted by
length, longest first, so a batch pads little; a request longer than the model's
`max_position_embeddings` is truncated from the left. The padded batches are built once
(`prepare_batches`) and scored by the base and the tuned model alike (`score_batches`) when the two
share a tokenizer; `MCTask` is a task file prepared and scored that way.

The bootstrap intervals resample questions: `mc_<task>_acc_change` and `mc_<task>_acc_norm_change`,
in percentage points.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fulltune.evaluate.result import BootstrapSettings, MCFigures, MCSection, QuestionRegression
from fulltune.evaluate.stats import Interval
from fulltune.evaluate.taskfile import capped, task_records
from fulltune.evaluate.tasks import (
    OnDevices,
    Pair,
    Shared,
    Tokenizers,
    context_length,
    paired_interval,
)

log = logging.getLogger(__name__)

# Questions listed as worst regressions in eval.json and the report.
WORST = 10


class MCTaskError(ValueError):
    """A multiple-choice task file that cannot be used; the message names the file and the line."""


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]
    answer: int
    where: str = field(default="", compare=False)  # "<uri> line N", for errors found while encoding


@dataclass(frozen=True)
class MCScores:
    """One model on one task: per-choice log-likelihoods and the per-question outcomes."""

    loglikelihoods: list[np.ndarray]  # per question, one value per choice
    correct: np.ndarray  # [Q] 1.0 where acc picks the answer
    correct_norm: np.ndarray  # [Q] 1.0 where acc_norm picks the answer
    answer_loglikelihood: np.ndarray  # [Q] log-likelihood of the right choice

    @property
    def acc(self) -> float:
        return float(self.correct.mean())

    @property
    def acc_norm(self) -> float:
        return float(self.correct_norm.mean())


def load_task(uri: str, *, limit: int | None = None) -> list[Question]:
    """The questions of a task file, in file order; every line is checked, and at most `limit` are
    kept, spread evenly over the file (`taskfile.capped`)."""
    questions: list[Question] = []
    for where, record in task_records(uri, error=MCTaskError, expected="question, choices and answer"):
        question, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
        if not isinstance(question, str):
            raise MCTaskError(f"{where}: 'question' must be a string")
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise MCTaskError(f"{where}: 'choices' must be a list of at least two non-empty strings")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise MCTaskError(f"{where}: 'answer' must be an index into choices (0..{len(choices) - 1})")
        questions.append(Question(question, tuple(choices), answer, where))
    if not questions:
        raise MCTaskError(f"{uri}: no questions")
    return capped(questions, limit)


@dataclass(frozen=True)
class Request:
    """One (question, choice) pair as token ids: the full sequence and how many tokens are scored."""

    question: int
    choice: int
    tokens: tuple[int, ...]  # prefix + context + continuation
    continuation: int  # number of trailing tokens scored
    where: str = ""  # the question's file and line


def encode(tokenizer: Any, questions: list[Question]) -> list[Request]:
    """Token ids for every (question, choice), harness-style (see the module docstring)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    prefix = [bos] if bos is not None else []
    requests = []
    for qi, q in enumerate(questions):
        where = q.where or f"question {qi}"
        context = tokenizer(q.question, add_special_tokens=False)["input_ids"]
        for ci, choice in enumerate(q.choices):
            whole = tokenizer(q.question + " " + choice, add_special_tokens=False)["input_ids"]
            continuation = whole[len(context) :]
            if not continuation:
                raise MCTaskError(f"{where}, choice {ci}: the choice encodes to no tokens")
            if not prefix and len(whole) == len(continuation):
                raise MCTaskError(f"{where}: an empty question needs a tokenizer with a BOS token")
            requests.append(Request(qi, ci, tuple(prefix + whole), len(continuation), where))
    return requests


@dataclass(frozen=True)
class MCBatch:
    """Right-padded requests without their last token: `positions` index into the request list."""

    positions: tuple[int, ...]
    input_ids: Any  # torch.LongTensor [B, width]
    attention_mask: Any  # torch.LongTensor [B, width]
    lengths: tuple[int, ...]  # real length of each row's input


def prepare_batches(
    requests: list[Request], *, batch_size: int, pad_id: int = 0, max_len: int | None = None
) -> list[MCBatch]:
    """The padded input batches for `requests`, longest first; built once, scored by any model."""
    import torch

    batches = []
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].tokens))
    for start in range(0, len(order), batch_size):
        positions = order[start : start + batch_size]
        batch = [requests[i] for i in positions]
        inputs = [list(r.tokens[:-1]) for r in batch]
        if max_len:
            for r in batch:
                if r.continuation > max_len:
                    raise MCTaskError(
                        f"{r.where or f'question {r.question}'}, choice {r.choice}: the choice is longer than "
                        f"the model's context ({max_len} tokens)"
                    )
            inputs = [seq[-max_len:] for seq in inputs]
        width = max(len(seq) for seq in inputs)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(inputs):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        batches.append(MCBatch(tuple(positions), ids, mask, tuple(len(seq) for seq in inputs)))
    return batches


def score_batches(
    models: dict[str, Any], requests: list[Request], batches: list[MCBatch]
) -> dict[str, np.ndarray]:
    """Summed log-probability of each request's continuation under each model, in request order.

    One pass over the batches: each is moved to a model's device once and scored by every model.
    """
    import torch

    out = {role: np.zeros(len(requests), dtype=np.float64) for role in models}
    with torch.inference_mode():
        for batch in batches:
            moved = OnDevices(batch.input_ids, batch.attention_mask)
            for role, model in models.items():
                ids, mask = moved.on(model)
                logits = model(input_ids=ids, attention_mask=mask).logits
                for row, (i, length) in enumerate(zip(batch.positions, batch.lengths, strict=True)):
                    r = requests[i]
                    k = r.continuation
                    scored = logits[row, length - k : length].float().log_softmax(dim=-1)
                    targets = torch.tensor(r.tokens[-k:], dtype=torch.long, device=scored.device)
                    out[role][i] = float(scored.gather(1, targets[:, None]).sum().double())
    return out


def loglikelihoods(model: Any, requests: list[Request], *, batch_size: int, pad_id: int = 0) -> np.ndarray:
    """Summed log-probability of each request's continuation, in request order (float64)."""
    batches = prepare_batches(requests, batch_size=batch_size, pad_id=pad_id, max_len=context_length(model))
    return score_batches({"model": model}, requests, batches)["model"]


def score(questions: list[Question], requests: list[Request], values: np.ndarray) -> MCScores:
    """acc, acc_norm and the answer's log-likelihood per question from per-request log-likelihoods.
    A question with a log-likelihood that is not a finite number (a diverged model, bf16 overflow)
    scores NaN, not the first NaN choice argmax would pick, so the task's accuracy is NaN and the
    gate fails it as not a finite number instead of passing a plausible figure."""
    per_question: list[np.ndarray] = [np.full(len(q.choices), np.nan) for q in questions]
    for r, v in zip(requests, values, strict=True):
        per_question[r.question][r.choice] = v
    correct, correct_norm, answer_ll = [], [], []
    for q, ll in zip(questions, per_question, strict=True):
        lengths = np.array([float(len(c)) for c in q.choices])
        finite = bool(np.isfinite(ll).all())
        correct.append(float(np.argmax(ll) == q.answer) if finite else math.nan)
        correct_norm.append(float(np.argmax(ll / lengths) == q.answer) if finite else math.nan)
        answer_ll.append(float(ll[q.answer]))
    return MCScores(per_question, np.array(correct), np.array(correct_norm), np.array(answer_ll))


def evaluate_task(model: Any, tokenizer: Any, questions: list[Question], *, batch_size: int) -> MCScores:
    """Score every question of a task with one model."""
    requests = encode(tokenizer, questions)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return score(questions, requests, loglikelihoods(model, requests, batch_size=batch_size, pad_id=pad_id))


# -- the task file as an evaluation task --------------------------------------------------------------


@dataclass(frozen=True)
class MCWork:
    """A task's requests for one tokenizer, and their padded batches."""

    requests: list[Request]
    batches: list[MCBatch]


@dataclass(frozen=True, eq=False)
class MCTask:
    """A multiple-choice task file, encoded and batched once per distinct tokenizer."""

    name: str
    questions: list[Question]
    work: Shared[MCWork]

    @classmethod
    def prepare(
        cls, name: str, questions: list[Question], tokenizers: Tokenizers, *, batch_size: int
    ) -> MCTask:
        def build(tok: Any, config: Any) -> MCWork:
            requests = encode(tok, questions)
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            batches = prepare_batches(
                requests, batch_size=batch_size, pad_id=pad, max_len=context_length(config)
            )
            return MCWork(requests, batches)

        return cls(name, questions, tokenizers.prepare(build))

    def score(self, models: Mapping[str, Any]) -> dict[str, MCScores]:
        out = {}
        for work, members in self.work.groups(models):
            for role, values in score_batches(members, work.requests, work.batches).items():
                out[role] = got = score(self.questions, work.requests, values)
                log.info("%s model on %s: acc %.4f, acc_norm %.4f", role, self.name, got.acc, got.acc_norm)
        return out

    def intervals(self, scores: Pair[MCScores], boot: BootstrapSettings) -> dict[str, Interval]:
        """Paired bootstrap over questions of the accuracy change, in percentage points."""
        diff = (scores.tuned.correct - scores.base.correct) * 100.0
        diff_norm = (scores.tuned.correct_norm - scores.base.correct_norm) * 100.0
        n = len(diff)
        return {
            MCSection.change_key(self.name): paired_interval(lambda i: diff[i].mean(axis=-1), n, boot),
            MCSection.change_key(self.name, "acc_norm"): paired_interval(
                lambda i: diff_norm[i].mean(axis=-1), n, boot
            ),
        }

    def section(self, scores: Pair[MCScores], intervals: Mapping[str, Interval]) -> MCSection:
        return MCSection(
            questions=len(self.questions),
            base=MCFigures(acc=scores.base.acc, acc_norm=scores.base.acc_norm),
            tuned=MCFigures(acc=scores.tuned.acc, acc_norm=scores.tuned.acc_norm),
            acc_change_points=intervals[MCSection.change_key(self.name)].estimate,
            acc_norm_change_points=intervals[MCSection.change_key(self.name, "acc_norm")].estimate,
            worst_regressions=self._worst(scores),
        )

    def _worst(self, scores: Pair[MCScores]) -> list[QuestionRegression]:
        """The questions whose answer loss (minus the right choice's log-likelihood) rose most."""
        base, tuned = scores.base, scores.tuned
        rise = base.answer_loglikelihood - tuned.answer_loglikelihood
        out = []
        for i in np.argsort(-rise, kind="stable")[:WORST]:
            if not rise[i] > 0:
                break
            text = self.questions[i].question
            out.append(
                QuestionRegression(
                    index=int(i),
                    question=text if len(text) <= 120 else text[:119] + "…",
                    base_loss=float(-base.answer_loglikelihood[i]),
                    tuned_loss=float(-tuned.answer_loglikelihood[i]),
                    change=float(rise[i]),
                    base_correct=bool(base.correct[i]),
                    tuned_correct=bool(tuned.correct[i]),
                )
            )
        return out
