"""After the search: re-check the best feasible schedules on fresh noise, and re-time the winner
against the seeds, interleaved."""

from __future__ import annotations

from tarflow.sampling import sample

from tuner.measure.timing import summarize, timed
from tuner.search.accounting import Spent
from tuner.search.config import TuneConfig
from tuner.search.evaluate import Evaluator
from tuner.search.fresh import FreshCheck


def verify(ev: Evaluator, candidates, cfg: TuneConfig, vext, vref, log=print, *, fresh: FreshCheck | None = None,
           spent: Spent | None = None):
    """Re-run the candidates at verify_n on fresh noise (tuner.search.fresh); the first that holds
    both constraints wins. Returns (trial, schedule, verification record) or three Nones. With a
    shared `fresh` check (it keeps records in the study), a candidate the refinement already
    checked is not sampled again; `spent` counts what this verification sampled."""
    fresh = fresh or FreshCheck(ev, cfg, vext, vref)
    before = Spent()
    before.add_spent(fresh.spent)
    for t, sched in candidates:
        rec = fresh.of_trial(t, sched)
        fid = "" if "fid" not in rec else f"FID {rec['fid']:.4g} vs sequential {rec['fid_sequential']:.4g} "
        log(f"verify trial {t.number}: {fid}({vext.id}, n={rec['n']}), max drift "
            f"{rec['proxy']['rmse_max']:.3g}/255 -> {rec['why']}")
        if rec["ok"]:
            break
    else:
        t, sched, rec = None, None, None
    if spent is not None:  # what sampling this verification added (not the refinement's checks)
        spent.add_spent(Spent(fresh.spent.passes - before.passes, fresh.spent.tokens - before.tokens,
                              fresh.spent.batches - before.batches))
    if rec is None:
        return None, None, None
    return t, sched, {k: rec[k] for k in ("fid", "fid_sequential", "gap", "extractor", "n", "proxy")}


def remeasure(ev: Evaluator, schedules: dict, rounds: int = 3, batches: int = 4, spent: Spent | None = None) -> dict:
    """Final latencies, timed interleaved round by round so drift hits every schedule alike.

    The search's per-trial timings carry noise of a few percent on a busy CPU; speed-ups that
    are written into the schedule come from this fairer re-measurement instead. `spent` counts
    what the sampling cost, warm-up included.
    """
    spent = Spent() if spent is None else spent
    base, bs = ev.baseline, ev.cfg.batch
    noise = base.noise[:bs * batches]
    labels = None if base.labels is None else base.labels[:bs * batches]
    runs = {name: [] for name in schedules}
    for sched in schedules.values():  # warm-up
        ev.run(sched, noise[:bs], None if labels is None else labels[:bs], spent=spent)
    for _ in range(rounds):
        for name, sched in schedules.items():
            for i in range(0, len(noise), bs):
                lab = None if labels is None else labels[i:i + bs]
                (_, st), sec = timed(lambda: sample(ev.model, noise[i:i + bs], sched, labels=lab,
                                                    settings=ev.cfg.sampling, solvers=ev.solvers), ev.device)
                runs[name].append(sec)
                spent.add(st)
    return {name: summarize(v) for name, v in runs.items()}
