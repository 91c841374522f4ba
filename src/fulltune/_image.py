"""The one place the container image references come from.

Two images, both tagged with the package version so a compiled pipeline always names the images
built from the same source (`make images` builds them):

- the runtime image (CPU steps): `FULLTUNE_IMAGE` or `fulltune compile --image` override it;
- the trainer image (CUDA, DeepSpeed): the PyTorchJob's pods and the GPU `evaluate` step;
  `FULLTUNE_TRAINER_IMAGE` or `fulltune compile --trainer-image` override it, and
  `resources.kubernetes.image` overrides it per run.
"""

from __future__ import annotations

import os

from fulltune import __version__

DEFAULT_REPOSITORY = "ghcr.io/fulltune/fulltune"
TRAINER_REPOSITORY = f"{DEFAULT_REPOSITORY}-trainer"


def default_image() -> str:
    return os.environ.get("FULLTUNE_IMAGE") or f"{DEFAULT_REPOSITORY}:{__version__}"


def default_trainer_image() -> str:
    return os.environ.get("FULLTUNE_TRAINER_IMAGE") or f"{TRAINER_REPOSITORY}:{__version__}"
