"""Per-block tolerances in the search space, and the refinement that ends a search: each block's
tolerance bisected (most passes first) to where the drift limit binds, on the search samples
and on fresh noise."""

import math
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch

from tarflow.sampling import make_noise, sample
from tarflow.schedule import BlockPlan, Schedule, builtin_schedule
from tuner.quality.paired import pixel_drift
from tuner.search.refine import RESOLUTION, blocks_by_passes, refine
from tuner.search.space import EXACT_BELOW, LOG_TOL_RANGE, TOL_CHOICES, SearchSpace

ROOT = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)


class Budgets:
    """A stand-in profile: every block's measured curves need `need` passes."""

    def __init__(self, need=10):
        self.need = need

    def iters_needed(self, *args):
        return self.need


def test_per_block_tolerances_round_trip_between_params_and_schedules():
    space = SearchSpace(B=4, T=49, profile=Budgets(), modes=("segments", "frontier"))
    plans = (BlockPlan(3, 1, 49, "zeros", 0.0562), BlockPlan(2, 2, 8, "z", 0.0),
             BlockPlan(1, 1, 49, "zeros", 3.16, mode="frontier", window=16), BlockPlan(0, 49, 1))
    params = space.params_of(Schedule(plans=plans))
    assert "tol" not in params and "b0_log_tol" not in params  # token by token: no tolerance
    assert params["b2_log_tol"] == LOG_TOL_RANGE[0] < EXACT_BELOW  # exact: the bottom band
    assert params["b3_log_tol"] == pytest.approx(math.log10(0.0562))
    # a budget only where the tolerance is exact: a segment stopped by one runs up to its length
    assert params["b2_iters_s2"] == 8 and "b3_iters_s1" not in params
    assert space.schedule_from_params(params).plans == plans
    capped = space.params_of(Schedule(plans=(BlockPlan(3, 1, 11, "zeros", 0.0562), *plans[1:])))
    assert space.schedule_from_params(capped).plans == plans
    # an older study's budget with a tolerance still decodes as it ran
    assert space.plans_of(params | {"b3_iters_s1": 11})[0] == BlockPlan(3, 1, 11, "zeros", 0.0562)
    # any value in the range decodes to a plan, and the plan's tolerance encodes back to itself
    for x in np.linspace(*LOG_TOL_RANGE, 23):
        tol = SearchSpace.tol_of(x)
        assert (tol == 0) == (x < EXACT_BELOW)
        assert SearchSpace.tol_of(SearchSpace.log_tol(tol)) == tol
    # moving one block keeps the others
    moved = space.with_log_tol(params, 3, -1.0)
    assert [p.tol for p in space.schedule_from_params(moved).plans] == [0.1, 0.0, 3.16, 0.0]
    # an exact block moved to a tolerance loses its budget; moved back to exact it gets one again
    loose = space.with_log_tol(params, 2, -2.0)
    assert "b2_iters_s2" not in loose and space.plans_of(loose)[1] == BlockPlan(2, 2, 25, "z", 0.01)
    assert space.plans_of(space.with_log_tol(loose, 2, LOG_TOL_RANGE[0]))[1] == BlockPlan(2, 2, 25, "z", 0.0)
    assert space.plans_of(space.with_log_tol(params, 2, -4.9))[1] == plans[1]  # still exact: budget kept


def test_studies_with_the_old_shared_tol_still_decode():
    """The committed patch-2 passes study holds the categorical `tol`: its trials.csv rows and
    its study.db trials decode to schedules with that tolerance on every block."""
    space = SearchSpace(B=4, T=196)
    rows = pd.read_csv(ROOT / "studies/mnist_p2/tune_passes/trials.csv").to_dict("records")
    decoded = [(r, space.plans_from_row(r)) for r in rows]
    assert all(plans is not None for _, plans in decoded)
    for r, plans in decoded:  # every block, token-by-token ones too, as their exported schedules had it
        assert {p["tol"] for p in plans} == {r["param_tol"]}
    study = optuna.load_study(study_name="tarflow-tune",
                              storage=f"sqlite:///{ROOT / 'studies/mnist_p2/tune_passes/study.db'}")
    t = next(t for t in study.trials if t.params.get("tol") == 3e-2 and t.params.get("b3_segments") == 1)
    assert {p.tol for p in space.schedule_from_params(t.params).plans} == {3e-2}
    # the refinement moves an old trial's block to its own tolerance, the others keep the shared one
    moved = space.schedule_from_params(space.with_log_tol(t.params, 3, -1.25)).plans
    assert [p.tol for p in moved] == [0.0562, 0.03, 0.03, 0.03]
    assert 3e-2 in TOL_CHOICES


def _mock_study(space, boundary, fresh_boundary, passes_at):
    """A study whose objective is monotone: block k passes `passes_at(k, log tol)`, feasible on
    the search samples up to `boundary[k]` and on fresh noise up to `fresh_boundary[k]`."""
    study = optuna.create_study()

    def objective(trial):
        sched = space.suggest(trial, "t")
        g = {p.block: SearchSpace.log_tol(p.tol) for p in sched.plans}
        trial.set_user_attr("iters", [[passes_at(p.block, g[p.block])] for p in sched.plans])
        trial.set_constraint("drift", max(g[k] - boundary[k] for k in g))
        return sum(passes_at(k, v) for k, v in g.items())

    class Fresh:
        calls = []

        def known(self, t):
            return None

        def __call__(self, t):
            self.calls.append(t.number)
            return all(space.log_tol_of(t.params, k) <= fresh_boundary[k] for k in fresh_boundary)

    return study, objective, Fresh()


def test_bisection_goes_block_by_block_to_where_fresh_noise_binds():
    """Monotone mock (the bisection's logic only): two blocks, the one with more passes first;
    each ends within RESOLUTION below its boundary, the fresh-noise one where it is tighter."""
    space = SearchSpace(B=2, T=8, modes=("frontier",))
    boundary, fresh_boundary = {0: -0.3, 1: -1.2}, {0: -0.3, 1: -1.7}
    study, objective, fresh = _mock_study(space, boundary, fresh_boundary,
                                          lambda k, g: round((10 if k == 1 else 3) * (1 - g)))

    def run(n):
        study.optimize(objective, n_trials=n)

    study.enqueue_trial({"b1_init": "zeros", "b1_window": 8, "b1_log_tol": -3.0,
                         "b0_init": "zeros", "b0_window": 8, "b0_log_tol": -3.0})
    run(1)
    assert blocks_by_passes(study.trials[0], space) == [1, 0]
    used = refine(study, space, 30, run, fresh)
    assert used == len(study.trials) - 1 <= 30
    best = min((t for t in study.trials if t.number in fresh.calls and fresh(t) and all(
        c <= 0 for c in t.constraints.values())), key=lambda t: t.value)
    for k in (0, 1):
        g = space.log_tol_of(best.params, k)
        assert fresh_boundary[k] - RESOLUTION <= g <= fresh_boundary[k]
    assert [t.user_attrs.get("refined_block") for t in study.trials[1:3]] == [1, 1]  # most passes first
    # within a budget it stops, and a second call re-uses what the study already holds
    n = len(study.trials)
    assert refine(study, space, 0, run, fresh) == 0 and len(study.trials) == n


def test_bisection_on_the_bundled_model_stops_at_the_drift_limit(model):
    """A real search: the bundled model's tough block (3, sampled first) as one Jacobi segment,
    the others token by token; a trial samples 32 search samples, the fresh check 32 others,
    drift is per sample against the sequential sampler. The bisection ends on a tolerance that
    holds on both, and the tightest one tried above it (at most RESOLUTION looser) broke."""
    T, limit, bs = model.cfg.num_patches, 0.25, 16
    space = SearchSpace(B=4, T=T, profile=Budgets(48), modes=("segments",))

    def batch_set(seed):
        noise, labels = make_noise(2 * bs, model, seed), torch.arange(2 * bs) % 10
        seq = builtin_schedule("sequential", model)
        return noise, labels, torch.cat([sample(model, noise[i:i + bs], seq, labels=labels[i:i + bs])[0]
                                         for i in (0, bs)])

    search, fresh_set = batch_set(0), batch_set(1)

    def drift(sched, data):
        noise, labels, ref = data
        runs = [sample(model, noise[i:i + bs], sched, labels=labels[i:i + bs]) for i in (0, bs)]
        return float(pixel_drift(torch.cat([r[0] for r in runs]), ref)[0].max()), [r[1] for r in runs]

    def objective(trial):
        d, stats = drift(space.suggest(trial, "t"), search)
        trial.set_user_attr("iters", stats[0].iters)
        trial.set_constraint("drift", d - limit)
        return sum(st.passes for st in stats) / 2

    class Fresh:
        checked = {}

        def known(self, t):
            return self.checked.get(t.number)

        def __call__(self, t):
            if t.number not in self.checked:
                self.checked[t.number] = drift(space.schedule_from_params(t.params), fresh_set)[0] <= limit
            return self.checked[t.number]

    study, fresh = optuna.create_study(), Fresh()
    start = space.params_of(Schedule(plans=(BlockPlan(3, 1, 48, "zeros", 1e-3),) + tuple(
        BlockPlan(k, T, 1) for k in (2, 1, 0))))
    study.enqueue_trial(start)
    study.optimize(objective, n_trials=1)
    assert blocks_by_passes(study.trials[0], space) == [3]  # the only block with a tolerance
    used = refine(study, space, 8, lambda n: study.optimize(objective, n_trials=n), fresh)
    assert 3 <= used <= 8
    holds = {t.params["b3_log_tol"]: t.constraints["drift"] <= 0 and fresh(t) for t in study.trials}
    best = max(g for g, ok in holds.items() if ok)
    above = min((g for g, ok in holds.items() if not ok), default=None)
    assert above is not None, "the bisection never found the limit"
    assert best < above <= best + RESOLUTION + 1e-9
    assert min(t.value for t in study.trials if holds[t.params["b3_log_tol"]]) < study.trials[0].value


def test_the_refinement_gets_its_trials_after_the_seeds_even_when_they_reach_into_its_reserve():
    """8 trials with 7 seeds (the colour study's settings): the seeds run first, then the one
    trial left bisects; the reserve (2 of 8) must not leave a seed waiting, which would leave the
    refinement nothing (that study's tune logged "refinement: 0 of 2")."""
    from tuner.search.config import TuneConfig
    from tuner.search.run import run_trials

    space = SearchSpace(B=2, T=8, modes=("frontier",))
    study, objective, fresh = _mock_study(space, {0: -0.3, 1: -1.2}, {0: -0.3, 1: -1.7},
                                          lambda k, g: round((10 if k == 1 else 3) * (1 - g)))

    class Ev:
        def __init__(self):
            self.space = space

        def __call__(self, trial):
            return objective(trial)

    for g in (-3.0, -2.5, -2.0, -1.9, -1.8, -4.0, -3.5):
        study.enqueue_trial({"b1_init": "zeros", "b1_window": 8, "b1_log_tol": g,
                             "b0_init": "zeros", "b0_window": 8, "b0_log_tol": g}, user_attrs={"seed": f"s{g}"})
    cfg = TuneConfig(trials=8, n=16, batch=16, verify_n=256, objective="passes", modes=("frontier",))
    from tuner.search.accounting import Spent

    lines, fresh.spent = [], Spent()  # (the mock check samples nothing)
    run_trials(study, Ev(), cfg, log=lines.append, fresh=fresh)
    assert len(study.trials) == 8 and all(t.user_attrs.get("seed") for t in study.trials[:7])
    assert study.trials[7].user_attrs.get("refined_from") is not None
    assert lines == ["refinement: 1 of 2 trials bisecting per-block tolerances; fresh-noise checks sampled 0 passes"]
