"""Generic helpers: crash-safe file writes and nested-dict keys.

Standard library only, so math, model and training modules may import it without pulling in S3,
Ray or MLflow.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config problem, already phrased for the user (file, key, value)."""


# A temporary left by a killed writer is removed by the next write of the same file once it is
# this old and its writer's pid is gone from this host (an old age guards writers on other hosts
# of a shared file system, whose pids mean nothing here).
STALE_TMP_SECONDS = 600


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A fresh temporary path beside `path` to write the file to; flushed to disk and renamed
    over `path` when the block ends, removed when it raises.

    Readers never see half a file under the final name, concurrent writers never share a
    temporary (its name is unique), and the file and its directory are fsynced around the rename,
    so a power loss cannot leave an empty file under the final name. A process killed mid-write
    leaves a hidden `.NAME.PID-ID.tmp` beside an intact `path`, which the next successful write of
    `path` removes once it is stale (`STALE_TMP_SECONDS`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        _fsync(tmp)
        tmp.replace(path)
        _fsync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _remove_stale_temporaries(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: checks only; PermissionError: someone else's process
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _remove_stale_temporaries(path: Path) -> None:
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)-[0-9a-f]{{8}}\.tmp")
    now = time.time()
    for sibling in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        match = pattern.fullmatch(sibling.name)
        if match is None or _pid_alive(int(match[1])):
            continue
        with contextlib.suppress(OSError):  # gone already, or another writer's clean-up won
            if now - sibling.stat().st_mtime > STALE_TMP_SECONDS:
                sibling.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through `atomic_path`."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `overrides` into a copy of `base` (nested dicts merge, values replace)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating levels as needed."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {k!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def nest(params: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys -> nested dict (`{"model.beta": 0.1}` -> `{"model": {"beta": 0.1}}`)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        set_dotted(out, key, value)
    return out


def is_better(value: float, best: float | None, mode: str) -> bool:
    """Whether `value` improves on `best` in direction `mode` ("min" or "max"); NaN never
    improves, and anything but NaN improves on no best (None or NaN)."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value < best if mode == "min" else value > best


def best_of(values: Iterable[float], mode: str) -> float:
    """The best finite value in direction `mode` ("min" or "max"); NaN if there is none."""
    finite = [float(v) for v in values if isinstance(v, int | float) and not math.isnan(v)]
    if not finite:
        return math.nan
    return min(finite) if mode == "min" else max(finite)
