"""`tarflow-tuner` command line: parse, call the library, print. No logic of its own."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from tarflow.errors import UserError

from .cli_options import (check_agreement, ensure_writable, geometry_options, load_model, model_command, parse_drift,
                          parse_modes, progress_bar,
                          recorded_sampling, refuse_overwrite, resolve_device, settings_for, user_errors)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Tune, run and report GS-Jacobi sampling schedules for TarFlow models.")

STUDIES = Path(__file__).resolve().parent.parent / "studies"
DEFAULT_CKPT = STUDIES / "mnist" / "model.pth"


@app.callback()
def _root():
    """Tune, run and report GS-Jacobi sampling schedules for TarFlow models."""



@app.command()
@user_errors
def train(
    data: Path = typer.Option(..., help="npz of uint8 images (x_train/y_train) or an image folder"),
    out: Path = typer.Option(..., help="checkpoint path (.pth); a .json sidecar is written beside it"),
    patch_size: int = 4, channels: int = 128, blocks: int = 4, layers: int = 2,
    head_dim: int = 64, classes: int = typer.Option(10, help="0 = unconditional"),
    steps: int = 3500, batch: int = 128, lr: float = 2e-3, warmup: int = 200,
    noise_std: float = 0.1, seed: int = 0, ckpt_every: int = 250,
    resume: bool = typer.Option(False, help="continue from OUT's .train.pt state"),
    device: str = "cpu",
):
    """Train a small (class-conditional) TarFlow."""
    from tarflow.model import TarFlowConfig
    from tarflow.train import TrainConfig, train as run_train

    cfg = TarFlowConfig(patch_size=patch_size, channels=channels, num_blocks=blocks,
                        layers_per_block=layers, head_dim=head_dim, num_classes=classes)
    tc = TrainConfig(steps=steps, batch=batch, lr=lr, warmup=warmup, noise_std=noise_std,
                     seed=seed, ckpt_every=ckpt_every)
    run_train(data, out, cfg, tc, resume=resume, device=device)


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


schedule_app = typer.Typer(help="Inspect schedules.", no_args_is_help=True)
app.add_typer(schedule_app, name="schedule")


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


@model_command(app)
def fid(
    samples: Optional[Path] = typer.Argument(
        None, help="samples .npz (x: model-space floats or uint8) or image folder; "
                   "omit to sample from --checkpoint with --schedule"),
    checkpoint: Optional[Path] = typer.Option(None, help="TarFlow .pth (default: bundled MNIST)"),
    schedule: str = typer.Option("sequential", help="schedule JSON file or built-in name"),
    n: int = typer.Option(1000, min=2, help="samples to draw (ignored with a samples file)"),
    seed: int = typer.Option(0, help="noise seed"),
    force: bool = typer.Option(False, help="run a schedule made for another model"),
    extractor: Optional[str] = typer.Option(None, help="mnist-cnn (fast, 28x28 grey only) or inception "
                                            "[default: mnist-cnn for 28x28 grey images, else inception]"),
    extractor_weights: Optional[Path] = typer.Option(
        None, help="weights file for the extractor (inception: TorchScript; env "
                   "TARFLOW_TUNER_INCEPTION also works)"),
    ref: Optional[Path] = typer.Option(None, help="reference statistics .npz (default: committed "
                                                  "MNIST test statistics for the extractor)"),
    noise_floor: bool = typer.Option(False, help="also FID of the sequential sampler over 3 seeds"),
    tolerance: Optional[float] = typer.Option(None, help="FID tolerance to check against the "
                                                         "noise floor (implies --noise-floor)"),
    batch: int = typer.Option(500, min=1, help="sampling batch size"),
    device: str = "auto",
    json_out: bool = typer.Option(False, "--json", help="print one JSON object instead"),
    workers: int = typer.Option(1, min=1, help="split the sampling over this many processes (torchrun: "
                                "NCCL on GPUs, gloo on CPU); the FID equals one process's"),
    sampling=None, geometry=None,
):
    """FID (extractor id and n always shown); with a schedule, a paired proxy vs sequential."""
    import json

    from tuner.distributed import init_ranks, launch
    from tuner.fid_command import fid_command, format_fid

    if samples is not None and not samples.exists():
        raise UserError(f"samples not found: {samples}")
    if workers > 1 and samples is not None:
        raise UserError("--workers splits sampling from --checkpoint; a samples file is read by one process")
    if workers > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(launch(workers))
    ckpt = checkpoint
    if ckpt is None and (samples is None or noise_floor or tolerance is not None):
        ckpt = DEFAULT_CKPT
    dev = resolve_device(device)
    ranks = init_ranks(dev)
    model, settings = None, None
    if ckpt is not None:
        recorded = recorded_sampling([schedule]) if samples is None else {}
        model = load_model(ckpt, geometry, dev, sampling.dtype_for(recorded.get(schedule)))
        settings = settings_for(sampling, model, recorded)
    result = fid_command(samples=samples, model=model, checkpoint=ckpt, schedule=schedule, n=n,
                         seed=seed, extractor=extractor, ref=ref, weights=extractor_weights,
                         floor=noise_floor, tolerance=tolerance, settings=settings, force=force,
                         batch=batch, device=dev, progress=not json_out and sys.stderr.isatty(), ranks=ranks)
    if result is None:  # another rank than 0 of a --workers run: rank 0 reports
        return
    if json_out:
        typer.echo(json.dumps(result, indent=2, sort_keys=True))
    else:
        for line in format_fid(result):
            typer.echo(line)


@app.command("fid-ref")
@user_errors
def fid_ref(
    data: Path = typer.Option(..., help="images: npz (x_test / x_train / x) or a folder (class sub-folders allowed)"),
    out: Path = typer.Option(..., help="reference statistics .npz to write (never replaced)"),
    extractor: str = typer.Option("inception", help="inception or mnist-cnn"),
    n: Optional[int] = typer.Option(None, help="images to use (random subset, seed 0) [default: all]"),
    split: str = typer.Option("test", help="npz split: test or train (or an array name)"),
    size: Optional[int] = typer.Option(None, help="folder images: centre crop, then resize to this side "
                                       "(use the model's image size)"),
    extractor_weights: Optional[Path] = typer.Option(None, help="weights file for the extractor"),
    device: str = "auto",
):
    """Reference statistics for FID (mean and covariance of features) with their metadata."""
    from tuner.fid_command import fid_ref_command

    ensure_writable(out)
    ref = fid_ref_command(data=data, extractor=extractor, out=out, n=n, split=split, size=size,
                          device=resolve_device(device), weights=extractor_weights,
                          progress=sys.stderr.isatty())
    typer.echo(f"wrote {out}: {ref.describe()}, images {'x'.join(map(str, ref.meta['image_shape']))}")


DEFAULT_CALIB = STUDIES / "mnist" / "calibration.npz"


@model_command(app)
def profile(
    checkpoint: Path = typer.Option(DEFAULT_CKPT, help="TarFlow .pth (default: bundled MNIST)"),
    data: Path = typer.Option(DEFAULT_CALIB, help="calibration images: npz or image folder"),
    n: int = typer.Option(256, min=1, help="calibration images (all, in order, if data holds exactly n)"),
    seed: int = 0,
    curve_n: int = typer.Option(64, min=1, help="images used for the convergence curves"),
    device: str = "auto",
    out: Path = typer.Option(Path("profile"), help="output folder"),
    overwrite: bool = False, sampling=None, geometry=None,
):
    """Per-block CRM, IGM and measured GS-Jacobi convergence curves on a calibration batch."""
    from rich.console import Console
    from rich.table import Table

    from tuner.profile import ANDERSON_CURVES, calibration_batch, run_profile

    refuse_overwrite(out, ("profile.csv", "convergence.csv", "profile.json"), overwrite)
    model = load_model(checkpoint, geometry, resolve_device(device), sampling.dtype_for(None))
    settings = settings_for(sampling, model)
    x, _ = calibration_batch(data, n, seed, model)
    with progress_bar() as prog:
        prof = run_profile(model, x, settings.make_labels(len(x), model, seed), settings=settings,
                           curve_n=curve_n, progress=prog)
    prof.save(out)
    table = Table(title=f"Block profile (forward order; sampling_step 0 runs first), n={len(x)}")
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
    from tuner.extractors import default_extractor
    from tuner.search import TuneConfig, tune as run_tune

    if (out / "schedule.json").exists() and not (resume or overwrite):
        raise UserError(f"{out} already holds schedule.json; pass --resume, --overwrite or another --out")
    ensure_writable(out / "schedule.json")
    dev = resolve_device(device)
    model = load_model(checkpoint, geometry, dev, sampling.dtype_for(None))
    settings = settings_for(sampling, model)
    ext = extractor or ("inception" if dev == "cuda" else default_extractor(model))
    vext = verify_extractor or ("inception" if dev == "cuda" else ext)
    if dev == "cpu" and "inception" in (ext, vext):
        _inception_note((trials + 4) * n * (ext == "inception") + 4 * verify_n * (vext == "inception"))
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
                           checkpoint=_portable(checkpoint))
    from tuner.report import write_report

    html = write_report(out, out / "report.html")
    from tuner.verdict import nothing_exported_line, tune_lines

    if summary.schedule is None:
        typer.echo(nothing_exported_line(summary, out), err=True)
        raise typer.Exit(1)
    for line in tune_lines(summary, out):
        typer.echo(line)
    typer.echo(f"report -> {html}")


def _preflight(cfg, model, storage_url: str | None) -> None:
    """What would fail after the (minutes-long) profile fails now: a device profile of another
    workload, an unreachable database."""
    from tuner.studies import open_storage

    if cfg.cost_model is not None:
        cfg.cost_model.check_fits(model, cfg.batch, cfg.sampling)
    if storage_url:
        open_storage(storage_url, cfg.heartbeat)


def tune_profile(prof_dir: Path, resume: bool, data: Path, seed: int, model, settings):
    """The study's block profile: reused on --resume, else measured on the calibration data."""
    from tuner.profile import Profile, calibration_batch, run_profile

    if resume and (prof_dir / "profile.json").is_file():
        return Profile.load(prof_dir)
    x, _ = calibration_batch(data, min(256, _count(data)), seed, model)
    with progress_bar() as prog:
        prof = run_profile(model, x, settings.make_labels(len(x), model, seed), settings=settings, progress=prog)
    prof.save(prof_dir)
    return prof


def _inception_note(images: int) -> None:
    from tuner.extractors import INCEPTION_CPU_S

    typer.echo(f"note: Inception features on this CPU cost ~{INCEPTION_CPU_S:.2f} s/image: about "
               f"{images * INCEPTION_CPU_S / 60:.0f} min for {images} images in this run", err=True)


def _portable(path: Path) -> str:
    """A path as it can be written into committed files: relative to the repo or cwd if possible."""
    p = path.resolve()
    for base in (STUDIES.parent, Path.cwd()):
        if p.is_relative_to(base):
            return p.relative_to(base).as_posix()
    return path.name


@model_command(app)
def device_profile(
    checkpoint: Path = typer.Option(DEFAULT_CKPT, help="TarFlow .pth (default: bundled MNIST)"),
    batch: int = typer.Option(16, min=1, help="the sampling batch the profile is for"),
    repeats: int = typer.Option(5, min=1, help="timed runs per pass width and position"),
    device: str = "auto",
    out: Path = typer.Option(..., help="device profile JSON to write (an existing file is never replaced)"),
    sampling=None, geometry=None,
):
    """Time one transformer pass per width and block on this device: `tune --objective cost:FILE`
    then searches a schedule for this device from any machine."""
    from tuner.device_profile import measure, pass_widths

    if out.exists():
        raise UserError(f"{out} already exists: choose another --out or delete it")
    ensure_writable(out)
    dev = resolve_device(device)
    model = load_model(checkpoint, geometry, dev, sampling.dtype_for(None))
    settings = settings_for(sampling, model)
    with progress_bar() as prog:
        task = prog.add_task("pass widths", total=model.cfg.num_blocks * len(pass_widths(model.cfg.num_patches)))
        prof = measure(model, batch=batch, settings=settings, device=dev, repeats=repeats,
                       progress=lambda: prog.advance(task))
    prof.save(out)
    T = model.cfg.num_patches
    for k in range(model.cfg.num_blocks):
        typer.echo(f"block {k}: one pass {prof.pass_seconds(k, 1) * 1e3:.3g} ms (1 token) .. "
                   f"{prof.pass_seconds(k, T - 1) * 1e3:.3g} ms ({T - 1} tokens)")
    typer.echo(f"device profile ({prof.device['device_name']}, batch {batch}) -> {out}")


@model_command(app)
def bench(
    schedules: list[str] = typer.Argument(None, help="schedule files or built-in names"),
    checkpoint: Path = typer.Option(DEFAULT_CKPT, help="TarFlow .pth (default: bundled MNIST)"),
    batch: int = typer.Option(16, min=1), repeats: int = typer.Option(5, min=1),
    warmup: int = typer.Option(1, min=0), seed: int = 0,
    skip_reference: bool = typer.Option(False, help="skip the slow reference-style sequential sampler"),
    device: str = "auto", force: bool = False,
    out: Optional[Path] = typer.Option(None, help="write the results as JSON here"),
    sampling=None, geometry=None,
):
    """Time samplers side by side: reference-style and fast sequential, schedules, lower bound."""
    import json

    from rich.console import Console
    from rich.table import Table

    from tarflow.checkpoint import atomic_write_text
    from tuner.bench import run_bench

    if out is not None:
        ensure_writable(out)
    dev = resolve_device(device)
    recorded = recorded_sampling(schedules or [])
    check_agreement(recorded, sampling)
    model = load_model(checkpoint, geometry, dev, sampling.dtype_for(next(iter(recorded.values()), None)))
    settings = settings_for(sampling, model, recorded)
    with progress_bar() as prog:
        res = run_bench(model, schedules or [], batch=batch, device=dev, warmup=warmup,
                        repeats=repeats, seed=seed, settings=settings,
                        skip_naive=skip_reference, force=force, progress=prog)
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


def _count(data: Path) -> int:
    from tarflow.data import load_images

    return len(load_images(data)[0])


@app.command()
@user_errors
def report(
    study_dir: Path = typer.Argument(..., help="study folder written by `tune`"),
    out: Optional[Path] = typer.Option(None, help="HTML file (default: STUDY_DIR/report.html)"),
):
    """One self-contained HTML report of a study (opens offline): profile, search, schedules, samples."""
    from tuner.report import write_report

    path = out or study_dir / "report.html"
    ensure_writable(path)
    typer.echo(f"wrote {write_report(study_dir, path)}")


def main():  # pragma: no cover - console entry point
    sys.exit(app())
