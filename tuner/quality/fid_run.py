"""The `fid` and `fid-ref` commands: FID of a samples file or of a checkpoint + schedule, noise
floor and paired proxy; reference statistics of a dataset. The CLI parses; this composes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from tarflow.data import load_images, to_nchw, to_uint8
from tarflow.errors import UserError
from tarflow.sampling import make_noise
from tarflow.schedule import resolve_schedule
from tarflow.settings import SamplingSettings

from tuner.quality.distributed import Ranks, sample_features
from tuner.quality.extractors import default_extractor, get_extractor
from tuner.quality.fid import RefStats, default_ref_path, fid_against, reference_stats
from tuner.quality.floor import noise_floor, tolerance_check
from tuner.quality.paired import pixel_drift, proxy_summary


def load_samples(path) -> np.ndarray:
    """Samples as uint8 N×C×H×W from an npz (`x`: model-space floats or uint8) or a folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"samples not found: {path}")
    if path.is_file():
        try:
            with np.load(path) as d:
                x = d["x"] if "x" in d else None
        except Exception as e:
            raise UserError(f"cannot read {path} as .npz: {e}") from None
        if x is not None and x.dtype != np.uint8:
            if not np.issubdtype(x.dtype, np.floating) or x.ndim != 4:
                raise UserError(f"{path}:x must be uint8 images or N×C×H×W model-space floats, "
                                f"got {x.dtype} {x.shape}")
            return to_uint8(torch.from_numpy(x))
        if x is not None:
            return to_nchw(x, f"{path}:x")
    return load_images(path)[0]


def _extractor(u8, model, device, weights):
    """The default extractor: mnist-cnn for 28×28 grey images, Inception otherwise."""
    name = default_extractor(u8.shape[1:] if u8 is not None else model if model is not None else ())
    return get_extractor(name, device=device, weights_path=weights)


def _sampled_fid(out: dict, model, sched, checkpoint, n, seed, settings, batch, ext, refstats, ranks, progress,
                 solvers=None):
    """FID of `n` samples of a schedule; for a schedule that is not sequential, the paired proxy
    against the sequential samples of the same noise too (into `out`). Rank 0 gets the FID."""
    noise = make_noise(n, model, seed)
    lab = settings.make_labels(n, model, seed)
    kw = dict(settings=settings, batch=batch, extractor=ext, ranks=ranks, progress=progress, solvers=solvers)
    t0 = time.perf_counter()
    x, feats = sample_features(model, sched, noise, lab, **kw)
    out["source"] = {"checkpoint": str(checkpoint), "schedule": sched.name, "seed": seed,
                     "sampling": settings.to_dict(), "processes": ranks.world,
                     "sampling_seconds": round(time.perf_counter() - t0, 2)}
    res = fid_against(to_uint8(x), refstats, ext, features=feats) if ranks.main else None
    if not sched.is_sequential(model.cfg.num_patches):
        t0 = time.perf_counter()
        x_seq, f_seq = sample_features(model, resolve_schedule("sequential", model), noise, lab, **kw)
        out["source"]["sequential_seconds"] = round(time.perf_counter() - t0, 2)
        rmse, bad = (ranks.gather(a) for a in pixel_drift(x, x_seq))
        if ranks.main:
            out["proxy"] = proxy_summary(rmse, bad, feats, f_seq, ext.id)
    return res


def fid_command(*, samples=None, model=None, checkpoint=None, schedule: str = "sequential", n: int = 1000,
                seed: int = 0, extractor: str | None = None, ref=None, weights=None,
                floor: bool = False, floor_seeds=(0, 1, 2), tolerance: float | None = None,
                settings=None, force: bool = False, batch: int = 500, device: str = "cpu",
                progress: bool = False, ranks: Ranks = Ranks(), solvers=None) -> dict | None:
    """Everything `tarflow-tuner fid` reports, as one JSON-able dict (see `format_fid`).

    Default extractor: mnist-cnn for 28×28 grey images, Inception otherwise. Under torchrun
    (`ranks`) sampling is split over the processes and rank 0 returns the result (others None)."""
    ext = None if extractor is None else get_extractor(extractor, device=device, weights_path=weights)
    u8 = load_samples(samples) if samples is not None else None
    ext = ext or _extractor(u8, model, device, weights)
    ref_path = Path(ref) if ref else default_ref_path(ext.name)
    refstats = RefStats.load(ref_path)
    out: dict = {"extractor": ext.id, "ref_path": str(ref_path)}
    sched_is_seq = False
    settings = settings or SamplingSettings()
    if samples is not None:
        out["source"] = {"samples": str(samples)}
        res = fid_against(u8, refstats, ext, progress=progress)
    else:
        if model is None:
            raise UserError("give a samples file or --checkpoint")
        if n < 2:
            raise UserError(f"--n must be >= 2 for FID, got {n}")
        sched = resolve_schedule(schedule, model, force=force)
        sched_is_seq = sched.is_sequential(model.cfg.num_patches)
        res = _sampled_fid(out, model, sched, checkpoint, n, seed, settings, batch, ext, refstats, ranks, progress,
                           solvers)
    if floor or tolerance is not None:
        if model is None:
            raise UserError("the noise floor needs a model: pass --checkpoint")
        # seed `seed` of the sequential sampler was just measured: reuse it (Inception is slow)
        known = {seed: res.fid if ranks.main else None} if sched_is_seq else {}  # same keys on every rank
        out["noise_floor"] = noise_floor(model, ref=refstats, extractor=ext, n=n if samples is None else res.n,
                                         seeds=floor_seeds, settings=settings, batch=batch,
                                         progress=progress, known=known, ranks=ranks, solvers=solvers)
        if tolerance is not None and ranks.main:
            out["tolerance"] = tolerance
            out["tolerance_warning"] = tolerance_check(tolerance, out["noise_floor"])
    if not ranks.main:
        return None
    if solvers is not None:
        out["solver"] = solvers.record()
    out |= res.to_dict()
    return out


def fid_ref_command(*, data, extractor: str, out, n: int | None = None, split: str = "test",
                    size: int | None = None, device: str = "cpu", weights=None,
                    progress: bool = False) -> RefStats:
    """Reference statistics of a dataset (npz split or image folder) written to `out` with their
    metadata (extractor id, n, source, image shape). An existing file is never replaced."""
    if Path(out).exists():
        raise UserError(f"{out} already exists: choose another --out or delete it")
    ext = get_extractor(extractor, device=device, weights_path=weights)
    return reference_stats(data, extractor=ext, split=split, n=n, size=size, cache_path=out,
                           progress=progress)
