"""The search's two constraints decide, on real sampler runs of the bundled model (no measurement
is mocked): a schedule over the FID tolerance or over the drift limit is infeasible (its
constraint > 0) and is not chosen however few passes it needs, and at verification a candidate
that drifts past the limit on fresh noise is refused and the next one within it wins.

The schedules, measured on the bundled model without guidance (search: n = 32 of seed 0; fresh:
256 samples of seed 1, as verification draws them):

  UNDER    jacobi:segments=1,max_iters=2,tol=0   8 passes/batch; FID gap ~1500, a sample ~85/255 off
  DRIFTING frontier:window=49,tol=1e-1          31.5 passes; FID gap -0.4 (within the tolerance),
                                                 yet a sample 9.9/255 off: only the drift limit stops it
  LOOSE    jacobi:segments=1,tol=1e-1           33 passes; max drift 0.24/255 on the search samples,
                                                 1.6/255 on the fresh ones (the heavy tail verification is for)
  SEJD     sejd:tol=0.1                          62 passes; 0.05/255 and 0.08/255

With tolerance 5 and a drift limit of 1/255 every figure is a factor 1.6 or more from its limit.
"""

import re

import optuna
import pytest

from tarflow.schedule import builtin_schedule
from tarflow.settings import SamplingSettings
from tuner.measure.profile import Profile
from tuner.quality.extractors import get_extractor
from tuner.quality.fid import RefStats, default_ref_path
from tuner.search.config import TuneConfig
from tuner.search.evaluate import Evaluator
from tuner.search.studies import feasible_trials, is_feasible
from tuner.search.verify import verify

UNDER = "jacobi:segments=1,max_iters=2,tol=0"
DRIFTING = "frontier:window=49,tol=1e-1"
LOOSE = "jacobi:segments=1,tol=1e-1"
SEJD = "sejd:tol=0.1"
TOLERANCE, MAX_DRIFT = 5.0, 1.0


def config(max_drift):
    # prune_rmse 255: the cheap warm-up screen (default 12/255 mean drift) would stop UNDER
    # before its FID is measured; here the constraints must be what rejects it
    return TuneConfig(tolerance=TOLERANCE, max_drift=max_drift, n=32, batch=16, verify_n=256,
                      objective="passes", prune_rmse=255, sampling=SamplingSettings())


@pytest.fixture(scope="module")
def evaluator(model, plain_profile):
    """Evaluator(max_drift): the search's trial evaluation under tolerance 5 and that drift limit
    (None: FID only), sharing one sequential baseline on the search noise."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prof = Profile.load(plain_profile)
    ext = get_extractor("mnist-cnn")
    ref = RefStats.load(default_ref_path("mnist-cnn"))
    base = None

    def make(max_drift):
        nonlocal base
        ev = Evaluator(model, prof, config(max_drift), "cpu", ref, ext)
        if base is None:
            base = ev.prepare()
        ev.baseline = base
        return ev

    return make


def search(ev, schedules: dict):
    """Enqueue the named schedules (as seeds are) and run each as one trial of a study; returns
    the study and its trials by name."""
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=0))
    for name, spec in schedules.items():
        study.enqueue_trial(ev.space.params_of(builtin_schedule(spec, ev.model)), user_attrs={"seed": name})
    study.optimize(ev, n_trials=len(schedules))
    return study, {t.user_attrs["seed"]: t for t in study.trials}


@pytest.fixture(scope="module")
def fid_only(evaluator):
    return search(evaluator(None), {"under": UNDER, "drifting": DRIFTING, "loose": LOOSE})


@pytest.fixture(scope="module")
def with_drift_limit(evaluator):
    ev = evaluator(MAX_DRIFT)
    # SeJD first: after `loose` it would be stopped as slow (62 passes > 1.5 x 33, tuner.search.evaluate)
    return (ev, *search(ev, {"sejd": SEJD, "under": UNDER, "drifting": DRIFTING, "loose": LOOSE}))


def test_a_schedule_over_the_fid_tolerance_is_infeasible_and_not_chosen(fid_only):
    study, t = fid_only
    under = t["under"]
    assert under.state == optuna.trial.TrialState.COMPLETE
    assert under.user_attrs["fid_gap"] > 100 * TOLERANCE  # measured ~1500
    assert under.constraints == {"fid_gap": pytest.approx(under.user_attrs["fid_gap"] - TOLERANCE)}
    assert not is_feasible(under)
    feasible = feasible_trials(study)
    assert under not in feasible and under.value < min(f.value for f in feasible)  # fastest, yet rejected
    # FID alone lets the drifting schedule through and picks it: what the drift limit is for
    assert [f.user_attrs["seed"] for f in feasible] == ["drifting", "loose"]
    drifting = t["drifting"]
    assert drifting.constraints["fid_gap"] <= 0 and drifting.user_attrs["proxy"]["rmse_max"] > 5 * MAX_DRIFT


def test_a_schedule_over_the_drift_limit_is_infeasible_and_not_chosen(with_drift_limit, fid_only):
    _, study, t = with_drift_limit
    for name in ("under", "drifting"):
        # > 0 whether the trial ran to the end or was stopped once a sample passed the limit
        assert t[name].constraints["drift"] > 0 and not is_feasible(t[name]), name
    feasible = feasible_trials(study)
    assert [f.user_attrs["seed"] for f in feasible] == ["loose", "sejd"]
    chosen = feasible[0]
    assert all(c <= 0 for c in chosen.constraints.values()) and set(chosen.constraints) == {"fid_gap", "drift"}
    assert chosen.constraints["drift"] == pytest.approx(chosen.user_attrs["proxy"]["rmse_max"] - MAX_DRIFT)
    # the rejected one needs fewer passes than the winner (as measured in the FID-only study)
    assert fid_only[1]["drifting"].value < chosen.value


def test_verification_refuses_a_candidate_over_the_drift_limit_on_fresh_noise(with_drift_limit):
    """`loose` is within 1/255 on the 32 search samples (0.24) but not on 256 fresh ones (1.6):
    verification refuses it and the next feasible candidate, within the limit there too, wins."""
    ev, study, t = with_drift_limit
    cands = [(f, ev.schedule_from_params(f.params, f"tuned (trial {f.number})")) for f in feasible_trials(study)[:3]]
    assert [f.user_attrs["seed"] for f, _ in cands] == ["loose", "sejd"]
    assert t["loose"].user_attrs["proxy"]["rmse_max"] <= MAX_DRIFT  # the search could not tell
    lines = []
    trial, sched, record = verify(ev, cands, ev.cfg, ev.ext, ev.ref, log=lines.append)
    assert len(lines) == 2, lines
    refused = re.search(r"drifts ([0-9.]+)/255 > 1 on a sample", lines[0])
    assert lines[0].startswith(f"verify trial {t['loose'].number}:") and refused, lines[0]
    assert float(refused.group(1)) > MAX_DRIFT
    assert lines[1].startswith(f"verify trial {t['sejd'].number}:") and lines[1].endswith("-> ok"), lines[1]
    assert trial.number == t["sejd"].number and sched.plans == cands[1][1].plans
    assert record["n"] == 256 and record["proxy"]["rmse_max"] <= MAX_DRIFT and record["gap"] <= TOLERANCE


def test_the_refinement_screens_on_the_batches_where_its_base_drifted_most(evaluator, with_drift_limit):
    """The screen is the base's worst batches of the verification noise (64 samples here, 4
    batches; 2 screened), run as the same batches: a step's per-batch worst drift there equals
    the full check's, so a sample over the limit on the screen refuses the trial outright."""
    import numpy as np

    from tuner.search.fresh import FreshCheck

    _, study, t = with_drift_limit
    ev = evaluator(255.0)  # a limit nothing reaches: every batch is sampled
    full = FreshCheck(ev, ev.cfg, ev.ext, ev.ref, study=study, n=64)
    base = full.of_trial(t["sejd"])
    assert base["ok"] and len(base["batch_max"]) == 4
    screen = full.hardest(t["sejd"], k=2)
    assert screen.batches == sorted(int(b) for b in np.argsort(base["batch_max"])[-2:])
    loose = full.of_trial(t["loose"])["batch_max"]
    on_screen = screen.of_trial(t["loose"])
    assert on_screen["ok"] and on_screen["batch_max"] == [loose[b] for b in screen.batches]
    assert not full.refused(t["loose"])
    limit = max(on_screen["batch_max"]) * 0.99  # now that worst sample is over the limit
    ev = evaluator(limit)
    tight = FreshCheck(ev, ev.cfg, ev.ext, ev.ref, study=optuna.create_study(), n=64)  # (its own records)
    refused = tight.hardest(t["sejd"], k=2).of_trial(t["loose"])
    assert not refused["ok"] and refused["why"].startswith("drifts") and tight.refused(t["loose"])
    assert not tight.refused(t["sejd"])
