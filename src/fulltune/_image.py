"""The one place the container image reference comes from.

The default tag is the package version, so a compiled pipeline always names the image built
from the same source. `fulltune compile --image REF` or the `FULLTUNE_IMAGE` environment
variable override it (for a registry mirror or a digest pin).
"""

from __future__ import annotations

import os

from fulltune import __version__

DEFAULT_REPOSITORY = "ghcr.io/fulltune/fulltune"


def default_image() -> str:
    return os.environ.get("FULLTUNE_IMAGE") or f"{DEFAULT_REPOSITORY}:{__version__}"
