"""`tune`: parse the options, run the search, print what it found (tuner.cli.verdict)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tarflow.errors import UserError
from tuner.bundled import DEFAULT_CALIB, DEFAULT_CKPT, portable
from tuner.cli.app import app
from tuner.cli.fid import inception_note
from tuner.cli.options import (ensure_writable, load_model, model_command,
                               parse_drift, parse_modes, progress_bar, resolve_device, settings_for)


@model_command(app)
def tune(
    checkpoint: Path = typer.Option(DEFAULT_CKPT, help="TarFlow .pth (default: bundled MNIST)"),
    data: Path = typer.Option(DEFAULT_CALIB, help="calibration images for the profile (npz or folder)"),
    tolerance: float = typer.Option(10.0, help="allowed FID increase over sequential (same noise, same n)"),
    trials: int = typer.Option(50, help="trials in the study (its total, across --resume and workers)"),
    timeout: Optional[float] = typer.Option(None, help="seconds"),
    device: str = "auto", batch: int = typer.Option(16, help="batch size latency is tuned for"),
    n: int = typer.Option(512, help="FID samples per trial (multiple of --batch)"),
    verify_n: int = typer.Option(1024, help="FID samples when re-verifying the winner (>= 2n)"),
    extractor: Optional[str] = typer.Option(None, help="FID features in the loop (default: mnist-cnn for 28x28 grey models on CPU, else inception)"),
    verify_extractor: Optional[str] = typer.Option(None, help="FID features for verification (default: as --extractor on CPU, inception on GPU)"),
    ref: Optional[Path] = typer.Option(None, help="reference statistics for --extractor (see fid-ref)"),
    verify_ref: Optional[Path] = typer.Option(None, help="reference statistics for --verify-extractor"),
    ref_data: Optional[Path] = typer.Option(None, help="images (npz test split or folder) to compute the "
                                            "reference statistics from (default: committed MNIST ones)"),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL (default: sqlite in --out)"),
    study: str = typer.Option("tarflow-tune", help="study name inside the storage"),
    resume: bool = typer.Option(False, help="add trials to an existing study"),
    prune_rmse: float = typer.Option(12.0, help="prune when warm-up pixel RMSE (0-255) exceeds this"),
    objective: Optional[str] = typer.Option(None, help="latency (measured on this device), cost:DEVICE.json "
                                            "(modelled on another device, see device-profile) or passes (serial "
                                            "transformer passes per batch: what a latency-bound GPU pays; "
                                            "deterministic) [default: latency on a GPU, passes on a CPU]"),
    max_drift: str = typer.Option("2", help="per-sample pixel RMSE (0-255) vs sequential allowed, max over "
                                  "samples, re-checked at verification (--verify-n >= 256); 'off' for FID only"),
    modes: str = typer.Option("segments,frontier", help="block modes the search may choose"),
    heartbeat: int = typer.Option(60, help="seconds between trial heartbeats; a trial silent for twice "
                                  "this (its process died) is failed and retried by the next worker or --resume"),
    seed: int = 0,
    out: Path = typer.Option(Path("runs/tune"), help="study folder"),
    overwrite: bool = typer.Option(False, help="replace an existing schedule.json in --out"),
    sampling=None, geometry=None,
):
    """Search the fastest per-block schedule within an FID tolerance; writes schedule.json."""
    from tuner.quality.extractors import default_extractor
    from tuner.search.config import TuneConfig
    from tuner.search.run import tune as run_tune

    if (out / "schedule.json").exists() and not (resume or overwrite):
        raise UserError(f"{out} already holds schedule.json; pass --resume, --overwrite or another --out")
    ensure_writable(out / "schedule.json")
    dev = resolve_device(device)
    model = load_model(checkpoint, geometry, dev, sampling.dtype_for(None))
    settings = settings_for(sampling, model)
    ext = extractor or ("inception" if dev == "cuda" else default_extractor(model))
    vext = verify_extractor or ("inception" if dev == "cuda" else ext)
    if dev == "cpu" and "inception" in (ext, vext):
        inception_note((trials + 4) * n * (ext == "inception") + 4 * verify_n * (vext == "inception"))
    cfg = TuneConfig(tolerance=tolerance, trials=trials, timeout=timeout, batch=batch, n=n,
                     verify_n=verify_n, extractor=ext, verify_extractor=vext,
                     prune_rmse=prune_rmse, seed=seed, sampling=settings,
                     objective=objective or ("latency" if dev == "cuda" else "passes"),
                     max_drift=parse_drift(max_drift), modes=parse_modes(modes), heartbeat=heartbeat)
    url = storage or f"sqlite:///{(out / 'study.db').as_posix()}"
    _preflight(cfg, model, storage and url)
    prof = tune_profile(out / "profile", resume, data, seed, model, settings)
    with progress_bar() as prog:
        task = prog.add_task("trials", total=trials)

        def report(done, best, feasible):
            prog.update(task, completed=min(done, trials),
                        description=f"trials (best feasible {best}, {feasible} feasible)")

        summary = run_tune(model, prof, cfg, device=dev, out=out, storage=url, study_name=study,
                           resume=resume, ref=ref, verify_ref=verify_ref, data=ref_data,
                           log=prog.console.print, progress=report,
                           checkpoint=portable(checkpoint))
    from tuner.report import write_report

    html = write_report(out, out / "report.html")
    from tuner.cli.verdict import nothing_exported_line, tune_lines

    if summary.schedule is None:
        typer.echo(nothing_exported_line(summary, out), err=True)
        raise typer.Exit(1)
    for line in tune_lines(summary, out):
        typer.echo(line)
    typer.echo(f"report -> {html}")


def _preflight(cfg, model, storage_url: str | None) -> None:
    """What would fail after the (minutes-long) profile fails now: a device profile of another
    workload, an unreachable database."""
    from tuner.search.studies import open_storage

    if cfg.cost_model is not None:
        cfg.cost_model.check_fits(model, cfg.batch, cfg.sampling)
    if storage_url:
        open_storage(storage_url, cfg.heartbeat)


def tune_profile(prof_dir: Path, resume: bool, data: Path, seed: int, model, settings):
    """The study's block profile: reused on --resume, else measured on the calibration data."""
    from tuner.measure.profile import Profile, calibration_batch, run_profile

    if resume and (prof_dir / "profile.json").is_file():
        return Profile.load(prof_dir)
    x, _ = calibration_batch(data, min(256, _count(data)), seed, model)
    with progress_bar() as prog:
        prof = run_profile(model, x, settings.make_labels(len(x), model, seed), settings=settings, progress=prog)
    prof.save(prof_dir)
    return prof


def _count(data: Path) -> int:
    from tarflow.data import load_images

    return len(load_images(data)[0])
