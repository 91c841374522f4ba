"""What every loss set and task of an evaluation implements, and the work they share.

An `EvalTask` is prepared once, before any model is loaded (read, checked, tokenised, batched), then
scored by every model, then summarised: its bootstrap intervals and its section of the result. One
implementation per kind: `loss.LossSet` (domain_eval, general_eval), `mc.MCTask` (multiple choice)
and `generation.ExactMatchTask` (exact-match generation).

Shared here: `Pair` (base and tuned), `Tokenizers` and `Shared` (task batches built once per distinct
tokenizer, and the loaded models grouped by the batches they share), `OnDevices` (a batch moved to a
device once, read there by every model of the group) and `paired_interval` (the bootstrap with the
run's settings).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from fulltune.evaluate.result import ROLES, BootstrapSettings, Section
from fulltune.evaluate.stats import Interval, bootstrap

log = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")
S = TypeVar("S")
W = TypeVar("W")


class EvaluateError(RuntimeError):
    """Evaluation could not produce a meaningful number (e.g. a set without loss tokens)."""


@dataclass(frozen=True)
class Pair(Generic[T]):
    """The same thing for the base and for the tuned model."""

    base: T
    tuned: T

    @classmethod
    def of(cls, by_role: Mapping[str, T]) -> Pair[T]:
        return cls(by_role["base"], by_role["tuned"])

    def __getitem__(self, role: str) -> T:
        if role not in ROLES:
            raise KeyError(role)
        return getattr(self, role)

    def items(self) -> Iterator[tuple[str, T]]:
        yield "base", self.base
        yield "tuned", self.tuned

    def map(self, fn: Callable[[T], U]) -> Pair[U]:
        return Pair(fn(self.base), fn(self.tuned))


class EvalTask(Protocol[S]):
    """A loss set or task, prepared before any model is loaded; `S` is one model's scores on it."""

    @property
    def name(self) -> str:
        """The set's or task's name, as in eval.json and the metric names."""
        ...

    def score(self, models: Mapping[str, Any]) -> dict[str, S]:
        """The scores of each of `models` (role -> loaded model), in one pass over the prepared batches."""
        ...

    def intervals(self, scores: Pair[S], boot: BootstrapSettings) -> dict[str, Interval]:
        """Paired bootstrap intervals of the changes, by metric name."""
        ...

    def section(self, scores: Pair[S], intervals: Mapping[str, Interval]) -> Section:
        """This task's section of the result: figures, changes, worst regressions."""
        ...


class OnDevices:
    """One batch's tensors, moved to each model's input device once however many models read them there."""

    def __init__(self, *tensors: Any):
        self._tensors = tensors
        self._copies: dict[Any, tuple[Any, ...]] = {}

    def on(self, model: Any) -> tuple[Any, ...]:
        device = input_device(model)
        if device not in self._copies:
            self._copies[device] = tuple(t.to(device) for t in self._tensors)
        return self._copies[device]


def input_device(model: Any) -> Any:
    """Where a model takes its inputs: its input embeddings' device (the first GPU under device_map)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def paired_interval(statistic: Callable[[Any], Any], n: int, boot: BootstrapSettings) -> Interval:
    """`stats.bootstrap` over `n` examples with the run's resamples, seed and level."""
    return bootstrap(statistic, n, resamples=boot.resamples, seed=boot.seed, level=boot.level)


# -- task batches built once per distinct tokenizer -------------------------------------------------


@dataclass(frozen=True, eq=False)
class Shared(Generic[W]):
    """Prepared work per role; roles whose tokenizers encode alike hold the very same object."""

    by_role: dict[str, W]

    def groups(self, models: Mapping[str, Any]) -> list[tuple[W, dict[str, Any]]]:
        """The loaded models grouped by the prepared work they share."""
        groups: list[tuple[W, dict[str, Any]]] = []
        for role, model in models.items():
            for work, members in groups:
                if work is self.by_role[role]:
                    members[role] = model
                    break
            else:
                groups.append((self.by_role[role], {role: model}))
        return groups


class Tokenizers:
    """Each model's tokenizer and config, and which models encode (and fit) every text alike.

    Fine-tuning normally keeps the tokenizer, so task prompts are usually encoded and batched once
    for both models; per model when they differ.
    """

    def __init__(self, tokenizers: Pair[Any], configs: Pair[Any]):
        self._tokenizers = dict(tokenizers.items())
        self._configs = dict(configs.items())
        self._keys = {
            role: _tokenizer_key(tok, self._configs[role]) for role, tok in self._tokenizers.items()
        }
        if len(set(self._keys.values())) > 1:
            log.info("base and tuned tokenizers differ: task prompts are encoded for each model")

    def prepare(self, build: Callable[[Any, Any], W]) -> Shared[W]:
        """`build(tokenizer, config)` once per distinct tokenizer."""
        built: dict[Any, W] = {}
        by_role = {}
        for role, key in self._keys.items():
            if key not in built:
                built[key] = build(self._tokenizers[role], self._configs[role])
            by_role[role] = built[key]
        return Shared(by_role)


def _tokenizer_key(tok: Any, config: Any) -> tuple[Any, ...]:
    """Equal for tokenizers (and contexts) that encode and pad every text the same way."""
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else tuple(sorted(tok.get_vocab().items()))
    return (
        type(tok).__name__,
        body,
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
        context_length(config),
    )


def context_length(model_or_config: Any) -> int | None:
    """The model's `max_position_embeddings` (None when its config does not say)."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "max_position_embeddings", None)
