"""Several `tune` workers on one PostgreSQL study: the study ends with --trials trials, seeds are
enqueued once, and one verified winner is exported that every worker reports.

The server is a throwaway one from Debian's packages (tests/pg.py)."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from tarflow.schedule import Schedule
from tuner.search.summary import StudySummary

from .conftest import one_line_error, run_cli, study_with_profile
from .pg import throwaway_server

# small enough for 3 workers on 2 cores: the sharing, not the search, is under test. Unguided
# (half the sampling of guided runs), n = one batch, and each worker starts from the session's
# shared profile (a guided profile of its own took each worker 25-40 s on a busy 2-core machine).
ARGS = ["--trials", "6", "--n", "16", "--batch", "16", "--verify-n", "32", "--max-drift", "off", "--tolerance", "1000",
        "--heartbeat", "2", "--modes", "segments", "--device", "cpu", "--retime-rounds", "1"]


@pytest.fixture(scope="module")
def postgres_url():
    with throwaway_server() as srv:
        yield srv.url()


@pytest.mark.slow  # test_outage's restart test runs the same checks on two workers
def test_three_workers_share_one_study(postgres_url, tmp_path, tiny_calib, plain_profile):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", "from tuner.cli import app; app()", "tune", *ARGS,
           "--data", str(tiny_calib), "--storage", postgres_url, "--study", "shared", "--resume"]
    dirs = [study_with_profile(plain_profile, tmp_path / f"w{i}") for i in range(3)]
    workers = [subprocess.Popen([*cmd, "--out", str(d)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for d in dirs]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], "\n".join(o[-1500:] for o in outs)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = postgres_url.replace("postgresql://", "postgresql+psycopg://")
    study = optuna.load_study(study_name="shared", storage=storage)
    cap = int(ARGS[ARGS.index("--trials") + 1])
    extra = [t for t in study.trials if t.user_attrs.get("over_cap")]
    counted = [t for t in study.trials if not t.user_attrs.get("over_cap")]
    assert len(counted) == cap and all(t.state.is_finished() for t in counted)
    assert len(extra) <= 2 and all(t.state == optuna.trial.TrialState.PRUNED for t in extra)
    seeds = [t.user_attrs["seed"] for t in study.trials if "seed" in t.user_attrs]
    assert sorted(seeds) == sorted(set(seeds)) and {"sequential", "paper"} <= set(seeds)
    results = [k for k in study.user_attrs if k.startswith("result@")]
    assert len(results) == 1  # one export, stored in the study
    assert optuna.study.get_all_study_names(storage) == ["shared"]  # the export claim was released
    summaries = [StudySummary.load(tmp_path / f"w{i}" / "summary.json") for i in range(3)]
    assert summaries[0].chosen_trial is not None
    assert all(s.to_dict() == summaries[0].to_dict() for s in summaries)
    plans = [Schedule.load(tmp_path / f"w{i}" / "schedule.json").plans for i in range(3)]
    assert plans[1] == plans[0] and plans[2] == plans[0]
    assert sum("re-timing the chosen schedule" in o for o in outs) == 1  # verified and exported once


def test_unreachable_storage_fails_fast_with_one_line():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    res = run_cli("tune", "--storage", f"postgresql://u:secret@127.0.0.1:{port}/optuna", "--trials", "1",
                  "--device", "cpu", "--out", Path(tempfile.mkdtemp()) / "never")
    one_line_error(res, f"cannot open Optuna storage postgresql://u:***@127.0.0.1:{port}/optuna")
    assert "secret" not in res.output
    assert time.monotonic() - t0 < 20


def test_resuming_a_finished_study_reuses_its_stored_result(tiny_study, tiny_calib, tmp_path, monkeypatch):
    from tuner.search import drift_model

    from .conftest import TINY_STUDY_ARGS

    out, _ = tiny_study
    copy = tmp_path / "study"
    shutil.copytree(out, copy)
    (copy / "seeds" / "model.json").unlink()

    def calibrate(*args):
        raise AssertionError("the model seed was calibrated again: the study holds it")

    monkeypatch.setattr(drift_model, "model_seed", calibrate)
    res = run_cli("tune", *TINY_STUDY_ARGS, "--data", tiny_calib, "--out", copy, "--resume")
    assert res.exit_code == 0, res.output
    # exported once, reused: no re-timing or verification ran (the cost plan printed first names them)
    assert "re-timing the chosen schedule" not in res.output and "verify trial" not in res.output
    assert Schedule.load(copy / "schedule.json").to_dict() == Schedule.load(out / "schedule.json").to_dict()
    assert StudySummary.load(copy / "summary.json").to_dict() == StudySummary.load(out / "summary.json").to_dict()
    # the model seed as the study enqueued it, written again
    assert Schedule.load(copy / "seeds" / "model.json").plans == Schedule.load(out / "seeds" / "model.json").plans
