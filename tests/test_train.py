"""The trainer: real DeepSpeed ZeRO-3 over 2 processes on CPU (gloo), checked against plain PyTorch."""

from __future__ import annotations

import json

import pytest
import torch

from fulltune import storage
from fulltune.config import RunConfig
from fulltune.launch.base import LaunchError
from fulltune.launch.local import LocalLauncher
from fulltune.plan import make_plan, write_plan
from fulltune.preprocess.core import Packed, ParquetSink
from fulltune.preprocess.dataset import IGNORE_INDEX, MANIFEST_FORMAT, load_split
from fulltune.train.recipe import MODEL_MANIFEST, TrainInputError, batch_indices, make_schedule
from fulltune.train.run import train_job

SEQ = 64


def tiny_dataset(demo_assets, work: str, n_seq: int) -> str:
    """n_seq packed sequences of clinical notes, with a masked prompt-like prefix in each."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_assets.base_model_dir))
    notes = [json.loads(line)["text"] for line in open(demo_assets.train_uri)][: n_seq * 4]
    ids = [t for note in notes for t in tok(note)["input_ids"] + [tok.eos_token_id]]
    packed = Packed()
    for i in range(n_seq):
        chunk = ids[i * SEQ : (i + 1) * SEQ]
        labels = [IGNORE_INDEX] * 5 + chunk[5:]  # some positions carry no loss, as prompts do
        packed.add(chunk, labels, SEQ, tok.pad_token_id)
    sink = ParquetSink(storage.join(work, "data", "train-00000.parquet"))
    sink.write(packed)
    entry = sink.close()
    manifest = {
        "format": MANIFEST_FORMAT,
        "max_seq_len": SEQ,
        "pad_token_id": tok.pad_token_id,
        "splits": {"train": {"sequences": n_seq, "files": [entry]}},
    }
    uri = storage.join(work, "data", "dataset.json")
    storage.write_json(uri, manifest)
    return uri


def plan_run(demo_assets, work: str, nproc: int = 2, **training) -> RunConfig:
    cfg = RunConfig.from_dict(
        {
            "work_dir": work,
            "model": {"base_model_uri": str(demo_assets.base_model_dir)},
            "data": {"train_uri": demo_assets.train_uri},
            "preprocess": {"max_seq_len": SEQ},
            "training": {"learning_rate": 1e-3, "num_train_epochs": 1, "bf16": False, **training},
            "resources": {"nproc_per_node": nproc, "accelerator": "cpu"},
        }
    )
    p = make_plan(cfg, train_tokens=10_000)
    write_plan(p, work)
    return RunConfig.from_dict(p.config)


def plain_loss(model_dir, dataset_uri) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    data = load_split(dataset_uri, "train")
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)),
        data["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    ).item()


@pytest.mark.slow
def test_zero3_two_ranks_step0_loss_equals_plain_loss_and_model_is_saved(demo_assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = str(tmp_path / "work")
    dataset = tiny_dataset(demo_assets, work, n_seq=8)
    # 2 ranks x micro batch 2 x accumulation 2 = 8: step 0 sees exactly every sequence once
    cfg = plan_run(
        demo_assets, work, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3
    )
    job = train_job(cfg, work, dataset)
    LocalLauncher().run(job)

    metrics = [json.loads(line) for line in storage.read_text(job.metrics_uri).splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    expected = plain_loss(demo_assets.base_model_dir, dataset)
    assert abs(metrics[0]["loss"] - expected) < 1e-3, (metrics[0]["loss"], expected)
    assert metrics[-1]["loss"] < metrics[0]["loss"]  # it learns
    assert all(m["grad_norm"] is not None and m["grad_norm"] > 0 for m in metrics)

    manifest = storage.read_json(storage.join(job.output_uri, MODEL_MANIFEST))
    for f in manifest["files"]:
        assert storage.sha256_file(f"{job.output_uri}/{f['path']}") == f["sha256"]
    tuned = AutoModelForCausalLM.from_pretrained(job.output_uri)
    AutoTokenizer.from_pretrained(job.output_uri)
    base = AutoModelForCausalLM.from_pretrained(str(demo_assets.base_model_dir))
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert len(changed) == len(base.state_dict())  # full fine-tuning: every tensor moved
    assert tuned.num_parameters() == base.num_parameters()


@pytest.mark.slow
def test_too_little_data_exits_1_without_retrying(demo_assets, tmp_path):
    work = str(tmp_path / "work")
    dataset = tiny_dataset(demo_assets, work, n_seq=2)
    cfg = plan_run(demo_assets, work, per_device_train_batch_size=4, max_steps=1)
    with pytest.raises(LaunchError) as exc:
        LocalLauncher().run(train_job(cfg, work, dataset))
    assert exc.value.exit_code == 1
    assert "fewer than one global batch" in str(exc.value)


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
    assert sched.global_batch == 12 and sched.steps_per_epoch == 8 and sched.total_steps == 20
    a = batch_indices(9, sched, 42, 100)
    assert torch.equal(a, batch_indices(9, sched, 42, 100))
    assert not torch.equal(a, batch_indices(9, sched, 43, 100))
    epoch0 = torch.cat([batch_indices(s, sched, 42, 100) for s in range(8)])
    assert len(set(epoch0.tolist())) == 96  # no sequence twice within an epoch
    with pytest.raises(TrainInputError, match="fewer than one global batch"):
        make_schedule(cfg, num_sequences=5, world=2)


def _final_state(uri: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(uri).state_dict()


@pytest.mark.slow
def test_killed_rank_resumes_from_the_last_complete_checkpoint_and_matches_an_uninterrupted_run(
    demo_assets, tmp_path, monkeypatch
):
    from fulltune.train import checkpoint

    runs = {}
    for name in ("straight", "killed"):
        work = str(tmp_path / name)
        dataset = tiny_dataset(demo_assets, work, n_seq=16)
        cfg = plan_run(
            demo_assets, work, per_device_train_batch_size=2, max_steps=6, save_steps=2, save_total_limit=2
        )
        runs[name] = (cfg, work, dataset, train_job(cfg, work, dataset))
    cfg, work, dataset, job = runs["straight"]
    LocalLauncher().run(job)

    cfg, work, dataset, job = runs["killed"]
    monkeypatch.setenv(
        "FULLTUNE_FAULT_AFTER_STEP", "5"
    )  # rank 1 dies after step 5: the step-4 checkpoint is newest
    monkeypatch.setenv("FULLTUNE_FAULT_RANK", "1")
    with pytest.raises(LaunchError):
        LocalLauncher().run(job)
    assert checkpoint.list_tags(job.checkpoints_uri) == ["step-00000004", "step-00000002"]
    monkeypatch.delenv("FULLTUNE_FAULT_AFTER_STEP")
    out = []

    class Sink:
        def write(self, text):
            out.append(text)

        def flush(self):
            pass

    LocalLauncher(stream=Sink()).run(job)  # the restart: same job, same command
    assert "resumed from" in "".join(out) and "step 4" in "".join(out)
    metrics = [json.loads(line) for line in storage.read_text(job.metrics_uri).splitlines()]
    assert [m["step"] for m in metrics] == list(range(6))  # one record per step, none lost or doubled
    straight, resumed = _final_state(runs["straight"][3].output_uri), _final_state(job.output_uri)
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_and_nothing_usable_refuses(demo_assets, tmp_path, monkeypatch):
    from fulltune.train import checkpoint

    work = str(tmp_path / "w")
    dataset = tiny_dataset(demo_assets, work, n_seq=16)
    cfg = plan_run(
        demo_assets, work, per_device_train_batch_size=2, max_steps=5, save_steps=2, save_total_limit=3
    )
    job = train_job(cfg, work, dataset)
    monkeypatch.setenv("FULLTUNE_FAULT_AFTER_STEP", "4")
    with pytest.raises(LaunchError):
        LocalLauncher().run(job)
    root = job.checkpoints_uri
    newest = sorted((tmp_path / "w" / "train" / "checkpoints" / "step-00000004").rglob("*.pt"))[0]
    newest.write_bytes(newest.read_bytes()[:-10] + b"corrupted!")
    assert checkpoint.verify(root, "step-00000004") and checkpoint.verify(root, "step-00000002") is None
    assert checkpoint.find_resume(root) == "step-00000002"  # with a warning naming the corrupt file

    # A half-written save (no manifest) next to the corrupt one: nothing usable, refuse to start over.
    (tmp_path / "w" / "train" / "checkpoints" / "step-00000002" / checkpoint.MANIFEST).unlink()
    monkeypatch.delenv("FULLTUNE_FAULT_AFTER_STEP")
    with pytest.raises(LaunchError) as exc:
        LocalLauncher().run(job)
    assert exc.value.exit_code == 1
    assert "none is complete and intact" in str(exc.value)


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_twice_the_micro_batch(demo_assets, tmp_path):
    """2 ranks x micro batch 2 and 1 rank x micro batch 4 see the same global batches: same losses."""
    losses = {}
    for nproc, micro in ((2, 2), (1, 4)):
        work = str(tmp_path / f"n{nproc}")
        dataset = tiny_dataset(demo_assets, work, n_seq=24)
        cfg = plan_run(demo_assets, work, nproc=nproc, per_device_train_batch_size=micro, max_steps=10)
        job = train_job(cfg, work, dataset)
        LocalLauncher().run(job)
        losses[nproc] = [json.loads(line)["loss"] for line in storage.read_text(job.metrics_uri).splitlines()]
    assert len(losses[1]) == 10
    torch.testing.assert_close(losses[2], losses[1], rtol=1e-4, atol=1e-4)
    assert losses[1][-1] < losses[1][0]
