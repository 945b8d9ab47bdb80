"""`sample` and `schedule show`: run a schedule, print a resolved one."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tarflow.errors import UserError
from tuner.bundled import DEFAULT_CKPT
from tuner.cli.app import app, schedule_app
from tuner.cli.options import (ensure_writable, geometry_options, load_model, model_command, progress_bar,
                               recorded_sampling, resolve_device, settings_for, solver_options, user_errors)

DEFAULT_BATCH = 64  # samples per sampler call when neither --batch nor the schedule says


@model_command(app)
@solver_options
def sample(
    checkpoint: Path = typer.Option(DEFAULT_CKPT, help="TarFlow .pth (default: bundled MNIST)"),
    schedule: str = typer.Option("sequential", help="schedule JSON file or built-in name"),
    n: int = typer.Option(64, min=1), seed: int = 0,
    noise: Optional[Path] = typer.Option(None, help="(N, T, D) float32 .npy of standard-normal latents"),
    batch: Optional[int] = typer.Option(None, min=1, help="samples per sampler call [default: the batch the "
                                        f"schedule was tuned at, else {DEFAULT_BATCH}]"),
    device: str = "auto",
    force: bool = typer.Option(False, help="run a schedule made for another model"),
    out: Path = typer.Option(Path("samples"), help="writes OUT.npz and OUT.png (OUT as given, dots "
                             "and all; a trailing .npz or .png is dropped)"),
    sampling=None, geometry=None, solver=None,
):
    """Sample images with a schedule, in batches; writes OUT.npz (x, labels, stats) and an OUT.png grid."""
    import time

    from tarflow.sampling import make_noise
    from tarflow.schedule import resolve_schedule

    out_npz, out_png = output_paths(out)
    ensure_writable(out_npz)
    dev = resolve_device(device)
    recorded = recorded_sampling([schedule])
    model = load_model(checkpoint, geometry, dev, sampling.dtype_for(recorded.get(schedule)))
    sched = resolve_schedule(schedule, model, force=force)
    settings = settings_for(sampling, model, recorded)
    z = read_noise(noise, model) if noise is not None else make_noise(n, model, seed)
    y = settings.make_labels(len(z), model, seed)
    batch = sampling_batch(batch, sched, dev)
    t0 = time.perf_counter()
    with progress_bar() as prog:
        x, stats = sample_in_batches(model, z, sched, y, settings, batch, prog, solver.choice(dev))
    secs = time.perf_counter() - t0
    keep = write_samples(out_npz, out_png, x, y, stats, sched, settings)
    if stats["failed"]:
        typer.echo(f"warning: {len(stats['failed'])} sample(s) non-finite even when solved token by token "
                   f"(indices {stats['failed'][:8]}): not written", err=True)
    fb = f", {stats['fallbacks']} fallback segment(s)" if stats["fallbacks"] else ""
    runs = f" in {stats['batches']} batches of {batch}" if stats["batches"] > 1 else ""
    runs += f", {stats['solver']['used']} solver" if stats["solver"] else ""
    typer.echo(f"sampled {keep} of {len(z)} images with '{sched.name}' on {dev} in {secs:.2f} s "
               f"({stats['passes']} transformer passes{runs}{fb}) -> {out_npz}" + (f", {out_png}" if keep else ""))


def output_paths(out: Path) -> tuple[Path, Path]:
    """OUT.npz and OUT.png with every character of OUT kept: `runs/s0.0` is a name, not a stem
    with a suffix (`with_suffix` would write runs/s0.npz). Only a trailing .npz or .png, which
    names the pair already, is dropped."""
    name = out.name[:-4] if out.suffix.lower() in (".npz", ".png") else out.name
    if not name:
        raise UserError(f"--out {out} names a folder, not the samples file: add a name, e.g. {out / 'samples'}")
    return out.with_name(name + ".npz"), out.with_name(name + ".png")


def read_noise(path: Path, model):
    """Latents from a .npy file, checked against the model's (T, D)."""
    import numpy as np
    import torch

    try:
        z = torch.from_numpy(np.load(path)).float()
    except Exception as e:
        raise UserError(f"cannot read noise {path}: {e}") from None
    cfg = model.cfg
    if z.ndim != 3 or len(z) == 0 or tuple(z.shape[1:]) != (cfg.num_patches, cfg.token_dim):
        raise UserError(f"noise {path} has shape {tuple(z.shape)}, expected (N, {cfg.num_patches}, {cfg.token_dim})")
    return z


def sampling_batch(batch: int | None, sched, device: str) -> int:
    """The batch to sample at: as asked, else the one the schedule was tuned at (its speed was
    measured there), else DEFAULT_BATCH; one warning when it is not the tuned batch or device."""
    tuned_dev, tuned_batch = sched.provenance.get("device_class"), sched.provenance.get("batch")
    batch = batch or tuned_batch or DEFAULT_BATCH
    if (tuned_dev and tuned_dev != device) or (tuned_batch and tuned_batch != batch):
        typer.echo(f"warning: schedule was tuned on {tuned_dev or '?'} at batch {tuned_batch or '?'}; running "
                   f"on {device} at batch {batch}: latency may not be optimal", err=True)
    return batch


def sample_in_batches(model, z, sched, y, settings, batch: int, prog, solvers=None):
    """All of z in batches of `batch` (the last one may be smaller), images gathered on the CPU;
    returns (images, stats: totals over the batches and each batch's own SamplerStats)."""
    import torch

    from tarflow.sampling import sample

    task = prog.add_task("sampling", total=len(z))
    xs, parts = [], []
    for s in range(0, len(z), batch):
        x, st = sample(model, z[s:s + batch], sched, labels=None if y is None else y[s:s + batch],
                       settings=settings, **({} if solvers is None else {"solvers": solvers}))
        xs.append(x.cpu())
        parts.append({"start": s} | st.to_dict())
        prog.advance(task, len(x))
    stats = {"batch": batch, "batches": len(parts), "passes": sum(p["passes"] for p in parts),
             "nfe": sum(p["nfe"] for p in parts), "fallbacks": sum(len(p["fallbacks"]) for p in parts),
             "failed": [p["start"] + i for p in parts for i in p["failed"]], "per_batch": parts,
             "solver": None if solvers is None else solvers.record()}
    return torch.cat(xs), stats


def write_samples(out_npz: Path, out_png: Path, x, y, stats: dict, sched, settings) -> int:
    """One npz of every finite sample (never a NaN image) and their grid; returns how many."""
    import json

    import numpy as np
    import torch

    from tarflow.checkpoint import atomic_write_bytes
    from tarflow.data import save_grid

    keep = [i for i in range(len(x)) if i not in set(stats["failed"])]
    y_all = y.cpu() if y is not None else torch.full((len(x),), -1)
    payload = {"x": x[keep].float().numpy(), "labels": y_all[keep].numpy(),
               "failed": np.array(stats["failed"], np.int64), "stats": np.array(json.dumps(stats)),
               "schedule": np.array(sched.to_json()), "sampling": np.array(json.dumps(settings.to_dict()))}
    atomic_write_bytes(out_npz, lambda f: np.savez(f, **payload))
    if keep:
        save_grid(x[keep], out_png)
    return len(keep)


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
