"""`tune`: parse the options, call `tuner.api.tune`, print what it found (tuner.cli.verdict).

The search options and the study options are two option groups (`_inject`), and their defaults
are read off `tuner.api.tune`'s signature, so the command line and the Python call cannot drift
apart."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import typer

from tuner import api
from tuner.bundled import DEFAULT_CALIB, DEFAULT_CKPT, portable
from tuner.cli.app import app
from tuner.cli.options import (SOLVER_HELP, _inject, _opt, load_model, model_command, parse_drift, parse_modes,
                               progress_bar, resolve_device, settings_for)

_API = {k: p.default for k, p in inspect.signature(api.tune).parameters.items()}


def _option(name: str, annotation, help: str, default=None):
    return _opt(name, annotation, typer.Option(_API[name] if default is None else default, help=help))


SEARCH_OPTIONS = [
    _option("tolerance", float, "allowed FID increase over sequential (same noise, same n)"),
    _option("trials", int, "trials in the study (its total, across --resume and workers)"),
    _option("timeout", Optional[float], "seconds"),
    _option("batch", int, "batch size latency is tuned for"),
    _option("n", int, "FID samples per trial (multiple of --batch)"),
    _option("verify_n", int, "FID samples when re-verifying the winner (>= 2n)"),
    _option("extractor", Optional[str], "FID features in the loop (default: mnist-cnn for 28x28 grey models "
            "on CPU, else inception)"),
    _option("verify_extractor", Optional[str], "FID features for verification (default: as --extractor on "
            "CPU, inception on GPU)"),
    _option("ref", Optional[Path], "reference statistics for --extractor (see fid-ref)"),
    _option("verify_ref", Optional[Path], "reference statistics for --verify-extractor"),
    _option("ref_data", Optional[Path], "images (npz test split or folder) to compute the reference "
            "statistics from (default: committed MNIST ones)"),
    _option("prune_rmse", float, "prune when warm-up pixel RMSE (0-255) exceeds this"),
    _option("objective", Optional[str], "latency (measured on this device), cost:DEVICE.json (modelled on "
            "another device, see device-profile) or passes (serial transformer passes per batch: what a "
            "latency-bound GPU pays; deterministic) [default: latency on a GPU, passes on a CPU]"),
    _option("max_drift", str, "per-sample pixel RMSE (0-255) vs sequential allowed, max over samples, "
            "re-checked at verification (--verify-n >= 256); 'off' for FID only",
            "off" if _API["max_drift"] is None else f"{_API['max_drift']:g}"),
    _option("modes", str, "block modes the search may choose", ",".join(_API["modes"])),
    _option("heartbeat", int, "seconds between trial heartbeats; a trial silent for twice this (its "
            "process died) is failed and retried by the next worker or --resume"),
    _option("solver", str, SOLVER_HELP),
    _option("seed", int, "seed of the search, its noise and the calibration draw"),
    _option("retime_rounds", int, "interleaved rounds re-timing the winner against the seeds at the end "
            "(each: up to 4 batches per schedule, sequential included); 1 for a cheaper, noisier figure"),
]
STUDY_OPTIONS = [
    _option("storage", Optional[str], "Optuna storage URL (default: sqlite in --out)"),
    _option("study", str, "study name inside the storage"),
    _option("resume", bool, "add trials to an existing study"),
    _option("storage_retry", float, "seconds a worker retries a lost storage connection (database restart, "
            "failover, locked file) before ending with exit code 3; rerun with --resume"),
]


def _search(max_drift: str, modes: str, **options) -> dict:
    return options | {"max_drift": parse_drift(max_drift), "modes": parse_modes(modes)}


@model_command(app)
@_inject("search", SEARCH_OPTIONS, _search)
@_inject("study", STUDY_OPTIONS, dict)
def tune(
    checkpoint: Path = typer.Option(DEFAULT_CKPT, help="TarFlow .pth (default: bundled MNIST)"),
    data: Path = typer.Option(DEFAULT_CALIB, help="calibration images for the profile (npz or folder)"),
    device: str = "auto",
    out: Path = typer.Option(Path(_API["out"]), help="study folder"),
    overwrite: bool = typer.Option(False, help="replace an existing schedule.json in --out"),
    plan: bool = typer.Option(False, "--plan", help="print what this tune would cost (serial passes, tokens, "
                              "sequential batches; minutes from a few batches timed here) and exit: no trial "
                              "runs, nothing is written (the profile is measured unless --resume finds one)"),
    search=None, study=None, sampling=None, geometry=None,
):
    """Search the fastest per-block schedule within an FID tolerance; writes schedule.json."""
    from tuner.cli.verdict import cost_lines, nothing_exported_line, tune_lines

    if not plan:
        api.check_out(out, ("schedule.json",), overwrite or study["resume"], "overwrite=True (or resume=True)")
    dev = resolve_device(device)
    model = load_model(checkpoint, geometry, dev, sampling.dtype_for(None))
    prog = progress_bar()
    if plan:
        fc = api.plan(model, data=data, settings=settings_for(sampling, model), out=out, log=prog.console.print,
                      progress=prog, **search, **study)
        for line in fc.lines():
            typer.echo(line)
        return
    summary, _ = api.tune(model, data=data, settings=settings_for(sampling, model), out=out,
                          overwrite=overwrite, checkpoint=portable(checkpoint), log=prog.console.print,
                          progress=prog, **search, **study)
    if summary.schedule is None:
        for line in [nothing_exported_line(summary, out), *cost_lines(summary)]:
            typer.echo(line, err=True)
        raise typer.Exit(1)
    for line in tune_lines(summary, out) + cost_lines(summary):
        typer.echo(line)
    typer.echo(f"report -> {out / 'report.html'}")
