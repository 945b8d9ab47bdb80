"""The refinement that closes a search: each block's tolerance bisected to where the constraints
bind.

TPE rarely lands on the boundary by itself, and the old closing step (one shared tolerance,
loosened one categorical step x3 at a time) stopped where its grid stopped: on the patch-2
model it went from 3e-2 (feasible, worst drift 0.42/255) straight to 1e-1 (3.75/255 on fresh
noise) and ended there, with the three easy blocks held at the tough block's tolerance.

Here, from the best feasible trial that also holds on fresh noise, one block at a time (the one
that spends the most passes first: it has the most to give), the block's log10 tolerance is
bisected between the trial's value (holds) and the first known failure above it (a trial that
differs only in that block's tolerance and failed; else the top of the range). Each midpoint is
one trial of the study (counted in --trials); it holds when it is feasible on the search samples
*and* on the screen of the verification noise (tuner.search.fresh: the drift tail is heavy, at
batch 1 above all, so the search samples alone would walk the bisection past the real
boundary). The base is checked on all of the verification noise, and the screen is the quarter
of its batches where the base drifted most (`FreshCheck.hardest`). A midpoint
that holds becomes the new base, so later blocks are bisected on top of the earlier ones'
gains. A block is done when its bracket is narrower than RESOLUTION.
"""

from __future__ import annotations

from optuna.trial import TrialState

from tuner.search.space import LOG_TOL_RANGE, SearchSpace
from tuner.search.studies import feasible_trials, is_feasible

RESOLUTION = 0.25  # decades (x1.8): below this a block's passes rarely change
START_CHECKS = 3  # feasible trials tried on fresh noise for a base, best first (as verify does)


def refine(study, space: SearchSpace, n: int, run, fresh=None) -> int:
    """Bisect the tolerances of the best trial that holds, using at most `n` trials (run one with
    `run(1)`). `fresh` is the fresh-noise check: `fresh(trial) -> bool` (checks it if it has no
    record yet) and `fresh.known(trial) -> bool | None` (the record only); None: the search
    samples decide alone; with a `hardest(trial)` method (tuner.search.fresh.FreshCheck) the
    steps are screened on the base's hardest batches. Returns the number of trials it ran. It
    leaves the study alone while enqueued trials wait (seeds not yet run: the next trial would
    be one of them, not its own)."""
    if n <= 0 or study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return 0
    base = _base(study, fresh)
    if base is None:
        return 0
    fresh = fresh.hardest(base) if hasattr(fresh, "hardest") else fresh
    used = 0
    for k in blocks_by_passes(base, space):
        lo = space.log_tol_of(base.params, k)
        hi = _first_failure(study, space, base.params, k, lo, fresh)
        while hi - lo > RESOLUTION and used < n:
            mid = (lo + hi) / 2
            trial, ran = _trial_of(study, space, space.with_log_tol(base.params, k, mid), base.number, k, run)
            used += ran
            if trial is None:  # another worker took the trial: leave the rest to the search
                return used
            if _holds(trial, fresh):
                lo, base = mid, trial
            else:
                hi = mid
    return used


def blocks_by_passes(trial, space: SearchSpace) -> list[int]:
    """The blocks with a tolerance (not token by token), most passes first, from the trial's
    recorded passes per segment (user_attrs["iters"], sampling order)."""
    plans = space.plans_of(trial.params)
    iters = trial.user_attrs.get("iters") or [[0]] * len(plans)
    spent = {p.block: sum(i) for p, i in zip(plans, iters) if p.mode == "frontier" or p.segments < space.T}
    return sorted(spent, key=lambda k: (-spent[k], -k))


def _base(study, fresh):
    """The best feasible trial that holds on fresh noise (the first START_CHECKS tried)."""
    for t in feasible_trials(study)[:START_CHECKS]:
        if fresh is None or fresh(t):
            return t
    return None


def _holds(trial, fresh) -> bool:
    return trial.state == TrialState.COMPLETE and is_feasible(trial) and (fresh is None or fresh(trial))


def _plans(space: SearchSpace, params: dict):
    """The schedule's plans as dicts, or None for a trial that failed before all its parameters."""
    try:
        plans = [vars(p) for p in space.plans_of(params)]
    except (KeyError, TypeError, ValueError):
        return None
    # a token-by-token block ignores its tolerance (older studies gave it the shared one)
    return [p | {"tol": 0.0} if p["mode"] == "segments" and p["segments"] == space.T else p for p in plans]


def _first_failure(study, space: SearchSpace, params: dict, k: int, lo: float, fresh) -> float:
    """The loosest block-k tolerance to bisect towards: the tightest known failure above `lo`
    among trials that differ from `params` only there (a looser tolerance only drifts more),
    else the top of the range. Fresh-noise records count only where they exist already."""
    def strip(plans):
        return None if plans is None else [p | {"tol": None} if p["block"] == k else p for p in plans]

    want, hi = strip(_plans(space, params)), LOG_TOL_RANGE[1]
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        g = space.log_tol_of(t.params, k)
        if lo < g < hi and strip(_plans(space, t.params)) == want and (
                t.state != TrialState.COMPLETE or not is_feasible(t) or (fresh is not None and fresh.known(t) is False)):
            hi = g
    return hi


def _trial_of(study, space: SearchSpace, params: dict, parent: int, k: int, run):
    """The finished trial of `params` (one that decodes to the same schedule, if the study has
    it) and whether a new trial was run for it; (None, 1) if the trial this worker enqueued was
    taken by another worker and is not finished."""
    want = _plans(space, params)
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)

    def find():
        return next((t for t in reversed(study.get_trials(deepcopy=False, states=done))
                     if _plans(space, t.params) == want), None)

    if (t := find()) is not None:
        return t, 0
    study.enqueue_trial(params, user_attrs={"refined_from": parent, "refined_block": k})
    run(1)
    t = find()
    return (None if t is None or t.user_attrs.get("over_cap") else t), 1
