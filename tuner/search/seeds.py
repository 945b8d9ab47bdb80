"""Seed schedules: known answers the search starts from (enqueued as its first trials) and the
report compares against, and what the search measured for each."""

from __future__ import annotations

import math

from optuna.trial import TrialState

from tarflow.schedule import BlockPlan, Schedule, builtin_schedule

from tuner.measure.profile import Profile
from tuner.search.space import SearchSpace
from tuner.search.studies import is_feasible, measured_latency
from tuner.search.summary import SeedResult

PAPER_TOUGH_SEGMENTS, PAPER_TOUGH_ITERS, PAPER_EASY_ITERS = 8, 32, 10


def paper_schedule(model, profile: Profile) -> Schedule:
    """The GS-Jacobi paper's hand rule: the quarter of blocks with the largest CRM share get 8
    segments of 32 passes, the others one segment of 10, each from its best initial guess."""
    prof = profile.blocks
    B, T = model.cfg.num_blocks, model.cfg.num_patches
    tough = set(prof.sort_values("crm_share", ascending=False).block[:max(1, math.ceil(B / 4))])
    best = dict(zip(prof.block, prof.best_init))
    plans = [BlockPlan(k, min(PAPER_TOUGH_SEGMENTS, T), PAPER_TOUGH_ITERS, best[k]) if k in tough
             else BlockPlan(k, 1, PAPER_EASY_ITERS, best[k]) for k in range(B - 1, -1, -1)]
    return Schedule(plans=tuple(plans), fingerprint=model.fingerprint, name="paper")


def seed_schedules(model, profile: Profile, space: SearchSpace, modes) -> dict[str, Schedule]:
    """The seeds, each as it lies in the search space (what the search actually ran)."""
    T = model.cfg.num_patches
    seeds = {
        "sequential": builtin_schedule("sequential", model),
        "paper": paper_schedule(model, profile),
        "sejd": builtin_schedule("sejd:tol=0.03", model),
        "jacobi": builtin_schedule("jacobi:segments=4,max_iters=6,tol=1e-3", model),
        # one segment per block, run to the tolerance (no budget below T, tuner.search.space): the
        # fewest passes at small drift on both MNIST models (README, "Results")
        "jacobi1": builtin_schedule(f"jacobi:segments=1,max_iters={T},tol=1e-2", model),
    }
    if "frontier" in modes:
        seeds["frontier"] = builtin_schedule(f"frontier:window={min(64, T)},tol=1e-3", model)
    return {name: space.schedule_from_params(space.params_of(s), name, model.fingerprint)
            for name, s in seeds.items()}


def seed_results(study, seeds: dict) -> dict[str, SeedResult]:
    """What the search measured for each seed schedule that completed: its objective value (the
    trial value) and, apart, the latency timed while it ran."""
    out = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        name = t.user_attrs.get("seed")
        if name:
            a = t.user_attrs
            out[name] = SeedResult(trial=t.number, objective_value=t.value, latency_s=measured_latency(t),
                                   fid=a["fid"], fid_gap=a["fid_gap"], feasible=is_feasible(t),
                                   proxy=a["proxy"], passes=a["passes"], iters=a["iters"],
                                   schedule=seeds[name].to_dict()["blocks"])
    return out
