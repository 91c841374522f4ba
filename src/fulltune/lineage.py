"""Lineage: where a registered model came from — run, config, data digests, images, versions, commit."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from importlib import metadata
from typing import Any

from fulltune import __version__, storage
from fulltune._image import default_image
from fulltune.config import RunConfig

PACKAGES = ("torch", "transformers", "deepspeed", "accelerate", "datasets", "tokenizers", "kfp", "pyarrow")


def package_versions() -> dict[str, str]:
    out = {"fulltune": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit() -> str | None:
    """The source commit: baked into images as FULLTUNE_GIT_COMMIT, else asked of git when in a checkout."""
    if os.environ.get("FULLTUNE_GIT_COMMIT"):
        return os.environ["FULLTUNE_GIT_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if out.returncode != 0:
            return None
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def build_lineage(cfg: RunConfig, *, run_id: str, model_uri: str) -> dict[str, Any]:
    # Only a run's own directory holds its dataset manifest. A registration from the command line
    # may have no work_dir, or the one runs are made under (the config as written): nothing to name.
    data_uri = cfg.layout.dataset_manifest if cfg.work_dir else None
    data_digest = None
    if data_uri and storage.exists(data_uri):
        data_digest = hashlib.sha256(storage.read_bytes(data_uri)).hexdigest()
    else:
        data_uri = None
    return {
        "pipeline_run_id": run_id,
        "work_dir": cfg.work_dir,
        "model_uri": model_uri,
        "base_model_uri": cfg.model.base_model_uri,
        # what forgetting is measured against, carried from version to version of a model
        "original_base_model_uri": cfg.model.original_model_uri,
        "data": {
            "train_uri": cfg.data.train_uri,
            "eval_uri": cfg.data.eval_uri,
            "general_uri": cfg.data.general_uri,
            # a cycle's own data: the date its {date} URIs were resolved for and the window
            "as_of": cfg.data.as_of,
            "window_days": cfg.data.window_days,
            "dataset_manifest_uri": data_uri,
            "dataset_manifest_sha256": data_digest,
        },
        "config": cfg.to_dict(),
        "image": os.environ.get("FULLTUNE_IMAGE") or default_image(),
        "packages": package_versions(),
        "git_commit": git_commit(),
    }
