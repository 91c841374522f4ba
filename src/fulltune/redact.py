"""Credentials out of what is printed or recorded: the one place that knows what one looks like.

A server address may carry its credentials as the URI's userinfo (`https://user:token@host`, which
requests and urllib3 turn into Basic auth): MLFLOW_TRACKING_URI from an MLflow Secret, an S3
endpoint, the KFP host. Wherever such an address, or an error that quotes it, reaches a log line,
a report or a record, it goes through `text` first.
"""

from __future__ import annotations

import re

HIDDEN = "***"
# scheme://userinfo@ : the userinfo runs to the netloc's last '@' (before the path, query, fragment
# or the end of the word), as urllib.parse splits it, so a password holding a raw '@' is hidden whole.
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s@]*(?:@[^/?#\s@]*)*@")


def text(value: object) -> str:
    """`value` as text with the userinfo of every URI in it hidden (`https://***@host/...`)."""
    return _USERINFO.sub(rf"\g<1>{HIDDEN}@", str(value))


def has_userinfo(uri: str) -> bool:
    """Whether `uri` carries credentials in its userinfo."""
    return text(uri) != uri
