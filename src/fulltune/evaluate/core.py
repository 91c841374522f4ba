"""Base vs tuned: loss and perplexity, multiple-choice and exact-match tasks, and the gate verdict.

`evaluate_models` is what the `evaluate` step calls. It scores both models on the preprocessed
`domain_eval` split and, when the dataset has one, the `general_eval` split: the token-mean
cross-entropy over every position whose label is not -100, and its exponential, the perplexity.
Configured multiple-choice tasks (`evaluation.mc_tasks`, see `mc.py`) are scored by log-likelihood
and generation tasks (`evaluation.generation_tasks`, see `generation.py`) by exact match of the
greedy continuation, each with the model's own tokenizer. Every number gets a paired bootstrap
confidence interval over examples (`stats.py`): sequences for the losses, questions / prompts for the
accuracies. Then the gate (`gate.decide`) turns the point estimates into a verdict with reasons that
quote the intervals, and `eval.json` and `report.html` are written. A failed gate is a result, not an
exception. Optional lm-evaluation-harness tasks (`evaluation.lm_eval_tasks`, `lm_eval_backend.py`)
are reported beside them, not gated.

**One pass over the data.** Everything is read, validated, tokenised and batched once, before any
model is loaded (a bad task file fails in seconds, not after the first model scored): the loss sets
become length-sorted batches with their trailing padding cut, the multiple-choice requests and the
generation prompts become padded batches (once for both models when base and tuned share a
tokenizer, which fine-tuning normally keeps; per model otherwise). Then:

- when both models fit in memory at once (`_fit_together`: on a GPU the weights of both within the
  free memory less a headroom for activations; on the CPU within half the available RAM), both are
  loaded and every batch is moved to the device once and scored by base and tuned in turn;
- otherwise — and always with `device_map: auto`, where each model is meant to take every GPU of
  the node — one model at a time: the base model scores every cached batch, is released, then the
  tuned model scores the same cached batches. Data preparation is still done once; what is paid
  twice is only the host-to-device copy of each batch.

Both ways run the same operations per model in the same order, so they give identical numbers.

**Placement.** `evaluation.device_map: single` (default) puts each model whole on the first CUDA
device in bfloat16 (else the CPU in float32). `auto` loads each model with accelerate's
`device_map="auto"`, spreading a model too large for one GPU over all GPUs of the node; without a
CUDA GPU it falls back to `single` and says so in the log.

Efficiency: scoring runs under `torch.inference_mode`; batches are formed from sequences sorted by
length and trailing padding common to a batch is cut off, so a set of short answers padded to
`max_seq_len` does not pay for the padding.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import fulltune
from fulltune import storage
from fulltune.config import RunConfig
from fulltune.evaluate import generation as gen_tasks
from fulltune.evaluate import lm_eval_backend
from fulltune.evaluate import mc as mc_tasks
from fulltune.evaluate.eval_page import render_report
from fulltune.evaluate.gate import (
    EMComparison,
    MCComparison,
    decide,
    domain_loss_improvement,
    forgetting,
)
from fulltune.evaluate.generation import input_device
from fulltune.evaluate.stats import Interval, bootstrap, ratio_of_sums
from fulltune.layout import EVAL_FILE, EVAL_REPORT_FILE
from fulltune.preprocess.dataset import IGNORE_INDEX, load_manifest, load_split

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

EVAL_FORMAT = "fulltune.eval/v1"
DOMAIN, GENERAL = "domain_eval", "general_eval"
ROLES = ("base", "tuned")
# Cross-entropy is computed in float32 over at most this many positions at once, so the upcast
# copy of the logits stays small even for large vocabularies.
_CE_CHUNK = 4096
# Per-example regressions listed in eval.json and the report.
WORST = 10
_GIB = 1 << 30


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


# -- placement and loading ---------------------------------------------------------------------------


def pick_device() -> tuple[torch.device, torch.dtype]:
    """bfloat16 on the first CUDA device when there is one, else float32 on the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def placement(cfg: RunConfig) -> tuple[torch.device, torch.dtype, str | None]:
    """Device, dtype and the `device_map` to load with (None: whole model on the device).

    `evaluation.device_map: auto` takes effect only where CUDA GPUs are visible; elsewhere each
    model is loaded whole on the CPU, with a log line saying so.
    """
    device, dtype = pick_device()
    if cfg.evaluation.device_map == "auto":
        if device.type == "cuda":
            return device, dtype, "auto"
        log.info(
            "evaluation.device_map is 'auto' but no CUDA GPU is visible: "
            "falling back to 'single' (each model loaded whole on %s)",
            device.type,
        )
    return device, dtype, None


@contextmanager
def load_model(
    cfg: RunConfig, uri: str, device: torch.device, dtype: torch.dtype, *, device_map: str | None = None
) -> Iterator[Any]:
    """A causal LM from a local directory or s3:// prefix (safetensors only), in eval mode.

    On `device`, or spread by accelerate when `device_map` is "auto". The model is released on
    exit, so the next one can take its memory.
    """
    import torch
    import transformers
    from packaging.version import Version
    from transformers import AutoModelForCausalLM

    # `torch_dtype` was renamed `dtype` in transformers 4.56.
    dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    extra: dict[str, Any] = {dtype_key: dtype}
    if device_map:
        extra["device_map"] = device_map
    with storage.local_dir(uri) as path:
        model = AutoModelForCausalLM.from_pretrained(
            path, use_safetensors=True, trust_remote_code=cfg.model.trust_remote_code, **extra
        )
    if not device_map:
        model.to(device)
    model.eval()
    try:
        yield model
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def load_tokenizer(cfg: RunConfig, uri: str) -> Any:
    """The tokenizer saved beside the model at `uri`, else the run's (`model.tokenizer_uri`, else the base's)."""
    from transformers import AutoTokenizer

    from fulltune.hf import load_tokenizer as load_run_tokenizer
    from fulltune.hf import metadata_dir

    try:
        with metadata_dir(uri) as path:
            return AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        if not cfg.tokenizer_uri or cfg.tokenizer_uri == uri:
            raise EvaluateError(f"{uri}: no tokenizer beside the model ({exc})") from None
    log.info("%s has no tokenizer; using the run's tokenizer %s", uri, cfg.tokenizer_uri)
    return load_run_tokenizer(cfg.tokenizer_uri, cfg.model.trust_remote_code)


def _load_config(cfg: RunConfig, uri: str) -> Any:
    from fulltune.hf import load_config

    return load_config(uri, cfg.model.trust_remote_code)


def _available_memory(device: torch.device) -> int:
    """Free bytes on the CUDA device, or the RAM the kernel reports as available."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _fit_together(
    configs: Mapping[str, Any], device: torch.device, dtype: torch.dtype, device_map: str | None
) -> tuple[bool, str]:
    """Whether base and tuned can be held at once, and why (see the module docstring)."""
    import torch

    if device_map:
        return False, "device_map 'auto' spreads each model over every GPU"
    from fulltune.plan import model_shape

    try:
        weights = (
            sum(model_shape(c).params for c in configs.values()) * torch.empty(0, dtype=dtype).element_size()
        )
    except Exception as exc:  # a config we cannot build on the meta device: stay on the safe side
        return False, f"the models could not be sized ({type(exc).__name__}: {exc})"
    free = _available_memory(device)
    if device.type == "cuda":
        budget = free - max(2 * _GIB, free // 5)  # logits and activations of one batch
    else:
        budget = free // 2
    where = f"{_size(weights)} of weights, {_size(budget)} to spare on {device.type}"
    if weights <= budget:
        return True, where
    return False, where


def _size(n: float) -> str:
    return f"{n / _GIB:.1f} GiB" if abs(n) >= _GIB else f"{n / (1 << 20):.1f} MiB"


# -- loss ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossBatch:
    """Rows `rows` of a set, cut after their last attended or labelled column (CPU tensors)."""

    rows: np.ndarray
    input_ids: Any
    attention_mask: Any
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
    """Batches of `data` (`input_ids`, `labels`, `attention_mask`, [N, L], labels aligned to inputs).

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
    batches = []
    for start in range(0, sequences, batch_size):
        idx = order[start : start + batch_size]
        rows = idx.numpy()
        if counts[rows].sum() == 0:
            continue
        cut = int(lengths[idx].max())
        batches.append(LossBatch(rows, input_ids[idx, :cut], attention[idx, :cut], labels[idx, :cut]))
    return LossBatches(sequences, counts, batches)


def score_loss(models: Mapping[str, Any], prepared: LossBatches) -> dict[str, LossResult]:
    """Token-mean cross-entropy of each model over every position whose label is not -100.

    The logits at position t are scored against label t + 1. One pass over the batches: each is
    moved to a model's device once and scored by every model in `models`. Per-sequence sums come
    back in data order.
    """
    import torch
    import torch.nn.functional as F

    n = prepared.sequences
    sums = {role: np.zeros(n, dtype=np.float64) for role in models}
    with torch.inference_mode():
        for batch in prepared.batches:
            on_device: dict[Any, tuple[Any, Any, Any]] = {}
            for role, model in models.items():
                device = input_device(model)
                if device not in on_device:
                    on_device[device] = tuple(
                        t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.labels)
                    )
                ids, attention, labels = on_device[device]
                logits = model(input_ids=ids, attention_mask=attention).logits
                shift_labels = labels[:, 1:].to(logits.device)
                mask = shift_labels != IGNORE_INDEX
                count = int(mask.sum())
                selected = logits[:, :-1][mask]
                targets = shift_labels[mask]
                row_of = mask.nonzero()[:, 0]
                del logits
                per_row = torch.zeros(len(batch.rows), dtype=torch.float64, device=selected.device)
                for i in range(0, count, _CE_CHUNK):
                    chunk = selected[i : i + _CE_CHUNK].float()
                    ce = F.cross_entropy(chunk, targets[i : i + _CE_CHUNK], reduction="none")
                    per_row.index_add_(0, row_of[i : i + _CE_CHUNK], ce.double())
                sums[role][batch.rows] = per_row.cpu().numpy()
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


def sequence_loss(
    model: Any, data: dict[str, torch.Tensor], *, batch_size: int, sort_by_length: bool = True
) -> LossResult:
    """Token-mean cross-entropy of one model on `data` (see `loss_batches` and `score_loss`)."""
    prepared = loss_batches(data, batch_size=batch_size, sort_by_length=sort_by_length)
    return score_loss({"model": model}, prepared)["model"]


# -- tasks, prepared once ------------------------------------------------------------------------------


@dataclass(eq=False)
class _MCWork:
    requests: list[mc_tasks.Request]
    batches: list[mc_tasks.MCBatch]


@dataclass(eq=False)
class _GenWork:
    tokenizer: Any
    batches: list[gen_tasks.PromptBatch]
    pad_id: int


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
        mc_tasks.context_length(config),
    )


def _shared(keys: Mapping[str, Any], build: Any) -> dict[str, Any]:
    """`build(role)` once per distinct key: roles with equal keys get the same object."""
    built: dict[Any, Any] = {}
    out = {}
    for role, key in keys.items():
        if key not in built:
            built[key] = build(role)
        out[role] = built[key]
    return out


def _by_work(works: Mapping[str, Any], models: Mapping[str, Any]) -> list[tuple[Any, dict[str, Any]]]:
    """The loaded models grouped by the prepared work they share."""
    groups: list[tuple[Any, dict[str, Any]]] = []
    for role, model in models.items():
        for work, members in groups:
            if work is works[role]:
                members[role] = model
                break
        else:
            groups.append((works[role], {role: model}))
    return groups


# -- evaluate_models -----------------------------------------------------------------------------------


def evaluate_models(
    cfg: RunConfig,
    base_model_uri: str,
    tuned_model_uri: str,
    dataset_manifest: str | dict[str, Any],
    out_dir: Path,
    *,
    models_together: bool | None = None,
) -> dict[str, Any]:
    """Score the base and the tuned model, apply the gate, write `eval.json` and `report.html`.

    Args:
        cfg: The resolved run config; `evaluation` sets batch size, the cap on sequences per set,
            the tasks, the placement and the gate thresholds; `model.trust_remote_code` is honoured.
        base_model_uri: The model before tuning: a local directory or s3:// prefix (HF format).
        tuned_model_uri: The tuned model, same format.
        dataset_manifest: The preprocessed dataset manifest (URI or the parsed dict); its
            `domain_eval` split is required, `general_eval` is used when present.
        out_dir: Local directory receiving `eval.json` and `report.html`.
        models_together: Hold both models at once (True) or one at a time (False); None decides
            from their size and the free memory. The numbers are the same either way.

    Returns:
        Everything written to `eval.json`: `metrics` (flat numbers for KFP Metrics), `verdict`
        (bool), `reasons` (one sentence per gate check), `checks`, `sets`, `mc`, `generation`,
        `lm_eval`, the model URIs, ...
    """
    ev = cfg.evaluation
    lm_eval_backend.require(ev.lm_eval_tasks)  # a configured backend that is missing fails first
    uris = {"base": base_model_uri, "tuned": tuned_model_uri}

    # 1. Read and check everything once, before any model is loaded.
    manifest = load_manifest(dataset_manifest)
    limit = ev.max_eval_sequences
    set_names = [DOMAIN] + ([GENERAL] if GENERAL in manifest["splits"] else [])
    data = {name: load_split(manifest, name, limit=limit) for name in set_names}
    for name, split in data.items():
        if split["input_ids"].shape[0] == 0:
            raise EvaluateError(f"the {name} split has no sequences")
    for kind, tasks in (("mc_tasks", ev.mc_tasks), ("generation_tasks", ev.generation_tasks)):
        names = [task.name for task in tasks]
        if len(set(names)) != len(names):
            raise EvaluateError(f"evaluation.{kind}: task names must be unique (got {names})")
    questions = {task.name: mc_tasks.load_task(task.uri, limit=limit) for task in ev.mc_tasks}
    gen_config = {task.name: task for task in ev.generation_tasks}
    examples = {task.name: gen_tasks.load_task(task.uri, limit=limit) for task in ev.generation_tasks}

    # 2. Batch everything once: loss sets for both models; task requests per distinct tokenizer.
    batch_size = ev.per_device_eval_batch_size
    loss_work: dict[str, LossBatches] = {}
    for name in set_names:
        try:
            loss_work[name] = loss_batches(data[name], batch_size=batch_size)
        except EvaluateError as exc:
            raise EvaluateError(f"{name}: {exc}") from None
    configs = {role: _load_config(cfg, uri) for role, uri in uris.items()}
    mc_work: dict[str, dict[str, _MCWork]] = {}
    gen_work: dict[str, dict[str, _GenWork]] = {}
    if questions or examples:
        tokenizers = {role: load_tokenizer(cfg, uri) for role, uri in uris.items()}
        keys = {role: _tokenizer_key(tokenizers[role], configs[role]) for role in ROLES}
        if keys["base"] != keys["tuned"]:
            log.info("base and tuned tokenizers differ: task prompts are encoded for each model")
        for name, task_questions in questions.items():

            def build_mc(role: str, task_questions: list[mc_tasks.Question] = task_questions) -> _MCWork:
                tok = tokenizers[role]
                requests = mc_tasks.encode(tok, task_questions)
                pad = tok.pad_token_id if tok.pad_token_id is not None else 0
                max_len = mc_tasks.context_length(configs[role])
                batches = mc_tasks.prepare_batches(
                    requests, batch_size=batch_size, pad_id=pad, max_len=max_len
                )
                return _MCWork(requests, batches)

            mc_work[name] = _shared(keys, build_mc)
        for name, task_examples in examples.items():

            def build_gen(
                role: str, task_examples: list[gen_tasks.Example] = task_examples, name: str = name
            ) -> _GenWork:
                tok = tokenizers[role]
                pad = gen_tasks.pad_id(tok)
                batches = gen_tasks.prompt_batches(
                    gen_tasks.encode_prompts(tok, task_examples),
                    batch_size=batch_size,
                    pad_id=pad,
                    max_prompt_len=gen_tasks.max_prompt_len(configs[role], gen_config[name].max_new_tokens),
                )
                return _GenWork(tok, batches, pad)

            try:
                gen_work[name] = _shared(keys, build_gen)
            except gen_tasks.GenerationTaskError as exc:
                raise gen_tasks.GenerationTaskError(f"{gen_config[name].uri}: {exc}") from None

    # 3. Score: both models over each batch, or one model at a time over the cached batches.
    device, dtype, device_map = placement(cfg)
    together, why = _fit_together(configs, device, dtype, device_map)
    if models_together is not None:
        together, why = models_together, "as asked by the caller"
    if together:
        log.info("scoring base and tuned together, one pass over the batches (%s)", why)
    else:
        log.info("scoring one model at a time over batches prepared once (%s)", why)
    groups = [ROLES] if together else [(role,) for role in ROLES]
    scores: dict[str, dict[str, LossResult]] = {name: {} for name in set_names}
    mc_scores: dict[str, dict[str, mc_tasks.MCScores]] = {name: {} for name in questions}
    gen_scores: dict[str, dict[str, gen_tasks.GenScores]] = {name: {} for name in examples}
    for group in groups:
        with ExitStack() as stack:
            models = {
                role: stack.enter_context(load_model(cfg, uris[role], device, dtype, device_map=device_map))
                for role in group
            }
            for name, prepared in loss_work.items():
                for role, result in score_loss(models, prepared).items():
                    scores[name][role] = result
                    log.info(
                        "%s model on %s: loss %.4f, perplexity %.3f",
                        role,
                        name,
                        result.loss,
                        result.perplexity,
                    )
            for name, works in mc_work.items():
                for work, members in _by_work(works, models):
                    values = mc_tasks.score_batches(members, work.requests, work.batches)
                    for role, v in values.items():
                        got = mc_tasks.score(questions[name], work.requests, v)
                        mc_scores[name][role] = got
                        log.info("%s model on %s: acc %.4f, acc_norm %.4f", role, name, got.acc, got.acc_norm)
            for name, works in gen_work.items():
                task = gen_config[name]
                for work, members in _by_work(works, models):
                    outputs = gen_tasks.generate(
                        members,
                        work.tokenizer,
                        work.batches,
                        examples=len(examples[name]),
                        max_new_tokens=task.max_new_tokens,
                        stop=task.stop,
                        pad_token_id=work.pad_id,
                    )
                    for role, texts in outputs.items():
                        got = gen_tasks.score(examples[name], texts)
                        gen_scores[name][role] = got
                        log.info("%s model on %s: exact match %.4f", role, name, got.em)

    lm_eval_results = lm_eval_backend.run(cfg, uris, device=device, dtype=dtype, device_map=device_map)

    # 4. Intervals, gate, outputs.
    boot = {"resamples": ev.bootstrap_resamples, "seed": ev.bootstrap_seed, "level": ev.confidence_level}
    intervals: dict[str, Interval] = {}
    for name, by_role in scores.items():
        intervals.update(_loss_intervals(name, by_role["base"], by_role["tuned"], **boot))
    for name, by_role in mc_scores.items():
        intervals.update(_mc_intervals(name, by_role["base"], by_role["tuned"], **boot))
    for name, by_role in gen_scores.items():
        intervals.update(_gen_intervals(name, by_role["base"], by_role["tuned"], **boot))

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
        generation=[
            EMComparison(name, r["base"].em, r["tuned"].em, _bounds(intervals[f"gen_{name}_em_change"]))
            for name, r in gen_scores.items()
        ],
        max_exact_match_drop=ev.max_exact_match_drop,
        ci_level=ev.confidence_level,
    )

    metrics: dict[str, float] = {}
    sets: dict[str, Any] = {}
    for name, by_role in scores.items():
        sets[name] = {
            "sequences": by_role["base"].sequences,
            "loss_tokens": by_role["base"].tokens,
            **{role: {"loss": by_role[role].loss, "perplexity": by_role[role].perplexity} for role in ROLES},
            "worst_regressions": _worst_sequences(by_role["base"], by_role["tuned"]),
        }
        for role in ROLES:
            metrics[f"{name}_{role}_loss"] = by_role[role].loss
            metrics[f"{name}_{role}_perplexity"] = by_role[role].perplexity
    metrics["domain_loss_improvement"] = domain_loss_improvement(domain["base"].loss, domain["tuned"].loss)
    if general:
        metrics["forgetting"] = forgetting(general["base"].perplexity, general["tuned"].perplexity)
    mc_result: dict[str, Any] = {}
    for name, by_role in mc_scores.items():
        for role in ROLES:
            metrics[f"mc_{name}_{role}_acc"] = by_role[role].acc
            metrics[f"mc_{name}_{role}_acc_norm"] = by_role[role].acc_norm
        metrics[f"mc_{name}_acc_change"] = intervals[f"mc_{name}_acc_change"].estimate
        metrics[f"mc_{name}_acc_norm_change"] = intervals[f"mc_{name}_acc_norm_change"].estimate
        mc_result[name] = {
            "questions": len(questions[name]),
            **{role: {"acc": by_role[role].acc, "acc_norm": by_role[role].acc_norm} for role in ROLES},
            "acc_change_points": metrics[f"mc_{name}_acc_change"],
            "acc_norm_change_points": metrics[f"mc_{name}_acc_norm_change"],
            "worst_regressions": _worst_questions(questions[name], by_role["base"], by_role["tuned"]),
        }
    gen_result: dict[str, Any] = {}
    for name, by_role in gen_scores.items():
        for role in ROLES:
            metrics[f"gen_{name}_{role}_em"] = by_role[role].em
        metrics[f"gen_{name}_em_change"] = intervals[f"gen_{name}_em_change"].estimate
        task = gen_config[name]
        gen_result[name] = {
            "examples": len(examples[name]),
            "max_new_tokens": task.max_new_tokens,
            "stop": list(task.stop),
            **{role: {"em": by_role[role].em} for role in ROLES},
            "em_change_points": metrics[f"gen_{name}_em_change"],
            "worst_regressions": _worst_generations(examples[name], by_role["base"], by_role["tuned"]),
        }
    lm_eval_result = lm_eval_backend.merge(lm_eval_results, ev.lm_eval_tasks)
    metrics.update(lm_eval_backend.flat_metrics(lm_eval_result))
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
        "generation": gen_result,
        "lm_eval": lm_eval_result,
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
            "max_exact_match_drop": ev.max_exact_match_drop,
        },
        "device": f"{device.type} ({str(dtype).removeprefix('torch.')})",
        "scoring": {
            "device_map": device_map or "single",
            "models_together": together,
            "why": why,
        },
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "fulltune_version": fulltune.__version__,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    storage.write_json(str(out_dir / EVAL_FILE), result)
    storage.write_text(str(out_dir / EVAL_REPORT_FILE), render_report(result))
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


def _gen_intervals(
    name: str,
    base: gen_tasks.GenScores,
    tuned: gen_tasks.GenScores,
    *,
    resamples: int,
    seed: int,
    level: float,
) -> dict[str, Interval]:
    """Paired bootstrap over prompts of the exact-match change, in percentage points."""
    diff = (tuned.correct - base.correct) * 100.0
    return {
        f"gen_{name}_em_change": bootstrap(
            lambda i: diff[i].mean(axis=-1), len(diff), resamples=resamples, seed=seed, level=level
        )
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


def _clip(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _worst_generations(
    examples: list[gen_tasks.Example], base: gen_tasks.GenScores, tuned: gen_tasks.GenScores
) -> list[dict[str, Any]]:
    """Prompts the base model answered right and the tuned model wrong (first `WORST`, file order)."""
    out = []
    for i in np.flatnonzero((base.correct > 0) & (tuned.correct == 0))[:WORST]:
        ex = examples[i]
        out.append(
            {
                "index": int(i),
                "prompt": _clip(ex.prompt),
                "answers": [_clip(a, 60) for a in ex.answers[:5]],
                "base_output": _clip(base.outputs[i]),
                "tuned_output": _clip(tuned.outputs[i]),
            }
        )
    return out
