"""Keep credentials out of the tracking store.

Nothing here logs environment variables, but a config value or a tag can still carry a secret (a
data source URL with a key in it, a copied token). Every param and tag goes through `redact`
before MLflow sees it; a value that looks secret is replaced, and a warning names the key (never
the value).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

REDACTED = "<redacted>"
log = logging.getLogger(__name__)

# Names of keys and environment variables whose values are credentials.
_SECRET_NAME = re.compile(
    r"secret|token|passw(or)?d|credential|api[_-]?key|private[_-]?key|access[_-]?key|session[_-]?key",
    re.IGNORECASE,
)
# An AWS secret access key: 40 base64 characters on their own.
_BASE64_40 = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{40}(?![A-Za-z0-9+/=])")
_HEX_40 = re.compile(r"[0-9a-fA-F]{40}")
# AWS access key ids (long-term AKIA, temporary ASIA).
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")
# Shorter environment values are too likely to occur by chance in ordinary text.
_MIN_ENV_SECRET = 6


def _environ() -> dict[str, str]:
    """A snapshot of the environment that another thread may be changing: MLflow's telemetry
    thread sets and unsets `_MLFLOW_TELEMETRY_SESSION_ID`, and `os.environ.items()` then fails
    with KeyError (a name gone between listing and reading) or RuntimeError (the dict resized
    while listed)."""
    for attempt in range(100):
        try:
            names = list(os.environ)
        except RuntimeError:
            if attempt == 99:
                raise
            continue
        return {name: value for name in names if (value := os.environ.get(name)) is not None}
    raise AssertionError("unreachable")


def _env_secrets() -> list[str]:
    # Read at every call: tests and launchers change the environment after import.
    return [
        value
        for name, value in _environ().items()
        if _SECRET_NAME.search(name) and len(value) >= _MIN_ENV_SECRET
    ]


def _random_base64(candidate: str) -> bool:
    # A git revision is 40 hex digits and no secret; a random base64 key mixes cases and digits.
    if _HEX_40.fullmatch(candidate):
        return False
    return (
        any(c.islower() for c in candidate)
        and any(c.isupper() for c in candidate)
        and any(c.isdigit() or c in "+/" for c in candidate)
    )


def looks_secret(key: str, value: str) -> bool:
    """Whether a param or tag (key, value) may hold a credential: a secret-sounding key, a value
    containing a secret from the environment (AWS_SECRET_ACCESS_KEY, *_TOKEN, *_PASSWORD, ...),
    an AWS access key id, or a 40-character random base64 string (an AWS secret key's shape)."""
    if _SECRET_NAME.search(key):
        return True
    if any(secret in value for secret in _env_secrets()):
        return True
    if _AWS_KEY_ID.search(value):
        return True
    return any(_random_base64(m.group(0)) for m in _BASE64_40.finditer(value))


def redact(values: Mapping[str, str]) -> dict[str, str]:
    """A copy of `values` with every value that `looks_secret` replaced by `REDACTED`."""
    out = {}
    for key, value in values.items():
        if looks_secret(key, value):
            log.warning(
                "tracking: the value of %r looks like a credential; logged as %s", key, REDACTED
            )
            value = REDACTED
        out[key] = value
    return out
