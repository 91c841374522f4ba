"""Base vs tuned: loss and perplexity, multiple-choice and exact-match tasks, and the gate verdict.

`evaluate_models` is what the `evaluate` step calls. It scores both models on the preprocessed
`domain_eval` split and, when the dataset has one, the `general_eval` split: the token-mean
cross-entropy over every position whose label is not -100, and its exponential, the perplexity
(`loss.py`). Configured multiple-choice tasks (`evaluation.mc_tasks`, see `mc.py`) are scored by
log-likelihood and generation tasks (`evaluation.generation_tasks`, see `generation.py`) by exact
match of the greedy continuation, each with the model's own tokenizer. Every number gets a paired
bootstrap confidence interval over examples (`stats.py`): sequences for the losses, questions /
prompts for the accuracies. Then the gate (`gate.decide`) turns the point estimates into a verdict
with reasons that quote the intervals, and `eval.json` (the typed `result.EvalResult`) and
`report.html` are written. A failed gate is a result, not an exception. Optional
lm-evaluation-harness tasks (`evaluation.lm_eval_tasks`, `lm_eval_backend.py`) are reported beside
them, not gated.

It runs in three phases, each handing the next a typed value:

1. **prepare** (`Prepared`): everything is read, validated, tokenised and batched once, before any
   model is loaded (a bad task file fails in seconds, not after the first model scored): the loss
   sets become length-sorted batches with their trailing padding cut, the multiple-choice requests
   and the generation prompts become padded batches (once for both models when base and tuned share
   a tokenizer, which fine-tuning normally keeps; per model otherwise). Each set or task is an
   `tasks.EvalTask`.
2. **score** (`Scored`):

   - when both models fit in memory at once (`_fit_together`: on a GPU the weights of both within the
     free memory less a headroom for activations; on the CPU within half the available RAM), both are
     loaded and every batch is moved to the device once and scored by base and tuned in turn;
   - otherwise — and always with `device_map: auto`, where each model is meant to take every GPU of
     the node — one model at a time: the base model scores every cached batch, is released, then the
     tuned model scores the same cached batches. Data preparation is still done once; what is paid
     twice is only the host-to-device copy of each batch.

   Both ways run the same operations per model in the same order, so they give identical numbers.
3. **summarise** (`EvalResult`): each task's bootstrap intervals and section, the gate's verdict.

**Placement.** `evaluation.device_map: single` (default) puts each model whole on the first CUDA
device in bfloat16 (else the CPU in float32). `auto` loads each model with accelerate's
`device_map="auto"`, spreading a model too large for one GPU over all GPUs of the node; without a
CUDA GPU it falls back to `single` and says so in the log.

Scoring runs under `torch.inference_mode`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fulltune
from fulltune import storage
from fulltune.config import EvaluationSection, RunConfig
from fulltune.evaluate import generation as gen_tasks
from fulltune.evaluate import lm_eval_backend
from fulltune.evaluate import mc as mc_tasks
from fulltune.evaluate.champion import ChampionRef
from fulltune.evaluate.eval_page import render_report
from fulltune.evaluate.gate import Check, Verdict, champion_check, champion_general_check, decide
from fulltune.evaluate.loss import LossSet
from fulltune.evaluate.result import (
    CHAMPION,
    CHAMPION_FORGETTING,
    CHAMPION_IMPROVEMENT,
    DOMAIN,
    DOMAIN_LOSS_IMPROVEMENT,
    FORGETTING,
    GENERAL,
    ROLES,
    BootstrapSettings,
    Champion,
    ConfidenceInterval,
    EvalResult,
    GateCheck,
    GenerationSection,
    LossFigures,
    LossSetSection,
    MCSection,
    Scoring,
    ScoringPass,
    Section,
    Thresholds,
)
from fulltune.evaluate.tasks import EvalTask, EvaluateError, Pair, Tokenizers
from fulltune.layout import EVAL_FILE, EVAL_REPORT_FILE
from fulltune.model_identity import manifest_sha256
from fulltune.preprocess.dataset import DatasetManifest, load_manifest, load_split
from fulltune.report_kit import format_bytes

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_GIB = 1 << 30


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
    where = f"{format_bytes(weights)} of weights, {format_bytes(budget)} to spare on {device.type}"
    if weights <= budget:
        return True, where
    return False, where


# -- evaluate_models -----------------------------------------------------------------------------------


def evaluate_models(
    cfg: RunConfig,
    base_model_uri: str,
    tuned_model_uri: str,
    dataset_manifest: str | dict[str, Any],
    out_dir: Path,
    *,
    models_together: bool | None = None,
    champion: ChampionRef | None = None,
) -> EvalResult:
    """Score the base and the tuned model (and the champion), apply the gate, write `eval.json` and
    `report.html`.

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
        champion: What `evaluation.compare_to` resolved to (`steps.evaluate`): with a promoted
            version, it scores the loss sets over the same batches, in the same pass when the models
            fit together, and the gate adds the champion check.

    Returns:
        What was written to `eval.json`: the verdict and its checks, each set's and task's figures,
        the intervals, and the flat KFP metrics (`kfp_metrics()`).
    """
    lm_eval_backend.require(cfg.evaluation.lm_eval_tasks)  # a configured backend that is missing fails first
    uris = Pair(base_model_uri, tuned_model_uri)
    prepared = prepare(cfg, uris, dataset_manifest)
    champion_uri = champion.uri if champion and not champion.refused else None
    scored = score(cfg, uris, prepared, models_together=models_together, champion_uri=champion_uri)
    result = summarise(cfg, uris, dataset_manifest, scored, champion)
    _write_outputs(result, Path(out_dir))
    return result


# -- 1. prepare -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """Every set and task read, checked, tokenised and batched; the models' configs (not their weights)."""

    configs: Pair[Any]
    tasks: list[EvalTask[Any]]  # loss sets, then multiple-choice tasks, then generation tasks


def prepare(cfg: RunConfig, uris: Pair[str], dataset_manifest: str | dict[str, Any]) -> Prepared:
    """Read, validate, tokenise and batch every set and task once, before any model is loaded."""
    ev = cfg.evaluation
    limit, batch_size = ev.max_eval_sequences, ev.per_device_eval_batch_size
    splits = _read_splits(load_manifest(dataset_manifest), limit, cfg.preprocess.documents_alone)
    questions, examples = load_tasks(ev)

    tasks: list[EvalTask[Any]] = [
        LossSet.prepare(name, data, batch_size=batch_size) for name, data in splits.items()
    ]
    configs = uris.map(lambda uri: _load_config(cfg, uri))
    if questions or examples:
        tokenizers = Tokenizers(uris.map(lambda uri: load_tokenizer(cfg, uri)), configs)
        tasks += [mc_tasks.MCTask.prepare(n, q, tokenizers, batch_size=batch_size) for n, q in questions]
        tasks += [
            gen_tasks.ExactMatchTask.prepare(task, ex, tokenizers, batch_size=batch_size)
            for task, ex in examples
        ]
    return Prepared(configs, tasks)


def _read_splits(
    manifest: DatasetManifest, limit: int, positions: bool
) -> dict[str, dict[str, torch.Tensor]]:
    """`domain_eval` and, when the dataset has one, `general_eval`: at most `limit` sequences each,
    with the position ids when each packed document is scored on its own, as training saw it."""
    names = [DOMAIN] + ([GENERAL] if GENERAL in manifest.splits else [])
    splits = {name: load_split(manifest, name, limit=limit, positions=positions) for name in names}
    for name, split in splits.items():
        if split["input_ids"].shape[0] == 0:
            raise EvaluateError(f"the {name} split has no sequences")
    return splits


def load_tasks(ev: EvaluationSection) -> tuple[list[tuple[str, list[Any]]], list[tuple[Any, list[Any]]]]:
    """(name, questions) of every multiple-choice task and (task, examples) of every generation task:
    every line checked, at most `max_eval_sequences` of each kept."""
    _check_task_names(ev)
    questions = [(task.name, _load_task("mc_tasks", task, ev)) for task in ev.mc_tasks]
    examples = [(task, _load_task("generation_tasks", task, ev)) for task in ev.generation_tasks]
    return questions, examples


def _load_task(kind: str, task: Any, ev: EvaluationSection) -> list[Any]:
    """One task file of `evaluation.<kind>`, read as its kind's loader reads it."""
    limit = ev.max_eval_sequences
    if kind == "mc_tasks":
        return mc_tasks.load_task(task.uri, limit=limit)
    return gen_tasks.load_task(task.uri, limit=limit, stop=task.stop)


def task_file_problems(ev: EvaluationSection) -> list[str]:
    """What evaluate would refuse in the task files, found before training rather than after it:
    each problem names the task's field and the file (and line)."""
    problems = []
    for kind, tasks in (("mc_tasks", ev.mc_tasks), ("generation_tasks", ev.generation_tasks)):
        for i, task in enumerate(tasks):
            try:
                _load_task(kind, task, ev)
            except FileNotFoundError:
                problems.append(f"evaluation.{kind}[{i}].uri: {task.uri}: no such file")
            except ValueError as exc:  # MCTaskError, GenerationTaskError: file and line named
                problems.append(f"evaluation.{kind}[{i}] ({task.name}): {exc}")
    try:
        _check_task_names(ev)
    except EvaluateError as exc:
        problems.append(str(exc))
    return problems


def _check_task_names(ev: EvaluationSection) -> None:
    """Task names become metric names: two tasks of a kind may not share one."""
    for kind, tasks in (("mc_tasks", ev.mc_tasks), ("generation_tasks", ev.generation_tasks)):
        names = [task.name for task in tasks]
        if len(set(names)) != len(names):
            raise EvaluateError(f"evaluation.{kind}: task names must be unique (got {names})")


# -- 2. score -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where the models go and whether both are held at once (see the module docstring)."""

    device: torch.device
    dtype: torch.dtype
    device_map: str | None
    together: bool
    why: str

    def groups(self, roles: tuple[str, ...]) -> list[tuple[str, ...]]:
        """The roles loaded at the same time, in scoring order."""
        return [roles] if self.together else [(role,) for role in roles]

    @property
    def device_label(self) -> str:
        return f"{self.device.type} ({str(self.dtype).removeprefix('torch.')})"

    def scoring(self, passes: list[ScoringPass]) -> Scoring:
        return Scoring(
            device_map=self.device_map or "single", models_together=self.together, why=self.why, passes=passes
        )


@dataclass(frozen=True)
class ScoredTask:
    task: EvalTask[Any]
    scores: Pair[Any]
    champion: Any = None  # the champion's scores (loss sets only)


@dataclass(frozen=True)
class Scored:
    """Every prepared task scored by both models, where that happened, and lm-eval's own results."""

    placement: Placement
    tasks: list[ScoredTask]
    lm_eval: dict[str, dict[str, Any]]  # role -> the harness's `results` (empty without lm_eval_tasks)
    passes: list[ScoringPass]


def score(
    cfg: RunConfig,
    uris: Pair[str],
    prepared: Prepared,
    *,
    models_together: bool | None = None,
    champion_uri: str | None = None,
) -> Scored:
    """Load the models, all together or one at a time, and score every prepared task in one pass.
    A champion (`champion_uri`) scores the loss sets only: the check it feeds is on the domain loss."""
    by_role = dict(uris.items())
    configs = dict(prepared.configs.items())
    if champion_uri:
        by_role[CHAMPION] = champion_uri
        configs[CHAMPION] = _load_config(cfg, champion_uri)
    where = _place(cfg, configs, models_together)
    per_task: list[dict[str, Any]] = [{} for _ in prepared.tasks]  # role -> scores, filled group by group
    passes = []
    for group in where.groups(tuple(by_role)):
        started = time.monotonic()
        with _loaded(cfg, by_role, group, where) as models:
            for task, scores in zip(prepared.tasks, per_task, strict=True):
                usable = (
                    models if isinstance(task, LossSet) else {r: m for r, m in models.items() if r in ROLES}
                )
                if usable:
                    scores.update(task.score(usable))
        passes.append(ScoringPass(roles=list(group), seconds=round(time.monotonic() - started, 3)))
    lm_eval = lm_eval_backend.run(
        cfg, dict(uris.items()), device=where.device, dtype=where.dtype, device_map=where.device_map
    )
    tasks = [
        ScoredTask(task, Pair.of(scores), scores.get(CHAMPION))
        for task, scores in zip(prepared.tasks, per_task, strict=True)
    ]
    return Scored(where, tasks, lm_eval, passes)


def _place(cfg: RunConfig, configs: dict[str, Any], models_together: bool | None) -> Placement:
    device, dtype, device_map = placement(cfg)
    together, why = _fit_together(configs, device, dtype, device_map)
    if models_together is not None:
        together, why = models_together, "as asked by the caller"
    if together:
        log.info("scoring %s together, one pass over the batches (%s)", " and ".join(configs), why)
    else:
        log.info("scoring one model at a time over batches prepared once (%s)", why)
    return Placement(device, dtype, device_map, together, why)


@contextmanager
def _loaded(
    cfg: RunConfig, uris: Mapping[str, str], roles: tuple[str, ...], where: Placement
) -> Iterator[dict[str, Any]]:
    """The models of `roles`, loaded together and released together."""
    with ExitStack() as stack:
        yield {
            role: stack.enter_context(
                load_model(cfg, uris[role], where.device, where.dtype, device_map=where.device_map)
            )
            for role in roles
        }


# -- 3. summarise ---------------------------------------------------------------------------------------


def summarise(
    cfg: RunConfig,
    uris: Pair[str],
    dataset_manifest: str | dict[str, Any],
    scored: Scored,
    champion: ChampionRef | None = None,
) -> EvalResult:
    """Each task's bootstrap intervals and section of the result, and the gate's verdict on them."""
    ev = cfg.evaluation
    boot = BootstrapSettings(
        resamples=ev.bootstrap_resamples, seed=ev.bootstrap_seed, level=ev.confidence_level
    )
    intervals: dict[str, ConfidenceInterval] = {}
    sections: list[tuple[str, Section]] = []
    for item in scored.tasks:
        got = item.task.intervals(item.scores, boot)
        intervals.update({key: ConfidenceInterval(**interval._asdict()) for key, interval in got.items()})
        sections.append((item.task.name, item.task.section(item.scores, got)))
    sets = {name: s for name, s in sections if isinstance(s, LossSetSection)}
    mc = {name: s for name, s in sections if isinstance(s, MCSection)}
    generation = {name: s for name, s in sections if isinstance(s, GenerationSection)}
    verdict = _verdict(sets, mc, generation, intervals, ev)
    against = _against_champion(champion, scored, boot, ev)
    if against is not None:
        intervals.update(against.intervals)
        checks = (*verdict.checks, *against.checks)
        verdict = Verdict(all(check.passed for check in checks), checks)
    return EvalResult(
        base_model_uri=uris.base,
        tuned_model_uri=uris.tuned,
        tuned_model_manifest_sha256=manifest_sha256(uris.tuned),
        dataset_manifest=dataset_manifest if isinstance(dataset_manifest, str) else None,
        sets=sets,
        mc=mc,
        generation=generation,
        lm_eval=lm_eval_backend.merge(scored.lm_eval, ev.lm_eval_tasks),
        confidence_intervals=intervals,
        bootstrap=boot,
        checks=[GateCheck(**check._asdict()) for check in verdict.checks],
        thresholds=Thresholds(
            min_domain_loss_improvement=ev.min_domain_loss_improvement,
            max_general_ppl_increase=ev.max_general_ppl_increase,
            max_mc_accuracy_drop=ev.max_mc_accuracy_drop,
            max_exact_match_drop=ev.max_exact_match_drop,
            max_domain_loss_regression=ev.max_domain_loss_regression if against else None,
            max_general_ppl_regression=ev.max_general_ppl_regression if against else None,
        ),
        device=scored.placement.device_label,
        scoring=scored.placement.scoring(scored.passes),
        champion=against.section if against else None,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        fulltune_version=fulltune.__version__,
    )


@dataclass(frozen=True)
class AgainstChampion:
    section: Champion
    checks: tuple[Check, ...]
    intervals: dict[str, ConfidenceInterval]


# The interval (of champion vs candidate, as `LossSet.intervals` names it for base vs tuned) each
# champion check quotes, under the name eval.json and KFP Metrics give it.
_CHAMPION_INTERVALS = {
    DOMAIN: (DOMAIN_LOSS_IMPROVEMENT, CHAMPION_IMPROVEMENT),
    GENERAL: (FORGETTING, CHAMPION_FORGETTING),
}


def _against_champion(
    champion: ChampionRef | None, scored: Scored, boot: BootstrapSettings, ev: EvaluationSection
) -> AgainstChampion | None:
    """The champion's figures, the intervals of the candidate's change over it, and the gate's checks:
    on the domain loss and, with a general set, on the general perplexity. With compare_to registered
    and nothing promoted yet, a passing check saying so."""
    if champion is None:
        return None
    section = Champion(
        compare_to=champion.compare_to, version=champion.version, model_uri=champion.uri, note=champion.note
    )
    if champion.version is None:
        return AgainstChampion(section, (Check("champion", True, champion.note),), {})
    if champion.refused:
        return AgainstChampion(section, (Check("champion", False, champion.refused),), {})
    intervals: dict[str, ConfidenceInterval] = {}
    tuned: dict[str, LossFigures] = {}
    for item in scored.tasks:
        if item.champion is None:
            continue
        name, candidate = item.task.name, item.scores.tuned
        section.sets[name] = LossFigures(loss=item.champion.loss, perplexity=item.champion.perplexity)
        tuned[name] = LossFigures(loss=candidate.loss, perplexity=candidate.perplexity)
        if name in _CHAMPION_INTERVALS:
            relative, key = _CHAMPION_INTERVALS[name]
            got = item.task.intervals(Pair(item.champion, candidate), boot)
            intervals[key] = ConfidenceInterval(**got[relative]._asdict())
    version, level = champion.version, boot.level
    checks = [
        champion_check(
            section.sets[DOMAIN].loss,
            tuned[DOMAIN].loss,
            ev.max_domain_loss_regression,
            version,
            intervals[CHAMPION_IMPROVEMENT].bounds,
            level,
        )
    ]
    if GENERAL in section.sets:
        checks.append(
            champion_general_check(
                section.sets[GENERAL].perplexity,
                tuned[GENERAL].perplexity,
                ev.max_general_ppl_regression,
                version,
                intervals[CHAMPION_FORGETTING].bounds,
                level,
            )
        )
    return AgainstChampion(section, tuple(checks), intervals)


def _verdict(
    sets: dict[str, LossSetSection],
    mc: dict[str, MCSection],
    generation: dict[str, GenerationSection],
    intervals: dict[str, ConfidenceInterval],
    ev: EvaluationSection,
) -> Verdict:
    """The gate on the point estimates, quoting the intervals."""
    domain, general = sets[DOMAIN], sets.get(GENERAL)
    return decide(
        base_domain_loss=domain.base.loss,
        tuned_domain_loss=domain.tuned.loss,
        base_general_ppl=general.base.perplexity if general else None,
        tuned_general_ppl=general.tuned.perplexity if general else None,
        min_domain_loss_improvement=ev.min_domain_loss_improvement,
        max_general_ppl_increase=ev.max_general_ppl_increase,
        domain_ci=intervals[DOMAIN_LOSS_IMPROVEMENT].bounds,
        forgetting_ci=intervals[FORGETTING].bounds if general else None,
        mc=[section.comparison(name, intervals) for name, section in mc.items()],
        max_mc_accuracy_drop=ev.max_mc_accuracy_drop,
        generation=[section.comparison(name, intervals) for name, section in generation.items()],
        max_exact_match_drop=ev.max_exact_match_drop,
        ci_level=ev.confidence_level,
    )


def _write_outputs(result: EvalResult, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    result.write(str(out_dir / EVAL_FILE))
    storage.write_text(str(out_dir / EVAL_REPORT_FILE), render_report(result))
    log.info("gate %s: %s", "passed" if result.verdict else "failed", "; ".join(result.reasons))
