"""The pictures a study shows, written by `tune` so that the report never runs the model.

`write_pictures` samples the sequential sampler and the chosen schedule from the same noise under
the study's sampling settings and writes, into the study's `pictures/` folder: `sequential.png`,
`schedule.png`, `diff.png` (|Δ| amplified by `gain`), the worst sample of each side by side
(`worst.png`), and `pictures.json` saying what they are (n, seed, labels, passes, per-sample
pixel drift on the 0-255 scale).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from tarflow.io import atomic_write_bytes, atomic_write_text
from tarflow.data import grid_png, to_uint8
from tarflow.sampling import make_noise, sample
from tarflow.schedule import Schedule, builtin_schedule
from tarflow.settings import SamplingSettings

from tuner.quality.paired import pixel_diff, sample_drift

PICTURES_JSON = "pictures.json"


def nice_gain(max_diff: float) -> float:
    """Largest 1/2/5 x 10^k gain that maps the largest difference to at most 255 (>= 1)."""
    if max_diff <= 0:
        return 1.0
    target = 255.0 / max_diff
    if target <= 1:
        return 1.0
    e = math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * 10**e <= target:
            return float(m * 10**e)
    return float(10**e)


def write_pictures(model, schedule: Schedule | None, out: Path, *, settings: SamplingSettings,
                   seed: int = 0, n: int = 32) -> dict:
    """Sample and write the study's pictures; returns what pictures.json holds."""
    out = Path(out)
    noise = make_noise(n, model, seed)
    labels = settings.make_labels(n, model, seed)
    x_seq, st_seq = sample(model, noise, builtin_schedule("sequential", model), labels=labels, settings=settings)
    atomic_write_bytes(out / "sequential.png", lambda f: f.write(grid_png(to_uint8(x_seq), 8, 3)))
    info = {"n": n, "seed": seed, "sampling": settings.to_dict(), "sequential_passes": st_seq.passes,
            "schedule": None}
    if schedule is not None:
        x_s, st_s = sample(model, noise, schedule, labels=labels, settings=settings)
        d = pixel_diff(x_s, x_seq)  # the one drift definition (NaN counts as 255 off)
        drift = torch.from_numpy(sample_drift(d))  # per-sample pixel RMSE, 0-255
        max_d = float(d.max())
        gain = nice_gain(max_d)
        worst = int(drift.argmax())
        pair = np.stack([to_uint8(x_seq[worst:worst + 1])[0], to_uint8(x_s[worst:worst + 1])[0]])
        files = {"schedule.png": grid_png(to_uint8(x_s), 8, 3),
                 "diff.png": grid_png((d * gain).clamp(0, 255).round().to(torch.uint8).numpy(), 8, 3, gap=96),
                 "worst.png": grid_png(pair, nrow=2, scale=6)}
        for name, png in files.items():
            atomic_write_bytes(out / name, lambda f, png=png: f.write(png))
        info["schedule"] = {"name": schedule.name, "passes": st_s.passes, "gain": gain, "max_diff": max_d,
                            "rmse": float(d.pow(2).mean().sqrt()), "drift": drift.tolist(),
                            "worst": worst}
    atomic_write_text(out / PICTURES_JSON, json.dumps(info, indent=1) + "\n")
    return info
