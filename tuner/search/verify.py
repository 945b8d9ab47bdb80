"""After the search: re-check the best feasible schedules on fresh noise, and re-time the winner
against the seeds, interleaved."""

from __future__ import annotations

from tarflow.sampling import make_noise, sample
from tarflow.schedule import builtin_schedule

from tuner.measure.timing import summarize, timed
from tuner.quality.paired import paired_proxy
from tuner.search.config import TuneConfig
from tuner.search.evaluate import Evaluator


def verify(ev: Evaluator, candidates, cfg: TuneConfig, vext, vref, log=print):
    """Re-run the candidates at verify_n on fresh noise; the first that holds both constraints
    wins. Returns (trial, schedule, verification record) or three Nones."""
    model = ev.model
    noise = make_noise(cfg.verify_n, model, cfg.seed + 1)
    labels = cfg.sampling.make_labels(cfg.verify_n, model, cfg.seed + 1)
    x_seq = ev.run(builtin_schedule("sequential", model), noise, labels).x
    f_seq, fid_seq = ev.fid_of(x_seq, vext, vref)
    for t, sched in candidates:
        x = ev.run(sched, noise, labels).x
        feats, fid = ev.fid_of(x, vext, vref)
        proxy = paired_proxy(x, x_seq, vext, features_schedule=feats, features_sequential=f_seq)
        drift_ok = cfg.max_drift is None or proxy["rmse_max"] <= cfg.max_drift
        ok = fid - fid_seq <= cfg.tolerance and drift_ok
        why = "ok" if ok else ("fails the FID tolerance" if drift_ok else
                               f"drifts {proxy['rmse_max']:.3g}/255 > {cfg.max_drift:g} on a sample")
        log(f"verify trial {t.number}: FID {fid:.4g} vs sequential {fid_seq:.4g} "
            f"({vext.id}, n={cfg.verify_n}), max drift {proxy['rmse_max']:.3g}/255 -> {why}")
        if ok:
            return t, sched, {"fid": fid, "fid_sequential": fid_seq, "gap": fid - fid_seq,
                              "extractor": vext.id, "n": cfg.verify_n, "proxy": proxy}
    return None, None, None


def remeasure(ev: Evaluator, schedules: dict, rounds: int = 3, batches: int = 4) -> dict:
    """Final latencies, timed interleaved round by round so drift hits every schedule alike.

    The search's per-trial timings carry noise of a few percent on a busy CPU; speed-ups that
    are written into the schedule come from this fairer re-measurement instead.
    """
    base, bs = ev.baseline, ev.cfg.batch
    noise = base.noise[:bs * batches]
    labels = None if base.labels is None else base.labels[:bs * batches]
    runs = {name: [] for name in schedules}
    for sched in schedules.values():  # warm-up
        ev.run(sched, noise[:bs], None if labels is None else labels[:bs])
    for _ in range(rounds):
        for name, sched in schedules.items():
            for i in range(0, len(noise), bs):
                lab = None if labels is None else labels[i:i + bs]
                _, sec = timed(lambda: sample(ev.model, noise[i:i + bs], sched, labels=lab,
                                              settings=ev.cfg.sampling, solvers=ev.solvers), ev.device)
                runs[name].append(sec)
    return {name: summarize(v) for name, v in runs.items()}
