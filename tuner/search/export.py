"""Export: re-time the verified winner against the seeds and write what was measured into the
schedule's provenance and the study summary."""

from __future__ import annotations

import time

from tarflow.schedule import Schedule

from tuner.search.evaluate import Evaluator
from tuner.search.summary import StudySummary
from tuner.search.verify import remeasure


def export(ev: Evaluator, summary: StudySummary, trial, sched: Schedule, ver: dict, seeds: dict,
           log=print) -> Schedule:
    """The winner with its provenance; fills the summary's final fields."""
    log("re-timing the chosen schedule against the seeds (interleaved) ...")
    final = remeasure(ev, {"chosen": sched} | {k: seeds[k] for k in summary.seeds})
    lat = final["chosen"]["median_s"]
    seq_lat = final["sequential"]["median_s"] if "sequential" in final else summary.sequential_latency_s
    for k, seed in summary.seeds.items():
        seed.latency_final = final[k]
    cfg, floor = ev.cfg, summary.noise_floor
    prov = {
        "tool": "tarflow-tuner", "tool_version": _version(), "date": time.strftime("%Y-%m-%d"),
        "tolerance": cfg.tolerance, "trial": trial.number, "trials": summary.trials,
        "fid_search": {"fid": trial.user_attrs["fid"], "sequential": summary.sequential.fid,
                       "gap": trial.user_attrs["fid_gap"], "extractor": summary.sequential.extractor,
                       "n": cfg.n, "noise_floor_std": floor["std"], "noise_floor_mean": floor["mean"]},
        "fid_verify": ver, "latency_s": lat, "sequential_latency_s": seq_lat,
        "speedup_vs_sequential": seq_lat / lat,
        "speedup_vs_seeds": {k: final[k]["median_s"] / lat for k in summary.seeds},
        "latency_search_s": trial.value, "equivalent_to_sequential": sched.is_sequential(ev.T),
        "proxy": trial.user_attrs["proxy"], "batch": cfg.batch, "sampling": cfg.sampling.to_dict(),
        "objective": cfg.objective, "objective_value": trial.value, "max_drift": cfg.max_drift,
        "objective_device": (cfg.cost_model.device["device_name"] if cfg.cost_model is not None else
                             summary.device["device_name"] if cfg.objective == "latency" else None),
        "passes_per_batch": trial.user_attrs["passes"] / (cfg.n // cfg.batch),
        **summary.device,
    }
    sched = sched.with_provenance(**prov)
    summary.final_latency = final
    summary.schedule = sched.to_dict()
    summary.chosen_trial = trial.number
    summary.chosen_iters = trial.user_attrs["iters"]
    return sched


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tarflow-tuner")
    except PackageNotFoundError:
        return "unknown"
