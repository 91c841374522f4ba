"""The training entry point every rank runs: `python -m fulltune.train` (under torchrun locally, in
every pod of the PyTorchJob on a cluster).

    main:  setup -> train -> save -> cleanup

setup    checks the config, joins the process group, reads the dataset, loads the model under
         ZeRO-3 into a DeepSpeed engine (engine.py), sizes the run (schedule.py) and resumes from
         the newest complete checkpoint when there is one.
train    the loop: one optimizer step per iteration over the global batch (loss.py), then what the
         `Cadence` (cadence.py) says this step also does: evaluate, save a checkpoint, log, stop
         early. Each step leaves a `StepRecord` (metrics.py) and is handed to the step-end callbacks.
save     one consolidated Hugging Face model (safetensors) + tokenizer + the resolved config + the
         run's summary, with `model_manifest.json` (files, sizes, SHA-256) written last as the
         completeness marker; then the metrics file (JSON lines, one record per step).
cleanup  releases ZeRO-3's load-time config and waits for every rank.

Where each part's design is written down:
- data order, which depends only on (seed, step), and the learning-rate schedule: schedule.py
- the loss, a token mean over the whole global batch, and evaluation: loss.py
- ZeRO-3 at load time, precision (`cfg.precision`), the optimizers: engine.py
- when to evaluate, checkpoint, log and stop early: cadence.py
- checkpoints that count only when complete; a (re)started run resumes from the newest complete one
  and refuses to start over when saved checkpoints exist but none is usable: checkpoint.py
- model FLOPs utilisation: throughput.py
- the command line, shared with the launchers: args.py
- exit codes (0 done; 1 bad input, permanent; 2 a bug, permanent; 138 retryable, the restarted job
  resumes): exit_codes.py

Step-end callbacks (`main(step_end=...)`) run on every rank after each step, once the step's
checkpoint (if any) is complete and its line logged: where `training.report_to`'s trackers
(tracking.py) write, and how the resume tests kill a rank (tests/support/faulty_trainer.py).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fulltune import disk, storage
from fulltune.config import RunConfig
from fulltune.model_identity import MODEL_MANIFEST
from fulltune.train import checkpoint, liger, recompute
from fulltune.train.args import TrainerArgs
from fulltune.train.cadence import Cadence
from fulltune.train.engine import (
    build_engine,
    build_scoring_engine,
    hpz_groups,
    init_distributed,
    leaf_modules,
    load_model,
    read_deepspeed_config,
)
from fulltune.train.exit_codes import TrainInputError, log_failure
from fulltune.train.loss import (
    EVAL_SPLIT,
    check_eval_split,
    eval_loss,
    loss_tokens_per_sequence,
    train_step,
)
from fulltune.train.metrics import (
    StepRecord,
    TrainingSummary,
    gpu_memory_gib,
    refuse_divergence,
    step_line,
    training_summary,
)
from fulltune.train.schedule import (
    batch_indices,
    follow_lr_schedule,
    lr_lambda,
    make_schedule,
    rank_micro_batches,
)
from fulltune.train.throughput import MfuMeter, parameter_count
from fulltune.train.tracking import build_trackers

if TYPE_CHECKING:
    from fulltune.preprocess.dataset import DatasetManifest

log = logging.getLogger("fulltune.train")

StepEnd = Callable[[int, int, StepRecord], None]
"""A step-end callback: (optimizer steps done, this process's rank, the step's record)."""


def main(argv: list[str] | None = None, step_end: Sequence[StepEnd] = ()) -> int:
    """Train on this rank; returns the process exit code (see exit_codes.py)."""
    # torch.distributed deprecation notices fire on every collective DeepSpeed issues; they drown the log.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    logging.basicConfig(
        level=logging.INFO,
        format=f"[rank{os.environ.get('RANK', '0')}] %(asctime)s %(name)s %(levelname)s %(message)s",
    )
    args = TrainerArgs.from_argv(argv)
    # Before the first CUDA allocation: the caching allocator with expandable segments left at most
    # ~20% of the allocated peak unused where the default left up to 45% (benchmarks/plan_memory.py);
    # plan's estimate assumes it. A value the user set wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    recipe = None
    try:
        cfg = load_config(args.config)
        if finished_by_this_run(cfg, args):  # ranks restarted after the model was saved: done
            return 0
        recipe = Recipe(cfg, args, step_end)
        recipe.setup()
        recipe.train()
        recipe.save()
        recipe.cleanup()
    except Exception as exc:  # noqa: BLE001 - every failure leaves with the exit code that says what to do
        if recipe is not None:
            recipe.close_trackers(failed=True)
        return log_failure(exc)
    return 0


def load_config(uri: str) -> RunConfig:
    import yaml

    return RunConfig.from_dict(yaml.safe_load(storage.read_text(uri)) or {}, source=uri)


class Recipe:
    """One rank's training run: `setup`, `train`, `save`, `cleanup`, each called once, in that order."""

    def __init__(self, cfg: RunConfig, args: TrainerArgs, step_end: Sequence[StepEnd] = ()):
        self.cfg, self.args, self.step_end = cfg, args, tuple(step_end)
        self.trackers: list = []
        self.summary: TrainingSummary | None = None

    # -- setup ------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything before the first step. Input that cannot work fails here, before any training."""
        import torch

        from fulltune.plan import check_training
        from fulltune.preprocess.dataset import TRAIN, load_manifest, load_split

        tr = self.cfg.training
        check_training(self.cfg)
        check_image(self.cfg)
        if tr.eval_steps:
            check_eval_split(self.args.dataset)  # before any rendezvous
        torch.manual_seed(tr.seed)
        self.ranks = init_distributed(self.cfg)
        self._log_process_group()
        ds_config = read_deepspeed_config(self.args.deepspeed, self.cfg, self.ranks)
        dataset = load_manifest(self.args.dataset)
        self.identity = checkpoint.run_identity(self.cfg, dataset)
        alone = self.cfg.preprocess.documents_alone
        self.data = load_split(dataset, TRAIN, positions=alone)
        self.num_sequences, seq_len = self.data["input_ids"].shape
        self.loss_tokens = loss_tokens_per_sequence(self.data["labels"])
        self.sched = make_schedule(self.cfg, self.num_sequences, self.ranks.world)
        self.eval_data = load_split(dataset, EVAL_SPLIT, positions=alone) if tr.eval_steps else None
        self.general_data = self._general_split(dataset) if tr.eval_steps else None
        self.original_general_loss = self._original_general_loss(ds_config)
        self._log("loaded %d training sequences; loading the model under ZeRO-3", self.num_sequences)
        with storage.local_dir(self.cfg.model.base_model_uri) as model_dir:
            model, self._ds_marker = load_model(self.cfg, ds_config, model_dir)
        lr_factor = lr_lambda(tr.lr_scheduler_type, self.sched.warmup_steps, self.sched.total_steps)
        self.engine, self.scheduler = build_engine(model, self.cfg, ds_config, lr_factor)
        self.mfu = MfuMeter.for_run(
            self.engine.module, self.ranks, self.cfg.precision, self.sched.global_batch, seq_len
        )
        params = parameter_count(self.engine.module)
        self.checkpoint_bytes = disk.checkpoint_bytes_in(self.cfg, params, self.args.checkpoints or "")
        self._log_plan(seq_len)
        state = self._resume()
        self.first_step = int(state.get("step", 0))
        self.records = [StepRecord.from_json(r) for r in state.get("records", [])]
        self.seconds_before = float(state.get("train_seconds", 0.0))
        self.base_general_loss = self._base_general_loss(state)
        self.cadence = Cadence.for_run(
            tr,
            self.sched.total_steps,
            checkpoints=bool(self.args.checkpoints),
            max_forgetting=self.cfg.evaluation.max_general_ppl_increase,
            history=self.records,
        )
        self.trackers = build_trackers(
            self.cfg, self.ranks.rank, self.sched.total_steps, self.first_step, self.records
        )
        self.step_end = (*self.step_end, *self.trackers)  # training.report_to: rank 0's trackers

    def _log(self, msg: str, *args: Any) -> None:
        """Log once for the whole group (on rank 0)."""
        if self.ranks.rank == 0:
            log.info(msg, *args)

    def _log_process_group(self) -> None:
        cpu = self.ranks.device.type == "cpu"
        self._log("process group ready: %d ranks (%s)", self.ranks.world, "gloo" if cpu else "nccl")
        tr = self.cfg.training
        if self.cfg.precision == "fp32" and (tr.bf16 or tr.fp16):  # a 16-bit flag on the CPU
            flag = "bf16" if tr.bf16 else "fp16"
            self._log("accelerator is cpu: training.%s ignored, training in float32", flag)

    def _log_plan(self, seq_len: int) -> None:
        tr, sched = self.cfg.training, self.sched
        leaves = leaf_modules(self.engine.module)
        self._log(
            "ZeRO-3 gathers %s",
            ", ".join(f"{n} x {name}" for name, n in leaves.items()) + " as one unit each"
            if leaves
            else "parameters module by module (no leaf modules)",
        )
        if copy_over := hpz_groups(self.engine.module):
            self._log(
                "ZeRO++ hierarchical partitioning: a copy of the parameters over each node's %d ranks",
                copy_over,
            )
        if recomputation := recompute.current(self.engine.module):
            self._log("%s", recomputation.describe())
        if tr.use_liger_kernel:
            self._log("%s", liger.summary(self.engine.module.config.model_type))
        evaluating = (
            f"; evaluating on {self.eval_data['input_ids'].shape[0]} {EVAL_SPLIT} sequences every "
            f"{tr.eval_steps} steps"
            if self.eval_data is not None
            else ""
        )
        self._log(
            "training %d steps (%.1f per epoch, global batch %d sequences of %d tokens, %d ranks, %s)%s",
            sched.total_steps,
            sched.steps_per_epoch,
            sched.global_batch,
            seq_len,
            self.ranks.world,
            tr.optim,
            evaluating,
        )

    def _general_split(self, manifest: DatasetManifest) -> dict[str, Any] | None:
        """The sequences of the general_eval split `evaluate` measures forgetting on (the same first
        `evaluation.max_eval_sequences`); None when the dataset has none."""
        from fulltune.preprocess.dataset import GENERAL_EVAL, load_split

        if not manifest.sequences(GENERAL_EVAL):
            return None
        limit, alone = self.cfg.evaluation.max_eval_sequences, self.cfg.preprocess.documents_alone
        return load_split(manifest, GENERAL_EVAL, limit=limit, positions=alone)

    def _resume(self) -> dict[str, Any]:
        """The state saved with the newest complete checkpoint, once loaded into the engine ({} when
        there is none: step 0). Rank 0 decides (verifying checksums once) and tells the others, so
        every rank loads the same tag."""
        self.resumed_from: str | None = None
        root = self.args.checkpoints
        if not root:
            return {}
        tag = self._agree_on_checkpoint(lambda: self._resumable(root))
        if tag is None:
            return {}
        state = checkpoint.load(self.engine, root, tag, local_rank=self.ranks.local_rank)
        follow_lr_schedule(self.scheduler)  # this run's schedule, which another length changes
        self.resumed_from = storage.join(root, tag)
        self._log(
            "resumed from %s at step %d (%.3f s of training before)",
            self.resumed_from,
            state["step"],
            float(state.get("train_seconds", 0.0)),
        )
        return state

    def _resumable(self, root: str) -> str | None:
        """The newest complete checkpoint, once it is known to come from a run like this one."""
        tag = checkpoint.find_resume(root)
        if tag is None:
            return None
        length = checkpoint.check_continues(root, tag, self.identity)
        checkpoint.check_not_past(root, tag, self.sched.total_steps)
        if length:
            self._log(
                "resuming with another length (%s): the schedule follows it from here", "; ".join(length)
            )
        return tag

    def _agree_on_checkpoint(self, choose: Callable[[], str | None]) -> str | None:
        """The checkpoint tag `choose` picks on rank 0, broadcast to every rank (its CheckpointError
        raised on every rank)."""
        import torch.distributed as dist

        decision: list[Any] = [None, None]
        if self.ranks.rank == 0:
            try:
                decision[0] = choose()
            except checkpoint.CheckpointError as exc:
                decision[1] = str(exc)
        dist.broadcast_object_list(decision, src=0)
        tag, error = decision
        if error:
            raise checkpoint.CheckpointError(error)
        return tag

    def _original_general_loss(self, ds_config: dict[str, Any]) -> float | None:
        """The original pre-trained model's loss on the general split, when training starts from a
        registered version of it (model.original_base_model_uri): the gate measures forgetting
        against the original, so the figure watched while training must too. Measured before the
        training model is loaded, while its memory is free, and only on a fresh start: a resumed
        run's checkpoint carries the figure."""
        model = self.cfg.model
        if self.general_data is None or model.original_model_uri == model.base_model_uri:
            return None
        if self.args.checkpoints and checkpoint.newest_saved(self.args.checkpoints):
            return None
        with storage.local_dir(model.original_model_uri) as model_dir:
            original, marker = load_model(self.cfg, ds_config, model_dir)
        engine = build_scoring_engine(original, ds_config)
        try:
            return self._loss_on(self.general_data, engine)
        finally:
            engine.destroy()
            del engine, original, marker
            gc.collect()  # its partitions go before the model to train is loaded

    def _base_general_loss(self, state: dict[str, Any]) -> float | None:
        """The base model's loss on the general split, that forgetting during training is measured
        against (the original pre-trained model's, when training starts from a registered version):
        computed before the first step, carried by every checkpoint after it."""
        from fulltune.evaluate.gate import forgetting
        from fulltune.evaluate.loss import perplexity

        if self.general_data is None:
            return None
        if not self.first_step:
            loss = self._loss_on(self.general_data)
            n = self.general_data["input_ids"].shape[0]
            if self.original_general_loss is None:
                self._log(
                    "general_eval: the base model's loss is %.4f over %d sequences (forgetting is "
                    "measured against it)",
                    loss,
                    n,
                )
                return loss
            original = self.original_general_loss
            self._log(
                "general_eval: the original base model's loss is %.4f over %d sequences (forgetting is "
                "measured against it, as the gate does); %s starts at %.4f (forgetting %+.1f%%)",
                original,
                n,
                self.cfg.model.base_model_uri,
                loss,
                100 * forgetting(perplexity(original), perplexity(loss)),
            )
            return original
        # None: saved by an attempt that measured nothing (no eval_steps then), as much as absent
        if state.get("base_general_loss") is None:
            self._log(
                "the checkpoint does not carry the base model's general loss: forgetting is not "
                "measured during this attempt"
            )
            return None
        return float(state["base_general_loss"])

    # -- train ------------------------------------------------------------------------------------

    def train(self) -> None:
        """The loop: one optimizer step per iteration; the cadence decides what else each step does."""
        start = self._start = self._last_save = time.time()
        total = self.sched.total_steps
        # from_pretrained returns the model in eval mode, where dropout is off and transformers skips
        # activation recomputation: the memory plan counted on it from the first step
        self.engine.train()
        for step in range(self.first_step, total):
            if self.cadence.should_stop():
                break
            record = self._optimizer_step(step)
            refuse_divergence(record, self.records, loss_scaling=self.cfg.precision == "fp16")
            done = step + 1
            if self.cadence.evaluate_after(done):
                self._evaluate(record)
            self.records.append(record)
            self.cadence.observe(record)
            if self.cadence.checkpoint_after(done, self._minutes_since_save(done)):
                self._save_checkpoint(done)
            if self.cadence.log_after(record):
                eta = (time.time() - start) / (done - self.first_step) * (total - done)
                self._log("%s", step_line(record, total, eta))
            for callback in self.step_end:
                callback(done, self.ranks.rank, record)
            if self.cadence.should_stop():
                self._log("stopping after step %d: %s", done, self.cadence.stop_reason())
                break
        self.train_seconds = self._seconds_so_far()
        self.saved_step = self._roll_back_past_forgetting()

    def _minutes_since_save(self, done: int) -> float:
        """Minutes since the last checkpoint (or this attempt's start) by rank 0's clock, on the steps
        the cadence may save by time: every rank must take the same decision, as each writes its shard
        of the checkpoint. 0 on the other steps, which then cost no collective."""
        if not self.cadence.watches_the_clock(done):
            return 0.0
        import torch
        import torch.distributed as dist

        minutes = torch.tensor(
            [(time.time() - self._last_save) / 60], dtype=torch.float64, device=self.ranks.device
        )
        dist.broadcast(minutes, src=0)
        return float(minutes.item())

    def _seconds_so_far(self) -> float:
        """Training time of this attempt and of the earlier ones up to the checkpoint it resumed from
        (what a failed attempt did after its last checkpoint was lost with it, and is not counted)."""
        return self.seconds_before + time.time() - self._start

    def _optimizer_step(self, step: int) -> StepRecord:
        """Train on global step `step`'s batch; the step's record, without an eval loss."""
        tr, ranks = self.cfg.training, self.ranks
        t0 = time.time()
        idx = batch_indices(step, self.sched, tr.seed, self.num_sequences)
        micro = rank_micro_batches(
            idx,
            rank=ranks.rank,
            world=ranks.world,
            micro_batch=tr.per_device_train_batch_size,
            accumulation=tr.gradient_accumulation_steps,
        )
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
        n_tokens = int(self.loss_tokens[idx].sum())
        loss, n_tokens = train_step(
            self.engine, self.data, micro, n_tokens=n_tokens, world=ranks.world, device=ranks.device
        )
        step_time = time.time() - t0  # train_step waited for the step's device work
        return StepRecord(
            step=step,
            loss=loss,
            lr=lr,
            grad_norm=_float(self.engine.get_global_grad_norm()),
            tokens=int(n_tokens),
            tokens_per_s=n_tokens / max(step_time, 1e-9),
            step_time_s=step_time,
            **gpu_memory_gib(ranks.device),
            mfu=self.mfu(step_time),
        )

    def _evaluate(self, record: StepRecord) -> None:
        """The step's eval loss and, when the base's is known, its general loss and forgetting."""
        from fulltune.evaluate.gate import forgetting
        from fulltune.evaluate.loss import perplexity

        record.eval_loss = self._loss_on(self.eval_data)
        if self.base_general_loss is not None:
            record.general_eval_loss = self._loss_on(self.general_data)
            record.forgetting = forgetting(
                perplexity(self.base_general_loss), perplexity(record.general_eval_loss)
            )

    def _loss_on(self, data: dict[str, Any], engine=None) -> float:
        """The token-mean loss of `engine` (the training engine's by default) on `data`."""
        r = self.ranks
        micro_batch = self.cfg.training.per_device_train_batch_size
        return eval_loss(
            engine or self.engine, data, rank=r.rank, world=r.world, micro_batch=micro_batch, device=r.device
        )

    def _roll_back_past_forgetting(self) -> int | None:
        """After a stop on forgetting: load the newest checkpoint taken on an evaluation within the
        budget and return its step; None (the model stays as of the last step) when none is left."""
        watch = self.cadence.forgetting
        if not watch.triggered:
            return None
        within = {step + 1 for step in watch.within}
        root = self.args.checkpoints
        tag = self._agree_on_checkpoint(lambda: checkpoint.newest_complete(root, within)) if root else None
        if tag is None:
            self._log(
                "no checkpoint of a step within the forgetting budget: saving the model as of step %d",
                self.records[-1].step + 1,
            )
            return None
        checkpoint.load(self.engine, root, tag, local_rank=self.ranks.local_rank)
        step = checkpoint.step_of(tag)
        self._log(
            "rolled back to the checkpoint at step %d, the newest within the forgetting budget "
            "(forgetting %+.1f%%): saving that model",
            step,
            100 * self.records[step - 1].forgetting,
        )
        return step

    def _save_checkpoint(self, done: int) -> None:
        state = {
            "step": done,
            "records": [r.to_json() for r in self.records],
            "train_seconds": self._seconds_so_far(),
            "base_general_loss": self.base_general_loss,
        }
        checkpoint.save(
            self.engine,
            self.args.checkpoints,
            done,
            state,
            identity=self.identity,
            rank=self.ranks.rank,
            local_rank=self.ranks.local_rank,
            keep=self.cfg.training.save_total_limit,
            needed_bytes=self.checkpoint_bytes,
        )
        self._last_save = time.time()

    # -- save and cleanup -------------------------------------------------------------------------

    def save(self) -> None:
        """The final model and the metrics file (every rank takes part in consolidating the model)."""
        measured_forgetting = self.base_general_loss is not None
        self.summary = training_summary(
            self.records,
            planned_steps=self.sched.total_steps,
            global_batch=self.sched.global_batch,
            world=self.ranks.world,
            stopping=self.cadence.early_stopping,
            seconds=self.train_seconds,
            device=self.ranks.device.type,
            stop_reason=self.cadence.stop_reason(),
            saved_step=self.saved_step,
            resumed_from=self.resumed_from,
            resumed_at_step=self.first_step if self.resumed_from else None,
            base_general_loss=self.base_general_loss,
            max_forgetting=self.cfg.evaluation.max_general_ppl_increase if measured_forgetting else None,
        )
        save_model(
            self.engine, self.cfg, self.args, self.ranks.rank, self.records, self.summary, self.identity
        )

    def cleanup(self) -> None:
        import torch.distributed as dist

        self._ds_marker = None  # ZeRO-3's load-time config: no model is built after this
        self.close_trackers()
        dist.barrier()
        # Leaving the process group to interpreter exit let a gloo rank abort in its thread
        # destructors ("terminate called without an active exception") after the model was saved,
        # turning a finished run into exit 138 (seen once in CI); torchtune's recipes end the same way.
        dist.destroy_process_group()

    def close_trackers(self, failed: bool = False) -> None:
        """Hand the trackers the run's final figures (none when it failed) and close them, once."""
        from fulltune.train.metrics import training_metrics

        final = training_metrics(self.records, self.summary) if self.summary and not failed else None
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(final, failed=failed)


def check_image(cfg: RunConfig) -> None:
    """The packages the config asks of this image, checked before any rendezvous: an image without
    them fails here, naming the field, not after every rank loaded the model."""
    import importlib.util

    tr = cfg.training
    if tr.use_liger_kernel:
        try:
            liger.entry_points()
        except ValueError as exc:
            raise TrainInputError(str(exc)) from exc
    if tr.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise TrainInputError(
            "training.attn_implementation is flash_attention_2 but this image has no flash-attn package: "
            "install it, or set sdpa (the default), which runs FlashAttention-2 kernels through PyTorch"
        )


def _float(x: Any) -> float | None:
    if x is None:
        return None
    return float(x.item() if hasattr(x, "item") else x)


def save_model(
    engine,
    cfg: RunConfig,
    args: TrainerArgs,
    rank: int,
    records: list[StepRecord],
    summary: TrainingSummary,
    identity: dict[str, Any],
) -> None:
    """Consolidate the ZeRO-3 partitions (every rank takes part); rank 0 writes the model, its
    manifest last (with the run's `identity`, as checkpoints record it), then the metrics."""
    state_dict = engine._zero3_consolidated_16bit_state_dict()
    if rank != 0:
        return
    from fulltune.hf import load_tokenizer

    size, what = disk.model_bytes(cfg, parameter_count(engine.module)), "the final model"
    with tempfile.TemporaryDirectory(prefix="fulltune-model-") as tmp:
        out = Path(tmp)
        with disk.failing_for_space(out.parent, size, what, disk.temp_dir_fixes(), partial=out):
            engine.module.save_pretrained(out, state_dict=state_dict, max_shard_size="5GB")
            load_tokenizer(cfg.tokenizer_uri, cfg.model.trust_remote_code).save_pretrained(out)
            (out / "fulltune_config.yaml").write_text(cfg.to_yaml())
            (out / "training_summary.json").write_text(json.dumps(summary.to_json(), indent=2))
        files = storage.file_manifest(out)
        # A model saved there before (a finished run continued to train longer) stops counting as
        # complete before any of its files is replaced: a failure mid-copy leaves no manifest over
        # a mix of both models.
        storage.remove(storage.join(args.output, MODEL_MANIFEST))
        storage.remove(args.metrics)
        with disk.failing_for_space(args.output, size, what, disk.WORK_DIR_FIXES, partial=args.output):
            storage.upload_dir(out, args.output)
        manifest = {"files": files, "summary": summary.to_json(), "run": identity}
        storage.write_json(storage.join(args.output, MODEL_MANIFEST), manifest)
    storage.write_text(args.metrics, "".join(json.dumps(r.to_json()) + "\n" for r in records))
    log.info("saved the tuned model to %s", args.output)


def is_complete_model(uri: str) -> bool:
    return storage.exists(storage.join(uri, MODEL_MANIFEST))


def training_finished(model_uri: str, metrics_uri: str) -> bool:
    """The model is complete and its step metrics written: `save_model` writes the metrics last."""
    return is_complete_model(model_uri) and storage.exists(metrics_uri)


def finished_by_this_run(cfg: RunConfig, args: TrainerArgs) -> bool:
    """True when `args.output` holds a complete model that a run of `cfg` on `args.dataset` finished
    before: a step retried after its ranks were done, ranks restarted after the model was saved, a
    resumed local run whose later step failed. It is used as it is rather than trained again. A model
    of another length is trained on (from the newest checkpoint); one of other settings is refused,
    as its checkpoints would be (CheckpointError)."""
    from fulltune.preprocess.dataset import load_manifest

    if not training_finished(args.output, args.metrics):
        return False
    recorded = storage.read_json(storage.join(args.output, MODEL_MANIFEST)).get("run")
    if recorded is None:  # a model written before models recorded their run: trained again
        return False
    identity = checkpoint.run_identity(cfg, load_manifest(args.dataset))
    if checkpoint.check_recorded(recorded, identity, f"{args.output} (this run's model)"):
        return False
    log.info("%s is complete, trained by this run before: not training again", args.output)
    return True
