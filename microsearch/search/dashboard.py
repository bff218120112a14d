"""optuna-dashboard on a study's storage and artifact store."""

import socket
from collections.abc import Callable

from optuna.artifacts import FileSystemArtifactStore

from microsearch.search.run import existing_storage
from microsearch.search.study import StudyConfig


def serve_dashboard(
    study: StudyConfig,
    storage_url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    log: Callable[[str], None] = print,
) -> None:
    """Serve optuna-dashboard until interrupted; bound to localhost unless ``host`` says otherwise."""
    from optuna_dashboard import run_server

    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be 1-65535, got {port}")
    try:  # free? (the server's own failure would be a traceback after the study is loaded)
        socket.create_server((host, port)).close()
    except OSError as e:
        raise ValueError(f"cannot serve on {host}:{port}: {e.strerror or e} (choose another --port)") from None
    storage = existing_storage(study, storage_url)
    artifacts = FileSystemArtifactStore(str(study.artifacts_dir)) if study.artifacts_dir.is_dir() else None
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: --host {host} makes the dashboard, and the study it can edit, reachable from the network")
    log(f"optuna-dashboard for study {study.name!r} at http://{host}:{port}/dashboard/ (Ctrl-C stops it)")
    run_server(storage, host=host, port=port, artifact_store=artifacts)
