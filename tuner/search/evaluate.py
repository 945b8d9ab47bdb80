"""Trial evaluation: sample one schedule on the search noise and measure what the objective and
the constraints need. Every run returns one `RunResult` and every trial one `TrialResult`; no
state is passed between methods through attributes. A trial is screened batch by batch
(`Screen`) and records what it spent sampling, also when it is stopped part-way
(tuner.search.accounting)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import optuna
import torch

from tarflow.data import to_uint8
from tarflow.sampling import make_noise, sample
from tarflow.schedule import Schedule, builtin_schedule
from tarflow.solvers import SolverChoice

from tuner.measure.profile import Profile
from tuner.measure.timing import summarize, timed
from tuner.quality.fid import fid_against
from tuner.quality.paired import paired_proxy, pixel_drift, proxy_summary
from tuner.search.accounting import TRIAL_ATTR, Spent
from tuner.search.config import TuneConfig
from tuner.search.objectives import RunCounts
from tuner.search.space import SearchSpace
from tuner.search.studies import crashpoint, feasible_trials


@dataclass
class RunResult:
    """One schedule sampled over some noise, batch by batch."""

    x: torch.Tensor
    latency: dict  # timing stats per batch (the first batch is a warm-up unless it is the only one)
    passes: int  # serial transformer passes, all batches
    iters: list  # the first batch's passes per segment, per block
    fallbacks: int  # non-finite segments re-solved token by token
    batches: int
    modelled_s: float | None  # device-profile seconds per batch (cost objective)

    def counts(self) -> RunCounts:
        return RunCounts(self.batches, self.passes, self.latency.get("median_s"), self.modelled_s)


@dataclass
class Baseline:
    """Sequential reference on the search noise: samples, features, FID, latency."""

    noise: torch.Tensor
    labels: torch.Tensor | None
    x: torch.Tensor
    feats: np.ndarray
    fid: float
    latency: dict
    value: float  # the objective's value (its unit), what every trial's value is compared with
    spent: Spent = field(default_factory=Spent)  # what sampling it cost (seconds: sampling and features)
    run: RunResult | None = None  # the sequential run itself: a trial of the sequential schedule reuses it


@dataclass
class TrialResult:
    """What a trial measured: the objective value and everything the constraints read."""

    schedule: Schedule
    value: float  # in the objective's base unit
    run: RunResult
    fid: float
    fid_gap: float
    proxy: dict = field(default_factory=dict)

    def user_attrs(self) -> dict:
        """As stored on the Optuna trial (trials.csv and the report read these names)."""
        return {"fid": self.fid, "fid_gap": self.fid_gap, "latency": self.run.latency, "proxy": self.proxy,
                "passes": self.run.passes, "iters": self.run.iters, "fallbacks": self.run.fallbacks,
                "modelled_s": self.run.modelled_s}


class Evaluator:
    """Holds the model, profile, reference and baseline; `evaluator(trial)` is Optuna's
    objective(trial): it samples one suggested schedule and returns the objective value."""

    def __init__(self, model, profile: Profile, cfg: TuneConfig, device, ref, extractor, on_fallback=None):
        self.model, self.profile, self.cfg, self.device = model, profile, cfg, device
        self.ref, self.ext = ref, extractor
        self.T, self.B = model.cfg.num_patches, model.cfg.num_blocks
        self.space = SearchSpace.for_model(model, profile, cfg.modes)
        self.goal = cfg.goal
        if cfg.cost_model is not None:
            cfg.cost_model.check_fits(model, cfg.batch, cfg.sampling)
        self.baseline: Baseline | None = None
        # every run of the study samples with the same step; what ran is recorded at export
        self.solvers = SolverChoice(cfg.solver, device, on_fallback=on_fallback)

    def schedule_from_params(self, params: dict, name: str) -> Schedule:
        return self.space.schedule_from_params(params, name, self.model.fingerprint)

    def run(self, sched: Schedule, noise, labels, on_batch=None, trial_number: int = -1,
            spent: Spent | None = None) -> RunResult:
        """Sample `noise` in batches of cfg.batch; the first batch is the warm-up. After each batch
        `on_batch(i, x, counts)` (batch index, its samples, the RunCounts so far) may stop the run
        by raising (a pruned trial); `spent` has then counted every batch sampled
        (tuner.search.accounting)."""
        bs, cost = self.cfg.batch, self.cfg.cost_model
        xs, secs, passes, iters, fallbacks, modelled = [], [], 0, None, 0, 0.0
        for i in range(0, len(noise), bs):
            lab = None if labels is None else labels[i:i + bs]
            (x, st), s = timed(lambda: sample(self.model, noise[i:i + bs], sched, labels=lab,
                                              settings=self.cfg.sampling, solvers=self.solvers), self.device)
            if spent is not None:
                spent.add(st)
            xs.append(x.float().cpu())
            passes += st.passes
            fallbacks += len(st.fallbacks)
            if cost is not None:
                modelled += cost.cost(st.calls, st.blocks)
            iters = iters or st.iters
            if on_batch is not None:
                done = i // bs + 1
                on_batch(i // bs, xs[-1], RunCounts(done, passes, None, modelled / done if cost is not None else None))
                if i == 0:
                    crashpoint("sampling", trial_number)
            if i > 0 or len(noise) <= bs:
                secs.append(s)
        batches = -(-len(noise) // bs)
        return RunResult(torch.cat(xs), summarize(secs), passes, iters, fallbacks, batches,
                         modelled / batches if cost is not None else None)

    def fid_of(self, x, ext=None, ref=None):
        """Features and FID of samples (the search's extractor and reference by default)."""
        ext, ref = ext or self.ext, ref or self.ref
        feats = ext.features(to_uint8(x))
        return feats, fid_against(None, ref, ext, features=feats).fid

    def prepare(self) -> Baseline:
        """Sequential samples, features and FID on the search noise (computed once per run)."""
        cfg, t0, spent = self.cfg, time.perf_counter(), Spent()
        noise = make_noise(cfg.n, self.model, cfg.seed)
        labels = cfg.sampling.make_labels(cfg.n, self.model, cfg.seed)
        r = self.run(builtin_schedule("sequential", self.model), noise, labels, spent=spent)
        feats, fid = self.fid_of(r.x)
        spent.seconds = time.perf_counter() - t0
        self.baseline = Baseline(noise, labels, r.x, feats, fid, r.latency, self.goal.value(r.counts()), spent, r)
        return self.baseline

    def evaluate(self, sched: Schedule, screen=None, trial_number: int = -1, spent: Spent | None = None) -> TrialResult:
        """One schedule on the search noise. `screen(i, rmse, nonfinite, value)` sees each batch's
        per-sample drift against the sequential samples from the same noise (pixel RMSE 0-255,
        non-finite flags) and the objective's value so far (None where it is measured: a timed
        warm-up says nothing), and may stop the run by raising; `spent` counts what was sampled."""
        base, bs = self.baseline, self.cfg.batch
        value = (lambda counts: None) if self.goal.measured else self.goal.value
        check = None if screen is None else (
            lambda i, xb, counts: screen(i, *pixel_drift(xb, base.x[i * bs:i * bs + len(xb)]), value(counts)))
        if sched.is_sequential(self.T) and base.run is not None:
            # every block token by token is the sequential sampler, which the baseline ran on this
            # very noise: its samples, features and counts are this trial's (nothing sampled again;
            # at n = 512 on the bundled model that saves 6,144 serial passes)
            r, feats, fid = base.run, base.feats, base.fid
        else:
            r = self.run(sched, base.noise, base.labels, check, trial_number, spent)
            feats, fid = self.fid_of(r.x)
        proxy = paired_proxy(r.x, base.x, self.ext, features_schedule=feats, features_sequential=base.feats)
        return TrialResult(sched, self.goal.value(r.counts()), r, fid, fid - base.fid, proxy)

    def __call__(self, trial: optuna.Trial) -> float:
        sched = self.space.suggest(trial, f"trial-{trial.number}", self.model.fingerprint)
        spent, t0 = Spent(), time.perf_counter()
        try:
            screen = Screen(trial, self.cfg, len(self.baseline.noise), _best_value(trial))
            r = self.evaluate(sched, screen, trial.number, spent)
        except (optuna.TrialPruned, Exception):
            _record_spent(trial, spent, t0)  # stopped part-way, it still paid for what it sampled
            raise
        crashpoint("fid", trial.number)
        trial.set_user_attr("fid", r.fid)
        crashpoint("storage", trial.number)
        _record_spent(trial, spent, t0)
        for key, value in r.user_attrs().items():
            if key != "fid" and value is not None:
                trial.set_user_attr(key, value)
        trial.set_constraint("fid_gap", r.fid_gap - self.cfg.tolerance)
        if self.cfg.max_drift is not None:
            trial.set_constraint("drift", r.proxy["rmse_max"] - self.cfg.max_drift)
        return r.value


def _best_value(trial: optuna.Trial) -> float | None:
    """The objective value of the study's best feasible trial so far (None: none yet)."""
    best = feasible_trials(trial.study)
    return best[0].value if best else None


def _record_spent(trial: optuna.Trial, spent: Spent, t0: float) -> None:
    spent.seconds = time.perf_counter() - t0
    trial.set_user_attr(TRIAL_ATTR, spent.record())


SLOW_PRUNE = 1.5  # a first batch costing more than this x the best feasible trial stops the trial (`Screen`)


class Screen:
    """A trial's per-batch screen: it stops the trial as soon as the trial is hopeless, and says
    why in `fail_reason` (trials.csv).

    * Warm-up (the first batch): the mean drift above `prune_rmse`, or a non-finite sample -
      the cheap screen of old, a heuristic (`warmup_rmse` keeps the figure).
    * Every batch, with a drift limit: once the max per-sample drift over the batches so far
      exceeds `max_drift`. The limit is on the max over all n samples, which batches still to
      come can only raise, so this stop is exact: it prunes only trials that would have ended
      infeasible, and no feasible one. The drift constraint is set to the violation seen so far (a
      lower bound of the final one), so TPE counts the trial infeasible, as it would have.

    * First batch, where the objective is counted rather than timed (passes, cost): its value
      above SLOW_PRUNE x the best feasible trial's so far. A heuristic, but a safe one: the
      patch-2 model seed's passes over the 64 batches of its verification noise had a median of
      52 and ranged from 47 to 69 (the worst 1.33x the median), so a trial stopped here would
      average at least 1.5 / 1.33 = 1.13x the best, and could not have won.

    There is no such stop for the FID constraint. FID at n is a function of the mean and
    covariance of all n samples' features; the batches still to come can move both anywhere
    (towards the reference as well as away), so the FID of a part bounds the final FID neither
    from below nor from above, and a schedule whose first batches score badly can end within
    the tolerance. A stop on a partial FID would be a statistical guess that silently discards
    feasible trials; the per-sample drift, which is a max, is what can be screened exactly.
    """

    def __init__(self, trial: optuna.Trial, cfg: TuneConfig, n: int, best: float | None = None):
        self.trial, self.cfg, self.batches, self.best = trial, cfg, -(-n // cfg.batch), best
        self.worst, self.seen = 0.0, []

    def __call__(self, i: int, rmse, nonfinite, value: float | None = None) -> None:
        cfg, trial = self.cfg, self.trial
        self.worst = max(self.worst, float(rmse.max()))
        self.seen.append((rmse, nonfinite))
        if i == 0:
            mean = float(rmse.mean())
            trial.set_user_attr("warmup_rmse", mean)
            trial.report(mean, step=0)
            if nonfinite.any() or mean > cfg.prune_rmse:
                self.stop(f"warm-up batch: {int(nonfinite.sum())} non-finite sample(s)" if nonfinite.any() else
                          f"warm-up batch: paired proxy RMSE {mean:.3g} > {cfg.prune_rmse:g} (--prune-rmse)")
        if cfg.max_drift is not None and self.worst > cfg.max_drift:
            self.stop(f"drift {self.worst:.3g}/255 > limit {cfg.max_drift:g} on a sample of batch {i + 1} of "
                      f"{self.batches}: stopped early (more batches can only raise the max)")
        if i == 0 and value is not None and self.best is not None and value > SLOW_PRUNE * self.best:
            goal = cfg.goal
            self.stop(f"slow: {goal.format(value)} on the first batch > {SLOW_PRUNE:g} x the best feasible "
                      f"trial's {goal.format(self.best)}")

    def stop(self, why: str) -> None:
        """Prune: the paired proxy of the samples drawn so far is kept (its `n` says how many;
        `rmse_max` is a lower bound of the full one), and the drift constraint when it is broken."""
        if self.cfg.max_drift is not None and self.worst > self.cfg.max_drift:
            self.trial.set_constraint("drift", self.worst - self.cfg.max_drift)
        self.trial.set_user_attr("proxy", proxy_summary(np.concatenate([r for r, _ in self.seen]),
                                                        np.concatenate([b for _, b in self.seen])))
        self.trial.set_user_attr("fail_reason", f"pruned: {why}")
        raise optuna.TrialPruned(why)
