"""Where runs go: resolving the tracking URI, checking it before any training, refusing local
stores on multi-node clusters.

Ray moves every worker into its own trial directory, so a relative URI (or MLflow's implicit
`./mlflow.db`) would scatter runs over many databases: every URI leaves here absolute, and every
process receives it explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    from requests import Response

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
_SQLITE = "sqlite:///"
# Stores that live on the file system of the machine that writes them.
_LOCAL_SCHEMES = ("", "file", "sqlite")


class TrackingError(RuntimeError):
    """A tracking problem, phrased for the user: it names the URI and what to do."""


def _scheme(uri: str) -> str:
    scheme = urlparse(uri).scheme
    # A Windows drive letter ("C:\\runs") parses as a one-letter scheme: it is a path.
    return "" if len(scheme) == 1 else scheme


def _absolute_sqlite(uri: str) -> str:
    # sqlite:///rel.db is relative to the working directory, sqlite:////abs.db absolute.
    path, sep, query = uri[len(_SQLITE) :].partition("?")
    if path == ":memory:" or path.startswith("/"):
        return uri
    return f"{_SQLITE}{Path(path).expanduser().resolve()}{sep}{query}"


def resolve_tracking_uri(cli: str | None, space_file_value: str | None) -> str:
    """The tracking URI of a sweep, absolute: the command-line flag, else the space file's
    `tracking_uri`, else `MLFLOW_TRACKING_URI`, else a local SQLite store `./mlflow.db` (whose
    artifacts go to `./mlartifacts`, see `local_artifact_root`).

    A bare path ending in .db/.sqlite means a SQLite file; any other bare path is MLflow's file
    store (which MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE=true; `check_reachable` says so).
    """
    uri = cli or space_file_value or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        return f"{_SQLITE}{Path.cwd() / DEFAULT_DB}"
    scheme = _scheme(uri)
    if scheme == "sqlite":
        return _absolute_sqlite(uri) if uri.startswith(_SQLITE) else uri
    if scheme == "file":
        return Path(urlparse(uri).path).expanduser().resolve().as_uri()
    if scheme == "":
        path = Path(uri).expanduser().resolve()
        return f"{_SQLITE}{path}" if path.suffix in (".db", ".sqlite") else path.as_uri()
    return uri


def is_local_store(uri: str) -> bool:
    """Whether runs under `uri` are files on the machine that writes them (not a server or a
    database reachable over the network)."""
    return _scheme(uri) in _LOCAL_SCHEMES


def local_artifact_root(uri: str) -> Path | None:
    """Artifact folder of a SQLite store: `mlartifacts/` next to the database file. None for
    every other store (a server, or MLflow, decides)."""
    if not uri.startswith(_SQLITE):
        return None
    path = uri[len(_SQLITE) :].partition("?")[0]
    if path == ":memory:":
        return None
    return (Path(path).parent / DEFAULT_ARTIFACTS).resolve()


def refuse_local_store_for_multinode(uri: str, num_nodes: int) -> None:
    """TrackingError when a cluster of more than one node would log to a local store."""
    if num_nodes > 1 and is_local_store(uri):
        raise TrackingError(
            f"tracking URI {uri!r} is a store on the local file system, but the Ray cluster has "
            f"{num_nodes} nodes: trials on other nodes would write runs and artifacts into their "
            "own machine's copy, and the UI would show only the head's part of the sweep. Start "
            "one `mlflow server --backend-store-uri sqlite:///... --artifacts-destination "
            "s3://...` that every node can reach and pass --tracking-uri http://HOST:PORT."
        )


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Raise TrackingError (naming `uri`) unless the store answers, within about `timeout`
    seconds per request. An http(s) server must answer /health and accept a REST call with
    the credentials MLflow reads from the environment; any other store must open (a SQLite
    file is created on the way)."""
    if _scheme(uri) in ("http", "https"):
        _check_server(uri, timeout)
        return
    from mlflow.tracking import MlflowClient

    try:
        if uri.startswith(_SQLITE):
            Path(uri[len(_SQLITE) :].partition("?")[0]).parent.mkdir(parents=True, exist_ok=True)
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:
        # Broad on purpose: besides MlflowException, a store fails with its database driver's
        # own errors (a missing module, OSError, SQLAlchemy's), and each must name the URI.
        raise TrackingError(f"tracking store {uri!r} cannot be opened: {exc}") from exc


def _get(uri: str, endpoint: str, timeout: float, **params: int) -> Response:
    """One GET to an MLflow server with the credentials MLflow reads from the environment,
    without retries: MLflow's default policy retries a dead server for minutes. Raises
    MlflowException when no answer comes."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    return http_request(
        get_default_host_creds(uri), endpoint, "GET", max_retries=0, timeout=timeout, params=params
    )


def answers(uri: str, timeout: float) -> bool:
    """Whether the store takes requests now: an http(s) server answers /health within
    `timeout` seconds; any other store is assumed to (it is a file or a database driver)."""
    from mlflow.exceptions import MlflowException

    if _scheme(uri) not in ("http", "https"):
        return True
    try:
        return _get(uri, "/health", timeout).status_code == 200
    except MlflowException:
        return False


def _check_server(uri: str, timeout: float) -> None:
    from mlflow.exceptions import MlflowException

    def get(endpoint: str, **params: int) -> Response:
        try:
            return _get(uri, endpoint, timeout, **params)
        except MlflowException as exc:
            raise TrackingError(
                f"MLflow tracking server {uri!r} cannot be reached ({exc.message}). Start it, "
                "e.g. `mlflow server --host 127.0.0.1 --port 5000`, or pass another "
                "--tracking-uri."
            ) from exc

    health = get("/health")
    if health.status_code != 200:
        raise TrackingError(
            f"{uri!r} answered HTTP {health.status_code} on /health: is it an MLflow tracking "
            "server (with the right path prefix)?"
        )
    search = get("/api/2.0/mlflow/experiments/search", max_results=1)
    if search.status_code in (401, 403):
        raise TrackingError(
            f"MLflow tracking server {uri!r} refused the credentials (HTTP {search.status_code}): "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN."
        )
    if search.status_code != 200:
        raise TrackingError(
            f"MLflow tracking server {uri!r} answered HTTP {search.status_code} to an experiment "
            f"search: {search.text[:200]}"
        )
