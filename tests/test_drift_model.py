"""The drift model on the bundled model, from real sampler runs: each block's calibration points
are what the sampler does, the per-sample root-sum-square of the blocks' contributions predicts
mixed schedules, and the model seed's prediction is within a stated factor of its trial."""

import math

import numpy as np
import pandas as pd
import pytest

from tarflow.sampling import make_noise, sample
from tarflow.schedule import BlockPlan, Schedule
from tarflow.settings import SamplingSettings
from tuner.quality.paired import pixel_drift
from tuner.search.config import TuneConfig
from tuner.search.drift_model import TAIL_MARGIN, Calibration, allocate, model_seed
from tuner.search.space import SearchSpace

BS = 16


class Prof:
    """A stand-in block profile: zeros is every block's best guess; budgets reach T - 1."""

    blocks = pd.DataFrame({"block": [0, 1, 2, 3], "best_init": ["zeros"] * 4})

    def iters_needed(self, *args):
        return 48


@pytest.fixture(scope="module")
def calibrated(model):
    settings = SamplingSettings()
    noise, labels = make_noise(BS, model, 0), settings.make_labels(BS, model, 0)
    cal = Calibration(model, noise, labels, settings)
    curves = [cal.curve(BlockPlan(k, 1, 48, "zeros"), 0.5) for k in (3, 2, 1, 0)]
    return cal, curves, noise, labels, settings


def _with(k: int, plan: BlockPlan, T: int) -> Schedule:
    return Schedule(plans=tuple(plan if j == k else BlockPlan(j, T, 1) for j in (3, 2, 1, 0)))


def test_calibration_points_are_what_the_sampler_does(model):
    """Guided and denoised: block k at a tolerance, every other block exact, gives the passes
    and per-sample drift the full sampler gives for that schedule."""
    settings = SamplingSettings(guidance=1.5, denoise_std=0.1)
    noise, labels = make_noise(BS, model, 3), settings.make_labels(BS, model, 3)
    cal = Calibration(model, noise, labels, settings)
    for k, init in ((3, "z"), (1, "zeros")):
        curve = cal.curve(BlockPlan(k, 1, 40, init), 0.5)
        assert len(curve.log_tols) >= 3 and curve.passes == sorted(curve.passes)  # looser first: fewer passes
        for g, p, d in list(zip(curve.log_tols, curve.passes, curve.drift))[::4]:
            plan = BlockPlan(k, 1, 40, init, SearchSpace.tol_of(g))
            x, st = sample(model, noise, _with(k, plan, model.cfg.num_patches), labels=labels, settings=settings)
            assert st.iters[3 - k] == [p]
            assert np.abs(pixel_drift(x, cal.x)[0] - d).max() <= 1e-6


def test_root_sum_square_of_block_contributions_predicts_mixed_schedules(model, calibrated):
    """Per sample, sqrt(sum_k d_k^2) predicts the worst sample's drift of schedules mixing the
    blocks' calibrated tolerances within 10 % (log error), better than the plain sum; passes add."""
    cal, curves, noise, labels, settings = calibrated
    rng = np.random.default_rng(0)
    rss_err, sum_err = [], []
    for _ in range(4):
        pick = {c.block: int(rng.integers(1, len(c.log_tols))) for c in curves}
        plans = tuple(BlockPlan(c.block, 1, 48, "zeros", SearchSpace.tol_of(c.log_tols[pick[c.block]])) for c in curves)
        x, st = sample(model, noise, Schedule(plans=plans), labels=labels, settings=settings)
        measured = pixel_drift(x, cal.x)[0].max()
        per = np.stack([c.drift[pick[c.block]] for c in curves])
        assert st.passes == sum(c.passes[pick[c.block]] for c in curves)
        rss_err.append(abs(math.log(np.sqrt((per ** 2).sum(0)).max() / measured)))
        sum_err.append(abs(math.log(per.sum(0).max() / measured)))
    assert max(rss_err) < 0.1 and np.mean(rss_err) < np.mean(sum_err), (rss_err, sum_err)


def test_allocation_spends_the_limit_on_the_cheapest_passes(calibrated):
    _, curves, *_ = calibrated
    loose, tight = allocate(curves, 1.0), allocate(curves, 0.05)
    assert loose.drift <= 1.0 and tight.drift <= 0.05 and loose.passes < tight.passes
    assert allocate(curves, 1e-9) is None
    # blocks differ: the easy blocks end looser than the tough one (block 3)
    assert min(loose.log_tols[k] for k in (0, 1, 2)) > loose.log_tols[3]


def test_model_seed_predicts_its_trial_within_a_factor_of_three(model):
    """The model seed on the search noise (n = 128, batch 16, limit 2/255): its worst sample
    drifts between 1/3 and 3x what the model predicted (one batch does not see the tail of
    eight: measured here 1.6x; 2.4x at n = 512), within the limit, and its first batch (the
    calibration batch) takes the predicted passes, give or take the later blocks' inputs."""
    cfg = TuneConfig(max_drift=2.0, n=128, verify_n=256, objective="passes")
    space = SearchSpace.for_model(model, Prof(), cfg.modes)
    sched, pred = model_seed(model, Prof(), space, cfg)
    assert pred["drift"] <= cfg.max_drift / TAIL_MARGIN and pred["combine"].startswith("root-sum-square")
    noise, labels = make_noise(cfg.n, model, cfg.seed), cfg.sampling.make_labels(cfg.n, model, cfg.seed)
    seq = Schedule(plans=tuple(BlockPlan(k, 49, 1) for k in (3, 2, 1, 0)))
    drift, first = [], None
    for i in range(0, cfg.n, BS):
        x, st = sample(model, noise[i:i + BS], sched, labels=labels[i:i + BS])
        x0, _ = sample(model, noise[i:i + BS], seq, labels=labels[i:i + BS])
        drift.append(pixel_drift(x, x0)[0])
        first = first or st.passes
    measured = float(np.concatenate(drift).max())
    assert pred["drift"] / 3 <= measured <= 3 * pred["drift"] and measured <= cfg.max_drift, (measured, pred)
    assert abs(first - pred["passes"]) <= 2
