"""`bench`: time samplers side by side and print the table."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from tuner.bundled import DEFAULT_CKPT
from tuner.cli.app import app
from tuner.cli.options import (SOLVER_HELP, SolverRequest, check_agreement, ensure_writable, load_model, model_command, progress_bar, recorded_sampling, resolve_device, settings_for)


@model_command(app)
def bench(
    schedules: list[str] = typer.Argument(None, help="schedule files or built-in names"),
    checkpoint: Path = typer.Option(DEFAULT_CKPT, help="TarFlow .pth (default: bundled MNIST)"),
    batch: int = typer.Option(16, min=1), repeats: int = typer.Option(5, min=1),
    warmup: int = typer.Option(1, min=0), seed: int = 0,
    skip_reference: bool = typer.Option(False, help="skip the slow reference-style sequential sampler"),
    device: str = "auto", force: bool = False,
    out: Optional[Path] = typer.Option(None, help="write the results as JSON here"),
    solver: str = typer.Option("auto", help=SOLVER_HELP + "; a comma list (e.g. eager,graphs) times "
                               "every sampler once per solver, side by side"),
    sampling=None, geometry=None,
):
    """Time samplers side by side: reference-style and fast sequential, schedules, lower bound."""
    import json

    from rich.console import Console
    from rich.table import Table

    from tarflow.checkpoint import atomic_write_text
    from tuner.measure.bench import run_bench

    if out is not None:
        ensure_writable(out)
    solvers = SolverRequest(solver)
    dev = resolve_device(device)
    recorded = recorded_sampling(schedules or [])
    check_agreement(recorded, sampling)
    model = load_model(checkpoint, geometry, dev, sampling.dtype_for(next(iter(recorded.values()), None)))
    settings = settings_for(sampling, model, recorded)
    with progress_bar() as prog:
        res = run_bench(model, schedules or [], batch=batch, device=dev, warmup=warmup,
                        repeats=repeats, seed=seed, settings=settings,
                        skip_naive=skip_reference, force=force, progress=prog,
                        solvers=[solvers.choice(dev, s) for s in solvers.names])
    res["command"] = "tarflow-tuner bench " + " ".join(sys.argv[2:])
    table = Table(title=f"batch {batch} on {res['device_name']} (torch {res['torch']}), "
                        f"median of {repeats} after {warmup} warm-up")
    for col in ("sampler", "median ms", "spread ms", "x vs fast seq", "x vs ref seq",
                "/ lower bound", "serial passes", "tokens", "drift RMSE", "load 1m"):
        table.add_column(col, justify="right")
    for r in res["rows"]:
        lat = r["latency"]
        ref_x = r["speedup_vs_reference_sequential"]
        table.add_row(r["name"], f"{lat['median_s'] * 1e3:.1f}",
                      f"{lat['min_s'] * 1e3:.1f}-{lat['max_s'] * 1e3:.1f}",
                      f"{r['speedup_vs_fast_sequential']:.2f}", "-" if ref_x is None else f"{ref_x:.2f}",
                      f"{r['ratio_to_lower_bound']:.1f}", str(r["passes"]), str(r["tokens"]),
                      f"{r['proxy']['rmse_mean']:.3g}/{r['proxy']['rmse_max']:.3g}" if "proxy" in r else "-",
                      f"{lat['loadavg_1min_before']:.2f}>{lat['loadavg_1min_after']:.2f}")
    table.caption = ("serial passes: transformer calls one after another; drift RMSE: pixel RMSE (0-255) "
                     "mean/max vs the fast sequential sample on the same noise; load 1m: load average "
                     "before>after the row (a busy machine makes the figures unreliable)")
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    if out is not None:
        atomic_write_text(out, json.dumps(res, indent=1) + "\n")
        typer.echo(f"wrote {out}")
