"""Open an Optuna storage from the one string a user types on the command line.

The same spellings as ``optuna-dashboard`` accepts, so the command printed at the end of a search opens the
same study: ``sqlite:///...``, ``postgresql://...`` (any SQLAlchemy URL) -> ``RDBStorage``; ``redis://...`` ->
a Redis journal; anything else is a path to a journal file (``JournalFileBackend``).
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalRedisBackend
from sqlalchemy import event

_URL = re.compile(r"^[A-Za-z][\w+.-]*://")

#: Seconds between RDB heartbeats. A trial whose process died (kill -9, power loss) stops beating and is marked
#: FAIL by the next worker, so a resumed study does not keep it RUNNING forever.
HEARTBEAT_INTERVAL = 60
GRACE_PERIOD = 180


class StorageError(RuntimeError):
    """The storage URL cannot be opened; the message is one line."""


def default_storage_url(study_name: str, studies_dir: Path = Path("studies")) -> str:
    """The default SQLite URL of a study: ``sqlite:///studies/<study_name>.db`` (relative to the cwd)."""
    return f"sqlite:///{studies_dir.as_posix()}/{study_name}.db"


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def open_storage(url: str, *, heartbeat: bool = False) -> BaseStorage:
    """Open ``url`` as an Optuna storage.

    Args:
        url: a SQLAlchemy URL, a ``redis://`` URL, or a journal file path.
        heartbeat: enable RDB heartbeats (only for a process that runs trials through ``study.optimize``).

    Raises:
        StorageError: the storage cannot be opened or read (one-line message).
    """
    try:
        if url.startswith("redis://"):
            return JournalStorage(JournalRedisBackend(url))
        if _URL.match(url):
            url = _postgres_driver(url)
            if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
                # SQLAlchemy would create a missing directory's file lazily and fail later with a long trace.
                parent = Path(url[len("sqlite:///") :]).parent
                if not parent.is_dir():
                    raise StorageError(f"cannot open storage {url!r}: directory {parent} does not exist")
            kwargs = {"heartbeat_interval": HEARTBEAT_INTERVAL, "grace_period": GRACE_PERIOD} if heartbeat else {}
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5; we rely on them knowingly
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = RDBStorage(url, **kwargs)
            if url.startswith("sqlite:"):
                _fast_sqlite(storage)
            storage.get_all_studies()  # prove it is readable now, not halfway through a search
            return storage
        path = Path(url)
        if path.is_dir() or not path.parent.is_dir():
            raise StorageError(f"cannot open storage {url!r}: not a journal file path (and not a URL)")
        storage = JournalStorage(JournalFileBackend(str(path)))
        storage.get_all_studies()
        return storage
    except StorageError:
        raise
    except (Exception, optuna.exceptions.OptunaError) as error:  # any driver/URL/IO error: one line, no trace
        raise StorageError(f"cannot open storage {url!r}: {_one_line(error)}") from error


def _postgres_driver(url: str) -> str:
    """``postgresql://`` with the psycopg2 driver when psycopg 3 (SQLAlchemy 2's default) is not installed.

    The project's ``distributed`` extra installs psycopg2-binary; without this, a plain PostgreSQL URL fails to
    import a driver.
    """
    if not url.startswith("postgresql://"):
        return url
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def _fast_sqlite(storage: RDBStorage) -> None:
    """Write-ahead log + synchronous=NORMAL: a trial's ~50 small commits cost ~3 ms instead of ~25 ms each.

    WAL survives a crash of the process without corruption (the last commits may be lost on power loss), lets
    optuna-dashboard read while a search writes, and is a property of the database file. It needs a local
    file system (not NFS): use PostgreSQL or a journal file for shared storage.
    """

    def on_connect(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # pooled connections opened before the listener existed
    with storage.engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA journal_mode=WAL")


def find_study(storage: BaseStorage, study_name: str) -> optuna.study.StudyDirection | None:
    """The direction of an existing single-objective study, None when no such study.

    Raises:
        StorageError: the study exists with more than one objective.
    """
    for summary in storage.get_all_studies():
        if summary.study_name == study_name:
            if len(summary.directions) != 1:
                raise StorageError(f"study {study_name!r} exists with {len(summary.directions)} objectives")
            return summary.directions[0]
    return None
