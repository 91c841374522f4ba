"""`make gpu-check ARGS=--dry-run`: the GPU check's code paths on CPU, so that GPU time is spent
measuring, never debugging."""

from __future__ import annotations

import json
import os
import subprocess
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
