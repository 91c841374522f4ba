"""A disk that fills while training: the operator is told which directory and how much, the trainer
exits 1 (a restart would write the same bytes to the same disk), and nothing half-written holds the
space. The disks are real: a small tmpfs, mounted in a mount namespace of the training process's own
(`unshare --mount`), which leaves the machine's mounts as they were."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fulltune import disk
from fulltune.launch.local import free_port, node_command, node_env
from fulltune.train import exit_codes
from fulltune.train.run import train_job
from test_train import plan_run, tiny_dataset


def _can_mount_in_a_namespace() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = "mount -t tmpfs -o size=64k tmpfs /mnt"
    done = subprocess.run(["unshare", "--mount", "sh", "-c", probe], capture_output=True)
    return done.returncode == 0


needs_mount = pytest.mark.skipif(
    not _can_mount_in_a_namespace(), reason="needs `unshare --mount` and tmpfs mounts (root)"
)


def on_a_small_disk(mount_at: str, size: str, argv: list[str], env: dict[str, str] | None = None):
    """Run `argv` with `mount_at` on a tmpfs of `size`: (exit code, output, the files left on that
    disk when it exited)."""
    Path(mount_at).mkdir(parents=True, exist_ok=True)
    script = 'mount -t tmpfs -o size="$1" tmpfs "$0" && shift && "$@"; rc=$?; echo LEFT; find "$0" -type f; exit $rc'
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, mount_at, size, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output, _, left = done.stdout.rpartition("LEFT\n")
    return done.returncode, output + done.stderr, left.split()


def train_on_a_small_disk(job, mount_at: str, size: str, env: dict[str, str] | None = None):
    """The job's one node, with `mount_at` on a tmpfs of `size`."""
    return on_a_small_disk(
        mount_at, size, node_command(job, 0, free_port()), {**node_env(job), **(env or {})}
    )


@needs_mount
def test_a_copy_into_a_full_directory_fails_with_enospc_and_leaves_no_part(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"w" * 2 * 1024 * 1024)
    dest = str(tmp_path / "out")
    copy = f"from fulltune import storage; storage.upload_file({str(tmp_path / 'model.safetensors')!r}, {dest + '/model.safetensors'!r})"
    code, out, left = on_a_small_disk(dest, "1m", [sys.executable, "-c", copy])
    assert code != 0 and "No space left on device" in out, out
    assert left == []  # not a half-copied model under a temporary name


@needs_mount
@pytest.mark.slow
def test_a_checkpoint_that_fills_the_work_dir_names_it_exits_1_and_leaves_no_part(demo_assets, tmp_path):
    work = str(tmp_path / "work")
    dataset = tiny_dataset(demo_assets, work, n_seq=8)
    cfg = plan_run(demo_assets, work, nproc=1, per_device_train_batch_size=2, max_steps=2, save_steps=1)
    job = train_job(cfg, dataset)
    # the checkpoint of the demo's 0.4M-parameter model takes ~4 MiB: half of it fits
    code, out, left = train_on_a_small_disk(job, cfg.layout.checkpoints, "2m")
    assert code == exit_codes.EXIT_BAD_INPUT, out
    # the free space is the disk's once the part written is removed: all of it
    assert (
        f"not enough disk for checkpoint step-00000001: {cfg.layout.checkpoints} has 2.0 MiB free "
        "and it needs ~4.1 MiB: free space there, lower training.save_total_limit" in out
    ), out
    assert "retrying cannot help" in out and "unexpected error" not in out
    assert left == []  # the part written is gone: the disk is as free as before the save


@needs_mount
@pytest.mark.slow
def test_a_final_model_that_fills_the_temp_dir_names_it_and_exits_1(demo_assets, tmp_path):
    work = str(tmp_path / "work")
    dataset = tiny_dataset(demo_assets, work, n_seq=4)
    cfg = plan_run(demo_assets, work, nproc=1, per_device_train_batch_size=2, max_steps=1, save_steps=0)
    job = train_job(cfg, dataset)
    small_tmp = str(tmp_path / "tmp")
    code, out, left = train_on_a_small_disk(job, small_tmp, "1m", {"TMPDIR": small_tmp})
    assert code == exit_codes.EXIT_BAD_INPUT, out
    assert f"not enough disk for the final model: {small_tmp} has " in out, out
    assert "point TMPDIR at a larger disk" in out and "unexpected error" not in out
    assert left == []
    assert not Path(job.args.output, "model.safetensors").exists()


def test_a_failed_write_is_called_a_full_disk_only_when_the_disk_lacks_the_room(tmp_path):
    failure = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1420416 vs 1420304")
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(RuntimeError) as other:  # room enough: the failure had another cause
        with disk.failing_for_space(tmp_path, 1024, "checkpoint step-00000001", disk.WORK_DIR_FIXES):
            raise failure
    assert other.value is failure
    with pytest.raises(disk.DiskFullError) as full:
        with disk.failing_for_space(tmp_path, free * 4, "checkpoint step-00000001", disk.WORK_DIR_FIXES):
            raise failure
    assert full.value.errno == errno.ENOSPC and full.value.__cause__ is failure
    assert str(full.value).startswith(f"not enough disk for checkpoint step-00000001: {tmp_path} has ")
    assert exit_codes.exit_code_for(full.value) == exit_codes.EXIT_BAD_INPUT
    with pytest.raises(ConnectionError):  # S3 has no disk to fill
        with disk.failing_for_space("s3://bucket/run/model", free * 4, "the final model", ""):
            raise ConnectionError("reset")


def test_a_full_temp_directory_in_a_training_pod_names_its_ephemeral_storage(monkeypatch):
    """A training pod's /tmp is an emptyDir on its node's disk: TMPDIR is not the pod user's lever,
    the ephemeral-storage request plan sets is."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert disk.temp_dir_fixes() == "free space there, or point TMPDIR at a larger disk"
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")  # what the kubelet sets in every pod
    assert disk.temp_dir_fixes().startswith("raise resources.kubernetes.ephemeral_storage")
