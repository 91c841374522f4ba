"""What every fulltune process does on its way out: the CLI, each pipeline step, each training rank
and its node's launcher."""

from __future__ import annotations

import atexit
import gc

_registered = False


def exit_without_final_collection() -> None:
    """At exit, leave the objects alive now out of the interpreter's last garbage collections.

    A process that imported torch and transformers holds a few million objects, and the collections
    that run while the interpreter tears its modules down walk every one of them: about 2 s of each
    step's, each rank's and each CLI command's exit on a 2-core machine (`benchmarks/process_exit.py`).
    Frozen (`gc.freeze`), they are skipped; their memory goes back with the process all the same.
    Nothing fulltune owns depends on a collection at exit: files, process groups and trackers are
    closed, and completeness markers written, before the entry point returns."""
    global _registered
    if not _registered:
        atexit.register(gc.freeze)
        _registered = True
