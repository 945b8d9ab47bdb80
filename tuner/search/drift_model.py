"""A model of per-sample drift, block by block: where the search starts (the `model` seed).

A schedule's drift is the sum of what each block's early stop leaves behind, carried through
the blocks sampled after it. One sequential run of one calibration batch (the first batch of
the search noise) gives every block's exact input (`tarflow.sampling.sample`'s callback sees
each block's result); from there block k alone is solved at a tolerance while the blocks after
it stay exact, so each point costs one batch and measures exactly what block k contributes to
the final image, per sample, and the passes it takes.

Per-sample contributions combine as a root-sum-square: on the bundled model (4 blocks, 14
mixed per-block tolerances, one batch) the RSS of the per-block drifts predicted each sample's
measured drift within 1.5 % (log-RMS), the plain sum over-predicted by 13 % and up to 1.7x per
sample; errors of different blocks are about orthogonal in pixel space.

What one batch cannot see is the tail of the search noise: the tolerance stops a block on the
worst update *of the batch*, so now and then a batch stops a pass or two early and a sample
drifts several times the typical batch's worst (bundled block 3 at tol 0.1: median batch max
0.57/255, worst of 32 batches 4.6/255). A batch that stops early behaves like a typical batch
at a looser tolerance, so a tolerance is only admissible for what the next looser calibration
point drifts (`admissible`): the grid's neighbour stands in for the unlucky batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from tarflow.sampling import BlockSolver, CountedSolver, SamplerStats, denoise, make_noise, prior_latents, sample
from tarflow.solve import solve_segment, solve_sequential
from tarflow.schedule import BlockPlan, Schedule, builtin_schedule

from tuner.quality.paired import pixel_drift
from tuner.search.accounting import Spent
from tuner.search.space import SearchSpace

# calibration tolerances (log10), loosest first; the loosest only bounds its neighbour
GRID = tuple(0.5 - 0.25 * i for i in range(15)) + (-3.5, -4.0, -4.5)  # 0.5, 0.25, ... -3, -3.5, -4, -4.5
START = -2.0  # where the sweep starts, both ways
NEGLIGIBLE = 1e-2  # drift below this fraction of the limit: tighter points only cost passes
HOPELESS = 4.0  # drift above this multiple of the limit: looser points are no use
TAIL_MARGIN = 4.0  # the model seed is allocated for limit / TAIL_MARGIN on the calibration batch


@dataclass
class BlockCurve:
    """What one block contributes at each calibrated tolerance: passes (of the block, on the
    calibration batch) and per-sample final-image drift (0-255) with every other block exact."""

    block: int
    log_tols: list = field(default_factory=list)  # loosest first
    passes: list = field(default_factory=list)
    drift: list = field(default_factory=list)  # np.ndarray per point, one value per sample

    def add(self, log_tol: float, passes: int, drift: np.ndarray) -> None:
        self.log_tols.append(log_tol)
        self.passes.append(passes)
        self.drift.append(drift)


class Calibration:
    """One calibration batch, solved sequentially once: its final images and each block's input."""

    def __init__(self, model, noise, labels, settings, solvers=BlockSolver):
        self.model, self.labels, self.settings, self.solvers = model, labels, settings, solvers
        outs = {}
        t0 = time.perf_counter()
        self.x, st = sample(model, noise, builtin_schedule("sequential", model), labels=labels, settings=settings,
                            callback=lambda r: outs.__setitem__(r["block"], r["x"].clone()), solvers=solvers)
        self.spent = Spent()  # what the calibration sampled (tuner.search.accounting); one batch per run
        self.spent.add(st)
        self.spent.seconds = time.perf_counter() - t0
        B = model.cfg.num_blocks
        # block k's input is block k+1's result in image order; the first block's is the prior
        self.inputs = {k: prior_latents(model, noise) if k == B - 1 else model.blocks[k + 1].permute(outs[k + 1])
                       for k in range(B)}

    @torch.no_grad()
    def block_iterates(self, plan: BlockPlan, tightest: float) -> tuple[list, list]:
        """Block `plan.block` solved as one Jacobi segment from its exact input (plan's budget and
        initial guess) down to tolerance `tightest`: the iterate after each pass and each pass's
        update max |G(x) - x| over tokens, channels and batch, the residual a tolerance is
        compared with (`tarflow.solve.solve_segment`), so one run tells the stop pass of every
        tolerance >= `tightest`."""
        model, T, k = self.model, self.model.cfg.num_patches, plan.block
        blk, n = model.blocks[k], len(self.inputs[k])
        z = blk.permute(self.inputs[k])
        prev = torch.zeros_like(z) if plan.init == "zeros" else z.clone()
        prev[:, 0] = z[:, 0]  # the solver's initial guess: token 0 is exact
        iterates, residuals = [], []

        def record(_, new):
            residuals.append(float((new - iterates[-1] if iterates else new - prev).abs().amax()))
            iterates.append(new.clone())

        solver = self.solvers(blk, self.labels, n, self.settings, z.device, model.var.dtype)
        one = BlockPlan(k, 1, plan.max_iters, plan.init, tightest)
        every = 4 if model.var.is_cuda else 1  # as the sampler does
        t0 = time.perf_counter()
        solve_segment(solver, z, torch.empty_like(z), 0, T, one, None, last=True, check_every=every, record=record)
        stats = SamplerStats(T=T)
        stats.record(k, "jacobi", [len(residuals)], residuals, T * len(residuals))  # a pass: all T tokens
        self._count(stats, t0)
        return iterates, residuals

    def _count(self, stats, t0: float) -> None:
        self.spent.add(stats)
        self.spent.seconds += time.perf_counter() - t0

    @torch.no_grad()
    def finish(self, k: int, xb) -> torch.Tensor:
        """Final images from block k's result `xb` (block order), every later block exact."""
        model, T = self.model, self.model.cfg.num_patches
        x, stats, t0 = model.blocks[k].permute(xb), SamplerStats(T=T), time.perf_counter()
        for j in range(k - 1, -1, -1):
            blk, p = model.blocks[j], BlockPlan(j, T, 1)
            solver = CountedSolver(self.solvers(blk, self.labels, len(x), self.settings, x.device, model.var.dtype))
            x = blk.permute(solve_sequential(solver, blk.permute(x), p, stats, 1))
        x = model.unpatchify(x)
        if self.settings.denoise_std > 0:
            x = denoise(model, x, self.labels, self.settings.denoise_std)
        self._count(stats, t0)
        return x

    def curve(self, plan: BlockPlan, target: float, grid=GRID) -> BlockCurve:
        """Block `plan.block` as one Jacobi segment (plan's budget and guess) at the grid's
        tolerances: from START looser until the drift is hopeless (HOPELESS x `target`, the drift
        an allocation will aim at; that point is still recorded, as the neighbour of the next)
        and tighter until two points in a row are negligible (NEGLIGIBLE x `target`: the tighter
        one is charged the looser one's drift, and tighter points only cost passes). One run of
        the block gives the stop pass of every tolerance; each distinct pass count then costs one
        run of the later blocks."""
        iterates, residuals = self.block_iterates(plan, 10.0 ** min(grid))
        every = 4 if self.model.var.is_cuda else 1  # the sampler reads its stop flag this often
        done = {}

        def point(g: float):
            tol = SearchSpace.tol_of(g)
            p = next((i + 1 for i, r in enumerate(residuals)
                      if ((i + 1) % every == 0 or i + 1 == len(residuals)) and r <= tol), len(residuals))
            if p not in done:
                done[p] = pixel_drift(self.finish(plan.block, iterates[p - 1]), self.x)[0]
            return g, p, done[p]

        start = grid.index(START)
        looser, tighter = [], []
        for g in reversed(grid[:start]):
            looser.append(point(g))
            if looser[-1][2].max() > HOPELESS * target:
                break
        small = [False]
        for g in grid[start:]:
            tighter.append(point(g))
            small.append(tighter[-1][2].max() < NEGLIGIBLE * target)
            if small[-1] and small[-2]:
                break
        curve = BlockCurve(plan.block)
        for g, p, d in looser[::-1] + tighter:
            curve.add(g, p, d)
        return curve


def admissible(curve: BlockCurve) -> list[tuple[float, int, np.ndarray]]:
    """The points an allocation may pick, as (log10 tol, passes, per-sample drift it is charged):
    each point is charged the larger of its own drift and its looser neighbour's, per sample,
    since an unlucky batch stops like a typical one at the looser tolerance (module docstring).
    The loosest point is only a neighbour."""
    return [(curve.log_tols[i], curve.passes[i], np.maximum(curve.drift[i], curve.drift[i - 1]))
            for i in range(1, len(curve.log_tols))]


@dataclass(frozen=True)
class Allocation:
    """Per block (forward index) the chosen log10 tolerance, and what the model predicts for
    the calibration batch: serial passes and the worst sample's drift (0-255)."""

    log_tols: dict
    passes: int
    drift: float


BEAM = 4096  # partial allocations kept per block (cheapest first); exact for 4 blocks


def allocate(curves: list[BlockCurve], limit: float) -> Allocation | None:
    """The tolerances with the fewest passes whose modelled drift stays within `limit`: per
    sample the root-sum-square of what each block is charged (`admissible`), worst sample.
    Blocks one at a time, keeping the BEAM cheapest partial allocations within the limit (the
    drift only grows as blocks are added); None if not even the tightest points fit."""
    states = [(0, None, ())]  # passes, per-sample sum of squared drift, chosen log tols
    for curve in curves:
        grown = []
        for passes, sq, chosen in states:
            for g, p, d in admissible(curve):
                s2 = d ** 2 if sq is None else sq + d ** 2
                if math.sqrt(s2.max()) <= limit:
                    grown.append((passes + p, s2, chosen + (g,)))
        if not grown:
            return None
        grown.sort(key=lambda s: (s[0], s[1].max()))
        states = grown[:BEAM]
    passes, sq, chosen = states[0]
    return Allocation({c.block: g for c, g in zip(curves, chosen)}, passes, float(math.sqrt(sq.max())))


def wants_model_seed(cfg) -> bool:
    """Whether a tune with these options has a model seed: a drift limit to allocate and the
    segments mode its one-segment plans need."""
    return cfg.max_drift is not None and "segments" in cfg.modes


def model_seed(model, profile, space: SearchSpace, cfg, solvers=BlockSolver,
               spent: Spent | None = None) -> tuple[Schedule, dict] | None:
    """The `model` seed and its prediction: one Jacobi segment per block from the profile's best
    initial guess, run to its tolerance (no budget below T), each block's tolerance allocated by the drift
    model for cfg.max_drift / TAIL_MARGIN (the search's n samples and the verification noise
    have a heavier tail than one calibration batch: on the bundled model their worst sample
    drifted 1.1-2.4x, on fresh noise up to 6.7x, what the model predicted for the batch).

    The calibration batch is the search noise's first batch, so the seed trial's first batch
    is the batch the prediction is for. None without a drift limit (nothing to allocate) or
    where no allocation fits. `spent` counts what the calibration sampled (also when none fits)."""
    if not wants_model_seed(cfg):
        return None
    bs, B = cfg.batch, model.cfg.num_blocks
    noise = make_noise(cfg.n, model, cfg.seed)[:bs]
    labels = cfg.sampling.make_labels(cfg.n, model, cfg.seed)
    cal = Calibration(model, noise, None if labels is None else labels[:bs], cfg.sampling, solvers)
    best = dict(zip(profile.blocks.block, profile.blocks.best_init))
    T = model.cfg.num_patches  # no budget below the segment's length: the tolerance stops it (tuner.search.space)
    base = {k: BlockPlan(k, 1, T, str(best[k])) for k in range(B - 1, -1, -1)}
    target = cfg.max_drift / TAIL_MARGIN
    curves = [cal.curve(p, target) for p in base.values()]
    if spent is not None:  # all the calibration samples is done: count it, whether or not an allocation fits
        spent.add_spent(cal.spent)
    alloc = allocate(curves, target)
    if alloc is None:
        return None
    plans = tuple(BlockPlan(**{**vars(p), "tol": SearchSpace.tol_of(alloc.log_tols[k])}) for k, p in base.items())
    sched = Schedule(plans=plans, fingerprint=model.fingerprint, name="model")
    chosen = {c.block: c.log_tols.index(alloc.log_tols[c.block]) for c in curves}
    prediction = {
        "drift": alloc.drift, "passes": alloc.passes, "limit": cfg.max_drift, "margin": TAIL_MARGIN,
        "combine": "root-sum-square per sample", "batch": bs,
        "blocks": [{"block": c.block, "log_tol": alloc.log_tols[c.block], "passes": c.passes[chosen[c.block]],
                    "drift": float(c.drift[chosen[c.block]].max())} for c in curves],
        "calibration": {"points": sum(len(c.log_tols) for c in curves), "runs": cal.spent.batches,
                        "passes": cal.spent.passes, "tokens": cal.spent.tokens}}
    return sched, prediction


PREDICTION_ATTR = "model_seed"  # the study user attribute holding the model seed's prediction


def add_model_seed(seeds: dict, model, profile, space: SearchSpace, cfg, solvers=BlockSolver,
                   existing=None, spent: Spent | None = None) -> dict | None:
    """Put the `model` seed (as it lies in the search space) second among the seeds, after the
    sequential reference (seeds run in order, and a small --trials may not reach the last ones);
    returns its prediction (None when there is no model seed, see `model_seed`). `existing`: the
    study being resumed or joined, if it exists; the model seed it enqueued is taken from it
    rather than calibrated again (a batch per calibration point, for every worker and resume).
    `spent` counts what a calibration here sampled."""
    made = _enqueued(existing, space, model) or model_seed(model, profile, space, cfg, solvers, spent)
    if made is None:
        return None
    items = list(seeds.items())
    seeds.clear()
    seeds.update(items[:1] + [("model", space.schedule_from_params(space.params_of(made[0]), "model",
                                                                   model.fingerprint))] + items[1:])
    return made[1]


def _enqueued(study, space: SearchSpace, model):
    """(schedule, prediction) of the model seed `study` enqueued, or None (no study, or one from
    before the model seed, or one whose creator has not enqueued its seeds yet)."""
    trials = [] if study is None else study.get_trials(deepcopy=False)
    params = next((t.params for t in trials if t.user_attrs.get("seed") == "model" and t.params), None)
    if params is None:
        return None
    return space.schedule_from_params(params, "model", model.fingerprint), study.user_attrs.get(PREDICTION_ATTR)


def with_prediction(table, study, prediction: dict | None):
    """trials.csv with the model seed's predicted worst-sample drift and passes per batch on its
    row (`predicted_drift`, `predicted_passes`), for the report to set beside what it measured.
    The prediction is also kept in the study (PREDICTION_ATTR), once, where the study ran a model
    seed (a study resumed from before the model seed has none to predict)."""
    has_seed = "seed" in table and (table.seed == "model").any()
    if prediction is not None and has_seed and study.user_attrs.get(PREDICTION_ATTR) is None:
        study.set_user_attr(PREDICTION_ATTR, prediction)
    pred = study.user_attrs.get(PREDICTION_ATTR) if has_seed else None
    if pred is None:
        return table
    row = table.seed == "model"
    table["predicted_drift"] = np.where(row, pred["drift"], np.nan)
    table["predicted_passes"] = np.where(row, pred["passes"], np.nan)
    return table
