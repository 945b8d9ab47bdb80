"""Export: re-time the verified winner against the seeds and write what was measured into the
schedule's provenance and the study summary.

Provenance keys say what they hold: `latency_s`, `sequential_latency_s` and `search_latency_s`
are measured seconds per batch (re-timed, and timed in the search); `objective_value` is the
trial value in `objective_unit` (seconds, serial passes or modelled seconds per batch) of the
objective `objective` (its spec as given to tune). Schedules written before this kept the trial
value as `latency_search_s` whatever the objective; readers take the chosen trial's figures from
the study summary instead, which says what each one is.
"""

from __future__ import annotations

import time

from tarflow.schedule import Schedule

from tuner.search.accounting import Spent
from tuner.search.evaluate import Evaluator
from tuner.search.studies import measured_latency
from tuner.search.summary import StudySummary
from tuner.search.verify import remeasure, verify


def verify_and_export(ev: Evaluator, summary: StudySummary, candidates, vext, vref, seeds: dict,
                      log=print, fresh=None) -> dict[str, Spent]:
    """Verify the candidates on fresh noise and export the first that holds (filling the
    summary's final fields); returns what the verification and the re-timing cost to sample
    (tuner.search.accounting), each with its wall seconds. With a shared `fresh` check
    (tuner.search.fresh) the verification's passes are all it sampled, the refinement's checks
    included, and its seconds theirs too."""
    spent, t0 = {"verification": Spent(), "retiming": Spent()}, time.perf_counter()
    trial, sched, ver = verify(ev, candidates, ev.cfg, vext, vref, log, spent=spent["verification"], fresh=fresh) \
        if candidates else (None, None, None)
    spent["verification"].seconds, t0 = time.perf_counter() - t0, time.perf_counter()
    if fresh is not None:  # all this process sampled on the fresh noise: the refinement's checks too
        ver_spent = spent["verification"]
        ver_spent.passes, ver_spent.tokens, ver_spent.batches = fresh.spent.passes, fresh.spent.tokens, fresh.spent.batches
        ver_spent.seconds = fresh.spent.seconds
    if sched is not None:
        export(ev, summary, trial, sched, ver, seeds, log, spent=spent["retiming"])
        spent["retiming"].seconds = time.perf_counter() - t0
    return spent


def export(ev: Evaluator, summary: StudySummary, trial, sched: Schedule, ver: dict, seeds: dict,
           log=print, spent=None) -> Schedule:
    """The winner with its provenance; fills the summary's final fields. `spent`
    (tuner.search.accounting.Spent) counts what the re-timing's sampling cost."""
    log("re-timing the chosen schedule against the seeds (interleaved) ...")
    final = remeasure(ev, {"chosen": sched} | {k: seeds[k] for k in summary.seeds},
                      rounds=ev.cfg.retime_rounds, spent=spent)
    lat = final["chosen"]["median_s"]
    seq_lat = final["sequential"]["median_s"] if "sequential" in final else summary.sequential_latency_s
    for k, seed in summary.seeds.items():
        seed.latency_final = final[k]
    cfg, floor, goal = ev.cfg, summary.noise_floor, ev.cfg.goal
    prov = {
        "tool": "tarflow-tuner", "tool_version": _version(), "date": time.strftime("%Y-%m-%d"),
        "tolerance": cfg.tolerance, "trial": trial.number, "trials": summary.trials,
        "fid_search": {"fid": trial.user_attrs["fid"], "sequential": summary.sequential.fid,
                       "gap": trial.user_attrs["fid_gap"], "extractor": summary.sequential.extractor,
                       "n": cfg.n, "noise_floor_std": floor["std"], "noise_floor_mean": floor["mean"]},
        "fid_verify": ver, "latency_s": lat, "sequential_latency_s": seq_lat,
        "speedup_vs_sequential": seq_lat / lat,
        "speedup_vs_seeds": {k: final[k]["median_s"] / lat for k in summary.seeds},
        "search_latency_s": measured_latency(trial), "equivalent_to_sequential": sched.is_sequential(ev.T),
        "proxy": trial.user_attrs["proxy"], "batch": cfg.batch, "sampling": cfg.sampling.to_dict(),
        "solver": ev.solvers.record(),  # the step every latency above was measured with
        "objective": goal.spec, "objective_value": trial.value, "objective_unit": goal.unit,
        "objective_device": goal.device_name(summary.device["device_name"]), "max_drift": cfg.max_drift,
        "passes_per_batch": trial.user_attrs["passes"] / (cfg.n // cfg.batch),
        **summary.device,
    }
    sched = sched.with_provenance(**prov)
    summary.final_latency = final
    summary.schedule = sched.to_dict()
    summary.chosen_trial = trial.number
    summary.chosen_iters = trial.user_attrs["iters"]
    summary.chosen_value, summary.chosen_latency_s = trial.value, measured_latency(trial)
    return sched


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tarflow-tuner")
    except PackageNotFoundError:
        return "unknown"
