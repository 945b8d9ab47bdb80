"""The search, end to end: baseline, noise floor, trials (TPE, then a refinement of the best),
verification on fresh noise and export by one worker, then the study folder's files.

objective(trial) (tuner.search.evaluate) = the objective's value for one suggested schedule
(tuner.search.objectives: measured latency, serial passes or modelled cost per batch);
constraints (`trial.set_constraint`) = FID(schedule) - FID(sequential, same noise, same n) -
tolerance <= 0 and, with a drift limit, max per-sample drift - limit <= 0. The first batch of a
trial doubles as a paired-proxy screen: a schedule whose drift is hopeless is pruned before any
FID is paid for; and a trial stops at the first batch where a sample drifts past the limit
(tuner.search.evaluate.Screen). What every stage sampled is accounted (tuner.search.accounting)
and forecast before the first trial (tuner.search.plan). Parameter names live in tuner.search.space only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tarflow.errors import UserError
from tarflow.io import atomic_write_text
from tarflow.schedule import Schedule

from tuner.measure.pictures import write_pictures
from tuner.measure.profile import Profile
from tuner.measure.timing import device_info
from tuner.quality.extractors import get_extractor
from tuner.quality.fid import RefStats, default_ref_path, reference_stats
from tuner.quality.floor import noise_floor, tolerance_check
from tuner.search.config import VERIFY_CANDIDATES, TuneConfig
from tuner.search.drift_model import add_model_seed, with_prediction
from tuner.search.evaluate import Evaluator
from tuner.search.fresh import FreshCheck
from tuner.search.outage import run_optimize
from tuner.search.accounting import Spent, floor_spent, tune_cost, with_cost_columns
from tuner.search.export import verify_and_export
from tuner.search.plan import announce
from tuner.search.refine import refine
from tuner.search.seeds import seed_results, seed_schedules
from tuner.search.studies import (STARTED, RecordFailures, TrialCap, counted_trials, existing_study, export_once,
                                  feasible_trials, keep_init_choices, make_study, open_storage, study_config,
                                  trials_table)
from tuner.search.summary import Sequential, StudySummary


def resolve_ref(extractor, ref_path, data, out: Path, model):
    """Reference statistics: an explicit file, statistics computed from `data` at the model's
    resolution (cached in `out`), or the committed MNIST ones when they fit the model."""
    if ref_path is not None:
        return RefStats.load(ref_path)
    cfg = model.cfg
    shape = [cfg.in_channels, cfg.img_size, cfg.img_size]
    if data is not None:
        return reference_stats(data, extractor=extractor, split="test", size=cfg.img_size,
                               cache_path=out / f"ref_{extractor.name}.npz")
    bundled = default_ref_path(extractor.name)
    if bundled.is_file() and RefStats.load(bundled).meta.get("image_shape") == shape:
        return RefStats.load(bundled)
    raise UserError(f"no reference statistics for {extractor.id} at {'x'.join(map(str, shape))}: "
                    "pass --ref-data (images) or --ref (see `tarflow-tuner fid-ref`)")


def _extractors(cfg: TuneConfig, device, ref, verify_ref, data, out: Path, model):
    """The search's and the verification's FID extractors and reference statistics."""
    ext = get_extractor(cfg.extractor, device=device)
    vext = ext if cfg.verify_extractor == cfg.extractor else get_extractor(cfg.verify_extractor, device=device)
    ref_s = resolve_ref(ext, ref, data, out, model)
    return ext, vext, ref_s, ref_s if vext is ext else resolve_ref(vext, verify_ref, data, out, model)


def tune(model, profile: Profile, cfg: TuneConfig, *, device, out: Path, storage: str,
         study_name: str, resume: bool, ref=None, verify_ref=None, data=None, log=print,
         progress=None, checkpoint: str | None = None) -> StudySummary:
    """The whole search; writes schedule.json, trials.csv, summary.json, seeds/*.json and the report's pictures
    into `out`. `summary.schedule` is None (and no schedule written) when none met the tolerance. Raises UserError."""
    ext, vext, ref_s, ref_v = _extractors(cfg, device, ref, verify_ref, data, out, model)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the CLI shows a progress bar instead
    ev = Evaluator(model, profile, cfg, device, ref_s, ext, on_fallback=lambda why: log(f"warning: {why}"))
    seeds = seed_schedules(model, profile, ev.space, cfg.modes)
    store = open_storage(storage, cfg.heartbeat, cfg.storage_retry, log)
    prediction = add_model_seed(seeds, model, profile, ev.space, cfg, ev.solvers,  # tuner.search.drift_model
                                existing_study(store, study_name) if resume else None, calibrated := Spent())
    study = make_study(store, study_name, cfg.seed, resume,
                       study_config(cfg, model, device),
                       {name: ev.space.params_of(s) for name, s in list(seeds.items())[:cfg.trials]})
    keep_init_choices(study, ev.space)

    t_start = time.perf_counter()
    log(f"sequential baseline on {cfg.n} samples (batch {cfg.batch}) ...")
    base = ev.prepare()
    log(f"sequential: {base.latency['median_s'] * 1e3:.1f} ms/batch, FID {base.fid:.4g} ({ext.id}, n={cfg.n})")
    plan = announce(ev, seeds, device, log)  # what the tune will cost, before it spends it (tuner.search.plan)
    floor = noise_floor(model, ref=ref_s, extractor=ext, n=cfg.n, seeds=cfg.floor_seeds,
                        settings=cfg.sampling, batch=cfg.n)
    warn = tolerance_check(cfg.tolerance, floor)
    log(f"noise floor: FID {floor['mean']:.4g} ± {floor['std']:.3g} ({ext.id}, n={cfg.n}, "
        f"{len(floor['values'])} seeds)" + (f"\nwarning: {warn}" if warn else ""))
    run_trials(study, ev, cfg, progress, log, fresh := FreshCheck(ev, cfg, vext, ref_v, study=study))

    def result() -> dict:
        """Verify and export the winner (run by one worker only, see export_once)."""
        here = device_info(device)
        summary = StudySummary(
            study=study_name, checkpoint=checkpoint, model=model.fingerprint, device=here,
            batch=cfg.batch, tolerance=cfg.tolerance, config=cfg.as_record(),
            objective=cfg.goal.describe(here["device_name"]), sampling=cfg.sampling,
            trials=len(counted_trials(study)), feasible=len(feasible_trials(study)),
            search_seconds=round(time.perf_counter() - t_start, 1),
            sequential=Sequential(base.latency, base.fid, ext.id, cfg.n, base.value), noise_floor=floor,
            tolerance_warning=warn, seeds=seed_results(study, seeds))
        cands = [(t, ev.schedule_from_params(t.params, f"tuned (trial {t.number})"))
                 for t in feasible_trials(study) if not fresh.refused(t)][:VERIFY_CANDIDATES]
        # verify the fastest feasible candidates until one holds (sequential, if fastest, passes trivially); count the cost
        summary.cost = tune_cost(study, ev.B, ev.T, {"model_seed": calibrated, "baseline": base.spent, "noise_floor": floor_spent(floor)}
                                 | verify_and_export(ev, summary, cands, vext, ref_v, seeds, log, fresh), plan.stages)
        return json.loads(json.dumps(summary.to_dict(), default=str))  # as summary.json holds it

    summary = StudySummary.from_dict(export_once(study, cfg.heartbeat, result, log), "the study's stored result")
    sched = None if summary.schedule is None else Schedule.from_dict(summary.schedule)
    out.mkdir(parents=True, exist_ok=True)
    for name, s in seeds.items():  # the baselines compared against, as files `sample` and `bench` run
        s.save(out / "seeds" / f"{name}.json")
    atomic_write_text(out / "trials.csv", with_prediction(with_cost_columns(trials_table(study, ext.id, cfg.n), study), study, prediction).to_csv(index=False))
    if sched is not None:
        sched.save(out / "schedule.json")
    write_pictures(model, sched, out / "pictures", settings=cfg.sampling, seed=cfg.seed)
    summary.save(out / "summary.json")
    return summary


def run_trials(study, ev: Evaluator, cfg: TuneConfig, progress=None, log=print, fresh=None) -> None:
    """Run trials until the study holds cfg.trials (its total over --resume and workers): TPE
    first, then the last third (cfg.refine_trials) bisects the best schedule's per-block
    tolerances (tuner.search.refine), each candidate checked on `fresh` (a FreshCheck) too. A run
    cut short because another worker failed our trial after a storage outage (run_optimize) is
    simply continued."""

    def on_trial(study, trial):
        if progress is not None:
            feas = feasible_trials(study)
            best = cfg.goal.format(feas[0].value) if feas else "-"
            progress(len(counted_trials(study)), best, len(feas))

    deadline = None if cfg.timeout is None else time.monotonic() + cfg.timeout
    cap = optuna.study.MaxTrialsCallback(cfg.trials, states=STARTED)

    def run(n: int) -> bool:
        left = None if deadline is None else deadline - time.monotonic()
        return n > 0 and (left is None or left > 0) and run_optimize(
            lambda: study.optimize(TrialCap(RecordFailures(ev), cfg.trials), n_trials=n, timeout=left,
                                   callbacks=[on_trial, cap], catch=(Exception,)), log)

    def missing() -> int:
        return max(0, cfg.trials - len(counted_trials(study)))

    def seeds_waiting() -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))

    reserve = cfg.refine_trials  # one bisection step per trial, ~3 per block
    # the seeds run first even into the reserve: the refinement does not start while one waits,
    # so with few trials (8, with 7 seeds) it used to get none
    while run(max(missing() - reserve, min(seeds_waiting(), missing()))):
        pass
    used = refine(study, ev.space, min(reserve, missing()), run, fresh)
    if reserve:
        log(f"refinement: {used} of {reserve} trials bisecting per-block tolerances"
            + ("" if fresh is None else f"; fresh-noise checks sampled {fresh.spent.passes:,} passes"))
    while run(missing()):  # whatever the refinement did not use
        pass

