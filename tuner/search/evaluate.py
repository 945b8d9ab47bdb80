"""Trial evaluation: sample one schedule on the search noise and measure what the objective and
the constraints need. Every run returns one `RunResult` and every trial one `TrialResult`; no
state is passed between methods through attributes."""

from __future__ import annotations

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
from tuner.quality.paired import paired_proxy
from tuner.search.config import TuneConfig
from tuner.search.objectives import RunCounts
from tuner.search.space import SearchSpace
from tuner.search.studies import crashpoint


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

    def run(self, sched: Schedule, noise, labels, on_first_batch=None, trial_number: int = -1) -> RunResult:
        """Sample `noise` in batches of cfg.batch; the first batch is the warm-up and, through
        `on_first_batch(x)`, the cheap screen that may prune the trial."""
        bs, cost = self.cfg.batch, self.cfg.cost_model
        xs, secs, passes, iters, fallbacks, modelled = [], [], 0, None, 0, 0.0
        for i in range(0, len(noise), bs):
            lab = None if labels is None else labels[i:i + bs]
            (x, st), s = timed(lambda: sample(self.model, noise[i:i + bs], sched, labels=lab,
                                              settings=self.cfg.sampling, solvers=self.solvers), self.device)
            xs.append(x.float().cpu())
            passes += st.passes
            fallbacks += len(st.fallbacks)
            if cost is not None:
                modelled += cost.cost(st.calls, st.blocks)
            iters = iters or st.iters
            if i == 0 and on_first_batch is not None:
                on_first_batch(xs[0])
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
        cfg = self.cfg
        noise = make_noise(cfg.n, self.model, cfg.seed)
        labels = cfg.sampling.make_labels(cfg.n, self.model, cfg.seed)
        r = self.run(builtin_schedule("sequential", self.model), noise, labels)
        feats, fid = self.fid_of(r.x)
        self.baseline = Baseline(noise, labels, r.x, feats, fid, r.latency, self.goal.value(r.counts()))
        return self.baseline

    def evaluate(self, sched: Schedule, on_first_batch=None, trial_number: int = -1) -> TrialResult:
        base = self.baseline
        screen = None if on_first_batch is None else (
            lambda x0: on_first_batch(paired_proxy(x0, base.x[:len(x0)])))
        r = self.run(sched, base.noise, base.labels, screen, trial_number)
        feats, fid = self.fid_of(r.x)
        proxy = paired_proxy(r.x, base.x, self.ext, features_schedule=feats, features_sequential=base.feats)
        return TrialResult(sched, self.goal.value(r.counts()), r, fid, fid - base.fid, proxy)

    def __call__(self, trial: optuna.Trial) -> float:
        sched = self.space.suggest(trial, f"trial-{trial.number}", self.model.fingerprint)

        def screen(proxy):
            trial.set_user_attr("warmup_rmse", proxy["rmse_mean"])
            trial.report(proxy["rmse_mean"], step=0)
            if proxy["nonfinite"] or proxy["rmse_mean"] > self.cfg.prune_rmse:
                raise optuna.TrialPruned(f"paired proxy RMSE {proxy['rmse_mean']:.3g} > "
                                         f"{self.cfg.prune_rmse:g}")

        r = self.evaluate(sched, screen, trial.number)
        crashpoint("fid", trial.number)
        trial.set_user_attr("fid", r.fid)
        crashpoint("storage", trial.number)
        for key, value in r.user_attrs().items():
            if key != "fid" and value is not None:
                trial.set_user_attr(key, value)
        trial.set_constraint("fid_gap", r.fid_gap - self.cfg.tolerance)
        if self.cfg.max_drift is not None:
            trial.set_constraint("drift", r.proxy["rmse_max"] - self.cfg.max_drift)
        return r.value
