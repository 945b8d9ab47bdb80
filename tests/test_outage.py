"""Workers ride out a storage outage (tuner.search.outage): a lost connection is retried for
--storage-retry seconds, each write is applied once however often it is retried, and a storage
that stays away ends the worker with one line and exit code 3.

The fast tests drive the retrying proxy over Optuna's in-memory storage made to drop chosen
calls (before or after applying them), and over a locked SQLite file. The slow ones stop a real
throwaway PostgreSQL server (tests/pg.py) under two `tune` workers:
for 12 s, then for good; like test_workers, they are skipped without the server binaries unless
TARFLOW_TUNER_REQUIRE_POSTGRES=1."""

import collections
import logging
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
import typer
from optuna.trial import TrialState

from tarflow.schedule import Schedule
from tuner.search.outage import (EXIT_CODE, Outage, RetryingStorage, StorageGone, is_transient, retrying,
                                 run_optimize)
from tuner.search.summary import StudySummary

from .conftest import one_line_error, run_cli
from .pg import throwaway_server

FAST = (0.001, 0.002)  # backoff of the in-memory tests


def _drop(op: str) -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError(op, {}, Exception("server closed the connection unexpectedly"))


class Flaky:
    """An in-memory storage whose calls named in `plan` drop the connection: "before" (nothing
    applied) or "after" (applied, reply lost), one entry per call."""

    def __init__(self, plan=None, beat=None):
        self.inner, self.plan, self.beat, self.calls = optuna.storages.InMemoryStorage(), plan or {}, beat, []
        self.beats = []

    def __getattr__(self, name):
        attr = getattr(self.inner, name)

        def call(*args, **kwargs):
            mode = self.plan[name].pop(0) if self.plan.get(name) else None
            self.calls.append(name)
            if mode == "before":
                raise _drop(name)
            out = attr(*args, **kwargs)
            if mode == "after":
                raise _drop(name)
            return out
        return call

    def get_heartbeat_interval(self):
        return self.beat

    def get_heartbeat_stale_trial_callback(self):
        return None

    def record_heartbeat(self, trial_id):
        self.beats.append(trial_id)

    def _get_stale_trial_ids(self, study_id):
        return [t._trial_id for t in self.inner.get_all_trials(study_id) if t.state == TrialState.RUNNING]


def _storage(plan=None, window=30.0, beat=None):
    lines = []
    flaky = Flaky(plan, beat)
    return RetryingStorage(flaky, Outage("postgresql://u:***@db/optuna", window, lines.append, FAST)), flaky, lines


def test_a_study_on_a_flaky_storage_records_each_trial_once():
    plan = {"create_new_trial": ["after", None, "before"], "set_trial_state_values": [None, "after", None, "before"],
            "set_trial_user_attr": ["after"], "get_all_trials": ["before"], "set_trial_param": [None, "after"]}
    storage, flaky, lines = _storage(plan)
    study = optuna.create_study(storage=storage, study_name="s")

    def objective(trial):
        trial.set_user_attr("seen", trial.number)
        return trial.suggest_float("x", 0, 1) ** 2

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=6)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6 and [t.number for t in trials] == list(range(6))
    assert all(t.value == t.params["x"] ** 2 and t.user_attrs["seen"] == t.number for t in trials)
    assert not any(flaky.plan.values())  # every planned drop happened
    assert sum("went away" in s for s in lines) == sum("is back" in s for s in lines) >= 1


def test_a_lost_reply_is_not_applied_twice():
    storage, flaky, lines = _storage({"create_new_trial": ["after"], "set_trial_state_values": ["after"],
                                      "create_new_study": ["after"], "delete_study": ["after"]})
    sid = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s")  # created, reply lost: ours
    tid = storage.create_new_trial(sid)
    assert len(storage.get_all_trials(sid)) == 1  # found by its token, not created again
    assert storage.set_trial_state_values(tid, TrialState.COMPLETE, [1.5])  # finished already, same values
    assert storage.get_trial(tid).values == [1.5]
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):  # finished otherwise: not ours to change
        storage.set_trial_state_values(tid, TrialState.FAIL)
    storage.delete_study(sid)  # deleted, reply lost
    assert storage.get_all_studies() == []
    assert lines == [s for s in lines if "went away" in s or "is back" in s] and len(lines) == 8


def test_a_trial_written_twice_is_pruned_uncounted():
    storage, flaky, _ = _storage()
    sid = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s")
    real = flaky.inner.create_new_trial

    def twice(study_id, template_trial=None):  # as RDBStorage's own retry loop may do
        real(study_id, template_trial)
        return real(study_id, template_trial)
    flaky.inner.create_new_trial = twice
    tid = storage.create_new_trial(sid)
    first, second = storage.get_all_trials(sid)
    assert tid == first._trial_id and first.state == TrialState.RUNNING
    assert second.state == TrialState.PRUNED and second.user_attrs["over_cap"]
    assert "second copy of trial 0" in second.user_attrs["fail_reason"]


def test_an_ambiguous_claim_of_a_waiting_trial_is_left_to_the_heartbeat():
    storage, flaky, _ = _storage({"set_trial_state_values": ["after"]}, beat=1)
    sid = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s")
    waiting = storage.create_new_trial(sid, optuna.trial.create_trial(state=TrialState.WAITING))
    assert storage.set_trial_state_values(waiting, TrialState.RUNNING) is False  # taken, reply lost
    assert flaky.beats == [waiting]  # one beat: it goes stale and is failed, never left RUNNING


def test_stale_trials_are_left_alone_while_the_workers_beat_again():
    storage, flaky, lines = _storage(beat=1)
    sid = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s")
    tid = storage.create_new_trial(sid)
    assert storage._get_stale_trial_ids(sid) == [tid]
    flaky.plan["get_all_trials"] = ["before"]
    storage.get_all_trials(sid)  # an outage, then back
    assert storage._get_stale_trial_ids(sid) == []
    storage._outage.settle_s = 0.0
    assert storage._get_stale_trial_ids(sid) == [tid]


def test_a_storage_away_past_the_window_is_gone_with_one_message():
    storage, flaky, lines = _storage({"get_all_studies": ["before"] * 1000}, window=0.05)
    t0 = time.monotonic()
    with pytest.raises(StorageGone) as err:
        storage.get_all_studies()
    assert time.monotonic() - t0 < 1.0
    msg = str(err.value)
    assert msg.startswith("the study storage postgresql://u:***@db/optuna has been unreachable for 0 s")
    assert "server closed the connection unexpectedly" in msg and "rerun with --resume" in msg
    n = len(flaky.calls)
    with pytest.raises(StorageGone):  # gone stays gone: no second window
        storage.get_study_id_from_name("s")
    storage.record_heartbeat(1)  # a heartbeat thread never raises it
    assert len(flaky.calls) == n and len(lines) == 1 and "went away" in lines[0]


def test_only_lost_connections_are_retried():
    storage, flaky, lines = _storage()
    with pytest.raises(KeyError):
        storage.get_study_id_from_name("nothing")
    assert flaky.calls == ["get_study_id_from_name"] and lines == []
    assert not is_transient(optuna.exceptions.StorageInternalError("commit failed"))
    wrapped = optuna.exceptions.StorageInternalError("commit failed")
    wrapped.__cause__ = _drop("commit")
    assert is_transient(wrapped) and is_transient(sqlite3.OperationalError("database is locked"))
    assert not is_transient(sqlalchemy.exc.IntegrityError("insert", {}, Exception("duplicate key")))


def test_run_optimize_unmasks_storage_gone_and_survives_a_taken_over_trial():
    def masked():
        try:
            raise StorageGone("gone for good")
        finally:
            raise UnboundLocalError("cannot access local variable 'updated_state'")  # Optuna's _run_trial

    with pytest.raises(StorageGone, match="gone for good"):
        run_optimize(masked)
    lines = []

    def taken():
        raise ValueError("Cannot tell a FAIL trial.")
    assert run_optimize(taken, lines.append) is True and "carrying on" in lines[0]
    assert run_optimize(lambda: None) is False
    with pytest.raises(ValueError, match="something else"):
        run_optimize(lambda: (_ for _ in ()).throw(ValueError("something else")))


def test_optunas_fallback_warning_is_quiet_on_a_lost_connection(tmp_path):
    from tuner.search.outage import _QuietFallback

    quiet = _QuietFallback()

    def record(text):
        return logging.LogRecord("optuna.storages._rdb.storage", logging.WARNING, __file__, 1, text, None, None)
    assert not quiet.filter(record("Caught an error from sqlalchemy: (psycopg.errors.AdminShutdown) terminating "
                                   "connection due to administrator command. Falling back to a slower alternative."))
    assert quiet.filter(record("Caught an error from sqlalchemy: too many SQL variables. Falling back ..."))


def test_a_locked_sqlite_file_is_waited_for(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    rdb = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 0.1}})
    lines = []
    storage = retrying(rdb, Outage(url, 30.0, lines.append, FAST))
    lock = sqlite3.connect(tmp_path / "study.db", check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")
    threading.Timer(1.0, lock.commit).start()
    t0 = time.monotonic()
    storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s")
    assert 0.9 < time.monotonic() - t0 < 10
    assert "database is locked" in lines[0] and "is back" in lines[1] and len(lines) == 2
    assert [s.study_name for s in storage.get_all_studies()] == ["s"]


def test_storage_gone_is_one_line_and_exit_code_3(capsys):
    from tuner.cli.options import user_errors

    def command():
        raise StorageGone("the study storage sqlite:///x.db has been unreachable for 10 s (database is locked); "
                          "its trials are kept there: rerun with --resume once it is back")
    with pytest.raises(typer.Exit) as ex:
        user_errors(command)()
    assert ex.value.exit_code == EXIT_CODE == 3
    err = capsys.readouterr().err
    assert err.startswith("error: the study storage sqlite:///x.db") and len(err.strip().splitlines()) == 1


def test_a_negative_storage_retry_is_refused():
    res = run_cli("tune", "--storage-retry", "-1", "--trials", "1", "--device", "cpu",
                  "--out", Path(tempfile.mkdtemp()) / "never")
    one_line_error(res, "--storage-retry must be >= 0 seconds, got -1")


# ---- a real PostgreSQL server, stopped under two workers -------------------------------------

# as tests/test_workers.py: tiny, unguided, and every worker starts from one shared profile
ARGS = ["--trials", "6", "--n", "16", "--batch", "16", "--verify-n", "32", "--max-drift", "off", "--tolerance", "1000",
        "--heartbeat", "2", "--modes", "segments", "--device", "cpu", "--retime-rounds", "1"]
CAP = int(ARGS[ARGS.index("--trials") + 1])


@pytest.fixture(scope="module")
def server():
    with throwaway_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def profiled(tiny_calib, plain_profile):
    """The session's 4 calibration images and their block profile (tests/conftest.py): a worker
    started with --resume on a folder holding it reuses it instead of measuring its own."""
    return tiny_calib, plain_profile


def _tune(calib: Path, url: str, study: str, *extra) -> list[str]:
    return [sys.executable, "-c", "from tuner.cli import app; app()", "tune", *ARGS, "--data", str(calib),
            "--storage", url, "--study", study, "--resume", *extra]


def _workers(tmp_path, profiled, url: str, study: str, n: int, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = _tune(profiled[0], url, study, *extra)
    procs = []
    for i in range(n):
        shutil.copytree(profiled[1], tmp_path / f"w{i}" / "profile")
        out, err = open(tmp_path / f"w{i}.out", "w"), open(tmp_path / f"w{i}.err", "w")
        procs.append(subprocess.Popen([*cmd, "--out", str(tmp_path / f"w{i}")], env=env, stdout=out, stderr=err, text=True))
    return procs


def _finish(procs, tmp_path, timeout=300):
    for p in procs:
        p.wait(timeout=timeout)
    return [((tmp_path / f"w{i}.out").read_text(), (tmp_path / f"w{i}.err").read_text()) for i in range(len(procs))]


def _completed(url: str, study: str, state: str = "COMPLETE") -> dict[int, float]:
    """Trials in `state` and their values, read without Optuna (a plain connection)."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=2) as c:
            rows = c.execute("SELECT t.number, v.value FROM trials t JOIN studies s ON s.study_id = t.study_id "
                             "LEFT JOIN trial_values v ON v.trial_id = t.trial_id "
                             "WHERE s.study_name = %s AND t.state = %s", (study, state)).fetchall()
    except psycopg.Error:  # tables not created yet
        return {}
    return dict(rows)


def _wait_for(url: str, study: str, n: int, procs, timeout=240) -> dict[int, float]:
    end = time.monotonic() + timeout
    while len(done := _completed(url, study)) < n:
        assert time.monotonic() < end and all(p.poll() is None for p in procs), "the study never got going"
        time.sleep(0.3)
    return done


def _study(url: str, name: str):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = url.replace("postgresql://", "postgresql+psycopg://")
    return optuna.load_study(study_name=name, storage=storage), storage


def _check_finished(url: str, name: str, kept: dict[int, float]):
    study, storage = _study(url, name)
    trials = study.get_trials()
    table = [(t.number, t.state.name, t.user_attrs.get("fail_reason"), t.system_attrs.get("failed_trial"),
              t.datetime_start and f"{t.datetime_start:%M:%S.%f}"[:9],  # None while WAITING
              t.datetime_complete and f"{t.datetime_complete:%M:%S.%f}"[:9])
             for t in trials]
    counted = [t for t in trials if t.state != TrialState.WAITING and not t.user_attrs.get("over_cap")]
    assert len(counted) == CAP, table
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    after = {t.number: t.value for t in trials if t.state == TrialState.COMPLETE}
    assert all(math.isclose(after[k], v) for k, v in kept.items()), (kept, after)  # nothing completed was lost
    assert len([k for k in study.user_attrs if k.startswith("result@")]) == 1, table  # one export
    assert not [s for s in optuna.study.get_all_study_names(storage) if s.startswith(name + ":")]  # claim released
    return trials


def test_two_workers_ride_out_a_database_restart(server, profiled, tmp_path):
    procs = _workers(tmp_path, profiled, server.url(), "restart", 2, "--storage-retry", "120")
    try:
        kept = _wait_for(server.url(), "restart", 3, procs)
        server.stop()
        try:
            time.sleep(12)  # six heartbeats: every running trial's beat is stale when it comes back
        finally:
            server.start()
        outs = _finish(procs, tmp_path)
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-1500:] + e[-1500:] for o, e in outs)
    for out, err in outs:
        assert out.count("went away") == 1 and out.count("is back after") == 1, out
        assert "Traceback" not in out + err
    trials = _check_finished(server.url(), "restart", kept)
    # the sharing itself (test_workers' three-worker study is the slow form): seeds enqueued once,
    # the winner verified and exported by one worker, and every worker writes that same result
    seeds = [t.user_attrs["seed"] for t in trials if "seed" in t.user_attrs]
    assert sorted(seeds) == sorted(set(seeds)) and {"sequential", "paper"} <= set(seeds), seeds
    assert sum("re-timing the chosen schedule" in out for out, _ in outs) == 1
    summaries = [StudySummary.load(tmp_path / f"w{i}" / "summary.json").to_dict() for i in range(2)]
    assert summaries[0]["chosen_trial"] is not None and summaries[1] == summaries[0]
    plans = [Schedule.load(tmp_path / f"w{i}" / "schedule.json").plans for i in range(2)]
    assert plans[1] == plans[0]
    print(f"restart: {len(kept)} completed before the stop; after: "
          f"{sorted(collections.Counter(t.state.name for t in trials).items())}, "
          f"{sum(bool(t.user_attrs.get('over_cap')) for t in trials)} over the cap; " + "; ".join(
              next(s for s in out.splitlines() if "is back" in s) for out, _ in outs))


def test_workers_end_with_one_line_when_the_database_stays_away_then_resume(server, profiled, tmp_path):
    url = server.url("secret")  # trust authentication ignores it; it must not be echoed
    procs, stopped = _workers(tmp_path, profiled, url, "gone", 2, "--storage-retry", "10"), False
    try:
        kept = _wait_for(url, "gone", 3, procs)
        running = _completed(url, "gone", "RUNNING")
        server.stop()
        stopped, t_stop = True, time.monotonic()
        outs = _finish(procs, tmp_path, timeout=120)
        took = time.monotonic() - t_stop
    finally:
        for p in procs:
            p.kill()
        if stopped:
            server.start()
    assert [p.returncode for p in procs] == [EXIT_CODE] * 2, "\n".join(o[-1500:] + e[-1500:] for o, e in outs)
    assert 10 <= took < 90, took  # the window is 10 s; a loaded machine is slow to stop the workers
    print(f"stopped for good: exit codes {[p.returncode for p in procs]} {took:.1f} s after the stop")
    for out, err in outs:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: the study storage postgresql://tuner:***@127.0.0.1"), err
        assert "has been unreachable for 1" in lines[0] and "rerun with --resume" in lines[0]
        assert "secret" not in out + err and "Traceback" not in out + err and "went away" in out
    resumed = subprocess.run(_tune(profiled[0], url, "gone", "--out", str(tmp_path / "w0")),  # its profile: reused
                             env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-1500:] + resumed.stderr[-1500:]
    trials = _check_finished(url, "gone", kept)  # the trials running at the stop: failed by heartbeat
    print(f"resumed: {sorted(collections.Counter(t.state.name for t in trials).items())}; running at the stop: "
          f"{ {n: trials[n].state.name for n in running} }")
