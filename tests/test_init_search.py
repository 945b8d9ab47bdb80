"""The calibrated initial guess in the search: offered where the profile fitted it for every
block, carried by the schedules the search makes, decodable without a profile (the report), and
never offered to a study created without it (Optuna refuses a categorical that changes)."""

import optuna
import pytest

from tarflow.schedule import Schedule
from tuner.search.space import INIT_CHOICES, SearchSpace
from tuner.search.studies import keep_init_choices


@pytest.fixture(scope="module")
def fitted(model, tiny_calib):
    """The profile of the bundled model on the session's 4 calibration images (guesses fitted)."""
    from tuner import api

    return api.profile(model, data=tiny_calib, n=None, curve_n=1)


def test_calibrated_is_offered_and_carried_only_with_fitted_guesses(model, fitted):
    assert len(fitted.guesses) == model.cfg.num_blocks
    space = SearchSpace.for_model(model, fitted, ("segments",))
    assert space.inits == (*INIT_CHOICES, "calibrated")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    made = []
    for _ in range(40):  # random draws until one block takes the calibrated guess
        sched = space.suggest(study.ask(), "draw", model.fingerprint)
        made.append(sched)
    with_guess = [s for s in made if any(p.init == "calibrated" for p in s.plans)]
    assert with_guess, "40 random draws never chose calibrated"
    for s in with_guess:
        used = {p.block for p in s.plans if p.init == "calibrated"}
        assert set(s.guesses) == used and all(s.guesses[k] == fitted.guesses[k] for k in used)
        assert Schedule.from_dict(s.to_dict()).guesses == s.guesses  # the file carries them
        params = space.params_of(s)
        assert SearchSpace(space.B, space.T).plans_of(params) == s.plans  # the report decodes without a profile
    fitted_less = type(fitted)(fitted.blocks, fitted.curves, fitted.iters_to_tol, fitted.meta, {})
    assert SearchSpace.for_model(model, fitted_less).inits == INIT_CHOICES


def test_a_study_keeps_the_guesses_it_was_created_with(model, fitted):
    old = SearchSpace.for_model(model, fitted, ("segments",), inits=INIT_CHOICES)  # as before calibrated
    study = optuna.create_study()
    trial = study.ask()
    old.suggest(trial, "old")
    study.tell(trial, 1.0)
    space = SearchSpace.for_model(model, fitted, ("segments",))
    assert "calibrated" in space.inits
    keep_init_choices(study, space)
    assert space.inits == INIT_CHOICES
    space.suggest(study.ask(), "resumed")  # no "dynamic value space" error from Optuna
