"""Exact-match generation tasks: greedy decoding, cut at a stop string, compared to the answer.

A task is a JSONL file (local or s3://), one example a line:

    {"prompt": "Q: the capital of France?\\nA:", "answer": "Paris"}
    {"prompt": "Q: 2 + 2?\\nA:", "answer": ["4", "four"]}

`answer` is a string or a non-empty list of accepted strings. Each model continues every prompt by
**greedy decoding** (`model.generate`, `do_sample=False`, one beam) for at most the task's
`max_new_tokens`; a row also ends at the model's EOS token. Nothing else of the model's
`generation_config.json` applies (its repetition penalty, say): plain greedy for both models. Prompts are encoded like the
multiple-choice questions of `mc.py`: the tokenizer's BOS token when it has one, then the prompt's
tokens without other special tokens. A prompt longer than the model's context minus
`max_new_tokens` is truncated from the left.

The continuation is decoded (special tokens skipped), cut before the first occurrence of any of the
task's `stop` strings (default: a newline), and **normalised**: leading and trailing whitespace
stripped and every run of whitespace inside collapsed to one space (`" ".join(text.split())`). The
accepted answers are normalised the same way. Matching is otherwise exact — case, punctuation and
articles count — so an example is correct when its normalised continuation equals any normalised
accepted answer. `em` is the fraction of examples answered correctly. An accepted answer that is empty after
normalisation, or that holds one of the task's stop strings (the continuation is cut before it, so it
could never match), is refused with the file and line.

Batching: prompts are sorted by length, longest first, so a batch pads little, and **left**-padded
(the attention mask hides the padding, position ids follow the mask), so every row's continuation
starts at the same column. A row that has produced a stop string stops early; the batch ends when
every row has stopped or hit EOS. Greedy decoding of a batch gives the same continuations as decoding
each prompt alone (a test checks it); in bfloat16 on a GPU a near-tie between two tokens can in rare
cases resolve differently in a padded batch. `ExactMatchTask` is a task file batched once per distinct
tokenizer and continued by every model of a group batch by batch.

The bootstrap interval `gen_<task>_em_change` resamples prompts, in percentage points.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fulltune.evaluate.result import BootstrapSettings, EMFigures, GenerationRegression, GenerationSection
from fulltune.evaluate.stats import Interval
from fulltune.evaluate.taskfile import capped, task_records
from fulltune.evaluate.tasks import OnDevices, Pair, Shared, Tokenizers, paired_interval

if TYPE_CHECKING:
    from fulltune.config import GenerationTask

log = logging.getLogger(__name__)

# Prompts listed as worst regressions in eval.json and the report.
WORST = 10


class GenerationTaskError(ValueError):
    """A generation task file that cannot be used; the message names the file and the line."""


@dataclass(frozen=True)
class Example:
    prompt: str
    answers: tuple[str, ...]  # accepted answers, as written in the file
    where: str = field(default="", compare=False)  # "<uri> line N", for errors found while encoding


@dataclass(frozen=True)
class GenScores:
    """One model on one task: each example's continuation (cut at the stop string) and its outcome."""

    outputs: list[str]
    correct: np.ndarray  # [N] 1.0 where the normalised continuation is an accepted answer

    @property
    def em(self) -> float:
        return float(self.correct.mean())


def load_task(uri: str, *, limit: int | None = None, stop: Sequence[str] = ()) -> list[Example]:
    """The examples of a task file, in file order; every line is checked (answers against the task's
    `stop` strings), and at most `limit` are kept, spread evenly over the file (`taskfile.capped`)."""
    examples: list[Example] = []
    for where, record in task_records(uri, error=GenerationTaskError, expected="prompt and answer"):
        prompt = record.get("prompt")
        if not isinstance(prompt, str):
            raise GenerationTaskError(f"{where}: 'prompt' must be a string")
        examples.append(Example(prompt, _accepted(where, record.get("answer"), stop), where))
    if not examples:
        raise GenerationTaskError(f"{uri}: no examples")
    return capped(examples, limit)


def _accepted(where: str, answer: Any, stop: Sequence[str]) -> tuple[str, ...]:
    """The accepted answers of one example, refused when one of them could never be matched right."""
    answers = [answer] if isinstance(answer, str) else answer
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise GenerationTaskError(
            f"{where}: 'answer' must be a string or a non-empty list of strings (accepted answers)"
        )
    # One empty accepted answer is enough to count a model that says nothing as right.
    if not all(normalize(a) for a in answers):
        raise GenerationTaskError(
            f"{where}: 'answer' is empty after normalisation (an empty continuation would count as right)"
        )
    # The continuation is cut before the first stop string, so an answer holding one is never matched.
    for a in answers:
        held = [s for s in stop if s and s in normalize(a)]
        if held:
            raise GenerationTaskError(
                f"{where}: accepted answer {a!r} contains the stop string {held[0]!r}; the continuation "
                "is cut before it, so it could never match (change the answer or the task's stop)"
            )
    return tuple(answers)


def normalize(text: str) -> str:
    """Strip, and collapse every run of whitespace to one space (case and punctuation are kept)."""
    return " ".join(text.split())


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any non-empty stop string."""
    cut = len(text)
    for s in stop:
        if s:
            at = text.find(s)
            if 0 <= at < cut:
                cut = at
    return text[:cut]


def is_correct(output: str, answers: Sequence[str]) -> bool:
    got = normalize(output)
    return any(got == normalize(a) for a in answers)


def score(examples: Sequence[Example], outputs: list[str]) -> GenScores:
    correct = np.array([float(is_correct(o, e.answers)) for o, e in zip(outputs, examples, strict=True)])
    return GenScores(outputs, correct)


# -- batching -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptBatch:
    """Left-padded prompts: `rows` are example indices; every prompt ends at column `width`."""

    rows: tuple[int, ...]
    input_ids: Any  # torch.LongTensor [B, width]
    attention_mask: Any  # torch.LongTensor [B, width]

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])


def encode_prompts(tokenizer: Any, examples: Sequence[Example]) -> list[list[int]]:
    """BOS (when the tokenizer has one) + the prompt's tokens, per example."""
    bos = getattr(tokenizer, "bos_token_id", None)
    prefix = [bos] if bos is not None else []
    encoded = []
    for i, ex in enumerate(examples):
        ids = prefix + list(tokenizer(ex.prompt, add_special_tokens=False)["input_ids"])
        if not ids:
            raise GenerationTaskError(
                f"{ex.where or f'example {i}'}: an empty prompt needs a tokenizer with a BOS token"
            )
        encoded.append(ids)
    return encoded


def prompt_batches(
    encoded: Sequence[Sequence[int]], *, batch_size: int, pad_id: int, max_prompt_len: int | None = None
) -> list[PromptBatch]:
    """Batches of left-padded prompts, longest first; prompts over `max_prompt_len` keep their end."""
    import torch

    if max_prompt_len is not None and max_prompt_len < 1:
        raise GenerationTaskError("max_new_tokens leaves no room for the prompt in the model's context")
    prompts = [list(p[-max_prompt_len:]) if max_prompt_len else list(p) for p in encoded]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            seq = prompts[i]
            ids[r, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[r, width - len(seq) :] = 1
        batches.append(PromptBatch(tuple(rows), ids, mask))
    return batches


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The token ids that end a row: the model's generation config, else its config, else the tokenizer's."""
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return []


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad token, else its EOS token, else 0 (padding is masked either way)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def generate(
    models: Mapping[str, Any],
    tokenizer: Any,
    batches: Sequence[PromptBatch],
    *,
    examples: int,
    max_new_tokens: int,
    stop: Sequence[str],
    pad_token_id: int,
) -> dict[str, list[str]]:
    """Greedy continuations of every prompt by every model, cut at the first stop string, in example order.

    Each batch is moved to a model's device once and continued by each of `models` in turn.
    """
    import torch

    out = {role: [""] * examples for role in models}
    eos = {role: eos_ids(model, tokenizer) for role, model in models.items()}
    with torch.inference_mode():
        for batch in batches:
            moved = OnDevices(batch.input_ids, batch.attention_mask)
            for role, model in models.items():
                ids, mask = moved.on(model)
                with _plain_generation_config(model):
                    generated = model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        num_beams=1,
                        pad_token_id=pad_token_id,
                        eos_token_id=eos[role] or None,
                        stopping_criteria=_stop_criteria(tokenizer, batch.width, stop, eos[role]),
                    )
                for r, i in enumerate(batch.rows):
                    out[role][i] = decode(tokenizer, generated[r, batch.width :].tolist(), eos[role], stop)
    return out


@contextmanager
def _plain_generation_config(model: Any) -> Iterator[None]:
    """The model without its own generation defaults while it generates here.

    `generate` fills every setting not passed to it from the model's `generation_config.json`, and
    models ship sampling and decoding tweaks there (Qwen2.5-Instruct: repetition_penalty 1.05; others
    no_repeat_ngram_size, min_new_tokens, suppress_tokens): they would change the greedy
    continuation, and a base and a tuned model saved with different files would be decoded
    differently. Its EOS ids are still used (`eos_ids`, read before this)."""
    from transformers import GenerationConfig

    own = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = own


def decode(tokenizer: Any, new_tokens: list[int], eos: Sequence[int], stop: Sequence[str]) -> str:
    """The continuation's text: up to the first EOS token, special tokens skipped, cut at the first stop."""
    ends = [k for k, t in enumerate(new_tokens) if t in eos]
    if ends:
        new_tokens = new_tokens[: ends[0]]
    return cut_at_stop(tokenizer.decode(new_tokens, skip_special_tokens=True), stop)


def _stop_criteria(tokenizer: Any, width: int, stop: Sequence[str], eos: Sequence[int]) -> Any:
    """Per row: done once its continuation (up to EOS) contains a stop string."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    stop = [s for s in stop if s]

    class StopStrings(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            if not stop:
                return done
            for r, row in enumerate(input_ids[:, width:].tolist()):
                done[r] = len(decode(tokenizer, row, eos, ())) > len(decode(tokenizer, row, eos, stop))
            return done

    return StoppingCriteriaList([StopStrings()])


def evaluate_task(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_new_tokens: int,
    stop: Sequence[str],
) -> GenScores:
    """Score every example of a task with one model."""
    pad = pad_id(tokenizer)
    batches = prompt_batches(
        encode_prompts(tokenizer, examples),
        batch_size=batch_size,
        pad_id=pad,
        max_prompt_len=max_prompt_len(model, max_new_tokens),
    )
    outputs = generate(
        {"model": model},
        tokenizer,
        batches,
        examples=len(examples),
        max_new_tokens=max_new_tokens,
        stop=stop,
        pad_token_id=pad,
    )["model"]
    return score(examples, outputs)


def max_prompt_len(model_or_config: Any, max_new_tokens: int) -> int | None:
    """The context left for the prompt (None when the model does not say how long its context is)."""
    config = getattr(model_or_config, "config", model_or_config)
    context = getattr(config, "max_position_embeddings", None)
    return int(context) - max_new_tokens if context else None


# -- the task file as an evaluation task --------------------------------------------------------------


@dataclass(frozen=True)
class PromptWork:
    """A task's prompts for one tokenizer: the tokenizer (it decodes), the batches and the pad id."""

    tokenizer: Any
    batches: list[PromptBatch]
    pad_id: int


@dataclass(frozen=True, eq=False)
class ExactMatchTask:
    """An exact-match generation task file, encoded and batched once per distinct tokenizer."""

    name: str
    config: GenerationTask
    examples: list[Example]
    work: Shared[PromptWork]

    @classmethod
    def prepare(
        cls, config: GenerationTask, examples: list[Example], tokenizers: Tokenizers, *, batch_size: int
    ) -> ExactMatchTask:
        def build(tok: Any, model_config: Any) -> PromptWork:
            pad = pad_id(tok)
            encoded = encode_prompts(tok, examples)  # its errors name the file and line
            try:
                batches = prompt_batches(
                    encoded,
                    batch_size=batch_size,
                    pad_id=pad,
                    max_prompt_len=max_prompt_len(model_config, config.max_new_tokens),
                )
            except GenerationTaskError as exc:
                raise GenerationTaskError(f"{config.uri}: {exc}") from None
            return PromptWork(tok, batches, pad)

        return cls(config.name, config, examples, tokenizers.prepare(build))

    def score(self, models: Mapping[str, Any]) -> dict[str, GenScores]:
        out = {}
        for work, members in self.work.groups(models):
            outputs = generate(
                members,
                work.tokenizer,
                work.batches,
                examples=len(self.examples),
                max_new_tokens=self.config.max_new_tokens,
                stop=self.config.stop,
                pad_token_id=work.pad_id,
            )
            for role, texts in outputs.items():
                out[role] = got = score(self.examples, texts)
                log.info("%s model on %s: exact match %.4f", role, self.name, got.em)
        return out

    def intervals(self, scores: Pair[GenScores], boot: BootstrapSettings) -> dict[str, Interval]:
        """Paired bootstrap over prompts of the exact-match change, in percentage points."""
        diff = (scores.tuned.correct - scores.base.correct) * 100.0
        key = GenerationSection.change_key(self.name)
        return {key: paired_interval(lambda i: diff[i].mean(axis=-1), len(diff), boot)}

    def section(self, scores: Pair[GenScores], intervals: Mapping[str, Interval]) -> GenerationSection:
        return GenerationSection(
            examples=len(self.examples),
            max_new_tokens=self.config.max_new_tokens,
            stop=list(self.config.stop),
            base=EMFigures(em=scores.base.em),
            tuned=EMFigures(em=scores.tuned.em),
            em_change_points=intervals[GenerationSection.change_key(self.name)].estimate,
            worst_regressions=self._worst(scores),
            regressions=len(_regressed(scores)),
        )

    def _worst(self, scores: Pair[GenScores]) -> list[GenerationRegression]:
        """Prompts the base model answered right and the tuned model wrong (first `WORST`, file order)."""
        base, tuned = scores.base, scores.tuned
        out = []
        for i in _regressed(scores)[:WORST]:
            example = self.examples[i]
            out.append(
                GenerationRegression(
                    index=int(i),
                    prompt=_clip(example.prompt),
                    answers=[_clip(a, 60) for a in example.answers[:5]],
                    base_output=_clip(base.outputs[i]),
                    tuned_output=_clip(tuned.outputs[i]),
                )
            )
        return out


def _regressed(scores: Pair[GenScores]) -> np.ndarray:
    """The indices of the prompts the base model answered right and the tuned model wrong."""
    return np.flatnonzero((scores.base.correct > 0) & (scores.tuned.correct == 0))


def _clip(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
