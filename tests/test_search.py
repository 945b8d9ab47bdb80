"""`tune` end to end on the bundled model: export, validation, reproduction, resume; both
constraints bind in the shared tiny study (tests/test_constraints.py tests them one at a time)."""

import json

import numpy as np
import optuna
import pandas as pd
import pytest
from typer.testing import CliRunner

from tarflow.sampling import make_noise, sample_batched
from tarflow.schedule import Schedule, resolve_schedule
from tarflow.settings import SamplingSettings
from tuner.cli import app
from tuner.quality.paired import paired_proxy
from tuner.search.config import TuneConfig
from tuner.search.seeds import seed_schedules
from tuner.search.space import LOG_TOL_RANGE, SearchSpace
from tuner.search.studies import feasible_trials, is_feasible

from .conftest import TINY_MAX_DRIFT, TINY_TOLERANCE, study_with_profile, with_args

runner = CliRunner()


@pytest.fixture(scope="module")
def study(tiny_study):
    return tiny_study


def test_tune_exports_a_valid_schedule_with_provenance(study, model):
    out, output = study
    sched = resolve_schedule(str(out / "schedule.json"), model)
    p = sched.provenance
    assert p["tolerance"] == TINY_TOLERANCE and p["max_drift"] == TINY_MAX_DRIFT
    assert p["batch"] == 16 and p["device_class"] == "cpu"
    assert p["fid_search"]["extractor"].startswith("mnist-cnn@") and p["fid_search"]["n"] == 16
    assert p["fid_search"]["gap"] <= TINY_TOLERANCE and p["proxy"]["rmse_max"] <= TINY_MAX_DRIFT
    # re-checked on 256 fresh samples: within both limits there too (measured: gap 0.003, 0.11/255)
    assert p["fid_verify"]["n"] == 256 and p["fid_verify"]["gap"] <= TINY_TOLERANCE
    assert p["fid_verify"]["proxy"]["n"] == 256 and p["fid_verify"]["proxy"]["rmse_max"] <= TINY_MAX_DRIFT
    assert p["speedup_vs_sequential"] == pytest.approx(p["sequential_latency_s"] / p["latency_s"])
    seeds = p["speedup_vs_seeds"]  # the seeds that completed (pruned ones have no latency)
    assert set(seeds) <= {"sequential", "paper", "sejd", "jacobi", "jacobi1", "frontier", "model"}
    assert seeds["sequential"] == pytest.approx(p["speedup_vs_sequential"])
    assert "speed-up" in output and "x sequential" in output
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 6
    assert {"latency_s", "fid", "fid_gap", "extractor", "n", "state", "feasible"} <= set(trials.columns)
    assert set(trials.seed.dropna()) >= {"sequential", "paper", "sejd", "jacobi"}
    assert (out / "profile" / "profile.csv").is_file()
    for name in ("sequential", "paper", "sejd", "jacobi", "jacobi1", "frontier"):  # baselines as runnable files
        assert resolve_schedule(str(out / "seeds" / f"{name}.json"), model).name == name


def test_exported_schedule_reproduces_its_proxy(study, model):
    """Sampling the schedule on the search noise gives back the proxy error it recorded."""
    out, _ = study
    sched = Schedule.load(out / "schedule.json")
    noise = make_noise(16, model, 0)
    settings = sched.sampling
    assert settings == SamplingSettings(guidance=1.5, denoise_std=0.1)  # the bundled model's training noise
    labels = settings.make_labels(16, model, 0)
    seq = resolve_schedule("sequential", model)
    xs, xq = sample_batched(model, sched, noise, labels, settings=settings, batch=16)[0], \
        sample_batched(model, seq, noise, labels, settings=settings, batch=16)[0]
    proxy = paired_proxy(xs, xq)
    assert proxy["rmse_mean"] == pytest.approx(sched.provenance["proxy"]["rmse_mean"], rel=1e-4, abs=1e-6)


def test_sample_runs_the_tuned_schedule_and_warns_on_other_batch(study, tmp_path):
    out, _ = study
    res = runner.invoke(app, ["sample", "--schedule", str(out / "schedule.json"), "--n", "4", "--batch", "4",
                              "--device", "cpu", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert "warning" in res.output and "batch 16" in res.output  # tuned at 16, run at 4
    assert "sampling settings" not in res.output  # the recorded guidance and denoising are used
    doc = np.load(tmp_path / "s.npz")
    assert doc["x"].shape == (4, 1, 28, 28)
    assert json.loads(str(doc["sampling"])) == SamplingSettings(guidance=1.5, denoise_std=0.1).to_dict()
    res = runner.invoke(app, ["sample", "--schedule", str(out / "schedule.json"), "--n", "4", "--guidance", "0",
                              "--device", "cpu", "--out", str(tmp_path / "s2")])
    assert res.exit_code == 0, res.output
    warn = [ln for ln in res.output.splitlines() if "sampling settings" in ln]
    assert len(warn) == 1 and "guidance 1.5 -> 0.0" in warn[0]
    assert json.loads(str(np.load(tmp_path / "s2.npz")["sampling"]))["guidance"] == 0.0


def test_every_trial_is_judged_by_both_limits_and_the_export_is_within_both(study):
    """The shared study's constraints are what they measured: every completed trial's drift and
    FID-gap constraints are its measurements minus the limits, a trial stopped early is never
    feasible (its reason says why), and every feasible trial, the chosen one too, is within both.
    (Trials over a limit, stopped or not: tests/test_constraints.py.)"""
    out, _ = study
    st = optuna.load_study(study_name="tarflow-tune", storage=f"sqlite:///{out / 'study.db'}")
    for t in st.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert t.constraints["fid_gap"] == pytest.approx(t.user_attrs["fid_gap"] - TINY_TOLERANCE)
            assert t.constraints["drift"] == pytest.approx(t.user_attrs["proxy"]["rmse_max"] - TINY_MAX_DRIFT)
        elif t.state == optuna.trial.TrialState.PRUNED:
            assert t.user_attrs["fail_reason"].startswith("pruned: ") and not is_feasible(t)
    # the `jacobi` seed, 4 segments run to tol 1e-3: 122 passes on its first batch, 3.8x the model
    # seed's 32, so it is stopped as slow
    jac = next(t for t in st.trials if t.user_attrs.get("seed") == "jacobi")
    assert jac.user_attrs["fail_reason"].startswith("pruned: slow: ")
    feasible = feasible_trials(st)
    assert feasible and jac not in feasible
    for t in feasible:
        assert t.user_attrs["fid_gap"] <= TINY_TOLERANCE and t.user_attrs["proxy"]["rmse_max"] <= TINY_MAX_DRIFT
    chosen = Schedule.load(out / "schedule.json").provenance["trial"]
    assert chosen in [t.number for t in feasible]
    table = pd.read_csv(out / "trials.csv")
    assert not table.feasible[jac.number] and table.feasible[chosen]


# the resume test's own study: growing the shared one would verify its winner again on 256 guided
# fresh samples; resuming does not depend on guidance or limits (the seeds of segments mode only)
PLAIN_ARGS = ["--trials", "5", "--n", "16", "--batch", "16", "--verify-n", "32", "--max-drift", "off",
              "--tolerance", "1000", "--modes", "segments", "--device", "cpu", "--retime-rounds", "1"]


def test_a_study_resumes_only_when_asked_and_with_its_own_settings(tiny_study, tiny_calib, tmp_path):
    """The short form of the slow test below, on a copy of the shared tiny study: without --resume
    and with other settings the tune is refused before any trial, and the study is unchanged."""
    import shutil

    from .conftest import TINY_STUDY_ARGS

    out = tmp_path / "study"
    shutil.copytree(tiny_study[0], out)
    storage = f"sqlite:///{out / 'study.db'}"
    before = [(t.number, t.state, t.params, t.value) for t in
              optuna.load_study(study_name="tarflow-tune", storage=storage).trials]
    res = runner.invoke(app, ["tune", *with_args(TINY_STUDY_ARGS, trials=7), "--data", str(tiny_calib), "--out", str(out)])
    assert res.exit_code == 2 and "--resume" in res.output
    res = runner.invoke(app, ["tune", *with_args(TINY_STUDY_ARGS, trials=7, batch=8), "--data", str(tiny_calib),
                              "--out", str(out), "--resume"])
    assert res.exit_code == 2 and "batch 16 -> 8" in res.output  # other settings: not comparable
    after = optuna.load_study(study_name="tarflow-tune", storage=storage).trials
    assert [(t.number, t.state, t.params, t.value) for t in after] == before


@pytest.mark.slow  # the refusals are in the test above; resuming a study is in test_recovery too
def test_resume_adds_trials_to_the_same_study(tmp_path, tiny_calib, plain_profile):
    out = study_with_profile(plain_profile, tmp_path / "study")
    res = runner.invoke(app, ["tune", *PLAIN_ARGS, "--data", str(tiny_calib), "--out", str(out), "--resume"])
    assert res.exit_code == 0, res.output  # --resume on no study: creates it
    storage = f"sqlite:///{out / 'study.db'}"
    before = [(t.number, t.state, t.params, t.value) for t in
              optuna.load_study(study_name="tarflow-tune", storage=storage).trials]
    assert len(before) == 5
    res = runner.invoke(app, ["tune", *PLAIN_ARGS, "--data", str(tiny_calib), "--out", str(out)])
    assert res.exit_code == 2 and "--resume" in res.output
    res = runner.invoke(app, ["tune", *with_args(PLAIN_ARGS, trials=6), "--data", str(tiny_calib),
                              "--out", str(out), "--resume"])
    assert res.exit_code == 0, res.output  # --trials is the study's total: 1 more
    st = optuna.load_study(study_name="tarflow-tune", storage=storage)
    assert len(st.trials) == 6
    assert [(t.number, t.state, t.params, t.value) for t in st.trials[:5]] == before  # kept as they were
    assert not any(t.user_attrs.get("seed") for t in st.trials[5:])  # seeds are not enqueued again
    assert len(pd.read_csv(out / "trials.csv")) == 6
    res = runner.invoke(app, ["tune", *with_args(PLAIN_ARGS, trials=7, batch=8), "--data", str(tiny_calib),
                              "--out", str(out), "--resume"])
    assert res.exit_code == 2 and "batch 16 -> 8" in res.output  # other settings: not comparable
    assert len(optuna.load_study(study_name="tarflow-tune", storage=storage).trials) == 6


def test_seed_schedules_lie_in_the_search_space(model, plain_profile):
    from tuner.measure.profile import Profile

    prof = Profile.load(plain_profile)  # measured once for the session (its own profile took 6 s)
    space = SearchSpace.for_model(model, prof, TuneConfig().modes)
    seeds = seed_schedules(model, prof, space, TuneConfig().modes)
    T = model.cfg.num_patches
    assert all(p.segments == T for p in seeds["sequential"].plans)
    tough = prof.blocks.sort_values("crm_share").block.iloc[-1]
    paper = {p.block: p for p in seeds["paper"].plans}
    assert paper[tough].segments == 8 and all(paper[k].segments == 1 for k in paper if k != tough)
    assert seeds["sejd"].plans[0].segments == T
    assert {p.mode for p in seeds["frontier"].plans} == {"frontier"} and seeds["frontier"].plans[0].window == 49
    for s in seeds.values():
        params = space.params_of(s)
        assert "tol" not in params  # one tolerance per block now
        for p in s.plans:
            name = f"b{p.block}_log_tol"
            if p.mode == "frontier" or p.segments < T:
                assert LOG_TOL_RANGE[0] <= params[name] <= LOG_TOL_RANGE[1]
                assert SearchSpace.tol_of(params[name]) == p.tol
            else:
                assert name not in params and p.tol == 0  # token by token: no tolerance
        assert space.schedule_from_params(params).plans == s.plans
