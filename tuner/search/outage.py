"""Riding out a study storage that goes away: a database restart or failover, a locked SQLite file.

A worker of a long study must not die because its database blinked, and must not corrupt the
study when it carries on. So every storage operation of a worker goes through `RetryingStorage`:
a lost connection is retried with backoff for a bounded window (`--storage-retry`), shared by all
the worker's threads and measured from the first failure; the worker logs one line when the
storage goes away and one when it is back. A storage still away after the window raises
`StorageGone`, which the command line prints as one line and exit code `EXIT_CODE`: the study is
safe in the database and `--resume` finishes it.

A retried write may already have been applied (its commit succeeded, its reply was lost), so
every write is made safe to repeat: reads and upserts simply repeat; finishing a trial that is
already finished with the same state and values is success; a study whose creation came back as
"duplicate" but which nobody has touched is ours; a trial is created with a unique token, found
again by it instead of being created twice; a deleted claim is deleted. After an outage nobody's
heartbeat is fresh, so stale trials are not failed until the workers had time to beat again.
"""

from __future__ import annotations

import abc
import copy
import logging
import random
import sqlite3
import threading
import time
import uuid
from datetime import datetime

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.exceptions import DuplicatedStudyError, UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

EXIT_CODE = 3  # the command line's exit code for StorageGone (2 is bad input, 1 nothing exported)
TOKEN = "tuner:create"  # trial system attribute: which create_new_trial call wrote the trial
BACKOFF = (0.25, 2.0)  # seconds: first wait, longest wait between two tries
_TRANSIENT = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.DisconnectionError,
              sqlalchemy.exc.PendingRollbackError, sqlalchemy.exc.TimeoutError, sqlite3.OperationalError)
try:  # the PostgreSQL driver's own errors, should one arrive unwrapped
    import psycopg

    _TRANSIENT += (psycopg.OperationalError, psycopg.InterfaceError)
except ImportError:
    pass


class StorageGone(BaseException):
    """The study storage stayed away longer than the retry window.

    A BaseException, like KeyboardInterrupt, because it must end the worker: Optuna and the
    objective treat any Exception as a failed trial and would try to record it in the very
    storage that is gone."""


def is_transient(e: BaseException) -> bool:
    """Is this a lost or refused connection, a locked file (worth retrying), rather than a bug
    or bad data? Optuna wraps database errors in StorageInternalError, so the chain is searched."""
    for x in _chain(e):
        if isinstance(x, _TRANSIENT) or getattr(x, "connection_invalidated", False):
            return True
    return False


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _reason(e: BaseException) -> str:
    """The database's own words (the driver's message, first line), for the log and the error."""
    x = next((x for x in _chain(e) if isinstance(x, _TRANSIENT)), e)
    x = getattr(x, "orig", None) or x  # SQLAlchemy's wrapper: the driver's error
    text = str(x).strip().splitlines()[0] if str(x).strip() else type(x).__name__
    return text if len(text) <= 120 else text[:117] + "..."


class _QuietFallback(logging.Filter):
    """Optuna's RDBStorage takes a failed trials query for "too many SQL variables" and logs a
    warning (with the SQL) before its fallback query fails the same way; on a lost connection
    that is noise: the outage gets its own line."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith("Caught an error from sqlalchemy") and
                    any(w in text for w in ("connection", "database is locked", "shutdown", "terminating")))


class Outage:
    """One worker's view of its storage: up, away since when, or gone. Shared by every thread of
    the worker (the trial loop, heartbeats, the export claim), so the window is one window and
    each change is logged once."""

    def __init__(self, shown: str, window: float, log=print, backoff=BACKOFF):
        self.shown, self.window, self.log, self.backoff = shown, float(window), log, backoff
        self.settle_s = 0.0  # after coming back, how long stale trials are left alone (see settling)
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._back_at: float | None = None
        self._gone: str | None = None

    def run(self, attempt):
        """`attempt(lost)` until it returns, retrying lost connections; `lost` says an earlier try
        failed, i.e. its write may or may not have been applied."""
        lost, tries = False, 0
        while True:
            if self._gone is not None:
                raise StorageGone(self._gone)
            try:
                value = attempt(lost)
            except Exception as e:
                if not is_transient(e):
                    raise
                self._wait(e, tries)
                lost, tries = True, tries + 1
                continue
            self._up()
            return value

    def _wait(self, e: Exception, tries: int) -> None:
        with self._lock:
            now = time.monotonic()
            first = self._down_since is None
            if first:
                self._down_since = now
            deadline = self._down_since + self.window
            if now >= deadline and self._gone is None:
                self._gone = (f"the study storage {self.shown} has been unreachable for {now - self._down_since:.0f} s "
                              f"({_reason(e)}); its trials are kept there: rerun with --resume once it is back")
        if self._gone is not None:
            raise StorageGone(self._gone) from None
        if first:
            self.log(f"storage {self.shown} went away ({_reason(e)}); retrying for up to {self.window:g} s")
        pause = min(self.backoff[1], self.backoff[0] * 2 ** tries) * random.uniform(0.7, 1.0)
        time.sleep(max(0.0, min(pause, deadline - now)))

    def _up(self) -> None:
        if self._down_since is None:  # the common case, without taking the lock
            return
        with self._lock:
            if self._down_since is None:
                return
            away, self._down_since, self._back_at = time.monotonic() - self._down_since, None, time.monotonic()
        self.log(f"storage {self.shown} is back after {away:.0f} s; carrying on")

    def settling(self) -> bool:
        """Away, or back for less than `settle_s`: every heartbeat looks stale now, also those
        of live workers whose beats are still being retried."""
        down, back = self._down_since, self._back_at
        return down is not None or (back is not None and time.monotonic() - back < self.settle_s)


class RetryingStorage(BaseStorage, BaseHeartbeat):
    """An Optuna storage (normally `_CachedStorage(RDBStorage)`) whose every operation rides out
    an outage (see `Outage`); the writes that could be applied twice are made safe to repeat."""

    def __init__(self, inner, outage: Outage, rdb=None):
        self._inner, self._outage, self._rdb = inner, outage, rdb
        beat = inner.get_heartbeat_interval()
        outage.settle_s = 2 * beat + 2 * outage.backoff[1] + 1 if beat else 0.0

    def _retry(self, name: str, *args, **kwargs):
        return self._outage.run(lambda lost: getattr(self._inner, name)(*args, **kwargs))

    def create_new_study(self, directions, study_name=None) -> int:
        def attempt(lost):
            try:
                return self._inner.create_new_study(directions, study_name)
            except DuplicatedStudyError:
                if lost and study_name is not None and (sid := self._untouched(study_name)) is not None:
                    return sid  # our lost write created it: nobody else has written to it
                raise
        return self._outage.run(attempt)

    def _untouched(self, name: str) -> int | None:
        sid = self._inner.get_study_id_from_name(name)
        empty = not self._inner.get_study_user_attrs(sid) and not self._inner.get_all_trials(sid, deepcopy=False)
        return sid if empty else None

    def delete_study(self, study_id: int) -> None:
        def attempt(lost):
            try:
                self._inner.delete_study(study_id)
            except KeyError:
                if not lost:  # else our lost write deleted it
                    raise
        return self._outage.run(attempt)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        """The trial carries a token, so a write applied twice (here, or by the retry loop inside
        Optuna's RDBStorage) is found: the first copy is used, any other is pruned uncounted."""
        token = uuid.uuid4().hex
        template = _tokened(template_trial, token)

        def attempt(lost):
            mine = self._with_token(study_id, token) if lost else []
            if not mine:
                self._inner.create_new_trial(study_id, template)
                mine = self._with_token(study_id, token)
            for extra in mine[1:]:
                self._discard(extra, study_id, mine[0])
            return mine[0]
        return self._outage.run(attempt)

    def _with_token(self, study_id: int, token: str) -> list[int]:
        trials = self._inner.get_all_trials(study_id, deepcopy=False)
        return [t._trial_id for t in trials if t.system_attrs.get(TOKEN) == token]

    def _discard(self, trial_id: int, study_id: int, kept: int) -> None:
        """A second copy of one created trial: pruned before any work and, like a trial over the
        cap, not counted (`over_cap`, see tuner.search.studies.counted_trials)."""
        try:
            number = self._inner.get_trial(kept).number
            self._inner.set_trial_user_attr(trial_id, "over_cap", True)
            self._inner.set_trial_user_attr(trial_id, "fail_reason", f"a second copy of trial {number} (a storage "
                                            "write repeated after a lost connection); pruned before any work")
            self._inner.set_trial_state_values(trial_id, TrialState.PRUNED)
        except UpdateFinishedTrialError:
            pass  # already discarded by an earlier try

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        def attempt(lost):
            try:
                done = self._inner.set_trial_state_values(trial_id, state, values)
            except UpdateFinishedTrialError:
                if lost and self._finished_as(trial_id, state, values):
                    return True  # our lost write finished it: finishing it again is success
                raise
            if lost and not done and state == TrialState.RUNNING:
                # taking a waiting trial: if our lost write took it, nobody runs it; one beat makes
                # it go stale, so the heartbeat fails and retries it instead of leaving it RUNNING
                self._inner.record_heartbeat(trial_id)
            return done
        return self._outage.run(attempt)

    def _finished_as(self, trial_id: int, state: TrialState, values) -> bool:
        t = self._inner.get_trial(trial_id)
        return t.state == state and (values is None or t.values == [float(v) for v in values])

    def record_heartbeat(self, trial_id: int) -> None:
        """Runs in Optuna's heartbeat thread: a storage gone for good is reported by the main
        thread (its next operation raises too), never as a thread's traceback."""
        try:
            self._retry("record_heartbeat", trial_id)
        except StorageGone:
            pass

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        if self._outage.settling() or self._outage.run(lambda lost: self._server_just_started()):
            return []
        return self._retry("_get_stale_trial_ids", study_id)

    def _server_just_started(self) -> bool:
        """A PostgreSQL server restarted a moment ago: also workers that saw no outage (busy
        elsewhere) must not fail the trials of those whose beats are still being retried."""
        if self._rdb is None or self._rdb.engine.dialect.name != "postgresql" or not self._outage.settle_s:
            return False
        with self._rdb.engine.connect() as c:
            up = c.execute(sqlalchemy.text("SELECT EXTRACT(EPOCH FROM now() - pg_postmaster_start_time())")).scalar()
        return float(up) < self._outage.settle_s

    def get_heartbeat_interval(self) -> int | None:
        return self._inner.get_heartbeat_interval()

    def get_heartbeat_stale_trial_callback(self):
        return self._inner.get_heartbeat_stale_trial_callback()

    def remove_session(self) -> None:
        self._retry("remove_session")


# reads and upserts: repeating one is harmless, so they are retried as they are
_PLAIN = ("set_study_user_attr", "set_study_system_attr", "get_study_id_from_name", "get_study_name_from_id",
          "get_study_directions", "get_study_user_attrs", "get_study_system_attrs", "get_all_studies",
          "set_trial_param", "get_trial_id_from_study_id_trial_number", "set_trial_intermediate_value",
          "set_trial_user_attr", "set_trial_system_attr", "get_trial", "get_all_trials", "get_best_trial")


def _plain(name: str):
    def method(self, *args, **kwargs):
        return self._retry(name, *args, **kwargs)
    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"`{name}`, retried while the storage is away (a read or an upsert: safe to repeat)."
    return method


for _name in _PLAIN:
    setattr(RetryingStorage, _name, _plain(_name))
abc.update_abstractmethods(RetryingStorage)


def _tokened(template: FrozenTrial | None, token: str) -> FrozenTrial:
    """The trial Optuna would create, with the token among its system attributes."""
    if template is None:
        return FrozenTrial(number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(),
                           datetime_complete=None, params={}, distributions={}, user_attrs={},
                           system_attrs={TOKEN: token}, intermediate_values={}, trial_id=-1)
    t = copy.deepcopy(template)
    t.system_attrs = {**t.system_attrs, TOKEN: token}
    return t


def retrying(rdb, outage: Outage) -> RetryingStorage:
    """`rdb` (an RDBStorage), cached as Optuna caches it, riding out `outage`s."""
    rdb_log = logging.getLogger("optuna.storages._rdb.storage")
    if not any(isinstance(f, _QuietFallback) for f in rdb_log.filters):
        rdb_log.addFilter(_QuietFallback())
    return RetryingStorage(optuna.storages._CachedStorage(rdb), outage, rdb)


def run_optimize(optimize, log=print) -> bool:
    """Run `optimize()` (a study.optimize call) and say whether it was cut short because another
    worker failed this worker's running trial (its heartbeat looked stale after an outage; the
    trial is retried by the heartbeat callback): then the caller carries on with the trials left.

    Optuna may mask a StorageGone (its trial bookkeeping fails on the storage too, with an
    unrelated error): the StorageGone is raised instead."""
    try:
        optimize()
        return False
    except BaseException as e:
        gone = next((x for x in _chain(e) if isinstance(x, StorageGone)), None)
        if gone is not None:
            if gone is e:
                raise
            raise StorageGone(str(gone)) from None
        if not any(isinstance(x, UpdateFinishedTrialError) or
                   (isinstance(x, ValueError) and str(x).startswith("Cannot tell a ")) for x in _chain(e)):
            raise
    log("warning: another worker failed this worker's running trial while the storage was away "
        "(its heartbeat looked stale); it is retried, carrying on")
    return True
