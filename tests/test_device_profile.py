"""Device profiles and the cost:FILE objective: a schedule searched for a device from its
measured per-pass times, priced from the sampler's pass counts by width."""

import json
import shutil

import optuna
import pytest

from tarflow.sampling import make_noise, sample
from tarflow.schedule import Schedule, builtin_schedule
from tuner.measure.device_profile import DeviceProfile

from .conftest import TINY_STUDY_ARGS, one_line_error, run_cli, with_args

ARGS = TINY_STUDY_ARGS  # guided and denoised: the profile must be measured with the same guidance


@pytest.mark.parametrize("spec", ["sequential", "jacobi:segments=4,max_iters=5,tol=1e-3",
                                  "frontier:window=16,tol=1e-3", "sejd:tol=0.03"])
def test_pass_counts_by_width_add_up_to_passes_and_tokens(model, spec):
    _, st = sample(model, make_noise(4, model, 0), builtin_schedule(spec, model))
    for calls, iters, tokens in zip(st.calls, st.iters, st.tokens):
        assert sum(calls.values()) == sum(iters)
        assert sum(w * n for w, n in calls.items()) == tokens
    if spec == "sequential":
        assert all(c == {1: model.cfg.num_patches - 1} for c in st.calls)


@pytest.fixture(scope="module")
def cpu_profile(tmp_path_factory):
    d = tmp_path_factory.mktemp("devprof")
    res = run_cli("device-profile", "--batch", 16, "--repeats", 1, "--device", "cpu", "--guidance", 1.5,
                  "--out", d / "cpu.json")
    assert res.exit_code == 0, res.output
    return d / "cpu.json"


def test_cost_objective_prices_each_trial_from_the_profile(model, cpu_profile, tiny_study, tiny_calib, tmp_path):
    out, _ = tiny_study
    shutil.copytree(out / "profile", tmp_path / "study" / "profile")  # a new study that reuses the block profile
    # the pricing is under test, not the limits: two trials (the sequential and paper seeds), and no
    # drift limit, so verification needs 2n = 32 fresh samples, not 256 (test_search and
    # test_constraints test the limits)
    res = run_cli("tune", *with_args(ARGS, trials=2, verify_n=32, max_drift="off"), "--objective", f"cost:{cpu_profile}",
                  "--data", tiny_calib, "--resume", "--out", tmp_path / "study")
    assert res.exit_code == 0, res.output
    prof = DeviceProfile.load(cpu_profile)
    assert f"modelled on {prof.device['device_name']}" in res.output
    study = optuna.load_study(study_name="tarflow-tune", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all(t.value == t.user_attrs["modelled_s"] for t in done)
    seq = next(t for t in done if t.user_attrs.get("seed") == "sequential")
    T, B = model.cfg.num_patches, model.cfg.num_blocks
    assert seq.value == pytest.approx(sum((T - 1) * prof.pass_seconds(k, 1) for k in range(B)), rel=1e-9)
    p = Schedule.load(tmp_path / "study" / "schedule.json").provenance
    assert p["objective_device"] == prof.device["device_name"] and p["objective"] == f"cost:{cpu_profile}"


def test_a_profile_that_does_not_fit_or_cannot_be_read_is_refused(cpu_profile, tmp_path):
    d = json.loads(cpu_profile.read_text())
    (tmp_path / "b4.json").write_text(json.dumps(d | {"batch": 4}))
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "unguided.json").write_text(json.dumps(d | {"guided": False}))
    (tmp_path / "neg.json").write_text(json.dumps(d | {"seconds": {k: [-1.0] * len(v) for k, v in d["seconds"].items()}}))
    for name, text in (("b4.json", "measured at batch 4, not 16"), ("bad.json", "not a readable device profile"),
                       ("unguided.json", "measured without guidance"),
                       ("neg.json", "one positive time per width"), ("missing.json", "not a readable device profile")):
        res = run_cli("tune", *ARGS, "--objective", f"cost:{tmp_path / name}", "--out", tmp_path / name[:-5])
        one_line_error(res, text)
        assert not (tmp_path / name[:-5] / "schedule.json").exists()
    one_line_error(run_cli("device-profile", "--out", cpu_profile), "already exists")
