"""`sample` and `schedule show`: run a schedule, print a resolved one."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tarflow.errors import UserError
from tuner.bundled import DEFAULT_CKPT
from tuner.cli.app import app, schedule_app
from tuner.cli.options import (ensure_writable, geometry_options, load_model, model_command,
                               recorded_sampling, resolve_device, settings_for, user_errors)


@model_command(app)
def sample(
    checkpoint: Path = typer.Option(DEFAULT_CKPT, help="TarFlow .pth (default: bundled MNIST)"),
    schedule: str = typer.Option("sequential", help="schedule JSON file or built-in name"),
    n: int = typer.Option(64, min=1), seed: int = 0,
    noise: Optional[Path] = typer.Option(None, help="(N, T, D) float32 .npy of standard-normal latents"),
    device: str = "auto",
    force: bool = typer.Option(False, help="run a schedule made for another model"),
    out: Path = typer.Option(Path("samples"), help="writes OUT.npz and OUT.png"),
    sampling=None, geometry=None,
):
    """Sample images with a schedule; writes OUT.npz (x, labels, stats) and an OUT.png grid."""
    import json
    import time

    import numpy as np
    import torch

    from tarflow.checkpoint import atomic_write_bytes
    from tarflow.data import save_grid
    from tarflow.sampling import make_noise, sample as run_sample
    from tarflow.schedule import resolve_schedule

    out_npz, out_png = out.with_suffix(".npz"), out.with_suffix(".png")
    ensure_writable(out_npz)
    dev = resolve_device(device)
    recorded = recorded_sampling([schedule])
    model = load_model(checkpoint, geometry, dev, sampling.dtype_for(recorded.get(schedule)))
    sched = resolve_schedule(schedule, model, force=force)
    settings = settings_for(sampling, model, recorded)
    cfg = model.cfg
    if noise is not None:
        try:
            z = torch.from_numpy(np.load(noise)).float()
        except Exception as e:
            raise UserError(f"cannot read noise {noise}: {e}") from None
        if z.ndim != 3 or tuple(z.shape[1:]) != (cfg.num_patches, cfg.token_dim):
            raise UserError(f"noise {noise} has shape {tuple(z.shape)}, expected "
                            f"(N, {cfg.num_patches}, {cfg.token_dim})")
        n = z.shape[0]
    else:
        z = make_noise(n, model, seed)
    y = settings.make_labels(n, model, seed)
    tuned = sched.provenance.get("device_class"), sched.provenance.get("batch")
    if tuned[0] and (tuned[0] != dev or (tuned[1] and tuned[1] != n)):
        typer.echo(f"warning: schedule was tuned on {tuned[0]} at batch {tuned[1]}; running on "
                   f"{dev} at batch {n}: latency may not be optimal", err=True)
    t0 = time.perf_counter()
    x, stats = run_sample(model, z, sched, labels=y, settings=settings)
    secs = time.perf_counter() - t0
    keep = [i for i in range(n) if i not in set(stats.failed)]  # never write a NaN image
    y_all = y if y is not None else torch.full((n,), -1)
    payload = {"x": x[keep].float().cpu().numpy(), "labels": y_all[keep].numpy(),
               "failed": np.array(stats.failed, np.int64),
               "stats": np.array(json.dumps(stats.to_dict())), "schedule": np.array(sched.to_json()),
               "sampling": np.array(json.dumps(settings.to_dict()))}
    atomic_write_bytes(out_npz, lambda f: np.savez(f, **payload))
    if keep:
        save_grid(x[keep], out_png)
    if stats.failed:
        typer.echo(f"warning: {len(stats.failed)} sample(s) non-finite even when solved token by token "
                   f"(indices {stats.failed[:8]}): not written", err=True)
    fb = f", {len(stats.fallbacks)} fallback segment(s)" if stats.fallbacks else ""
    typer.echo(f"sampled {len(keep)} of {n} images with '{sched.name}' on {dev} in {secs:.2f} s "
               f"({stats.passes} transformer passes{fb}) -> {out_npz}" + (f", {out_png}" if keep else ""))


@schedule_app.command("show")
@user_errors
@geometry_options
def schedule_show(
    spec: str = typer.Argument(..., help="schedule JSON file or built-in name"),
    checkpoint: Path = typer.Option(DEFAULT_CKPT, help="model the schedule is resolved for"),
    force: bool = False, geometry=None,
):
    """Print the resolved schedule JSON (save it to a file to edit a built-in)."""
    from tarflow.schedule import resolve_schedule

    model = load_model(checkpoint, geometry, "cpu")
    typer.echo(resolve_schedule(spec, model, force=force).to_json(), nl=False)
