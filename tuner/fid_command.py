"""The `fid` and `fid-ref` commands: FID of a samples file or of a checkpoint + schedule, noise
floor and paired proxy; reference statistics of a dataset. The CLI parses; this composes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from tarflow.data import load_images, to_nchw, to_uint8
from tarflow.errors import UserError
from tarflow.sampling import make_noise, sample_batched
from tarflow.schedule import resolve_schedule
from tarflow.settings import SamplingSettings

from .extractors import default_extractor, get_extractor
from .fid import RefStats, default_ref_path, fid_against, reference_stats
from .floor import noise_floor, tolerance_check
from .paired import paired_proxy


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


def fid_command(*, samples=None, model=None, checkpoint=None, schedule: str = "sequential", n: int = 1000,
                seed: int = 0, extractor: str | None = None, ref=None, weights=None,
                floor: bool = False, floor_seeds=(0, 1, 2), tolerance: float | None = None,
                settings=None, force: bool = False, batch: int = 500, device: str = "cpu",
                progress: bool = False) -> dict:
    """Everything `tarflow-tuner fid` reports, as one JSON-able dict (see `format_fid`).

    Default extractor: mnist-cnn for 28×28 grey images, Inception otherwise."""
    ext = None if extractor is None else get_extractor(extractor, device=device, weights_path=weights)
    u8 = load_samples(samples) if samples is not None else None
    if ext is None:
        grey28 = (u8.shape[1:] == (1, 28, 28)) if u8 is not None else (
            model is not None and default_extractor(model) == "mnist-cnn")
        ext = get_extractor("mnist-cnn" if grey28 else "inception", device=device, weights_path=weights)
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
        noise = make_noise(n, model, seed)
        lab = settings.make_labels(n, model, seed)
        t0 = time.perf_counter()
        x, _ = sample_batched(model, sched, noise, lab, settings=settings, batch=batch)
        out["source"] = {"checkpoint": str(checkpoint), "schedule": sched.name, "seed": seed,
                         "sampling": settings.to_dict(),
                         "sampling_seconds": round(time.perf_counter() - t0, 2)}
        u8 = to_uint8(x)
        feats = ext.features(u8, progress=progress)
        res = fid_against(u8, refstats, ext, features=feats)
        sched_is_seq = sched.is_sequential(model.cfg.num_patches)
        if not sched_is_seq:
            seq = resolve_schedule("sequential", model)
            t0 = time.perf_counter()
            x_seq, _ = sample_batched(model, seq, noise, lab, settings=settings, batch=batch)
            out["source"]["sequential_seconds"] = round(time.perf_counter() - t0, 2)
            f_seq = ext.features(to_uint8(x_seq), progress=progress)
            out["proxy"] = paired_proxy(x, x_seq, ext, features_schedule=feats,
                                        features_sequential=f_seq)
    out |= res.to_dict()
    if floor or tolerance is not None:
        if model is None:
            raise UserError("the noise floor needs a model: pass --checkpoint")
        # seed `seed` of the sequential sampler was just measured: reuse it (Inception is slow)
        known = {seed: res.fid} if sched_is_seq else {}
        out["noise_floor"] = noise_floor(model, ref=refstats, extractor=ext, n=res.n,
                                         seeds=floor_seeds, settings=settings, batch=batch,
                                         progress=progress,
                                         known=known)
        if tolerance is not None:
            out["tolerance"] = tolerance
            out["tolerance_warning"] = tolerance_check(tolerance, out["noise_floor"])
    return out


def format_fid(r: dict) -> list[str]:
    """Terminal lines for a `fid_command` result; every FID names its extractor and n."""
    ref = r["ref"]
    lines = [f"FID {r['fid']:.4g} ({r['extractor']}, n={r['n']}) against "
             f"{Path(r['ref_path']).name} ({ref.get('source', '?')} {ref.get('split', '?')}, "
             f"n={ref['n']})"]
    src = r.get("source", {})
    if "schedule" in src:
        lines.append(f"  samples: {src['schedule']}, seed {src['seed']}, labels {src['sampling']['labels']}, "
                     f"sampled in {src['sampling_seconds']:.1f} s")
    if "proxy" in r:
        p = r["proxy"]
        lines.append(f"paired proxy vs sequential (same noise, n={p['n']}): pixel RMSE mean "
                     f"{p['rmse_mean']:.4g} max {p['rmse_max']:.4g} (0-255); feature L2 mean "
                     f"{p['feat_mean']:.4g} max {p['feat_max']:.4g} (spread {p['feat_spread']:.4g}, "
                     f"{p['extractor']})"
                     + (f"; {p['nonfinite']} non-finite samples" if p["nonfinite"] else ""))
    if "noise_floor" in r:
        f = r["noise_floor"]
        lines.append(f"noise floor (sequential, seeds {','.join(map(str, f['seeds']))}): FID "
                     f"{f['mean']:.4g} ± {f['std']:.3g} ({f['extractor']}, n={f['n']}); "
                     f"resolves differences >= {f['resolution']:.3g}")
    if r.get("tolerance_warning"):
        lines.append(f"warning: {r['tolerance_warning']}")
    return lines


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
