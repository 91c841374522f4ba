"""The trainer: real DeepSpeed ZeRO-3 over 2 processes on CPU (gloo), checked against plain PyTorch."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from fulltune import storage
from fulltune.config import RunConfig
from fulltune.launch.base import LaunchError, TrainJob
from fulltune.launch.local import LocalLauncher
from fulltune.plan import make_plan, write_plan
from fulltune.preprocess.core import Packed, ParquetSink
from fulltune.preprocess.dataset import IGNORE_INDEX, MANIFEST_FORMAT, load_manifest, load_split
from fulltune.train import exit_codes, throughput
from fulltune.train.args import TrainerArgs
from fulltune.train.cadence import Cadence
from fulltune.train.exit_codes import TrainInputError
from fulltune.train.metrics import StepRecord, TrainingSummary, step_line
from fulltune.train.recipe import MODEL_MANIFEST
from fulltune.train.run import train_job
from fulltune.train.schedule import batch_indices, make_schedule
from tiny_models import tiny_llama_config

SEQ = 64
SUPPORT = Path(__file__).parent / "support"


def tiny_dataset(demo_assets, work: str, n_seq: int, n_eval: int = 0, n_general: int = 0) -> str:
    """n_seq packed sequences of clinical notes, with a masked prompt-like prefix in each; n_eval
    more (other notes, a shorter loss span) as the domain_eval split; n_general of general English
    (the text the base model knows) as the general_eval split."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_assets.base_model_dir))

    def token_stream(uri: str, n: int) -> list[int]:
        texts = [json.loads(line)["text"] for line in open(uri)][: n * 4]
        return [t for text in texts for t in tok(text)["input_ids"] + [tok.eos_token_id]]

    notes = token_stream(demo_assets.train_uri, n_seq + n_eval)
    general = token_stream(demo_assets.general_uri, n_general) if n_general else []
    splits = {}
    for split, ids, lo, n, masked in (
        ("train", notes, 0, n_seq, 5),
        ("domain_eval", notes, n_seq, n_eval, 9),
        ("general_eval", general, 0, n_general, 0),
    ):
        if not n:
            continue
        packed = Packed()
        for i in range(lo, lo + n):
            chunk = ids[i * SEQ : (i + 1) * SEQ]
            labels = [IGNORE_INDEX] * masked + chunk[masked:]  # some positions carry no loss, as prompts do
            packed.add(chunk, labels, SEQ, tok.pad_token_id)
        sink = ParquetSink(storage.join(work, "data", f"{split}-00000.parquet"))
        sink.write(packed)
        splits[split] = {"sequences": n, "files": [sink.close()]}
    manifest = {
        "format": MANIFEST_FORMAT,
        "max_seq_len": SEQ,
        "pad_token_id": tok.pad_token_id,
        "splits": splits,
    }
    uri = storage.join(work, "data", "dataset.json")
    storage.write_json(uri, manifest)
    return uri


def plan_run(
    demo_assets,
    work: str,
    nproc: int = 2,
    evaluation: dict | None = None,
    resources: dict | None = None,
    model: dict | None = None,
    **training,
) -> RunConfig:
    cfg = RunConfig.from_dict(
        {
            "work_dir": work,
            "model": {"base_model_uri": str(demo_assets.base_model_dir), **(model or {})},
            "data": {"train_uri": demo_assets.train_uri, "general_uri": demo_assets.general_uri},
            "preprocess": {"max_seq_len": SEQ},
            "training": {"learning_rate": 1e-3, "num_train_epochs": 1, "bf16": False, **training},
            "resources": {"nproc_per_node": nproc, "accelerator": "cpu", **(resources or {})},
            "evaluation": evaluation or {},
        }
    )
    p = make_plan(cfg, train_tokens=10_000)
    write_plan(p)
    return p.config


def tensorboard_scalars(logdir: str) -> dict[str, list]:
    """Every scalar series in the event files under `logdir`, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def plain_loss(model_dir, dataset_uri, split: str = "train") -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    data = load_split(dataset_uri, split)
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)),
        data["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    ).item()


def _shared_memory() -> set[str]:
    """DeepSpeed's segments in /dev/shm (RAM until removed, whatever the process that made them)."""
    return {p.name for p in Path("/dev/shm").glob("deepspeed*")}


@pytest.mark.slow
def test_zero3_two_ranks_step0_loss_equals_plain_loss_and_model_is_saved(demo_assets, tmp_path, capfd):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = str(tmp_path / "work")
    dataset = tiny_dataset(demo_assets, work, n_seq=8)
    # 2 ranks x micro batch 2 x accumulation 2 = 8: step 0 sees exactly every sequence once
    cfg = plan_run(
        demo_assets,
        work,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        report_to="tensorboard",
    )
    job = train_job(cfg, dataset)
    shared_before = _shared_memory()
    LocalLauncher().run(job)
    # nothing left in RAM after the run: DeepSpeed's shared-memory allreduce is never set up
    assert _shared_memory() - shared_before == set()

    # plan's granularity threshold reached DeepSpeed: each decoder layer is gathered as one unit
    assert "ZeRO-3 gathers 2 x LlamaDecoderLayer as one unit each" in capfd.readouterr().out
    metrics = [json.loads(line) for line in storage.read_text(job.args.metrics).splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    expected = plain_loss(demo_assets.base_model_dir, dataset)
    assert abs(metrics[0]["loss"] - expected) < 1e-3, (metrics[0]["loss"], expected)
    assert metrics[-1]["loss"] < metrics[0]["loss"]  # it learns
    assert all(m["grad_norm"] is not None and m["grad_norm"] > 0 for m in metrics)
    # rank 0's TensorBoard event files, read back with TensorBoard's own reader
    scalars = tensorboard_scalars(cfg.layout.tensorboard)
    assert [(s.step, round(s.value, 5)) for s in scalars["train/loss"]] == [
        (i + 1, round(m["loss"], 5)) for i, m in enumerate(metrics)
    ]
    assert {"train/learning_rate", "train/grad_norm", "train/tokens_per_second"} <= set(scalars)

    manifest = storage.read_json(storage.join(job.args.output, MODEL_MANIFEST))
    for f in manifest["files"]:
        assert storage.sha256_file(f"{job.args.output}/{f['path']}") == f["sha256"]
    tuned = AutoModelForCausalLM.from_pretrained(job.args.output)
    AutoTokenizer.from_pretrained(job.args.output)
    base = AutoModelForCausalLM.from_pretrained(str(demo_assets.base_model_dir))
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert len(changed) == len(base.state_dict())  # full fine-tuning: every tensor moved
    assert tuned.num_parameters() == base.num_parameters()

    # the ranks started again on the finished run (a PyTorchJob restarting them after the model was
    # saved) leave at once: nothing is trained, the model and its metrics are left as they were
    written = {p: p.stat().st_mtime_ns for p in Path(job.args.output).iterdir()}
    metrics_before = storage.read_text(job.args.metrics)
    capfd.readouterr()
    LocalLauncher().run(job)
    out = capfd.readouterr().out
    assert "trained by this run before: not training again" in out
    assert "process group ready" not in out and "step 1/3" not in out
    assert {p: p.stat().st_mtime_ns for p in Path(job.args.output).iterdir()} == written
    assert storage.read_text(job.args.metrics) == metrics_before


@pytest.mark.slow
def test_too_little_data_exits_1_without_retrying(demo_assets, tmp_path):
    work = str(tmp_path / "work")
    dataset = tiny_dataset(demo_assets, work, n_seq=2)
    # one rank: the refusal does not depend on how many there are, and each rank costs its start-up
    cfg = plan_run(demo_assets, work, nproc=1, per_device_train_batch_size=4, max_steps=1)
    with pytest.raises(LaunchError) as exc:
        LocalLauncher().run(train_job(cfg, dataset))
    assert exc.value.exit_code == 1
    assert "fewer than one global batch" in str(exc.value)


def test_a_diverged_run_stops_once_its_updates_are_all_skipped_and_saves_no_model(demo_assets, tmp_path):
    """A rate far too high blows the weights up at the first update: from then on every gradient is
    infinite and DeepSpeed skips every update. Every rank stops three such steps in (exit 1: a restart
    would diverge again), the message quotes the figures that led to it, and no model is written for
    evaluate to pass on."""
    work = str(tmp_path / "work")
    dataset = tiny_dataset(demo_assets, work, n_seq=16)
    cfg = plan_run(
        demo_assets, work, per_device_train_batch_size=1, learning_rate=1e30, max_grad_norm=0.0, max_steps=8
    )
    with pytest.raises(LaunchError) as exc:
        LocalLauncher().run(train_job(cfg, dataset))
    assert exc.value.exit_code == 1
    message = re.search(
        r"training diverged at step (\d): its gradient norm has not been a .*", str(exc.value)
    )
    assert message, str(exc.value)[-3000:]
    assert int(message.group(1)) == 4 and "Stopped without saving a model" in message.group(0)
    assert not storage.exists(storage.join(cfg.layout.model, MODEL_MANIFEST))


def test_the_train_step_refuses_data_it_cannot_use_before_asking_for_a_single_rank(demo_assets, tmp_path):
    """Too few sequences for one global batch, or eval_steps without an eval split: the step says so
    from the dataset manifest, before the launcher starts (on a cluster: before any GPU pod)."""
    from fulltune import failure, steps
    from fulltune.train.run import run_training

    work = str(tmp_path / "work")
    dataset = tiny_dataset(demo_assets, work, n_seq=2)
    cfg = plan_run(demo_assets, work, nproc=2, per_device_train_batch_size=4, max_steps=1)
    with pytest.raises(TrainInputError, match="has 2 sequences, fewer than one global batch of 8"):
        steps.train(cfg, dataset)
    # what `fulltune retry` reads: the step failed on its input, a retry would fail the same way
    [failed] = failure.failures(cfg.layout)
    assert (failed.step, failed.permanent, failed.error) == ("train", True, "TrainInputError")
    assert "fewer than one global batch of 8" in failed.first_line
    evaluating = plan_run(
        demo_assets, work, nproc=1, per_device_train_batch_size=1, max_steps=1, eval_steps=1
    )
    with pytest.raises(
        TrainInputError, match="training.eval_steps is set but the dataset .* has no domain_eval"
    ):
        run_training(evaluating, dataset)
    assert not storage.exists(evaluating.layout.model)  # nothing was launched, nothing written


def test_schedule_and_data_order_depend_only_on_seed_and_step():
    cfg = RunConfig.from_dict(
        {
            "training": {
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 3,
                "num_train_epochs": 2.5,
            }
        }
    )
    sched = make_schedule(cfg, num_sequences=100, world=2)
    assert sched.global_batch == 12 and sched.total_steps == 21  # 250 sequences in whole steps
    a = batch_indices(9, sched, 42, 100)
    assert torch.equal(a, batch_indices(9, sched, 42, 100))
    assert not torch.equal(a, batch_indices(9, sched, 43, 100))
    # every sequence once per epoch, none left out at its end: step 8 ends epoch 0 and starts epoch 1
    stream = torch.cat([batch_indices(s, sched, 42, 100) for s in range(sched.total_steps)])
    assert all(len(b := batch_indices(s, sched, 42, 100)) == 12 for s in range(21)), b
    assert sorted(stream[:100].tolist()) == list(range(100)) == sorted(stream[100:200].tolist())
    assert not torch.equal(stream[:100], stream[100:200])  # each epoch its own order
    with pytest.raises(TrainInputError, match="fewer than one global batch"):
        make_schedule(cfg, num_sequences=5, world=2)


def with_fault(
    job: TrainJob, *, after_step: int, rank: int = 0, once: Path | None = None, max_restarts: int = 0
) -> TrainJob:
    """The same job run by tests/support/faulty_trainer.py: the real trainer, with `rank` SIGKILLed
    once `after_step` optimizer steps are done (with `once`, only on the first attempt)."""
    pythonpath = os.pathsep.join(p for p in (str(SUPPORT), os.environ.get("PYTHONPATH")) if p)
    env = {
        **job.env,
        "PYTHONPATH": pythonpath,
        "FAULTY_TRAINER_KILL_AFTER_STEP": str(after_step),
        "FAULTY_TRAINER_KILL_RANK": str(rank),
        **({"FAULTY_TRAINER_ONCE": str(once)} if once else {}),
    }
    return dataclasses.replace(job, entry_module="faulty_trainer", env=env, max_restarts=max_restarts)


def _final_state(uri: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(uri).state_dict()


@pytest.mark.slow
def test_killed_rank_resumes_from_the_last_complete_checkpoint_and_matches_an_uninterrupted_run(
    demo_assets, tmp_path, mlflow_env
):
    """Also what the killed run reported: TensorBoard and MLflow end with the figures of the
    timeline the model carries, TensorBoard with each step once."""
    from fulltune.train import checkpoint

    runs = {}
    for name in ("straight", "killed"):
        work = str(tmp_path / name)
        dataset = tiny_dataset(demo_assets, work, n_seq=16)
        reporting = {"report_to": ["tensorboard", "mlflow"]} if name == "killed" else {}
        cfg = plan_run(
            demo_assets,
            work,
            per_device_train_batch_size=2,
            max_steps=6,
            save_steps=2,
            save_total_limit=2,
            **reporting,
        )
        runs[name] = (cfg, work, dataset, train_job(cfg, dataset))
    cfg, work, dataset, job = runs["straight"]
    LocalLauncher().run(job)

    cfg, work, dataset, job = runs["killed"]
    out = io.StringIO()
    # rank 1 dies after step 5 on the first attempt (the step-4 checkpoint is newest); the launcher
    # sees a retryable exit and restarts the group, which resumes
    faulty = with_fault(job, after_step=5, rank=1, once=tmp_path / "killed-once", max_restarts=1)
    LocalLauncher(stream=out).run(faulty)
    log = out.getvalue()
    assert f"node exit codes [{exit_codes.EXIT_RETRYABLE}]: retryable; restarting the group (1 of 1)" in log
    resumed = re.search(r"resumed from \S+ at step 4 \(([\d.]+) s of training before\)", log)
    assert resumed and float(resumed.group(1)) > 0
    metrics = [json.loads(line) for line in storage.read_text(job.args.metrics).splitlines()]
    assert [m["step"] for m in metrics] == list(range(6))  # one record per step, none lost or doubled
    assert checkpoint.list_tags(job.args.checkpoints) == ["step-00000004", "step-00000002"]
    # each checkpoint records the run that wrote it, which a resume must match
    saved = storage.read_json(storage.join(job.args.checkpoints, "step-00000004", checkpoint.MANIFEST))
    assert saved["run"] == checkpoint.run_identity(cfg, load_manifest(dataset))
    # the summary counts the first attempt's training up to its last checkpoint too
    summary = storage.read_json(storage.join(job.args.output, "training_summary.json"))
    last_attempt_steps = sum(m["step_time_s"] for m in metrics[4:])
    assert summary["train_seconds"] >= float(resumed.group(1)) + last_attempt_steps - 1e-3
    straight, resumed = _final_state(runs["straight"][3].args.output), _final_state(job.args.output)
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)

    losses = [m["loss"] for m in metrics]
    tensorboard = tensorboard_scalars(cfg.layout.tensorboard)["train/loss"]
    assert [e.step for e in tensorboard] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in tensorboard] == pytest.approx(losses, rel=1e-6)  # float32
    [run] = mlflow_env.search_runs(
        [mlflow_env.get_experiment_by_name(cfg.model.name).experiment_id],
        f"tags.`fulltune.work_dir` = '{work}'",
    )
    assert run.info.status == "FINISHED"
    assert newest_per_step(mlflow_env.get_metric_history(run.info.run_id, "train/loss")) == list(
        zip(range(1, 7), losses, strict=True)
    )


def newest_per_step(history) -> list[tuple[int, float]]:
    """An MLflow metric's history as the run's timeline: a step a restarted attempt ran again has two
    values, and the one logged later is the run's."""
    newest = {}
    for h in sorted(history, key=lambda h: h.timestamp):
        newest[h.step] = h.value
    return sorted(newest.items())


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_and_nothing_usable_refuses(demo_assets, tmp_path):
    from fulltune.train import checkpoint

    work = str(tmp_path / "w")
    dataset = tiny_dataset(demo_assets, work, n_seq=16)
    cfg = plan_run(  # one rank: a checkpoint's checks are per file, whichever rank wrote it
        demo_assets,
        work,
        nproc=1,
        per_device_train_batch_size=2,
        max_steps=5,
        save_steps=2,
        save_total_limit=3,
    )
    job = train_job(cfg, dataset)
    with pytest.raises(LaunchError):
        LocalLauncher().run(with_fault(job, after_step=4))  # rank 0 dies right after the step-4 save
    root = job.args.checkpoints
    newest = sorted((tmp_path / "w" / "train" / "checkpoints" / "step-00000004").rglob("*.pt"))[0]
    newest.write_bytes(newest.read_bytes()[:-10] + b"corrupted!")
    assert checkpoint.verify(root, "step-00000004") and checkpoint.verify(root, "step-00000002") is None
    assert checkpoint.find_resume(root) == "step-00000002"  # with a warning naming the corrupt file

    # A half-written save (no manifest) next to the corrupt one: nothing usable, refuse to start over.
    (tmp_path / "w" / "train" / "checkpoints" / "step-00000002" / checkpoint.MANIFEST).unlink()
    with pytest.raises(LaunchError) as exc:
        LocalLauncher().run(job)
    assert exc.value.exit_code == 1
    assert "none is complete and intact" in str(exc.value)


@pytest.mark.slow
def test_a_checkpoint_resumed_past_as_corrupt_never_pushes_out_the_intact_ones(demo_assets, tmp_path):
    """A run resumed from step 2 past a corrupt step-4 checkpoint saves at other steps (by the clock,
    or another save_steps). Counted among the newest, the corrupt one made rotation delete the intact
    ones, the new save included (save_total_limit 1): the next failure found nothing to resume."""
    from fulltune.train import checkpoint

    work = str(tmp_path / "w")
    dataset = tiny_dataset(demo_assets, work, n_seq=16)
    common = {"nproc": 1, "per_device_train_batch_size": 2, "max_steps": 5}
    job = train_job(plan_run(demo_assets, work, save_steps=2, save_total_limit=3, **common), dataset)
    with pytest.raises(LaunchError):
        LocalLauncher().run(with_fault(job, after_step=4))
    root = job.args.checkpoints
    newest = sorted((tmp_path / "w" / "train" / "checkpoints" / "step-00000004").rglob("*.pt"))[0]
    newest.write_bytes(newest.read_bytes()[:-10] + b"corrupted!")
    resumed = train_job(plan_run(demo_assets, work, save_steps=3, save_total_limit=1, **common), dataset)
    with pytest.raises(LaunchError):
        LocalLauncher().run(with_fault(resumed, after_step=3))  # dies after its step-3 save
    assert checkpoint.list_tags(root) == ["step-00000003"]
    assert checkpoint.find_resume(root) == "step-00000003"


@pytest.mark.slow
def test_a_model_replaced_by_a_longer_run_is_not_complete_while_its_files_are_copied(demo_assets, tmp_path):
    """A finished run continued to train longer writes its model where the first one is. Its rank
    dies once the new files are copied, before their manifest: the old manifest must not stay to
    vouch for a mix of both models."""
    from fulltune.train.recipe import is_complete_model, training_finished

    work = str(tmp_path / "w")
    dataset = tiny_dataset(demo_assets, work, n_seq=8)
    common = {"nproc": 1, "per_device_train_batch_size": 2, "save_steps": 1}
    first = train_job(plan_run(demo_assets, work, max_steps=2, **common), dataset)
    LocalLauncher().run(first)
    assert training_finished(first.args.output, first.args.metrics)
    longer = train_job(plan_run(demo_assets, work, max_steps=3, **common), dataset)
    dying = with_fault(longer, after_step=0)
    dying = dataclasses.replace(dying, env={**dying.env, "FAULTY_TRAINER_KILL_IN_UPLOAD": "1"})
    with pytest.raises(LaunchError):
        LocalLauncher().run(dying)
    assert not is_complete_model(longer.args.output)
    assert not training_finished(longer.args.output, longer.args.metrics)
    LocalLauncher().run(longer)  # the retry trains on from the checkpoint and completes the model
    summary = storage.read_json(storage.join(longer.args.output, MODEL_MANIFEST))["summary"]
    assert summary["steps"] == 3


@pytest.mark.slow
def test_a_run_preempted_during_its_first_checkpoint_save_starts_again_when_restarted(demo_assets, tmp_path):
    """The first save's parts are written, its manifest is not: nothing was saved, so the restart
    trains from step 0 rather than refusing for good (exit 1, which neither the operator nor
    `fulltune retry` would try again)."""
    from fulltune.train import checkpoint

    work = str(tmp_path / "w")
    dataset = tiny_dataset(demo_assets, work, n_seq=16)
    cfg = plan_run(demo_assets, work, nproc=1, per_device_train_batch_size=2, max_steps=4, save_steps=2)
    job = train_job(cfg, dataset)
    with pytest.raises(LaunchError):
        LocalLauncher().run(with_fault(job, after_step=2))
    # as if the rank had died between DeepSpeed's files and the manifest rank 0 writes last
    (tmp_path / "w" / "train" / "checkpoints" / "step-00000002" / checkpoint.MANIFEST).unlink()
    out = io.StringIO()
    LocalLauncher(stream=out).run(job)
    assert (
        "no checkpoint save finished (step-00000002 cut short before its manifest): starting from step 0"
        in out.getvalue()
    )
    metrics = [json.loads(line) for line in storage.read_text(job.args.metrics).splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert "resumed_from" not in storage.read_json(storage.join(job.args.output, "training_summary.json"))
    assert checkpoint.verify(job.args.checkpoints, "step-00000002") is None  # saved again, complete


@pytest.mark.slow
def test_resuming_with_a_length_shorter_than_the_checkpoint_is_refused(demo_assets, tmp_path):
    """A checkpoint at step 4 and max_steps set to 3: no step could train, and the model saved would
    be the 4-step one under a summary of 3 planned. Refused by the train step before any rank starts,
    and by the ranks themselves (exit 1), naming both lengths."""
    from fulltune.train import checkpoint
    from fulltune.train.run import run_training

    work = str(tmp_path / "w")
    dataset = tiny_dataset(demo_assets, work, n_seq=16)
    cfg = plan_run(demo_assets, work, nproc=1, per_device_train_batch_size=2, max_steps=6, save_steps=2)
    with pytest.raises(LaunchError):
        LocalLauncher().run(with_fault(train_job(cfg, dataset), after_step=4))
    cfg = plan_run(demo_assets, work, nproc=1, per_device_train_batch_size=2, max_steps=3, save_steps=2)
    job = train_job(cfg, dataset)
    past = re.escape(f"{job.args.checkpoints}/step-00000004 has trained 4 steps, more than the 3 this run")
    with pytest.raises(checkpoint.CheckpointError, match=past):
        run_training(cfg, dataset)
    with pytest.raises(LaunchError, match=past) as exc:
        LocalLauncher().run(job)
    assert exc.value.exit_code == 1
    assert not storage.exists(job.args.output)


@pytest.mark.slow
def test_a_run_resumed_to_train_longer_follows_the_new_schedule_from_its_first_step(demo_assets, tmp_path):
    """Linear decay over 6 steps, resumed at step 4 as a 12-step run: step 5 trains at the 12-step
    schedule's rate (2/3 of the peak), not at the 6-step one's that the restored scheduler held (1/3)."""
    from fulltune.train.schedule import lr_lambda

    work = str(tmp_path / "w")
    dataset = tiny_dataset(demo_assets, work, n_seq=16)
    linear = {
        "per_device_train_batch_size": 2,
        "save_steps": 2,
        "lr_scheduler_type": "linear",
        "warmup_ratio": 0,
    }
    cfg = plan_run(demo_assets, work, nproc=1, max_steps=6, **linear)
    with pytest.raises(LaunchError):
        LocalLauncher().run(with_fault(train_job(cfg, dataset), after_step=4))
    cfg = plan_run(demo_assets, work, nproc=1, max_steps=12, **linear)
    job = train_job(cfg, dataset)
    LocalLauncher().run(job)
    metrics = [json.loads(line) for line in storage.read_text(job.args.metrics).splitlines()]
    old, new = lr_lambda("linear", 0, 6), lr_lambda("linear", 0, 12)
    assert [m["lr"] for m in metrics] == pytest.approx(
        [1e-3 * old(s) for s in range(4)] + [1e-3 * new(s) for s in range(4, 12)]
    )


@pytest.mark.slow
def test_a_run_resumed_with_evaluation_turned_on_evaluates_without_measuring_forgetting(
    demo_assets, tmp_path, capfd
):
    """The checkpoint was saved without evaluation, so it carries no base model's general loss (None):
    the resumed run evaluates from there and says forgetting is not measured, rather than failing
    with a TypeError (exit 2, 'a bug')."""
    work = str(tmp_path / "w")
    dataset = tiny_dataset(demo_assets, work, n_seq=16, n_eval=4, n_general=4)
    run = {"nproc": 1, "per_device_train_batch_size": 2, "max_steps": 6, "save_steps": 2}
    cfg = plan_run(demo_assets, work, **run)
    with pytest.raises(LaunchError):
        LocalLauncher().run(with_fault(train_job(cfg, dataset), after_step=2))
    cfg = plan_run(demo_assets, work, eval_steps=2, **run)
    job = train_job(cfg, dataset)
    LocalLauncher().run(job)
    assert "the checkpoint does not carry the base model's general loss" in capfd.readouterr().out
    metrics = [json.loads(line) for line in storage.read_text(job.args.metrics).splitlines()]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [3, 5]
    assert not any("forgetting" in m for m in metrics)


@pytest.mark.slow
def test_training_runs_in_train_mode_from_the_first_step(demo_assets, tmp_path, capfd):
    """from_pretrained hands the model over in eval mode, where dropout and activation recomputation
    are off. A base model that asks for dropout gets it from step 0 on, with no evaluation before to
    switch modes: the first step's loss is not the dropout-free loss of the same batch."""
    import shutil

    model_dir = tmp_path / "base-with-dropout"
    shutil.copytree(demo_assets.base_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    assets = dataclasses.replace(demo_assets, base_model_dir=model_dir)
    work = str(tmp_path / "work")
    dataset = tiny_dataset(assets, work, n_seq=8)
    cfg = plan_run(
        assets, work, nproc=1, per_device_train_batch_size=8, max_steps=1, gradient_checkpointing=True
    )
    job = train_job(cfg, dataset)
    LocalLauncher().run(job)
    assert "recomputing the activations of all 2 x LlamaDecoderLayer" in capfd.readouterr().out
    [first] = [json.loads(line) for line in storage.read_text(job.args.metrics).splitlines()]
    without_dropout = plain_loss(model_dir, dataset)  # the whole batch, in eval mode
    assert math.isfinite(first["loss"]) and math.isfinite(first["grad_norm"])
    assert abs(first["loss"] - without_dropout) > 0.01 * without_dropout, (first["loss"], without_dropout)


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_twice_the_micro_batch(demo_assets, tmp_path, capfd):
    """2 ranks x micro batch 2, 1 rank x micro batch 4 and 2 nodes x 2 ranks x micro batch 1 see the
    same global batches: same losses, evaluation losses and gradient norms. All recompute
    activations, each decoder layer a ZeRO-3 leaf gathered again for it: the ranks in every layer
    (full), the one rank in one of its two (selective, the last). The two nodes keep a copy of the
    parameters partitioned over each node's ranks (ZeRO++ hpZ), which the backward gathers from. The
    2 ranks take the loss in chunks of 50 positions (3 per micro batch of 2 x 63), the tied head's
    weight gathered for them and its gradient reduced like any other. That changes memory, compute
    and traffic, not the numbers."""
    metrics = {}
    for name, nodes, nproc, micro, layers, chunk in (
        ("2 ranks", 1, 2, 2, None, 50),
        ("1 rank", 1, 1, 4, 1, 0),
        ("2 nodes", 2, 2, 1, None, 0),
    ):
        work = str(tmp_path / name.replace(" ", "-"))
        dataset = tiny_dataset(demo_assets, work, n_seq=24, n_eval=4)
        cfg = plan_run(
            demo_assets,
            work,
            nproc=nproc,
            resources={"num_nodes": nodes, "launcher": "kubernetes"} if nodes > 1 else None,
            per_device_train_batch_size=micro,
            max_steps=10,
            eval_steps=5,
            gradient_checkpointing=True,
            gradient_checkpointing_layers=layers,
            hierarchical_partitioning=nodes > 1,
            loss_chunk_tokens=chunk,
        )
        assert cfg.training.gradient_checkpointing_layers == (layers or 2)  # plan resolves "all" to 2
        assert cfg.training.loss_chunk_tokens == chunk
        job = train_job(cfg, dataset)
        LocalLauncher().run(job)
        rows = [json.loads(line) for line in storage.read_text(job.args.metrics).splitlines()]
        metrics[name] = {
            key: [r[key] for r in rows if r.get(key) is not None]
            for key in ("loss", "eval_loss", "grad_norm")
        }
        said = "all 2 x LlamaDecoderLayer" if layers is None else "1 of 2 x LlamaDecoderLayer (layers 1)"
        out = capfd.readouterr().out
        assert f"recomputing the activations of {said}" in out
        copied = "ZeRO++ hierarchical partitioning: a copy of the parameters over each node's 2 ranks"
        assert (copied in out) == (nodes > 1)
    one = metrics["1 rank"]
    assert len(one["loss"]) == 10 and len(one["eval_loss"]) == 2 and len(one["grad_norm"]) == 10
    for key in ("loss", "eval_loss", "grad_norm"):
        torch.testing.assert_close(metrics["2 ranks"][key], one[key], rtol=1e-4, atol=1e-4, msg=key)
    torch.testing.assert_close(metrics["2 nodes"]["loss"], one["loss"], rtol=1e-4, atol=1e-4)
    assert one["loss"][-1] < one["loss"][0]


@pytest.mark.slow
def test_adafactor_with_offload_evaluates_each_step_and_stops_early_saving_the_last_model(
    demo_assets, tmp_path
):
    """2 ranks, Adafactor with the optimizer offloaded to CPU, eval every step on 5 sequences (an odd
    count: one rank runs a discarded forward), patience 2 with a threshold no drop can beat."""
    from fulltune.train.train_page import training_report_html

    work = str(tmp_path / "work")
    dataset = tiny_dataset(demo_assets, work, n_seq=16, n_eval=5)
    cfg = plan_run(
        demo_assets,
        work,
        per_device_train_batch_size=2,
        max_steps=8,
        optim="adafactor",
        offload_optimizer=True,
        eval_steps=1,
        early_stopping_patience=2,
        early_stopping_threshold=10.0,
    )
    assert json.loads(open(f"{work}/plan/ds_config.json").read())["zero_optimization"]["offload_optimizer"]
    job = train_job(cfg, dataset)
    LocalLauncher().run(job)

    metrics = [json.loads(line) for line in storage.read_text(job.args.metrics).splitlines()]
    # The first eval sets the best; the next two cannot improve on it by 10: stop after step 3 of 8.
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert all("eval_loss" in m and "mfu" not in m for m in metrics)  # no MFU on CPU
    assert metrics[-1]["loss"] < metrics[0]["loss"]  # Adafactor learns
    # The saved model is the one of the last step, and eval_loss is the token mean over every
    # domain_eval sequence across both ranks: the plain loss of the saved model on that split.
    assert abs(metrics[-1]["eval_loss"] - plain_loss(job.args.output, dataset, "domain_eval")) < 1e-4
    summary = storage.read_json(storage.join(job.args.output, MODEL_MANIFEST))["summary"]
    assert summary["stopped_early"] is True and summary["steps"] == 3 and summary["planned_steps"] == 8
    assert summary["best_eval_step"] == 1 and summary["best_eval_loss"] == metrics[0]["eval_loss"]
    page = training_report_html(
        [StepRecord.from_json(m) for m in metrics], TrainingSummary.from_json(summary)
    )
    # the eval loss is in the table and drawn as its own series, a marker per evaluation
    assert f"{metrics[1]['eval_loss']:.4f}" in page
    eval_series = page.split('<g class="series" data-name="eval loss">', 1)[1].split("</g>", 1)[0]
    assert eval_series.count("<circle") == 3


@pytest.mark.slow
@pytest.mark.parametrize("stop", [True, False], ids=["stop_on_forgetting", "measured_only"])
def test_forgetting_is_measured_while_training_and_stops_the_run_when_asked(
    demo_assets, tmp_path, capfd, request, monkeypatch, stop
):
    """A learning rate far too high for clinical notes wrecks the general English the base model
    knows: its general loss rises at every evaluation (forgetting about +40%, +53%, +65%, ...). With
    stop_on_forgetting and a 60% budget the run stops at step 3, the first evaluation past it, and
    saves the checkpoint of step 2, the newest within it; without, it runs to the end.

    Both report to MLflow: the stopping run to the real server, where TensorBoard's reader and the
    MLflow client read the same figures back; the other to a server that is down, which only warns."""
    if stop:
        client = request.getfixturevalue("mlflow_env")
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    work = str(tmp_path / "work")
    dataset = tiny_dataset(demo_assets, work, n_seq=16, n_eval=4, n_general=6)
    cfg = plan_run(
        demo_assets,
        work,
        evaluation={"max_general_ppl_increase": 0.6},
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
        per_device_train_batch_size=2,
        max_steps=5,
        eval_steps=1,
        # by the clock (every evaluation step is past a microsecond): every rank saves the step rank 0 chose
        save_steps=0,
        save_every_minutes=1e-8 if stop else 0,
        save_total_limit=5,
        stop_on_forgetting=stop,
        report_to=["tensorboard", "mlflow"] if stop else "mlflow",
    )
    job = train_job(cfg, dataset)
    LocalLauncher().run(job)
    log = capfd.readouterr().out

    metrics = [json.loads(line) for line in storage.read_text(job.args.metrics).splitlines()]
    forgetting = [m["forgetting"] for m in metrics]
    assert forgetting == sorted(forgetting) and forgetting[0] > 0.2  # measured at every evaluation, rising
    # against the base model's general loss at step 0: a token mean over both ranks' sequences
    base = plain_loss(demo_assets.base_model_dir, dataset, "general_eval")
    m = metrics[0]
    assert abs(m["forgetting"] - (math.exp(m["general_eval_loss"] - base) - 1)) < 1e-3
    summary = storage.read_json(storage.join(job.args.output, MODEL_MANIFEST))["summary"]
    assert summary["max_forgetting"] == 0.6 and abs(summary["base_general_loss"] - base) < 1e-4
    if not stop:
        assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4] and forgetting[-1] > 0.6
        assert not summary["stopped_early"] and "stop_reason" not in summary and "saved_step" not in summary
        assert "MLflow: cannot reach the run at http://127.0.0.1:" in log  # and the run finished
        return
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert forgetting[1] <= 0.6 < forgetting[2]
    reason = f"at step 3 general perplexity rose {forgetting[2]:.1%} over the base model's, past the 60.0%"
    assert f"stopping after step 3: forgetting: {reason}" in log
    assert "rolled back to the checkpoint at step 2, the newest within the forgetting budget" in log
    assert summary["stopped_early"] and reason in summary["stop_reason"]
    assert summary["saved_step"] == 2 and summary["final_forgetting"] == forgetting[1]
    # the saved model is step 2's: its general loss is the one measured then
    assert abs(plain_loss(job.args.output, dataset, "general_eval") - metrics[1]["general_eval_loss"]) < 1e-4

    steps = [1, 2, 3]  # optimizer steps done, as the log counts them
    scalars = tensorboard_scalars(cfg.layout.tensorboard)
    assert [e.step for e in scalars["eval/forgetting"]] == steps
    assert [e.value for e in scalars["eval/forgetting"]] == pytest.approx(forgetting, rel=1e-6)  # float32
    assert [e.step for e in scalars["eval/general_loss"]] == steps
    experiment = client.get_experiment_by_name(cfg.model.name)
    [run] = client.search_runs([experiment.experiment_id], f"tags.`fulltune.work_dir` = '{work}'")
    assert run.info.status == "FINISHED"
    assert run.data.params["training.stop_on_forgetting"] == "true"
    assert run.data.params["evaluation.max_general_ppl_increase"] == "0.6"
    history = client.get_metric_history(run.info.run_id, "eval/forgetting")
    assert newest_per_step(history) == list(zip(steps, forgetting, strict=True))
    assert [
        step for step, _ in newest_per_step(client.get_metric_history(run.info.run_id, "train/loss"))
    ] == steps
    assert (
        run.data.metrics["train_summary/steps"] == 3 and run.data.metrics["train_summary/stopped_early"] == 1
    )
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "mlflow"))
    assert "stop_on_forgetting: true" in open(config).read()


def test_forgetting_while_training_from_a_registered_version_is_against_the_original_base(
    demo_assets, tmp_path, capfd
):
    """A cycle that continues from a registered version (model.original_base_model_uri set) is gated
    on forgetting against the original pre-trained model, so training measures against it too: the
    original's general loss before the first step, and the version's own starting point beside it."""
    import shutil

    from transformers import AutoModelForCausalLM

    version = tmp_path / "v3"
    model = AutoModelForCausalLM.from_pretrained(str(demo_assets.base_model_dir))
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)  # a version that already forgets some general English
    model.save_pretrained(str(version))
    for f in demo_assets.base_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, version / f.name)
    work = str(tmp_path / "work")
    dataset = tiny_dataset(demo_assets, work, n_seq=8, n_eval=2, n_general=4)
    original_uri = str(demo_assets.base_model_dir)
    cfg = plan_run(
        demo_assets,
        work,
        model={"base_model_uri": str(version), "original_base_model_uri": original_uri},
        per_device_train_batch_size=2,
        max_steps=2,
        eval_steps=1,
    )
    job = train_job(cfg, dataset)
    LocalLauncher().run(job)
    log = capfd.readouterr().out
    original = plain_loss(demo_assets.base_model_dir, dataset, "general_eval")
    start = plain_loss(version, dataset, "general_eval")
    assert start > original + 0.01  # the version itself is already off the original
    summary = storage.read_json(storage.join(job.args.output, MODEL_MANIFEST))["summary"]
    assert abs(summary["base_general_loss"] - original) < 1e-4
    said = re.search(r"the original base model's loss is ([\d.]+) .* starts at ([\d.]+) \(forgetting ", log)
    assert said and abs(float(said.group(1)) - original) < 1e-3 and abs(float(said.group(2)) - start) < 1e-3
    first = json.loads(storage.read_text(job.args.metrics).splitlines()[0])
    assert abs(first["forgetting"] - (math.exp(first["general_eval_loss"] - original) - 1)) < 1e-3


def closed_port() -> int:
    """A localhost port nothing listens on: a tracking server that is down."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _record(step: int, eval_loss: float | None = None) -> StepRecord:
    return StepRecord(step, 1.0, 1e-3, 1.0, 100, 1000.0, 0.1, eval_loss=eval_loss)


def test_a_loss_that_is_not_a_number_stops_any_run_and_skipped_updates_stop_one_without_loss_scaling():
    """A NaN loss is divergence whatever the precision. An infinite gradient norm is a skipped
    update: fp16's loss scaler recovers from a run of them (it lowers the scale), bf16 and fp32 have
    no scale to lower, so three in a row mean the weights will not change again."""
    from fulltune.train.exit_codes import TrainingDiverged
    from fulltune.train.metrics import refuse_divergence

    history = [dataclasses.replace(_record(i), loss=3.0 - 0.1 * i) for i in range(6)]
    with pytest.raises(
        TrainingDiverged, match=r"at step 7: its loss is nan; lr 0.001, the losses of steps 3-7: "
    ):
        refuse_divergence(dataclasses.replace(_record(6), loss=math.nan), history, loss_scaling=True)
    with pytest.raises(TrainingDiverged, match="at the first step: the base model's weights or the data"):
        refuse_divergence(dataclasses.replace(_record(0), loss=math.inf), [], loss_scaling=False)
    skipped = [dataclasses.replace(r, grad_norm=math.inf) for r in history[3:]]
    refuse_divergence(skipped[-1], [*history[:3], *skipped[:-1]], loss_scaling=True)  # fp16: goes on
    refuse_divergence(skipped[-1], [*history[:4], *skipped[1:-1]], loss_scaling=False)  # two: goes on
    with pytest.raises(TrainingDiverged, match="gradient norm has not been a finite number for 3 steps"):
        refuse_divergence(skipped[-1], [*history[:3], *skipped[:-1]], loss_scaling=False)


def test_early_stopping_replayed_from_the_records_counts_evaluations_without_a_large_enough_drop():
    evals = {1: 2.0, 3: 1.95, 5: 1.5, 7: 1.49}
    # the records as a checkpoint carries them: JSON objects
    saved = [json.loads(json.dumps(_record(s, evals.get(s)).to_json())) for s in range(8)]

    def resumed(patience: int, threshold: float) -> Cadence:
        training = {"eval_steps": 2, "save_steps": 2}
        training |= {"early_stopping_patience": patience, "early_stopping_threshold": threshold}
        tr = RunConfig.from_dict({"training": training}).training
        history = [StepRecord.from_json(r) for r in saved]
        return Cadence.for_run(tr, 20, checkpoints=True, max_forgetting=0.05, history=history)

    st = resumed(1, 0.1).early_stopping
    # 1.95 is not 0.1 below 2.0; 1.5 is; 1.49 is not below 1.5 by 0.1
    assert (st.best_loss, st.best_step, st.evals, st.since_best) == (1.5, 5, 4, 1)
    assert resumed(1, 0.1).should_stop() and not resumed(2, 0.1).should_stop()
    assert not resumed(0, 0.1).should_stop()  # patience 0: never
    assert resumed(1, 0.0).early_stopping.since_best == 0  # every eval improved
    # a stopping run saves the final model, not a checkpoint
    assert resumed(2, 0.1).checkpoint_after(8) and not resumed(1, 0.1).checkpoint_after(8)


def test_cadence_checkpoints_between_steps_only_and_logs_every_evaluated_step():
    tr = RunConfig.from_dict({"training": {"logging_steps": 5, "eval_steps": 3, "save_steps": 2}}).training
    cadence = Cadence.for_run(tr, 6, checkpoints=True, max_forgetting=0.05)
    # not after step 6, the last: the final model is saved then
    assert [done for done in range(1, 7) if cadence.checkpoint_after(done)] == [2, 4]
    assert [done for done in range(1, 7) if cadence.evaluate_after(done)] == [3, 6]
    evaluated = [_record(s, 1.0 if cadence.evaluate_after(s + 1) else None) for s in range(6)]
    logged = [r.step for r in evaluated if cadence.log_after(r)]
    assert logged == [0, 2, 4, 5]  # the first, every 5th (step 5), the evaluated ones, the last
    assert not Cadence.for_run(tr, 6, checkpoints=False, max_forgetting=0.05).checkpoint_after(
        2
    )  # nowhere to write them


def test_cadence_saves_by_the_clock_on_evaluation_steps_when_there_are_any():
    """A checkpoint once save_every_minutes have passed since the last save: on any step, or on the
    next evaluation step when eval_steps is set; never after the last step."""

    def saved(total: int, minutes_at: dict[int, float], **training) -> list[int]:
        tr = RunConfig.from_dict({"training": {"save_every_minutes": 30, **training}}).training
        cadence = Cadence.for_run(tr, total, checkpoints=True, max_forgetting=0.05)
        return [
            done for done in range(1, total + 1) if cadence.checkpoint_after(done, minutes_at.get(done, 0))
        ]

    assert saved(8, {3: 29.9, 4: 30.0, 6: 45.0, 8: 90.0}) == [4, 6]  # not after step 8, the last
    assert saved(8, {3: 31.0, 4: 32.0, 6: 45.0}, eval_steps=2) == [4, 6]  # not step 3: no evaluation
    assert saved(8, {4: 32.0}, save_every_minutes=0) == []
    assert saved(8, {4: 32.0}, save_steps=3) == [3, 4, 6]  # steps and time both
    tr = RunConfig.from_dict({"training": {"save_every_minutes": 30, "eval_steps": 2}}).training
    cadence = Cadence.for_run(tr, 8, checkpoints=True, max_forgetting=0.05)
    assert [d for d in range(1, 9) if cadence.watches_the_clock(d)] == [
        2,
        4,
        6,
        8,
    ]  # the steps that ask rank 0
    nowhere = Cadence.for_run(tr, 8, checkpoints=False, max_forgetting=0.05)
    assert not nowhere.watches_the_clock(4) and not nowhere.checkpoint_after(4, 99.0)


def test_step_record_and_log_line_carry_only_what_was_measured():
    cpu = StepRecord(
        step=4, loss=2.5, lr=3e-4, grad_norm=None, tokens=236, tokens_per_s=1234.4, step_time_s=0.19
    )
    assert list(cpu.to_json()) == ["step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s"]
    assert (
        step_line(cpu, 10, eta_s=12.4) == "step 5/10 loss 2.5000 lr 0.0003 grad_norm n/a tok/s 1234 eta 12s"
    )
    gpu = dataclasses.replace(
        cpu,
        grad_norm=1.23456,
        gpu_mem_allocated_gib=30.0,
        gpu_mem_reserved_gib=35.26,
        mfu=0.4123,
        eval_loss=2.25,
        general_eval_loss=3.1,
        forgetting=0.0412,
    )
    optional = ["gpu_mem_allocated_gib", "gpu_mem_reserved_gib", "mfu", "eval_loss"]
    optional += ["general_eval_loss", "forgetting"]
    assert list(gpu.to_json()) == list(cpu.to_json()) + optional
    assert StepRecord.from_json(json.loads(json.dumps(gpu.to_json()))) == gpu
    assert step_line(gpu, 10, eta_s=12.4) == (
        "step 5/10 loss 2.5000 lr 0.0003 grad_norm 1.235 tok/s 1234 eta 12s mfu 41.2% peak mem 35.3 GiB "
        "eval_loss 2.2500 general_loss 3.1000 forgetting +4.1%"
    )


def test_trainer_arguments_round_trip_and_leave_out_unset_checkpoints():
    args = TrainerArgs(config="c.yaml", deepspeed="d.json", dataset="x.json", output="o", metrics="m.jsonl")
    argv = ["--config", "c.yaml", "--deepspeed", "d.json", "--dataset", "x.json", "--output", "o"]
    assert args.to_argv() == [*argv, "--metrics", "m.jsonl"]
    resumable = dataclasses.replace(args, checkpoints="s3://b/ckpt")
    assert resumable.to_argv()[-2:] == ["--checkpoints", "s3://b/ckpt"]
    assert TrainerArgs.from_argv(resumable.to_argv()) == resumable
    assert TrainerArgs.from_argv(args.to_argv()) == args
    with pytest.raises(SystemExit) as exc:
        TrainerArgs.from_argv(argv)  # --metrics missing
    assert exc.value.code == 2


def test_mfu_formula_on_known_numbers():
    # Llama-3.1-8B: 7.50e9 matmul parameters (8.03e9 less the 128256 x 4096 input embedding),
    # 32 layers, hidden 4096, sequences of 4096 tokens.
    n = 8_030_261_248 - 128256 * 4096
    fpt = throughput.flops_per_token(n, 32, 4096, 4096)
    assert fpt == pytest.approx(6 * n + 12 * 32 * 4096 * 4096)
    assert fpt == pytest.approx(5.145e10, rel=1e-3)
    # 8 H100s at 3,000 tokens/s each: 24,000 * 5.145e10 / (8 * 989e12) = 15.6%
    assert throughput.mfu(24_000, fpt, throughput.peak_flops("NVIDIA H100 80GB HBM3"), 8) == pytest.approx(
        0.156, abs=0.001
    )


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        # the NVL and PCIe parts of the same chips: their own, lower peaks (MFU and plan's cost)
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H800 PCIe", 756e12),
        ("NVIDIA H800", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("H200 NVL", 835e12),  # as resources.gpu_type names it
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA A10G", None),  # not A10, not A100: unknown, so no MFU rather than a wrong one
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_flops_by_device_name(name, peak):
    assert throughput.peak_flops(name) == peak


def test_a_rank_on_a_gpu_without_bf16_is_told_to_train_in_fp16():
    """What a rank raises (exit 1) before loading the model on a T4 when the config asks for bf16."""
    assert throughput.bf16_missing("Tesla T4", (7, 5)) == (
        "this machine's GPUs (Tesla T4, compute capability 7.5) have no bf16 (it needs 8.0, Ampere or "
        "newer): set training.bf16: false and training.fp16: true"
    )
    assert throughput.bf16_missing("NVIDIA A100-SXM4-80GB", (8, 0)) is None
    assert throughput.bf16_missing("NVIDIA H200", (9, 0)) is None


def test_gpus_from_before_ampere_have_no_bf16_by_device_name_or_gpu_type():
    old = [
        "Tesla V100-SXM2-32GB",
        "Tesla T4",
        "T4",
        "V100",
        "NVIDIA GeForce RTX 2080 Ti",
        "Tesla P100-PCIE-16GB",
    ]
    new = ["NVIDIA H100 80GB HBM3", "H100", "NVIDIA A100-SXM4-80GB", "NVIDIA A10G", "L40S", "MI300X"]
    assert [throughput.has_bf16(n) for n in old] == [False] * len(old)
    assert [throughput.has_bf16(n) for n in new] == [True] * len(new)


def _llama_100x16(tie_word_embeddings: bool = False):
    """A random Llama with a vocabulary of 100, hidden size 16 and 2 layers: the FLOP sums below
    are written in these numbers."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(
        tiny_llama_config(
            vocab_size=100,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            tie_word_embeddings=tie_word_embeddings,
        )
    )


def test_matmul_params_leave_out_an_untied_input_embedding():
    untied = _llama_100x16(tie_word_embeddings=False)
    tied = _llama_100x16(tie_word_embeddings=True)
    assert throughput.matmul_params(untied) == untied.num_parameters() - 100 * 16
    assert throughput.matmul_params(tied) == tied.num_parameters()  # the shared matrix is the output matmul
    assert (
        throughput.model_flops_per_token(untied, 8) == 6 * (untied.num_parameters() - 1600) + 12 * 2 * 16 * 8
    )


def test_attention_flops_count_the_query_heads_not_the_hidden_size():
    """Qwen3 and Gemma give their heads more room than the hidden size (Qwen3-0.6B: 16 x 128 on 1024):
    the attention term is 12 L H Q s, H Q the query heads times their size. With the hidden size it
    left out half of Qwen3-0.6B's attention FLOPs: its MFU read low, plan's GPU-hours came out short."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fulltune.plan import model_shape

    config = tiny_llama_config(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    config.head_dim = 16  # 2 heads of 16 on a hidden size of 16: attention 32 wide
    config.num_key_value_heads = 1
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert throughput.attention_width(config) == 32
    expected = 6 * throughput.matmul_params(model) + 12 * 2 * 32 * 8
    assert throughput.model_flops_per_token(model, 8) == expected
    assert model_shape(config).attention_width == 32
    qwen3 = AutoConfig.for_model(
        "qwen3", hidden_size=1024, num_attention_heads=16, head_dim=128, num_key_value_heads=8
    )
    assert throughput.attention_width(qwen3) == 2048
    gpt2 = AutoConfig.for_model("gpt2", n_embd=64, n_head=4)  # no head_dim: heads x hidden / heads
    assert throughput.attention_width(gpt2) == 64


def test_mfu_only_on_a_known_gpu_training_in_16_bit(monkeypatch):
    from fulltune.train.engine import Ranks

    model = _llama_100x16()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    gpus = Ranks(rank=0, world=8, local_rank=0, device=torch.device("cuda", 0))
    meter = throughput.MfuMeter.for_run(model, gpus, "bf16", global_batch=16, seq_len=8)
    # 16 x 8 positions in 0.5 s on 8 H100s
    expected = throughput.mfu(256, throughput.model_flops_per_token(model, 8), 989e12, 8)
    assert meter(0.5) == pytest.approx(expected)
    assert throughput.MfuMeter.for_run(model, gpus, "fp32", global_batch=16, seq_len=8)(0.5) is None
    cpus = dataclasses.replace(gpus, device=torch.device("cpu"))
    assert throughput.MfuMeter.for_run(model, cpus, "bf16", global_batch=16, seq_len=8)(0.5) is None


def test_hpz_copy_follows_the_processes_each_node_actually_runs(tmp_path, caplog):
    """plan writes the copy's partition for the planned nodes; the trainer partitions it over the
    processes its node runs (torchrun's LOCAL_WORLD_SIZE), and turns it off, saying so, where a node
    holds the whole world or a world that is no multiple of it."""
    from fulltune.train.engine import Ranks, read_deepspeed_config

    uri = tmp_path / "ds_config.json"
    uri.write_text(json.dumps({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8}}))
    cfg = RunConfig.from_dict({"resources": {"num_nodes": 2, "nproc_per_node": 8, "launcher": "kubernetes"}})

    def partition(world: int, per_node: int) -> int:
        ranks = Ranks(rank=0, world=world, local_rank=0, device=torch.device("cpu"), local_world=per_node)
        return read_deepspeed_config(str(uri), cfg, ranks)["zero_optimization"]["zero_hpz_partition_size"]

    assert partition(16, 8) == 8
    assert partition(8, 4) == 4
    with caplog.at_level("WARNING", logger="fulltune.train"):
        assert partition(8, 8) == 1
        assert partition(10, 4) == 1
    assert "hierarchical partitioning off: 4 processes per node in a world of 10" in caplog.text


def test_exit_codes_separate_permanent_from_retryable_failures():
    import torch.distributed as dist

    from fulltune.config import ConfigError
    from fulltune.storage import StorageError
    from fulltune.train.checkpoint import CheckpointError

    permanent = [ConfigError("x"), TrainInputError("x"), CheckpointError("x"), FileNotFoundError("x")]
    retryable = [
        dist.DistNetworkError("Connection reset by peer"),
        RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error"),
        RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"),
        StorageError("s3://b/k: An error occurred (SlowDown)"),
        ConnectionResetError(),
    ]
    assert {exit_codes.exit_code_for(e) for e in permanent} == {exit_codes.EXIT_BAD_INPUT}
    assert {exit_codes.exit_code_for(e) for e in retryable} == {exit_codes.EXIT_RETRYABLE}
    assert exit_codes.EXIT_RETRYABLE >= 128  # the ExitCode restart policy retries 128-255 only
    assert exit_codes.exit_code_for(KeyError("bug")) == exit_codes.EXIT_UNEXPECTED
    # a full disk, as the kernel reports it: a restart would write the same checkpoint to it again
    with pytest.raises(OSError) as full, open("/dev/full", "w") as f:
        f.write("checkpoint shard")
        f.flush()
    assert exit_codes.exit_code_for(full.value) == exit_codes.EXIT_BAD_INPUT
    try:  # a wrapped cause still counts
        try:
            raise TimeoutError("store get timed out")
        except TimeoutError as inner:
            raise ValueError("DeepSpeed gave up") from inner
    except ValueError as outer:
        assert exit_codes.exit_code_for(outer) == exit_codes.EXIT_RETRYABLE


def _run_trainer(tmp_path, config_arg: str, env: dict[str, str]) -> tuple[int, str]:
    import os
    import subprocess
    import sys

    args = ["--deepspeed", "d.json", "--dataset", "x.json", "--output", "o", "--metrics", "m.jsonl"]
    proc = subprocess.run(
        [sys.executable, "-m", "fulltune.train", "--config", config_arg, *args],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stderr


def test_trainer_process_exits_1_on_a_bad_config(tmp_path):
    (tmp_path / "bad.yaml").write_text("training:\n  learning_rate: -1\n")
    code, err = _run_trainer(tmp_path, "bad.yaml", {})
    assert code == 1, err
    assert "learning_rate" in err and "retrying cannot help" in err


def test_trainer_process_exits_1_before_any_rendezvous_when_the_image_lacks_flash_attn(tmp_path):
    """flash_attention_2 needs the flash-attn package in the trainer image (not installed here): the
    rank refuses at once, naming the field and the default that needs nothing, instead of failing
    after the model loaded on every rank."""
    config = "training:\n  attn_implementation: flash_attention_2\nresources:\n  accelerator: gpu\n"
    (tmp_path / "flash.yaml").write_text(config)
    code, err = _run_trainer(tmp_path, "flash.yaml", {})
    assert code == 1, err
    assert "training.attn_implementation is flash_attention_2 but this image has no flash-attn package" in err
    assert "process group" not in err


def test_trainer_process_exits_retryable_when_storage_is_unreachable(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
    }
    code, err = _run_trainer(tmp_path, "s3://bucket/plan/config.yaml", env)
    assert code == exit_codes.EXIT_RETRYABLE, err
    assert "retryable failure" in err


def test_trainer_process_exits_1_when_eval_is_asked_for_but_the_dataset_has_no_eval_split(tmp_path):
    (tmp_path / "config.yaml").write_text("training:\n  eval_steps: 10\n  max_steps: 100\n")
    (tmp_path / "x.json").write_text(
        json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "max_seq_len": SEQ,
                "splits": {"train": {"sequences": 8, "files": []}},
            }
        )
    )
    code, err = _run_trainer(tmp_path, "config.yaml", {})
    assert code == 1, err
    assert "no domain_eval sequences" in err and "training.eval_steps" in err


@pytest.mark.slow
def test_torch_compile_trains_the_same_as_eager(demo_assets, tmp_path):
    """training.torch_compile (DeepSpeed's engine.compile, inductor) on ZeRO-3: the same losses and
    gradient norms as the eager model, step for step."""
    runs = {}
    for compiled in (False, True):
        work = str(tmp_path / f"compile-{compiled}")
        dataset = tiny_dataset(demo_assets, work, n_seq=8)
        cfg = plan_run(
            demo_assets, work, nproc=1, per_device_train_batch_size=4, max_steps=3, torch_compile=compiled
        )
        assert cfg.training.torch_compile is compiled
        job = train_job(cfg, dataset)
        LocalLauncher().run(job)
        runs[compiled] = [json.loads(line) for line in storage.read_text(job.args.metrics).splitlines()]
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(
            [r[key] for r in runs[True]], [r[key] for r in runs[False]], rtol=1e-4, atol=1e-5, msg=key
        )


class _Payload:
    """What an attacker with write access to the work directory would plant: unpickling it runs code
    (here: creating the file `marker`)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(demo_assets, tmp_path):
    """A shard replaced by a code-running pickle, its manifest entry rewritten to match (whoever can
    write the files can write the manifest): resuming refuses it by name, exit 1, and the code never
    runs."""
    import hashlib
    import pickle

    from fulltune.train import checkpoint

    work = str(tmp_path / "w")
    dataset = tiny_dataset(demo_assets, work, n_seq=8)
    # checkpoints are taken between steps: 2 steps leave the one after step 1; one rank, as the
    # refusal is per file whichever rank reads it
    cfg = plan_run(demo_assets, work, nproc=1, per_device_train_batch_size=2, max_steps=2, save_steps=1)
    job = train_job(cfg, dataset)
    LocalLauncher().run(job)
    ckpt = tmp_path / "w" / "train" / "checkpoints" / "step-00000001"
    target = sorted(ckpt.glob("*optim_states.pt"))[0]
    marker = tmp_path / "pwned"
    target.write_bytes(pickle.dumps({"optimizer_state_dict": _Payload(str(marker))}))
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    for entry in manifest["files"]:
        if entry["path"] == target.name:
            entry.update(size=target.stat().st_size, sha256=hashlib.sha256(target.read_bytes()).hexdigest())
    (ckpt / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    assert checkpoint.verify(job.args.checkpoints, "step-00000001") is None  # the manifest is no defence

    longer = plan_run(demo_assets, work, nproc=1, per_device_train_batch_size=2, max_steps=3, save_steps=1)
    with pytest.raises(LaunchError) as exc:
        LocalLauncher().run(train_job(longer, dataset))
    assert exc.value.exit_code == 1
    assert f"refused to load {target.name}" in str(exc.value)
    assert not marker.exists()


@pytest.mark.slow
def test_two_nodes_on_one_machine_stage_their_s3_checkpoints_apart(demo_assets, s3, tmp_path):
    """Each node stages its ranks' checkpoint files on its own disk, uploads them and removes them.
    Nodes sharing a machine (the local launcher's) once shared that directory: one removed it while
    the other was uploading, and the run failed at its first checkpoint."""
    from fulltune.train import checkpoint
    from fulltune.train.recipe import is_complete_model

    work = f"{s3}/run"
    dataset = tiny_dataset(demo_assets, work, n_seq=8)
    cfg = plan_run(
        demo_assets,
        work,
        nproc=1,
        resources={"num_nodes": 2, "launcher": "kubernetes"},
        per_device_train_batch_size=2,
        max_steps=3,
        save_steps=1,
    )
    job = train_job(cfg, dataset)
    LocalLauncher().run(job)
    assert checkpoint.find_resume(job.args.checkpoints) == "step-00000002"
    assert is_complete_model(cfg.layout.model)


@pytest.mark.slow
def test_resuming_from_s3_leaves_no_staged_checkpoint_on_the_node(demo_assets, s3, capfd, tmp_path):
    """Checkpoints on S3 are staged on the node's disk to be loaded; the staged copy holds the full
    optimizer state (~16 bytes per parameter), so it is removed once the ranks have read it."""
    from fulltune.train import checkpoint

    work = f"{s3}/run"
    dataset = tiny_dataset(demo_assets, work, n_seq=8)
    cfg = plan_run(
        demo_assets, work, per_device_train_batch_size=2, max_steps=2, save_steps=1, report_to=["tensorboard"]
    )
    job = train_job(cfg, dataset)
    LocalLauncher().run(job)
    assert checkpoint.find_resume(job.args.checkpoints) == "step-00000001"
    # TensorBoard on S3: written on the node, uploaded to the run's prefix as it trains
    [events] = storage.list_files(cfg.layout.tensorboard)
    storage.download_file(events, tmp_path / "tb" / storage.basename(events))
    assert [s.step for s in tensorboard_scalars(str(tmp_path / "tb"))["train/loss"]] == [1, 2]
    capfd.readouterr()
    longer = train_job(plan_run(demo_assets, work, per_device_train_batch_size=2, max_steps=3), dataset)
    LocalLauncher().run(longer)
    out = capfd.readouterr().out
    assert f"resumed from {job.args.checkpoints}/step-00000001 at step 1" in out
    # a longer run may continue a shorter one's checkpoint; the log says the schedule changed
    assert "resuming with another length (training.max_steps: 2 when it was written, 3 in this run)" in out
    assert not checkpoint._staging(job.args.checkpoints).exists()
