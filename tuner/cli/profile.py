"""`profile`: per-block CRM, IGM and convergence curves, printed as a table."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import typer

from tuner import api
from tuner.bundled import DEFAULT_CALIB, DEFAULT_CKPT
from tuner.cli.app import app
from tuner.cli.options import load_model, model_command, progress_bar, resolve_device, settings_for

_API = {k: p.default for k, p in inspect.signature(api.profile).parameters.items()}  # one set of defaults


@model_command(app)
def profile(
    checkpoint: Path = typer.Option(DEFAULT_CKPT, help="TarFlow .pth (default: bundled MNIST)"),
    data: Path = typer.Option(DEFAULT_CALIB, help="calibration images: npz or image folder"),
    n: int = typer.Option(_API["n"], min=1, help="calibration images (all, in order, if data holds exactly n)"),
    seed: int = _API["seed"],
    curve_n: int = typer.Option(_API["curve_n"], min=1, help="images used for the convergence curves"),
    device: str = "auto",
    out: Path = typer.Option(Path("profile"), help="output folder"),
    overwrite: bool = False, sampling=None, geometry=None,
):
    """Per-block CRM, IGM and measured GS-Jacobi convergence curves on a calibration batch.

    A class-conditional model sees each labelled image with its own label (--labels uncond:
    unconditionally); profile.json records which."""
    from rich.console import Console
    from rich.table import Table

    from tuner.measure.profile import ANDERSON_CURVES

    api.check_out(out, api.PROFILE_FILES, overwrite)
    model = load_model(checkpoint, geometry, resolve_device(device), sampling.dtype_for(None))
    prof = api.profile(model, data=data, n=n, seed=seed, curve_n=curve_n, settings=settings_for(sampling, model),
                       out=out, overwrite=overwrite, progress=progress_bar())
    table = Table(title=f"Block profile (forward order; sampling_step 0 runs first), n={prof.meta['n']}, "
                        f"labels: {prof.meta['labels']}")
    anderson = ANDERSON_CURVES
    table.caption = ("passes: one segment from the best init until max |x - x*| <= 1e-3; "
                     "AA m: the same with Anderson mixing over m passes")
    for col in ("block", "samp. step", "crm", "crm %", "igm zeros", "igm z", "best init",
                "passes", *(f"AA m={m}" for m in anderson)):
        table.add_column(col, justify="right")
    for r in prof.blocks.itertuples():
        need = [prof.iters_needed(r.block, 1, r.best_init, 1e-3, m) for m in (0, *anderson)]
        table.add_row(str(r.block), str(r.sampling_step), f"{r.crm:.3g}", f"{r.crm_share:.1f}",
                      f"{r.igm_zeros:.3g}", f"{r.igm_z:.3g}", r.best_init, *map(str, need))
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    typer.echo(f"wrote {out}/profile.csv, convergence.csv, iters_to_tol.csv, profile.json")
