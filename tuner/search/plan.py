"""What a tune will spend sampling, said before it spends it (`tune` prints it before the first
trial; `tune --plan` prints it and stops).

The forecast is made from the block profile and the options, in the units of
tuner.search.accounting (serial passes, tokens, sequential-batch equivalents):

* a schedule's passes per batch: per block and segment, the passes the profile's measured
  curves needed to reach the schedule's tolerance (`Profile.iters_needed`), at most its budget
  and the segment's length; a token-by-token block T - 1; a frontier block what one-segment
  Jacobi needs (measured: frontier saves tokens, not passes);
* the search: the seed schedules first, then every other trial as one of 64 random draws from
  the search space (what TPE's first trials are; it soon favours cheaper schedules, and a trial
  that breaks the drift limit stops early, so this leans high), bounded by every trial running
  token by token. Where the objective is counted, a schedule over SLOW_PRUNE x the cheapest
  seed is charged one batch, as the slow stop ends it;
* the baseline (n / batch sequential batches), the noise floor (one sequential batch of n per
  floor seed), the verification and the re-timing. Verification: the sequential sampler on the
  fresh noise (verify_n samples), VERIFY_FULL_CHECKS full checks (the refinement's base and the
  winner) and every refinement step screened in full (cfg.screen_n samples), the likely winner,
  the cheapest seed, standing in for each schedule; the re-timing (a warm-up and
  --retime-rounds rounds of up to 4 batches of the winner and of every seed that ran to the end).

Minutes need a clock: a device profile (`--objective cost:`) prices every pass by its width on
the profiled device; here, a timed sequential batch and a timed one-segment Jacobi batch price
passes and tokens (`Clock`). Sampling only: FID features are not in it (`tune` says up front when
Inception's will take long).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tarflow.sampling import make_noise, sample
from tarflow.schedule import Schedule
from tarflow.solve import segment_bounds
from tarflow.solvers import SolverChoice

from tuner.measure.timing import timed
from tuner.search.accounting import STAGE_TITLES, STAGES, Spent, fmt_count
from tuner.search.drift_model import wants_model_seed
from tuner.search.evaluate import SLOW_PRUNE
from tuner.search.space import SearchSpace

DRAWS = 64  # random draws from the search space a non-seed trial's work is averaged over
# the model seed's drift calibration (tuner.search.drift_model), in sequential batches per block: it
# cost 10.9 on the bundled model and 9.9 on the patch-2 model (4 blocks each); its grid adapts, so a guess
MODEL_SEED_SEQ_BATCHES = 3
# full verify_n checks: the refinement's base, and the final verification's (a candidate that fails
# stops at its first batch over the limit; one that holds samples all of it)
VERIFY_FULL_CHECKS = 2
RETIME_BATCHES = 4  # remeasure: a warm-up batch, then --retime-rounds rounds of (at most) 4 per schedule


@dataclass
class Work:
    """Estimated sampling work of one batch: passes, tokens, and passes by width per block
    (sampling order), which a device profile prices."""

    passes: float = 0.0
    tokens: float = 0.0
    calls: list = field(default_factory=list)  # per block: {width: passes}
    blocks: list = field(default_factory=list)

    def add_block(self, block: int, calls: dict) -> None:
        self.blocks.append(block)
        self.calls.append(calls)
        self.passes += sum(calls.values())
        self.tokens += sum(w * n for w, n in calls.items())


class Estimator:
    """Per-batch work of schedules and of the search space, from one profile (cached lookups)."""

    def __init__(self, profile, T: int):
        self.profile, self.T, self._need = profile, T, {}

    def need(self, k: int, S: int, init: str, tol: float, anderson: int = 0) -> int:
        """Passes per segment to `tol` (tol 0 never stops early: the segment's length)."""
        L = -(-self.T // S)
        if tol <= 0:
            return L
        key = (k, S, init, tol, anderson)
        if key not in self._need:
            self._need[key] = min(L, self.profile.iters_needed(k, S, init, tol, anderson))
        return self._need[key]

    def segments(self, k: int, S: int, init: str, tol: float, anderson: int, budget: int) -> dict:
        """{width: passes} of a Jacobi block (a token-by-token one when S >= T)."""
        if S >= self.T:
            return {1: self.T - 1}
        need, calls = self.need(k, S, init, tol, anderson), {}
        for s, e in segment_bounds(self.T, S):
            cap = (e - s - 1) if e == self.T else (e - s)  # solve_segment's budget bound
            calls[e - s] = calls.get(e - s, 0) + min(need, cap, budget)
        return calls

    def frontier(self, k: int, init: str, tol: float, window: int) -> dict:
        passes = self.need(k, 1, init, tol) if tol > 0 else self.T - 1
        return {min(window, self.T - 1): min(passes, self.T - 1)}

    def schedule(self, sched: Schedule) -> Work:
        w = Work()
        for p in sched.plans:
            calls = (self.frontier(p.block, p.init, p.tol, p.window) if p.mode == "frontier" else
                     self.segments(p.block, p.segments, p.init, p.tol, p.anderson, p.max_iters))
            w.add_block(p.block, calls)
        return w

    def space(self, space: SearchSpace, draws: int = DRAWS, seed: int = 0) -> list[Work]:
        """The work of random draws from the search space, every parameter drawn at random as
        TPE's first trials are, through the space's own `suggest` (so it holds whatever the
        space's parameters are)."""
        import optuna

        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
            works = [self.schedule(space.suggest(study.ask(), "draw")) for _ in range(draws)]
        finally:
            optuna.logging.set_verbosity(verbosity)
        return works


def mean_work(works: list[Work]) -> Work:
    w = Work()
    for i, block in enumerate(works[0].blocks):
        w.add_block(block, _mean_calls([x.calls[i] for x in works]))
    return w


def _mean_calls(draws: list[dict]) -> dict:
    out = {}
    for c in draws:
        for w, n in c.items():
            out[w] = out.get(w, 0.0) + n / len(draws)
    return out


@dataclass
class Forecast:
    """The expected cost of a tune, per stage (tuner.search.accounting units; seconds: sampling
    seconds here once `clocked`, else 0)."""

    stages: dict[str, Spent]
    trials: int
    batches_per_trial: int
    seeds: int  # seed schedules among the trials
    trial_passes: float  # a non-seed trial's expected passes per batch (the mean random draw)
    upper_search_passes: int  # the search if every trial ran token by token
    B: int
    T: int
    batch: int
    slow_over: float | None = None  # passes per batch over which the slow stop ends a trial (None: no stop)
    here_s: float | None = None  # estimated sampling seconds on this device
    here_basis: str | None = None
    modelled_s: float | None = None  # on the device profile's device
    modelled_device: str | None = None
    _work: dict = field(default_factory=dict, repr=False)  # stage -> [(Work per batch, batches)]

    @property
    def total(self) -> Spent:
        out = Spent()
        for s in self.stages.values():
            out.add_spent(s)
        return out

    def clocked(self, clock: "Clock | None", cost_model=None) -> "Forecast":
        """Minutes: here with a clock timed on this device, and on the profiled device with a
        device profile (each pass priced by its width)."""
        if clock is not None:
            for k, rows in self._work.items():
                self.stages[k].seconds = round(sum(clock.seconds(w) * n for w, n in rows), 2)
            self.here_s = sum(s.seconds for s in self.stages.values())
            self.here_basis = clock.basis
        if cost_model is not None:
            self.modelled_s = sum(cost_model.cost(w.calls, w.blocks) * n for rows in self._work.values()
                                  for w, n in rows)
            self.modelled_device = cost_model.device.get("device_name")
        return self

    def lines(self) -> list[str]:
        """What tune prints before its first trial (and `tune --plan` instead of running it)."""
        tot, s = self.total, self.stages
        clock = [f"~{self.here_s / 60:.1f} min here" if self.here_s is not None else None,
                 f"~{self.modelled_s / 60:.1f} min on {self.modelled_device} (device profile)"
                 if self.modelled_s is not None else None]
        clock = "".join(f", {c}" for c in clock if c)
        head = (f"expected cost of this tune (sampling): ~{fmt_count(tot.passes)} serial passes = "
                f"~{tot.passes / (self.B * (self.T - 1)):,.0f} sequential batches of {self.batch} "
                f"(B(T-1) = {self.B * (self.T - 1):,} passes each), ~{fmt_count(tot.tokens)} tokens{clock}")
        rest = self.trials - self.seeds
        search = (f"search ~{fmt_count(s['search'].passes)} ({self.trials} trials x {self.batches_per_trial} batches: "
                  f"{self.seeds} seeds, then ~{self.trial_passes:.0f} passes per batch each"
                  + ("" if self.slow_over is None else f", one batch only over {self.slow_over:.0f}")
                  + "; at most "
                  f"{fmt_count(self.upper_search_passes)} if every trial ran token by token)") if rest > 0 else (
                  f"search ~{fmt_count(s['search'].passes)} ({self.trials} trials x {self.batches_per_trial} batches)")
        others = ", ".join(f"{STAGE_TITLES[k]} ~{fmt_count(s[k].passes)}" for k in STAGES if k != "search")
        out = [head, f"  {search}; {others}"]
        if self.here_basis:
            out.append(f"  minutes: {self.here_basis}; FID features not included")
        return out


def forecast(model, profile, cfg, space: SearchSpace | None = None, seeds: dict | None = None) -> Forecast:
    """The expected cost of a tune of `model` with `cfg` (tuner.search.config.TuneConfig)."""
    from tuner.search.seeds import seed_schedules

    B, T = model.cfg.num_blocks, model.cfg.num_patches
    space = space or SearchSpace.for_model(model, profile, cfg.modes)
    seeds = seeds if seeds is not None else seed_schedules(model, profile, space, cfg.modes)
    est = Estimator(profile, T)
    seq = Work()
    for k in range(B - 1, -1, -1):
        seq.add_block(k, {1: T - 1})
    seed_work = {name: est.schedule(s) for name, s in seeds.items()}
    draws = est.space(space) if cfg.trials > len(seeds) else [seq]
    draw = mean_work(draws)
    winner = min((w for name, w in seed_work.items() if name != "sequential"), key=lambda w: w.passes, default=seq)
    per_trial, verify_b, screen_b = cfg.n // cfg.batch, -(-cfg.verify_n // cfg.batch), -(-cfg.screen_n // cfg.batch)

    def batches(w: Work) -> int:  # a trial the slow stop ends after its first batch (tuner.search.evaluate)
        return 1 if not cfg.goal.measured and w.passes > SLOW_PRUNE * winner.passes else per_trial

    screen = [(winner, screen_b * cfg.refine_trials)] if screen_b < verify_b else []
    ran_seeds = list(seed_work.items())[:cfg.trials]
    # the sequential seed samples nothing: it is the baseline's run (tuner.search.evaluate)
    rest = (cfg.trials - len(ran_seeds)) / len(draws)
    work = {"search": [(w, batches(w)) for name, w in ran_seeds if name != "sequential"]
            + [(w, rest * batches(w)) for w in draws],
            "model_seed": [(seq, MODEL_SEED_SEQ_BATCHES * B)] if wants_model_seed(cfg) else [],
            "baseline": [(seq, per_trial)],
            "noise_floor": [(seq, len(cfg.floor_seeds) * cfg.n / cfg.batch)],  # for the clock: n samples each
            "verification": [(seq, verify_b), (winner, VERIFY_FULL_CHECKS * verify_b), *screen],
            # the winner and the seeds that ran to the end (those the slow stop ends are not re-timed)
            "retiming": [(w, 1 + cfg.retime_rounds * min(RETIME_BATCHES, per_trial))
                         for name, w in [("", winner), *seed_work.items()]
                         if name == "sequential" or batches(w) == per_trial]}
    stages = {k: _spent(rows) for k, rows in work.items()}
    stages["noise_floor"] = _spent([(seq, len(cfg.floor_seeds))])  # as counted: one batch of n per seed
    return Forecast(stages, cfg.trials, per_trial, len(ran_seeds), draw.passes,
                    cfg.trials * per_trial * B * (T - 1), B, T, cfg.batch,
                    None if cfg.goal.measured else SLOW_PRUNE * winner.passes, _work=work)


def _spent(rows) -> Spent:
    return Spent(round(sum(w.passes * n for w, n in rows)), round(sum(w.tokens * n for w, n in rows)),
                 round(sum(n for _, n in rows)))


@dataclass(frozen=True)
class Clock:
    """Seconds of a batch here as a_pass x passes + a_token x tokens, fitted to two timed batches:
    a sequential one (passes = tokens) and a one-segment Jacobi one (few wide passes). A GPU at
    small batch pays per pass (a_token ~ 0), a CPU mostly per token; one sequential batch alone
    cannot tell the two apart (on the bundled model's CPU bench, by passes alone the chosen
    schedule would take 23 ms, by tokens alone 1,142 ms; it took 400)."""

    pass_s: float
    token_s: float
    basis: str

    def seconds(self, w: Work) -> float:
        return self.pass_s * w.passes + self.token_s * w.tokens


def fit_clock(seq: tuple, jac: tuple, name: str) -> Clock:
    """The clock through two (passes, tokens, seconds) batches, both coefficients >= 0."""
    (p1, k1, t1), (p2, k2, t2) = seq, jac
    det = p1 * k2 - p2 * k1
    a, c = ((t1 * k2 - t2 * k1) / det, (p1 * t2 - p2 * t1) / det) if det else (t1 / p1, 0.0)
    if a < 0:
        a, c = 0.0, (t1 + t2) / (k1 + k2)
    elif c < 0:
        a, c = (t1 + t2) / (p1 + p2), 0.0
    return Clock(a, c, f"timed here: a sequential batch {t1 * 1e3:.0f} ms ({p1:.0f} passes), a {name} batch "
                       f"{t2 * 1e3:.0f} ms ({p2:.0f} passes, {k2:.0f} tokens) -> {a * 1e3:.3g} ms per pass + "
                       f"{c * 1e3:.3g} ms per token")


def measure_clock(model, cfg, device, seeds: dict, seq_s: float | None = None, spent: Spent | None = None,
                  solvers=None) -> Clock:
    """Time a one-segment Jacobi seed (and the sequential sampler unless `seq_s`, its seconds per
    batch, is known) on cfg.batch samples here, each after an untimed warm-up batch: at most four
    batches, counted into `spent`."""
    from tarflow.schedule import builtin_schedule

    B, T = model.cfg.num_blocks, model.cfg.num_patches
    name = "jacobi1" if "jacobi1" in seeds else next(k for k in seeds if k != "sequential")
    solvers = solvers or SolverChoice(cfg.solver, device)
    jac = _timed_batch(model, cfg, device, seeds[name], solvers, spent)
    seq = (B * (T - 1), B * (T - 1), seq_s if seq_s else
           _timed_batch(model, cfg, device, builtin_schedule("sequential", model), solvers, spent)[2])
    return fit_clock(seq, jac, name)


def _timed_batch(model, cfg, device, sched, solvers, spent: Spent | None) -> tuple:
    """(passes, tokens, seconds) of the second of two batches of `sched` (the first warms up)."""
    noise = make_noise(2 * cfg.batch, model, cfg.seed)
    labels = cfg.sampling.make_labels(2 * cfg.batch, model, cfg.seed)
    for i in (0, cfg.batch):
        lab = None if labels is None else labels[i:i + cfg.batch]
        (_, st), s = timed(lambda: sample(model, noise[i:i + cfg.batch], sched, labels=lab, settings=cfg.sampling,
                                          solvers=solvers), device)
        if spent is not None:
            spent.add(st)
    return st.passes, sum(st.tokens), s


def plan_tune(model, profile, cfg, device) -> Forecast:
    """The forecast `tune --plan` prints: from the profile and the options, clocked here on four
    batches (a sequential and a one-segment Jacobi batch, each after a warm-up)."""
    from tuner.search.seeds import seed_schedules

    space = SearchSpace.for_model(model, profile, cfg.modes)
    seeds = seed_schedules(model, profile, space, cfg.modes)
    return forecast(model, profile, cfg, space, seeds).clocked(measure_clock(model, cfg, device, seeds),
                                                               cfg.cost_model)


def announce(ev, seeds: dict, device, log=print) -> Forecast:
    """The forecast of a tune whose baseline (`ev.baseline`, tuner.search.evaluate) just ran, logged
    before the first trial: the baseline's latency is the sequential clock, and the Jacobi batches
    timed for the clock are counted into the baseline's spending."""
    import time

    base, t0 = ev.baseline, time.perf_counter()
    clock = measure_clock(ev.model, ev.cfg, device, seeds, base.latency["median_s"], base.spent, ev.solvers)
    base.spent.seconds += time.perf_counter() - t0
    fc = forecast(ev.model, ev.profile, ev.cfg, ev.space, seeds).clocked(clock, ev.cfg.cost_model)
    log("\n".join(fc.lines()))
    return fc
