"""Optuna storages from URLs: SQLite / PostgreSQL / MySQL (RDB, with heartbeats) or ``journal:PATH``.

RDB storages record a heartbeat for every running trial; when a worker dies, the next worker to
start a trial marks the silent one failed and queues a retry with the same parameters. A SQLite
file opened for searching begins every transaction with the write lock (see ``_lock_on_begin``),
so that two workers never both take the same queued trial.
"""

import random
import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError

CONNECT_TIMEOUT = 15  # seconds for a database server to accept and answer a connection
CREATE_ATTEMPTS = 5  # tries to open a database that other workers may be creating at that moment


class StorageError(RuntimeError):
    """The storage cannot be opened or reached; the message names the URL."""


def open_storage(
    url: str, heartbeat: int = 60, grace: int = 180, max_retry: int = 3, create: bool = True
) -> optuna.storages.BaseStorage:
    """Open the storage at ``url`` and check that it answers; ``create``: make a new SQLite or
    journal file where there is none (commands that only read pass False).

    Example: ``open_storage("journal:studies/run.log")`` or ``open_storage("postgresql+psycopg://...")``.
    """
    for prefix in ("journal:", "sqlite:///"):
        if url.startswith(prefix):
            path = Path(url.removeprefix(prefix)).expanduser()
            if not path.parent.is_dir():
                raise StorageError(f"storage {url}: folder {path.parent} does not exist")
            if not create and not path.is_file():
                raise StorageError(f"storage {url}: no file {path} (a mistyped path? `microsearch search` creates it)")
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:")).expanduser()
        try:  # the storage replays the whole file here: a damaged line fails now, not mid-search
            return JournalStorage(JournalFileBackend(str(path)))
        except Exception as e:
            raise StorageError(
                f"storage {url}: the journal file {path} cannot be read as an Optuna journal ({_first_line(e)})"
            ) from None
    if url.startswith("sqlite"):  # timeout: seconds to wait for another writer's lock
        # isolation_level None: sqlite3 leaves BEGIN to ``_lock_on_begin`` (writers only)
        engine_kwargs = {"connect_args": {"timeout": 60} | ({"isolation_level": None} if create else {})}
    else:  # a server that accepts the connection but never answers must not hang the worker
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT}}
    for attempt in range(CREATE_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat,
                    grace_period=grace,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
                )
            break
        except (IntegrityError, OperationalError) as e:
            # Workers starting together on a new database race to create its tables (one of them
            # meets "UNIQUE constraint failed: alembic_version"): the schema is there on a retry.
            if attempt + 1 < CREATE_ATTEMPTS and "connection" not in str(e).lower():
                time.sleep(0.2 * (attempt + 1) + random.random() * 0.3)
                continue
            raise StorageError(f"cannot open storage {_hide_password(url)}: {_first_line(e)}") from None
        except Exception as e:  # unreachable server, bad URL, missing driver: one line, no traceback
            raise StorageError(f"cannot open storage {_hide_password(url)}: {_first_line(e)}") from None
    if create and url.startswith("sqlite"):
        _lock_on_begin(storage.engine)
        _check_writable(storage, url)
    return storage


def _lock_on_begin(engine: Engine) -> None:
    """Begin every transaction on this SQLite engine with ``BEGIN IMMEDIATE`` (the write lock).

    A worker takes a queued trial by reading it WAITING and writing it RUNNING in one transaction
    (Optuna's ``SELECT ... FOR UPDATE``). SQLite has no row locks and Python's sqlite3 begins a
    transaction only at the first write, so two workers could both read WAITING and both run the
    trial; the second to finish then cannot tell it (optuna/optuna#4621). With the lock taken at
    BEGIN, the second worker waits for the first to commit and reads RUNNING. (SQLAlchemy's recipe
    for pysqlite transactions: the driver's own BEGIN is off, see ``isolation_level`` above.)
    """
    event.listen(engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))


def _check_writable(storage: RDBStorage, url: str) -> None:
    """Fail now, not at the first trial's write, on a read-only or immutable SQLite file: rewrite
    the header's user_version with its own value (a write that changes nothing)."""
    try:
        with storage.engine.begin() as connection:
            version = int(connection.exec_driver_sql("PRAGMA user_version").scalar())
            connection.exec_driver_sql(f"PRAGMA user_version = {version}")
    except OperationalError as e:
        raise StorageError(
            f"storage {url} cannot be written ({_first_line(e.orig)}): searching needs write access; "
            "report and dashboard only read"
        ) from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _hide_password(url: str) -> str:
    """The URL for messages, its password masked (SQLAlchemy's rendering)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not a URL SQLAlchemy can parse: it has no password field either
        return url
