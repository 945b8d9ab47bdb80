"""Paired metrics: a schedule's samples against the sequential samples from the same noise.

Converged GS-Jacobi reproduces the sequential sample, so per-sample pixel drift measures a
schedule's error directly, with no reference set and far less variance than FID.
"""

from __future__ import annotations

import numpy as np
import torch

from tarflow.data import to_pixels, to_uint8
from tarflow.errors import UserError

from tuner.quality.extractors import get_extractor


NONFINITE_DIFF = 255.0  # a NaN pixel counts as fully wrong: a sample that failed is never "close"


def _pixels(x) -> torch.Tensor:
    """Model-space floats or uint8 images -> float64 pixels on 0..255 (tarflow.data.to_pixels:
    clipped, unquantised; NaN stays NaN for `pixel_diff` to score)."""
    if isinstance(x, np.ndarray) and x.dtype == np.uint8:
        return torch.from_numpy(x).double()
    return to_pixels(torch.as_tensor(x), torch.float64)


def pixel_diff(x_schedule, x_sequential) -> torch.Tensor:
    """|schedule - sequential| per pixel on 0..255: the one drift definition behind the paired
    proxy, FID's proxy lines, the bench's drift column and the study's difference pictures.

    NaN policy (one, for every caller): a pixel that is NaN in either image is NONFINITE_DIFF
    (255) off; +-inf clips to the range like any value outside it."""
    a, b = _pixels(x_schedule), _pixels(x_sequential)
    if a.shape != b.shape:
        raise UserError(f"paired proxy needs outputs of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.nan_to_num((a - b).abs(), nan=NONFINITE_DIFF)


def sample_drift(diff: torch.Tensor) -> np.ndarray:
    """Per-sample pixel RMSE (0-255) of a `pixel_diff`."""
    return diff.pow(2).flatten(1).mean(1).sqrt().numpy()


def paired_proxy(x_schedule, x_sequential, extractor=None, *, features_schedule=None,
                 features_sequential=None, batch_size: int = 100) -> dict:
    """Per-sample distance between a schedule's output and the sequential output on the same noise.

    A converged GS-Jacobi schedule reproduces the sequential sample, so this measures error
    directly, with no reference set and far less variance than FID. Pixel RMSE is on the 0..255
    scale of the clipped, unquantised images (model-space input) or of uint8 input; the feature
    distance is L2 between extractor features of the uint8 images; `feat_spread` (RMS distance
    of the sequential features from their mean) gives it a scale. `nonfinite` counts samples
    of x_schedule with NaN/inf (their NaN pixels score as 255 off, see `pixel_diff`; treat them
    as failures).
    """
    rmse, bad = pixel_drift(x_schedule, x_sequential)
    fa = fb = ext = None
    if extractor is not None:
        ext = get_extractor(extractor) if isinstance(extractor, str) else extractor
        fa = features_schedule if features_schedule is not None else ext.features(
            _uint8(x_schedule), batch_size=batch_size)
        fb = features_sequential if features_sequential is not None else ext.features(
            _uint8(x_sequential), batch_size=batch_size)
    return proxy_summary(rmse, bad, fa, fb, None if ext is None else ext.id)


def pixel_drift(x_schedule, x_sequential) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample pixel RMSE (0-255) and non-finite flags: the per-sample half of the proxy,
    which distributed FID computes on each rank and gathers."""
    rmse = sample_drift(pixel_diff(x_schedule, x_sequential))
    xs = torch.as_tensor(x_schedule)
    bad = (~torch.isfinite(xs.reshape(len(xs), -1).double())).any(dim=1).numpy()
    return rmse, bad


def _uint8(x) -> np.ndarray:
    return x if isinstance(x, np.ndarray) and x.dtype == np.uint8 else to_uint8(torch.as_tensor(x))


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
