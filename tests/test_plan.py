"""plan: exact parameter counts without weights, the memory model, fitting decisions, defaults."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest

from fulltune import plan as planmod
from fulltune.config import DataSection, RunConfig
from fulltune.plan import ModelShape, PlanError
from tiny_models import tiny_llama_config


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A config-only Llama directory (no weights): plan must never need them."""
    d = tmp_path_factory.mktemp("llama-config")
    tiny_llama_config(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3, tie_word_embeddings=False
    ).save_pretrained(d)
    return d


def small_text_data(tmp_path) -> Path:
    """50 short text records in a JSONL file: data for plan to estimate tokens from."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"record {i} " * 20}) + "\n" for i in range(50)))
    return data


def shape_8b() -> ModelShape:
    # Llama-3.1-8B: 8.03e9 parameters, hidden 4096, 32 layers, vocab 128256, SwiGLU MLP of 14336;
    # largest layer = embedding
    return ModelShape(8_030_261_248, 128256 * 4096, 4096, 32, 128256, "llama", 14336, True)


def test_parameter_count_is_exact_and_reads_no_weights(llama_dir):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = RunConfig.from_dict({"model": {"base_model_uri": str(llama_dir)}})
    shape = planmod.model_shape(planmod.load_model_config(cfg))
    real = AutoModelForCausalLM.from_config(LlamaConfig.from_pretrained(llama_dir))
    assert shape.params == sum(p.numel() for p in real.parameters())
    assert shape.largest_layer_params == 1000 * 64  # embedding (untied lm_head is the same size)
    assert (shape.hidden_size, shape.num_layers, shape.vocab_size) == (64, 3, 1000)
    assert (shape.intermediate_size, shape.gated_mlp) == (128, True)  # Llama's SwiGLU MLP
    assert not any(p.name.endswith(".safetensors") for p in llama_dir.iterdir())


def test_mlp_width_and_gating_come_from_the_architecture():
    """SwiGLU blocks keep four I-wide tensors per token, GPT-2's GELU MLP two: the activation term
    follows the architecture, read from the config on the meta device."""
    from transformers import GPT2Config

    gpt2 = planmod.model_shape(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=500))
    assert (gpt2.intermediate_size, gpt2.gated_mlp) == (256, False)  # n_inner unset: 4 x hidden
    kw = dict(world_size=1, seq_len=128, micro_batch=2, gradient_checkpointing=False)
    ungated = planmod.estimate_memory(gpt2, **kw)
    gated = planmod.estimate_memory(
        ModelShape(gpt2.params, gpt2.largest_layer_params, 64, 2, 500, "llama", 256, True), **kw
    )
    assert gated.activations - ungated.activations == pytest.approx(4 * 256 * 128 * 2 * 2)


def test_memory_model_matches_the_formulas():
    s = shape_8b()
    e = planmod.estimate_memory(s, world_size=16, seq_len=4096, micro_batch=1, gradient_checkpointing=False)
    assert e.model_states == pytest.approx(s.params * 16 / 16)
    assert e.gathered_layers == pytest.approx(4 * s.largest_layer_params)
    per_layer = 4096 * (24 * 4096 + 8 * 14336)  # attention and norms + SwiGLU MLP, per token
    assert e.activations == pytest.approx(per_layer * 32)
    assert e.logits == pytest.approx(12 * 4096 * 128256)
    assert e.optimizer_step == pytest.approx(6 * s.params / 16)  # one fp32 sub-group (< 1e9 elements)
    z = planmod.zero3_settings(s, gpu=True)
    assert e.buckets == pytest.approx(4 * z.reduce_bucket_size + 2 * z.prefetch_bucket_size)
    # the step is smaller than activations and logits here
    allocated = e.model_states + e.gathered_layers + e.buckets + e.activations + e.logits
    assert e.fragmentation == pytest.approx(0.2 * allocated)
    assert e.total == pytest.approx(1.2 * allocated + 1.5 * 2**30)
    gc = planmod.estimate_memory(s, world_size=16, seq_len=4096, micro_batch=1, gradient_checkpointing=True)
    assert gc.activations == pytest.approx(2 * 4096 * 4096 * 32 + per_layer)
    off = planmod.estimate_memory(
        s, world_size=16, seq_len=4096, micro_batch=1, gradient_checkpointing=True, offload_optimizer=True
    )
    assert off.model_states == pytest.approx(s.params * 4 / 16)
    assert off.optimizer_step == 0.0  # the step runs on the CPU


def test_optimizer_step_transient_is_one_sub_group_and_can_dominate():
    """On few GPUs the fp32 sub-group being stepped outweighs short-sequence activations, but never
    more than DeepSpeed's 1e9-element sub-group: measured on an H200 (docs/benchmarks.md)."""
    s = shape_8b()
    one = planmod.estimate_memory(s, world_size=1, seq_len=256, micro_batch=1, gradient_checkpointing=True)
    assert one.optimizer_step == pytest.approx(6 * 1e9)  # 8e9 params, stepped 1e9 at a time
    assert one.optimizer_step > one.activations + one.logits
    fixed = one.model_states + one.gathered_layers + one.buckets
    assert one.total == pytest.approx(1.2 * (fixed + 6e9) + 1.5 * 2**30)


def _cfg(**resources) -> RunConfig:
    return RunConfig.from_dict(
        {
            "preprocess": {"max_seq_len": 4096},
            "training": {"per_device_train_batch_size": 8, "gradient_checkpointing": False},
            "resources": {"gpu_memory_gib": 80, **resources},
        }
    )


def test_fits_by_turning_on_recomputation_and_smaller_micro_batch():
    mem, budget, notes = planmod.choose_memory_settings(_cfg(nproc_per_node=8), shape_8b())
    assert mem.total <= budget
    assert mem.gradient_checkpointing
    assert any(
        n.startswith(f"enabled gradient_checkpointing on {mem.recompute_layers} of 32 layers") for n in notes
    )
    assert not mem.offload_optimizer


def test_refuses_with_what_would_fit():
    with pytest.raises(PlanError) as exc:
        planmod.choose_memory_settings(_cfg(nproc_per_node=1, gpu_memory_gib=24), shape_8b())
    msg = str(exc.value)
    assert "does not fit on 1 GPU(s) of 24 GiB" in msg
    # the fewest GPUs that hold it without offload, by the same memory model: it fits there, not on one fewer
    need = int(re.search(r"would fit on about (\d+) GPUs of 24 GiB", msg).group(1))
    no_offload = {"offload_optimizer": False, "offload_param": False}
    for world, fits in ((need - 1, False), (need, True)):
        cfg = _cfg(nproc_per_node=world, gpu_memory_gib=24).with_overrides({"training": no_offload})
        try:
            planmod.choose_memory_settings(cfg, shape_8b())
        except PlanError:
            assert not fits, world
        else:
            assert fits, world


def test_offload_is_the_last_resort_before_refusing():
    mem, _, notes = planmod.choose_memory_settings(_cfg(nproc_per_node=1, gpu_memory_gib=80), shape_8b())
    assert mem.offload_optimizer
    assert any("offloads optimizer" in n for n in notes)


@pytest.mark.parametrize(("params", "lr"), [(7e9, 1e-5), (70e9, 5e-6), (1e9, 2.65e-5), (1e5, 1e-3)])
def test_learning_rate_rule(params, lr):
    assert planmod.default_learning_rate(int(params)) == pytest.approx(lr, rel=0.01)


def test_epochs_rule():
    assert planmod.default_epochs(100_000) == 3.0
    assert planmod.default_epochs(10_000_000) == 2.0
    assert planmod.default_epochs(500_000_000) == 1.0


def test_make_plan_resolves_defaults_and_writes_deepspeed_json(llama_dir, tmp_path):
    data = small_text_data(tmp_path)
    cfg = RunConfig.from_dict(
        {
            "model": {"base_model_uri": str(llama_dir)},
            "data": {"train_uri": str(data)},
            "training": {
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 4,
                "max_grad_norm": 0.5,
            },
            "resources": {"nproc_per_node": 4},
        }
    )
    p = planmod.make_plan(cfg.with_overrides({"work_dir": str(tmp_path / "work")}), train_tokens=20_000)
    resolved = p.config
    assert resolved.training.learning_rate == planmod.default_learning_rate(p.shape.params)
    assert resolved.training.num_train_epochs == 3.0
    ds = p.deepspeed
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_batch_size"] == 2 * 4 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True
    assert resolved.training.offload_optimizer is False  # plan's decision is in the resolved config
    layout = planmod.write_plan(p)
    assert layout.root == str(tmp_path / "work")
    assert json.loads(open(layout.deepspeed_config).read()) == ds
    assert RunConfig.from_yaml(layout.resolved_config) == resolved
    md = open(layout.plan_markdown).read()
    assert "| **total / GPU** |" in md and "learning_rate" in md and "| precision | bf16 |" in md
    # the kernels are chosen explicitly and shown: attention, the loss path, compilation
    assert (
        "| attention | sdpa; each packed document attends only to itself (a block-diagonal mask) |" in md
        and "| loss | plain logits |" in md
        and "| torch.compile | False |" in md
    )
    assert "| Liger kernels | True |" in md and resolved.training.use_liger_kernel is True  # a Llama on GPUs
    assert "| ZeRO-3 buckets |" in md
    assert "| launcher | local: torchrun in the train step's own pod" in md
    # where training writes, what it needs there and what is free, checked on this machine
    assert (
        f"| disk | work_dir {tmp_path}: ~" in md
        and "3 checkpoints of ~" in md
        and " free; temp directory " in md
    )
    assert "num_train_epochs 3 chosen" in md
    # 20,000 tokens (the estimate given) against 32 sequences x 1024 tokens a step: said in the report
    assert (
        "| length | 3 epochs, but the data (~20,000 tokens, an estimate) is less than one global batch "
        "of 32 sequences x 1024 tokens |" in md
    )
    assert "- warning: data.train_uri " in md and "fewer than one global batch of 32 sequences" in md
    enough = planmod.make_plan(cfg.with_overrides({"work_dir": str(tmp_path / "w2")}), train_tokens=400_000)
    assert enough.length_summary() == "3 epochs (~37 steps)"  # 12.2 steps of 32,768 tokens an epoch


def test_a_run_with_max_steps_is_shown_in_steps_not_in_the_epochs_it_does_not_use(llama_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"text": "record"}) + "\n")
    cfg = RunConfig.from_dict(
        {
            "model": {"base_model_uri": str(llama_dir)},
            "data": {"train_uri": str(data)},
            "training": {"max_steps": 5, "per_device_train_batch_size": 2},
            "preprocess": {"max_seq_len": 128},
        }
    )
    p = planmod.make_plan(cfg, train_tokens=12_800)  # 5 steps x 2 sequences x 128 tokens: 0.1 epochs
    assert p.length_summary() == "5 steps (training.max_steps; ~0.1 epochs)"
    md = planmod.plan_markdown(p)
    assert "| length | 5 steps (training.max_steps; ~0.1 epochs) |" in md
    assert "num_train_epochs" not in md  # resolved for the config's sake, but it sets nothing


def _same_records_four_ways(tmp_path: Path) -> tuple[dict[str, Path], int]:
    """3,000 text records of 5-200 words as JSONL, gzipped JSONL, gzipped CSV and Parquet, and their
    words (the word tokenizer's tokens)."""
    import csv
    import gzip
    import io
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tiny_models import WORDS

    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(5, 200))) for _ in range(3000)]
    jsonl = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    out = io.StringIO()
    csv.writer(out).writerows([["text"], *([t] for t in texts)])
    files = {
        "jsonl": tmp_path / "train.jsonl",
        "jsonl.gz": tmp_path / "train.jsonl.gz",
        "csv.gz": tmp_path / "train.csv.gz",
        "parquet": tmp_path / "train.parquet",
    }
    files["jsonl"].write_bytes(jsonl)
    files["jsonl.gz"].write_bytes(gzip.compress(jsonl))
    files["csv.gz"].write_bytes(gzip.compress(out.getvalue().encode()))
    pq.write_table(pa.table({"text": texts}), files["parquet"], compression="snappy")
    return files, sum(len(t.split()) for t in texts)


def test_the_token_estimate_counts_what_compressed_and_columnar_files_decode_to(tmp_path, monkeypatch):
    """The same records in four formats give the same estimate, near their real token count: a
    gzipped file holds 3-15x the text its size says, a Parquet file more still. Each text file is
    sized from a prefix (made small here, so the files are larger than it)."""
    from fulltune.data import extent
    from tiny_models import save_tiny_llama

    monkeypatch.setattr(extent, "PREFIX_BYTES", 128 << 10)
    monkeypatch.setattr(extent, "GZIP_PREFIX_BYTES", 32 << 10)
    model = save_tiny_llama(tmp_path / "model")
    files, words = _same_records_four_ways(tmp_path)
    assert files["jsonl"].stat().st_size > 8 * extent.PREFIX_BYTES
    assert files["jsonl.gz"].stat().st_size > 4 * extent.GZIP_PREFIX_BYTES
    estimates = {}
    for fmt, path in files.items():
        cfg = RunConfig.from_dict({"model": {"base_model_uri": str(model)}, "data": {"train_uri": str(path)}})
        estimates[fmt] = planmod.estimate_train_tokens(cfg)
    for fmt, tokens in estimates.items():
        assert tokens == pytest.approx(words, rel=0.15), (fmt, estimates, words)


def test_a_parquet_file_on_s3_is_counted_from_its_footer_without_downloading_it(tmp_path, s3, monkeypatch):
    from fulltune import storage
    from fulltune.data import extent

    files, _ = _same_records_four_ways(tmp_path)
    uri = s3 + "/data/train.parquet"
    storage.upload_file(files["parquet"], uri)
    monkeypatch.setattr(storage, "download_file", lambda *a: pytest.fail("the whole file was fetched"))
    assert extent.estimate_records(uri) == 3000


def test_an_arrow_file_on_s3_is_counted_from_a_prefix_without_downloading_it(tmp_path, s3, monkeypatch):
    # A Hugging Face save_to_disk shard is an Arrow stream of hundreds of MB: counting its rows
    # downloaded all of it (and again for every file of the dataset).
    import pyarrow as pa

    from fulltune import storage
    from fulltune.data import extent

    monkeypatch.setattr(extent, "PREFIX_BYTES", 64 << 10)
    texts = [f"note {i}: " + "glucose and potassium reviewed " * (1 + i % 7) for i in range(6000)]
    table = pa.table({"text": texts})
    local = tmp_path / "data-00000-of-00001.arrow"
    with pa.OSFile(str(local), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=100):
            writer.write_batch(batch)
    assert local.stat().st_size > 8 * extent.PREFIX_BYTES
    uri = s3 + "/hf/train/data-00000-of-00001.arrow"
    storage.upload_file(local, uri)
    monkeypatch.setattr(storage, "download_file", lambda *a: pytest.fail("the whole file was fetched"))
    assert extent.estimate_records(uri) == pytest.approx(6000, rel=0.05)


def test_a_folder_of_many_files_is_estimated_from_a_sample_of_them(tmp_path, s3):
    # plan read up to PREFIX_BYTES (4 MB) of every data file to count records: a folder of 10,000
    # files cost 10,000 requests (40 GB when they are large), for an estimate a sample gives.
    import random

    from fulltune import storage
    from fulltune.data.records import data_file_sizes
    from fulltune.hf import load_tokenizer
    from tiny_models import WORDS, save_tiny_llama

    rng = random.Random(1)
    files, records = 200, 0
    for i in range(files):
        n = rng.randint(5, 15)
        records += n
        rows = [json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(5, 60)))}) for _ in range(n)]
        storage.write_bytes(f"{s3}/notes/part-{i:04d}.jsonl", ("\n".join(rows) + "\n").encode())
    tok = load_tokenizer(str(save_tiny_llama(tmp_path / "model")), False)
    read: set[str] = set()
    storage.s3_client().meta.events.register(
        "before-parameter-build.s3.GetObject", lambda params, **_: read.add(params["Key"])
    )
    uri = f"{s3}/notes/"
    estimate = planmod.estimate_data(uri, DataSection(train_uri=uri), tok)

    assert estimate.records == pytest.approx(records, rel=0.1)
    assert len(read) < files / 2  # a sample, and the first files' records for the tokens
    assert len(data_file_sizes(uri)) == files


def test_the_length_says_one_epoch_and_one_step_in_the_singular(llama_dir, tmp_path):
    cfg = RunConfig.from_dict(
        {
            "model": {"base_model_uri": str(llama_dir)},
            "data": {"train_uri": str(small_text_data(tmp_path))},
            "training": {"num_train_epochs": 1, "per_device_train_batch_size": 2},
            "preprocess": {"max_seq_len": 128},
        }
    )
    one_epoch = planmod.make_plan(cfg, train_tokens=256 * 10)  # 10 steps of 2 sequences x 128 tokens
    assert one_epoch.length_summary() == "1 epoch (~10 steps)"
    one_step = planmod.make_plan(cfg.with_overrides({"training.max_steps": 1}), train_tokens=256 * 10)
    assert one_step.length_summary() == "1 step (training.max_steps; ~0.1 epochs)"


def test_with_packing_off_the_length_and_cost_count_a_padded_sequence_per_record(tmp_path):
    """50 short records (~40 tokens) at max_seq_len 512: packed they make ~4 sequences; with packing
    off train makes one padded 512-token sequence of each, so an epoch is ~50 steps of one sequence
    and the GPU-hours are for ~50 x 512 token positions, not for the data's ~2,000 tokens."""
    from tiny_models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "model")
    cfg = RunConfig.from_dict(
        {
            "model": {"base_model_uri": str(model)},
            "data": {"train_uri": str(small_text_data(tmp_path))},
            "training": {"num_train_epochs": 1, "save_steps": 0, "save_every_minutes": 0},
            "preprocess": {"max_seq_len": 512, "packing": False},
            "resources": {"accelerator": "gpu", "gpu_type": "H100"},
        }
    )
    unpacked = planmod.make_plan(cfg)
    steps = int(unpacked.length_summary().removeprefix("1 epoch (~").removesuffix(" steps)"))
    assert 50 <= steps <= 55
    assert unpacked.cost.tokens == pytest.approx(steps * 512, rel=0.02)
    assert "; an epoch ~5" in planmod.plan_markdown(unpacked)  # ~50-55 sequences of 512 tokens
    packed = planmod.make_plan(cfg.with_overrides({"preprocess.packing": True}))
    assert packed.length_summary() in ("1 epoch (~5 steps)", "1 epoch (~6 steps)")
    assert packed.cost.tokens == pytest.approx(packed.train_tokens_estimate + 2 * 50, rel=0.01)


def test_plan_refuses_data_clearly_smaller_than_one_global_batch(tmp_path):
    """train refuses a split of fewer sequences than one global batch, after preprocessing; plan
    refuses it first where its estimate is clearly below (half a batch), naming the batch's fields."""
    from tiny_models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "model")
    data = tmp_path / "tiny.jsonl"
    data.write_text(
        "".join(json.dumps({"text": "the patient takes metformin daily " * 5}) + "\n" for _ in range(3))
    )
    cfg = RunConfig.from_dict(
        {
            "model": {"base_model_uri": str(model)},
            "data": {"train_uri": str(data)},
            "preprocess": {"max_seq_len": 64},
            "training": {"per_device_train_batch_size": 8},
            "resources": {"nproc_per_node": 2, "accelerator": "cpu"},
        }
    )
    with pytest.raises(PlanError) as refused:
        planmod.make_plan(cfg)
    message = str(refused.value)
    # 3 records of 25 words, each with its BOS and EOS: 81 tokens, 1.3 sequences of 64
    assert message.startswith(
        f"data.train_uri {data} makes ~1 training sequences of preprocess.max_seq_len 64"
    )
    assert "(an estimate: ~75 tokens in ~3 records)" in message
    assert (
        "less than half of one global batch of 16 sequences (training.per_device_train_batch_size 8 x "
        "gradient_accumulation_steps 1 x 2 GPUs: resources.num_nodes x nproc_per_node)" in message
    )
    # a batch the estimate may not fill is planned, with a warning; one it fills, without
    maybe = planmod.make_plan(cfg.with_overrides({"training.per_device_train_batch_size": 1}))
    assert any(
        d.startswith("warning: data.train_uri") and "fewer than one global batch of 2" in d
        for d in maybe.decisions
    )
    fills = planmod.make_plan(
        cfg.with_overrides({"training.per_device_train_batch_size": 1, "resources.nproc_per_node": 1})
    )
    assert not any("global batch" in d for d in fills.decisions)


def test_plan_warns_where_forgetting_cannot_be_measured_or_replay_repeats_a_small_pool(tmp_path, caplog):
    """No general set: the README's forgetting gate is off and nothing is replayed. A tiny one: its
    general_eval split is a few sequences (the intervals are noise) and replay repeats its rest many
    times an epoch. Warned in the plan report and in the log `fulltune check` prints."""
    from tiny_models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "model")
    line = json.dumps({"text": "the patient takes metformin daily " * 5}) + "\n"
    train, general = tmp_path / "train.jsonl", tmp_path / "general.jsonl"
    train.write_text(line * 400)  # 10,000 tokens
    general.write_text(
        json.dumps({"text": "the city is rome"}) + "\n" + json.dumps({"text": "paris is a city"}) + "\n"
    )
    base = {
        "model": {"base_model_uri": str(model)},
        "data": {"train_uri": str(train)},
        "preprocess": {"max_seq_len": 64},
        "resources": {"accelerator": "cpu"},
    }
    without = planmod.make_plan(RunConfig.from_dict(base))
    no_general = (
        "warning: data.general_uri is not set: forgetting will not be measured (the gate judges the domain "
        "gain alone) and there is no replay (preprocess.replay_fraction 0.1 has nothing to draw from)"
    )
    assert no_general in without.decisions and f"- {no_general}" in planmod.plan_markdown(without)
    assert f"plan: {no_general.removeprefix('warning: ')}" in caplog.text

    tiny = planmod.make_plan(
        RunConfig.from_dict({**base, "data": {**base["data"], "general_uri": str(general)}})
    )
    warned = [d for d in tiny.decisions if d.startswith("warning: ")]
    assert warned[0].startswith(
        "warning: the general eval set (preprocess.general_eval_fraction 0.5 of data.general_uri, ~2 records) "
        "makes ~0 sequences, fewer than 50: the forgetting figures and their confidence interval would be noise"
    )
    assert warned[1].startswith(
        "warning: replay draws ~1,111 tokens an epoch (preprocess.replay_fraction 0.1) from a pool of ~4"
    )
    assert "each general document is replayed ~278 times an epoch" in warned[1]


def test_plan_warns_when_the_eval_cap_leaves_the_gate_a_handful_of_sequences(tmp_path):
    """preprocess warns of an eval split under 50 sequences, but evaluate reads at most
    evaluation.max_eval_sequences of any split: a cap of 5 judged the gain, forgetting and the
    champion on 5 sequences (each set, however large) with no warning anywhere."""
    from tiny_models import save_tiny_llama

    base = {
        "model": {"base_model_uri": str(save_tiny_llama(tmp_path / "model"))},
        "data": {"train_uri": str(small_text_data(tmp_path))},
        "resources": {"accelerator": "cpu"},
    }
    capped = planmod.make_plan(RunConfig.from_dict({**base, "evaluation": {"max_eval_sequences": 5}}))
    warning = (
        "warning: evaluation.max_eval_sequences 5 is fewer than 50: the domain gain, forgetting, the "
        "champion comparison and their confidence intervals would rest on at most 5 sequence(s) per set"
    )
    assert any(d.startswith(warning) for d in capped.decisions)
    default = planmod.make_plan(RunConfig.from_dict(base))
    assert not any("max_eval_sequences" in d for d in default.decisions)


def test_plan_sizes_a_plain_text_general_set_beside_chat_domain_data(tmp_path):
    """record_kind: chat names the domain data's kind; the general set is sized from its own text.
    Read as chat it looked empty, and plan warned that replay repeats a pool of ~0 thousands of times."""
    from tiny_models import save_tiny_llama

    model = save_tiny_llama(tmp_path / "model")
    turn = [{"role": "user", "content": "dose?"}, {"role": "assistant", "content": "5 mg daily " * 8}]
    train, general = tmp_path / "train.jsonl", tmp_path / "general.jsonl"
    train.write_text((json.dumps({"messages": turn}) + "\n") * 400)
    general.write_text("".join(json.dumps({"text": f"the city {i} is old " * 10}) + "\n" for i in range(400)))
    cfg = RunConfig.from_dict(
        {
            "model": {"base_model_uri": str(model)},
            "data": {"train_uri": str(train), "general_uri": str(general), "record_kind": "chat"},
            "preprocess": {"max_seq_len": 64},
            "resources": {"accelerator": "cpu"},
        }
    )
    _, estimate = planmod.estimate_datasets(cfg)
    assert estimate.kind == "text" and estimate.records == 400 and estimate.tokens > 400 * 40
    assert not [d for d in planmod.make_plan(cfg).decisions if "replayed" in d]


def test_plan_requires_model_and_data():
    from fulltune.config import ConfigError

    with pytest.raises(ConfigError, match="model.base_model_uri"):
        planmod.make_plan(RunConfig())


def test_plan_reads_a_model_config_on_s3_without_its_weights(llama_dir, s3, monkeypatch):
    from fulltune import storage

    uri = s3 + "/models/llama"
    storage.upload_dir(llama_dir, uri)
    storage.write_bytes(uri + "/model.safetensors", b"not weights: must never be fetched")
    fetched = []
    real = storage.download_file
    monkeypatch.setattr(storage, "download_file", lambda u, p: (fetched.append(u), real(u, p)))
    cfg = RunConfig.from_dict({"model": {"base_model_uri": uri}})
    shape = planmod.model_shape(planmod.load_model_config(cfg))
    assert (shape.hidden_size, shape.num_layers) == (64, 3)
    assert fetched and not any(u.endswith(".safetensors") for u in fetched)


def test_plan_refuses_a_registry_whose_bucket_does_not_exist(llama_dir, s3, tmp_path):
    """The register step is the run's last: a registry bucket that is not there would fail it after
    the training. plan asks S3 first (with the credentials every step reads) and names the field."""
    base = {
        "work_dir": str(tmp_path / "work"),
        "model": {"base_model_uri": str(llama_dir)},
        "data": {"train_uri": str(small_text_data(tmp_path))},
        "resources": {"accelerator": "cpu"},
    }
    missing = RunConfig.from_dict({**base, "registry": {"uri": "s3://fulltune-no-such-bucket/models"}})
    with pytest.raises(planmod.PlanError) as refused:
        planmod.make_plan(missing, train_tokens=10_000)
    assert str(refused.value).startswith(
        "registry.uri s3://fulltune-no-such-bucket/models: the bucket 'fulltune-no-such-bucket' does not exist"
    )
    there = RunConfig.from_dict({**base, "registry": {"uri": f"{s3}/models"}})
    assert planmod.make_plan(there, train_tokens=10_000).config.registry.uri == f"{s3}/models"


def test_plan_refuses_a_local_work_dir_or_registry_that_cannot_be_made(llama_dir, tmp_path):
    """A registry under a regular file failed register, after the whole training, with a bare
    NotADirectoryError; a work_dir there failed plan the same way. plan names the field first."""
    import os

    a_file = small_text_data(tmp_path)
    base = {
        "work_dir": str(tmp_path / "work"),
        "model": {"base_model_uri": str(llama_dir)},
        "data": {"train_uri": str(a_file)},
        "registry": {"uri": str(tmp_path / "new" / "registry")},  # made when first written: fine
        "resources": {"accelerator": "cpu"},
    }
    assert planmod.make_plan(RunConfig.from_dict(base), train_tokens=10_000)
    for name, under in (("registry.uri", f"{a_file}/reg"), ("work_dir", f"{a_file}/work")):
        section = {"registry": {"uri": under}} if name == "registry.uri" else {"work_dir": under}
        with pytest.raises(PlanError) as refused:
            planmod.make_plan(RunConfig.from_dict({**base, **section}), train_tokens=10_000)
        assert (
            str(refused.value)
            == f"{name} {under}: {a_file} is a file, not a directory: nothing can be made under it"
        )
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(
            PlanError, match=rf"^registry.uri {locked}/reg: {locked} is a directory this user"
        ):
            planmod.make_plan(
                RunConfig.from_dict({**base, "registry": {"uri": f"{locked}/reg"}}), train_tokens=10_000
            )


def _gpu_cfg(training: dict, **resources) -> RunConfig:
    return RunConfig.from_dict(
        {
            "preprocess": {"max_seq_len": 4096},
            "training": {"per_device_train_batch_size": 1, "gradient_checkpointing": True, **training},
            "resources": {"gpu_memory_gib": 80, "nproc_per_node": 8, **resources},
        }
    )


def test_forced_offload_is_honoured_in_the_estimate_and_the_deepspeed_json():
    s = shape_8b()
    # Fits without offload; forcing both on moves the model states to CPU anyway.
    cfg = _gpu_cfg({"offload_optimizer": True, "offload_param": True})
    mem, _, notes = planmod.choose_memory_settings(cfg, s)
    assert mem.offload_optimizer and mem.offload_params
    assert mem.model_states == pytest.approx(s.params * 2 / 8)  # only the bf16 grads stay on the GPU
    assert "training.offload_optimizer forced to True" in notes
    zero = planmod.deepspeed_config(cfg, s)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    # Left to plan, the same run needs no offload.
    mem, _, _ = planmod.choose_memory_settings(_gpu_cfg({}), s)
    assert (
        not mem.offload_optimizer
        and "offload_optimizer" not in planmod.deepspeed_config(_gpu_cfg({}), s)["zero_optimization"]
    )


def test_offload_forced_off_refuses_where_plan_would_have_offloaded():
    s = shape_8b()
    mem, _, _ = planmod.choose_memory_settings(_gpu_cfg({}, nproc_per_node=1), s)
    assert mem.offload_optimizer  # plan's own choice on one 80 GiB GPU
    with pytest.raises(PlanError, match="forced offload settings"):
        planmod.choose_memory_settings(_gpu_cfg({"offload_optimizer": False}, nproc_per_node=1), s)


def test_across_nodes_plan_partitions_a_parameter_copy_within_each_node():
    """Llama-3.1-8B on 2 nodes of 8 GPUs: ZeRO++'s hierarchical partitioning is on (each node's GPUs
    share a 16-bit copy of the parameters, 2 bytes per parameter / 8 per GPU, counted in the total),
    in the resolved config, the DeepSpeed JSON, the notes and the report. On one node there is no
    network to save: nothing changes."""
    s = shape_8b()
    two_nodes = _gpu_cfg({}, num_nodes=2, launcher="kubernetes")
    mem, budget, notes = planmod.choose_memory_settings(two_nodes, s)
    assert (mem.hpz_partition_size, mem.secondary_params) == (8, pytest.approx(2 * s.params / 8))
    without = planmod.estimate_memory(
        s, world_size=16, seq_len=4096, micro_batch=1, gradient_checkpointing=True, liger=True
    )
    assert mem.total == pytest.approx(without.total + 1.2 * mem.secondary_params)  # + its fragmentation
    assert any(n.startswith("ZeRO++ hierarchical partitioning over each node's 8 GPUs") for n in notes)
    over = planmod.resolved_fields(two_nodes, s, mem, 10**6)[0]
    resolved = two_nodes.with_overrides(over)
    assert resolved.training.hierarchical_partitioning is True
    assert planmod.deepspeed_config(resolved, s)["zero_optimization"]["zero_hpz_partition_size"] == 8
    report = planmod.plan_markdown(planmod.Plan(s, mem, budget, 16, 10**6, notes, resolved))
    assert "| hpZ copy of the parameters | 1.9 GiB |" in report

    one_node = _gpu_cfg({})
    mem, budget, notes = planmod.choose_memory_settings(one_node, s)
    assert (mem.hpz_partition_size, mem.secondary_params) == (1, 0)
    assert not any("hierarchical" in n for n in notes)
    resolved = one_node.with_overrides(planmod.resolved_fields(one_node, s, mem, 10**6)[0])
    assert planmod.deepspeed_config(resolved, s)["zero_optimization"]["zero_hpz_partition_size"] == 1
    report = planmod.plan_markdown(planmod.Plan(s, mem, budget, 8, 10**6, notes, resolved))
    assert "hpZ" not in report


def test_the_parameter_copy_gives_way_to_a_faster_setting_and_forcing_it_is_checked(llama_dir, tmp_path):
    """Where the copy does not fit beside the fastest setting that fits without it, plan keeps that
    setting and says why the copy is off; forced off, it is off; forced on where it cannot work, the
    run is refused naming the field."""
    from fulltune.config import ConfigError

    s = shape_8b()

    def gib(hpz: int) -> float:
        e = planmod.estimate_memory(
            s,
            world_size=16,
            seq_len=4096,
            micro_batch=1,
            gradient_checkpointing=False,
            hpz_partition_size=hpz,
            liger=True,  # plan's default for a Llama on GPUs
        )
        return e.total / 0.9 / 2**30

    tight = _gpu_cfg(
        {"gradient_checkpointing": False},
        num_nodes=2,
        launcher="kubernetes",
        gpu_memory_gib=(gib(1) + gib(8)) / 2,
    )
    mem, _, notes = planmod.choose_memory_settings(tight, s)
    assert (mem.hpz_partition_size, mem.gradient_checkpointing) == (1, False)
    assert any(n.startswith("ZeRO++ hierarchical partitioning off: its copy") for n in notes), notes
    forced_off = _gpu_cfg({"hierarchical_partitioning": False}, num_nodes=2, launcher="kubernetes")
    assert planmod.choose_memory_settings(forced_off, s)[0].hpz_partition_size == 1
    offloaded = _gpu_cfg({"offload_param": True}, num_nodes=2, launcher="kubernetes")
    assert planmod.choose_memory_settings(offloaded, s)[0].hpz_partition_size == 1

    # refused when the config is read (before a run exists), naming the field
    base = {"model": {"base_model_uri": str(llama_dir)}, "data": {"train_uri": str(tmp_path / "x.jsonl")}}
    for resources, training, why in (
        ({}, {}, "resources.num_nodes is 1"),
        ({"num_nodes": 2, "nproc_per_node": 1}, {}, "resources.nproc_per_node is 1"),
        ({"num_nodes": 2, "nproc_per_node": 2}, {"offload_param": True}, "training.offload_param is set"),
    ):
        with pytest.raises(ConfigError, match=f"  training.hierarchical_partitioning: set but {why}"):
            RunConfig.from_dict(
                {
                    **base,
                    "training": {"hierarchical_partitioning": True, **training},
                    "resources": {"launcher": "kubernetes", **resources},
                }
            )


def test_a_refusal_under_a_forced_parameter_copy_does_not_claim_full_offload_was_tried():
    """A 70B Llama on 2 nodes of 8 x 40 GiB fits only with the parameters offloaded too; with
    training.hierarchical_partitioning forced on plan cannot offload them (the copy would bring them
    back), and the refusal says so, and what lets plan offload them, rather than 'full CPU offload'."""
    llama_70b = ModelShape(70_553_706_496, 128256 * 8192, 8192, 80, 128256, "llama", 28672, True)
    free = _gpu_cfg({}, num_nodes=2, launcher="kubernetes", gpu_memory_gib=40)
    assert planmod.choose_memory_settings(free, llama_70b)[0].offload_params
    forced = _gpu_cfg(
        {"hierarchical_partitioning": True}, num_nodes=2, launcher="kubernetes", gpu_memory_gib=40
    )
    with pytest.raises(PlanError) as refused:
        planmod.choose_memory_settings(forced, llama_70b)
    message = str(refused.value)
    assert "full CPU offload" not in message
    assert (
        "the optimizer offloaded to CPU; the parameters were not, as training.hierarchical_partitioning"
        in message
    )
    assert "unset it to let plan offload them too" in message


def test_adafactor_needs_12_bytes_per_parameter_and_no_optimizer_block():
    s = shape_8b()
    kw = dict(world_size=8, seq_len=4096, micro_batch=1, gradient_checkpointing=True)
    ada = planmod.estimate_memory(s, optim="adafactor", **kw)
    adam = planmod.estimate_memory(s, **kw)
    assert ada.model_states == pytest.approx(s.params * 12 / 8)
    assert adam.model_states - ada.model_states == pytest.approx(s.params * 4 / 8)
    off = planmod.estimate_memory(s, optim="adafactor", offload_optimizer=True, **kw)
    assert off.model_states == pytest.approx(s.params * 4 / 8)
    # The trainer builds the optimizer and schedule itself: DeepSpeed must not build another.
    cfg = _gpu_cfg({"optim": "adafactor"})
    mem, _, _ = planmod.choose_memory_settings(cfg, s)
    assert mem.model_states == pytest.approx(ada.model_states)
    ds = planmod.deepspeed_config(cfg, s)
    assert "optimizer" not in ds and "scheduler" not in ds
    assert ds["zero_allow_untested_optimizer"] is True


def test_fp16_gets_dynamic_loss_scaling_on_gpu_only_and_is_exclusive_with_bf16():
    from fulltune.config import ConfigError

    s = shape_8b()
    cfg = _gpu_cfg({"bf16": False, "fp16": True})
    mem, _, _ = planmod.choose_memory_settings(cfg, s)
    ds = planmod.deepspeed_config(cfg, s)
    assert ds["fp16"]["enabled"] is True and ds["fp16"]["loss_scale"] == 0  # 0 = dynamic
    assert ds["bf16"]["enabled"] is False
    cpu = _gpu_cfg({"bf16": False, "fp16": True}, accelerator="cpu")
    assert planmod.deepspeed_config(cpu, s)["fp16"]["enabled"] is False
    assert planmod.deepspeed_config(_gpu_cfg({}), s)["fp16"]["enabled"] is False
    with pytest.raises(ConfigError, match=r"training\.fp16: training\.bf16 and training\.fp16"):
        _gpu_cfg({"fp16": True})  # bf16 defaults to true: refused when the config is read


def test_contradictory_training_settings_are_refused_when_the_config_is_read(llama_dir, tmp_path):
    """Pure config contradictions are refused by the config's validators, so `config --check`,
    `submit` and `schedule` refuse them before a run exists; each line names its field."""
    from fulltune.config import ConfigError

    base = {"model": {"base_model_uri": str(llama_dir)}, "data": {"train_uri": str(tmp_path / "x.jsonl")}}
    refused = [
        (
            {"training": {"fp16": True}},
            r"  training\.fp16: training\.bf16 and training\.fp16 .* \(got True\)",
        ),
        (
            {"training": {"early_stopping_patience": 2}},
            r"  training\.early_stopping_patience: set but training\.eval_steps is 0.* \(got 2\)",
        ),
        ({"training": {"stop_on_forgetting": True}}, r"  training\.stop_on_forgetting: .*eval_steps is 0"),
        (
            {"training": {"stop_on_forgetting": True, "eval_steps": 10}},
            r"  training\.stop_on_forgetting: set but data\.general_uri is empty",
        ),
        (
            {"training": {"use_liger_kernel": True}, "resources": {"accelerator": "cpu"}},
            r"  training\.use_liger_kernel: .*accelerator is cpu: Liger's kernels are Triton",
        ),
        (
            {"training": {"attn_implementation": "flash_attention_2"}, "resources": {"accelerator": "cpu"}},
            r"  training\.attn_implementation: .*flash_attention_2 but resources\.accelerator is cpu.*set sdpa",
        ),
        # bf16, the default, on a GPU from before Ampere: refused naming fp16, which the same GPU has
        (
            {"resources": {"gpu_type": "T4", "gpu_memory_gib": 15}},
            r"  training\.bf16: .*resources\.gpu_type T4 has no bf16 .* training\.fp16: true",
        ),
    ]
    for change, message in refused:
        with pytest.raises(ConfigError, match=message):
            RunConfig.from_dict({**base, **change})
    on_t4 = {**base, "resources": {"gpu_type": "T4", "gpu_memory_gib": 15}}
    fp16 = {**on_t4, "training": {"bf16": False, "fp16": True}}
    assert planmod.make_plan(RunConfig.from_dict(fp16), train_tokens=10_000).config.precision == "fp16"


def test_plan_still_refuses_a_contradiction_that_got_past_the_validators(llama_dir, tmp_path):
    """A config changed after it was read (validate_assignment checks one section, not the others)
    is asked again by plan and by train (`check_training`)."""
    from fulltune.config import ConfigError

    base = {"model": {"base_model_uri": str(llama_dir)}, "data": {"train_uri": str(tmp_path / "x.jsonl")}}
    cfg = RunConfig.from_dict({**base, "training": {"use_liger_kernel": True}})
    cfg.resources.accelerator = "cpu"
    with pytest.raises(
        ConfigError, match=r"training\.use_liger_kernel: set but resources\.accelerator is cpu"
    ):
        planmod.make_plan(cfg, train_tokens=1)


def shape_869m() -> ModelShape:
    # the GPU benchmark's Llama: hidden 2048, 16 layers, SwiGLU 5461, vocab 32000, untied
    return ModelShape(869_423_104, 32000 * 2048, 2048, 16, 32000, "llama", 5461, True)


def test_zero3_buckets_are_sized_from_the_model_not_from_h_squared():
    """A 1B model's gradients go out in ~16 reduce-scatters (not ~200 of h^2), the next two blocks
    are prefetched, norms stay gathered; 8B hits DeepSpeed's own 5e8 cap; the DeepSpeed JSON and the
    plan's decisions say so."""
    s = shape_869m()
    z = planmod.zero3_settings(s, gpu=True)
    block = (s.params - 2 * 32000 * 2048) // 16
    assert planmod.layer_params(s) == block
    assert z.reduce_bucket_size == s.params // 16  # > one block, < 5e8
    assert z.prefetch_bucket_size == 2 * block
    assert z.persistence_threshold == 100_000 > 2048  # the norms (h elements) stay gathered
    assert math.ceil(s.params / z.reduce_bucket_size) <= 17
    big = planmod.zero3_settings(shape_8b(), gpu=True)
    assert big.reduce_bucket_size == 500_000_000  # DeepSpeed's default is the cap
    assert planmod.zero3_settings(s, gpu=False).overlap_comm is False

    cfg = RunConfig.from_dict({"resources": {"accelerator": "gpu"}})
    zero = planmod.deepspeed_config(cfg, s)["zero_optimization"]
    assert zero["reduce_bucket_size"] == z.reduce_bucket_size
    assert zero["stage3_prefetch_bucket_size"] == z.prefetch_bucket_size
    assert zero["stage3_param_persistence_threshold"] == z.persistence_threshold
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    notes = planmod.resolved_fields(cfg, s, planmod.estimate_memory(s, **_ONE_GPU), 10**6)[1]
    assert any("reduce-scatters per backward" in n for n in notes)


def test_the_prefetch_note_says_how_much_of_a_block_the_bucket_holds():
    """ "The next two blocks" only where the bucket holds them: a 70B block (8.6e8 parameters) is
    larger than the 5e8 bucket, and a tied 1B Llama's blocks (61M, as the model counts them) are
    larger than the estimate the bucket was sized from."""

    def note(shape: ModelShape, block: int) -> str:
        with_block = dataclasses.replace(shape, block_class="LlamaDecoderLayer", block_params=block)
        return next(r for r in planmod.zero3_settings(with_block, gpu=True).reasons if "prefetch" in r)

    llama_70b = ModelShape(70_553_706_496, 128256 * 8192, 8192, 80, 128256, "llama", 28672, True)
    assert note(llama_70b, 855_654_400) == (
        "ZeRO-3 prefetch bucket 500,000,000 elements (the most plan sets): ~58% of the next block "
        "(855,654,400 parameters) gathered while this one computes"
    )
    assert "the next ~1.5 blocks (60,821,504 parameters each)" in note(shape_llama3_1b(), 60_821_504)
    assert "the next two blocks (218,112,000 parameters each)" in note(shape_8b(), 218_112_000)


def test_each_transformer_block_becomes_one_zero3_leaf_and_the_plan_says_so(llama_dir):
    """The threshold plan writes is the block's DeepSpeed granularity (its parameters over its 12
    modules with parameters: itself, attention, MLP, 7 linears, 2 norms), the gathered-layer memory
    covers a whole block, and a model where the threshold would also take in a larger module gets no
    threshold."""
    from transformers import Qwen2Config

    cfg = RunConfig.from_dict(
        {"model": {"base_model_uri": str(llama_dir)}, "resources": {"accelerator": "gpu"}}
    )
    s = planmod.model_shape(planmod.load_model_config(cfg))
    block = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64  # q, o; k, v (2 of 4 heads); MLP; norms
    assert (s.block_class, s.block_params, s.block_leaf_threshold) == (
        "LlamaDecoderLayer",
        block,
        block // 12,
    )
    zero = planmod.deepspeed_config(cfg, s)["zero_optimization"]
    assert zero["stage3_module_granularity_threshold"] == block // 12
    notes = planmod.resolved_fields(cfg, s, planmod.estimate_memory(s, **_ONE_GPU), 10**6)[1]
    assert any("each LlamaDecoderLayer" in n and "one unit" in n for n in notes)

    # A 64-token vocabulary: the whole model's granularity falls under a block's, so a threshold
    # that reaches the blocks would gather the whole model as one unit.
    small = planmod.model_shape(
        Qwen2Config(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=160,
            vocab_size=64,
        )
    )
    assert small.block_class == "Qwen2DecoderLayer" and small.block_leaf_threshold == 0
    assert planmod.zero3_settings(small, gpu=True).leaf_threshold == 0
    assert "hooks on every module" in planmod.leaf_reason(small)

    wide = dataclasses.replace(shape_869m(), block_class="B", block_params=10**9, block_leaf_threshold=1)
    assert planmod.estimate_memory(wide, **_ONE_GPU).gathered_layers == 4 * 10**9


_ONE_GPU = dict(world_size=1, seq_len=2048, micro_batch=4, gradient_checkpointing=False)


def shape_llama3_1b() -> ModelShape:
    # Llama-3.2-1B: hidden 2048, 16 layers, SwiGLU 8192, a 128k vocabulary, tied embeddings
    return ModelShape(1_235_814_400, 128256 * 2048, 2048, 16, 128256, "llama", 8192, True)


def _sized_gpu(gib: float, seq: int, **training) -> RunConfig:
    return RunConfig.from_dict(
        {
            "preprocess": {"max_seq_len": seq},
            "training": training,
            "resources": {"gpu_memory_gib": gib, "accelerator": "gpu"},
        }
    )


def test_chunk_size_keeps_about_a_gib_of_logits():
    assert planmod.loss_chunk_size(shape_llama3_1b()) == 2048  # 1 GiB / (4 bytes x 128k) ~ 2093
    assert planmod.loss_chunk_size(shape_869m()) == 8192  # 32k vocabulary: capped
    s8 = shape_8b()
    plain = planmod.estimate_memory(
        s8, world_size=8, seq_len=4096, micro_batch=1, gradient_checkpointing=True
    )
    chunked = planmod.estimate_memory(
        s8, world_size=8, seq_len=4096, micro_batch=1, gradient_checkpointing=True, loss_chunk_tokens=1024
    )
    assert plain.logits == pytest.approx(12 * 4096 * 128256)
    # one chunk of fp32 logits + its 16-bit gradient, the 16-bit gradients of the head and hidden states
    assert chunked.logits == pytest.approx(6 * 1024 * 128256 + 2 * 128256 * 4096 + 2 * 4096 * 4096)
    assert chunked.logits < plain.logits / 3


def test_plan_chunks_the_loss_only_where_the_plain_logits_do_not_fit():
    """The chunked loss is a little slower: a 128k vocabulary at 4096 x 2 tokens gets it on a GPU
    where the plain logits would not fit, before recomputation is turned on; not where they fit;
    a forced 0 is kept (and recomputation pays instead)."""
    s = shape_llama3_1b()
    kw = dict(world_size=1, seq_len=4096, micro_batch=2, gradient_checkpointing=False)
    plain = planmod.estimate_memory(s, **kw).total
    chunked = planmod.estimate_memory(s, **kw, loss_chunk_tokens=2048).total
    gib = (plain + chunked) / 2 / 0.9 / 2**30  # a GPU between the two
    cfg = _sized_gpu(gib, 4096, per_device_train_batch_size=2)
    mem, _, notes = planmod.choose_memory_settings(cfg, s)
    assert (mem.loss_chunk_tokens, mem.gradient_checkpointing, mem.micro_batch) == (2048, False, 2)
    assert any("loss computed 2048 tokens at a time" in n for n in notes)
    assert planmod.resolved_fields(cfg, s, mem, 10**6)[0]["training.loss_chunk_tokens"] == 2048

    roomy = planmod.choose_memory_settings(
        _sized_gpu(plain / 0.9 / 2**30 + 1, 4096, per_device_train_batch_size=2), s
    )
    assert roomy[0].loss_chunk_tokens == 0
    forced = planmod.choose_memory_settings(
        _sized_gpu(gib, 4096, per_device_train_batch_size=2, loss_chunk_tokens=0), s
    )
    assert (forced[0].loss_chunk_tokens, forced[0].gradient_checkpointing) == (0, True)


def test_each_recomputed_layer_trades_its_activations_for_its_input():
    """Selective recomputation: r of L layers keep only their 2*h-byte input per token, one layer's
    worth is live while one recomputes; r = L is full recomputation, r = 0 none."""
    s = shape_869m()
    kw = dict(world_size=1, seq_len=2048, micro_batch=4)
    none = planmod.estimate_memory(s, gradient_checkpointing=False, **kw).activations
    full = planmod.estimate_memory(s, gradient_checkpointing=True, **kw).activations
    per_layer = none / 16
    kept_input = 2.0 * 2048 * 4 * 2048
    for r in (1, 4, 15):
        e = planmod.estimate_memory(s, gradient_checkpointing=True, recompute_layers=r, **kw)
        assert e.recompute_layers == r
        assert e.activations == pytest.approx((16 - r) * per_layer + r * kept_input + per_layer)
        assert full < e.activations < none + per_layer
    assert (
        planmod.estimate_memory(s, gradient_checkpointing=True, recompute_layers=16, **kw).activations == full
    )
    assert (
        planmod.estimate_memory(s, gradient_checkpointing=False, recompute_layers=4, **kw).recompute_layers
        == 0
    )


def test_plan_recomputes_the_fewest_layers_that_fit():
    """Where the activations of all 16 layers do not fit but those of a few recomputed ones would,
    plan recomputes exactly as many as needed (one fewer does not fit), says so and writes it into
    the resolved config; the plan report shows it. A configured count is kept, gradient_checkpointing
    alone means all layers, and a count above the model's layers is refused by its name."""
    s = shape_869m()
    kw = dict(world_size=1, seq_len=2048, micro_batch=8)

    def gib(r: int) -> float:
        e = planmod.estimate_memory(
            s, gradient_checkpointing=r > 0, recompute_layers=r or None, liger=True, **kw
        )
        return e.total / 0.9 / 2**30

    cfg = _sized_gpu((gib(4) + gib(5)) / 2, 2048, per_device_train_batch_size=8, loss_chunk_tokens=0)
    mem, budget, notes = planmod.choose_memory_settings(cfg, s)
    assert (mem.micro_batch, mem.gradient_checkpointing, mem.recompute_layers) == (8, True, 5)
    assert gib(4) * 0.9 * 2**30 > budget >= mem.total
    assert any(n.startswith("enabled gradient_checkpointing on 5 of 16 layers") for n in notes), notes
    over = planmod.resolved_fields(cfg, s, mem, 10**6)[0]
    assert (over["training.gradient_checkpointing"], over["training.gradient_checkpointing_layers"]) == (
        True,
        5,
    )
    resolved = cfg.with_overrides(over)
    report = planmod.plan_markdown(planmod.Plan(s, mem, budget, 1, 10**6, notes, resolved))
    assert "| gradient checkpointing | 5 of 16 layers (selective) |" in report

    # what the config says wins: a count, or every layer with gradient_checkpointing alone
    kept = cfg.with_overrides({"training.gradient_checkpointing_layers": 8})
    assert planmod.choose_memory_settings(kept, s)[0].recompute_layers == 8
    full = cfg.with_overrides({"training.gradient_checkpointing": True})
    assert planmod.choose_memory_settings(full, s)[0].recompute_layers == 16
    roomy = _sized_gpu(gib(0) + 1, 2048, per_device_train_batch_size=8, loss_chunk_tokens=0)
    assert (
        planmod.resolved_fields(roomy, s, planmod.choose_memory_settings(roomy, s)[0], 10**6)[0][
            "training.gradient_checkpointing_layers"
        ]
        is None
    )
    with pytest.raises(PlanError, match="training.gradient_checkpointing_layers is 17 but the model has 16"):
        planmod.choose_memory_settings(cfg.with_overrides({"training.gradient_checkpointing_layers": 17}), s)


def test_plan_trades_accumulation_for_a_larger_micro_batch_where_it_fits():
    """4 x 2 on a GPU with room becomes 8 x 1 (the same global batch, half the micro-steps); without
    the room it stays 4 x 2; on CPU nothing is changed."""
    s = shape_869m()
    big = _sized_gpu(141, 2048, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    mem, _, notes = planmod.choose_memory_settings(big, s)
    assert (mem.micro_batch, mem.gradient_checkpointing, mem.loss_chunk_tokens) == (8, False, 0)
    assert any("micro batch 4 -> 8" in n for n in notes)
    over = planmod.resolved_fields(big, s, mem, 10**6)[0]
    assert (over["training.per_device_train_batch_size"], over["training.gradient_accumulation_steps"]) == (
        8,
        1,
    )

    eight = planmod.estimate_memory(
        s, world_size=1, seq_len=2048, micro_batch=8, gradient_checkpointing=False
    )
    four = planmod.estimate_memory(s, world_size=1, seq_len=2048, micro_batch=4, gradient_checkpointing=False)
    tight = _sized_gpu(
        (eight.total + four.total) / 2 / 0.9 / 2**30,
        2048,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
    )
    assert planmod.choose_memory_settings(tight, s)[0].micro_batch == 4
    cpu = big.with_overrides({"resources.accelerator": "cpu"})
    assert planmod.choose_memory_settings(cpu, s)[0].micro_batch == 4


@pytest.mark.parametrize(("micro", "accumulation"), [(5, 1), (7, 1), (5, 2), (6, 1)])
def test_a_smaller_micro_batch_keeps_the_configured_global_batch(micro, accumulation):
    """Where the configured micro batch does not fit, plan tries smaller ones with more accumulation:
    only ones that divide the rank's sequences per step, so 5 x 1 becomes 1 x 5, not 2 x 2 (a global
    batch of 32 where 40 was configured), and the note says the accumulation it resolves."""
    cfg = RunConfig.from_dict(
        {
            "preprocess": {"max_seq_len": 8192},
            "training": {"per_device_train_batch_size": micro, "gradient_accumulation_steps": accumulation},
            "resources": {"gpu_memory_gib": 40, "nproc_per_node": 8},
        }
    )
    mem, _, notes = planmod.choose_memory_settings(cfg, shape_8b())
    assert mem.micro_batch < micro  # the configured one does not fit
    resolved = cfg.with_overrides(planmod.resolved_fields(cfg, shape_8b(), mem, 10**9)[0])
    assert resolved.global_batch_size == cfg.global_batch_size == micro * accumulation * 8
    new_accumulation = resolved.training.gradient_accumulation_steps
    assert (
        f"micro batch {micro} -> {mem.micro_batch}, gradient accumulation {accumulation} -> {new_accumulation} keeps the global batch"
        in notes
    )


def test_liger_kernels_keep_fewer_activations_as_measured_on_a_1b_llama():
    """With Liger's kernels a layer keeps 8 bytes per h and 2 per I fewer per token: on the 1B Llama
    at micro batch 8 x 2048 tokens, 8.0 GiB less, where an H200 measured 8.1 (peak allocated 68.9 ->
    60.8 GiB, docs/benchmarks.md); the estimate of the allocated part stays above the measured peak
    and within the +10% the memory model keeps."""
    s = shape_llama3_1b()
    kw = dict(world_size=1, seq_len=2048, micro_batch=8, gradient_checkpointing=False)
    plain, fused = planmod.estimate_memory(s, **kw), planmod.estimate_memory(s, liger=True, **kw)
    assert plain.activations - fused.activations == pytest.approx(16 * 16384 * (8 * 2048 + 2 * 8192))
    assert (plain.activations - fused.activations) / 2**30 == pytest.approx(8.0)

    def allocated_gib(e) -> float:
        return (e.total - e.fragmentation - e.overhead) / 2**30

    for estimate, measured in ((plain, 68.9), (fused, 60.8)):
        assert measured < allocated_gib(estimate) <= 1.10 * measured
    # an ungated MLP has no SwiGLU to fuse: only the norms keep less
    ungated = dataclasses.replace(s, gated_mlp=False)
    assert planmod.layer_activation_bytes(ungated, False) - planmod.layer_activation_bytes(
        ungated, True
    ) == pytest.approx(8 * 2048)


def test_plan_turns_liger_on_for_the_models_it_knows_them_for_on_gpus():
    """Left unset, Liger's kernels are on for a Llama on GPUs, with the reason in the plan and the
    resolved config; off on CPU and for a model type plan does not know them for (saying so); what the
    config says wins either way."""
    s = shape_llama3_1b()

    def resolve(shape: ModelShape, **training) -> tuple[bool, list[str]]:
        cfg = _sized_gpu(141, 2048, **training)
        mem, _, _ = planmod.choose_memory_settings(cfg, shape)
        over, notes = planmod.resolved_fields(cfg, shape, mem, 10**6)
        return over["training.use_liger_kernel"], [n for n in notes if "Liger" in n]

    on, notes = resolve(s)
    assert on and notes == [
        "Liger's fused kernels on (llama: RMSNorm, SwiGLU and rotary embeddings as one kernel each): "
        "faster steps and fewer activations kept"
    ]
    assert resolve(s, use_liger_kernel=False) == (False, [])
    gpt2 = dataclasses.replace(s, model_type="gpt2", gated_mlp=False)
    off, notes = resolve(gpt2)
    assert not off and len(notes) == 1
    assert "left off: plan turns them on for gemma, " in notes[0] and "not gpt2" in notes[0]
    assert "training.use_liger_kernel true tries them on it if liger-kernel has kernels for it" in notes[0]
    assert resolve(gpt2, use_liger_kernel=True) == (True, [])
    cpu = _sized_gpu(141, 2048).with_overrides({"resources.accelerator": "cpu"})
    assert planmod.use_liger(cpu, s) is False and planmod.liger_notes(cpu, s, False) == []
    # the memory plan counts what the kernels save: the same run fits where it would not without them
    fused = planmod.estimate_memory(
        s, world_size=1, seq_len=2048, micro_batch=8, gradient_checkpointing=False, liger=True
    )
    tight = _sized_gpu(
        fused.total / 0.9 / 2**30 + 0.5, 2048, per_device_train_batch_size=8, loss_chunk_tokens=0
    )
    assert planmod.choose_memory_settings(tight, s)[0].recompute_layers == 0
    assert (
        planmod.choose_memory_settings(tight.with_overrides({"training.use_liger_kernel": False}), s)[
            0
        ].recompute_layers
        > 0
    )


def test_training_defaults_follow_common_practice():
    tr = RunConfig().training
    assert tr.weight_decay == 0.01
    assert tr.attn_implementation == "sdpa" and tr.torch_compile is False and tr.loss_chunk_tokens is None
    assert tr.use_liger_kernel is None  # plan decides: on for the models it knows them for, on GPUs
    assert "0.01" in type(tr).model_fields["weight_decay"].description


def test_plan_warns_of_matrix_dimensions_the_fast_gpu_kernels_cannot_take():
    odd = ModelShape(869_000_000, 32000 * 2048, 2048, 16, 32001, "llama", 5461, True)
    notes = planmod.alignment_notes(odd)
    assert len(notes) == 2
    assert "intermediate_size 5461 is not a multiple of 8" in notes[0] and "vocab_size 32001" in notes[1]
    assert planmod.alignment_notes(shape_869m().__class__(1, 1, 2048, 16, 32000, "llama", 5632, True)) == []


def test_a_config_transformers_cannot_read_is_a_plan_error_naming_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama-next-2031", "hidden_size": 8}))
    cfg = RunConfig.from_dict({"model": {"base_model_uri": str(tmp_path)}})
    with pytest.raises(PlanError, match=f"{tmp_path}/config.json: cannot read the model's configuration"):
        planmod.load_model_config(cfg)


def test_cost_estimate_against_a_hand_computed_run():
    """1B parameters doing matrix work, 16 layers, hidden 2048, seq 2048, 2 epochs of 500M tokens on
    8 H100s: FLOPs = 1e9 tokens x (6e9 + 12 x 16 x 2048 x 2048); wall = FLOPs / (8 x 989e12 x 0.35)."""
    from fulltune.cost import estimate_cost

    cfg = RunConfig.from_dict(
        {
            "preprocess": {"max_seq_len": 2048},
            "training": {"num_train_epochs": 2},
            "resources": {"accelerator": "gpu", "gpu_type": "H100", "num_nodes": 2, "nproc_per_node": 4},
        }
    )
    cost = estimate_cost(
        cfg, matmul_params=10**9, num_layers=16, attention_width=2048, dataset_tokens=500_000_000
    )
    flops = 1e9 * (6e9 + 12 * 16 * 2048 * 2048)  # 6.805e18
    wall_h = flops / (8 * 989e12 * 0.35) / 3600  # 0.683 h
    assert cost.tokens == 10**9 and cost.flops == pytest.approx(flops)
    assert cost.wall_hours == pytest.approx(wall_h) and cost.gpu_hours == pytest.approx(8 * wall_h)
    assert "~5.5 GPU-hours (0.7 h on 8 x H100)" in cost.summary()

    # recomputing activations costs a third more; max_steps counts steps x global batch x seq
    recompute = cfg.with_overrides({"training.gradient_checkpointing": True})
    cost_gc = estimate_cost(
        recompute, matmul_params=10**9, num_layers=16, attention_width=2048, dataset_tokens=5 * 10**8
    )
    assert cost_gc.gpu_hours == pytest.approx(cost.gpu_hours * 4 / 3)
    # selective: 4 of 16 layers recomputed pay a quarter of that third
    quarter = recompute.with_overrides({"training.gradient_checkpointing_layers": 4})
    cost_quarter = estimate_cost(
        quarter, matmul_params=10**9, num_layers=16, attention_width=2048, dataset_tokens=5 * 10**8
    )
    assert cost_quarter.gpu_hours == pytest.approx(cost.gpu_hours * (1 + 1 / 12))
    # Liger's kernels (as plan resolves them on GPUs): the step-time gain measured at 1B
    liger = cfg.with_overrides({"training.use_liger_kernel": True})
    cost_liger = estimate_cost(
        liger, matmul_params=10**9, num_layers=16, attention_width=2048, dataset_tokens=5 * 10**8
    )
    assert cost_liger.gpu_hours == pytest.approx(cost.gpu_hours / 1.13)
    assert "at an assumed 40% MFU" in cost_liger.summary()
    steps = cfg.with_overrides({"training.max_steps": 100})
    assert estimate_cost(
        steps, matmul_params=1, num_layers=1, attention_width=1, dataset_tokens=0
    ).tokens == (100 * 8 * 2048)
    assert (
        estimate_cost(RunConfig(), matmul_params=1, num_layers=1, attention_width=1, dataset_tokens=1)
        is not None
    )
    cpu = cfg.with_overrides({"resources.accelerator": "cpu"})
    assert estimate_cost(cpu, matmul_params=1, num_layers=1, attention_width=1, dataset_tokens=1) is None


def test_a_run_over_its_gpu_hour_budget_is_refused_saying_what_fits(llama_dir):
    cfg = RunConfig.from_dict(
        {
            "model": {"base_model_uri": str(llama_dir)},
            "data": {"train_uri": "unused.jsonl"},
            "training": {"num_train_epochs": 4, "learning_rate": 1e-5},
            "resources": {"accelerator": "gpu", "gpu_type": "A100", "max_gpu_hours": 1.0},
        }
    )
    ok = planmod.make_plan(cfg, train_tokens=10**6)
    assert ok.cost.gpu_hours < 1.0 and "GPU-hours" in planmod.plan_markdown(ok)
    with pytest.raises(PlanError) as refused:
        planmod.make_plan(cfg, train_tokens=10**12)
    message = str(refused.value)
    assert "above resources.max_gpu_hours 1" in message and "training.num_train_epochs" in message
    assert "more GPUs shorten the wall time, not the GPU-hours" in message


def test_a_run_of_max_steps_over_its_budget_is_told_the_steps_that_fit_not_less_data(llama_dir):
    """With max_steps the length does not depend on the data, and max_steps 0 would mean the epochs:
    the refusal names the steps that fit, or says that not even one does."""
    cfg = RunConfig.from_dict(
        {
            "model": {"base_model_uri": str(llama_dir)},
            "data": {"train_uri": "unused.jsonl"},
            "training": {"max_steps": 10, "per_device_train_batch_size": 64, "learning_rate": 1e-5},
            "preprocess": {"max_seq_len": 4096},
            "resources": {"accelerator": "gpu", "gpu_type": "A100", "nproc_per_node": 8},
        }
    )
    hours = planmod.make_plan(cfg, train_tokens=10**9).cost.gpu_hours
    with pytest.raises(PlanError) as half:
        planmod.make_plan(cfg.with_overrides({"resources.max_gpu_hours": hours * 0.55}), train_tokens=10**9)
    assert "55% of it would fit (training.max_steps 5);" in str(half.value)
    assert "less data" not in str(half.value)
    with pytest.raises(PlanError) as none:
        planmod.make_plan(cfg.with_overrides({"resources.max_gpu_hours": hours / 20}), train_tokens=10**9)
    assert "not even one optimizer step fits" in str(none.value)
    assert "max_steps 0" not in str(none.value)


def test_the_plan_says_which_launcher_trains_what_it_creates_and_how_to_choose():
    def line(**resources) -> str:
        return planmod.launcher_summary(RunConfig.from_dict({"resources": resources}))

    assert line(launcher="kubernetes") == (
        "kubernetes: a PyTorchJob (kubeflow.org/v1); trainjob would create a TrainJob "
        "(trainer.kubeflow.org/v1alpha1): `fulltune doctor` or `fulltune submit --check-cluster` says which "
        "API the cluster serves"
    )
    assert line(
        launcher="trainjob", trainjob={"runtime": "team-torch", "runtime_kind": "TrainingRuntime"}
    ).startswith(
        "trainjob: a TrainJob (trainer.kubeflow.org/v1alpha1) on TrainingRuntime team-torch; kubernetes would "
        "create a PyTorchJob (kubeflow.org/v1)"
    )
    assert line(launcher="local").startswith("local: torchrun in the train step's own pod")


def test_plan_saves_a_checkpoint_after_every_hour_of_training_unless_told(llama_dir):
    """A failure of a long GPU run without checkpoints starts it over on every GPU: unset, checkpoints
    are saved by the clock, so the hour holds however fast the run turns out to be."""

    def planned(train_tokens: int, accelerator: str = "gpu", **training):
        cfg = RunConfig.from_dict(
            {
                "model": {"base_model_uri": str(llama_dir)},
                "data": {"train_uri": "unused.jsonl"},
                "training": {"num_train_epochs": 1, "learning_rate": 1e-5, **training},
                "resources": {"accelerator": accelerator, "gpu_type": "H100"},
            }
        )
        return planmod.make_plan(cfg, train_tokens=train_tokens)

    long = planned(10**13)
    tr, hours = long.config.training, long.cost.wall_hours
    assert hours > 3 and (tr.save_steps, tr.save_every_minutes) == (0, 60)
    decisions = "\n".join(long.decisions)
    assert (
        "save_every_minutes 60 chosen (save_steps unset): a checkpoint after every 60 min of training"
        in decisions
    )
    assert f"~{hours:.1f} h estimated: about {int(hours)} of them" in decisions
    assert (
        "after every 60 min of training (training.save_every_minutes); the newest 2 kept"
        in planmod.plan_markdown(long)
    )
    on_evals = planmod.plan_markdown(planned(10**13, eval_steps=1000))
    assert "after every 60 min of training, on an evaluation step" in on_evals
    cpu = planned(10**13, accelerator="cpu").config.training  # not estimated: by the clock all the same
    assert (cpu.save_steps, cpu.save_every_minutes) == (0, 60)

    steps_only = planned(10**13, save_steps=77)  # the user's choice stays, and is the only one
    assert (steps_only.config.training.save_steps, steps_only.config.training.save_every_minutes) == (77, 0)
    assert "every 77 steps (training.save_steps); the newest 2 kept" in planmod.plan_markdown(steps_only)
    assert not any("save_every_minutes" in d for d in steps_only.decisions)
    final_only = planned(10**13, save_steps=0)
    assert "the final model only" in planmod.plan_markdown(final_only)
    assert planned(10**13, save_every_minutes=20).config.training.save_steps == 0


def llama_70b_config(tmp_path) -> Path:
    """Llama-3.1-70B's shape, config only (70.6B parameters; plan builds it on the meta device)."""
    tiny_llama_config(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ).save_pretrained(tmp_path / "llama-70b")
    return tmp_path / "llama-70b"


def test_plan_refuses_a_run_whose_checkpoints_would_fill_the_disk_before_any_data_is_made(tmp_path, s3):
    """A 70B Llama (config only) keeps 3 checkpoints of ~790 GiB at the peak: far more than this
    machine's disk. Refused by plan, naming the directory, what is free, what the run writes and what
    to change; with work_dir on S3 the checkpoints go through the temp directory, which is named."""
    import shutil

    llama_70b_config(tmp_path)
    data = small_text_data(tmp_path)
    checkpoint = 12 * 70_553_706_496  # bytes: AdamW's fp32 weights and two moments
    # as many kept as it takes not to fit, however large this machine's disk
    keep = max(2, int(shutil.disk_usage(tmp_path).free // checkpoint) + 1)

    def plan(work_dir: str):
        cfg = RunConfig.from_dict(
            {
                "work_dir": work_dir,
                "model": {"base_model_uri": str(tmp_path / "llama-70b")},
                "data": {"train_uri": str(data)},
                "training": {"save_total_limit": keep},
                "resources": {"nproc_per_node": 8, "gpu_memory_gib": 141},
            }
        )
        return planmod.make_plan(cfg, train_tokens=10**8)

    with pytest.raises(planmod.PlanError) as refused:
        plan(str(tmp_path / "work"))
    message = str(refused.value)
    assert message.startswith(f"not enough disk: the work_dir {tmp_path} has ")
    assert (
        f"({keep + 1} checkpoints of ~788.5 GiB at once: training.save_total_limit {keep} and the next"
        in message
    )
    assert "lower training.save_total_limit, or put work_dir on s3://" in message
    assert not (tmp_path / "work").exists()  # nothing written

    with pytest.raises(planmod.PlanError, match=r"the temp directory .*\(a node's share of a checkpoint"):
        plan(f"{s3}/work")  # local training stages every checkpoint before its upload


def test_a_full_disk_is_not_told_to_keep_fewer_checkpoints_where_none_would_be_freed(tmp_path):
    """Lowering training.save_total_limit frees nothing for a run that saves no checkpoint, or keeps
    one already: the refusal names it only where it would help."""
    import shutil

    from fulltune import disk

    params = int(shutil.disk_usage(tmp_path).free)  # its 16-bit model alone is twice the free space

    def problem(**training) -> str:
        cfg = RunConfig.from_dict({"work_dir": str(tmp_path / "work"), "training": training})
        return disk.estimate_disk(cfg, params).problems()[0]

    final_only = problem(save_steps=0, save_every_minutes=0)
    assert "(the final model, " in final_only
    assert final_only.endswith(": free space there, or put work_dir on s3://")
    assert (
        "save_total_limit"
        not in problem(save_steps=100, save_every_minutes=0, save_total_limit=1).split(": ")[-1]
    )
    assert "lower training.save_total_limit" in problem(
        save_steps=100, save_every_minutes=0, save_total_limit=2
    )


def test_plan_refuses_an_evaluation_that_cannot_hold_the_model_before_any_training(tmp_path, s3):
    """A 70B Llama's bfloat16 weights (131 GiB) cannot go whole onto one 80 GiB GPU, which evaluation's
    default placement does: refused before the GPUs train for days, naming the placement and the GPU
    count that holds it; with evaluation.device_map auto the plan says how many the evaluate step needs."""
    llama_70b_config(tmp_path)

    def plan(evaluation: dict, **resources):
        cfg = RunConfig.from_dict(
            {
                "work_dir": f"{s3}/work",  # a cluster run: no local disk to fill
                "model": {"base_model_uri": str(tmp_path / "llama-70b")},
                "data": {"train_uri": str(small_text_data(tmp_path))},
                "resources": {"launcher": "kubernetes", "num_nodes": 8, "nproc_per_node": 8, **resources},
                "evaluation": evaluation,
            }
        )
        return planmod.make_plan(cfg, train_tokens=10**8)

    with pytest.raises(planmod.PlanError) as refused:
        plan({})
    assert str(refused.value) == (
        "evaluation cannot hold the model: its 131.4 GiB of bfloat16 weights go whole onto one GPU "
        "(evaluation.device_map: single), and a GPU has 72.0 GiB usable (resources.gpu_memory_gib 80 x "
        "memory_headroom 0.9): set evaluation.device_map: auto and give the evaluate step 2 or more GPUs "
        "(fulltune compile --eval-gpus 2)"
    )
    spread = plan({"device_map": "auto"})
    assert (
        "evaluation.device_map auto: each model's 131.4 GiB of bfloat16 weights spread over the evaluate "
        "step's GPUs, at least 2 of 80 GiB (fulltune compile --eval-gpus)"
    ) in spread.decisions
    on_b200 = plan({}, gpu_memory_gib=180)  # one GPU holds it whole: nothing to say
    assert not [d for d in on_b200.decisions if "evaluat" in d]


def test_cluster_training_pods_request_the_disk_their_tmp_holds(llama_dir, tmp_path, s3):
    """On a cluster an s3:// work_dir's checkpoints pass through each pod's /tmp, the node's disk:
    plan requests what the largest of them needs as ephemeral storage (the doctor's quota check
    counts it), so the scheduler picks nodes that hold it; a size the user set is kept."""
    from fulltune.doctor import training_pod_needs

    data = small_text_data(tmp_path)
    tiny_llama_config(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_key_value_heads=8,
    ).save_pretrained(tmp_path / "llama-8b")
    cfg = RunConfig.from_dict(
        {
            "work_dir": f"{s3}/runs",
            "model": {"base_model_uri": str(tmp_path / "llama-8b")},
            "data": {"train_uri": str(data)},
            "resources": {"launcher": "kubernetes", "num_nodes": 2, "nproc_per_node": 8},
        }
    )
    plan = planmod.make_plan(cfg, train_tokens=10**8)
    # a node's half of a checkpoint (12 bytes a parameter) is the largest thing staged, then 8 GiB
    # of compile caches
    share = 12 * plan.shape.params / 2
    gib = math.ceil((share + 8 * 2**30) / 2**30)
    assert plan.config.resources.kubernetes.ephemeral_storage == f"{gib}Gi"
    why = next(
        d for d in plan.decisions if d.startswith(f"resources.kubernetes.ephemeral_storage {gib}Gi chosen")
    )
    assert f"a node's share of a checkpoint before its upload (~{share / 2**30:.1f} GiB)" in why
    assert "work_dir not checked: work_dir is on S3" in planmod.plan_markdown(plan)
    assert training_pod_needs(plan.config)["requests.ephemeral-storage"] == 2 * gib * 2**30
    mine = planmod.make_plan(
        cfg.with_overrides({"resources.kubernetes.ephemeral_storage": "500Gi"}), train_tokens=10**8
    )
    assert mine.config.resources.kubernetes.ephemeral_storage == "500Gi"


def test_a_resumed_runs_own_checkpoints_count_towards_its_need_not_against_the_free_space(tmp_path):
    """A run resumed on a tight disk already holds its checkpoints there; they are rotated, not
    added to. plan refuses the run before any exist, and passes it once the checkpoints it would
    write are mostly there (a sparse file of that size stands in for them: the same bytes by size)."""
    import shutil

    tiny_llama_config(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ).save_pretrained(tmp_path / "llama-1b")
    data = small_text_data(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    shape = planmod.model_shape(
        planmod.load_model_config(
            RunConfig.from_dict({"model": {"base_model_uri": str(tmp_path / "llama-1b")}})
        )
    )
    checkpoint = 12 * shape.params
    keep = int(shutil.disk_usage(work).free // checkpoint) + 1  # one more than the disk holds
    cfg = RunConfig.from_dict(
        {
            "work_dir": str(work),
            "model": {"base_model_uri": str(tmp_path / "llama-1b")},
            "data": {"train_uri": str(data)},
            "training": {"save_total_limit": keep},
            "resources": {"nproc_per_node": 1},
        }
    )
    with pytest.raises(planmod.PlanError, match=f"not enough disk: the work_dir {work} has "):
        planmod.make_plan(cfg, train_tokens=10**8)

    # the run's own checkpoints so far: all but the one it writes next
    saved = work / "train" / "checkpoints" / "step-00000500" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    saved.parent.mkdir(parents=True)
    with open(saved, "wb") as f:
        f.truncate(int(checkpoint * keep))
    plan = planmod.make_plan(cfg, train_tokens=10**8)
    assert (
        f"{keep + 1} checkpoints of ~" in plan.disk.summary()
        and " of it written already" in plan.disk.summary()
    )


def test_a_resume_with_settings_its_checkpoints_were_not_trained_with_is_refused_before_preprocessing(
    llama_dir, tmp_path
):
    """Resuming after changing max_seq_len would preprocess the data again, writing over the run's
    shards, and train would then refuse, naming only the data's checksum: plan refuses first, naming
    the field."""
    from fulltune.train import checkpoint

    cfg = RunConfig.from_dict(
        {
            "work_dir": str(tmp_path / "run"),
            "model": {"base_model_uri": str(llama_dir)},
            "data": {"train_uri": str(small_text_data(tmp_path))},
            "preprocess": {"max_seq_len": 128},
            "resources": {"accelerator": "cpu"},
        }
    )
    saved = tmp_path / "run" / "train" / "checkpoints" / checkpoint.tag_for(50)
    saved.mkdir(parents=True)
    recorded = {name: cfg.value(name) for name in (*checkpoint.RESUME_FIELDS, *checkpoint.LENGTH_FIELDS)}
    recorded[checkpoint.TRAINING_DATA] = "58a4c0ffee"
    (saved / checkpoint.MANIFEST).write_text(json.dumps({"step": 50, "files": [], "run": recorded}))
    assert planmod.make_plan(cfg, train_tokens=100_000).config.preprocess.max_seq_len == 128
    longer = cfg.with_overrides({"training.max_steps": 500})  # training longer is allowed
    assert planmod.make_plan(longer, train_tokens=100_000)
    with pytest.raises(planmod.PlanError) as refused:
        planmod.make_plan(cfg.with_overrides({"preprocess.max_seq_len": 256}), train_tokens=100_000)
    assert "  - preprocess.max_seq_len: 128 when it was written, 256 in this run" in str(refused.value)
    assert "training data" not in str(refused.value)
