"""`make gpu-check ARGS=--dry-run`: the GPU check's code paths on CPU, so that GPU time is spent
measuring, never debugging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_measures_each_trainer_on_the_same_batches_and_writes_its_report(demo_assets, tmp_path):
    """fulltune as plan configures it and the FSDP2 baseline run through the same entry point as on a
    GPU; every run is reported, the profiled ones with their table, and fulltune and FSDP2 see the
    same batches (equal first losses). The variants that only change plan's training settings (the
    chunked loss, recomputation, compile) take the same path; their numerics have their own tests."""
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHON": str(Path(os.sys.executable)),
        "FULLTUNE_TEST_ASSETS": str(Path(demo_assets.base_model_dir).parents[1]),
    }
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "benchmarks" / "gpu_check.sh"),
            str(out),
            "--dry-run",
            "--only",
            "tiny/plan,tiny/fsdp2",
            "--work",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    runs = {r["name"]: r for r in doc["runs"]}
    assert set(runs) == {"tiny/plan", "tiny/fsdp2"}
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in runs.values())
    plan, fsdp2 = runs["tiny/plan"]["losses"], runs["tiny/fsdp2"]["losses"]
    assert len(plan) == len(fsdp2) == 5
    assert abs(plan[0] - fsdp2[0]) < 1e-4 * plan[0]  # same model, same batches, same token-mean loss
    profile = (out / "profile-tiny-plan.txt").read_text()
    assert "steps in" in profile and "aten::mm" in profile
    md = (out / "gpu_check.md").read_text()
    assert "| tiny/fsdp2 |" in md and "| step | tiny/plan | tiny/fsdp2 |" in md


def _script(name: str):
    """benchmarks/<name>.py (the GPU check's scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _gpu_gaps():
    return _script("gpu_gaps")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_run_past_its_time_stops_its_ranks_too(tmp_path):
    """A run that times out (a hung collective, a slow compile) is stopped with its ranks: torchrun
    starts them in sessions of their own, and a rank left running would hold the GPU under the next
    run's measurement, and after the check ends."""
    import time

    sleeper, pid_file = tmp_path / "sleeper.py", tmp_path / "rank.pid"
    sleeper.write_text(
        "import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(300)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with pytest.raises(SystemExit, match="ran past 20 s"):
        _script("train_step").torchrun(1, [str(sleeper), str(pid_file)], env, timeout=20)
    pid = int(pid_file.read_text())
    try:
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(pid), "the rank outlived its torchrun"
    finally:
        if _alive(pid):
            os.kill(pid, 9)


def test_gap_report_adds_up_the_device_idle_time_per_host_frame():
    """Kernels on two streams that overlap count once; the idle time is counted by gap size and given
    to the innermost host frame at each gap's middle, the frame that kept the device waiting longest
    first."""
    gaps = _gpu_gaps()
    kernels = [(0, 1000), (500, 1500), (1550, 2000), (5000, 6000), (6050, 9000), (11000, 12000)]
    spans = [
        gaps.HostSpan(0, 12000, "train_step"),
        gaps.HostSpan(2000, 5000, "fetch_sub_module"),  # inside train_step: the gap at 3500 is its
        gaps.HostSpan(9000, 11000, "engine.step"),
    ]
    report = gaps.summarise(kernels, spans, window=(0, 12000), min_gap_us=200)
    # idle: 1500-1550 (50 us), 2000-5000 (3 ms), 6000-6050 (50 us), 9000-11000 (2 ms): 5.1 of 12 ms
    assert "device busy 57.5% of 12.0 ms" in report
    assert "0-0.1 ms: 2 gaps, 0.1 ms" in report and "over 1 ms: 2 gaps, 5.0 ms" in report
    by_frame = report.split("by the host frame at each gap's middle:\n")[1].split("\nthe ")[0].splitlines()
    assert by_frame[0].split() == ["3.0", "ms", "1", "gaps", "fetch_sub_module"]
    assert by_frame[1].split() == ["2.0", "ms", "1", "gaps", "engine.step"]
    assert len(by_frame) == 2  # the 50 us gaps are launch overhead, not given to a frame
    assert gaps.summarise([], spans, window=(0, 1)) == "no device kernels recorded\n"


def test_a_gap_in_no_recorded_frame_is_named_after_what_the_host_finished_last():
    """Idle time while the host was in no recorded frame (C++ below no Python, the profiler's own work)
    is given to the span that ended last before it, and the longest gaps are listed with where in the
    window they began."""
    gaps = _gpu_gaps()
    kernels = [(0, 1000), (3000, 4000), (4100, 5000)]
    spans = [
        gaps.HostSpan(0, 1200, "step"),
        gaps.HostSpan(100, 900, "forward"),
        gaps.HostSpan(900, 1500, "optimizer.step"),  # ended last before the gap at 1000-3000
        gaps.HostSpan(2500, 5000, "next step"),
    ]
    report = gaps.summarise(kernels, spans, window=(0, 5000), min_gap_us=200)
    by_frame = report.split("by the host frame at each gap's middle:\n")[1].splitlines()
    assert by_frame[0].split() == [
        "2.0",
        "ms",
        "1",
        "gaps",
        "(no",
        "frame",
        "recorded;",
        "after",
        "optimizer.step)",
    ]
    longest = report.split("longest gaps, by when they began in the window:\n")[1].splitlines()
    assert [line.split()[:4] for line in longest] == [
        ["at", "1.0", "ms:", "2.0"],
        ["at", "4.0", "ms:", "0.1"],
    ]
    assert longest[1].endswith("next step")


def test_gap_report_reads_the_profilers_events_and_names_the_caller_outside_torch():
    """From `torch.profiler` events: device kernels against host frames, a gap inside torch's own
    frames given to the nearest enclosing frame outside torch (the library whose hook it runs)."""
    from types import SimpleNamespace as Event

    def event(name, start, end, device="DeviceType.CPU", parent=None):
        return Event(name=name, time_range=Event(start=start, end=end), device_type=device, cpu_parent=parent)

    hook = event("deepspeed/runtime/zero/parameter_offload.py(358): _pre_forward_module_hook", 0, 4000)
    torch_frame = event("torch/nn/modules/module.py(2881): named_modules", 1000, 3000, parent=hook)
    events = [
        hook,
        torch_frame,
        event("cudaLaunchKernel", 1900, 2100, parent=torch_frame),
        event("nvjet_sm90_gemm", 0, 1000, device="DeviceType.CUDA"),
        event("nvjet_sm90_gemm", 3000, 4000, device="DeviceType.CUDA"),
    ]
    report = _gpu_gaps().profile_gaps(events)
    assert "device busy 50.0% of 4.0 ms" in report
    by_frame = report.split("by the host frame at each gap's middle:\n")[1].splitlines()
    assert by_frame[0].split()[:5] == [
        "2.0",
        "ms",
        "1",
        "gaps",
        "deepspeed/runtime/zero/parameter_offload.py(358):",
    ]


def test_only_naming_a_run_that_does_not_exist_is_refused_before_the_device_is_used(tmp_path):
    """A mistyped (or renamed) run in --only used to run nothing, or only the other names, and end in a
    traceback: on a GPU machine, a slot spent on nothing. It is refused at once, naming the unknown
    run and the ones there are."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--out",
            str(out),
            "--dry-run",
            "--only",
            "tiny/plan,tiny/pln",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--only: no run named tiny/pln in a dry run; the runs are tiny/plan, tiny/fsdp2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "gpu_check.json").exists()  # nothing ran


def test_train_step_reports_fulltune_when_the_trainer_run_failed(capsys):
    """`benchmarks/train_step.py` keeps fulltune's figures when the Trainer run fails (`_attempt`), but
    printing the Trainer's empty step times raised ValueError (min of nothing) before any figure, the
    GPU ones included, was printed or written."""
    import argparse

    ts = _script("train_step")
    a = argparse.Namespace(warmup=0, device="cuda", hidden=64, layers=2, seq=64, nproc=1, micro=2, gas=2)
    steps = [{"step": i, "loss": 3.0, "step_time_s": t} for i, t in enumerate((0.5, 0.4, 0.6))]
    runs = ts.TrainerComparison({"params": "1000000"}, steps, hf=[], first=steps, fp32=None)
    result: dict = {}
    med = ts.report_step_times(a, {"OMP_NUM_THREADS": "4"}, runs, result)
    printed = capsys.readouterr().out
    assert "fulltune    median step    500.0 ms  (n=3, min 400.0, max 600.0)" in printed
    assert "hf_trainer  no timed steps (its runs failed)" in printed
    assert med["fulltune"] == result["median_step_s"]["fulltune"] == 0.5


def test_loss_tables_compare_each_model_separately_over_the_first_20_steps():
    """gpu_check.md set every shape's losses in one table and cut it to the shortest run: a 14-step
    variant (1b/no-liger) left 14 of the 20 losses the three stacks run for the issue's comparison,
    beside another model's columns."""
    gc = _script("gpu_check")

    def run(name, n, base):
        return {"name": name, "losses": [base + i / 100 for i in range(n)]}

    runs = [
        run("1b/plan", 23, 11.0),
        run("1b/fsdp2", 20, 11.0),
        run("1b/no-liger", 14, 11.0),
        run("3b/plan", 20, 12.0),
        run("1b/recompute-4-of-16", 12, 11.0),  # not a stack on the same kernels: not in the table
        {"name": "3b/fsdp2", "status": "skipped"},
    ]
    lines = gc.loss_table(runs)
    tables = "\n".join(lines).split("\n\n")
    assert len(tables) == 2
    one_b, three_b = (t.splitlines() for t in tables)
    assert one_b[0] == "| step | 1b/plan | 1b/fsdp2 | 1b/no-liger |"
    assert len(one_b) == 2 + 20
    assert one_b[-1] == "| 19 | 11.1900 | 11.1900 |  |"
    assert three_b[0] == "| step | 3b/plan |" and len(three_b) == 2 + 20


def test_the_trainer_steps_the_same_adamw_kernel_as_fulltune_on_a_gpu(monkeypatch):
    """The HF Trainer baseline ran torch's multi-tensor AdamW ("adamw_torch") on the GPU, where
    fulltune steps the fused kernel (engine.build_optimizer) and the Trainer's own default since torch
    2.8 is fused too: several passes over the fp32 partition against one, a handicap the step-time
    comparison charged to the Trainer."""
    import transformers.training_args

    ts = _script("train_step")
    tr = {
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 3,
        "learning_rate": 1e-4,
        "lr_scheduler_type": "constant",
        "warmup_ratio": 0.0,
        "weight_decay": 0.01,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0,
        "seed": 42,
    }
    # this machine has no GPU: let TrainingArguments accept bf16 as on the device
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    spec = {"device": "cuda", "root": "/nonexistent", "deepspeed": None}
    assert ts.trainer_arguments(spec, tr).optim == "adamw_torch_fused"
