"""`device-profile`: time one pass per width and block on this device."""

from __future__ import annotations

from pathlib import Path

import typer

from tarflow.errors import UserError
from tuner.bundled import DEFAULT_CKPT
from tuner.cli.app import app
from tuner.cli.options import (ensure_writable, load_model, model_command,
                               progress_bar, resolve_device, settings_for, solver_options)


@model_command(app)
@solver_options
def device_profile(
    checkpoint: Path = typer.Option(DEFAULT_CKPT, help="TarFlow .pth (default: bundled MNIST)"),
    batch: int = typer.Option(16, min=1, help="the sampling batch the profile is for"),
    repeats: int = typer.Option(5, min=1, help="timed runs per pass width and position"),
    device: str = "auto",
    out: Path = typer.Option(..., help="device profile JSON to write (an existing file is never replaced)"),
    sampling=None, geometry=None, solver=None,
):
    """Time one transformer pass per width and block on this device: `tune --objective cost:FILE`
    then searches a schedule for this device from any machine."""
    from tuner.measure.device_profile import measure, pass_widths

    if out.exists():
        raise UserError(f"{out} already exists: choose another --out or delete it")
    ensure_writable(out)
    dev = resolve_device(device)
    model = load_model(checkpoint, geometry, dev, sampling.dtype_for(None))
    settings = settings_for(sampling, model)
    with progress_bar() as prog:
        task = prog.add_task("pass widths", total=model.cfg.num_blocks * len(pass_widths(model.cfg.num_patches)))
        prof = measure(model, batch=batch, settings=settings, device=dev, repeats=repeats,
                       progress=lambda: prog.advance(task), solvers=solver.choice(dev))
    prof.save(out)
    T = model.cfg.num_patches
    for k in range(model.cfg.num_blocks):
        typer.echo(f"block {k}: one pass {prof.pass_seconds(k, 1) * 1e3:.3g} ms (1 token) .. "
                   f"{prof.pass_seconds(k, T - 1) * 1e3:.3g} ms ({T - 1} tokens)")
    typer.echo(f"device profile ({prof.device['device_name']}, batch {batch}) -> {out}")
