"""The refinement that ends a search: from the best feasible trial, a looser tolerance is tried
while it stays feasible and wins (TPE rarely lands on the one setting all blocks share)."""

import optuna

from tuner.search.run import refine
from tuner.search.space import TOL_CHOICES, SearchSpace


def test_refine_loosens_the_best_tolerance_until_it_stops_being_feasible():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace(B=1, T=8, modes=("frontier",))
    study = optuna.create_study()

    def objective(trial):
        sched = space.suggest(trial, "t")
        tol = sched.plans[0].tol
        trial.set_constraint("drift", tol - 1e-2)  # feasible up to tol 1e-2
        return 100 - 1000 * tol  # a looser tolerance stops sooner

    def run(n):
        study.optimize(objective, n_trials=n)

    study.enqueue_trial({"tol": 1e-3, "b0_init": "zeros", "b0_window": 8})
    run(1)
    refine(study, space, 10, run)
    assert [t.params["tol"] for t in study.trials] == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    assert [t.user_attrs.get("refined_from") for t in study.trials] == [None, 0, 1, 2, 2]
    assert space.loosened({"tol": TOL_CHOICES[-1]}) == []
