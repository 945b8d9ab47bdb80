"""Paired metrics: a schedule's samples against the sequential samples from the same noise.

Converged GS-Jacobi reproduces the sequential sample, so per-sample pixel drift measures a
schedule's error directly, with no reference set and far less variance than FID.
"""

from __future__ import annotations

import numpy as np
import torch

from tarflow.errors import UserError

from tuner.quality.extractors import get_extractor


def _pixels(x) -> np.ndarray:
    """Model-space floats (clipped to [-1, 1], not quantised) or uint8 -> float64 on 0..255."""
    if isinstance(x, np.ndarray) and x.dtype == np.uint8:
        return x.astype(np.float64)
    x = torch.as_tensor(x).detach().cpu().double()
    x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    return ((x.clamp(-1, 1) + 1) * 127.5).numpy()


def paired_proxy(x_schedule, x_sequential, extractor=None, *, features_schedule=None,
                 features_sequential=None, batch_size: int = 100) -> dict:
    """Per-sample distance between a schedule's output and the sequential output on the same noise.

    A converged GS-Jacobi schedule reproduces the sequential sample, so this measures error
    directly, with no reference set and far less variance than FID. Pixel RMSE is on the 0..255
    scale of the clipped, unquantised images (model-space input) or of uint8 input; the feature
    distance is L2 between extractor features of the uint8 images; `feat_spread` (RMS distance
    of the sequential features from their mean) gives it a scale. `nonfinite` counts samples
    of x_schedule with NaN/inf (they are scored after replacing those values, so treat them
    as failures).
    """
    rmse, bad = pixel_drift(x_schedule, x_sequential)
    fa = fb = ext = None
    if extractor is not None:
        ext = get_extractor(extractor) if isinstance(extractor, str) else extractor
        fa = features_schedule if features_schedule is not None else ext.features(
            _pixels(x_schedule).round().astype(np.uint8), batch_size=batch_size)
        fb = features_sequential if features_sequential is not None else ext.features(
            _pixels(x_sequential).round().astype(np.uint8), batch_size=batch_size)
    return proxy_summary(rmse, bad, fa, fb, None if ext is None else ext.id)


def pixel_drift(x_schedule, x_sequential) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample pixel RMSE (0-255) and non-finite flags: the per-sample half of the proxy,
    which distributed FID computes on each rank and gathers."""
    a, b = _pixels(x_schedule), _pixels(x_sequential)
    if a.shape != b.shape:
        raise UserError(f"paired proxy needs outputs of one shape, got {a.shape} and {b.shape}")
    if isinstance(x_schedule, np.ndarray) and x_schedule.dtype == np.uint8:
        bad = np.zeros(len(a), bool)
    else:
        xs = torch.as_tensor(x_schedule)
        bad = (~torch.isfinite(xs.reshape(len(xs), -1))).any(dim=1).numpy()
    return np.sqrt(((a - b) ** 2).reshape(len(a), -1).mean(axis=1)), bad


def proxy_summary(rmse, bad, features_schedule=None, features_sequential=None, extractor_id=None) -> dict:
    out = {"n": len(rmse), "rmse_mean": float(rmse.mean()), "rmse_max": float(rmse.max()),
           "rmse_units": "0-255", "nonfinite": int(np.sum(bad))}
    if features_schedule is not None:
        fb = np.asarray(features_sequential, np.float64)
        d = np.linalg.norm(np.asarray(features_schedule) - fb, axis=1)
        spread = float(np.sqrt(((fb - fb.mean(0)) ** 2).sum(1).mean()))
        out |= {"feat_mean": float(d.mean()), "feat_max": float(d.max()), "feat_spread": spread,
                "extractor": extractor_id}
    return out
