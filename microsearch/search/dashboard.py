"""optuna-dashboard on a study's storage and artifact store."""

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

    storage = existing_storage(study, storage_url)
    artifacts = FileSystemArtifactStore(str(study.artifacts_dir)) if study.artifacts_dir.is_dir() else None
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: --host {host} makes the dashboard, and the study it can edit, reachable from the network")
    log(f"optuna-dashboard for study {study.name!r} at http://{host}:{port}/dashboard/ (Ctrl-C stops it)")
    run_server(storage, host=host, port=port, artifact_store=artifacts)
