"""Secrets mounted as files, exported as environment variables: what a container's `envFrom` does,
for the pods whose spec fulltune cannot give an `envFrom` (a TrainJob's: `launch.trainjob`).

`fulltune.launch.node` calls `export_secret_env` before torchrun starts the ranks, which inherit the
variables. As with `envFrom`: a key that is not a valid variable name is skipped, a later Secret's key
wins over an earlier one's, and a variable the container sets itself wins over every Secret.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from pathlib import Path

# The mounted Secrets' directories, in order, separated by ':'.
SECRET_ENV_DIRS = "FULLTUNE_SECRET_ENV_DIRS"
_VARIABLE_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")


def export_secret_env(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Set every key of the Secrets `SECRET_ENV_DIRS` names as a variable of `environ` (default
    os.environ); returns the names set. A directory that is absent is an optional Secret that
    does not exist, and is passed over."""
    environ = os.environ if environ is None else environ
    own = set(environ)
    exported: dict[str, str] = {}
    for directory in filter(None, environ.get(SECRET_ENV_DIRS, "").split(":")):
        exported.update(_secret_keys(Path(directory)))
    for name, value in exported.items():
        if name not in own:
            environ[name] = value
    return sorted(set(exported) - own)


def _secret_keys(directory: Path) -> dict[str, str]:
    """The keys of a Secret volume: one file each, beside the kubelet's own `..data` entries."""
    if not directory.is_dir():
        return {}
    return {
        path.name: os.fsdecode(path.read_bytes())
        for path in sorted(directory.iterdir())
        if not path.name.startswith("..") and _VARIABLE_NAME.fullmatch(path.name) and path.is_file()
    }
