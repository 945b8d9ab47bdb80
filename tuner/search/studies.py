"""Optuna study plumbing for the search: storage with heartbeats (dead trials are failed and
retried), the resume guard, failure records, crash points for the recovery test, feasibility and
the trials table."""

from __future__ import annotations

import math
import os
import re
import signal
import threading
import time
import warnings

import optuna
from optuna.trial import TrialState
import pandas as pd
import sqlalchemy.exc
import torch

from tarflow.errors import UserError

from tuner.measure.timing import device_info
from tuner.search.space import SearchSpace


def is_feasible(t: optuna.trial.FrozenTrial) -> bool:
    return bool(t.constraints) and all(c <= 0 for c in t.constraints.values())


def feasible_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    ok = [t for t in done if is_feasible(t)]
    return sorted(ok, key=lambda t: t.value)


def measured_latency(t: optuna.trial.FrozenTrial) -> float | None:
    """The median seconds per batch timed while the trial ran (real seconds whatever the
    objective; the trial value is the objective's, see tuner.search.objectives)."""
    return (t.user_attrs.get("latency") or {}).get("median_s")


def trials_table(study: optuna.Study, extractor_id: str, n: int) -> pd.DataFrame:
    """trials.csv: one row per trial. `objective` is the trial value in the objective's unit
    (summary.json's `objective` record says which), `latency_s` the measured median seconds per
    batch, parameters as the search space names their columns."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retried = {optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t): t.number for t in study.trials}
    rows = []
    for t in study.trials:
        stale = (f"heartbeat stopped (its process died); retried as trial {retried[t.number]}"
                 if t.number in retried else "heartbeat stopped (its process died)")
        done = t.state == optuna.trial.TrialState.COMPLETE
        row = {"number": t.number, "state": t.state.name, "seed": t.user_attrs.get("seed", ""),
               "refined_from": t.user_attrs.get("refined_from"),
               "objective": t.value if done else None,
               "latency_s": measured_latency(t) if done else None,
               "fid": t.user_attrs.get("fid"), "fid_gap": t.user_attrs.get("fid_gap"),
               "extractor": extractor_id, "n": n,
               "feasible": is_feasible(t),
               "proxy_rmse_mean": t.user_attrs.get("proxy", {}).get("rmse_mean"),
               "proxy_rmse_max": t.user_attrs.get("proxy", {}).get("rmse_max"),
               "warmup_rmse": t.user_attrs.get("warmup_rmse"), "passes": t.user_attrs.get("passes"),
               "fallbacks": t.user_attrs.get("fallbacks"),
               "fail_reason": t.user_attrs.get("fail_reason") or (stale if t.state.name == "FAIL" else None)}
        row |= SearchSpace.param_columns(t.params)
        rows.append(row)
    return pd.DataFrame(rows)


def study_config(cfg, model, device) -> dict:
    """What makes trials comparable: a study resumed with anything else would mix them."""
    return {"model_sha256": model.fingerprint["weights_sha256"], "batch": cfg.batch,
            "objective": cfg.goal.spec, "max_drift": cfg.max_drift, "modes": list(cfg.modes),
            "device": cfg.goal.device_name(device_info(device)["device_name"]),
            "tolerance": cfg.tolerance, "extractor": cfg.extractor, "n": cfg.n, "seed": cfg.seed,
            "sampling": cfg.sampling.to_dict()}


def open_storage(url: str, heartbeat: int, retry: float | None = None, log=print):
    """The study storage, with a heartbeat: a trial whose process died (kill -9, pre-emption) stops
    beating, is marked FAIL after 2 x `heartbeat` seconds by the next worker or --resume, and is
    retried once as a fresh trial. With `retry` (seconds), opening it and every operation on it
    ride out a lost connection for that long (tuner.search.outage), else raise StorageGone;
    without, an unreachable storage is a UserError at once (the check before any work)."""
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    from tuner.search.outage import Outage, retrying

    shown = re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)  # no password in messages
    if url.startswith("postgresql://"):  # one driver, whichever SQLAlchemy would default to
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    if url.startswith("postgresql+psycopg://"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise UserError("a PostgreSQL storage needs its driver: pip install 'tarflow-tuner[postgres]'") from None

    def rdb(lost=False):
        with warnings.catch_warnings():  # heartbeats are marked experimental in optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                              engine_kwargs=_connect_timeout(url))

    outage = None if retry is None else Outage(shown, retry, log)
    for attempt in range(5):
        try:
            return rdb() if outage is None else retrying(outage.run(rdb), outage)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            # workers started together race to create the tables: the loser retries
            if attempt == 4:
                raise UserError(f"cannot open Optuna storage {shown}: {_first_line(e)}") from None
            time.sleep(0.5 * (attempt + 1))
        except Exception as e:
            raise UserError(f"cannot open Optuna storage {shown}: {_first_line(e) or type(e).__name__}") from None


def _connect_timeout(url: str) -> dict:
    """Fail within seconds on an unreachable database server instead of hanging, also on a
    connection that died silently (keepalives); check a pooled connection before using it, since
    a restarted server has closed them all."""
    if not url.startswith("postgresql"):
        return {"pool_pre_ping": True}
    return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 30,
                                                    "keepalives_interval": 10, "keepalives_count": 3}}


def crashpoint(name: str, trial: int) -> None:
    """Die here like a pre-empted machine when TARFLOW_TUNER_CRASH_AT names this point and trial
    (`sampling:3`, `fid:3`, `storage:3`): lets the crash-safety test choose its moment."""
    if os.environ.get("TARFLOW_TUNER_CRASH_AT") == f"{name}:{trial}":
        os.kill(os.getpid(), signal.SIGKILL)


def make_study(storage, name: str, seed: int, resume: bool, config: dict, seeds: dict[str, dict]) -> optuna.Study:
    """Create the study, or join/reopen it with --resume after checking it was run with `config`.

    Creation is atomic in the database, so among workers started together exactly one creates
    the study; that one stores the config and enqueues the seed schedules (`seeds`: name ->
    params), so seeds are enqueued once per study however many workers start."""
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=8, constant_liar=True)
    exists = _holds_study(storage, name)
    if exists and not resume:
        raise UserError(f"study '{name}' already exists in the storage: pass --resume to add trials, "
                        "or choose another --study / --out")
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize", sampler=sampler)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    else:
        study.set_user_attr("config", config)
        for seed_name, params in seeds.items():
            study.enqueue_trial(params, user_attrs={"seed": seed_name})
        return study
    stored = _await(lambda: study.user_attrs.get("config"), 10.0)  # its creator writes it next
    if stored is None:  # a study from before settings were recorded: record them now
        study.set_user_attr("config", config)
    elif stored != config:
        diff = [f"{k} {stored.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(stored) | set(config))
                if stored.get(k) != config.get(k)]
        raise UserError(f"study '{name}' was run with other settings ({'; '.join(diff)}): its trials "
                        "would not be comparable; resume with the same settings or start another --study")
    return study


def _holds_study(storage, name: str) -> bool:
    """Whether the storage holds study `name`; an unreachable storage is a one-line UserError."""
    try:
        return name in optuna.study.get_all_study_names(storage)
    except Exception as e:
        raise UserError(f"cannot open Optuna storage: {_first_line(e) or type(e).__name__}") from None


def existing_study(storage, name: str) -> optuna.Study | None:
    """The study `name` if the storage holds it (a --resume or a late worker), else None."""
    return optuna.load_study(study_name=name, storage=storage) if _holds_study(storage, name) else None


def keep_init_choices(study: optuna.Study, space) -> None:
    """A resumed or joined study keeps the initial guesses its trials chose from: Optuna refuses a
    categorical parameter whose choices change, and a study made before `calibrated` was offered
    (or with a profile without fitted guesses) has two."""
    for t in study.get_trials(deepcopy=False):
        dist = next((d for name, d in t.distributions.items() if name.endswith("_init")), None)
        if dist is not None:
            space.inits = tuple(dist.choices)
            return


def _await(get, seconds: float, poll: float = 0.2):
    """`get()` once it is not None, or None after `seconds`."""
    end = time.monotonic() + seconds
    while (v := get()) is None and time.monotonic() < end:
        time.sleep(poll)
    return v


STARTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)


def counted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that count towards --trials: every started one except those pruned for
    arriving past the cap."""
    return [t for t in study.get_trials(deepcopy=False, states=STARTED) if not t.user_attrs.get("over_cap")]


class TrialCap:
    """--trials is the study's total. Workers decide to start a trial without a lock, so when
    several reach the cap together each may create one more; such a trial sees `cap` counted
    trials numbered before it and is pruned before any work, its reason recorded. The study then
    holds exactly `cap` counted trials and at most (workers - 1) pruned extras."""

    def __init__(self, objective, cap: int):
        self.objective, self.cap = objective, cap

    def __call__(self, trial: optuna.Trial) -> float:
        earlier = [t for t in counted_trials(trial.study) if t.number < trial.number]
        if len(earlier) >= self.cap:
            trial.set_user_attr("over_cap", True)
            trial.set_user_attr("fail_reason", f"started after the study reached --trials {self.cap} "
                                               "(workers raced); pruned before any work")
            raise optuna.TrialPruned("over the study's trial cap")
        return self.objective(trial)


def export_once(study: optuna.Study, heartbeat: int, produce, log=print, poll: float = 1.0) -> dict:
    """The study's result, computed by exactly one worker and shared by all.

    Waits until no trial is running (dead ones are failed by heartbeat), then the first worker
    to claim the finished study runs `produce()` (verification and export) and stores its result
    in the study; every other worker waits for that stored result, so all report the same plans.
    A claim whose worker died (no beat for 2 x heartbeat) is taken over. The result is keyed by
    the number of finished trials, so `--resume` of a finished study reuses it and a study that
    grows is exported again; trials pruned over the cap do not count (they did no work, and one
    started by a late worker after the export must not cause a second)."""
    storage, said, seen = study._storage, set(), {}
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        finished = sum(t.state.is_finished() and not t.user_attrs.get("over_cap") for t in trials)
        key = f"result@{finished}"
        if running:
            _say(log, said, f"waiting for {running} running trial(s) of other workers ...")
        elif (got := study.user_attrs.get(key)) is not None:
            return got
        elif (claim := _claim(storage, f"{study.study_name}:{key}", heartbeat, seen)) is not None:
            with claim:
                if (got := study.user_attrs.get(key)) is None:  # stored while we were claiming
                    got = produce()
                    study.set_user_attr(key, got)
            return got
        else:
            _say(log, said, "another worker is verifying and exporting the winner; waiting for it ...")
        time.sleep(poll)


def _say(log, said: set, line: str) -> None:
    if line not in said:
        said.add(line)
        log(line)


class _Claim:
    """Holds a claim study (a unique name in the storage) and beats on it until released."""

    def __init__(self, storage, study_id: int, heartbeat: int):
        self.storage, self.study_id, self.heartbeat = storage, study_id, heartbeat
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _beat(self):
        self.storage.set_study_user_attr(self.study_id, "beat", time.time())

    def _run(self):
        from tuner.search.outage import StorageGone

        try:
            while not self._stop.wait(self.heartbeat):
                self._beat()
        except StorageGone:
            pass  # the worker's own next storage operation reports it, not a thread's traceback

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            self.storage.delete_study(self.study_id)
        else:  # failed: let another worker (or --resume) take over at once
            self.storage.set_study_user_attr(self.study_id, "beat", 0.0)


def _claim(storage, name: str, heartbeat: int, seen: dict) -> _Claim | None:
    """Claim `name`, or None while a live worker holds it. `seen` remembers when a claim without
    a beat was first seen (its worker may have died between creating and beating)."""
    try:
        sid = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], name)
        return _Claim(storage, sid, heartbeat)
    except optuna.exceptions.DuplicatedStudyError:
        pass
    try:
        sid = storage.get_study_id_from_name(name)
        beat = storage.get_study_user_attrs(sid).get("beat")
    except KeyError:  # released meanwhile: claim it on the next round
        return None
    last = beat if beat is not None else seen.setdefault(sid, time.time())
    if time.time() - last > 2 * heartbeat:
        try:
            storage.delete_study(sid)  # by id: a newer claim under the same name is left alone
        except KeyError:
            pass
    return None


class RecordFailures:
    """Wraps the objective so a failed trial says why (exception type and first line), and a GPU
    out-of-memory marks the trial infeasible instead of ending the study."""

    def __init__(self, objective):
        self.objective = objective

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self.objective(trial)
        except optuna.TrialPruned:
            raise
        except torch.cuda.OutOfMemoryError as e:
            trial.set_user_attr("fail_reason", f"OutOfMemoryError: {_first_line(e)}")
            trial.set_constraint("fid_gap", math.inf)
            return math.inf
        except Exception as e:
            trial.set_user_attr("fail_reason", f"{type(e).__name__}: {_first_line(e)}")
            raise


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""
