"""The FID noise floor: how much FID moves from the noise seed alone at a given n."""

from __future__ import annotations

import math
import time

import numpy as np

from tarflow.data import to_uint8
from tarflow.errors import UserError
from tarflow.sampling import make_noise
from tarflow.schedule import resolve_schedule
from tarflow.settings import SamplingSettings

from tuner.quality.distributed import Ranks, sample_features
from tuner.quality.extractors import get_extractor
from tuner.quality.fid import RefStats, fid_against


def noise_floor(model, *, ref: RefStats, extractor, n: int, seeds=(0, 1, 2),
                settings=None, batch: int = 500, progress: bool = False,
                known: dict | None = None, ranks: Ranks = Ranks(), solvers=None) -> dict | None:
    """FID of the sequential (exact) sampler over >= 3 noise seeds at the same n.

    Its seed-to-seed std is how much FID moves from noise alone at this n: differences in FID
    smaller than that (see `fid_resolution`) say nothing about a schedule. `known` maps a seed
    to a FID already measured with these exact settings, so it is not paid for twice. Under
    torchrun (`ranks`) the sampling is split and the floor returned on rank 0 only.

    What the sampling cost is recorded with it, as the sampler counted it: `passes` (serial
    transformer passes), `tokens` and `batches` summed over the seeds sampled here (rank 0's
    share under torchrun; seeds in `known` cost nothing), beside `sampling_seconds`.
    """
    settings = settings or SamplingSettings()
    seeds = tuple(int(s) for s in seeds)
    if len(seeds) < 3 or len(set(seeds)) != len(seeds):
        raise UserError(f"the noise floor needs >= 3 distinct seeds, got {seeds}")
    ext = get_extractor(extractor) if isinstance(extractor, str) else extractor
    seq = resolve_schedule("sequential", model)
    values, secs, stats = [], 0.0, []
    known = known or {}
    for s in seeds:
        if s in known:
            if ranks.main:
                values.append(float(known[s]))
            continue
        t0 = time.perf_counter()
        x, feats = sample_features(model, seq, make_noise(n, model, s), settings.make_labels(n, model, s),
                                   settings=settings, batch=batch, extractor=ext, ranks=ranks,
                                   progress=progress, solvers=solvers, stats=stats)
        secs += time.perf_counter() - t0
        if ranks.main:
            values.append(fid_against(to_uint8(x), ref, ext, features=feats).fid)
    if not ranks.main:
        return None
    std = float(np.std(values, ddof=1))
    floor = {"mean": float(np.mean(values)), "std": std, "values": values, "n": n,
             "extractor": ext.id, "seeds": list(seeds), "sampling": settings.to_dict(),
             "sampling_seconds": round(secs, 2), "passes": sum(st.passes for st in stats),
             "tokens": sum(sum(st.tokens) for st in stats), "batches": len(stats)}
    floor["resolution"] = fid_resolution(floor)
    return floor


def fid_resolution(floor: dict) -> float:
    """Smallest FID difference distinguishable from noise at the floor's n.

    Rule: 2 * sqrt(2) * std, i.e. two standard deviations of the difference of two FID
    estimates on independent noise (each with the seed-to-seed std of the floor).
    """
    return 2 * math.sqrt(2) * float(floor["std"])


def tolerance_check(tolerance: float, floor: dict) -> str | None:
    """Warning text when an FID tolerance is below what FID resolves at this n, else None."""
    res = fid_resolution(floor)
    if not math.isfinite(res):
        return f"cannot judge FID tolerance {tolerance:g}: noise floor std is not finite"
    if tolerance < res:
        return (f"FID tolerance {tolerance:g} is below what FID resolves at n={floor['n']} with "
                f"{floor['extractor']} (2·√2·std = {res:.3g}, std {floor['std']:.3g} over "
                f"{len(floor['values'])} seeds): raise n or the tolerance, or use the paired proxy")
    return None
