"""optuna-dashboard on a study's storage and artifact store."""

from collections.abc import Callable

import optuna
from optuna.artifacts import FileSystemArtifactStore

from microsearch.search.storage import open_storage
from microsearch.search.study import StudyConfig, StudyError


def serve_dashboard(
    study: StudyConfig,
    storage_url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    log: Callable[[str], None] = print,
) -> None:
    """Serve optuna-dashboard until interrupted; bound to localhost unless ``host`` says otherwise."""
    from optuna_dashboard import run_server

    storage = open_storage(storage_url or study.storage_url, study.heartbeat, study.grace)
    names = optuna.get_all_study_names(storage)
    if study.name not in names:
        raise StudyError(
            f"no study named {study.name!r} in that storage yet (it has: {names or 'none'}); "
            "run `microsearch search` first"
        )
    artifacts = FileSystemArtifactStore(str(study.artifacts_dir)) if study.artifacts_dir.is_dir() else None
    log(f"optuna-dashboard for study {study.name!r} at http://{host}:{port}/dashboard/ (Ctrl-C stops it)")
    run_server(storage, host=host, port=port, artifact_store=artifacts)
