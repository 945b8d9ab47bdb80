"""Optuna study plumbing for the search: storage with heartbeats (dead trials are failed and
retried), the resume guard, failure records, crash points for the recovery test, feasibility and
the trials table."""

from __future__ import annotations

import math
import os
import signal
import warnings

import optuna
import pandas as pd
import torch

from tarflow.errors import UserError

from .timing import device_info


def is_feasible(t: optuna.trial.FrozenTrial) -> bool:
    return bool(t.constraints) and all(c <= 0 for c in t.constraints.values())


def feasible_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    ok = [t for t in done if is_feasible(t)]
    return sorted(ok, key=lambda t: t.value)


def trials_table(study: optuna.Study, extractor_id: str, n: int) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retried = {optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t): t.number for t in study.trials}
    rows = []
    for t in study.trials:
        stale = (f"heartbeat stopped (its process died); retried as trial {retried[t.number]}"
                 if t.number in retried else "heartbeat stopped (its process died)")
        done = t.state == optuna.trial.TrialState.COMPLETE
        row = {"number": t.number, "state": t.state.name, "seed": t.user_attrs.get("seed", ""),
               "objective": t.value if done else None,
               "latency_s": t.user_attrs.get("latency", {}).get("median_s") if done else None,
               "fid": t.user_attrs.get("fid"), "fid_gap": t.user_attrs.get("fid_gap"),
               "extractor": extractor_id, "n": n,
               "feasible": is_feasible(t),
               "proxy_rmse_mean": t.user_attrs.get("proxy", {}).get("rmse_mean"),
               "proxy_rmse_max": t.user_attrs.get("proxy", {}).get("rmse_max"),
               "warmup_rmse": t.user_attrs.get("warmup_rmse"), "passes": t.user_attrs.get("passes"),
               "fallbacks": t.user_attrs.get("fallbacks"),
               "fail_reason": t.user_attrs.get("fail_reason") or (stale if t.state.name == "FAIL" else None)}
        row |= {f"param_{k}": v for k, v in t.params.items()}
        rows.append(row)
    return pd.DataFrame(rows)


def study_config(cfg, model, device) -> dict:
    """What makes trials comparable: a study resumed with anything else would mix them."""
    return {"model_sha256": model.fingerprint["weights_sha256"], "batch": cfg.batch,
            "objective": cfg.objective, "max_drift": cfg.max_drift, "modes": list(cfg.modes),
            "device": device_info(device)["device_name"] if cfg.objective == "latency" else None,
            "tolerance": cfg.tolerance, "extractor": cfg.extractor, "n": cfg.n, "seed": cfg.seed,
            "sampling": cfg.sampling.to_dict()}


def open_storage(url: str, heartbeat: int):
    """The study storage, with a heartbeat: a trial whose process died (kill -9, pre-emption) stops
    beating, is marked FAIL after 2 x `heartbeat` seconds by the next worker or --resume, and is
    retried once as a fresh trial."""
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    try:
        with warnings.catch_warnings():  # heartbeats are marked experimental in optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                              engine_kwargs=_connect_timeout(url))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot open Optuna storage {url}: {first}") from None


def _connect_timeout(url: str) -> dict:
    """Fail within seconds on an unreachable database server instead of hanging."""
    return {"connect_args": {"connect_timeout": 5}} if url.startswith("postgresql") else {}


def crashpoint(name: str, trial: int) -> None:
    """Die here like a pre-empted machine when TARFLOW_TUNER_CRASH_AT names this point and trial
    (`sampling:3`, `fid:3`, `storage:3`): lets the crash-safety test choose its moment."""
    if os.environ.get("TARFLOW_TUNER_CRASH_AT") == f"{name}:{trial}":
        os.kill(os.getpid(), signal.SIGKILL)


def make_study(storage, name: str, seed: int, resume: bool, config: dict) -> optuna.Study:
    """Create the study, or reopen it with --resume after checking it was run with `config`."""
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=8, constant_liar=True)
    try:
        exists = name in optuna.study.get_all_study_names(storage)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot open Optuna storage: {first}") from None
    if exists and not resume:
        raise UserError(f"study '{name}' already exists in the storage: pass --resume to add trials, "
                        "or choose another --study / --out")
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize",
                                sampler=sampler, load_if_exists=True)
    stored = study.user_attrs.get("config")
    if stored is None:
        study.set_user_attr("config", config)
    elif stored != config:
        diff = [f"{k} {stored.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(stored) | set(config))
                if stored.get(k) != config.get(k)]
        raise UserError(f"study '{name}' was run with other settings ({'; '.join(diff)}): its trials "
                        "would not be comparable; resume with the same settings or start another --study")
    return study


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
