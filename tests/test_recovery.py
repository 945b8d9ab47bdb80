"""Crash safety: a `tune` killed with SIGKILL at a chosen point loses no completed trial, its
dead trial is detected by heartbeat and retried, and no result file is ever half-written."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from tarflow.schedule import Schedule
from tuner.search.summary import StudySummary

from .conftest import study_with_profile

# crash safety does not depend on the search's size: n = one batch, unguided (the session's shared
# profile), limits that never bind (tests/test_constraints.py and the tiny study test those)
ARGS = ["--trials", "6", "--n", "16", "--batch", "16", "--verify-n", "32", "--max-drift", "off", "--tolerance", "1000",
        "--heartbeat", "1", "--modes", "segments", "--device", "cpu", "--retime-rounds", "1"]


def tune(out, calib, *extra, crash_at=None):
    """A real `tune` process. Every run passes --resume ("join or create"): the first one creates
    the study and reuses the profile copied into `out` rather than measuring it again."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TARFLOW_TUNER_CRASH_AT", None)
    if crash_at:
        env["TARFLOW_TUNER_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-c", "from tuner.cli import app; app()", "tune", *ARGS,
                           "--data", str(calib), "--out", str(out), "--resume", *extra],
                          env=env, capture_output=True, text=True, timeout=300)


def trials(out):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="tarflow-tune", storage=f"sqlite:///{out / 'study.db'}").trials


# "storage" (killed between two writes of the trial's results: its FID stored, the rest not) runs
# by default. "sampling" (after the warm-up batch) and "fid" (FID computed, not yet stored) take
# the same recovery path - heartbeat fails the dead trial, it is retried once, completed trials
# are kept, no half-written file - and run with `pytest -m slow` (about 30 s each, busy machine)
@pytest.mark.parametrize("point", [pytest.param("sampling", marks=pytest.mark.slow),
                                   pytest.param("fid", marks=pytest.mark.slow), "storage"])
def test_sigkill_mid_trial_then_resume_keeps_every_completed_trial(tmp_path, point, tiny_calib, plain_profile):
    out = study_with_profile(plain_profile, tmp_path / "study")
    res = tune(out, tiny_calib, crash_at=f"{point}:2")
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    before = trials(out)
    done = {t.number: (t.params, t.value) for t in before if t.state == optuna.trial.TrialState.COMPLETE}
    assert sorted(done) == [0, 1] and before[2].state == optuna.trial.TrialState.RUNNING
    assert not any((out / f).exists() for f in ("schedule.json", "summary.json", "trials.csv", "report.html"))
    assert not list(out.glob("**/.*.tmp"))  # no temporary file left behind
    time.sleep(2.5)  # the dead trial's heartbeat is now older than its grace period
    res = tune(out, tiny_calib)
    assert res.returncode == 0, res.stderr[-2000:]
    after = trials(out)
    assert {t.number: (t.params, t.value) for t in after if t.number in done} == done
    assert after[2].state == optuna.trial.TrialState.FAIL
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        retried = [t for t in after if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 2]
    assert len(retried) == 1 and retried[0].params == after[2].params
    assert len(after) == 6 and all(t.state.is_finished() for t in after)  # the retry ran within --trials
    import pandas as pd

    table = pd.read_csv(out / "trials.csv")
    assert table.fail_reason[2] == f"heartbeat stopped (its process died); retried as trial {retried[0].number}"
    Schedule.load(out / "schedule.json")
    assert StudySummary.load(out / "summary.json").trials == 6
