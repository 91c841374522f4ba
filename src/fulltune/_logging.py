"""Console logging for the steps and the CLI.

The handler looks up sys.stdout / sys.stderr when it writes, not when it is made: whoever swaps
the stream later (KFP's executor, a test harness capturing output) still gets the lines, and a
closed old stream never turns a log line into a "Logging error" traceback.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class ConsoleHandler(logging.StreamHandler):
    def __init__(self, which: str = "stderr"):
        super().__init__()
        self.which = which

    @property
    def stream(self):  # type: ignore[override]
        return getattr(sys, self.which)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property wins
        pass


# Libraries whose INFO lines are chatter on a user's console ("Found credentials in environment
# variables." from botocore on every client); their warnings still show.
QUIET_LIBRARIES = ("botocore", "boto3", "s3transfer", "urllib3", "kfp_server_api")


def setup(which: str = "stderr", level: int = logging.INFO) -> None:
    """Log INFO and up to the console, once (a no-op when the root logger has handlers already)."""
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    root = logging.getLogger()
    if root.handlers:
        return
    handler = ConsoleHandler(which)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
